-- 0002: the relay's state of each outbox row moves to a narrow table (PostgreSQL). Kept
-- in step with sqlite/0002_outbox_state.sql.
--
-- An outbox row (~2 KB of event data) is written once and never changes, but its relay
-- state (lease, delivery) lived in the same row: every claim and every delivery mark
-- wrote a new version of the whole row. outbox_state holds that state, one narrow row
-- per outbox row (same seq), created by a trigger in the transaction that writes the
-- event, deleted with it when pruned.

-- No event may be written between the copy below and the trigger taking over.
LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE;

-- The old partial indexes use the columns dropped below.
DROP INDEX outbox_undelivered;
DROP INDEX outbox_undelivered_by_key;
DROP INDEX outbox_delivered;

CREATE TABLE outbox_state (
    seq BIGINT PRIMARY KEY,  -- outbox.seq
    partition_key TEXT NOT NULL,  -- copied from outbox: claims keep one key in order
    claimed_by TEXT,
    lease_until DOUBLE PRECISION,
    delivered_at DOUBLE PRECISION
);
CREATE INDEX outbox_state_undelivered ON outbox_state (seq) WHERE delivered_at IS NULL;
CREATE INDEX outbox_state_undelivered_by_key ON outbox_state (partition_key, seq) WHERE delivered_at IS NULL;
CREATE INDEX outbox_state_delivered ON outbox_state (delivered_at) WHERE delivered_at IS NOT NULL;

-- Every event starts undelivered, in the transaction that writes it, whoever inserts it.
CREATE FUNCTION outbox_state_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox_state (seq, partition_key) VALUES (NEW.seq, NEW.partition_key);
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_state_on_insert AFTER INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_state_on_insert();

-- Existing rows keep their state: undelivered ones (leases included) are still relayed,
-- delivered ones are pruned when their retention ends.
INSERT INTO outbox_state (seq, partition_key, claimed_by, lease_until, delivered_at)
    SELECT seq, partition_key, claimed_by, lease_until, delivered_at FROM outbox;

-- A replica still running the old code now fails its claims loudly instead of relaying
-- every row a second time.
ALTER TABLE outbox DROP COLUMN delivered_at, DROP COLUMN claimed_by, DROP COLUMN lease_until;
