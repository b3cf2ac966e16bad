//! Test harness: a real `tangod` (TANGOD_BIN, or built into this target
//! directory) on the sandbox backend, and the `tango` binary pointed at it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub const KEY: &str = "clitestkey";

/// The image jobs run in: the host's own root (has sh, make, python3), or
/// TANGO_TEST_IMAGE.
pub fn test_image() -> String {
    std::env::var("TANGO_TEST_IMAGE").unwrap_or_else(|_| "host".to_string())
}

/// The sandbox backend needs root (namespaces, cgroups); CI has it.
pub fn root_or_skip(test: &str) -> bool {
    if unsafe { libc::geteuid() } == 0 {
        true
    } else {
        eprintln!("SKIPPED {test}: tangod's sandbox backend needs root");
        false
    }
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The target directory and profile this test binary was built in
/// (`<target>/<profile>/tango`).
fn target_and_profile() -> (PathBuf, String) {
    let tango = PathBuf::from(env!("CARGO_BIN_EXE_tango"));
    let profile_dir = tango.parent().expect("tango has a directory");
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_string();
    let target = profile_dir
        .parent()
        .expect("profile dir has a parent")
        .to_path_buf();
    (target, profile)
}

fn cargo_build(args: &[&str]) {
    let (target, _) = target_and_profile();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let output = Command::new(cargo)
        .arg("build")
        .args(args)
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(workspace_root())
        .output()
        .expect("run cargo build");
    assert!(
        output.status.success(),
        "cargo build {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// tangod: $TANGOD_BIN, else `cargo build -p tango-server` into this
/// target directory and profile.
pub fn tangod_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("TANGOD_BIN") {
            return PathBuf::from(bin);
        }
        let (target, profile) = target_and_profile();
        let mut args = vec!["-p", "tango-server", "--bin", "tangod"];
        if profile == "release" {
            args.push("--release");
        }
        cargo_build(&args);
        target.join(profile).join("tangod")
    })
    .clone()
}

/// The static autodriver: $TANGO_AUTODRIVER, else built for musl into this
/// target directory.
pub fn autodriver_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("TANGO_AUTODRIVER") {
            return PathBuf::from(bin);
        }
        let (target, _) = target_and_profile();
        cargo_build(&[
            "-p",
            "autodriver",
            "--release",
            "--target",
            "x86_64-unknown-linux-musl",
        ]);
        target.join("x86_64-unknown-linux-musl/release/autodriver")
    })
    .clone()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running tangod with a private data directory; stopped (SIGTERM, so
/// it removes its sandboxes) when dropped.
pub struct Tangod {
    child: Option<Child>,
    pub url: String,
    pub dir: tempfile::TempDir,
    log: Arc<Mutex<String>>,
}

impl Tangod {
    pub fn start() -> Tangod {
        Self::start_with("sandbox")
    }

    pub fn start_with(vmms: &str) -> Tangod {
        static SERVERS: AtomicUsize = AtomicUsize::new(0);
        let n = SERVERS.fetch_add(1, Ordering::Relaxed);
        let dir = tempfile::tempdir().expect("tempdir");
        // Servers sweep away VMs of their prefix that they do not own, so
        // each test server gets its own.
        let prefix = format!("cli{}x{n}", std::process::id());
        let config = dir.path().join("tangod.toml");
        std::fs::write(
            &config,
            format!("[engine]\nprefix = \"{prefix}\"\nshutdown_grace_secs = 2\n"),
        )
        .expect("write tangod config");
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let mut child = Command::new(tangod_bin())
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--vmms")
            .arg(vmms)
            .arg("--key")
            .arg(KEY)
            .arg("--autodriver")
            .arg(autodriver_bin())
            .arg("--config")
            .arg(&config)
            .arg("--log-format")
            .arg("json")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tangod");
        // tangod logs "tangod serving" (to stderr) once it listens: wait
        // for that line, or for its stderr to close, which means it died.
        // Keep stdout too (--print-config and the like write there).
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stdout_log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(mut log) = stdout_log.lock() {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let log_writer = log.clone();
        std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("tangod serving") {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(true);
                    }
                }
                if let Ok(mut log) = log_writer.lock() {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
            if let Some(tx) = ready {
                let _ = tx.send(false);
            }
        });
        let started = ready_rx.recv_timeout(Duration::from_secs(30));
        let server = Tangod {
            child: Some(child),
            url,
            dir,
            log,
        };
        match started {
            Ok(true) => server,
            Ok(false) => panic!("tangod exited at start:\n{}", server.log()),
            Err(_) => panic!("tangod did not start within 30 s:\n{}", server.log()),
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// `tango` with this server's URL and key in the environment, run from
    /// the workspace root (so `examples/jobs/...` resolves), and no user
    /// config file.
    pub fn tango(&self) -> assert_cmd::Command {
        let mut cmd = tango();
        cmd.env("TANGO_URL", &self.url)
            .env("TANGO_KEY", KEY)
            .env("TANGO_IMAGE", test_image());
        cmd
    }
}

/// `tango` with a clean environment: no TANGO_* variables, a HOME without
/// a config file.
pub fn tango() -> assert_cmd::Command {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    let home = HOME.get_or_init(|| tempfile::tempdir().expect("tempdir"));
    let mut cmd = assert_cmd::Command::new(env!("CARGO_BIN_EXE_tango"));
    for var in [
        "TANGO_URL",
        "TANGO_KEY",
        "TANGO_CONFIG",
        "TANGO_IMAGE",
        "TANGO_EXAMPLES",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME")
        .current_dir(workspace_root())
        .timeout(Duration::from_secs(180));
    cmd
}

impl Drop for Tangod {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as i32;
        // SIGTERM so tangod stops its jobs and removes its sandboxes; wait
        // for the exit on another thread, and SIGKILL if it takes too long.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let (done_tx, done_rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = child.wait();
            let _ = done_tx.send(());
        });
        if done_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            eprintln!("tangod (pid {pid}) did not stop within 20 s of SIGTERM; killing it");
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = waiter.join();
    }
}

/// Parses a command's standard output as JSON.
pub fn stdout_json(output: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

pub fn md5_hex(path: &Path) -> String {
    use md5::{Digest, Md5};
    hex::encode(Md5::digest(std::fs::read(path).expect("read file")))
}

pub fn example(name: &str) -> PathBuf {
    workspace_root().join("examples/jobs").join(name)
}
