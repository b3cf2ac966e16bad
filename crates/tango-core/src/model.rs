//! The job and machine model shared by the engine, the store, the backends
//! and the HTTP layer.

use serde::{Deserialize, Serialize};
use std::borrow::Cow;
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
    /// The host of a backend of several machines the VM was placed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
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
            host: None,
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
    /// Who submitted the job, the unit of fairness within a courselab (see
    /// [`submitter_from_job_name`]). Records stored by builds before it
    /// have none: [`Job::submitter_or_derived`] derives it for them.
    #[serde(default)]
    pub submitter: String,
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
    /// VM the job is (or was last) assigned to. Boxed: most live jobs are
    /// queued, without one, and a queued job's record stays in memory.
    pub vm: Option<Box<Machine>>,
    pub trace: Vec<TraceEntry>,
    pub phases: Phases,
    /// Outcome line written to the output file, once finished.
    pub outcome: Option<String>,
    /// Time spent waiting for an unavailable backend (ms); bounded by the
    /// engine's `backend_wait_max_secs`, after which failures count as retries.
    #[serde(default)]
    pub backend_wait_ms: u64,
    /// The server that claimed the job, in a store several servers share
    /// (kept by the store beside the record, not in it).
    #[serde(skip)]
    pub owner: Option<u64>,
}

impl Job {
    /// A queued job with no inputs or limits yet, added now; its submitter
    /// is the one its name shows ([`submitter_from_job_name`]).
    pub fn new(
        name: String,
        courselab_dir: String,
        courselab: String,
        image: String,
        vmms: String,
    ) -> Job {
        Job {
            id: 0,
            submitter: submitter_from_job_name(&name),
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
            owner: None,
        }
    }

    /// The submitter the job was given, or for a job without one (stored
    /// before submitters were recorded, or made without one) the submitter
    /// its name shows.
    pub fn submitter_or_derived(&self) -> Cow<'_, str> {
        if self.submitter.is_empty() {
            Cow::Owned(submitter_from_job_name(&self.name))
        } else {
            Cow::Borrowed(&self.submitter)
        }
    }

    pub fn add_trace(&mut self, message: impl Into<String>) {
        self.trace.push(TraceEntry {
            at_ms: now_ms(),
            message: message.into(),
        });
    }
}

/// Longest submitter kept, in bytes: it is a key the scheduler holds for
/// every queued job, and a job name may be up to 1 KiB of a client's text.
pub const MAX_SUBMITTER_BYTES: usize = 255;

/// Who submitted a job, from its `jobName`. Autolab names a job
/// `<course>_<assessment>_<version>_<email>` (its `get_job_name`), so the
/// submitter is what follows the last `_<digits>_`; a name without one (other
/// clients, or nothing after it) is its own submitter. An email that itself
/// holds `_<digits>_` loses its head (`ann_12_b@x` gives `b@x`): the split
/// key is then narrower than the student, still one per student. Cut to
/// [`MAX_SUBMITTER_BYTES`] on a character boundary.
pub fn submitter_from_job_name(name: &str) -> String {
    let bytes = name.as_bytes();
    // Each candidate is an underscore closing a run of digits that an
    // underscore opens; from the right, each byte is looked at a bounded
    // number of times, so hostile names cost linear time.
    let mut end = bytes.len();
    let mut start = 0;
    while let Some(close) = bytes[..end].iter().rposition(|&b| b == b'_') {
        let digits = bytes[..close]
            .iter()
            .rev()
            .take_while(|b| b.is_ascii_digit())
            .count();
        let open = close - digits;
        if digits > 0 && open > 0 && bytes[open - 1] == b'_' && close + 1 < bytes.len() {
            start = close + 1;
            break;
        }
        end = close;
    }
    let submitter = &name[start..];
    let mut cut = submitter.len().min(MAX_SUBMITTER_BYTES);
    while !submitter.is_char_boundary(cut) {
        cut -= 1;
    }
    submitter[..cut].to_string()
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
    fn submitters_of_autolab_job_names() {
        let cases = [
            // Autolab: <course>_<assessment>_<version>_<email>.
            (
                "15213-f26_datalab_3_ann@andrew.cmu.edu",
                "ann@andrew.cmu.edu",
            ),
            (
                "15213-f26_datalab_12_john_doe99@cmu.edu",
                "john_doe99@cmu.edu",
            ),
            // Digits and underscores in course and assessment names.
            ("cs_101_lab_2_part_1_7_bo_b@x.edu", "bo_b@x.edu"),
            ("15-213_lab3_1_x_2@y.org", "x_2@y.org"),
            // An email holding `_<digits>_` keeps only what follows it.
            ("c_a_4_ann_12_b@x", "b@x"),
            // No version: the whole name.
            ("handin-ann@x.edu", "handin-ann@x.edu"),
            ("course_lab_ann@x.edu", "course_lab_ann@x.edu"),
            ("course_lab_v2_ann", "course_lab_v2_ann"),
            // Nothing after the version: the whole name.
            ("course_lab_3_", "course_lab_3_"),
            // A version at the very start has no `_` before it.
            ("3_ann", "3_ann"),
            ("_3_ann", "ann"),
            ("", ""),
            ("_", "_"),
            ("__", "__"),
            ("_1_", "_1_"),
            ("\u{e9}t\u{e9}_l_1_\u{e9}l\u{e8}ve@x", "\u{e9}l\u{e8}ve@x"),
        ];
        for (name, submitter) in cases {
            assert_eq!(submitter_from_job_name(name), submitter, "{name:?}");
        }
    }

    #[test]
    fn hostile_job_names_give_bounded_submitters() {
        let long = format!("c_a_1_{}", "\u{e9}".repeat(1000));
        let s = submitter_from_job_name(&long);
        assert!(s.len() <= MAX_SUBMITTER_BYTES && s.len() >= MAX_SUBMITTER_BYTES - 1);
        assert!(s.chars().all(|c| c == '\u{e9}'));
        for name in [
            "_".repeat(5000),
            "_1".repeat(5000),
            "1_".repeat(5000),
            "9".repeat(5000),
            format!("{}_", "_1".repeat(3000)),
        ] {
            let s = submitter_from_job_name(&name);
            assert!(s.len() <= MAX_SUBMITTER_BYTES, "{}", s.len());
            assert!(name.ends_with(&s) || name.starts_with(&s));
        }
    }

    #[test]
    fn submitter_or_derived_prefers_the_recorded_one() {
        let mut job = Job::new(
            "c_lab_2_ann@x.edu".into(),
            "k-c-lab".into(),
            "c-lab".into(),
            "img".into(),
            "sandbox".into(),
        );
        assert_eq!(job.submitter, "ann@x.edu");
        job.submitter = "bob@x.edu".into();
        assert_eq!(job.submitter_or_derived(), "bob@x.edu");
        job.submitter.clear();
        assert_eq!(job.submitter_or_derived(), "ann@x.edu");
    }

    #[test]
    fn records_without_a_submitter_still_load() {
        let job = Job::new(
            "c_lab_2_ann@x.edu".into(),
            "k-c-lab".into(),
            "c-lab".into(),
            "img".into(),
            "sandbox".into(),
        );
        let mut record = serde_json::to_value(&job).unwrap();
        record.as_object_mut().unwrap().remove("submitter");
        let old: Job = serde_json::from_value(record).unwrap();
        assert_eq!(old.submitter, "");
        assert_eq!(old.submitter_or_derived(), "ann@x.edu");
    }

    #[test]
    fn ctime_shape() {
        let s = ctime(0);
        assert_eq!(s.split_whitespace().count(), 5, "{s}");
    }
}
