//! A real image registry for the tests of pulls (issue 19): Debian's
//! `docker-registry` (the CNCF distribution registry) serving plain HTTP on
//! 127.0.0.1, which the default engine (in the host's network namespace)
//! takes as an insecure-allowed registry without any daemon setting. Its
//! storage is a temporary directory; the process is killed when the
//! [`Registry`] drops.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The registry's program (Debian package `docker-registry`).
pub const PROGRAM: &str = "docker-registry";

/// How long the registry gets to listen after it starts.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// Why no registry can run here, if none can.
pub fn skip_reason() -> Option<String> {
    let found = Command::new(PROGRAM)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    (!found).then(|| format!("no {PROGRAM} (apt-get install docker-registry)"))
}

pub struct Registry {
    /// `127.0.0.1:PORT`, as `[docker] registry` takes it.
    pub address: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry on a free port of the loopback and waits until it
    /// takes connections.
    pub fn start() -> Result<Registry, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        // The port is free now; the registry takes it a moment later.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let address = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        let storage = dir.path().join("data");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    \
                 rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {address}\n",
                storage.display()
            ),
        )
        .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        let log = std::fs::File::create(dir.path().join("log"))
            .map_err(|e| format!("cannot make the registry's log: {e}"))?;
        let child = Command::new(PROGRAM)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {PROGRAM}: {e}"))?;
        let mut registry = Registry {
            address,
            child,
            dir,
        };
        registry.wait_ready()?;
        Ok(registry)
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let addr: SocketAddr = self.address.parse().map_err(|e| format!("{e}"))?;
        let deadline = Instant::now() + READY_WITHIN;
        // A process start has no event to wait on: try its port.
        while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("{PROGRAM} exited ({status}): {}", self.log()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{PROGRAM} does not listen on {} after {READY_WITHIN:?}: {}",
                    self.address,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    /// Pushes `image` (`NAME:TAG` of the default engine) as `as_name` with
    /// the docker CLI, leaving no registry-named tag behind.
    pub fn push(&self, image: &str, as_name: &str) -> Result<(), String> {
        let remote = format!("{}/{as_name}", self.address);
        docker(&["tag", image, &remote])?;
        let pushed = docker(&["push", &remote]);
        let untagged = docker(&["rmi", &remote]);
        pushed.and(untagged)
    }

    /// Stops the registry (it answers nothing after this).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn docker(args: &[&str]) -> Result<(), String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
