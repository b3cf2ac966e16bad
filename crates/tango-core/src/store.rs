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
    /// Its VM prefix: the names of the VMs it made. Servers sharing a
    /// store each have their own, so the VMs of one that died are found.
    pub prefix: String,
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

/// An output file as several servers share it (see [`SharedStore`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedOutput {
    pub courselab_dir: String,
    pub output_file: String,
    pub content: Vec<u8>,
}

/// What a store shared by several servers keeps beyond [`Store`]: the
/// bytes that one server wrote and another serves (uploads, outputs,
/// callback bodies), courselabs, and which server owns which job.
///
/// A job's owner is the server that claimed it; only the owner may change
/// its record ([`Store::save_job`] refuses otherwise) and only the owner
/// finishes it, once ([`SharedStore::finish_owned`]): a server that lost
/// its jobs to the others cannot report them.
pub trait SharedStore: Send + Sync {
    /// Records courselab `dir`; true when it did not exist.
    fn open_courselab(&self, dir: &str) -> Result<bool, StoreError>;
    fn courselab_exists(&self, dir: &str) -> Result<bool, StoreError>;

    /// Stores the bytes of file `path` as blob `md5`, streamed in chunks;
    /// nothing when the blob is there already.
    fn put_blob(&self, md5: &str, path: &std::path::Path) -> Result<(), StoreError>;
    /// Writes blob `md5` to `dest`, streamed in chunks; false when the
    /// store has no such blob.
    fn fetch_blob(&self, md5: &str, dest: &std::path::Path) -> Result<bool, StoreError>;

    /// Takes up to `limit` queued jobs no server owns for server `owner`,
    /// skipping any another server is taking right now: every submitter's
    /// first queued job before anyone's second, and so on, oldest first.
    /// A retired server claims none.
    fn claim_jobs(&self, owner: u64, limit: usize) -> Result<Vec<Job>, StoreError>;
    /// Records `job` (queued again, `owner` None) if server `from` still
    /// owns it; false when it does not (another server released it first).
    fn release_job(&self, job: &Job, from: u64) -> Result<bool, StoreError>;
    /// Queued or running jobs whose owner is retired or has no record in
    /// the servers registry, with that owner.
    fn orphaned_jobs(&self) -> Result<Vec<Job>, StoreError>;
    /// Retires dead server `id`: its jobs are orphans from now on, and its
    /// heartbeats are refused ([`Store::heartbeat_server`] answers false),
    /// so that it stops if it was only frozen. Its record stays, to show.
    /// True when this call retired it (false: it was already).
    fn retire_server(&self, id: u64, now_ms: i64) -> Result<bool, StoreError>;

    /// Records the finished `job` with its output file and callback (whose
    /// body is the output), if server `owner` owns it and it is not
    /// finished: false, and nothing recorded, otherwise.
    fn finish_owned(
        &self,
        job: &Job,
        owner: u64,
        output: &SharedOutput,
        callback: Option<&OutboxEntry>,
    ) -> Result<bool, StoreError>;
    /// The output file `output_file` of courselab `dir`, as its last job wrote it.
    fn output(&self, dir: &str, output_file: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// The body of a job's callback.
    fn callback_body(&self, job_id: JobId) -> Result<Option<Vec<u8>>, StoreError>;
    /// How many jobs are queued, owned or not.
    fn queued_count(&self) -> Result<usize, StoreError>;
    /// How many jobs of `submitter` in courselab `dir` are queued.
    fn queued_of(&self, dir: &str, submitter: &str) -> Result<usize, StoreError>;

    /// Woken when a job no server owns is queued (added or released).
    fn jobs_signal(&self) -> std::sync::Arc<tokio::sync::Notify>;
    /// Woken when a callback is added to the outbox.
    fn outbox_signal(&self) -> std::sync::Arc<tokio::sync::Notify>;
}

/// Runs a store call on a thread for blocking work, off the async threads:
/// a shared store's calls go over the network and wait while the database
/// is away, and would hold an async thread (one per core) meanwhile.
pub async fn call_blocking<T: Send + 'static>(
    store: std::sync::Arc<dyn Store>,
    call: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(move || call(&*store))
        .await
        .map_err(|e| StoreError(format!("a store call failed: {e}")))?
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
    /// Takes up to `limit` callbacks due at `now_ms` for delivery: each is
    /// moved to `until_ms`, so that no other delivery takes it meanwhile
    /// and a crash mid-delivery retries it then.
    fn outbox_claim(
        &self,
        now_ms: i64,
        until_ms: i64,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut due = self.outbox_due(now_ms, limit)?;
        for entry in &mut due {
            let mut claimed = entry.clone();
            claimed.next_attempt_ms = until_ms;
            self.outbox_update(&claimed)?;
        }
        Ok(due)
    }

    /// The store's shared side, when several servers may use it.
    fn shared(&self) -> Option<&dyn SharedStore> {
        None
    }

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
            prefix: "tango".into(),
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
