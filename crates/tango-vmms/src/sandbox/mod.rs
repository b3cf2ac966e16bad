//! The sandbox backend: each VM is a directory plus a set of cgroups, and
//! each job runs the autodriver in fresh Linux namespaces (mount, PID, IPC,
//! UTS, cgroup and, unless allowed, network) chrooted into a read-only image.
//! No daemon: everything a VM is lives under `data_dir/sandbox/<vm>/` and in
//! the cgroup tree, so a restarted tangod finds (and removes) what it left.
//!
//! A VM directory is a private tmpfs (as large as the VM's memory limit, so
//! the job's files count against its memory cgroup and cannot fill the
//! host's disk) holding `home/` (the sandbox's /home, writable), `tmp/` (its
//! /tmp), `vartmp/` (its /var/tmp, when the image has one), `ctl/`
//! (root-only: the autodriver's captured output, summary and stream, mounted
//! at /run/tango/ctl), `root/` (the mount point the image is bound to inside
//! the job's mount namespace) and `machine.json`.
//!
//! When tangod is not root ("rootless", see the `userns` module), each job also gets a
//! user namespace; the VM directory is then a plain directory, and the
//! grading user's home, /tmp and /var/tmp are tmpfs mounts of the job's own
//! mount namespace instead.

mod cgroup;
mod jail;
mod mounts;
mod userns;

use async_trait::async_trait;
use cgroup::{CgroupTree, Counters, CpuPriority, Limits};
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tango_core::names::{check_component, check_image};
use tango_core::{
    parse_machine_name, InputFile, Machine, RunOutcome, RunRequest, RunStatus, Vmms, VmmsError,
};
use tokio::io::AsyncReadExt;

pub use cgroup::CgroupVersion;

/// The image name that stands for the host's own root filesystem.
pub const HOST_IMAGE: &str = "host";

/// Directories every image must have: they are mount points in the sandbox.
const REQUIRED_IMAGE_DIRS: [&str; 5] = ["home", "tmp", "proc", "dev", "run"];

/// A job's CPU weight falls with its age, so that a short job (most
/// grading runs take well under a second) keeps its latency beside endless
/// loops and fork bombs, even while those are just starting: ten times the
/// default weight for its first [`FRESH_FOR`], the default until
/// [`BACKGROUND_AFTER`], then a tenth of it. A burst of new hostile jobs
/// outweighs a short job only for their first moments, and only those that
/// started after it.
const FRESH_FOR: Duration = Duration::from_millis(50);
const BACKGROUND_AFTER: Duration = Duration::from_secs(1);

/// Aborts a background task when the job it watches ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Grading uids are `UID_BASE + id % UID_SPAN`: distinct per VM because
/// RLIMIT_NPROC counts a uid's processes across the whole system.
const UID_BASE: u64 = 200_000;
const UID_SPAN: u64 = 100_000;

/// A VM directory's subdirectories that jobs write to (directly or through
/// the autodriver): emptied between jobs.
const VM_SUBDIRS: [&str; 4] = ["home", "tmp", "vartmp", "ctl"];

/// Paths inside the sandbox.
const JOB_DIR_IN_VM: &str = "/home/job";
const GRADER_HOME_IN_VM: &str = "/home/autograde";

#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// tangod's data directory: VMs live in `data_dir/sandbox/<vm>/`, images
    /// in `data_dir/images/<NAME>/` (a root filesystem directory, or a
    /// symlink to one). Image `host` is the host's / (read-only).
    pub data_dir: PathBuf,
    /// Host path of the (static) autodriver binary.
    pub autodriver: PathBuf,
    pub default_memory_mb: u64,
    pub default_max_pids: u64,
    /// `None`: no CPU limit.
    pub default_cores: Option<f64>,
    /// false: every job gets a fresh network namespace with loopback only.
    /// true: jobs share the host's network unless the job disables it.
    pub allow_network: bool,
    /// VM cgroups are created under `<tangod's cgroup>/<cgroup_root_name>/`.
    pub cgroup_root_name: String,
    /// More host paths to hide from jobs whose image contains them (e.g. a
    /// courselab directory outside `data_dir`); `data_dir` is always hidden.
    pub hidden_paths: Vec<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            data_dir: PathBuf::from("/var/lib/tango-rs"),
            autodriver: PathBuf::from("/usr/local/lib/tango-rs/autodriver"),
            default_memory_mb: 1024,
            default_max_pids: 256,
            default_cores: None,
            allow_network: false,
            cgroup_root_name: "tango-rs".into(),
            hidden_paths: Vec::new(),
        }
    }
}

