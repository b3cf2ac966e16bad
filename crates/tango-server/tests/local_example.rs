//! The worked example backend of docs/writing-a-vmms.md (`vmms = "local"`,
//! feature `local-example`) registered in a real tangod: a job goes through
//! the v1 API and comes back with its output, twice (the second on the
//! reused VM).
#![cfg(feature = "local-example")]

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tangod_runs_jobs_on_the_example_backend() {
    if !root_or_skip("tangod_runs_jobs_on_the_example_backend") {
        return;
    }
    // Jobs run as other uids: the VMs under the data dir must be reachable.
    let dir = tempfile::tempdir_in("/var/lib").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let server = Tangod::start(&dir.path().join("data"), "vmms = \"local\"\n");
    let c = server.client();
    c.open("lab").await;
    c.upload("lab", "Makefile", b"all:\n\t@echo hello from $$(id -u)\n")
        .await;
    for n in 0..2 {
        let mut job = job(&format!("local{n}"), &format!("local{n}.out"), None, 20);
        job["image"] = "local".into();
        job["vmms"] = "local".into();
        let v = c.add_job("lab", &job).await;
        assert_eq!(v["statusMsg"], "Job added", "{v}");
        let out = c
            .wait_output("lab", &format!("local{n}.out"), Duration::from_secs(30))
            .await;
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.contains("Success: Autodriver returned normally"),
            "{out}"
        );
        // The example's grading uids start at 61000.
        assert!(out.contains("hello from 61"), "{out}");
    }
}
