//! The sandbox backend's cgroup limits, read back from the kernel's files on
//! whichever cgroup version the host has, and a fork bomb against a small
//! pids limit (reached quickly also in a slow, emulated guest: see
//! scripts/cgroup-v2-vm.sh, which runs these on cgroup v2). Needs root;
//! without it every test prints why it is skipped and passes.
//!
//! The autodriver comes from `TANGO_AUTODRIVER` (scripts/test.sh and
//! scripts/cgroup-v2-vm.sh set it); without it the tests are skipped.

#![cfg(feature = "sandbox")]

use std::path::{Path, PathBuf};
use std::time::Duration;
use tango_core::{InputFile, Machine, RunRequest, RunStatus, Vmms};
use tango_vmms::sandbox::{Sandbox, SandboxConfig};
use tempfile::TempDir;

const CGROUP_ROOT: &str = "tango-rs-limits-test";

/// The autodriver, or why the test cannot run.
fn preconditions() -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the sandbox backend needs root (namespaces, mounts, cgroups)");
        return None;
    }
    match std::env::var_os("TANGO_AUTODRIVER") {
        Some(path) => Some(PathBuf::from(path)),
        None => {
            eprintln!("skipped: set TANGO_AUTODRIVER to the static autodriver");
            None
        }
    }
}

fn sandbox(dir: &TempDir, autodriver: PathBuf, tweak: impl FnOnce(&mut SandboxConfig)) -> Sandbox {
    let mut config = SandboxConfig {
        data_dir: dir.path().join("data"),
        autodriver,
        cgroup_root_name: CGROUP_ROOT.into(),
        ..SandboxConfig::default()
    };
    tweak(&mut config);
    Sandbox::new(config).expect("Sandbox::new")
}

fn test_dir() -> TempDir {
    // Not /tmp: the sandbox replaces it inside jobs.
    tempfile::Builder::new()
        .prefix("tango-limits-test-")
        .tempdir_in("/var/lib")
        .expect("temp dir")
}

/// The VM's cgroup directories: one on v2, one per controller on v1.
fn vm_cgroups(vm: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![PathBuf::from("/sys/fs/cgroup")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let path = entry.path();
            if entry.file_name() == vm && dir.ends_with(CGROUP_ROOT) {
                found.push(path.clone());
            }
            stack.push(path);
        }
    }
    found
}

/// The first of `names` present in any of `dirs`, trimmed.
fn read_knob(dirs: &[PathBuf], names: &[&str]) -> Option<String> {
    dirs.iter()
        .flat_map(|d| names.iter().map(move |n| d.join(n)))
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
}

fn is_v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

#[tokio::test]
async fn limits_are_written_to_the_vm_cgroup() {
    let Some(autodriver) = preconditions() else {
        return;
    };
    let dir = test_dir();
    let sandbox = sandbox(&dir, autodriver, |c| {
        c.default_max_pids = 77;
        c.default_cores = Some(0.5);
    });
    let vm = Machine {
        memory_mb: Some(96),
        ..Machine::new("t-knobs", 1, "host", "sandbox")
    };
    sandbox.initialize_vm(&vm).await.expect("init");
    let dirs = vm_cgroups(&vm.name);
    assert!(!dirs.is_empty(), "no cgroup named {} found", vm.name);
    let memory = read_knob(&dirs, &["memory.max", "memory.limit_in_bytes"]);
    let pids = read_knob(&dirs, &["pids.max"]);
    let cpu = read_knob(&dirs, &["cpu.max", "cpu.cfs_quota_us"]);
    sandbox.destroy_vm(&vm).await.expect("destroy");
    assert!(vm_cgroups(&vm.name).is_empty(), "cgroups left");

    assert_eq!(memory.as_deref(), Some("100663296"), "{dirs:?}");
    assert_eq!(pids.as_deref(), Some("77"), "{dirs:?}");
    let expected_cpu = if is_v2() { "50000 100000" } else { "50000" };
    assert_eq!(cpu.as_deref(), Some(expected_cpu), "{dirs:?}");
    if is_v2() {
        // One directory holds every controller, and no swap is allowed.
        assert_eq!(dirs.len(), 1, "{dirs:?}");
        if let Some(swap) = read_knob(&dirs, &["memory.swap.max"]) {
            assert_eq!(swap, "0");
        }
    }
}

#[tokio::test]
async fn a_fork_bomb_meets_a_small_pids_limit() {
    let Some(autodriver) = preconditions() else {
        return;
    };
    let dir = test_dir();
    let sandbox = sandbox(&dir, autodriver, |c| c.default_max_pids = 24);
    let vm = Machine::new("t-bomb24", 1, "host", "sandbox");
    sandbox.initialize_vm(&vm).await.expect("init");
    sandbox
        .wait_vm(&vm, Duration::from_secs(5))
        .await
        .expect("wait_vm");
    let makefile = dir.path().join("Makefile");
    std::fs::write(
        &makefile,
        "all:\n\t@echo bomb; printf 'while :; do sh $$0 & done\\n' > /tmp/b.sh; sh /tmp/b.sh 2>/dev/null\n",
    )
    .expect("Makefile");
    let inputs = [InputFile {
        local_file: "Makefile".into(),
        dest_file: "Makefile".into(),
        path: makefile,
        md5: String::new(),
    }];
    sandbox.copy_in(&vm, &inputs).await.expect("copy_in");
    let request = RunRequest {
        job_id: 1,
        timeout_secs: 20,
        output_cap_bytes: 1 << 20,
        max_procs: 1000,
        max_file_bytes: 64 << 20,
        disable_network: true,
    };
    let outcome = sandbox.run_job(&vm, &request).await.expect("run_job");
    sandbox.destroy_vm(&vm).await.expect("destroy");
    assert!(
        matches!(outcome.status, RunStatus::TimedOut | RunStatus::Completed),
        "{outcome:?}"
    );
    assert!(
        outcome
            .notes
            .iter()
            .any(|n| n == "The job hit its limit of 24 processes"),
        "{:?}",
        outcome.notes
    );
    assert!(vm_cgroups(&vm.name).is_empty(), "cgroups left");
}
