-- Several servers sharing the database (issue 21): who owns which job, and
-- the bytes every server must be able to serve (uploads, outputs,
-- callback bodies), which a single server kept in its data dir.
ALTER TABLE servers ADD COLUMN prefix TEXT NOT NULL DEFAULT '';
-- Set when another server took over a dead one's jobs: its heartbeats are
-- refused from then on, so that it stops if it was only frozen.
ALTER TABLE servers ADD COLUMN retired_ms BIGINT;

-- The server that claimed the job; NULL while it waits for one, and once
-- it is finished. Only the owner writes a claimed job's record.
ALTER TABLE jobs ADD COLUMN owner BIGINT;
-- The unit of fairness, for the order jobs are claimed in.
ALTER TABLE jobs ADD COLUMN submitter TEXT NOT NULL DEFAULT '';
CREATE INDEX jobs_unclaimed ON jobs (id) WHERE state = 'queued' AND owner IS NULL;
CREATE INDEX jobs_by_owner ON jobs (owner) WHERE owner IS NOT NULL;

CREATE TABLE courselabs (
    dir TEXT PRIMARY KEY,
    created_ms BIGINT NOT NULL
);

-- Uploaded files' bytes by md5, in chunks; a blob's row is written after
-- its chunks, in the same transaction, so a blob with a row is whole.
CREATE TABLE blobs (
    md5 TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    chunks INTEGER NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE blob_chunks (
    md5 TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (md5, seq)
);

-- Each courselab's output files, as the last job that wrote one left it.
CREATE TABLE outputs (
    courselab TEXT NOT NULL,
    name TEXT NOT NULL,
    job_id BIGINT NOT NULL,
    content BYTEA NOT NULL,
    PRIMARY KEY (courselab, name)
);

-- The callback's body (the job's output as it finished).
ALTER TABLE outbox ADD COLUMN body BYTEA;

-- Servers LISTEN for these to claim new work without polling.
CREATE FUNCTION tango_notify_job() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tango_jobs', '');
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_unclaimed_notify AFTER INSERT OR UPDATE OF owner, state ON jobs
    FOR EACH ROW WHEN (NEW.state = 'queued' AND NEW.owner IS NULL)
    EXECUTE FUNCTION tango_notify_job();

CREATE FUNCTION tango_notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tango_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION tango_notify_outbox();
