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
