//! Unit tests of dispatch order, slot eviction and restart recovery, against the in-memory test VMMS.

use crate::config::EngineConfig;
use crate::engine::test_harness::{config, Harness};
use crate::model::{JobState, Machine};
use crate::store::Store;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[tokio::test]
async fn jobs_dispatch_in_order_with_one_vm() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms.script.lock().unwrap().run_delay = Duration::from_millis(20);
    let engine = h
        .engine(EngineConfig {
            max_vms: 1,
            ..config()
        })
        .await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(engine.add_job(h.job(&format!("o{i}"))).await.unwrap());
    }
    for id in &ids {
        h.wait_dead(*id).await;
    }
    assert_eq!(*h.vmms.run_order.lock().unwrap(), ids);
    // One VM, reused for every job.
    assert_eq!(h.vmms.initialized.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn restart_requeues_running_jobs_and_destroys_orphans() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    // A previous run left a running job and its VM behind.
    let engine = h.engine(config()).await;
    h.vmms.script.lock().unwrap().run_hangs = true;
    let id = engine.add_job(h.job("r")).await.unwrap();
    let start = Instant::now();
    while h.store.get_job(id).unwrap().unwrap().state != JobState::Running
        || h.vmms.run_order.lock().unwrap().is_empty()
    {
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(engine);
    let orphan = Machine::new("tango", 999, "img", "fake");
    h.vmms
        .vms
        .lock()
        .unwrap()
        .insert(orphan.name.clone(), orphan.clone());
    h.vmms.script.lock().unwrap().run_hangs = false;

    let _engine = h.engine(config()).await;
    let job = h.wait_dead(id).await;
    assert_eq!(job.state, JobState::Done);
    assert_eq!(job.retries, 1);
    assert!(job
        .trace
        .iter()
        .any(|t| t.message.contains("server restart")));
    assert!(h.vmms.destroyed.lock().unwrap().contains(&orphan.name));
}

#[tokio::test]
async fn a_restart_destroys_the_vm_an_interrupted_job_had_in_its_own_account() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms.script.lock().unwrap().run_hangs = true;
    let engine = h.engine(config()).await;
    let id = engine.add_job(h.job_with_own_keys("own")).await.unwrap();
    h.wait_copied_in(&engine, id).await;
    let vm_name = engine.get_job(id).unwrap().unwrap().vm.unwrap().name;
    // A crash: the engine is gone without a shutdown (its hung worker is
    // left behind), and the VM is not listed by the orphan sweep.
    drop(engine);
    h.vmms.script.lock().unwrap().run_hangs = false;
    let _engine = h.engine(config()).await;
    assert!(
        !h.vmms.vms.lock().unwrap().contains_key(&vm_name),
        "the job's own VM outlived the restart"
    );
    h.wait_dead(id).await;
}

#[tokio::test]
async fn a_job_with_its_own_credentials_is_not_starved_by_warm_vms_it_cannot_use() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    let engine = h
        .engine(EngineConfig {
            max_vms: 1,
            ..config()
        })
        .await;
    let plain = engine.add_job(h.job("plain")).await.unwrap();
    h.wait_dead(plain).await;
    h.wait_free_vm(&engine).await;
    // The only slot holds a warm VM of the server's account.
    let own = engine.add_job(h.job_with_own_keys("own")).await.unwrap();
    h.wait_dead(own).await;
    assert_eq!(engine.get_job(own).unwrap().unwrap().state, JobState::Done);
    engine.shutdown().await;
}

/// A job of Autolab's shape: `<course>_<assessment>_<version>_<email>`.
fn autolab_job(h: &Harness, email: &str, version: u32) -> crate::engine::NewJob {
    crate::engine::NewJob {
        name: format!("15213_malloc_{version}_{email}"),
        ..h.job(&format!("{email}-{version}"))
    }
}

