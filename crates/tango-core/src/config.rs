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
    /// Which queued job starts next.
    pub scheduling: Scheduling,
    /// Live jobs one submitter may have queued at once; over it `addJob` is
    /// refused. `None`: no limit.
    pub max_queued_per_submitter: Option<usize>,
    /// Per-courselab weights and caps, first match wins. tangod reads them
    /// from its top-level `[[courselabs]]`, not from `[engine]`.
    #[serde(skip)]
    pub courselabs: Vec<CourselabPolicy>,
}

/// The order in which queued jobs start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduling {
    /// Round-robin across courselabs with queued jobs, weighted by their
    /// `weight`; within a courselab round-robin across submitters, each
    /// submitter's jobs oldest first.
    #[default]
    Fair,
    /// Oldest job first, whoever sent it (Tango's order).
    Fifo,
}

/// Largest `weight` of a courselab: weights are ratios between courselabs,
/// and a bound keeps sums of them far from overflowing.
pub const MAX_COURSELAB_WEIGHT: u32 = 1000;

/// The share and cap of the courselabs whose names match `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CourselabPolicy {
    /// A courselab name (as clients give it, without the key) or a glob of
    /// them: `*` any run of characters, `?` any one character.
    pub name: String,
    /// Turns of the courselab in a round of the fair scheduler.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Jobs of the courselab running at once at most; `None`: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running: Option<usize>,
}

fn default_weight() -> u32 {
    1
}

impl CourselabPolicy {
    pub fn matches(&self, courselab: &str) -> bool {
        glob_matches(&self.name, courselab)
    }
}

/// A setting that cannot work, with what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "[[courselabs]] name = {name:?}: weight = {weight} is out of range; give a whole \
         number from 1 (the default) to {MAX_COURSELAB_WEIGHT}: a courselab with weight 3 \
         gets 3 turns for another's 1"
    )]
    Weight { name: String, weight: u32 },
    #[error(
        "[[courselabs]] name = {name:?}: max_running = 0 would never start its jobs; give 1 \
         or more, or leave max_running out for no cap"
    )]
    MaxRunning { name: String },
    #[error(
        "[[courselabs]] name = {name:?} is not a courselab name or pattern: {reason}; write \
         a courselab's name as clients send it (without the key), with `*` for any run of \
         characters and `?` for any one, e.g. \"15213-f26-*\""
    )]
    Pattern { name: String, reason: &'static str },
    #[error(
        "[[courselabs]] name = {name:?} is listed twice; the first entry that matches a \
         courselab applies, so the second never would: remove one"
    )]
    Duplicate { name: String },
    #[error(
        "[engine] max_queued_per_submitter = 0 would refuse every job; give 1 or more, or \
         leave it out for no limit"
    )]
    MaxQueued,
}

impl EngineConfig {
    /// Checks what can only be wrong by mistake, so that tangod stops at
    /// start with the fix instead of running a policy that was not meant.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_queued_per_submitter == Some(0) {
            return Err(ConfigError::MaxQueued);
        }
        for (i, policy) in self.courselabs.iter().enumerate() {
            let name = || policy.name.clone();
            if let Err(reason) = check_pattern(&policy.name) {
                return Err(ConfigError::Pattern {
                    name: name(),
                    reason,
                });
            }
            if !(1..=MAX_COURSELAB_WEIGHT).contains(&policy.weight) {
                return Err(ConfigError::Weight {
                    name: name(),
                    weight: policy.weight,
                });
            }
            if policy.max_running == Some(0) {
                return Err(ConfigError::MaxRunning { name: name() });
            }
            if self.courselabs[..i].iter().any(|p| p.name == policy.name) {
                return Err(ConfigError::Duplicate { name: name() });
            }
        }
        Ok(())
    }

    /// The weight and running cap of `courselab` (its name without the key):
    /// the first `[[courselabs]]` entry that matches it, else weight 1 and no
    /// cap.
    pub fn courselab_policy(&self, courselab: &str) -> (u32, Option<usize>) {
        self.courselabs
            .iter()
            .find(|p| p.matches(courselab))
            .map_or((1, None), |p| (p.weight, p.max_running))
    }
}

/// Why `pattern` can match no courselab, or would mean something else
/// than it seems.
fn check_pattern(pattern: &str) -> Result<(), &'static str> {
    if pattern.is_empty() {
        return Err("it is empty");
    }
    if pattern.len() > crate::names::MAX_NAME_BYTES {
        return Err("it is longer than 255 bytes, as no courselab name is");
    }
    if pattern.contains(['[', ']', '{', '}']) {
        return Err("only `*` and `?` are wildcards (no [..] classes or {..} lists)");
    }
    if pattern.contains(['/', '\\']) || pattern.chars().any(char::is_control) {
        return Err("courselab names hold no `/`, `\\` or control characters");
    }
    Ok(())
}

