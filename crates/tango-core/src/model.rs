//! The job and machine model shared by the engine, the store, the backends
//! and the HTTP layer.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub type JobId = u64;

/// One file of a job: the uploaded name, the name it gets inside the VM, and
/// where the engine keeps the bytes that existed when the job was added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    /// Name the file was uploaded under (`localFile`).
    pub local_file: String,
    /// Name inside the VM's job directory (`destFile`).
    pub dest_file: String,
    /// Host path of the immutable snapshot of the file's bytes.
    pub path: PathBuf,
    /// md5 (hex) of those bytes.
    pub md5: String,
}

/// A VM (or container, or sandbox) as the engine and backends see it.
/// Its `name` is `<prefix>-<id>-<image>`, which lets a server find every VM
/// it left behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    pub name: String,
    pub id: u64,
    pub image: String,
    pub vmms: String,
    /// CPU cores, `None` for the backend's default.
    pub cores: Option<u32>,
    /// Memory limit in MiB, `None` for the backend's default.
    pub memory_mb: Option<u64>,
    /// Cloud credentials for a per-job VM (EC2); never serialised to clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CloudCredentials>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl Machine {
    pub fn new(prefix: &str, id: u64, image: &str, vmms: &str) -> Self {
        Machine {
            name: machine_name(prefix, id, image),
            id,
            image: image.to_string(),
            vmms: vmms.to_string(),
            cores: None,
            memory_mb: None,
            credentials: None,
        }
    }
}

/// `<prefix>-<id>-<image>`, Tango's naming rule.
pub fn machine_name(prefix: &str, id: u64, image: &str) -> String {
    format!("{prefix}-{id}-{image}")
}

/// Splits a VM name made by [`machine_name`] back into id and image, when it
/// carries `prefix`. Image names may contain `-`; ids never do.
pub fn parse_machine_name(prefix: &str, name: &str) -> Option<(u64, String)> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('-')?;
    let (id, image) = rest.split_once('-')?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) || image.is_empty() {
        return None;
    }
    Some((id.parse().ok()?, image.to_string()))
}

/// Where a job is in its life. Queued and Running jobs are "live"; Done and
/// Failed jobs are "dead" in Tango's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    /// Ran to an outcome the student sees (including timeouts).
    Done,
    /// Ended without running: rejected, or system errors after every retry.
    Failed,
}

impl JobState {
    pub fn is_live(self) -> bool {
        matches!(self, JobState::Queued | JobState::Running)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "done" => JobState::Done,
            "failed" => JobState::Failed,
            _ => return None,
        })
    }
}

/// A trace line: unix time in milliseconds and a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceEntry {
    pub at_ms: i64,
    pub message: String,
}

/// Timestamps (unix ms) of each phase a job went through.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phases {
    pub added: Option<i64>,
    pub assigned: Option<i64>,
    pub vm_ready: Option<i64>,
    pub copied_in: Option<i64>,
    pub ran: Option<i64>,
    pub copied_out: Option<i64>,
    pub finished: Option<i64>,
    pub callback_delivered: Option<i64>,
}

/// A job as the engine keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub name: String,
    /// `<key>-<courselab>`, the courselab directory name.
    pub courselab_dir: String,
    /// The courselab's name alone (without the key), for logs and metrics.
    #[serde(default)]
    pub courselab: String,
    pub image: String,
    pub vmms: String,
    pub inputs: Vec<InputFile>,
    pub output_file: String,
    /// Run time limit in seconds.
    pub timeout_secs: u64,
    /// Output cap in bytes.
    pub max_output_bytes: u64,
    pub callback_url: Option<String>,
    pub disable_network: bool,
    pub cores: Option<u32>,
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CloudCredentials>,
    pub state: JobState,
    /// System-error retries used so far.
    pub retries: u32,
    /// VM the job is (or was last) assigned to.
    pub vm: Option<Machine>,
    pub trace: Vec<TraceEntry>,
    pub phases: Phases,
    /// Outcome line written to the output file, once finished.
    pub outcome: Option<String>,
    /// Time spent waiting for an unavailable backend (ms); bounded by the
    /// engine's `backend_wait_max_secs`, after which failures count as retries.
    #[serde(default)]
    pub backend_wait_ms: u64,
}

impl Job {
    /// A queued job with no inputs or limits yet, added now.
    pub fn new(
        name: String,
        courselab_dir: String,
        courselab: String,
        image: String,
        vmms: String,
    ) -> Job {
        Job {
            id: 0,
            name,
            courselab_dir,
            courselab,
            image,
            vmms,
            inputs: vec![],
            output_file: String::new(),
            timeout_secs: 0,
            max_output_bytes: 0,
            callback_url: None,
            disable_network: false,
            cores: None,
            memory_mb: None,
            credentials: None,
            state: JobState::Queued,
            retries: 0,
            vm: None,
            trace: vec![],
            phases: Phases {
                added: Some(now_ms()),
                ..Phases::default()
            },
            outcome: None,
            backend_wait_ms: 0,
        }
    }

    pub fn add_trace(&mut self, message: impl Into<String>) {
        self.trace.push(TraceEntry {
            at_ms: now_ms(),
            message: message.into(),
        });
    }
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// `Fri Nov 27 17:24:44 2026`, as Python's `time.ctime()`.
pub fn ctime(at_ms: i64) -> String {
    use chrono::TimeZone;
    let t = chrono::Local
        .timestamp_millis_opt(at_ms)
        .single()
        .unwrap_or_else(chrono::Local::now);
    t.format("%a %b %e %H:%M:%S %Y").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_names_round_trip() {
        let m = Machine::new("tango", 42, "my-image:1", "sandbox");
        assert_eq!(m.name, "tango-42-my-image:1");
        assert_eq!(
            parse_machine_name("tango", &m.name),
            Some((42, "my-image:1".to_string()))
        );
        assert_eq!(parse_machine_name("tango", "tangoX-1-a"), None);
        assert_eq!(parse_machine_name("tango", "tango-x-a"), None);
        assert_eq!(parse_machine_name("tango", "tango-1-"), None);
        assert_eq!(parse_machine_name("other", &m.name), None);
    }

    #[test]
    fn ctime_shape() {
        let s = ctime(0);
        assert_eq!(s.split_whitespace().count(), 5, "{s}");
    }
}
