//! Crash and stop tests against a real tangod on the sandbox backend:
//! `kill -9` with a queue of 200 jobs, and a graceful SIGTERM.

mod common;

use common::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_with_200_jobs_loses_none() {
    if !root_or_skip("kill9_with_200_jobs_loses_none") {
        return;
    }
    kill9_with_200_jobs("sandbox", "host").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_with_200_jobs_loses_none_in_docker() {
    if !docker_or_skip("kill9_with_200_jobs_loses_none_in_docker") {
        return;
    }
    kill9_with_200_jobs("docker", DOCKER_TEST_IMAGE).await;
}

async fn kill9_with_200_jobs(vmms: &str, image: &str) {
    const JOBS: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Tangod::start(
        &dir.path().join("data"),
        &format!("vmms = \"{vmms}\"\n[engine]\nmax_vms = 4\n"),
    );
    let c = server.client();
    let receiver = Receiver::start().await;
    c.open("lab").await;
    // Each job prints a line unique to it, so outputs cannot be mixed up.
    c.upload("lab", "Makefile", b"all:\n\t@sleep 0.05\n\t@cat id.txt\n")
        .await;
    let mut ids = HashMap::new();
    for i in 0..JOBS {
        let name = format!("id{i}.txt");
        c.upload("lab", &name, format!("this is job {i}\n").as_bytes())
            .await;
        let mut body = job(
            &format!("job{i}"),
            &format!("out{i}"),
            Some(&receiver.url_for(&format!("j{i}"))),
            30,
        );
        body["image"] = image.into();
        body["files"] = serde_json::json!([
            {"localFile": "Makefile", "destFile": "Makefile"},
            {"localFile": name, "destFile": "id.txt"},
        ]);
        let v = c.add_job("lab", &body).await;
        assert_eq!(v["statusMsg"], "Job added", "{v}");
        ids.insert(i, v["jobId"].as_str().unwrap().to_string());
    }
    // Crash while part of the queue is done, part running, part waiting.
    receiver.wait_for(10, Duration::from_secs(60)).await;
    server.kill9();
    let before_restart = receiver.count();
    assert!(
        before_restart < JOBS,
        "all jobs ended before the crash; nothing was tested"
    );
    server.restart();

    receiver.wait_for(JOBS, Duration::from_secs(240)).await;
    // Late duplicates (deliveries in flight at the crash) settle first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut duplicates = 0;
    for i in 0..JOBS {
        let got = receiver.get(&format!("j{i}"));
        assert!(!got.is_empty(), "job {i} never called back");
        duplicates += got.len() - 1;
        let body = String::from_utf8_lossy(&got.last().unwrap().body).into_owned();
        assert!(
            body.contains(&format!("Received job job{i}:{}", ids[&i])),
            "{body}"
        );
        assert!(
            body.contains("Success: Autodriver returned normally"),
            "job {i}: {body}"
        );
        assert!(
            body.ends_with(&format!("this is job {i}\n")),
            "job {i}: {body}"
        );
        let polled = c
            .poll("lab", &format!("out{i}"))
            .await
            .expect("output file");
        assert_eq!(polled, got.last().unwrap().body);
    }
    // Only deliveries in flight at the moment of the crash may repeat.
    assert!(duplicates <= 40, "{duplicates} duplicate callbacks");
    let v = c.get(&format!("/jobs/{KEY}/0/")).await;
    assert_eq!(
        v["jobs"].as_array().unwrap().len(),
        0,
        "jobs still live: {v}"
    );
    // No VM of the first run is left: only the reusable ones of this run.
    let v = c.get(&format!("/pool/{KEY}/{image}/")).await;
    let owned: Vec<String> = v["pools"][image]["total"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| format!("{}-{}-{image}", server.prefix, id))
        .collect();
    for name in leftover_vms(vmms, &server.prefix, &server.data_dir) {
        assert!(
            owned.contains(&name),
            "leftover VM {name} (owned: {owned:?})"
        );
    }
    eprintln!(
        "crash test ({vmms}): {before_restart} callbacks before the crash, {duplicates} duplicates"
    );
    stop_leaving_no_vms(server, vmms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_gracefully_and_the_next_start_resumes() {
    if !root_or_skip("sigterm_stops_gracefully_and_the_next_start_resumes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut server = Tangod::start(
        &dir.path().join("data"),
        "[engine]\nmax_vms = 2\nshutdown_grace_secs = 1\n",
    );
    let c = server.client();
    let receiver = Receiver::start().await;
    c.open("lab").await;
    c.upload("lab", "Makefile", b"all:\n\t@sleep 2\n\t@echo finished\n")
        .await;
    for i in 0..4 {
        let v = c
            .add_job(
                "lab",
                &job(
                    &format!("g{i}"),
                    &format!("g{i}"),
                    Some(&receiver.url_for(&format!("g{i}"))),
                    30,
                ),
            )
            .await;
        assert_eq!(v["statusMsg"], "Job added");
    }
    // Let two jobs start, then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopping = Instant::now();
    let status = server.sigterm();
    assert!(status.success(), "tangod exited with {status}");
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "stop took {:?}",
        stopping.elapsed()
    );
    // Jobs still running after the grace period were stopped and their
    // sandboxes removed: nothing keeps running without the server.
    assert_eq!(
        leftover_vms("sandbox", &server.prefix, &server.data_dir),
        Vec::<String>::new()
    );
    server.restart();
    receiver.wait_for(4, Duration::from_secs(60)).await;
    for i in 0..4 {
        let body = String::from_utf8_lossy(&receiver.get(&format!("g{i}"))[0].body).into_owned();
        assert!(body.contains("finished"), "{body}");
    }
}
