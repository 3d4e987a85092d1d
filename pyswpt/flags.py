"""The bits of account.status_flags and account.config_flags (spec 02 §1.11).

The SQL side names the same bits in sql/functions/05_flags.sql.
"""

from __future__ import annotations

# status_flags, set by the ledger.
STATUS_DELETED = 1
STATUS_OVERFLOWN = 2

# config_flags, set by the owner through ConfigureAccount; other bits are echoed, never read.
CONFIG_SCHEDULED_FOR_DELETION = 1
