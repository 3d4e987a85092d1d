"""The ledger arithmetic of 10_math.sql against spec 02 §3 and its worked examples (§3.10)."""

from __future__ import annotations

import datetime as dt

import pytest
from balance_steps import DAY, MAX_INT32, MAX_INT64, MIN_INT32, MIN_INT64, YEAR, value
from factories import DEFAULT_NOW, insert_account

NOW = DEFAULT_NOW
DEBTOR_ID = -2
CREDITOR_ID = 1099511627778


def balance(conn, principal, interest, rate, since, *, creditor_id=CREDITOR_ID, now=NOW):
    return float(
        value(
            conn,
            "SELECT calc_current_balance(%s, %s, %s, %s::real, %s, %s)",
            (creditor_id, principal, interest, rate, since, now),
        )
    )


def due_interest(conn, amount, due_ts, previous_rate, rate, rate_change_ts, now=NOW):
    return value(
        conn,
        "SELECT calc_due_interest(%s, %s, %s::real, %s::real, %s, %s)",
        (amount, due_ts, previous_rate, rate, rate_change_ts, now),
    )


def available(conn, now=NOW):
    return value(
        conn,
        "SELECT calc_available_amount(a, %s) FROM account AS a WHERE debtor_id = %s AND creditor_id = %s",
        (now, DEBTOR_ID, CREDITOR_ID),
    )


@pytest.mark.parametrize(
    ("rate", "k"),
    [
        (10.0, 3.020197347210e-9),
        (-10.0, -3.338673272297e-9),
        (5.0, 1.546067006662e-9),
        (15.0, 4.428788703043e-9),
        (-50.0, -2.196450872563e-8),
    ],
)
def test_calc_k_matches_the_worked_constants(conn, rate, k):
    assert value(conn, "SELECT calc_k(%s)", (rate,)) == pytest.approx(k, rel=1e-12)


@pytest.mark.parametrize(("rate", "grown"), [(-50.0, 500.0), (0.0, 1000.0), (100.0, 2000.0)])
def test_one_year_at_a_rate_multiplies_a_positive_balance_by_one_plus_rate(conn, rate, grown):
    assert balance(conn, 1000, 0.0, rate, NOW - YEAR) == pytest.approx(grown, abs=1e-6)


def test_example_1_balance_at_plus_10_percent_over_365_days(conn):
    assert balance(conn, 5000, 100.0, 10.0, NOW - 365 * DAY) == pytest.approx(5609.634036503430, abs=1e-6)


def test_example_1_balance_at_minus_10_percent_over_365_days(conn):
    assert balance(conn, 5000, 100.0, -10.0, NOW - 365 * DAY) == pytest.approx(4590.331021358624, abs=1e-6)


def test_non_positive_balance_accrues_nothing(conn):
    assert balance(conn, 5000, -5100.0, 10.0, NOW - 365 * DAY) == -100.0
    assert balance(conn, -1000, 0.0, 100.0, NOW - YEAR) == -1000.0
    assert balance(conn, 0, 0.0, 100.0, NOW - YEAR) == 0.0


def test_root_balance_is_its_principal_without_interest(conn):
    assert balance(conn, 500, 100.0, 10.0, NOW - YEAR, creditor_id=0) == 500.0


def test_no_growth_before_last_change(conn):
    assert balance(conn, 1000, 0.0, 100.0, NOW + YEAR) == 1000.0


@pytest.mark.parametrize(
    ("rate", "interest", "locked", "expected"),
    [
        (0.0, 100.0, 0, 5100),
        (0.0, 100.0, 1000, 4100),
        (10.0, 100.0, 1000, 4609),
        (-10.0, 100.0, 1000, 3590),
        (10.0, -5100.0, 1000, -1100),
    ],
)
def test_example_1_available_amount(conn, rate, interest, locked, expected):
    insert_account(
        conn,
        DEBTOR_ID,
        CREDITOR_ID,
        now=NOW - 365 * DAY,
        principal=5000,
        interest=interest,
        interest_rate=rate,
        total_locked_amount=locked,
    )
    assert available(conn) == expected


def test_root_available_amount_ignores_interest(conn):
    insert_account(conn, DEBTOR_ID, 0, principal=500, interest=100.0)
    assert value(conn, "SELECT calc_available_amount(a, %s) FROM account AS a WHERE creditor_id = 0", (NOW,)) == 500


def test_example_3_due_interest_across_a_rate_change(conn):
    due = due_interest(conn, 1000, NOW - dt.timedelta(days=356.25), 5.0, 15.0, NOW - 183 * DAY)
    assert due == pytest.approx(97.64528106250681, abs=1e-9)


@pytest.mark.parametrize("amount", [1000, -1000])
def test_example_3_due_interest_over_two_years_with_a_change_from_0_to_10_percent(conn, amount):
    due = due_interest(conn, amount, NOW - 2 * YEAR, 0.0, 10.0, NOW - YEAR)
    assert due == pytest.approx(amount * 0.10000000000000009, abs=1e-12)


def test_example_3_due_interest_over_one_day_at_10_percent(conn):
    assert due_interest(conn, 1000, NOW - DAY, 10.0, 10.0, NOW - YEAR) == pytest.approx(0.26098, abs=1e-5)


def test_due_interest_is_zero_when_committed_after_now(conn):
    assert due_interest(conn, 1000, NOW + DAY, 10.0, 10.0, NOW - YEAR) == 0.0


@pytest.mark.parametrize(
    ("raw", "contained"),
    [
        (0, 0),
        (MAX_INT64, MAX_INT64),
        (MAX_INT64 + 1, MAX_INT64),
        (10**30, MAX_INT64),
        (-MAX_INT64, -MAX_INT64),
        (MIN_INT64, -MAX_INT64),
        (MIN_INT64 - 1, -MAX_INT64),
        (-(10**30), -MAX_INT64),
    ],
)
def test_containment_clamps_into_plus_minus_max_int64(conn, raw, contained):
    assert value(conn, "SELECT contain_principal(%s::numeric)", (raw,)) == contained


@pytest.mark.parametrize(("seqnum", "following"), [(0, 1), (-1, 0), (MAX_INT32, MIN_INT32), (MIN_INT32, MIN_INT32 + 1)])
def test_seqnum_increment_wraps_at_32_bits(conn, seqnum, following):
    assert value(conn, "SELECT wrap_increment_seqnum(%s)", (seqnum,)) == following


@pytest.mark.parametrize(
    ("a", "b", "later"),
    [
        (MIN_INT32, MAX_INT32, True),
        (1, 0, True),
        (-1, 0, False),
        (0, 0, False),
        (0, MIN_INT32, False),
        (MIN_INT32, 0, False),
        (2**30, 0, True),
        (0, 2**30, False),
    ],
)
def test_seqnum_order_is_wrap_around(conn, a, b, later):
    assert value(conn, "SELECT is_later_seqnum(%s, %s)", (a, b)) is later


def test_example_7_first_transfer_id_of_an_account_created_on_2024_05_20(conn):
    days = value(conn, "SELECT days_since_epoch(DATE '2024-05-20')")
    assert days == 19863
    assert days << 40 == 21839599462514688


@pytest.mark.parametrize("missing", range(6))
def test_current_balance_of_a_missing_value_is_null(conn, missing):
    # As when calc_current_balance was STRICT: greatest() and least() in its body skip NULLs.
    args: list = [CREDITOR_ID, 1000, 5.0, 10.0, NOW - YEAR, NOW]
    args[missing] = None
    assert value(conn, "SELECT calc_current_balance(%s, %s, %s, %s::real, %s, %s)", tuple(args)) is None
