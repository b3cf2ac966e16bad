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
}
