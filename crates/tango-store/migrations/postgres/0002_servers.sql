-- The servers registry (issue 21): every tangod on the database records
-- itself and renews its heartbeat; ids are never given twice.
CREATE TABLE servers (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name TEXT NOT NULL,
    address TEXT NOT NULL,
    version TEXT NOT NULL,
    started_ms BIGINT NOT NULL,
    heartbeat_ms BIGINT NOT NULL,
    lease_ms BIGINT NOT NULL,
    -- Machine id, user and VM prefix, when the server holds that machine's
    -- lock on the prefix (see tango-server's servers.rs).
    instance TEXT
);
