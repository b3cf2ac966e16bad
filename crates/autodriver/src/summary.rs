//! The `--summary` JSON verdict.

use std::fmt::Write as _;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub exit_status: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub wall_ms: u64,
    pub cpu_ms: u64,
    pub peak_rss_kb: u64,
    pub output_bytes_total: u64,
    pub output_bytes_kept: u64,
    pub killed_by: Option<&'static str>,
}

fn opt(value: Option<i32>) -> String {
    value.map_or_else(|| "null".to_string(), |v| v.to_string())
}

impl Summary {
    pub fn to_json(&self) -> String {
        let mut out = String::new();
        let killed_by = self
            .killed_by
            .map_or_else(|| "null".to_string(), |k| format!("\"{k}\""));
        let _ = writeln!(
            out,
            "{{\"exit_status\":{},\"signal\":{},\"timed_out\":{},\"wall_ms\":{},\"cpu_ms\":{},\
             \"peak_rss_kb\":{},\"output_bytes_total\":{},\"output_bytes_kept\":{},\"killed_by\":{}}}",
            opt(self.exit_status),
            opt(self.signal),
            self.timed_out,
            self.wall_ms,
            self.cpu_ms,
            self.peak_rss_kb,
            self.output_bytes_total,
            self.output_bytes_kept,
            killed_by
        );
        out
    }
}

/// Inputs of the best-effort guess at what ended the job.
pub struct Evidence<'a> {
    pub timed_out: bool,
    /// Signal that killed make itself.
    pub signal: Option<i32>,
    pub cpu_limit_ms: Option<u64>,
    pub cpu_ms: u64,
    pub mem_limited: bool,
    /// Whether the OOM-kill counter of the driver's memory cgroup (or of the
    /// system) went up while the job ran; `None` when it cannot be read.
    pub oom_kills_rose: Option<bool>,
    /// The output as kept, where GNU make reports a recipe killed by a
    /// signal as `make: *** [Makefile:N: target] <signal description>`.
    pub output: &'a [u8],
}

/// What GNU make's final `make: *** [Makefile:N: target] <reason>` line
/// says about the recipe that stopped the build: a signal description when
/// the recipe's program was killed directly, or `Error 152` / `Error 153`
/// (128 + SIGXCPU / SIGXFSZ) when a shell reported it.
fn make_failure(output: &[u8]) -> Option<&'static str> {
    let line = output
        .split(|&b| b == b'\n')
        .rev()
        .find(|line| line.starts_with(b"make") && line.windows(5).any(|w| w == b"*** ["))?;
    let line = String::from_utf8_lossy(line);
    let reason = line.rsplit_once("] ")?.1;
    let is = |description: &str, status: i32| {
        reason.starts_with(description) || reason == format!("Error {}", 128 + status)
    };
    if is("File size limit exceeded", libc::SIGXFSZ) {
        Some("file_size_limit")
    } else if is("CPU time limit exceeded", libc::SIGXCPU) {
        Some("cpu_limit")
    } else {
        None
    }
}

pub fn killed_by(e: &Evidence) -> Option<&'static str> {
    if e.timed_out {
        return Some("timeout");
    }
    let oom = e.oom_kills_rose == Some(true);
    match e.signal {
        Some(libc::SIGXCPU) => return Some("cpu_limit"),
        Some(libc::SIGXFSZ) => return Some("file_size_limit"),
        Some(libc::SIGKILL) if oom => return Some("oom"),
        Some(libc::SIGKILL) if e.cpu_limit_ms.is_some_and(|limit| e.cpu_ms >= limit) => {
            return Some("cpu_limit")
        }
        Some(libc::SIGSEGV | libc::SIGABRT | libc::SIGBUS) if e.mem_limited => {
            return Some("memory_limit")
        }
        Some(_) => return Some("signal"),
        None => {}
    }
    // make itself exited: look at what it said about its recipes.
    make_failure(e.output).or(oom.then_some("oom"))
}

fn cgroup_counter(file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == key).then(|| value.trim().parse().ok()).flatten()
    })
}

/// The number of OOM kills seen by the driver's memory cgroup (v2 or v1),
/// else by the whole system.
pub fn oom_kill_count() -> Option<u64> {
    if let Ok(cgroups) = std::fs::read_to_string("/proc/self/cgroup") {
        for line in cgroups.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let found = if controllers.is_empty() {
                cgroup_counter(&format!("/sys/fs/cgroup{path}/memory.events"), "oom_kill")
            } else if controllers.split(',').any(|c| c == "memory") {
                cgroup_counter(
                    &format!("/sys/fs/cgroup/memory{path}/memory.oom_control"),
                    "oom_kill",
                )
            } else {
                None
            };
            if found.is_some() {
                return found;
            }
        }
    }
    cgroup_counter("/proc/vmstat", "oom_kill")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evidence(signal: Option<i32>, output: &[u8]) -> Evidence<'_> {
        Evidence {
            timed_out: false,
            signal,
            cpu_limit_ms: None,
            cpu_ms: 0,
            mem_limited: false,
            oom_kills_rose: Some(false),
            output,
        }
    }

    #[test]
    fn json_shape() {
        let s = Summary {
            exit_status: Some(2),
            signal: None,
            timed_out: false,
            wall_ms: 5,
            cpu_ms: 1,
            peak_rss_kb: 1000,
            output_bytes_total: 10,
            output_bytes_kept: 10,
            killed_by: Some("oom"),
        };
        assert_eq!(
            s.to_json(),
            "{\"exit_status\":2,\"signal\":null,\"timed_out\":false,\"wall_ms\":5,\"cpu_ms\":1,\
             \"peak_rss_kb\":1000,\"output_bytes_total\":10,\"output_bytes_kept\":10,\"killed_by\":\"oom\"}\n"
        );
    }

    #[test]
    fn guesses() {
        assert_eq!(killed_by(&evidence(None, b"ok\n")), None);
        assert_eq!(
            killed_by(&evidence(Some(libc::SIGXCPU), b"")),
            Some("cpu_limit")
        );
        assert_eq!(
            killed_by(&evidence(Some(libc::SIGXFSZ), b"")),
            Some("file_size_limit")
        );
        assert_eq!(
            killed_by(&evidence(Some(libc::SIGKILL), b"")),
            Some("signal")
        );
        let out = b"x\nmake: *** [Makefile:2: all] File size limit exceeded (core dumped)\n";
        assert_eq!(killed_by(&evidence(None, out)), Some("file_size_limit"));
        let out = b"make: *** [Makefile:2: all] CPU time limit exceeded\n";
        assert_eq!(killed_by(&evidence(None, out)), Some("cpu_limit"));
        let out =
            b"make: [Makefile:2: all] Error 153 (ignored)\nmake: *** [Makefile:4: all] Error 153\n";
        assert_eq!(killed_by(&evidence(None, out)), Some("file_size_limit"));
        let out = b"make: *** [Makefile:4: all] Error 152\n";
        assert_eq!(killed_by(&evidence(None, out)), Some("cpu_limit"));
        let out = b"make: [Makefile:2: all] Error 153 (ignored)\nok\n";
        assert_eq!(killed_by(&evidence(None, out)), None);
        let out = b"make: *** [Makefile:4: all] Error 1\n";
        assert_eq!(killed_by(&evidence(None, out)), None);
        let mut e = evidence(Some(libc::SIGKILL), b"");
        e.oom_kills_rose = Some(true);
        assert_eq!(killed_by(&e), Some("oom"));
        e.timed_out = true;
        assert_eq!(killed_by(&e), Some("timeout"));
    }
}
