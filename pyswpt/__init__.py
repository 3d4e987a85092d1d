"""pyswpt: a Swaptacular accounting authority with its ledger in PostgreSQL."""
