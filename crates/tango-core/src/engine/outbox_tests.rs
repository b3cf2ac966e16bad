//! Unit tests of the callback outbox, against the in-memory test VMMS.

use crate::engine::test_harness::{config, Harness};
use crate::store::Store;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[tokio::test]
async fn callbacks_are_retried_until_delivered() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.callbacks.fail_first.store(3, Ordering::SeqCst);
    let engine = h.engine(config()).await;
    let id = engine.add_job(h.job("cb")).await.unwrap();
    h.wait_callbacks(1).await;
    assert_eq!(h.callbacks.attempts.load(Ordering::SeqCst), 4);
    let start = Instant::now();
    while h
        .store
        .get_job(id)
        .unwrap()
        .unwrap()
        .phases
        .callback_delivered
        .is_none()
    {
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(h.store.outbox_len().unwrap(), 0);
    assert!(!h.data.outbox_path(id).exists());
}

#[tokio::test]
async fn outbox_survives_restart() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.callbacks.fail_first.store(u64::MAX, Ordering::SeqCst);
    let engine = h.engine(config()).await;
    let id = engine.add_job(h.job("cb")).await.unwrap();
    h.wait_dead(id).await;
    engine.shutdown().await;
    drop(engine);
    assert_eq!(h.store.outbox_len().unwrap(), 1);
    h.callbacks.fail_first.store(0, Ordering::SeqCst);
    // The claimed entry is due again once its claim runs out; make it due now.
    let mut entry = h.store.outbox_due(i64::MAX, 1).unwrap().remove(0);
    entry.next_attempt_ms = 0;
    h.store.outbox_update(&entry).unwrap();
    let _engine = h.engine(config()).await;
    h.wait_callbacks(1).await;
}
