//! The SQLite store, the embedded default: one file in the data dir, WAL
//! mode. Jobs are kept as JSON records with their state and courselab as
//! indexed columns.
//!
//! Durability: WAL with `synchronous=NORMAL` survives the server process
//! being killed at any point (the tests do `kill -9`); after a power loss the
//! last moments may be lost. Set `full_sync` for `synchronous=FULL`.

use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use tango_core::{Job, JobId, JobState, OutboxEntry, ServerRecord, Store, StoreError};

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// The schema, one migration per version: `MIGRATIONS[n]` takes a database
/// from version `n` to `n + 1`, and `PRAGMA user_version` records the
/// version reached. Add a migration at the end for any change; never edit
/// one that shipped, as databases made by it exist.
const MIGRATIONS: &[&str] = &[
    // 1: the schema of the release before versions were recorded (0c57581),
    // unchanged. Its databases have these tables and user_version 0.
    "
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
",
    // 2: the servers registry (issue 21). AUTOINCREMENT: a removed
    // server's id is never given again.
    "
CREATE TABLE servers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    address TEXT NOT NULL,
    version TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    heartbeat_ms INTEGER NOT NULL,
    lease_ms INTEGER NOT NULL,
    instance TEXT
);
",
    // 3: each server's VM prefix, for finding a dead server's VMs.
    "ALTER TABLE servers ADD COLUMN prefix TEXT NOT NULL DEFAULT '';",
];

/// The schema version this build writes and the newest it can open.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// The refusal of a database made by a newer build.
fn too_new(path: &str, found: u32) -> StoreError {
    StoreError(format!(
        "the database {path} has schema version {found}, but this tangod knows versions up to \
         {SCHEMA_VERSION}: a newer tangod wrote it. Run that newer tangod (or a later one), or \
         restore a backup of the data dir made by this version; the database was not changed"
    ))
}

