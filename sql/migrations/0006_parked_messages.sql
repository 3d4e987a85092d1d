-- Parked messages: what a driver could not apply or publish, kept durably so
-- that nothing is lost and nothing loops (issue 8). The SMP consumer parks a
-- message it rejects (it is also dead-lettered to <queue>.XQ, but a broker may
-- drop that copy); the flusher parks an outbox row it cannot read, encode or
-- route. Operators list, replay and discard them with `pyswpt parked`.

CREATE TABLE pyswpt.parked_message (
    parked_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_kind text NOT NULL,
    source_name text NOT NULL,
    exchange text,
    routing_key text NOT NULL,
    message_type text,
    content_type text,
    headers jsonb,
    body bytea,
    row_data jsonb,
    debtor_id bigint,
    creditor_id bigint,
    reason_code text NOT NULL,
    reason text NOT NULL,
    sqlstate text,
    attempts integer NOT NULL,
    first_seen_at timestamptz NOT NULL,
    last_seen_at timestamptz NOT NULL,
    next_retry_at timestamptz,
    fingerprint bytea NOT NULL,
    CONSTRAINT source_kind_is_known CHECK (source_kind IN ('queue', 'outbox')),
    CONSTRAINT has_body_or_row_data CHECK (body IS NOT NULL OR row_data IS NOT NULL),
    CONSTRAINT attempts_positive CHECK (attempts > 0),
    CONSTRAINT fingerprint_is_sha256 CHECK (octet_length(fingerprint) = 32),
    CONSTRAINT parked_once UNIQUE (source_kind, source_name, fingerprint)
);

CREATE INDEX parked_message_reason_idx ON pyswpt.parked_message (source_name, reason_code);
CREATE INDEX parked_message_retry_idx ON pyswpt.parked_message (next_retry_at)
    WHERE next_retry_at IS NOT NULL;

COMMENT ON TABLE pyswpt.parked_message IS
    'Messages a driver could not apply or publish: set aside with their reason instead of looping or being dropped.';
COMMENT ON COLUMN pyswpt.parked_message.source_kind IS
    '"queue": a consumed message (replayed by publishing it to accounts_in again); "outbox": an outgoing message.';
COMMENT ON COLUMN pyswpt.parked_message.source_name IS
    'The queue the message came from, or the outbox table (flush_<name>) the row was taken from.';
COMMENT ON COLUMN pyswpt.parked_message.exchange IS
    'Where the message was going (outbox), or the exchange it arrived through (queue).';
COMMENT ON COLUMN pyswpt.parked_message.routing_key IS
    'The original routing key: a replay publishes with it, so the owning shard gets the message.';
COMMENT ON COLUMN pyswpt.parked_message.headers IS
    'AMQP headers of the message, as JSON.';
COMMENT ON COLUMN pyswpt.parked_message.body IS
    'The message body exactly as received or as it would have been published; NULL when it could not be built.';
COMMENT ON COLUMN pyswpt.parked_message.row_data IS
    'An outbox row that could not be read or encoded: its columns as PostgreSQL text.';
COMMENT ON COLUMN pyswpt.parked_message.reason_code IS
    'Short class of the reason (invalid, foreign_shard, refused, repeated_failure, unroutable, unencodable, ...).';
COMMENT ON COLUMN pyswpt.parked_message.reason IS
    'One line saying why, without message contents.';
COMMENT ON COLUMN pyswpt.parked_message.sqlstate IS
    'The SQLSTATE with which the database refused the message, if it did.';
COMMENT ON COLUMN pyswpt.parked_message.attempts IS
    'How many times the message was tried: the broker''s delivery count, or the flusher''s publish attempts.';
COMMENT ON COLUMN pyswpt.parked_message.next_retry_at IS
    'When the flusher tries to publish the message again; NULL when only an operator can help.';
COMMENT ON COLUMN pyswpt.parked_message.fingerprint IS
    'sha256 of routing key and content: the same message parked again (a redelivery) updates its row.';

-- A flooding peer must not fill the disk: past a cap per source and reason,
-- only a count is kept here (consumed messages still reach <queue>.XQ).
CREATE TABLE pyswpt.parked_message_overflow (
    source_name text NOT NULL,
    reason_code text NOT NULL,
    dropped_count bigint NOT NULL,
    first_dropped_at timestamptz NOT NULL,
    last_dropped_at timestamptz NOT NULL,
    PRIMARY KEY (source_name, reason_code),
    CONSTRAINT dropped_count_positive CHECK (dropped_count > 0)
);

COMMENT ON TABLE pyswpt.parked_message_overflow IS
    'Messages not parked because their source and reason had reached the cap: counted, not stored.';
