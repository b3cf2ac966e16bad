//! Unit tests of a job's steps: retries, timeouts and backend failures, against the in-memory test VMMS.

use crate::engine::test_harness::{config, Harness};
use crate::model::JobState;
use crate::vmms::RunStatus;
use std::time::{Duration, Instant};

#[tokio::test]
async fn system_errors_are_retried_then_reported() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms
        .script
        .lock()
        .unwrap()
        .initialize_failures
        .extend(["boom 1".to_string(), "boom 2".to_string()]);
    let engine = h.engine(config()).await;
    let id = engine.add_job(h.job("o1")).await.unwrap();
    let job = h.wait_dead(id).await;
    assert_eq!(job.state, JobState::Done);
    assert_eq!(job.retries, 2);
    assert!(job.trace.iter().any(|t| t.message.contains("boom 1")));

    h.vmms
        .script
        .lock()
        .unwrap()
        .initialize_failures
        .extend((0..3).map(|i| format!("dead {i}")));
    // No warm VM may serve the second job, so it must initialize one.
    engine.prealloc("img", 0, None, None, None).await.unwrap();
    let free_before = engine.pools()["img"].free.len();
    assert_eq!(free_before, 0);
    let id = engine.add_job(h.job("o2")).await.unwrap();
    let job = h.wait_dead(id).await;
    assert_eq!(job.state, JobState::Failed);
    let out = h.output("o2");
    assert!(
        out.contains("Internal error: Unable to complete job after 3 tries. Please resubmit"),
        "{out}"
    );
    assert!(
        out.contains("Job status: failed while initializing the VM: backend error: dead 2"),
        "{out}"
    );
    assert!(job.trace.last().unwrap().message.contains("Error"));
    // Failed jobs get their callback too.
    h.wait_callbacks(2).await;
    assert_eq!(engine.info().job_retries, 5);
}

#[tokio::test]
async fn timeouts_and_os_errors() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms.script.lock().unwrap().run_statuses.extend([
        RunStatus::TimedOut,
        RunStatus::OsError,
        RunStatus::Completed,
    ]);
    let engine = h.engine(config()).await;
    let mut job = h.job("t");
    job.timeout_secs = Some(7);
    let id = engine.add_job(job).await.unwrap();
    h.wait_dead(id).await;
    assert!(h
        .output("t")
        .contains("Error: Job timed out after 7 seconds"));
    let id = engine.add_job(h.job("os")).await.unwrap();
    let job = h.wait_dead(id).await;
    // The OS error damaged the VM: it was destroyed and the job retried.
    assert_eq!(job.retries, 1);
    assert_eq!(job.state, JobState::Done);
    assert!(!h.vmms.destroyed.lock().unwrap().is_empty());
    assert_eq!(engine.info().runjob_timeouts, 1);
}

#[tokio::test]
async fn hung_backend_call_times_out() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms.script.lock().unwrap().run_hangs = true;
    let mut cfg = config();
    cfg.max_retries = 0;
    cfg.timeouts.run_grace_secs = 1;
    let engine = h.engine(cfg).await;
    let mut job = h.job("hang");
    job.timeout_secs = Some(1);
    let id = engine.add_job(job).await.unwrap();
    let job = h.wait_dead(id).await;
    assert_eq!(job.state, JobState::Failed);
    assert!(h
        .output("hang")
        .contains("running the job timed out after 2 s"));
}

#[tokio::test]
async fn an_unavailable_backend_is_waited_for_without_spending_retries() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms.script.lock().unwrap().unavailable_calls = 3;
    let engine = h.engine(config()).await;
    let started = Instant::now();
    let id = engine.add_job(h.job("wait")).await.unwrap();
    let job = h.wait_dead(id).await;
    assert_eq!(job.state, JobState::Done);
    assert_eq!(job.retries, 0);
    assert_eq!(job.backend_wait_ms, 1000 + 1000 + 2000);
    // Waits of 1 s, 1 s and 2 s happened before it ran.
    assert!(started.elapsed() >= Duration::from_secs(4));
    let waits = job
        .trace
        .iter()
        .filter(|t| t.message.contains("Backend unavailable"))
        .count();
    assert_eq!(waits, 3);
}
