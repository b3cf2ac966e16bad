//! `DOCKER_HOST` is honoured: a `tcp://` daemon address works (through a
//! TCP-to-socket relay the test runs), and an unreachable one fails clearly.
//! A test binary of its own because it sets the process's environment.
#![cfg(feature = "docker")]

#[path = "docker_common.rs"]
mod common;

use common::{machine, request, require_docker, BOOKWORM};
use tango_core::vmms::{RunStatus, Vmms};
use tango_vmms::docker::Docker;
use tokio::net::{TcpListener, UnixStream};

/// Relays every TCP connection to the local Docker socket.
async fn relay_to_socket(listener: TcpListener) {
    while let Ok((mut tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            if let Ok(mut unix) = UnixStream::connect("/var/run/docker.sock").await {
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_host_tcp_is_honoured() {
    require_docker!();
    if !std::path::Path::new("/var/run/docker.sock").exists() {
        eprintln!("skipping: the relay needs /var/run/docker.sock");
        return;
    }
    common::ensure_test_images();
    let work = tempfile::tempdir().unwrap();

    // Nothing listens on port 1: a clear error, quickly.
    std::env::set_var("DOCKER_HOST", "tcp://127.0.0.1:1");
    let started = std::time::Instant::now();
    match Docker::connect(common::config(work.path())).await {
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains("cannot reach the Docker daemon at tcp://127.0.0.1:1"),
                "{message}"
            );
        }
        Ok(_) => panic!("connected to nothing"),
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(25));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(relay_to_socket(listener));
    std::env::set_var("DOCKER_HOST", format!("tcp://127.0.0.1:{port}"));
    let docker = Docker::connect(common::config(work.path())).await.unwrap();
    assert!(docker
        .get_images()
        .await
        .unwrap()
        .contains(&BOOKWORM.to_string()));

    // A whole job, exec stream included, over TCP.
    let prefix = common::prefix("tcp");
    common::clean(&docker, &prefix).await;
    let vm = machine(&prefix, 1, BOOKWORM);
    let (outcome, output) = common::run_once(
        &docker,
        &vm,
        work.path(),
        &[("Makefile", "all:\n\t@echo over tcp\n")],
        &request(1, 20),
    )
    .await;
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert!(output.contains("over tcp"), "{output}");
    docker.safe_destroy_vm(&vm).await.unwrap();
    assert!(docker.get_vms(&prefix).await.unwrap().is_empty());
}