/// Adds jobs while the one VM is still being made for a first job, so
/// they are all queued when the dispatcher next chooses.
async fn queue_behind_a_slow_first_job(
    h: &Harness,
    scheduling: crate::config::Scheduling,
    jobs: &[(&str, u32)],
) -> (crate::engine::Engine, Vec<u64>) {
    h.upload("Makefile", b"x").await;
    {
        let mut script = h.vmms.script.lock().unwrap();
        script
            .initialize_delays
            .push_back(Duration::from_millis(300));
        script.run_delay = Duration::from_millis(5);
    }
    let engine = h
        .engine(EngineConfig {
            max_vms: 1,
            scheduling,
            ..config()
        })
        .await;
    let mut ids = vec![engine.add_job(autolab_job(h, "first@x", 1)).await.unwrap()];
    for (email, version) in jobs {
        ids.push(
            engine
                .add_job(autolab_job(h, email, *version))
                .await
                .unwrap(),
        );
    }
    for id in &ids {
        h.wait_dead(*id).await;
    }
    (engine, ids)
}

#[tokio::test]
async fn fair_scheduling_takes_submitters_in_turn() {
    let h = Harness::new();
    let jobs = [
        ("a@x", 1),
        ("a@x", 2),
        ("a@x", 3),
        ("b@x", 1),
        ("c@x", 1),
        ("b@x", 2),
    ];
    let (_engine, ids) =
        queue_behind_a_slow_first_job(&h, crate::config::Scheduling::Fair, &jobs).await;
    // The first job, then a1 b1 c1 (first round), a2 b2, a3.
    let expected = vec![ids[0], ids[1], ids[4], ids[5], ids[2], ids[6], ids[3]];
    assert_eq!(*h.vmms.run_order.lock().unwrap(), expected);
    let job = h.store.get_job(ids[5]).unwrap().unwrap();
    assert_eq!(job.submitter, "c@x");
}

#[tokio::test]
async fn fifo_scheduling_keeps_the_order_of_arrival() {
    let h = Harness::new();
    let jobs = [
        ("a@x", 1),
        ("a@x", 2),
        ("a@x", 3),
        ("b@x", 1),
        ("c@x", 1),
        ("b@x", 2),
    ];
    let (_engine, ids) =
        queue_behind_a_slow_first_job(&h, crate::config::Scheduling::Fifo, &jobs).await;
    assert_eq!(*h.vmms.run_order.lock().unwrap(), ids);
}

#[tokio::test]
async fn a_submitter_over_its_queue_cap_is_refused() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms.script.lock().unwrap().run_hangs = true;
    let engine = h
        .engine(EngineConfig {
            max_vms: 1,
            max_queued_per_submitter: Some(2),
            ..config()
        })
        .await;
    // The first one runs (hangs), the next two wait: the cap is on queued jobs.
    let running = engine.add_job(autolab_job(&h, "a@x", 1)).await.unwrap();
    h.wait_copied_in(&engine, running).await;
    for version in 2..=3 {
        engine
            .add_job(autolab_job(&h, "a@x", version))
            .await
            .unwrap();
    }
    let refused = engine.add_job(autolab_job(&h, "a@x", 4)).await.unwrap_err();
    let message = refused.to_string();
    assert!(
        message.contains("a@x") && message.contains("max_queued_per_submitter is 2"),
        "{message}"
    );
    // Another submitter is not held back by a@x's cap.
    engine.add_job(autolab_job(&h, "b@x", 1)).await.unwrap();
}

#[tokio::test]
async fn max_running_caps_a_courselab() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms.script.lock().unwrap().run_delay = Duration::from_millis(30);
    let engine = h
        .engine(EngineConfig {
            max_vms: 4,
            courselabs: vec![crate::config::CourselabPolicy {
                name: "la?".into(),
                weight: 1,
                max_running: Some(1),
            }],
            ..config()
        })
        .await;
    let mut ids = Vec::new();
    for email in ["a@x", "b@x", "c@x"] {
        ids.push(engine.add_job(autolab_job(&h, email, 1)).await.unwrap());
    }
    for id in &ids {
        h.wait_dead(*id).await;
    }
    // One at a time: one VM, made once and reused, although four were allowed.
    assert_eq!(h.vmms.initialized.load(Ordering::SeqCst), 1);
    assert_eq!(*h.vmms.run_order.lock().unwrap(), ids);
}
