//! Two tangods on one host must not share a VM prefix: each would destroy
//! the other's VMs as orphans. The second one refuses to start.

mod common;

use common::*;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_tangod_with_the_same_prefix_refuses_to_start() {
    if !root_or_skip("a_second_tangod_with_the_same_prefix_refuses_to_start") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut first = Tangod::start(&dir.path().join("first"), "");
    let second = || {
        Command::new(env!("CARGO_BIN_EXE_tangod"))
            .arg("--config")
            .arg(first.config.as_ref().unwrap())
            .arg("--data-dir")
            .arg(dir.path().join("second"))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--key")
            .arg(KEY)
            .arg("--autodriver")
            .arg(autodriver())
            .output()
            .unwrap()
    };
    let out = second();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another tangod on this host uses the VM prefix")
            && stderr.contains(&first.prefix),
        "{stderr}"
    );
    // The first one still serves, and its lock goes with it.
    assert_eq!(
        first.client().get(&format!("/info/{KEY}/")).await["statusId"],
        0
    );
    first.kill9();
    first.restart();
    assert_eq!(
        first.client().get(&format!("/info/{KEY}/")).await["statusId"],
        0
    );
}
