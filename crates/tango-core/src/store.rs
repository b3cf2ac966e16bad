//! The persistence interface of the engine. Implementations live in
//! `tango-store`; the engine writes every state change through it before it
//! acts on that change, so a crash at any point can be recovered from.

use crate::model::{Job, JobId, JobState};

#[derive(Debug, thiserror::Error)]
#[error("store error: {0}")]
pub struct StoreError(pub String);

/// A callback waiting to be delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub job_id: JobId,
    pub url: String,
    /// Value of the `Filename` header (the job's output file name).
    pub output_file: String,
    /// Host path of the frozen copy of the output to send.
    pub body_path: String,
    pub attempts: u32,
    /// Unix ms of the next attempt.
    pub next_attempt_ms: i64,
    /// Unix ms after which delivery is abandoned.
    pub deadline_ms: i64,
    pub last_error: Option<String>,
}

/// A tangod server that shares the store, as it registered itself. Each
/// server renews its heartbeat every third of its lease; a server whose
/// heartbeat is older than its lease is dead (killed, frozen or cut off).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerRecord {
    /// Given by the store on registration, never reused: a server that
    /// starts again is a new record.
    pub id: u64,
    pub name: String,
    /// Where it listens, as it bound it.
    pub address: String,
    /// Its tangod version.
    pub version: String,
    pub started_ms: i64,
    /// Unix ms of its last heartbeat (by its own clock).
    pub heartbeat_ms: i64,
    /// How long its heartbeat stays good: kept with the record, so every
    /// server judges it by the lease it announced.
    pub lease_ms: i64,
    /// Which tangod this is across restarts on one machine (its machine id,
    /// user and VM prefix), when it holds that machine's lock on the
    /// prefix: a record of the same instance is then a run that died.
    pub instance: Option<String>,
}

impl ServerRecord {
    /// How old the heartbeat is at `now_ms`; a clock behind the writer's
    /// counts as no age rather than a negative one.
    pub fn heartbeat_age_ms(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(self.heartbeat_ms).max(0)
    }

    /// Whether the heartbeat is younger than the lease at `now_ms`.
    pub fn alive(&self, now_ms: i64) -> bool {
        self.heartbeat_age_ms(now_ms) < self.lease_ms
    }
}

pub trait Store: Send + Sync + 'static {
    /// A fresh job id; ids increase and are never reused, across restarts.
    fn next_job_id(&self) -> Result<JobId, StoreError>;
    /// A fresh VM id, likewise.
    fn next_vm_id(&self) -> Result<u64, StoreError>;

    /// Inserts or replaces a job record.
    fn save_job(&self, job: &Job) -> Result<(), StoreError>;
    /// Saves a finished job and, atomically with it, its callback.
    fn finish_job(&self, job: &Job, callback: Option<&OutboxEntry>) -> Result<(), StoreError>;
    fn get_job(&self, id: JobId) -> Result<Option<Job>, StoreError>;
    /// Jobs in any of `states`, oldest first; at most `limit` (newest kept
    /// when limited).
    fn jobs_in_states(
        &self,
        states: &[JobState],
        limit: Option<usize>,
    ) -> Result<Vec<Job>, StoreError>;

    /// Records the md5 of a courselab file (`dir` is `<key>-<courselab>`).
    fn set_file(&self, dir: &str, name: &str, md5: &str) -> Result<(), StoreError>;
    fn file_md5(&self, dir: &str, name: &str) -> Result<Option<String>, StoreError>;
    fn files(&self, dir: &str) -> Result<Vec<(String, String)>, StoreError>;

    fn outbox_due(&self, now_ms: i64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError>;
    /// Earliest `next_attempt_ms` in the outbox.
    fn outbox_next_due(&self) -> Result<Option<i64>, StoreError>;
    fn outbox_update(&self, entry: &OutboxEntry) -> Result<(), StoreError>;
    fn outbox_remove(&self, job_id: JobId) -> Result<(), StoreError>;
    fn outbox_len(&self) -> Result<usize, StoreError>;

    /// Records a server (its `id` is ignored) under a fresh id, and returns
    /// that id with the other servers' records as they were at that
    /// instant. Atomic: of two servers registering at once, the later one
    /// sees the earlier.
    fn register_server(
        &self,
        server: &ServerRecord,
    ) -> Result<(u64, Vec<ServerRecord>), StoreError>;
    /// Sets server `id`'s heartbeat; false when it has no record (removed).
    fn heartbeat_server(&self, id: u64, now_ms: i64) -> Result<bool, StoreError>;
    /// Every server's record, by id.
    fn servers(&self) -> Result<Vec<ServerRecord>, StoreError>;
    /// Removes a server's record (a clean stop, or a long-dead server).
    fn remove_server(&self, id: u64) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::ServerRecord;

    fn server(heartbeat_ms: i64, lease_ms: i64) -> ServerRecord {
        ServerRecord {
            id: 1,
            name: "a".into(),
            address: "127.0.0.1:3000".into(),
            version: "0".into(),
            started_ms: 0,
            heartbeat_ms,
            lease_ms,
            instance: None,
        }
    }

    #[test]
    fn a_server_is_alive_while_its_heartbeat_is_younger_than_its_lease() {
        let s = server(10_000, 15_000);
        assert!(s.alive(10_000));
        assert!(s.alive(24_999));
        assert!(
            !s.alive(25_000),
            "a lease of 15 s ends 15 s after the heartbeat"
        );
        assert!(!s.alive(100_000));
        assert_eq!(s.heartbeat_age_ms(12_500), 2_500);
        // A reader whose clock is behind the writer's.
        assert_eq!(s.heartbeat_age_ms(9_000), 0);
        assert!(s.alive(9_000));
        assert!(!server(10_000, 0).alive(10_000), "no lease, never alive");
    }
}
