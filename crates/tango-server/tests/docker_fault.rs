//! The Docker daemon stopped in the middle of a batch and started again:
//! every job finishes, none is lost, no container is left. This stops the
//! machine's dockerd, so it runs only with TANGO_TEST_DOCKER_RESTART set
//! (CI sets it) and is a test binary of its own (cargo runs test binaries
//! one after another).

mod common;

use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

const PID_FILE: &str = "/var/run/docker.pid";

fn dockerd_pid() -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(PID_FILE)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    std::path::Path::new(&format!("/proc/{pid}"))
        .exists()
        .then_some(pid)
}

fn docker_answers() -> bool {
    Command::new("docker")
        .arg("info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Brings dockerd back with the command line it had, even if the test fails.
struct Dockerd {
    command: Vec<String>,
}

impl Dockerd {
    fn stop() -> Dockerd {
        let pid = dockerd_pid().expect("dockerd runs");
        let command: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap()
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        while dockerd_pid().is_some() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "dockerd did not stop"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Dockerd { command }
    }

    fn start(&self) {
        if dockerd_pid().is_some() {
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
        Command::new("sh")
            .args(["-c", &script])
            .status()
            .expect("start dockerd");
        let start = Instant::now();
        while !docker_answers() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "dockerd did not come back"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.start();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_restart_mid_batch_loses_no_job() {
    if !docker_or_skip("dockerd_restart_mid_batch_loses_no_job") {
        return;
    }
    if std::env::var_os("TANGO_TEST_DOCKER_RESTART").is_none() {
        eprintln!("SKIPPED dockerd_restart_mid_batch_loses_no_job: it stops dockerd; set TANGO_TEST_DOCKER_RESTART=1");
        return;
    }
    const JOBS: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let server = Tangod::start(
        &dir.path().join("data"),
        "vmms = \"docker\"\n[engine]\nmax_vms = 4\n[engine.timeouts]\ninitialize_secs = 30\nwait_secs = 20\n",
    );
    let c = server.client();
    let receiver = Receiver::start().await;
    c.open("lab").await;
    c.upload("lab", "Makefile", b"all:\n\t@sleep 1\n\t@echo survived\n")
        .await;
    for i in 0..JOBS {
        let mut body = job(
            &format!("d{i}"),
            &format!("d{i}"),
            Some(&receiver.url_for(&format!("d{i}"))),
            60,
        );
        body["image"] = DOCKER_TEST_IMAGE.into();
        let v = c.add_job("lab", &body).await;
        assert_eq!(v["statusMsg"], "Job added", "{v}");
    }
    receiver.wait_for(2, Duration::from_secs(120)).await;
    let daemon = Dockerd::stop();
    let during = receiver.count();
    tokio::time::sleep(Duration::from_secs(5)).await;
    daemon.start();
    receiver.wait_for(JOBS, Duration::from_secs(300)).await;
    assert!(
        during < JOBS,
        "the batch ended before the daemon stopped; nothing was tested"
    );
    for i in 0..JOBS {
        let got = receiver.get(&format!("d{i}"));
        let body = String::from_utf8_lossy(&got.last().unwrap().body).into_owned();
        assert!(
            body.contains("Success: Autodriver returned normally") && body.contains("survived"),
            "job {i}: {body}"
        );
    }
    stop_leaving_no_vms(server, "docker");
}