pub struct Sandbox {
    config: SandboxConfig,
    cgroups: CgroupTree,
    vms_dir: PathBuf,
    images_dir: PathBuf,
    autodriver: PathBuf,
    /// Canonical host paths masked inside images that contain them.
    hidden: Vec<PathBuf>,
    /// Set when tangod is not root: jobs run in user namespaces.
    rootless: Option<userns::IdMap>,
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> VmmsError {
    let context = context.into();
    move |e| VmmsError::io(context, e)
}

fn make_dir(path: &Path, mode: u32) -> Result<(), VmmsError> {
    match fs::DirBuilder::new().mode(mode).create(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            return Err(VmmsError::io(format!("creating {}", path.display()), e))
        }
        _ => {}
    }
    // The umask may have narrowed the mode; these modes matter (tmp is 1777).
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("setting the mode of {}", path.display())))
}

/// Creates [`VM_SUBDIRS`] with their modes (ctl is tangod's alone).
fn make_vm_subdirs(dir: &Path) -> Result<(), VmmsError> {
    for (sub, mode) in VM_SUBDIRS.iter().zip([0o755, 0o1777, 0o1777, 0o700]) {
        make_dir(&dir.join(sub), mode)?;
    }
    Ok(())
}

/// Deletes a directory's contents, keeping the directory.
fn empty_dir(dir: &Path) -> Result<(), VmmsError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(VmmsError::io(format!("listing {}", dir.display()), e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(format!("listing {}", dir.display())))?;
        let path = entry.path();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let result = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match result {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(VmmsError::io(format!("removing {}", path.display()), e))
            }
            _ => {}
        }
    }
    Ok(())
}

fn blocking_error(e: tokio::task::JoinError) -> VmmsError {
    VmmsError::Backend(format!("a blocking task failed: {e}"))
}

impl Sandbox {
    /// Checks the environment (root, autodriver, cgroups) and prepares the
    /// directories and the cgroup tree.
    pub fn new(config: SandboxConfig) -> Result<Sandbox, VmmsError> {
        // SAFETY: geteuid has no preconditions.
        let rootless = if unsafe { libc::geteuid() } == 0 {
            None
        } else {
            Some(userns::IdMap::for_current_user()?)
        };
        let autodriver = config.autodriver.canonicalize().map_err(|e| {
            VmmsError::io(
                format!(
                    "the autodriver binary {} (build it with `cargo build --release -p autodriver \
                     --target x86_64-unknown-linux-musl` and point the configuration at it)",
                    config.autodriver.display()
                ),
                e,
            )
        })?;
        if !autodriver.is_file() {
            return Err(VmmsError::Backend(format!(
                "the autodriver {} is not a file",
                autodriver.display()
            )));
        }
        fs::create_dir_all(&config.data_dir)
            .map_err(io_err(format!("creating {}", config.data_dir.display())))?;
        let data_dir = config
            .data_dir
            .canonicalize()
            .map_err(io_err(format!("resolving {}", config.data_dir.display())))?;
        let vms_dir = data_dir.join("sandbox");
        make_dir(&vms_dir, 0o700)?;
        let images_dir = data_dir.join("images");
        fs::create_dir_all(&images_dir)
            .map_err(io_err(format!("creating {}", images_dir.display())))?;
        check_component("cgroup root name", &config.cgroup_root_name)
            .map_err(|e| VmmsError::Backend(e.to_string()))?;
        let cgroups = CgroupTree::detect(&config.cgroup_root_name).map_err(|e| {
            if rootless.is_some() {
                VmmsError::Backend(format!(
                    "{e}. Not being root, tangod needs a cgroup delegated to its user: on \
                     systemd, start it with `systemd-run --user -p Delegate=yes tangod ...` or in \
                     a unit with Delegate=yes"
                ))
            } else {
                e
            }
        })?;
        let mut hidden = vec![data_dir];
        for path in &config.hidden_paths {
            if let Ok(p) = path.canonicalize() {
                hidden.push(p);
            }
        }
        Ok(Sandbox {
            config,
            cgroups,
            vms_dir,
            images_dir,
            autodriver,
            hidden,
            rootless,
        })
    }

