//! Unit tests of VM pools and placement, against the in-memory test VMMS.

use crate::config::EngineConfig;
use crate::engine::test_harness::{config, Harness};
use crate::model::JobState;
use crate::store::Store;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[tokio::test]
async fn without_reuse_each_job_gets_a_fresh_vm() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    let engine = h
        .engine(EngineConfig {
            reuse_vms: false,
            ..config()
        })
        .await;
    let mut used = Vec::new();
    for i in 0..3 {
        let id = engine.add_job(h.job(&format!("o{i}"))).await.unwrap();
        used.push(h.wait_dead(id).await.vm.unwrap().name);
        // The spare made after this job is ready for the next one.
        h.wait_free_vm(&engine).await;
    }
    used.dedup();
    assert_eq!(used.len(), 3, "a VM ran two jobs: {used:?}");
    // Three VMs ran a job each and are gone; one spare waits.
    assert_eq!(h.vmms.initialized.load(Ordering::SeqCst), 4);
    let start = Instant::now();
    while h.vmms.vms.lock().unwrap().len() > 1 {
        assert!(start.elapsed() < Duration::from_secs(5), "VMs leaked");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for name in &used {
        assert!(h.vmms.destroyed.lock().unwrap().contains(name));
    }
    engine.shutdown().await;
    assert!(h.vmms.vms.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_job_takes_a_vm_that_comes_free_before_its_own_is_made() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    {
        let mut script = h.vmms.script.lock().unwrap();
        script.run_delay = Duration::from_millis(100);
        // The first VM is made at once, the second takes long.
        script
            .initialize_delays
            .extend([Duration::ZERO, Duration::from_secs(3)]);
    }
    let engine = h.engine(config()).await;
    let first = engine.add_job(h.job("o1")).await.unwrap();
    h.wait_copied_in(&engine, first).await;
    let started = Instant::now();
    let second = engine.add_job(h.job("o2")).await.unwrap();
    h.wait_copied_in(&engine, second).await;
    // The third job needs a VM while the second's is still being made: it
    // waits for that one (or a freed one) rather than making another.
    let third = engine.add_job(h.job("o3")).await.unwrap();
    let first = h.wait_dead(first).await;
    let second = h.wait_dead(second).await;
    let third = h.wait_dead(third).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the jobs waited {:?} for the VM made for them",
        started.elapsed()
    );
    assert_eq!(
        (second.state, third.state),
        (JobState::Done, JobState::Done)
    );
    let first_vm = first.vm.unwrap().name;
    assert_eq!(second.vm.unwrap().name, first_vm);
    assert_eq!(third.vm.unwrap().name, first_vm);
    // The VM made meanwhile joins the pool when it is ready.
    h.wait_free_vms(&engine, 2).await;
    assert_eq!(h.vmms.initialized.load(Ordering::SeqCst), 2);
    let fourth = engine.add_job(h.job("o4")).await.unwrap();
    assert_eq!(h.wait_dead(fourth).await.state, JobState::Done);
    assert_eq!(h.vmms.initialized.load(Ordering::SeqCst), 2);
    engine.shutdown().await;
    assert!(h.vmms.vms.lock().unwrap().is_empty(), "a VM was left");
}

#[tokio::test]
async fn a_vm_that_fails_to_start_after_its_job_took_another_gives_its_slot_back() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    {
        let mut script = h.vmms.script.lock().unwrap();
        script.run_delay = Duration::from_millis(50);
        script
            .initialize_delays
            .extend([Duration::ZERO, Duration::from_millis(500)]);
    }
    let engine = h
        .engine(EngineConfig {
            max_vms: 2,
            ..config()
        })
        .await;
    let first = engine.add_job(h.job("o1")).await.unwrap();
    h.wait_copied_in(&engine, first).await;
    // The second job's own VM fails, after the first job's VM came free
    // and served it: no retry of the job's.
    h.vmms
        .script
        .lock()
        .unwrap()
        .initialize_failures
        .push_back("no such image".into());
    let second = engine.add_job(h.job("o2")).await.unwrap();
    let second = h.wait_dead(second).await;
    assert_eq!((second.state, second.retries), (JobState::Done, 0));
    let start = Instant::now();
    while h.vmms.destroyed.lock().unwrap().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the failed VM stayed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Its slot is free again: of two jobs at once under max_vms 2, one
    // gets a new VM.
    h.vmms.script.lock().unwrap().run_delay = Duration::from_millis(200);
    let a = engine.add_job(h.job("o3")).await.unwrap();
    let b = engine.add_job(h.job("o4")).await.unwrap();
    let (a, b) = (h.wait_dead(a).await, h.wait_dead(b).await);
    assert_ne!(a.vm.unwrap().name, b.vm.unwrap().name);
    assert_eq!(h.vmms.initialized.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn failed_resets_and_destroys_count_as_backend_errors() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    {
        let mut script = h.vmms.script.lock().unwrap();
        script.reset_failures = 1;
        script.destroy_failures = 1;
    }
    let engine = h.engine(config()).await;
    let id = engine.add_job(h.job("o1")).await.unwrap();
    let job = h.wait_dead(id).await;
    assert_eq!(job.state, JobState::Done);
    // The VM that could not be reset is destroyed, which fails too.
    let start = Instant::now();
    loop {
        let errors = engine.metrics().backend_errors();
        let count = |step: &str| errors.get(&("fake".to_string(), step.to_string())).copied();
        if count("reset") == Some(1) && count("destroy") == Some(1) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "backend errors: {errors:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    engine.shutdown().await;
}

#[tokio::test]
async fn prealloc_fills_the_pool_and_jobs_use_it() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    let engine = h.engine(config()).await;
    engine
        .prealloc("img", 2, None, Some(1), Some(256))
        .await
        .unwrap();
    h.wait_free_vms(&engine, 2).await;
    let id = engine.add_job(h.job("o")).await.unwrap();
    let job = h.wait_dead(id).await;
    assert_eq!(h.vmms.initialized.load(Ordering::SeqCst), 2);
    let vm = job.vm.unwrap();
    assert_eq!(vm.cores, Some(1));
    assert_eq!(vm.memory_mb, Some(256));
    assert!(engine.prealloc("nope", 1, None, None, None).await.is_err());
    assert!(engine.prealloc("img", -1, None, None, None).await.is_err());
    engine.prealloc("img", 0, None, None, None).await.unwrap();
    assert!(engine.pools()["img"].total.is_empty());
}

