//! Killing every process of the grading uid.
//!
//! Two complementary means: a short-lived helper that becomes the uid and
//! calls `kill(-1, SIGKILL)` (the kernel signals every process the uid may
//! signal in one pass under the task list lock, and a task with a fatal
//! signal pending cannot fork, so a fork bomb cannot outrun it), then a scan
//! of /proc for any process whose real, effective or saved uid is the
//! grading uid (a set-uid program the job started, for instance), repeated
//! until a scan finds none.

use std::io;
use std::time::{Duration, Instant};

/// How long the driver keeps trying before it declares the machine damaged.
const SWEEP_DEADLINE: Duration = Duration::from_secs(30);
/// Pause between rounds: killed processes need a moment to exit and there is
/// no event to wait for on processes that are not our children.
const ROUND_PAUSE: Duration = Duration::from_millis(5);

/// Forks a helper that drops to `uid`/`gid` and signals every process it
/// may signal. The helper never runs user code.
fn kill_all_as_user(uid: u32, gid: u32) -> io::Result<()> {
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // Child: only async-signal-safe calls from here on.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                libc::_exit(1);
            }
            libc::kill(-1, libc::SIGKILL);
            libc::_exit(0);
        }
    }
    let mut status = 0;
    crate::sys::retry(|| unsafe { libc::waitpid(pid, &mut status, 0) })?;
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else {
        Err(io::Error::other(
            "the kill helper could not become the grading user",
        ))
    }
}

/// Does a `/proc/<pid>/status` text describe a live process of `uid`?
fn status_matches(status: &str, uid: u32) -> bool {
    let mut live = true;
    let mut matches = false;
    for line in status.lines() {
        if let Some(state) = line.strip_prefix("State:") {
            // Zombies and dead tasks hold nothing and cannot be killed again.
            let state = state.trim_start();
            live = !(state.starts_with('Z') || state.starts_with('X'));
        } else if let Some(ids) = line.strip_prefix("Uid:") {
            matches = ids
                .split_whitespace()
                .take(3)
                .any(|id| id.parse::<u32>() == Ok(uid));
        }
    }
    live && matches
}

/// Kills the live processes of `uid` found in /proc; returns how many.
/// `Ok(None)` when /proc is not available.
fn scan_and_kill(uid: u32) -> io::Result<Option<usize>> {
    let entries = match std::fs::read_dir("/proc") {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if std::fs::metadata("/proc/self/status").is_err() {
        return Ok(None);
    }
    let me = std::process::id();
    let mut found = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue; // Exited meanwhile.
        };
        if status_matches(&status, uid) {
            found += 1;
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
    Ok(Some(found))
}

/// What a sweep saw.
pub struct SweepReport {
    /// False when /proc was missing, so only `kill(-1)` could be used.
    pub verified: bool,
}

/// Kills every process of `uid` until none is left. `reap` is called every
/// round so that orphans reparented to the driver (a subreaper) are
/// collected.
pub fn sweep(uid: u32, gid: u32, reap: &mut dyn FnMut()) -> io::Result<SweepReport> {
    let started = Instant::now();
    loop {
        match kill_all_as_user(uid, gid) {
            // A fork bomb can fill the job's process limit (a pids cgroup
            // the driver shares), so the helper cannot be forked; the /proc
            // scan below kills by pid without forking and frees the slots.
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
            other => other?,
        }
        reap();
        match scan_and_kill(uid)? {
            None => {
                // No /proc: repeat the kernel-side kill a few times and trust it.
                for _ in 0..3 {
                    std::thread::sleep(ROUND_PAUSE);
                    kill_all_as_user(uid, gid)?;
                    reap();
                }
                return Ok(SweepReport { verified: false });
            }
            Some(0) => {
                // Collect the orphans that finished dying during the scan.
                reap();
                return Ok(SweepReport { verified: true });
            }
            Some(_) if started.elapsed() > SWEEP_DEADLINE => {
                return Err(io::Error::other(format!(
                    "processes of uid {uid} survived {} s of SIGKILL",
                    SWEEP_DEADLINE.as_secs()
                )))
            }
            Some(_) => std::thread::sleep(ROUND_PAUSE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parsing() {
        let live = "Name:\tsh\nState:\tS (sleeping)\nUid:\t64000\t64000\t64000\t64000\n";
        assert!(status_matches(live, 64000));
        assert!(!status_matches(live, 64001));
        let setuid = "State:\tR (running)\nUid:\t64000\t0\t0\t0\n";
        assert!(status_matches(setuid, 64000));
        let zombie = "State:\tZ (zombie)\nUid:\t64000\t64000\t64000\t64000\n";
        assert!(!status_matches(zombie, 64000));
        let fs_only = "State:\tS (sleeping)\nUid:\t1\t1\t1\t64000\n";
        assert!(!status_matches(fs_only, 64000));
    }
}
