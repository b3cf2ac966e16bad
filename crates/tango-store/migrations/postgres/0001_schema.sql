-- The first schema of the PostgreSQL store: the SQLite store's tables, with
-- sequences for ids (unique across every server sharing the database).
-- Never edit a migration that shipped: add the next file instead.
CREATE SEQUENCE job_ids AS BIGINT;
CREATE SEQUENCE vm_ids AS BIGINT;

CREATE TABLE jobs (
    id BIGINT PRIMARY KEY,
    state TEXT NOT NULL,
    courselab TEXT NOT NULL,
    -- The job as JSON, exactly as the SQLite store keeps it.
    record TEXT NOT NULL
);
CREATE INDEX jobs_by_state ON jobs (state, id);

CREATE TABLE files (
    courselab TEXT NOT NULL,
    name TEXT NOT NULL,
    md5 TEXT NOT NULL,
    PRIMARY KEY (courselab, name)
);

CREATE TABLE outbox (
    job_id BIGINT PRIMARY KEY,
    url TEXT NOT NULL,
    output_file TEXT NOT NULL,
    body_path TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_ms BIGINT NOT NULL,
    deadline_ms BIGINT NOT NULL,
    last_error TEXT
);
CREATE INDEX outbox_by_due ON outbox (next_attempt_ms);
