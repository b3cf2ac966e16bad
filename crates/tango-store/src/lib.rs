//! Implementations of tango-core's [`Store`]: SQLite, the embedded default
//! (one file in the data dir, WAL mode). Jobs are kept as JSON records with
//! their state and courselab as indexed columns.
//!
//! Durability: WAL with `synchronous=NORMAL` survives the server process
//! being killed at any point (the tests do `kill -9`); after a power loss the
//! last moments may be lost. Set `full_sync` for `synchronous=FULL`.

use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use tango_core::{Job, JobId, JobState, OutboxEntry, Store, StoreError};

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sequences (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO sequences (name, value) VALUES ('job', 0), ('vm', 0);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    state TEXT NOT NULL,
    courselab TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
CREATE TABLE IF NOT EXISTS files (
    courselab TEXT NOT NULL,
    name TEXT NOT NULL,
    md5 TEXT NOT NULL,
    PRIMARY KEY (courselab, name)
);
CREATE TABLE IF NOT EXISTS outbox (
    job_id INTEGER PRIMARY KEY,
    url TEXT NOT NULL,
    output_file TEXT NOT NULL,
    body_path TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_by_due ON outbox (next_attempt_ms);
";

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path, full_sync: bool) -> Result<Self, StoreError> {
        let conn = Connection::open(path)
            .map_err(|e| StoreError(format!("cannot open database {}: {e}", path.display())))?;
        Self::init(conn, full_sync)
    }

    /// A private in-memory database, for tests.
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory().map_err(err)?, false)
    }

    fn init(conn: Connection, full_sync: bool) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(
            None,
            "synchronous",
            if full_sync { "FULL" } else { "NORMAL" },
        )
        .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next(&self, sequence: &str) -> Result<u64, StoreError> {
        let value: i64 = self
            .conn()
            .query_row(
                "UPDATE sequences SET value = value + 1 WHERE name = ?1 RETURNING value",
                params![sequence],
                |row| row.get(0),
            )
            .map_err(err)?;
        Ok(value as u64)
    }
}

fn save(conn: &Connection, job: &Job) -> Result<(), StoreError> {
    let record = serde_json::to_string(job).map_err(err)?;
    conn.execute(
        "INSERT INTO jobs (id, state, courselab, record) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (id) DO UPDATE SET state = excluded.state, courselab = excluded.courselab,
         record = excluded.record",
        params![job.id as i64, job.state.as_str(), job.courselab_dir, record],
    )
    .map_err(err)?;
    Ok(())
}

