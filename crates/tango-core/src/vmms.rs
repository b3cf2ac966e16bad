//! The VMMS interface of Tango (initializeVM, waitVM, copyIn, runJob,
//! copyOut, destroyVM, safeDestroyVM, getVMs, plus existsVM, getImages and
//! getPartialOutput) as a Rust trait.
//!
//! Backends do not need to bound their own calls: the engine runs every call
//! under a timeout and treats an expired call as a system error (the VM is
//! then destroyed and the job retried).

use crate::model::{InputFile, Machine};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum VmmsError {
    #[error("VM {0} does not exist")]
    NoSuchVm(String),
    #[error("image {0} is not available on this backend")]
    NoSuchImage(String),
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Backend(String),
    /// A host name this backend does not know (see [`Vmms::hosts`]).
    #[error("no host named {0:?}; `tango hosts` lists them")]
    NoSuchHost(String),
    /// The host left the config: it drains and goes once its VMs are gone,
    /// so it cannot be undrained.
    #[error(
        "host {0} left the config: it drains and goes once its VMs are gone; \
         list it in the config again and reload to use it"
    )]
    HostLeaving(String),
    /// The backend as a whole cannot be reached (its daemon is down). The
    /// engine waits for it to return instead of spending the job's retries.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
}

impl VmmsError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        VmmsError::Io {
            context: context.into(),
            source,
        }
    }
}

/// What `run_job` needs to run the autodriver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRequest {
    pub job_id: u64,
    /// Run time limit the autodriver enforces (`-t`).
    pub timeout_secs: u64,
    /// Output cap in bytes (`-o`).
    pub output_cap_bytes: u64,
    /// Max processes of the grading user (`-u`).
    pub max_procs: u64,
    /// Max file size in bytes (`-f`).
    pub max_file_bytes: u64,
    /// The job must run with no network but loopback.
    pub disable_network: bool,
}

impl RunRequest {
    /// The autodriver's arguments for a job directory `dir` inside the VM,
    /// in the Tango-compatible form plus the stricter options.
    pub fn autodriver_args(&self, user: &str, summary_path: &str, dir: &str) -> Vec<String> {
        vec![
            "-u".into(),
            self.max_procs.to_string(),
            "-f".into(),
            self.max_file_bytes.to_string(),
            "-t".into(),
            self.timeout_secs.to_string(),
            "-o".into(),
            self.output_cap_bytes.to_string(),
            "--user".into(),
            user.into(),
            "--summary".into(),
            summary_path.into(),
            dir.into(),
        ]
    }
}

/// How the autodriver ended, from its exit code (Tango's meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// 0: the job ran, whatever make returned.
    Completed,
    /// 2: the job hit its time limit.
    TimedOut,
    /// 1: the autodriver rejected its arguments.
    UsageError,
    /// 3 or anything else: an OS error; the VM is considered damaged.
    OsError,
}

impl RunStatus {
    pub fn from_exit_code(code: Option<i32>) -> Self {
        match code {
            Some(0) => RunStatus::Completed,
            Some(1) => RunStatus::UsageError,
            Some(2) => RunStatus::TimedOut,
            _ => RunStatus::OsError,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunOutcome {
    pub status: RunStatus,
    /// The autodriver's raw exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The autodriver's `--summary` JSON, when the backend could read it.
    pub summary: Option<serde_json::Value>,
    /// Facts the backend observed that the student should see, e.g. "the job
    /// was killed for exceeding its memory limit of 1024 MiB". The engine
    /// writes each as a line of the output file's header.
    pub notes: Vec<String>,
}

/// One machine of a backend that spreads its VMs over several (the docker
/// backend's hosts), as `GET /v2/hosts`, the metrics and the dashboard show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    pub name: String,
    /// The backend it belongs to (`docker`).
    pub vmms: String,
    /// Where it is reached, never with credentials.
    pub url: String,
    /// It answered its last health check.
    pub up: bool,
    /// It takes no new VMs; its running jobs finish.
    pub draining: bool,
    pub max_vms: usize,
    /// This server's VMs on it now, busy or idle.
    pub vms: usize,
    pub running_jobs: usize,
    pub vm_starts: u64,
    pub vm_start_failures: u64,
}

/// A VM manager. One instance serves every VM of its kind; all methods may
/// be called concurrently for different VMs.
#[async_trait]
pub trait Vmms: Send + Sync + 'static {
    /// The backend's name as used in job records and config (`sandbox`, `docker`).
    fn name(&self) -> &'static str;

    /// Creates the VM described by `vm` (Tango's initializeVM).
    async fn initialize_vm(&self, vm: &Machine) -> Result<(), VmmsError>;

    /// Waits up to `max` for the VM to accept jobs.
    async fn wait_vm(&self, vm: &Machine, max: Duration) -> Result<(), VmmsError>;

    /// Puts each input file into the VM's job directory under its `dest_file`.
    async fn copy_in(&self, vm: &Machine, files: &[InputFile]) -> Result<(), VmmsError>;

    /// Runs the autodriver on the job directory; its output stays in the VM
    /// until `copy_out`.
    async fn run_job(&self, vm: &Machine, req: &RunRequest) -> Result<RunOutcome, VmmsError>;

    /// Writes the autodriver's output of the last run to `dest` on the host.
    async fn copy_out(&self, vm: &Machine, dest: &Path) -> Result<(), VmmsError>;

    /// Removes the VM.
    async fn destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError>;

    /// Removes the VM and makes sure it is gone.
    async fn safe_destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError>;

    /// Every VM of this backend carrying `prefix` in its name.
    async fn get_vms(&self, prefix: &str) -> Result<Vec<Machine>, VmmsError>;

    async fn exists_vm(&self, vm: &Machine) -> Result<bool, VmmsError>;

    /// Image names jobs can use on this backend.
    async fn get_images(&self) -> Result<Vec<String>, VmmsError>;

    /// Output the running job printed so far, at most `max_bytes` of it.
    async fn partial_output(&self, vm: &Machine, max_bytes: usize) -> Result<Vec<u8>, VmmsError>;

    /// Prepares a VM that ran a job for the next one (reuse). The default
    /// does nothing: the autodriver already cleaned up after the job.
    async fn reset_vm(&self, _vm: &Machine) -> Result<(), VmmsError> {
        Ok(())
    }

    /// Loads an image from a `docker save` tar and tags it `<name>:latest`.
    async fn build_image(&self, _name: &str, _tar: &Path) -> Result<(), VmmsError> {
        Err(VmmsError::Unsupported("building images"))
    }

    /// The machines this backend spreads VMs over; empty for a backend that
    /// has no such notion (one machine, or a cloud).
    fn hosts(&self) -> Vec<HostStatus> {
        Vec::new()
    }

    /// Stops (`true`) or resumes (`false`) placing new VMs on `host`; its
    /// running jobs finish, its idle VMs are removed.
    async fn set_host_draining(&self, host: &str, _draining: bool) -> Result<(), VmmsError> {
        Err(VmmsError::NoSuchHost(host.to_string()))
    }

    /// The host `initialize_vm` placed `vm` on, for the job's record.
    fn host_of(&self, _vm: &Machine) -> Option<String> {
        None
    }
}