/// Reads the schema version of an existing database without writing to it:
/// a database that is refused is left exactly as it was.
fn version_untouched(path: &Path) -> Result<u32, StoreError> {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    if Path::new(&wal).exists() {
        // The newest header may be in the WAL (a server that did not stop
        // cleanly), which only SQLite reads. A read-only connection writes
        // neither the database nor the WAL; at most it makes the WAL's
        // shared-memory index, which holds no data.
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| StoreError(format!("cannot open database {}: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        return conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(|e| StoreError(format!("cannot read database {}: {e}", path.display())));
    }
    // Without a WAL the file is whole, and its header holds the version
    // (bytes 60..64, big-endian). SQLite would make a WAL and a
    // shared-memory file even to read a WAL-mode database.
    use std::io::Read;
    let cannot =
        |e: std::io::Error| StoreError(format!("cannot read database {}: {e}", path.display()));
    let mut header = Vec::with_capacity(100);
    std::fs::File::open(path)
        .map_err(cannot)?
        .take(100)
        .read_to_end(&mut header)
        .map_err(cannot)?;
    if header.is_empty() {
        // An empty file is an empty database.
        return Ok(0);
    }
    if header.len() < 100 || !header.starts_with(b"SQLite format 3\0") {
        return Err(StoreError(format!(
            "{} is not a SQLite database: move it away, or give tangod another data dir",
            path.display()
        )));
    }
    Ok(u32::from_be_bytes([
        header[60], header[61], header[62], header[63],
    ]))
}

/// Brings the database to [`SCHEMA_VERSION`] in one transaction: either
/// every pending migration is applied and the version stamped, or nothing.
fn migrate(conn: &mut Connection, name: &str, migrations: &[&str]) -> Result<(), StoreError> {
    let known = migrations.len() as u32;
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(err)?;
    let mut version: u32 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(err)?;
    if version > known {
        return Err(too_new(name, version));
    }
    if version == 0 {
        let unversioned: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs')",
                [],
                |row| row.get(0),
            )
            .map_err(err)?;
        if unversioned {
            version = 1;
        }
    }
    for (from, migration) in migrations.iter().enumerate().skip(version as usize) {
        tx.execute_batch(migration).map_err(|e| {
            StoreError(format!(
                "cannot migrate the database {name} from schema version {from} to {}: {e}; it \
                 was left at version {version}",
                from + 1
            ))
        })?;
    }
    tx.pragma_update(None, "user_version", known).map_err(err)?;
    tx.commit().map_err(err)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    /// A database of an earlier schema is migrated; one of a newer schema is
    /// refused untouched (see [`SqliteStore::check_version`]).
    pub fn open(path: &Path, full_sync: bool) -> Result<Self, StoreError> {
        Self::check_version(path)?;
        let conn = Connection::open(path)
            .map_err(|e| StoreError(format!("cannot open database {}: {e}", path.display())))?;
        Self::init(conn, &path.display().to_string(), full_sync, MIGRATIONS)
    }

    /// Refuses a database at `path` that a newer build wrote, reading it
    /// only. A missing database is fine: it is made on open.
    pub fn check_version(path: &Path) -> Result<(), StoreError> {
        if !path.exists() {
            return Ok(());
        }
        match version_untouched(path)? {
            v if v > SCHEMA_VERSION => Err(too_new(&path.display().to_string(), v)),
            _ => Ok(()),
        }
    }

    /// A private in-memory database, for tests.
    pub fn in_memory() -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory().map_err(err)?;
        Self::init(conn, ":memory:", false, MIGRATIONS)
    }

    fn init(
        mut conn: Connection,
        name: &str,
        full_sync: bool,
        migrations: &[&str],
    ) -> Result<Self, StoreError> {
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
        migrate(&mut conn, name, migrations)?;
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
    let record = crate::job_record(job)?;
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

const SERVER_COLUMNS: &str =
    "id, name, address, version, started_ms, heartbeat_ms, lease_ms, instance, prefix";

fn server_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ServerRecord> {
    Ok(ServerRecord {
        id: row.get::<_, i64>(0)? as u64,
        name: row.get(1)?,
        address: row.get(2)?,
        version: row.get(3)?,
        started_ms: row.get(4)?,
        heartbeat_ms: row.get(5)?,
        lease_ms: row.get(6)?,
        instance: row.get(7)?,
        prefix: row.get(8)?,
    })
}

fn all_servers(conn: &Connection) -> Result<Vec<ServerRecord>, StoreError> {
    let mut stmt = conn
        .prepare(&format!("SELECT {SERVER_COLUMNS} FROM servers ORDER BY id"))
        .map_err(err)?;
    let rows = stmt.query_map([], server_row).map_err(err)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(err)
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

    fn register_server(
        &self,
        server: &ServerRecord,
    ) -> Result<(u64, Vec<ServerRecord>), StoreError> {
        let mut conn = self.conn();
        // Immediate: the write lock from the start, so that what is read is
        // what the insert follows.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let others = all_servers(&tx)?;
        tx.execute(
            "INSERT INTO servers (name, address, version, started_ms, heartbeat_ms, lease_ms,
             instance, prefix) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                server.name,
                server.address,
                server.version,
                server.started_ms,
                server.heartbeat_ms,
                server.lease_ms,
                server.instance,
                server.prefix
            ],
        )
        .map_err(err)?;
        let id = tx.last_insert_rowid() as u64;
        tx.commit().map_err(err)?;
        Ok((id, others))
    }

    fn heartbeat_server(&self, id: u64, now_ms: i64) -> Result<bool, StoreError> {
        let changed = self
            .conn()
            .execute(
                "UPDATE servers SET heartbeat_ms = ?2 WHERE id = ?1",
                params![id as i64, now_ms],
            )
            .map_err(err)?;
        Ok(changed > 0)
    }

    fn servers(&self) -> Result<Vec<ServerRecord>, StoreError> {
        all_servers(&self.conn())
    }

    fn remove_server(&self, id: u64) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM servers WHERE id = ?1", params![id as i64])
            .map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
#[path = "../tests/support/job.rs"]
mod test_fixture;

#[cfg(test)]
mod tests {
    use super::test_fixture::job;
    use super::*;

    fn user_version(path: &Path) -> u32 {
        Connection::open(path)
            .unwrap()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap()
    }

    #[test]
    fn a_new_database_is_stamped_with_the_newest_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        drop(SqliteStore::open(&path, false).unwrap());
        assert_eq!(user_version(&path), SCHEMA_VERSION);
        // Reopening runs nothing again: the job sequence is kept.
        let store = SqliteStore::open(&path, false).unwrap();
        assert_eq!(store.next_job_id().unwrap(), 1);
        drop(store);
        let store = SqliteStore::open(&path, false).unwrap();
        assert_eq!(store.next_job_id().unwrap(), 2);
    }

    /// A database of the release before versions: the tables, version 0.
    fn unversioned(path: &Path) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.execute("UPDATE sequences SET value = 7 WHERE name = 'job'", [])
            .unwrap();
        save(&conn, &job(7, JobState::Queued)).unwrap();
        assert_eq!(user_version(path), 0);
    }

    #[test]
    fn an_unversioned_database_counts_as_version_1() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        unversioned(&path);
        let store = SqliteStore::open(&path, false).unwrap();
        assert_eq!(store.get_job(7).unwrap().unwrap(), job(7, JobState::Queued));
        assert_eq!(store.next_job_id().unwrap(), 8);
        drop(store);
        assert_eq!(user_version(&path), SCHEMA_VERSION);
    }

    #[test]
    fn a_later_migration_runs_once_on_an_older_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        unversioned(&path);
        let later = [
            MIGRATIONS[0],
            "ALTER TABLE jobs ADD COLUMN note TEXT DEFAULT 'x';",
        ];
        let open = || SqliteStore::init(Connection::open(&path).unwrap(), "t.db", false, &later);
        let store = open().unwrap();
        let note: String = store
            .conn()
            .query_row("SELECT note FROM jobs WHERE id = 7", [], |row| row.get(0))
            .unwrap();
        assert_eq!(note, "x");
        drop(store);
        assert_eq!(user_version(&path), 2);
        // Adding the column twice would fail: it is not run again.
        drop(open().unwrap());
    }

    #[test]
    fn a_failing_migration_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        unversioned(&path);
        let broken = [
            MIGRATIONS[0],
            "CREATE TABLE half (x); INSERT INTO no_such_table VALUES (1);",
        ];
        let e = SqliteStore::init(Connection::open(&path).unwrap(), "t.db", false, &broken)
            .err()
            .expect("the migration fails");
        assert!(
            e.0.contains("from schema version 1 to 2") && e.0.contains("no_such_table"),
            "{e}"
        );
        assert_eq!(user_version(&path), 0);
        let half: bool = Connection::open(&path)
            .unwrap()
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'half')",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert!(!half);
        assert_eq!(
            SqliteStore::open(&path, false).unwrap().get_job(7).unwrap(),
            Some(job(7, JobState::Queued))
        );
    }

    #[test]
    fn a_database_of_a_newer_version_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path, false).unwrap();
        store.save_job(&job(1, JobState::Queued)).unwrap();
        store
            .conn()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(store);
        let before = std::fs::read(&path).unwrap();
        let e = SqliteStore::open(&path, false).err().expect("refused");
        assert!(
            e.0.contains(&format!("schema version {}", SCHEMA_VERSION + 1))
                && e.0.contains(&format!("versions up to {SCHEMA_VERSION}"))
                && e.0.contains("restore a backup"),
            "{e}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), before);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec!["t.db".to_string()], "no journal or WAL was made");
    }
}
