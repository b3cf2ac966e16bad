//! Helpers shared by the autodriver integration tests. They run the real
//! binary as root with throw-away numeric uids (one per test, so parallel
//! tests never kill each other's processes).

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_autodriver");

/// True when the tests can run; prints why not otherwise.
pub fn root_or_skip(test: &str) -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip(&format!(
        "{test}: the autodriver tests must run as root (they switch uids)"
    ));
    false
}

/// Says loudly that a test was skipped: written straight to stderr, which
/// the test harness does not capture (it only captures `eprintln!`).
pub fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {why}");
}

pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    /// A world-traversable scratch directory holding `job/` with the given
    /// files, and room for the home.
    pub fn with_job(files: &[(&str, &str)]) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("autodriver-test-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let job = dir.path().join("job");
        std::fs::create_dir(&job).unwrap();
        for (name, content) in files {
            std::fs::write(job.join(name), content).unwrap();
        }
        Scratch { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn job(&self) -> PathBuf {
        self.path().join("job")
    }

    pub fn home(&self) -> PathBuf {
        self.path().join("home")
    }
}

pub struct Outcome {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn first_line(&self) -> String {
        self.text().lines().next().unwrap_or_default().to_string()
    }
}

/// Runs the driver on the scratch job as `uid`, with the scratch home.
pub fn run(scratch: &Scratch, uid: u32, args: &[&str]) -> Outcome {
    let home = scratch.home();
    let user = uid.to_string();
    let mut all: Vec<&str> = vec!["--user", &user, "--home", home.to_str().unwrap()];
    all.extend_from_slice(args);
    let job = scratch.job();
    all.push(job.to_str().unwrap());
    run_raw(&all)
}

pub fn run_raw(args: &[&str]) -> Outcome {
    let started = Instant::now();
    let output = Command::new(BIN)
        .args(args)
        .output()
        .expect("autodriver runs");
    Outcome {
        code: output.status.code().unwrap_or(-1),
        stdout: output.stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

/// Live (non-zombie) processes whose real, effective or saved uid is `uid`.
pub fn processes_of(uid: u32) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let zombie = status
            .lines()
            .any(|l| l.starts_with("State:") && (l.contains("Z (") || l.contains("X (")));
        let mine = status.lines().any(|l| {
            l.starts_with("Uid:")
                && l.split_whitespace()
                    .skip(1)
                    .take(3)
                    .any(|id| id == uid.to_string())
        });
        if mine && !zombie {
            let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            found.push(format!("{pid}: {}", cmd.replace('\0', " ")));
        }
    }
    found
}

pub fn read_summary(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("summary written");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {text}"))
}