/// Whether `name` matches `pattern`, where `*` is any run of characters
/// (none too) and `?` any one character; everything else matches itself.
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    let (mut p, mut n) = (0, 0);
    // The last `*` seen and the name position it was tried at: on a
    // mismatch it takes one more character. Only the last star needs
    // retrying, so the walk is O(len(pattern) * len(name)) at worst.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == '?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
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
            scheduling: Scheduling::Fair,
            max_queued_per_submitter: None,
            courselabs: Vec::new(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let yes = [
            ("15213-f26-*", "15213-f26-datalab"),
            ("15213-f26-*", "15213-f26-"),
            ("*", ""),
            ("*", "anything"),
            ("lab?", "lab1"),
            ("*-lab", "15213-f26-lab"),
            ("a*b*c", "aXbYc"),
            ("a*b*c", "abbbc"),
            ("*a*", "banana"),
            ("caf\u{e9}-?", "caf\u{e9}-\u{e8}"),
            ("exact", "exact"),
        ];
        for (pattern, name) in yes {
            assert!(glob_matches(pattern, name), "{pattern:?} {name:?}");
        }
        let no = [
            ("15213-f26-*", "15213-s26-datalab"),
            ("15213-f26-*", "15213-f26"),
            ("lab?", "lab"),
            ("lab?", "lab12"),
            ("a*b*c", "aXbY"),
            ("exact", "exactly"),
            ("exact", "Exact"),
            ("", "x"),
        ];
        for (pattern, name) in no {
            assert!(!glob_matches(pattern, name), "{pattern:?} {name:?}");
        }
        // Many stars against a long name that fails at the end: bounded.
        let name = "a".repeat(255);
        assert!(!glob_matches(
            &"*a".repeat(100).replace("*a*a", "*a*b"),
            &name
        ));
    }

    fn policy(name: &str, weight: u32, max_running: Option<usize>) -> CourselabPolicy {
        CourselabPolicy {
            name: name.into(),
            weight,
            max_running,
        }
    }

    #[test]
    fn the_first_matching_entry_applies() {
        let config = EngineConfig {
            courselabs: vec![
                policy("15213-f26-bomblab", 1, Some(2)),
                policy("15213-f26-*", 3, None),
                policy("*", 2, Some(10)),
            ],
            ..EngineConfig::default()
        };
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.courselab_policy("15213-f26-bomblab"), (1, Some(2)));
        assert_eq!(config.courselab_policy("15213-f26-datalab"), (3, None));
        assert_eq!(config.courselab_policy("15122-f26-lab"), (2, Some(10)));
        assert_eq!(EngineConfig::default().courselab_policy("x"), (1, None));
    }

    #[test]
    fn mistakes_are_refused_with_the_fix() {
        let with = |p: CourselabPolicy| EngineConfig {
            courselabs: vec![p],
            ..EngineConfig::default()
        };
        let err = with(policy("a-*", 0, None)).validate().unwrap_err();
        assert!(matches!(err, ConfigError::Weight { .. }));
        assert!(err.to_string().contains("weight = 0") && err.to_string().contains("\"a-*\""));
        assert!(with(policy("a", MAX_COURSELAB_WEIGHT + 1, None))
            .validate()
            .is_err());
        assert!(with(policy("a", MAX_COURSELAB_WEIGHT, None))
            .validate()
            .is_ok());
        let err = with(policy("a", 1, Some(0))).validate().unwrap_err();
        assert!(err.to_string().contains("max_running = 0"), "{err}");
        for bad in [
            "",
            "lab[12]",
            "lab{1,2}",
            "key/lab",
            "a\nb",
            &"x".repeat(256),
        ] {
            let err = with(policy(bad, 1, None)).validate().unwrap_err();
            assert!(matches!(err, ConfigError::Pattern { .. }), "{bad:?}");
            assert!(err.to_string().contains("`*` for any run"), "{err}");
        }
        let twice = EngineConfig {
            courselabs: vec![policy("a*", 1, None), policy("a*", 2, None)],
            ..EngineConfig::default()
        };
        assert!(matches!(
            twice.validate(),
            Err(ConfigError::Duplicate { .. })
        ));
        let zero = EngineConfig {
            max_queued_per_submitter: Some(0),
            ..EngineConfig::default()
        };
        assert_eq!(zero.validate(), Err(ConfigError::MaxQueued));
    }

    #[test]
    fn policies_read_with_defaults() {
        let p: CourselabPolicy = serde_json::from_str(r#"{"name": "15213-*"}"#).unwrap();
        assert_eq!(p, policy("15213-*", 1, None));
        let s: Scheduling = serde_json::from_str(r#""fifo""#).unwrap();
        assert_eq!(s, Scheduling::Fifo);
        assert_eq!(Scheduling::default(), Scheduling::Fair);
        assert!(serde_json::from_str::<CourselabPolicy>(r#"{"name": "a", "wieght": 2}"#).is_err());
    }
}