    /// Whether jobs run in user namespaces (tangod is not root).
    pub fn is_rootless(&self) -> bool {
        self.rootless.is_some()
    }

    /// Runs `delete` on a VM directory off the async threads. Rootless,
    /// when it fails (files of a job's subordinate uids, which tangod may not
    /// delete; normally a job writes only to tmpfs mounts of its own), the
    /// VM's subdirectories are removed from inside a mapped user namespace
    /// and `delete` runs once more.
    async fn delete_vm_files(
        &self,
        dir: &Path,
        delete: fn(&Path) -> Result<(), VmmsError>,
    ) -> Result<(), VmmsError> {
        let attempt = |dir: PathBuf| async move {
            tokio::task::spawn_blocking(move || delete(&dir))
                .await
                .map_err(blocking_error)?
        };
        match (attempt(dir.to_path_buf()).await, &self.rootless) {
            (Err(e), Some(map)) => {
                tracing::debug!("{e}; removing {} as the namespace's root", dir.display());
                let paths: Vec<PathBuf> = VM_SUBDIRS.iter().map(|s| dir.join(s)).collect();
                userns::remove_as_mapped_root(map, &paths).await?;
                attempt(dir.to_path_buf()).await
            }
            (result, _) => result,
        }
    }

    /// The cgroup layout in use.
    pub fn cgroup_version(&self) -> CgroupVersion {
        self.cgroups.version
    }

    /// Removes the directories, mounts and cgroups of every VM whose name
    /// starts with `prefix-` (what a previous run left behind). Returns how
    /// many VMs were removed.
    pub async fn cleanup_leftovers(&self, prefix: &str) -> Result<usize, VmmsError> {
        let mut names: Vec<String> = self
            .vm_dir_names()?
            .into_iter()
            .filter(|n| parse_machine_name(prefix, n).is_some())
            .collect();
        for name in self.cgroups.list(prefix) {
            if parse_machine_name(prefix, &name).is_some() && !names.contains(&name) {
                names.push(name);
            }
        }
        for name in &names {
            self.destroy_by_name(name).await?;
        }
        Ok(names.len())
    }

    fn vm_dir_names(&self) -> Result<Vec<String>, VmmsError> {
        let entries = fs::read_dir(&self.vms_dir)
            .map_err(io_err(format!("listing {}", self.vms_dir.display())))?;
        Ok(entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect())
    }

    fn vm_dir(&self, vm: &Machine) -> Result<PathBuf, VmmsError> {
        check_component("VM name", &vm.name).map_err(|e| VmmsError::Backend(e.to_string()))?;
        Ok(self.vms_dir.join(&vm.name))
    }

    /// The host directory an image's root is, canonical.
    fn image_root(&self, image: &str) -> Result<PathBuf, VmmsError> {
        if image == HOST_IMAGE {
            return Ok(PathBuf::from("/"));
        }
        check_image(image).map_err(|_| VmmsError::NoSuchImage(image.to_string()))?;
        let root = self
            .images_dir
            .join(image)
            .canonicalize()
            .map_err(|_| VmmsError::NoSuchImage(image.to_string()))?;
        if !root.is_dir() {
            return Err(VmmsError::NoSuchImage(image.to_string()));
        }
        Ok(root)
    }

    fn limits(&self, vm: &Machine) -> Limits {
        Limits {
            memory_bytes: self.memory_mb(vm) * 1024 * 1024,
            max_pids: self.config.default_max_pids,
            cores: vm.cores.map(f64::from).or(self.config.default_cores),
        }
    }

    fn memory_mb(&self, vm: &Machine) -> u64 {
        vm.memory_mb.unwrap_or(self.config.default_memory_mb)
    }

