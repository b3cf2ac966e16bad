//! The docker backend while dockerd goes away and comes back. This test
//! stops the daemon, so it is a test binary of its own (cargo runs test
//! binaries one after another) and runs only when TANGO_TEST_DOCKER_RESTART
//! is set: it would disturb anything else using the daemon. It restarts the
//! daemon with the command line it had (by its pid file), logging to
//! /var/log/dockerd.log, and makes sure the daemon is back even if it fails.
#![cfg(feature = "docker")]

#[path = "docker_common.rs"]
mod common;

use common::{machine, request, require_docker, BOOKWORM};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tango_core::vmms::{RunStatus, Vmms};
use tango_vmms::docker::Docker;

const PID_FILE: &str = "/var/run/docker.pid";

fn daemon_pid() -> Option<i32> {
    std::fs::read_to_string(PID_FILE).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// dockerd's command line, to start it again the same way.
fn command_line(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|arg| !arg.is_empty())
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Starts dockerd detached from the test (its own session), unless running.
struct DaemonRestarter {
    command: Vec<String>,
    pid: i32,
}

impl DaemonRestarter {
    fn start(&self) {
        if daemon_pid().is_some_and(alive) {
            return;
        }
        let quoted: Vec<String> = self
            .command
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
            .collect();
        let script = format!(
            "setsid {} >>/var/log/dockerd.log 2>&1 </dev/null &",
            quoted.join(" ")
        );
        let status = Command::new("sh").args(["-c", &script]).status();
        assert!(status.is_ok_and(|s| s.success()), "cannot start dockerd");
    }
}

impl Drop for DaemonRestarter {
    fn drop(&mut self) {
        // Never leave the machine without its daemon, whatever failed.
        unsafe { libc::kill(self.pid, libc::SIGCONT) };
        self.start();
    }
}

async fn wait_until_up(docker: &Docker, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if docker.api().ping().await.is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "dockerd did not come back");
        // Nothing to wait on but the socket answering.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_restart_mid_job() {
    require_docker!();
    if std::env::var_os("TANGO_TEST_DOCKER_RESTART").is_none() {
        eprintln!(
            "skipping: set TANGO_TEST_DOCKER_RESTART=1 to let this test stop and restart dockerd"
        );
        return;
    }
    let Some(pid) = daemon_pid().filter(|&pid| alive(pid)) else {
        eprintln!("skipping: no running dockerd in {PID_FILE}");
        return;
    };
    let restarter = DaemonRestarter {
        command: command_line(pid),
        pid,
    };
    assert!(!restarter.command.is_empty());

    let work = tempfile::tempdir().unwrap();
    let mut config = common::config(work.path());
    config.api_timeout = Duration::from_secs(5);
    common::ensure_test_images();
    let docker = std::sync::Arc::new(Docker::connect(config).await.unwrap());
    let prefix = common::prefix("restart");
    common::clean(&docker, &prefix).await;

    // A daemon that hangs: calls give up after the API timeout.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let started = Instant::now();
    let frozen = docker.get_vms(&prefix).await;
    let waited = started.elapsed();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    assert!(frozen.is_err(), "{frozen:?}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    eprintln!(
        "a frozen daemon: get_vms failed after {waited:?}: {:?}",
        frozen.err()
    );
    assert!(docker.get_vms(&prefix).await.unwrap().is_empty());

    let busy = machine(&prefix, 1, BOOKWORM);
    docker.initialize_vm(&busy).await.unwrap();
    docker
        .copy_in(
            &busy,
            &common::inputs(
                work.path(),
                &[("Makefile", "all:\n\t@echo running\n\t@sleep 60\n")],
            ),
        )
        .await
        .unwrap();
    let running = {
        let docker = docker.clone();
        let busy = busy.clone();
        tokio::spawn(async move { docker.run_job(&busy, &request(1, 120)).await })
    };
    // Let the job start before pulling the daemon away.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!running.is_finished());

    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let stop_deadline = Instant::now() + Duration::from_secs(60);
    while alive(pid) {
        assert!(Instant::now() < stop_deadline, "dockerd did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The running job ends promptly, and not as a success.
    let outcome = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("run_job returns once the daemon is gone")
        .unwrap();
    match outcome {
        Err(e) => eprintln!("run_job failed as expected: {e}"),
        Ok(o) => assert_ne!(o.status, RunStatus::Completed, "{o:?}"),
    }

    // While the daemon is away, calls fail quickly and cleanly.
    let fresh = machine(&prefix, 2, BOOKWORM);
    let started = Instant::now();
    assert!(docker.exists_vm(&busy).await.is_err());
    assert!(docker.get_vms(&prefix).await.is_err());
    assert!(docker.initialize_vm(&fresh).await.is_err());
    assert!(docker.get_images().await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let unreachable = Docker::connect(common::config(work.path())).await;
    match unreachable {
        Err(e) => assert!(e.to_string().contains("Docker daemon"), "{e}"),
        Ok(_) => panic!("connect succeeded without a daemon"),
    }

    restarter.start();
    wait_until_up(&docker, Duration::from_secs(60)).await;

    // The container of the interrupted job is still known by its labels; it
    // is not usable, and destroying it leaves nothing.
    let left = docker.get_vms(&prefix).await.unwrap();
    assert_eq!(left, vec![busy.clone()]);
    assert!(docker.wait_vm(&busy, Duration::from_secs(2)).await.is_err());
    for vm in &left {
        docker.safe_destroy_vm(vm).await.unwrap();
    }
    assert!(docker.get_vms(&prefix).await.unwrap().is_empty());

    // The same backend instance works again.
    let (outcome, output) = common::run_once(
        &docker,
        &fresh,
        work.path(),
        &[("Makefile", "all:\n\t@echo back\n")],
        &request(2, 20),
    )
    .await;
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert!(output.contains("back"), "{output}");
    docker.safe_destroy_vm(&fresh).await.unwrap();
    assert!(docker.get_vms(&prefix).await.unwrap().is_empty());
}
