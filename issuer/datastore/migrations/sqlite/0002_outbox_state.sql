-- 0002: the relay's state of each outbox row moves to a narrow table (SQLite). Kept in
-- step with postgres/0002_outbox_state.sql.
--
-- An outbox row (~2 KB of event data) is written once and never changes, but its relay
-- state (lease, delivery) lived in the same row: every claim and every delivery mark
-- rewrote the whole row, so the relay wrote each event twice more than issuance did.
-- outbox_state holds that state, one narrow row per outbox row (same seq), created by a
-- trigger in the transaction that writes the event, deleted with it when pruned.

-- The old partial indexes use the columns dropped below, which SQLite requires gone first.
DROP INDEX outbox_undelivered;
DROP INDEX outbox_undelivered_by_key;
DROP INDEX outbox_delivered;

CREATE TABLE outbox_state (
    seq INTEGER PRIMARY KEY,  -- outbox.seq
    partition_key TEXT NOT NULL,  -- copied from outbox: claims keep one key in order
    claimed_by TEXT,
    lease_until DOUBLE PRECISION,
    delivered_at DOUBLE PRECISION
);
CREATE INDEX outbox_state_undelivered ON outbox_state (seq) WHERE delivered_at IS NULL;
CREATE INDEX outbox_state_undelivered_by_key ON outbox_state (partition_key, seq) WHERE delivered_at IS NULL;
CREATE INDEX outbox_state_delivered ON outbox_state (delivered_at) WHERE delivered_at IS NOT NULL;

-- Every event starts undelivered, in the transaction that writes it, whoever inserts it.
CREATE TRIGGER outbox_state_on_insert AFTER INSERT ON outbox
BEGIN
    INSERT INTO outbox_state (seq, partition_key) VALUES (NEW.seq, NEW.partition_key);
END;

-- Existing rows keep their state: undelivered ones (leases included) are still relayed,
-- delivered ones are pruned when their retention ends.
INSERT INTO outbox_state (seq, partition_key, claimed_by, lease_until, delivered_at)
    SELECT seq, partition_key, claimed_by, lease_until, delivered_at FROM outbox;

ALTER TABLE outbox DROP COLUMN delivered_at;
ALTER TABLE outbox DROP COLUMN claimed_by;
ALTER TABLE outbox DROP COLUMN lease_until;