#[tokio::test]
async fn a_job_with_its_own_credentials_gets_a_fresh_vm_that_is_not_reused() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    let engine = h.engine(config()).await;
    let plain = engine.add_job(h.job("plain")).await.unwrap();
    h.wait_dead(plain).await;
    h.wait_free_vm(&engine).await;
    let warm: Vec<String> = h.vmms.vms.lock().unwrap().keys().cloned().collect();
    assert_eq!(warm.len(), 1);

    let own = engine.add_job(h.job_with_own_keys("own")).await.unwrap();
    h.wait_dead(own).await;
    let job = engine.get_job(own).unwrap().unwrap();
    // The keys are not kept once the job is done.
    let stored = h.store.get_job(own).unwrap().unwrap();
    assert!(stored.credentials.is_none());
    assert!(stored
        .vm
        .as_ref()
        .is_some_and(|vm| vm.credentials.is_none()));
    let vm = job.vm.expect("the job's VM");
    assert!(!warm.contains(&vm.name), "ran on the server's warm VM");
    // Its VM is destroyed, not kept; the warm one is still there.
    let start = Instant::now();
    while h.vmms.vms.lock().unwrap().contains_key(&vm.name) {
        assert!(start.elapsed() < Duration::from_secs(5), "kept for reuse");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(h.vmms.vms.lock().unwrap().contains_key(&warm[0]));
    engine.shutdown().await;
}

#[tokio::test]
async fn a_drained_host_keeps_no_idle_vm_and_takes_no_new_job() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms.add_host("h1");
    h.vmms.add_host("h2");
    let engine = h.engine(config()).await;
    let first = engine.add_job(h.job("a")).await.unwrap();
    let first_vm = *h.wait_dead(first).await.vm.unwrap();
    assert_eq!(
        first_vm.host.as_deref(),
        Some("h1"),
        "the job's record names its host"
    );
    // Its VM waits for reuse on h1 until h1 is drained.
    h.wait_free_vm(&engine).await;
    engine.set_host_draining("h1", true).await.unwrap();
    let start = Instant::now();
    while !h.vmms.destroyed.lock().unwrap().contains(&first_vm.name) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the idle VM on h1 stayed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = engine.add_job(h.job("b")).await.unwrap();
    let second_vm = *h.wait_dead(second).await.vm.unwrap();
    assert_eq!(second_vm.host.as_deref(), Some("h2"));
    assert!(engine.hosts().iter().any(|s| s.name == "h1" && s.draining));
    assert!(matches!(
        engine.set_host_draining("nope", true).await,
        Err(crate::engine::EngineError::Vmms(
            crate::vmms::VmmsError::NoSuchHost(_)
        ))
    ));
    engine.shutdown().await;
}

#[tokio::test]
async fn a_vm_whose_host_was_drained_while_it_ran_is_not_reused() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms.add_host("h1");
    h.vmms.add_host("h2");
    let (open, gate) = tokio::sync::watch::channel(false);
    h.vmms.script.lock().unwrap().run_gate = Some(gate);
    let engine = h.engine(config()).await;
    let running = engine.add_job(h.job("a")).await.unwrap();
    while h.vmms.run_order.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    engine.set_host_draining("h1", true).await.unwrap();
    open.send(true).unwrap();
    let vm = *h.wait_dead(running).await.vm.unwrap();
    assert_eq!(vm.host.as_deref(), Some("h1"));
    assert!(
        h.output("a").contains("Makefile: x"),
        "the running job finished"
    );
    let start = Instant::now();
    while !h.vmms.destroyed.lock().unwrap().contains(&vm.name) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the drained host's VM was kept"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    engine.shutdown().await;
}
