//! The store's queries, each run by [`PostgresStore::call`] on the store's
//! thread. Records are serialized and parsed on the caller's side.

use super::PostgresStore;
use sqlx::{Executor, Postgres};
use tango_core::{Job, JobId, JobState, OutboxEntry, ServerRecord, Store, StoreError};

type Row = (i64, String, String, String, i32, i64, i64, Option<String>);

const OUTBOX_COLUMNS: &str =
    "job_id, url, output_file, body_path, attempts, next_attempt_ms, deadline_ms, last_error";

fn outbox_entry(row: Row) -> OutboxEntry {
    let (job_id, url, output_file, body_path, attempts, next_attempt_ms, deadline_ms, last_error) =
        row;
    OutboxEntry {
        job_id: job_id as u64,
        url,
        output_file,
        body_path,
        attempts: attempts as u32,
        next_attempt_ms,
        deadline_ms,
        last_error,
    }
}

/// A job's indexed columns and record, owned, to move to the store's thread.
pub(super) struct JobRow {
    pub(super) id: i64,
    state: &'static str,
    courselab: String,
    submitter: String,
    owner: Option<i64>,
    record: String,
}

impl JobRow {
    pub(super) fn of(job: &Job) -> Result<JobRow, StoreError> {
        Ok(JobRow {
            id: job.id as i64,
            state: job.state.as_str(),
            courselab: job.courselab_dir.clone(),
            submitter: job.submitter_or_derived().into_owned(),
            owner: job.owner.map(|o| o as i64),
            record: crate::job_record(job)?,
        })
    }
}

/// Inserts or updates a job, unless another server owns it now: false then.
pub(super) async fn save<'c>(
    db: impl Executor<'c, Database = Postgres>,
    job: &JobRow,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "INSERT INTO jobs (id, state, courselab, submitter, owner, record)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (id) DO UPDATE SET state = excluded.state, courselab = excluded.courselab,
         submitter = excluded.submitter, record = excluded.record
         WHERE jobs.owner IS NOT DISTINCT FROM excluded.owner",
    )
    .bind(job.id)
    .bind(job.state)
    .bind(&job.courselab)
    .bind(&job.submitter)
    .bind(job.owner)
    .bind(&job.record)
    .execute(db)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// The error of a save that another server's ownership refused.
pub(super) fn not_owned(id: i64) -> StoreError {
    StoreError(format!(
        "job {id} belongs to another server now (this server lost it when its lease lapsed); \
         its record was not changed"
    ))
}

pub(super) async fn upsert_outbox<'c>(
    db: impl Executor<'c, Database = Postgres>,
    e: &OutboxEntry,
) -> sqlx::Result<()> {
    sqlx::query(&format!(
        "INSERT INTO outbox ({OUTBOX_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (job_id) DO UPDATE SET url = excluded.url,
         output_file = excluded.output_file, body_path = excluded.body_path,
         attempts = excluded.attempts, next_attempt_ms = excluded.next_attempt_ms,
         deadline_ms = excluded.deadline_ms, last_error = excluded.last_error"
    ))
    .bind(e.job_id as i64)
    .bind(&e.url)
    .bind(&e.output_file)
    .bind(&e.body_path)
    .bind(e.attempts as i32)
    .bind(e.next_attempt_ms)
    .bind(e.deadline_ms)
    .bind(&e.last_error)
    .execute(db)
    .await?;
    Ok(())
}

type ServerRow = (
    i64,
    String,
    String,
    String,
    i64,
    i64,
    i64,
    Option<String>,
    String,
);

const SERVER_COLUMNS: &str =
    "id, name, address, version, started_ms, heartbeat_ms, lease_ms, instance, prefix";

fn server_record(row: ServerRow) -> ServerRecord {
    let (id, name, address, version, started_ms, heartbeat_ms, lease_ms, instance, prefix) = row;
    ServerRecord {
        id: id as u64,
        name,
        address,
        version,
        started_ms,
        heartbeat_ms,
        lease_ms,
        instance,
        prefix,
    }
}

/// A job from its record and the owner kept beside it.
pub(super) fn parse_job((owner, record): (Option<i64>, String)) -> Result<Job, StoreError> {
    let mut job: Job = serde_json::from_str(&record)
        .map_err(|e| StoreError(format!("a job record in PostgreSQL is not valid: {e}")))?;
    job.owner = owner.map(|o| o as u64);
    Ok(job)
}

impl PostgresStore {
    fn next(&self, sequence: &'static str) -> Result<u64, StoreError> {
        let id: i64 = self.call("taking an id", move |pool| async move {
            sqlx::query_scalar("SELECT nextval($1::regclass)")
                .bind(sequence)
                .fetch_one(&pool)
                .await
        })?;
        Ok(id as u64)
    }
}

