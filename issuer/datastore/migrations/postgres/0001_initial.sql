-- 0001: initial schema (PostgreSQL). Kept in step with sqlite/0001_initial.sql.

-- Registration entries. `body` is the whole entry as JSON (the source the record is
-- rebuilt from); the other columns exist for lookups and constraints.
CREATE TABLE entries (
    id TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    -- sha256 of spiffe_id, parent_id and the sorted selector set: SPIRE's natural key,
    -- unique so that concurrent creates on different replicas cannot both succeed.
    natural_key TEXT NOT NULL UNIQUE,
    revision_number BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    body JSONB NOT NULL
);
CREATE INDEX entries_by_spiffe_id ON entries (spiffe_id);
CREATE INDEX entries_by_parent_id ON entries (parent_id);

-- One row per selector, for selector lookups (Entry API's by_selectors filter).
CREATE TABLE entry_selectors (
    entry_id TEXT NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
    type TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (entry_id, type, value)
);
CREATE INDEX entry_selectors_by_type_value ON entry_selectors (type, value);

CREATE TABLE agents (
    agent_id TEXT PRIMARY KEY,
    attestor TEXT NOT NULL,
    selectors JSONB NOT NULL,
    serial TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    banned BOOLEAN NOT NULL,
    can_reattest BOOLEAN NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Only the hash of a join token is ever stored.
CREATE TABLE join_tokens (
    token_hash TEXT PRIMARY KEY,
    token_id TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX join_tokens_by_expiry ON join_tokens (expires_at);

CREATE TABLE ca_keys (
    key_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    sealed_key BYTEA NOT NULL,
    public_key_der BYTEA NOT NULL,
    not_before BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    cert_chain JSONB NOT NULL,
    tainted BOOLEAN NOT NULL,
    server_id TEXT NOT NULL,
    max_signed_not_after BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    extra JSONB NOT NULL
);
CREATE INDEX ca_keys_by_kind ON ca_keys (kind);

CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- An identity column never hands out a value twice, which the CloudEvent id (derived
-- from seq) relies on. Values are allocated at insert, not at commit: see fetch_outbox.
-- claimed_by/lease_until let relays on several replicas split the work (claim_outbox).
CREATE TABLE outbox (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type TEXT NOT NULL,
    subject TEXT NOT NULL,
    partition_key TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    data JSONB NOT NULL,
    delivered_at DOUBLE PRECISION,
    claimed_by TEXT,
    lease_until DOUBLE PRECISION
);
CREATE INDEX outbox_undelivered ON outbox (seq) WHERE delivered_at IS NULL;
CREATE INDEX outbox_undelivered_by_key ON outbox (partition_key, seq) WHERE delivered_at IS NULL;
CREATE INDEX outbox_delivered ON outbox (delivered_at) WHERE delivered_at IS NOT NULL;
