//! The example backend passes the conformance suite; and the suite, run on
//! deliberately broken wrappers of it, fails the matching check: it catches
//! what it claims to.
//!
//! Needs root (the autodriver switches to the grading uid); without it the
//! tests say why and pass, as the sandbox tests do.

use async_trait::async_trait;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tango_core::model::{InputFile, Machine};
use tango_core::vmms::{RunOutcome, RunRequest, RunStatus, Vmms, VmmsError};
use tango_local_vmms::{Local, LocalConfig, IMAGE};
use tango_vmms::conformance::{run, run_checks, Check, Target};

#[path = "../../../crates/tango-vmms/tests/support/autodriver.rs"]
mod autodriver_build;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The backend in a directory the grading uids can reach (a temp dir is
/// 0700). `first_uid`: each test its own uid range, as tests run at once.
fn local(first_uid: u32) -> (tempfile::TempDir, Arc<Local>) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("tango-local-vmms-")
        .tempdir_in("/var/lib")
        .expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod temp dir");
    let mut config = LocalConfig::new(dir.path().join("vms"), autodriver_build::autodriver());
    config.first_uid = first_uid;
    config.uids = 100;
    config.default_memory_mb = 256;
    (dir, Arc::new(Local::new(config).expect("Local::new")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_example_backend_conforms() {
    if !is_root() {
        eprintln!("skipped: the autodriver needs root to switch to the grading uid");
        return;
    }
    let (dir, backend) = local(61000);
    // A damaged VM: its job directory replaced by a file.
    let vms = dir.path().join("vms");
    let damage: tango_vmms::conformance::Damage = Arc::new(move |vm: Machine| {
        let job = vms.join(&vm.name).join("job");
        Box::pin(async move {
            std::fs::remove_dir_all(&job).map_err(|e| e.to_string())?;
            std::fs::write(&job, "not a directory").map_err(|e| e.to_string())
        })
    });
    let target = Target::new(backend, IMAGE, "cflocal").with_damage(damage);
    run(&target).await.assert_passed();
}

/// One way a backend can break the contract.
#[derive(Debug, Clone, Copy)]
enum Flaw {
    /// `get_vms("tango")` also lists `tango2`'s VMs (a `starts_with` filter).
    ListsALongerPrefix,
    /// `safe_destroy_vm` of a VM that is gone is an error.
    DestroyOfAMissingVmFails,
    /// An unknown image is a plain `Backend` error.
    UnknownImageIsNotNoSuchImage,
    /// `copy_in` drops all but the first few files.
    DropsInputFiles,
    /// The output cap is not passed on.
    IgnoresTheOutputCap,
    /// A timed-out run is reported as completed.
    TimeoutIsCompleted,
    /// `partial_output` is always empty.
    NoPartialOutput,
    /// The previous job's inputs are copied in again (files kept across
    /// `reset_vm`).
    KeepsFilesAcrossReset,
}

impl Flaw {
    fn caught_by(self) -> Check {
        match self {
            Flaw::ListsALongerPrefix => Check::GetVmsPrefix,
            Flaw::DestroyOfAMissingVmFails => Check::DestroyIdempotent,
            Flaw::UnknownImageIsNotNoSuchImage => Check::Errors,
            Flaw::DropsInputFiles => Check::ManyAndLargeFiles,
            Flaw::IgnoresTheOutputCap => Check::OutputCap,
            Flaw::TimeoutIsCompleted => Check::Timeout,
            Flaw::NoPartialOutput => Check::PartialOutput,
            Flaw::KeepsFilesAcrossReset => Check::ResetLeavesNothing,
        }
    }
}

/// A correct backend with one flaw.
struct Flawed {
    inner: Arc<Local>,
    flaw: Flaw,
    last_inputs: Mutex<HashMap<String, Vec<InputFile>>>,
}

#[async_trait]
impl Vmms for Flawed {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn initialize_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        match (self.flaw, self.inner.initialize_vm(vm).await) {
            (Flaw::UnknownImageIsNotNoSuchImage, Err(VmmsError::NoSuchImage(i))) => {
                Err(VmmsError::Backend(format!("no {i}")))
            }
            (_, result) => result,
        }
    }
    async fn wait_vm(&self, vm: &Machine, max: Duration) -> Result<(), VmmsError> {
        self.inner.wait_vm(vm, max).await
    }
    async fn copy_in(&self, vm: &Machine, files: &[InputFile]) -> Result<(), VmmsError> {
        let mut files = files.to_vec();
        match self.flaw {
            Flaw::DropsInputFiles => files.truncate(10),
            Flaw::KeepsFilesAcrossReset => {
                let mut last = self.last_inputs.lock().expect("lock");
                let earlier = last
                    .insert(vm.name.clone(), files.clone())
                    .unwrap_or_default();
                let kept: Vec<InputFile> = earlier
                    .into_iter()
                    .filter(|old| files.iter().all(|f| f.dest_file != old.dest_file))
                    .collect();
                files.extend(kept);
            }
            _ => {}
        }
        self.inner.copy_in(vm, &files).await
    }
    async fn run_job(&self, vm: &Machine, req: &RunRequest) -> Result<RunOutcome, VmmsError> {
        let mut req = req.clone();
        if let Flaw::IgnoresTheOutputCap = self.flaw {
            req.output_cap_bytes = 16 << 20;
        }
        let mut outcome = self.inner.run_job(vm, &req).await?;
        if let (Flaw::TimeoutIsCompleted, RunStatus::TimedOut) = (self.flaw, outcome.status) {
            outcome.status = RunStatus::Completed;
            outcome.exit_code = Some(0);
        }
        Ok(outcome)
    }
    async fn copy_out(&self, vm: &Machine, dest: &Path) -> Result<(), VmmsError> {
        self.inner.copy_out(vm, dest).await
    }
    async fn destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.inner.destroy_vm(vm).await
    }
    async fn safe_destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        if let Flaw::DestroyOfAMissingVmFails = self.flaw {
            if !self.inner.exists_vm(vm).await? {
                return Err(VmmsError::NoSuchVm(vm.name.clone()));
            }
        }
        self.inner.safe_destroy_vm(vm).await
    }
    async fn get_vms(&self, prefix: &str) -> Result<Vec<Machine>, VmmsError> {
        let mut vms = self.inner.get_vms(prefix).await?;
        if let Flaw::ListsALongerPrefix = self.flaw {
            vms.extend(self.inner.get_vms(&format!("{prefix}2")).await?);
        }
        Ok(vms)
    }
    async fn exists_vm(&self, vm: &Machine) -> Result<bool, VmmsError> {
        self.inner.exists_vm(vm).await
    }
    async fn get_images(&self) -> Result<Vec<String>, VmmsError> {
        self.inner.get_images().await
    }
    async fn partial_output(&self, vm: &Machine, max_bytes: usize) -> Result<Vec<u8>, VmmsError> {
        match self.flaw {
            Flaw::NoPartialOutput => Ok(Vec::new()),
            _ => self.inner.partial_output(vm, max_bytes).await,
        }
    }
    async fn reset_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.inner.reset_vm(vm).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_suite_catches_each_broken_duty() {
    if !is_root() {
        eprintln!("skipped: the autodriver needs root to switch to the grading uid");
        return;
    }
    let (_dir, backend) = local(62000);
    for flaw in [
        Flaw::ListsALongerPrefix,
        Flaw::DestroyOfAMissingVmFails,
        Flaw::UnknownImageIsNotNoSuchImage,
        Flaw::DropsInputFiles,
        Flaw::IgnoresTheOutputCap,
        Flaw::TimeoutIsCompleted,
        Flaw::NoPartialOutput,
        Flaw::KeepsFilesAcrossReset,
    ] {
        let flawed = Flawed {
            inner: backend.clone(),
            flaw,
            last_inputs: Mutex::default(),
        };
        let target = Target::new(Arc::new(flawed), IMAGE, "cfflaw");
        let check = flaw.caught_by();
        let report = run_checks(&target, &[check]).await;
        assert!(
            report.failed(check),
            "{flaw:?} was not caught by {check}: {report:?}"
        );
        for failure in &report.failures {
            eprintln!("{flaw:?} caught: {failure}");
        }
    }
}
