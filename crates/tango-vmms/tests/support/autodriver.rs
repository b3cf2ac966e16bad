//! The static autodriver the backend tests put into their VMs, shared by
//! the test targets that include this file with `#[path]`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The static autodriver: `TANGO_AUTODRIVER`, else built for musl.
pub fn autodriver() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(path) = std::env::var_os("TANGO_AUTODRIVER") {
            return PathBuf::from(path);
        }
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"));
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args([
                "build",
                "--release",
                "-p",
                "autodriver",
                "--target",
                "x86_64-unknown-linux-musl",
            ])
            .env("CARGO_TARGET_DIR", &target_dir)
            .current_dir(workspace_root())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the autodriver failed");
        target_dir.join("x86_64-unknown-linux-musl/release/autodriver")
    })
    .clone()
}
