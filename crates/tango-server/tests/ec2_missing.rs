//! A tangod built without the `ec2` feature refuses `vmms = "ec2"` at
//! start, saying how to get it, while an `[ec2]` section alone is accepted.
#![cfg(not(feature = "ec2"))]

use std::process::Command;

#[test]
fn ec2_without_the_feature_is_a_clear_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tangod.toml");
    std::fs::write(
        &config,
        format!(
            "vmms = \"ec2\"\n[engine]\nprefix = \"t{}ec2missing\"\n\
             [ec2]\nregion = \"eu-west-1\"\n[ec2.images]\nhost = \"ami-1\"\n",
            std::process::id()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tangod"))
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--key")
        .arg("testkey")
        .env_remove("RESTFUL_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("built without the ec2 backend") && stderr.contains("--features ec2"),
        "{stderr}"
    );

    // The section parses (and prints) in every build.
    let out = Command::new(env!("CARGO_BIN_EXE_tangod"))
        .arg("--config")
        .arg(&config)
        .arg("--print-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("eu-west-1"), "{printed}");
}