fn parse_job(record: String) -> rusqlite::Result<Job> {
    serde_json::from_str(&record).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn outbox_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxEntry> {
    Ok(OutboxEntry {
        job_id: row.get::<_, i64>(0)? as u64,
        url: row.get(1)?,
        output_file: row.get(2)?,
        body_path: row.get(3)?,
        attempts: row.get::<_, i64>(4)? as u32,
        next_attempt_ms: row.get(5)?,
        deadline_ms: row.get(6)?,
        last_error: row.get(7)?,
    })
}

fn upsert_outbox(conn: &Connection, e: &OutboxEntry) -> Result<(), StoreError> {
    conn.execute(
        "INSERT OR REPLACE INTO outbox
         (job_id, url, output_file, body_path, attempts, next_attempt_ms, deadline_ms, last_error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            e.job_id as i64,
            e.url,
            e.output_file,
            e.body_path,
            e.attempts as i64,
            e.next_attempt_ms,
            e.deadline_ms,
            e.last_error
        ],
    )
    .map_err(err)?;
    Ok(())
}

impl Store for SqliteStore {
    fn next_job_id(&self) -> Result<JobId, StoreError> {
        self.next("job")
    }

    fn next_vm_id(&self) -> Result<u64, StoreError> {
        self.next("vm")
    }

    fn save_job(&self, job: &Job) -> Result<(), StoreError> {
        save(&self.conn(), job)
    }

    fn finish_job(&self, job: &Job, callback: Option<&OutboxEntry>) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(err)?;
        save(&tx, job)?;
        if let Some(entry) = callback {
            upsert_outbox(&tx, entry)?;
        }
        tx.commit().map_err(err)
    }

    fn get_job(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let record: Option<String> = self
            .conn()
            .query_row(
                "SELECT record FROM jobs WHERE id = ?1",
                params![id as i64],
                |row| row.get(0),
            )
            .optional()
            .map_err(err)?;
        record.map(|r| parse_job(r).map_err(err)).transpose()
    }

    fn jobs_in_states(
        &self,
        states: &[JobState],
        limit: Option<usize>,
    ) -> Result<Vec<Job>, StoreError> {
        let names: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let placeholders = vec!["?"; names.len()].join(", ");
        let limit = limit.map(|l| l as i64).unwrap_or(-1);
        let sql = format!(
            "SELECT record FROM (SELECT id, record FROM jobs WHERE state IN ({placeholders})
             ORDER BY id DESC LIMIT {limit}) ORDER BY id ASC"
        );
        let conn = self.conn();
        let mut stmt = conn.prepare(&sql).map_err(err)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(names.iter()), |row| {
                parse_job(row.get(0)?)
            })
            .map_err(err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(err)
    }

    fn set_file(&self, dir: &str, name: &str, md5: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO files (courselab, name, md5) VALUES (?1, ?2, ?3)",
                params![dir, name, md5],
            )
            .map_err(err)?;
        Ok(())
    }

    fn file_md5(&self, dir: &str, name: &str) -> Result<Option<String>, StoreError> {
        self.conn()
            .query_row(
                "SELECT md5 FROM files WHERE courselab = ?1 AND name = ?2",
                params![dir, name],
                |row| row.get(0),
            )
            .optional()
            .map_err(err)
    }

    fn files(&self, dir: &str) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT name, md5 FROM files WHERE courselab = ?1 ORDER BY name")
            .map_err(err)?;
        let rows = stmt
            .query_map(params![dir], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(err)
    }

    fn outbox_due(&self, now_ms: i64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT job_id, url, output_file, body_path, attempts, next_attempt_ms, deadline_ms,
                 last_error FROM outbox WHERE next_attempt_ms <= ?1 ORDER BY next_attempt_ms LIMIT ?2",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map(params![now_ms, limit as i64], outbox_row)
            .map_err(err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(err)
    }

    fn outbox_next_due(&self) -> Result<Option<i64>, StoreError> {
        self.conn()
            .query_row("SELECT MIN(next_attempt_ms) FROM outbox", [], |row| {
                row.get(0)
            })
            .map_err(err)
    }

    fn outbox_update(&self, entry: &OutboxEntry) -> Result<(), StoreError> {
        upsert_outbox(&self.conn(), entry)
    }

    fn outbox_remove(&self, job_id: JobId) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "DELETE FROM outbox WHERE job_id = ?1",
                params![job_id as i64],
            )
            .map_err(err)?;
        Ok(())
    }

    fn outbox_len(&self) -> Result<usize, StoreError> {
        let n: i64 = self
            .conn()
            .query_row("SELECT COUNT(*) FROM outbox", [], |row| row.get(0))
            .map_err(err)?;
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tango_core::{Phases, TraceEntry};

    fn job(id: u64, state: JobState) -> Job {
        Job {
            id,
            name: format!("job{id}"),
            courselab_dir: "k-lab".into(),
            courselab: "lab".into(),
            image: "host".into(),
            vmms: "sandbox".into(),
            inputs: vec![],
            output_file: "out".into(),
            timeout_secs: 10,
            max_output_bytes: 1024,
            callback_url: None,
            disable_network: true,
            cores: None,
            memory_mb: None,
            credentials: None,
            state,
            retries: 0,
            vm: None,
            trace: vec![TraceEntry {
                at_ms: 1,
                message: "Added job".into(),
            }],
            phases: Phases::default(),
            outcome: None,
            backend_wait_ms: 0,
        }
    }

    #[test]
    fn ids_never_repeat_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path, false).unwrap();
        let a = store.next_job_id().unwrap();
        let b = store.next_job_id().unwrap();
        assert!(b > a);
        drop(store);
        let store = SqliteStore::open(&path, false).unwrap();
        assert!(store.next_job_id().unwrap() > b);
        assert_eq!(store.next_vm_id().unwrap(), 1);
    }

    #[test]
    fn jobs_by_state_and_limit() {
        let store = SqliteStore::in_memory().unwrap();
        for id in 1..=5 {
            store.save_job(&job(id, JobState::Done)).unwrap();
        }
        store.save_job(&job(6, JobState::Queued)).unwrap();
        let dead = store
            .jobs_in_states(&[JobState::Done, JobState::Failed], Some(3))
            .unwrap();
        assert_eq!(dead.iter().map(|j| j.id).collect::<Vec<_>>(), vec![3, 4, 5]);
        let live = store.jobs_in_states(&[JobState::Queued], None).unwrap();
        assert_eq!(live.len(), 1);
        let mut j = job(6, JobState::Running);
        j.retries = 2;
        store.save_job(&j).unwrap();
        assert_eq!(store.get_job(6).unwrap().unwrap(), j);
        assert!(store.get_job(99).unwrap().is_none());
    }

    #[test]
    fn finish_with_callback_is_atomic_and_outbox_orders_by_due() {
        let store = SqliteStore::in_memory().unwrap();
        let entry = |id, due| OutboxEntry {
            job_id: id,
            url: "http://x/".into(),
            output_file: "o".into(),
            body_path: "/tmp/o".into(),
            attempts: 0,
            next_attempt_ms: due,
            deadline_ms: 1000,
            last_error: None,
        };
        store
            .finish_job(&job(1, JobState::Done), Some(&entry(1, 50)))
            .unwrap();
        store.outbox_update(&entry(2, 10)).unwrap();
        assert_eq!(store.outbox_len().unwrap(), 2);
        assert_eq!(store.outbox_next_due().unwrap(), Some(10));
        let due = store.outbox_due(20, 10).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].job_id, 2);
        store.outbox_remove(2).unwrap();
        assert_eq!(store.outbox_next_due().unwrap(), Some(50));
        assert_eq!(store.get_job(1).unwrap().unwrap().state, JobState::Done);
    }

    #[test]
    fn files() {
        let store = SqliteStore::in_memory().unwrap();
        store.set_file("k-lab", "Makefile", "abc").unwrap();
        store.set_file("k-lab", "Makefile", "def").unwrap();
        store.set_file("k-other", "x", "1").unwrap();
        assert_eq!(
            store.file_md5("k-lab", "Makefile").unwrap().as_deref(),
            Some("def")
        );
        assert_eq!(
            store.files("k-lab").unwrap(),
            vec![("Makefile".into(), "def".into())]
        );
    }
}
