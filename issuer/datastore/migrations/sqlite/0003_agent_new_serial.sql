-- 0003: an agent's renewed SVID is pending until the agent uses it (SQLite). Kept in step
-- with postgres/0003_agent_new_serial.sql.
--
-- A renewal replaced the agent's serial at once, and only that serial was accepted: if the
-- reply never reached the agent, the SVID it still held was refused as superseded (a
-- join-token agent could never attest again). As SPIRE's new_cert_serial_number: the new
-- SVID is stored as pending, the current one stays accepted, and the first call made with
-- the pending one makes it current. Existing agents have nothing pending.
ALTER TABLE agents ADD COLUMN new_serial TEXT NOT NULL DEFAULT '';
ALTER TABLE agents ADD COLUMN new_expires_at INTEGER NOT NULL DEFAULT 0;
