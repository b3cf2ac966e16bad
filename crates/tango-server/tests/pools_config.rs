//! `[[pools]]` in tangod's config: pools preallocated at every start.

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const POOLS: &str = "[[pools]]\nimage = \"host\"\nsize = 3\n\n\
                     [[pools]]\nimage = \"nosuch\"\nsize = 1\n";

fn ids(list: &Value) -> Vec<u64> {
    list.as_array()
        .map(|l| l.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_pools_are_made_at_every_start_and_jobs_use_them() {
    if !root_or_skip("configured_pools_are_made_at_every_start_and_jobs_use_them") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut server = Tangod::start(&data_dir, POOLS);
    let c = server.client();
    let pool = c.wait_pool("host", 3).await;
    assert_eq!(ids(&pool["total"]).len(), 3, "{pool}");
    // The image no backend has does not keep the server from serving; the
    // log says what is wrong.
    let log = server.log();
    assert!(
        log.contains("cannot preallocate the pool of [[pools]]")
            && log.contains("has no image \"nosuch\""),
        "{log}"
    );

    // A job takes a VM of the pool, which comes back to it.
    c.open("lab").await;
    c.upload("lab", "Makefile", b"all:\n\t@echo from-the-pool\n")
        .await;
    let v = c
        .add_job("lab", &job("pooled", "pooled.out", None, 20))
        .await;
    assert_eq!(v["statusMsg"], "Job added", "{v}");
    let out = c
        .wait_output("lab", "pooled.out", Duration::from_secs(30))
        .await;
    assert!(String::from_utf8_lossy(&out).contains("from-the-pool"));
    let pool = c.wait_pool("host", 3).await;
    assert_eq!(ids(&pool["total"]).len(), 3, "{pool}");

    // After a crash the next start makes the pool again; the old run's VMs
    // are orphans and go.
    let before = ids(&pool["total"]);
    server.restart();
    let pool = c.wait_pool("host", 3).await;
    let after = ids(&pool["total"]);
    assert_eq!(after.len(), 3, "{pool}");
    assert!(
        after.iter().all(|id| !before.contains(id)),
        "{before:?} {after:?}"
    );
    let prefix = server.prefix.clone();
    let start = Instant::now();
    while leftover_vms("sandbox", &prefix, &data_dir).len() > 3 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the crashed run's VMs stay: {:?}",
            leftover_vms("sandbox", &prefix, &data_dir)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(server);
    assert_eq!(
        leftover_vms("sandbox", &prefix, &data_dir),
        Vec::<String>::new()
    );
}

/// What is wrong in `[[pools]]` stops tangod before it starts, saying so.
#[test]
fn bad_pool_entries_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[[pools]]\nimage = \"../etc\"\nsize = 1\n", "image name"),
        ("[[pools]]\nimage = \"host\"\nsize = 5000\n", "over 1024"),
        (
            "[[pools]]\nimage = \"host\"\nsize = 1\n[[pools]]\nimage = \"host\"\nsize = 2\n",
            "listed twice",
        ),
        (
            "[[pools]]\nimage = \"host\"\nsize = 1\nvmms = \"docker\"\n",
            "not enabled",
        ),
        ("[[pools]]\nimage = \"host\"\nsize = -1\n", "size"),
        ("[[pools]]\nimage = \"host\"\nsise = 1\n", "unknown field"),
    ];
    for (i, (toml, expected)) in cases.iter().enumerate() {
        let config = dir.path().join(format!("{i}.toml"));
        std::fs::write(&config, toml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tangod"))
            .arg("--config")
            .arg(&config)
            .arg("--key")
            .arg(KEY)
            .arg("--print-config")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{toml} was accepted");
        assert!(stderr.contains(expected), "{toml}: {stderr}");
    }
}
