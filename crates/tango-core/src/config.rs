//! Engine settings, with Tango's defaults where Tango has one.

use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// VM names start with `<prefix>-`; VMs with it that no job or pool owns
    /// are destroyed at start and every minute.
    pub prefix: String,
    /// Backend used when a job or pool names none.
    pub default_vmms: String,
    /// System-error retries per job (Tango: 2).
    pub max_retries: u32,
    /// Keep a VM after a job for the next job of its image (cleaned by the
    /// autodriver and `reset_vm`), instead of destroying it.
    pub reuse_vms: bool,
    /// VMs created on demand (beyond preallocated pools) at most at once.
    pub max_vms: usize,
    /// Run time limit when a job gives none (seconds).
    pub default_timeout_secs: u64,
    /// Largest run time limit a job may ask for (seconds).
    pub max_timeout_secs: u64,
    /// Output cap when a job gives no `max_kb` (KiB).
    pub default_output_kb: u64,
    /// Largest output cap a job may ask for (KiB).
    pub max_output_kb: u64,
    /// Processes of the grading user (autodriver `-u`).
    pub max_procs: u64,
    /// Largest file the job may write (autodriver `-f`, bytes).
    pub max_file_bytes: u64,
    pub timeouts: Timeouts,
    /// How long undelivered callbacks are retried (seconds).
    pub callback_deadline_secs: u64,
    /// First retry delay of a failed callback; doubles up to the maximum.
    pub callback_initial_backoff_ms: u64,
    pub callback_max_backoff_secs: u64,
    /// How many finished jobs `/jobs/<key>/1` lists (newest).
    pub dead_jobs_listed: usize,
    /// How long a job may wait, in all, for a backend that cannot be reached
    /// (e.g. dockerd restarting) before such failures count as retries.
    pub backend_wait_max_secs: u64,
    /// On SIGTERM, how long running jobs may take to finish before they are
    /// left to be re-queued by the next start (seconds).
    pub shutdown_grace_secs: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            prefix: "tango".into(),
            default_vmms: "sandbox".into(),
            max_retries: 2,
            reuse_vms: true,
            max_vms: 16,
            default_timeout_secs: 180,
            max_timeout_secs: 3600,
            default_output_kb: 1000,
            max_output_kb: 16 * 1024,
            max_procs: 256,
            max_file_bytes: 256 * 1024 * 1024,
            timeouts: Timeouts::default(),
            callback_deadline_secs: 48 * 3600,
            callback_initial_backoff_ms: 1000,
            callback_max_backoff_secs: 600,
            dead_jobs_listed: 1000,
            shutdown_grace_secs: 30,
            backend_wait_max_secs: 3600,
        }
    }
}

/// Time limits of the backend calls (seconds); Tango's defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    pub initialize_secs: u64,
    pub wait_secs: u64,
    pub copy_in_secs: u64,
    /// Added to the job's own timeout to bound `run_job`.
    pub run_grace_secs: u64,
    pub copy_out_secs: u64,
    pub destroy_secs: u64,
    /// `get_vms`, `get_images`, `partial_output`, `reset_vm`.
    pub query_secs: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            initialize_secs: 180,
            wait_secs: 60,
            copy_in_secs: 30,
            run_grace_secs: 30,
            copy_out_secs: 30,
            destroy_secs: 60,
            query_secs: 15,
        }
    }
}

impl Timeouts {
    pub fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }
}