    async fn destroy_by_name(&self, name: &str) -> Result<(), VmmsError> {
        self.cgroups.remove(name).await?;
        let dir = self.vms_dir.join(name);
        self.delete_vm_files(&dir, |dir| {
            // Deleting through a live bind mount would delete the image.
            mounts::unmount_all_under(dir)?;
            match fs::remove_dir_all(dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(VmmsError::io(format!("removing {}", dir.display()), e))
                }
                _ => Ok(()),
            }
        })
        .await
    }

    fn require_vm(&self, vm: &Machine) -> Result<PathBuf, VmmsError> {
        let dir = self.vm_dir(vm)?;
        if dir.join("machine.json").is_file() {
            Ok(dir)
        } else {
            Err(VmmsError::NoSuchVm(vm.name.clone()))
        }
    }

    /// The autodriver's arguments: tango-core's plus the sandbox's paths.
    fn autodriver_args(&self, vm: &Machine, req: &RunRequest) -> Vec<String> {
        let uid = match &self.rootless {
            Some(map) => map.grading_id(vm.id),
            None => UID_BASE + vm.id % UID_SPAN,
        };
        let summary = format!("{}/summary.json", jail::CTL_IN_VM);
        let mut args = req.autodriver_args(&format!("{uid}:{uid}"), &summary, JOB_DIR_IN_VM);
        let dir = args.pop().unwrap_or_else(|| JOB_DIR_IN_VM.to_string());
        if !args.iter().any(|a| a == "--home") {
            args.extend(["--home".to_string(), GRADER_HOME_IN_VM.to_string()]);
        }
        if !args.iter().any(|a| a == "--stream") {
            args.extend([
                "--stream".to_string(),
                format!("{}/stream", jail::CTL_IN_VM),
            ]);
        }
        args.push(dir);
        args
    }

    fn notes(&self, vm: &Machine, before: Counters, after: Counters) -> Vec<String> {
        let mut notes = Vec::new();
        if after.oom_kills > before.oom_kills {
            notes.push(format!(
                "The job was killed: it exceeded its memory limit of {} MiB",
                self.memory_mb(vm)
            ));
        }
        if after.pids_max_hits > before.pids_max_hits {
            notes.push(format!(
                "The job hit its limit of {} processes",
                self.config.default_max_pids
            ));
        }
        notes
    }
}

/// Kills a VM's processes when a running job's future is dropped.
struct KillGuard<'a> {
    cgroups: &'a CgroupTree,
    vm: &'a str,
    armed: bool,
}

impl Drop for KillGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Err(e) = self.cgroups.kill_once(self.vm) {
            tracing::warn!(vm = self.vm, error = %e, "killing an abandoned job");
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.cgroups.remove_empty_bases();
    }
}

