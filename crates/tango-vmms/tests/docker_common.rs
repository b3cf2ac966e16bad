//! Shared helpers of the docker backend tests (included with `#[path]` by
//! each of them; as a test target of its own it holds no tests).
#![cfg(feature = "docker")]
#![allow(dead_code, unused_macros, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tango_core::model::{InputFile, Machine};
use tango_core::vmms::{RunRequest, Vmms};
use tango_vmms::docker::{Docker, DockerConfig};

#[path = "support/autodriver.rs"]
mod autodriver_build;
pub use autodriver_build::{autodriver, workspace_root};

pub const BOOKWORM: &str = "tango-test-bookworm";
pub const BUSYBOX: &str = "tango-test-busybox";
/// A stand-in for make in the busybox image (which has none): runs the
/// Makefile's tab-indented recipe lines (`@` dropped, `$$` unescaped) in one
/// shell that stops at the first failure, and exits 2 then, as make does.
pub const BUSYBOX_MAKE: &str = "#!/bin/sh\n\
    recipe=$(sed -n '/^\t/{s/^\t@\\{0,1\\}//;s/\\$\\$/$/g;p;}' Makefile) || exit 2\n\
    sh -e -c \"$recipe\" || exit 2\n";

/// Bookworm plus user `autograde`, like Tango's images.
pub const AUTOGRADE: &str = "tango-test-autograde";

/// Why the Docker tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    if std::env::var_os("DOCKER_HOST").is_none() && !Path::new("/var/run/docker.sock").exists() {
        return Some("no /var/run/docker.sock and no DOCKER_HOST".into());
    }
    None
}

macro_rules! require_docker {
    () => {
        if let Some(reason) = common::skip_reason() {
            eprintln!("skipping: {reason}");
            return;
        }
    };
}
pub(crate) use require_docker;

/// Builds the test images once per machine.
pub fn ensure_test_images() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let status = Command::new(workspace_root().join("scripts/build-docker-test-image.sh"))
            .status()
            .expect("the image script runs");
        assert!(status.success(), "building the test images failed");
    });
}

pub fn config(work_dir: &Path) -> DockerConfig {
    let mut config = DockerConfig::new(autodriver(), work_dir.to_path_buf());
    config.default_memory_mb = 512;
    config.api_timeout = std::time::Duration::from_secs(20);
    // The tests check the autodriver's summary too.
    config.read_summary = true;
    config
}

pub async fn backend(work_dir: &Path) -> Docker {
    ensure_test_images();
    Docker::connect(config(work_dir))
        .await
        .expect("dockerd answers")
}

/// The prefix of one test: tests never share containers, and a rerun
/// removes what a failed run left.
pub fn prefix(test: &str) -> String {
    format!("tdt-{test}")
}

/// Removes whatever an earlier run left under `prefix`.
pub async fn clean(docker: &Docker, prefix: &str) {
    for vm in docker.get_vms(prefix).await.expect("get_vms") {
        docker.safe_destroy_vm(&vm).await.expect("cleanup");
    }
}

/// One test's work dir, backend and prefix, with whatever an earlier run
/// left under the prefix removed.
pub async fn fresh_backend(test: &str) -> (tempfile::TempDir, Docker, String) {
    let work = tempfile::tempdir().expect("tempdir");
    let docker = backend(work.path()).await;
    let prefix = prefix(test);
    clean(&docker, &prefix).await;
    (work, docker, prefix)
}

pub fn request(job_id: u64, timeout_secs: u64) -> RunRequest {
    RunRequest {
        job_id,
        timeout_secs,
        output_cap_bytes: 512 * 1024,
        max_procs: 100,
        max_file_bytes: 100 << 20,
        disable_network: true,
    }
}

/// Input files written under `dir`: (destFile, contents).
pub fn inputs(dir: &Path, files: &[(&str, &str)]) -> Vec<InputFile> {
    files
        .iter()
        .enumerate()
        .map(|(i, (name, body))| {
            let path = dir.join(format!("input-{i}-{name}"));
            std::fs::write(&path, body).expect("write input");
            InputFile {
                local_file: name.to_string(),
                dest_file: name.to_string(),
                path,
                md5: String::new(),
            }
        })
        .collect()
}

pub fn machine(prefix: &str, id: u64, image: &str) -> Machine {
    Machine::new(prefix, id, image, "docker")
}

/// Runs one job start to end on a fresh VM and returns (outcome, output).
pub async fn run_once(
    docker: &Docker,
    vm: &Machine,
    work: &Path,
    files: &[(&str, &str)],
    req: &RunRequest,
) -> (tango_core::vmms::RunOutcome, String) {
    docker.initialize_vm(vm).await.expect("initialize_vm");
    docker
        .wait_vm(vm, std::time::Duration::from_secs(10))
        .await
        .expect("wait_vm");
    docker
        .copy_in(vm, &inputs(work, files))
        .await
        .expect("copy_in");
    let outcome = docker.run_job(vm, req).await.expect("run_job");
    let dest = work.join(format!("output-{}", vm.id));
    docker.copy_out(vm, &dest).await.expect("copy_out");
    let output = std::fs::read_to_string(&dest).expect("read output");
    (outcome, output)
}
