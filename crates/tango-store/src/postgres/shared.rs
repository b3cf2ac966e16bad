//! What several servers on one database share beyond the [`Store`] itself
//! ([`SharedStore`]): courselabs, the bytes of uploads, outputs and
//! callbacks, and the claiming, releasing and fenced finishing of jobs.

use super::queries::{parse_job, save, upsert_outbox, JobRow};
use super::PostgresStore;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tango_core::{now_ms, Job, JobId, OutboxEntry, SharedOutput, SharedStore, StoreError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Uploads are stored in chunks of this size, so that neither side holds a
/// whole file in memory.
const CHUNK_BYTES: usize = 1 << 20;

/// The longest moving one blob may take (a large upload over a slow link).
const BLOB_TIMEOUT: Duration = Duration::from_secs(600);

impl SharedStore for PostgresStore {
    fn open_courselab(&self, dir: &str) -> Result<bool, StoreError> {
        let dir = dir.to_owned();
        self.call("recording a courselab", move |pool| async move {
            sqlx::query(
                "INSERT INTO courselabs (dir, created_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(dir)
            .bind(now_ms())
            .execute(&pool)
            .await
            .map(|done| done.rows_affected() > 0)
        })
    }

    fn courselab_exists(&self, dir: &str) -> Result<bool, StoreError> {
        let dir = dir.to_owned();
        self.call("reading a courselab", move |pool| async move {
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM courselabs WHERE dir = $1)")
                .bind(dir)
                .fetch_one(&pool)
                .await
        })
    }

    fn put_blob(&self, md5: &str, path: &Path) -> Result<(), StoreError> {
        let (md5, path) = (md5.to_owned(), path.to_owned());
        self.call_for(BLOB_TIMEOUT, "storing an upload", move |pool| async move {
            let mut tx = pool.begin().await?;
            // Two servers storing the same bytes at once take turns.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                .bind(&md5)
                .execute(&mut *tx)
                .await?;
            let there: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM blobs WHERE md5 = $1)")
                    .bind(&md5)
                    .fetch_one(&mut *tx)
                    .await?;
            if there {
                return Ok(());
            }
            sqlx::query("DELETE FROM blob_chunks WHERE md5 = $1")
                .bind(&md5)
                .execute(&mut *tx)
                .await?;
            let mut file = tokio::fs::File::open(&path).await?;
            let mut chunk = vec![0u8; CHUNK_BYTES];
            let (mut seq, mut size) = (0i32, 0i64);
            loop {
                let filled = read_chunk(&mut file, &mut chunk).await?;
                if filled == 0 && seq > 0 {
                    break;
                }
                sqlx::query("INSERT INTO blob_chunks (md5, seq, data) VALUES ($1, $2, $3)")
                    .bind(&md5)
                    .bind(seq)
                    .bind(&chunk[..filled])
                    .execute(&mut *tx)
                    .await?;
                seq += 1;
                size += filled as i64;
                if filled < CHUNK_BYTES {
                    break;
                }
            }
            sqlx::query(
                "INSERT INTO blobs (md5, size, chunks, created_ms) VALUES ($1, $2, $3, $4)",
            )
            .bind(&md5)
            .bind(size)
            .bind(seq)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        })
    }

    fn fetch_blob(&self, md5: &str, dest: &Path) -> Result<bool, StoreError> {
        let (md5, dest) = (md5.to_owned(), dest.to_owned());
        self.call_for(BLOB_TIMEOUT, "reading an upload", move |pool| async move {
            let found: Option<(i64, i32)> =
                sqlx::query_as("SELECT size, chunks FROM blobs WHERE md5 = $1")
                    .bind(&md5)
                    .fetch_optional(&pool)
                    .await?;
            let Some((size, chunks)) = found else {
                return Ok(false);
            };
            let mut file = tokio::fs::File::create(&dest).await?;
            let mut written = 0i64;
            for seq in 0..chunks {
                let data: Vec<u8> =
                    sqlx::query_scalar("SELECT data FROM blob_chunks WHERE md5 = $1 AND seq = $2")
                        .bind(&md5)
                        .bind(seq)
                        .fetch_one(&pool)
                        .await?;
                file.write_all(&data).await?;
                written += data.len() as i64;
            }
            file.sync_all().await?;
            if written != size {
                return Err(sqlx::Error::Protocol(format!(
                    "blob {md5} has {written} bytes in its chunks, not {size}"
                )));
            }
            Ok(true)
        })
    }

    fn claim_jobs(&self, owner: u64, limit: usize) -> Result<Vec<Job>, StoreError> {
        let rows: Vec<(Option<i64>, String)> =
            self.call("claiming jobs", move |pool| async move {
                // Turns: each submitter's first queued job (in its courselab)
                // before anyone's second. Rows another server is claiming
                // right now are skipped, not waited for.
                sqlx::query_as(
                    "WITH turns AS (
                       SELECT id, row_number() OVER (PARTITION BY courselab, submitter ORDER BY id)
                         AS turn
                       FROM jobs WHERE state = 'queued' AND owner IS NULL
                       -- A retired server (taken for dead) claims nothing.
                       AND EXISTS (SELECT 1 FROM servers WHERE id = $1 AND retired_ms IS NULL)
                     ), picked AS (
                       SELECT jobs.id FROM jobs JOIN turns ON turns.id = jobs.id
                       WHERE jobs.state = 'queued' AND jobs.owner IS NULL
                       ORDER BY turns.turn, jobs.id
                       LIMIT $2 FOR UPDATE OF jobs SKIP LOCKED
                     )
                     UPDATE jobs SET owner = $1 FROM picked WHERE jobs.id = picked.id
                     RETURNING jobs.owner, jobs.record",
                )
                .bind(owner as i64)
                .bind(limit as i64)
                .fetch_all(&pool)
                .await
            })?;
        let mut jobs = rows
            .into_iter()
            .map(parse_job)
            .collect::<Result<Vec<_>, _>>()?;
        jobs.sort_by_key(|job| job.id);
        Ok(jobs)
    }

    fn release_job(&self, job: &Job, from: u64) -> Result<bool, StoreError> {
        let row = JobRow::of(&Job {
            owner: None,
            ..job.clone()
        })?;
        self.call("re-queuing a job", move |pool| async move {
            let mut tx = pool.begin().await?;
            if !disown(&mut tx, row.id, from).await? {
                return Ok(false);
            }
            save(&mut *tx, &row).await?;
            tx.commit().await.map(|_| true)
        })
    }

    fn orphaned_jobs(&self) -> Result<Vec<Job>, StoreError> {
        let rows: Vec<(Option<i64>, String)> =
            self.call("finding jobs of dead servers", |pool| async move {
                sqlx::query_as(
                    "SELECT owner, record FROM jobs
                     WHERE owner IS NOT NULL AND state IN ('queued', 'running')
                     AND NOT EXISTS (SELECT 1 FROM servers WHERE servers.id = jobs.owner
                                     AND servers.retired_ms IS NULL)
                     ORDER BY id",
                )
                .fetch_all(&pool)
                .await
            })?;
        rows.into_iter().map(parse_job).collect()
    }

    fn retire_server(&self, id: u64, now_ms: i64) -> Result<bool, StoreError> {
        self.call("retiring a dead server", move |pool| async move {
            sqlx::query("UPDATE servers SET retired_ms = $2 WHERE id = $1 AND retired_ms IS NULL")
                .bind(id as i64)
                .bind(now_ms)
                .execute(&pool)
                .await
                .map(|done| done.rows_affected() > 0)
        })
    }

    fn finish_owned(
        &self,
        job: &Job,
        owner: u64,
        output: &SharedOutput,
        callback: Option<&OutboxEntry>,
    ) -> Result<bool, StoreError> {
        // Finished jobs belong to no server: any may note its callback.
        let row = JobRow::of(&Job {
            owner: None,
            ..job.clone()
        })?;
        let output = output.clone();
        let callback = callback.cloned();
        self.call("saving a finished job", move |pool| async move {
            let mut tx = pool.begin().await?;
            if !disown(&mut tx, row.id, owner).await? {
                return Ok(false);
            }
            save(&mut *tx, &row).await?;
            sqlx::query(
                "INSERT INTO outputs (courselab, name, job_id, content) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (courselab, name) DO UPDATE SET job_id = excluded.job_id,
                 content = excluded.content",
            )
            .bind(&output.courselab_dir)
            .bind(&output.output_file)
            .bind(row.id)
            .bind(&output.content)
            .execute(&mut *tx)
            .await?;
            if let Some(entry) = &callback {
                upsert_outbox(&mut *tx, entry).await?;
                sqlx::query("UPDATE outbox SET body = $2 WHERE job_id = $1")
                    .bind(row.id)
                    .bind(&output.content)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await.map(|_| true)
        })
    }

    fn output(&self, dir: &str, output_file: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let (dir, name) = (dir.to_owned(), output_file.to_owned());
        self.call("reading an output file", move |pool| async move {
            sqlx::query_scalar("SELECT content FROM outputs WHERE courselab = $1 AND name = $2")
                .bind(dir)
                .bind(name)
                .fetch_optional(&pool)
                .await
        })
    }

    fn callback_body(&self, job_id: JobId) -> Result<Option<Vec<u8>>, StoreError> {
        let body: Option<Option<Vec<u8>>> =
            self.call("reading a callback's body", move |pool| async move {
                sqlx::query_scalar("SELECT body FROM outbox WHERE job_id = $1")
                    .bind(job_id as i64)
                    .fetch_optional(&pool)
                    .await
            })?;
        Ok(body.flatten())
    }

    fn queued_count(&self) -> Result<usize, StoreError> {
        let n: i64 = self.call("counting queued jobs", |pool| async move {
            sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE state = 'queued'")
                .fetch_one(&pool)
                .await
        })?;
        Ok(n as usize)
    }

    fn queued_of(&self, dir: &str, submitter: &str) -> Result<usize, StoreError> {
        let (dir, submitter) = (dir.to_owned(), submitter.to_owned());
        let n: i64 = self.call(
            "counting a submitter's queued jobs",
            move |pool| async move {
                sqlx::query_scalar(
                    "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND courselab = $1
                 AND submitter = $2",
                )
                .bind(dir)
                .bind(submitter)
                .fetch_one(&pool)
                .await
            },
        )?;
        Ok(n as usize)
    }

    fn jobs_signal(&self) -> Arc<tokio::sync::Notify> {
        self.signals.jobs.clone()
    }

    fn outbox_signal(&self) -> Arc<tokio::sync::Notify> {
        self.signals.outbox.clone()
    }
}

/// Takes live job `id` from server `owner` (it belongs to no server
/// after), locking its row for the rest of `tx`; false when `owner` does
/// not have it (another server released or finished it first). A server
/// owns only live jobs: finishing a job clears its owner.
async fn disown(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    id: i64,
    owner: u64,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE jobs SET owner = NULL WHERE id = $1 AND owner = $2
         AND state IN ('queued', 'running')",
    )
    .bind(id)
    .bind(owner as i64)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Fills `chunk` from `file` as far as it goes; how many bytes it holds.
async fn read_chunk(file: &mut tokio::fs::File, chunk: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < chunk.len() {
        match file.read(&mut chunk[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