impl Store for PostgresStore {
    fn shared(&self) -> Option<&dyn tango_core::SharedStore> {
        Some(self)
    }

    fn outbox_claim(
        &self,
        now_ms: i64,
        until_ms: i64,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows: Vec<Row> = self.call("claiming callbacks", move |pool| async move {
            // SKIP LOCKED: servers claiming at once take different ones.
            sqlx::query_as(&format!(
                "UPDATE outbox SET next_attempt_ms = $2 WHERE job_id IN (
                   SELECT job_id FROM outbox WHERE next_attempt_ms <= $1
                   ORDER BY next_attempt_ms LIMIT $3 FOR UPDATE SKIP LOCKED)
                 RETURNING {OUTBOX_COLUMNS}"
            ))
            .bind(now_ms)
            .bind(until_ms)
            .bind(limit as i64)
            .fetch_all(&pool)
            .await
        })?;
        let mut entries: Vec<OutboxEntry> = rows.into_iter().map(outbox_entry).collect();
        entries.sort_by_key(|e| e.job_id);
        Ok(entries)
    }

    fn next_job_id(&self) -> Result<JobId, StoreError> {
        self.next("job_ids")
    }

    fn next_vm_id(&self) -> Result<u64, StoreError> {
        self.next("vm_ids")
    }

    fn save_job(&self, job: &Job) -> Result<(), StoreError> {
        let row = JobRow::of(job)?;
        let id = row.id;
        let saved = self.call("saving a job", move |pool| async move {
            save(&pool, &row).await
        })?;
        saved.then_some(()).ok_or_else(|| not_owned(id))
    }

    fn finish_job(&self, job: &Job, callback: Option<&OutboxEntry>) -> Result<(), StoreError> {
        let row = JobRow::of(job)?;
        let id = row.id;
        let callback = callback.cloned();
        let saved = self.call("saving a finished job", move |pool| async move {
            let mut tx = pool.begin().await?;
            if !save(&mut *tx, &row).await? {
                return Ok(false);
            }
            if let Some(entry) = &callback {
                upsert_outbox(&mut *tx, entry).await?;
            }
            tx.commit().await.map(|_| true)
        })?;
        saved.then_some(()).ok_or_else(|| not_owned(id))
    }

    fn get_job(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let row: Option<(Option<i64>, String)> =
            self.call("reading a job", move |pool| async move {
                sqlx::query_as("SELECT owner, record FROM jobs WHERE id = $1")
                    .bind(id as i64)
                    .fetch_optional(&pool)
                    .await
            })?;
        row.map(parse_job).transpose()
    }

    fn jobs_in_states(
        &self,
        states: &[JobState],
        limit: Option<usize>,
    ) -> Result<Vec<Job>, StoreError> {
        let names: Vec<&'static str> = states.iter().map(|s| s.as_str()).collect();
        let limit = limit.map(|l| l as i64);
        let rows: Vec<(Option<i64>, String)> =
            self.call("listing jobs", move |pool| async move {
                // LIMIT NULL is no limit.
                sqlx::query_as(
                "SELECT owner, record FROM (SELECT id, owner, record FROM jobs WHERE state = ANY($1)
                 ORDER BY id DESC LIMIT $2) newest ORDER BY id ASC",
            )
            .bind(names)
            .bind(limit)
            .fetch_all(&pool)
            .await
            })?;
        rows.into_iter().map(parse_job).collect()
    }

    fn set_file(&self, dir: &str, name: &str, md5: &str) -> Result<(), StoreError> {
        let (dir, name, md5) = (dir.to_owned(), name.to_owned(), md5.to_owned());
        self.call("recording a file", move |pool| async move {
            sqlx::query(
                "INSERT INTO files (courselab, name, md5) VALUES ($1, $2, $3)
                 ON CONFLICT (courselab, name) DO UPDATE SET md5 = excluded.md5",
            )
            .bind(dir)
            .bind(name)
            .bind(md5)
            .execute(&pool)
            .await
            .map(|_| ())
        })
    }

    fn file_md5(&self, dir: &str, name: &str) -> Result<Option<String>, StoreError> {
        let (dir, name) = (dir.to_owned(), name.to_owned());
        self.call("reading a file's md5", move |pool| async move {
            sqlx::query_scalar("SELECT md5 FROM files WHERE courselab = $1 AND name = $2")
                .bind(dir)
                .bind(name)
                .fetch_optional(&pool)
                .await
        })
    }

    fn files(&self, dir: &str) -> Result<Vec<(String, String)>, StoreError> {
        let dir = dir.to_owned();
        self.call("listing files", move |pool| async move {
            // Byte order, as SQLite sorts, whatever the database's locale.
            sqlx::query_as(
                "SELECT name, md5 FROM files WHERE courselab = $1 ORDER BY name COLLATE \"C\"",
            )
            .bind(dir)
            .fetch_all(&pool)
            .await
        })
    }

    fn outbox_due(&self, now_ms: i64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows: Vec<Row> = self.call("reading the callback outbox", move |pool| async move {
            sqlx::query_as(&format!(
                "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE next_attempt_ms <= $1
                 ORDER BY next_attempt_ms LIMIT $2"
            ))
            .bind(now_ms)
            .bind(limit as i64)
            .fetch_all(&pool)
            .await
        })?;
        Ok(rows.into_iter().map(outbox_entry).collect())
    }

    fn outbox_next_due(&self) -> Result<Option<i64>, StoreError> {
        self.call("reading the callback outbox", |pool| async move {
            sqlx::query_scalar("SELECT MIN(next_attempt_ms) FROM outbox")
                .fetch_one(&pool)
                .await
        })
    }

    fn outbox_update(&self, entry: &OutboxEntry) -> Result<(), StoreError> {
        let entry = entry.clone();
        self.call("updating a callback", move |pool| async move {
            upsert_outbox(&pool, &entry).await
        })
    }

    fn outbox_remove(&self, job_id: JobId) -> Result<(), StoreError> {
        self.call("removing a callback", move |pool| async move {
            sqlx::query("DELETE FROM outbox WHERE job_id = $1")
                .bind(job_id as i64)
                .execute(&pool)
                .await
                .map(|_| ())
        })
    }

    fn outbox_len(&self) -> Result<usize, StoreError> {
        let n: i64 = self.call("counting callbacks", |pool| async move {
            sqlx::query_scalar("SELECT COUNT(*) FROM outbox")
                .fetch_one(&pool)
                .await
        })?;
        Ok(n as usize)
    }

    fn register_server(
        &self,
        server: &ServerRecord,
    ) -> Result<(u64, Vec<ServerRecord>), StoreError> {
        let server = server.clone();
        let (id, rows): (i64, Vec<ServerRow>) =
            self.call("registering this server", move |pool| async move {
                let mut tx = pool.begin().await?;
                // Servers registering at once take turns, so that the later
                // one reads the earlier one's row (reads go on meanwhile;
                // heartbeats wait the few ms it takes).
                sqlx::query("LOCK TABLE servers IN SHARE ROW EXCLUSIVE MODE")
                    .execute(&mut *tx)
                    .await?;
                let others: Vec<ServerRow> =
                    sqlx::query_as(&format!("SELECT {SERVER_COLUMNS} FROM servers ORDER BY id"))
                        .fetch_all(&mut *tx)
                        .await?;
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO servers (name, address, version, started_ms, heartbeat_ms,
                     lease_ms, instance, prefix) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     RETURNING id",
                )
                .bind(&server.name)
                .bind(&server.address)
                .bind(&server.version)
                .bind(server.started_ms)
                .bind(server.heartbeat_ms)
                .bind(server.lease_ms)
                .bind(&server.instance)
                .bind(&server.prefix)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok((id, others))
            })?;
        Ok((id as u64, rows.into_iter().map(server_record).collect()))
    }

    fn heartbeat_server(&self, id: u64, now_ms: i64) -> Result<bool, StoreError> {
        self.call("renewing this server's heartbeat", move |pool| async move {
            // A retired server's heartbeat is refused: it was taken over.
            sqlx::query("UPDATE servers SET heartbeat_ms = $2 WHERE id = $1 AND retired_ms IS NULL")
                .bind(id as i64)
                .bind(now_ms)
                .execute(&pool)
                .await
                .map(|done| done.rows_affected() > 0)
        })
    }

    fn servers(&self) -> Result<Vec<ServerRecord>, StoreError> {
        let rows: Vec<ServerRow> = self.call("listing servers", |pool| async move {
            sqlx::query_as(&format!("SELECT {SERVER_COLUMNS} FROM servers ORDER BY id"))
                .fetch_all(&pool)
                .await
        })?;
        Ok(rows.into_iter().map(server_record).collect())
    }

    fn remove_server(&self, id: u64) -> Result<(), StoreError> {
        self.call("removing a server's record", move |pool| async move {
            sqlx::query("DELETE FROM servers WHERE id = $1")
                .bind(id as i64)
                .execute(&pool)
                .await
                .map(|_| ())
        })
    }
}
