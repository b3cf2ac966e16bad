//! The test infrastructure of extra Docker engines (tests/support/engines.rs)
//! against the real thing: a TLS engine in its own network namespace
//! answers over mutual TLS, runs the test image, survives `kill -9` and a
//! restart, and leaves no process behind; the default engine keeps working.
#![cfg(feature = "docker")]

#[path = "docker_common.rs"]
mod common;
#[path = "support/engines.rs"]
mod engines;

use common::{require_docker, BOOKWORM, BUSYBOX};
use engines::{Engine, EngineOptions};
use std::process::Command;

fn docker_ok(args: &[&str]) -> (bool, String) {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Processes whose command line mentions `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
            .is_none()
        {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&raw).replace('\0', " ");
        if line.contains(needle) {
            found.push(format!("{}: {line}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

async fn tls_client(engine: &Engine) -> bollard::Docker {
    let tls = engine.tls.as_ref().expect("a TLS engine has TLS files");
    bollard::Docker::connect_with_ssl(
        &engine.url,
        &tls.key,
        &tls.cert,
        &tls.ca,
        20,
        bollard::API_DEFAULT_VERSION,
    )
    .expect("a TLS client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_engine_runs_survives_kill9_and_leaves_nothing() {
    require_docker!();
    common::ensure_test_images();
    let name = "tango-e3";
    let mut engine = tokio::task::spawn_blocking(move || {
        Engine::start(EngineOptions {
            name: name.into(),
            tls: true,
        })
    })
    .await
    .expect("join")
    .expect("the TLS engine starts");
    assert!(engine.url.starts_with("tcp://127.0.0.1:"), "{}", engine.url);
    let socket = format!("unix://{}", engine.socket.display());
    // The data root outlives runs: a failed one may have left these.
    docker_ok(&["-H", &socket, "rm", "-f", "e3-sleeper", "e3-orphan"]);

    // Mutual TLS: with the client certificate it answers ...
    let client = tls_client(&engine).await;
    let info = client.info().await.expect("info over TLS");
    assert!(info.server_version.is_some(), "{info:?}");
    // ... and without one it refuses.
    let plain = bollard::Docker::connect_with_http(
        &engine.url.replacen("tcp://", "http://", 1),
        5,
        bollard::API_DEFAULT_VERSION,
    )
    .expect("a plain client");
    assert!(
        plain.ping().await.is_err(),
        "the engine answered without TLS"
    );

    // BUSYBOX (2 MB) is removed first, so that a load really happens; the
    // big one is loaded once per machine and kept in the data root.
    docker_ok(&["-H", &socket, "rmi", "-f", BUSYBOX]);
    engine
        .ensure_images(&[BOOKWORM, BUSYBOX])
        .expect("the test images move");
    let (ok, out) = docker_ok(&["-H", &socket, "image", "inspect", BUSYBOX]);
    assert!(ok, "{out}");
    let (ok, out) = docker_ok(&[
        "-H",
        &socket,
        "run",
        "--rm",
        "--network",
        "none",
        BOOKWORM,
        "echo",
        "inside",
    ]);
    assert!(ok && out.contains("inside"), "{out}");
    // Its own network namespace: the host's docker0 is untouched, so the
    // default engine still runs containers with a network.
    let (ok, out) = docker_ok(&["run", "--rm", BOOKWORM, "true"]);
    assert!(ok, "the default engine broke: {out}");

    // A container running when dockerd is killed.
    let (ok, out) = docker_ok(&[
        "-H",
        &socket,
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        "e3-sleeper",
        BOOKWORM,
        "sleep",
        "600",
    ]);
    assert!(ok, "{out}");
    engine.kill9();
    assert!(
        processes_with(&format!("--host {socket}")).is_empty(),
        "dockerd still runs after kill9"
    );
    assert!(tls_client(&engine).await.ping().await.is_err());
    engine.restart().expect("the engine restarts after kill -9");
    // Same URL and certificates as before.
    let client = tls_client(&engine).await;
    client
        .ping()
        .await
        .expect("ping over TLS after the restart");
    assert!(engine.container_names().contains(&"e3-sleeper".to_string()));
    let (ok, out) = docker_ok(&["-H", &socket, "rm", "-f", "e3-sleeper"]);
    assert!(ok, "{out}");

    // A second kill leaves a running container's shim behind; Drop must
    // stop it too.
    let (ok, out) = docker_ok(&[
        "-H",
        &socket,
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        "e3-orphan",
        BOOKWORM,
        "sleep",
        "600",
    ]);
    assert!(ok, "{out}");
    engine.kill9();
    assert!(
        !processes_with("/run/tango-e3-exec/containerd/").is_empty(),
        "the shim of the running container died with dockerd: this test proves nothing"
    );
    drop(engine);

    for needle in [
        "/run/tango-e3.sock",
        "/run/tango-e3-exec/",
        "/run/netns/tango-e3",
    ] {
        let left = processes_with(needle);
        assert!(left.is_empty(), "left running: {left:?}");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let left: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains("/run/tango-e3-exec") || l.contains("/engines/tango-e3/"))
        .collect();
    assert!(left.is_empty(), "mounts left: {left:#?}");
    assert!(!std::path::Path::new("/run/netns/tango-e3").exists());
    assert!(!std::path::Path::new("/run/tango-e3.sock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_run_does_not_break_the_next() {
    require_docker!();
    let start = || {
        Engine::start(EngineOptions {
            name: "tango-e4".into(),
            tls: false,
        })
    };
    let first = tokio::task::spawn_blocking(start)
        .await
        .expect("join")
        .expect("the engine starts");
    assert_eq!(first.url, "unix:///run/tango-e4.sock");
    // As if the test process died: nothing is stopped.
    std::mem::forget(first);
    let second = tokio::task::spawn_blocking(start)
        .await
        .expect("join")
        .expect("the engine starts over what the first left");
    // Answers (container_names panics otherwise).
    second.container_names();
    let running = processes_with("--host unix:///run/tango-e4.sock");
    assert_eq!(running.len(), 1, "one dockerd, the new one: {running:?}");
    drop(second);
    assert!(processes_with("/run/tango-e4").is_empty());
}
