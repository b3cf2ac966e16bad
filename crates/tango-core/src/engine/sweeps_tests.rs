//! Unit tests of the sweeps, against the in-memory test VMMS.

use crate::engine::test_harness::Harness;
use crate::store::Store;
use std::time::Duration;

#[tokio::test]
async fn blobs_of_replaced_uploads_are_removed_unless_a_pending_job_needs_them() {
    let h = Harness::new();
    h.upload("Makefile", b"first version").await;
    let first = h.store.file_md5("k-lab", "Makefile").unwrap().unwrap();
    h.upload("Makefile", b"second version").await;
    let second = h.store.file_md5("k-lab", "Makefile").unwrap().unwrap();
    assert_ne!(first, second);
    assert!(h.data.blob_path(&first).is_file());
    let none = std::collections::HashSet::new();

    // Too young: a job being added may still take it.
    let removed = h
        .data
        .remove_unused_blobs(none.clone(), Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(removed, 0);
    // Named by a job still to run: kept.
    let keep = std::collections::HashSet::from([first.clone()]);
    let removed = h
        .data
        .remove_unused_blobs(keep, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(removed, 0);
    // Otherwise the replaced version goes; the current one stays.
    let removed = h
        .data
        .remove_unused_blobs(none, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    assert!(!h.data.blob_path(&first).exists());
    assert!(h.data.blob_path(&second).is_file());
    assert_eq!(
        std::fs::read(h.data.courselab_path("k-lab").join("Makefile")).unwrap(),
        b"second version"
    );
}