#[async_trait]
impl Vmms for Sandbox {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    async fn initialize_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        let dir = self.vm_dir(vm)?;
        let image_root = self.image_root(&vm.image)?;
        let missing: Vec<&str> = REQUIRED_IMAGE_DIRS
            .iter()
            .copied()
            .filter(|d| !image_root.join(d).is_dir())
            .collect();
        if !missing.is_empty() {
            return Err(VmmsError::Backend(format!(
                "image {} ({}) lacks the directories {} that the sandbox mounts over; create them in the image",
                vm.image,
                image_root.display(),
                missing.iter().map(|d| format!("/{d}")).collect::<Vec<_>>().join(", ")
            )));
        }
        if dir.exists() || self.cgroups.exists(&vm.name) {
            // A VM of this name survived something (a crash, a failed
            // destroy): start from nothing rather than from its leftovers.
            self.destroy_by_name(&vm.name).await?;
        }
        make_dir(&dir, 0o700)?;
        // The VM's files live on a tmpfs as large as its memory limit: the
        // job's writes are charged to its memory cgroup (no job can fill the
        // host's disk) and destroying the VM is an unmount, not a recursive
        // delete on a busy disk. Rootless, tangod cannot mount on the host:
        // a plain directory, bounded only by the autodriver's file size limit.
        if self.rootless.is_none() {
            let mounted = mounts::mount_tmpfs(&dir, self.memory_mb(vm));
            if let Err(e) = mounted {
                let _ = fs::remove_dir(&dir);
                return Err(e);
            }
        }
        make_vm_subdirs(&dir)?;
        make_dir(&dir.join("root"), 0o755)?;
        self.cgroups.create(&vm.name, &self.limits(vm))?;
        let mut record = vm.clone();
        record.credentials = None;
        let json = serde_json::to_vec_pretty(&record)
            .map_err(|e| VmmsError::Backend(format!("encoding the VM record: {e}")))?;
        // Written last: its presence means the VM is complete.
        fs::write(dir.join("machine.json"), json)
            .map_err(io_err(format!("writing {}/machine.json", dir.display())))?;
        Ok(())
    }

    async fn wait_vm(&self, vm: &Machine, _max: Duration) -> Result<(), VmmsError> {
        // Ready as soon as it exists: there is nothing to boot.
        self.require_vm(vm).map(|_| ())
    }

    async fn copy_in(&self, vm: &Machine, files: &[InputFile]) -> Result<(), VmmsError> {
        let job_dir = self.require_vm(vm)?.join("home").join("job");
        make_dir(&job_dir, 0o755)?;
        for file in files {
            check_component("destination file name", &file.dest_file)
                .map_err(|e| VmmsError::Backend(e.to_string()))?;
            let dest = job_dir.join(&file.dest_file);
            // A copy, not a hard link: the job may modify its files, and the
            // snapshot must stay intact for retries.
            tokio::fs::copy(&file.path, &dest)
                .await
                .map_err(io_err(format!(
                    "copying {} to {}",
                    file.path.display(),
                    dest.display()
                )))?;
        }
        Ok(())
    }

    async fn run_job(&self, vm: &Machine, req: &RunRequest) -> Result<RunOutcome, VmmsError> {
        let dir = self.require_vm(vm)?;
        let image_root = self.image_root(&vm.image)?;
        let ctl = dir.join("ctl");
        for stale in ["summary.json", "stream"] {
            match fs::remove_file(ctl.join(stale)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(VmmsError::io(
                        format!("removing {}", ctl.join(stale).display()),
                        e,
                    ))
                }
                _ => {}
            }
        }
        let output_path = ctl.join("output");
        let output = fs::File::create(&output_path)
            .map_err(io_err(format!("creating {}", output_path.display())))?;
        let before = self.cgroups.counters(&vm.name);
        // A job that runs long yields contended CPU to the short ones
        // beside it (a reused VM starts every job fresh again).
        self.cgroups
            .set_cpu_priority(&vm.name, CpuPriority::Fresh)?;
        let demote = AbortOnDrop({
            let cgroups = self.cgroups.clone();
            let name = vm.name.clone();
            tokio::spawn(async move {
                for (at, priority) in [
                    (FRESH_FOR, CpuPriority::Normal),
                    (BACKGROUND_AFTER - FRESH_FOR, CpuPriority::Background),
                ] {
                    tokio::time::sleep(at).await;
                    if let Err(e) = cgroups.set_cpu_priority(&name, priority) {
                        tracing::debug!("cannot lower the CPU priority of {name}: {e}");
                    }
                }
            })
        });
        let args = self.autodriver_args(vm, req);
        let cgroup_procs = self.cgroups.procs_files(&vm.name);
        let (child_side, handshake) = match self.rootless {
            Some(_) => {
                let (child, parent) = userns::handshake_pipes()?;
                (Some(child), Some(parent))
            }
            None => (None, None),
        };
        let spec = jail::JailSpec {
            image_root: &image_root,
            vm_dir: &dir,
            autodriver: &self.autodriver,
            hidden: &self.hidden,
            hostname: &vm.name,
            new_net: !self.config.allow_network || req.disable_network,
            cgroup_procs: &cgroup_procs,
            args: &args,
            output,
            memory_mb: self.memory_mb(vm),
            grader_home: GRADER_HOME_IN_VM,
            userns: child_side,
        };
        let mut child = jail::spawn(spec).map_err(|e| match jail::setup_failure(&output_path) {
            Some(step) => VmmsError::Backend(format!(
                "setting up the sandbox of {} failed at {step}: {e}",
                vm.name
            )),
            None => e,
        })?;
        // Dropping this future (the engine's timeout) drops `child`, whose
        // kill_on_drop SIGKILLs C1, which takes the whole job down with it
        // (C2 dies of PR_SET_PDEATHSIG, the rest with C2's PID namespace).
        // The guard also kills the cgroup's members directly, for the
        // instant between C2's fork and its prctl.
        let mut guard = KillGuard {
            cgroups: &self.cgroups,
            vm: &vm.name,
            armed: true,
        };
        if let (Some(handshake), Some(map)) = (handshake, &self.rootless) {
            let pid = child.id().unwrap_or(0);
            if let Err(e) = handshake.complete(pid, map).await {
                return Err(match jail::setup_failure(&output_path) {
                    Some(step) => VmmsError::Backend(format!(
                        "setting up the sandbox of {} failed at {step}: {e}",
                        vm.name
                    )),
                    None => e,
                });
            }
        }
        let status = child
            .wait()
            .await
            .map_err(io_err(format!("waiting for the job in {}", vm.name)))?;
        guard.armed = false;
        drop(demote);
        // Between jobs the VM rests at the default: a job's weight is only
        // ever raised for the job itself.
        if let Err(e) = self.cgroups.set_cpu_priority(&vm.name, CpuPriority::Normal) {
            tracing::debug!("cannot reset the CPU priority of {}: {e}", vm.name);
        }
        // The job's PID namespace is gone; this only catches the impossible.
        self.cgroups.kill_all(&vm.name).await?;
        let after = self.cgroups.counters(&vm.name);
        let exit_code = status.code();
        if exit_code == Some(jail::SETUP_FAILED_EXIT) {
            if let Some(step) = jail::setup_failure(&output_path) {
                return Err(VmmsError::Backend(format!(
                    "setting up the sandbox of {} failed at {step}",
                    vm.name
                )));
            }
        }
        let summary = fs::read(ctl.join("summary.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        Ok(RunOutcome {
            status: RunStatus::from_exit_code(exit_code),
            exit_code,
            summary,
            notes: self.notes(vm, before, after),
        })
    }

    async fn copy_out(&self, vm: &Machine, dest: &Path) -> Result<(), VmmsError> {
        let output = self.require_vm(vm)?.join("ctl").join("output");
        tokio::fs::copy(&output, dest)
            .await
            .map_err(io_err(format!(
                "copying {} to {}",
                output.display(),
                dest.display()
            )))?;
        Ok(())
    }

    async fn destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.vm_dir(vm)?;
        self.destroy_by_name(&vm.name).await
    }

    async fn safe_destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.destroy_vm(vm).await?;
        if self.vm_dir(vm)?.exists() || self.cgroups.exists(&vm.name) {
            return Err(VmmsError::Backend(format!(
                "VM {} is still present after destroying it",
                vm.name
            )));
        }
        Ok(())
    }

    async fn get_vms(&self, prefix: &str) -> Result<Vec<Machine>, VmmsError> {
        let mut vms = Vec::new();
        for name in self.vm_dir_names()? {
            let Some((id, image)) = parse_machine_name(prefix, &name) else {
                continue;
            };
            let recorded = fs::read(self.vms_dir.join(&name).join("machine.json"))
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Machine>(&bytes).ok())
                .filter(|m| m.name == name);
            vms.push(recorded.unwrap_or_else(|| Machine::new(prefix, id, &image, "sandbox")));
        }
        vms.sort_by_key(|m| m.id);
        Ok(vms)
    }

    async fn exists_vm(&self, vm: &Machine) -> Result<bool, VmmsError> {
        Ok(self.require_vm(vm).is_ok() && self.cgroups.exists(&vm.name))
    }

    async fn get_images(&self) -> Result<Vec<String>, VmmsError> {
        let mut images = vec![HOST_IMAGE.to_string()];
        let entries = fs::read_dir(&self.images_dir)
            .map_err(io_err(format!("listing {}", self.images_dir.display())))?;
        let mut found: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|name| name != HOST_IMAGE && check_image(name).is_ok())
            .filter(|name| {
                // Looks like a root filesystem (follows a symlinked image).
                let root = self.images_dir.join(name);
                root.join("usr").is_dir() || root.join("bin").is_dir()
            })
            .collect();
        found.sort();
        images.extend(found);
        Ok(images)
    }

    async fn partial_output(&self, vm: &Machine, max_bytes: usize) -> Result<Vec<u8>, VmmsError> {
        let stream = self.require_vm(vm)?.join("ctl").join("stream");
        let file = match tokio::fs::File::open(&stream).await {
            Ok(f) => f,
            // No job has started printing yet.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(VmmsError::io(format!("opening {}", stream.display()), e)),
        };
        let mut bytes = Vec::new();
        file.take(max_bytes as u64)
            .read_to_end(&mut bytes)
            .await
            .map_err(io_err(format!("reading {}", stream.display())))?;
        Ok(bytes)
    }

    async fn reset_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        let dir = self.require_vm(vm)?;
        self.cgroups.kill_all(&vm.name).await?;
        self.delete_vm_files(&dir, |dir| {
            for sub in VM_SUBDIRS {
                empty_dir(&dir.join(sub))?;
            }
            // Again, after a removal in the user namespace.
            make_vm_subdirs(dir)
        })
        .await
    }
}
