//! Unit tests of the public API: adding, validating and reading jobs, and shutdown, against the in-memory test VMMS.

use crate::config::EngineConfig;
use crate::engine::test_harness::{config, Harness};
use crate::model::JobState;
use crate::store::Store;
use std::time::Duration;

#[tokio::test]
async fn job_runs_to_output_file_and_callback() {
    let h = Harness::new();
    h.upload("Makefile", b"all:\n\techo hi\n").await;
    let engine = h.engine(config()).await;
    let id = engine.add_job(h.job("out.txt")).await.unwrap();
    let job = h.wait_dead(id).await;
    assert_eq!(job.state, JobState::Done);
    let out = h.output("out.txt");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].ends_with(&format!("Received job job-out.txt:{id}")),
        "{out}"
    );
    assert!(
        lines[1].ends_with("Success: Autodriver returned normally"),
        "{out}"
    );
    assert!(lines[2].ends_with("Here is the output from the autograder:"));
    assert_eq!(lines[3], "---");
    assert_eq!(lines[4], "Autodriver: Job exited with status 0");
    assert!(out.ends_with("Makefile: all:\n\techo hi\n\n"), "{out}");
    h.wait_callbacks(1).await;
    let (url, file, body) = h.callbacks.delivered.lock().unwrap()[0].clone();
    assert_eq!(url, "http://127.0.0.1:9/cb");
    assert_eq!(file, "out.txt");
    assert_eq!(body, out.as_bytes());
    let last = job.trace.last().unwrap();
    assert!(last.message.contains("Autodriver returned normally"));
}

#[tokio::test]
async fn inputs_are_frozen_when_the_job_is_added() {
    let h = Harness::new();
    h.upload("Makefile", b"version one").await;
    let engine = h
        .engine(EngineConfig {
            max_vms: 1,
            ..config()
        })
        .await;
    h.vmms.script.lock().unwrap().run_delay = Duration::from_millis(100);
    let first = engine.add_job(h.job("a")).await.unwrap();
    let second = engine.add_job(h.job("b")).await.unwrap();
    // The second job is queued behind the first; a new upload must not
    // change what it runs.
    h.upload("Makefile", b"version two").await;
    h.wait_dead(first).await;
    h.wait_dead(second).await;
    assert!(
        h.output("b").contains("Makefile: version one"),
        "{}",
        h.output("b")
    );
    let third = engine.add_job(h.job("c")).await.unwrap();
    h.wait_dead(third).await;
    assert!(h.output("c").contains("Makefile: version two"));
}

#[tokio::test]
async fn rejects_bad_jobs() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    let engine = h.engine(config()).await;
    let mut bad = h.job("o");
    bad.image = "missing".into();
    assert_eq!(
        engine.add_job(bad).await.unwrap_err().to_string(),
        "Invalid image name"
    );
    let mut bad = h.job("o");
    bad.files = vec![("Makefile".into(), "notmake".into())];
    assert!(engine
        .add_job(bad)
        .await
        .unwrap_err()
        .to_string()
        .contains("Makefile"));
    let mut bad = h.job("o");
    bad.files = vec![("../../etc/passwd".into(), "Makefile".into())];
    assert!(engine.add_job(bad).await.is_err());
    let mut bad = h.job("../o");
    bad.output_file = "../escape".into();
    assert!(engine.add_job(bad).await.is_err());
    let mut bad = h.job("o");
    bad.courselab_dir = "k-nolab".into();
    assert_eq!(
        engine.add_job(bad).await.unwrap_err().to_string(),
        "Courselab not found"
    );
    let mut bad = h.job("o");
    bad.callback_url = Some("file:///etc/passwd".into());
    assert!(engine.add_job(bad).await.is_err());
}

#[tokio::test]
async fn duplicate_add_job_returns_the_live_job() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms.script.lock().unwrap().run_delay = Duration::from_millis(200);
    let engine = h.engine(config()).await;
    let a = engine.add_job(h.job("same")).await.unwrap();
    let b = engine.add_job(h.job("same")).await.unwrap();
    assert_eq!(a, b);
    h.wait_dead(a).await;
}

#[tokio::test]
async fn shutdown_destroys_idle_vms() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    let engine = h.engine(config()).await;
    let id = engine.add_job(h.job("o")).await.unwrap();
    h.wait_dead(id).await;
    // The reused VM waits in the pool until the server stops.
    h.wait_free_vm(&engine).await;
    assert_eq!(h.vmms.vms.lock().unwrap().len(), 1);
    engine.shutdown().await;
    assert!(h.vmms.vms.lock().unwrap().is_empty());
}

#[tokio::test]
async fn shutdown_stops_jobs_that_outlive_the_grace_period_and_destroys_their_vms() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms.script.lock().unwrap().run_hangs = true;
    let engine = h
        .engine(EngineConfig {
            shutdown_grace_secs: 0,
            ..config()
        })
        .await;
    let id = engine.add_job(h.job("hangs")).await.unwrap();
    h.wait_copied_in(&engine, id).await;
    assert_eq!(h.vmms.vms.lock().unwrap().len(), 1);
    tokio::time::timeout(Duration::from_secs(10), engine.shutdown())
        .await
        .expect("shutdown waits no longer than grace + destroy");
    assert!(
        h.vmms.vms.lock().unwrap().is_empty(),
        "the job's VM is left"
    );
    // The store still holds the job as running: the next start re-queues it.
    let job = h.store.get_job(id).unwrap().unwrap();
    assert_eq!(job.state, JobState::Running);
    assert!(h.callbacks.delivered.lock().unwrap().is_empty());
}
