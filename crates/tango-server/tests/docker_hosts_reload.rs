//! tangod re-reads `[[docker.hosts]]` on SIGHUP: an added engine (a real
//! extra dockerd, tests/support/engines.rs of tango-vmms) takes jobs, a
//! refused list changes nothing and tangod keeps serving, and a host left
//! out of the list drains and goes, holding none of the server's
//! containers.

mod common;
#[path = "../../tango-vmms/tests/support/engines.rs"]
mod engines;

use common::*;
use engines::{Engine, EngineOptions};
use std::time::{Duration, Instant};

const MAKEFILE: &str = "all:\n\t@echo reloaded job ran\n";

fn hup(server: &Tangod) {
    let pid = server.child.as_ref().expect("tangod runs").id() as i32;
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
}

/// Waits until tangod's log has `needle` `count` times.
async fn wait_log(server: &Tangod, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while server.log().matches(needle).count() < count {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} (x{count}) in the log:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_docker_hosts() {
    if !docker_or_skip("sighup_adds_and_removes_docker_hosts") {
        return;
    }
    let engine = tokio::task::spawn_blocking(|| {
        let engine = Engine::start(EngineOptions {
            name: "tango-f1".into(),
            tls: false,
        })
        .expect("the extra engine starts");
        engine
            .ensure_images(&[DOCKER_TEST_IMAGE])
            .expect("the extra engine gets the test image");
        engine
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Tangod::start(
        &dir.path().join("data"),
        "vmms = \"docker\"\n[docker]\nmemory_mb = 256\nhealth_period_secs = 1\n",
    );
    let config = server.config.clone().unwrap();
    let base = std::fs::read_to_string(&config).unwrap();
    let c = server.client();
    c.open("lab").await;
    c.upload("lab", "Makefile", MAKEFILE.as_bytes()).await;

    // The extra engine is roomier than the local one: the job goes there.
    let two_hosts = format!(
        "{base}\n[[docker.hosts]]\nname = \"local\"\nurl = \"unix:///var/run/docker.sock\"\n\
         max_vms = 1\n[[docker.hosts]]\nname = \"tango-f1\"\nurl = \"{}\"\nmax_vms = 8\n",
        engine.url
    );
    std::fs::write(&config, two_hosts).unwrap();
    hup(&server);
    wait_log(&server, "SIGHUP: docker hosts reloaded", 1).await;
    wait_log(&server, "docker host answers again", 1).await;
    let mut body = job("reloaded", "reloaded.out", None, 60);
    body["image"] = DOCKER_TEST_IMAGE.into();
    c.add_job("lab", &body).await;
    let output = c
        .wait_output("lab", "reloaded.out", Duration::from_secs(60))
        .await;
    assert!(
        String::from_utf8_lossy(&output).contains("reloaded job ran"),
        "{}",
        String::from_utf8_lossy(&output)
    );
    let log = server.log();
    let placed = log
        .lines()
        .find(|l| l.contains("docker: placing the VM"))
        .expect("the placement is logged");
    assert!(placed.contains("host=tango-f1"), "{placed}");

    // A list tangod refuses changes nothing; it keeps serving.
    let refused =
        format!("{base}\n[[docker.hosts]]\nname = \"plain\"\nurl = \"tcp://127.0.0.1:1\"\n");
    std::fs::write(&config, refused).unwrap();
    hup(&server);
    wait_log(&server, "SIGHUP: docker hosts unchanged", 1).await;
    assert!(server.log().contains("root on its machine"));
    let unreadable = format!(
        "{base}\n[[docker.hosts]]\nname = \"tls\"\nurl = \"tcp://127.0.0.1:1\"\n\
         tls_ca = \"/nonexistent/ca.pem\"\ntls_cert = \"/nonexistent/cert.pem\"\n\
         tls_key = \"/nonexistent/key.pem\"\n"
    );
    std::fs::write(&config, unreadable).unwrap();
    hup(&server);
    wait_log(&server, "SIGHUP: docker hosts unchanged", 2).await;
    assert!(server
        .log()
        .contains("tls: cannot read tls_ca /nonexistent/ca.pem"));
    c.open("lab").await;

    // Left out: it drains (the engine drops its idle VM there) and goes.
    std::fs::write(&config, &base).unwrap();
    hup(&server);
    wait_log(&server, "SIGHUP: docker hosts reloaded", 2).await;
    wait_log(&server, "docker host removed from the config is gone", 1).await;
    let left: Vec<String> = tokio::task::spawn_blocking(move || engine.container_names())
        .await
        .unwrap()
        .into_iter()
        .filter(|name| name.starts_with(&server.prefix))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
