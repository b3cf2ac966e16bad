//! A worked example of a VMMS backend, written against the public `Vmms`
//! trait and docs/writing-a-vmms.md only: the guide walks through it.
//!
//! **It gives no isolation.** A "VM" is a directory on this host, and a job
//! is the autodriver run as a local process: the job sees the host's files
//! and, unless the job asks for no network, the host's network. Limits are
//! the autodriver's own (processes, file size, address space, time, output)
//! and a grading uid of the VM's own, which keeps jobs out of each other's
//! files and processes. Use it to develop tangod or a course's Makefiles on
//! a machine with no Docker and no cgroups; never for students' code.
//!
//! Layout of a VM `<root>/<name>/`:
//!
//! | path | what |
//! |---|---|
//! | `job/` | the job directory `copy_in` fills |
//! | `home/` | the grading user's home (the autodriver empties it after each job) |
//! | `output` | the autodriver's stdout: the job's capped output |
//! | `stream`, `summary.json` | the autodriver's `--stream` and `--summary` |
//!
//! Everything else it needs is in the directory's name, `<prefix>-<id>-<image>`,
//! so a VM that `initialize_vm` left half made is still listed and removed.

use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tango_core::model::{parse_machine_name, InputFile, Machine};
use tango_core::vmms::{RunOutcome, RunRequest, RunStatus, Vmms, VmmsError};

/// The one image: the host, as it is.
pub const IMAGE: &str = "local";

#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Where VM directories go. The grading users must be able to reach
    /// it: every directory above it must be searchable by all (mode o+x).
    pub root: PathBuf,
    /// The static autodriver (tangod's `config.find_autodriver()`).
    pub autodriver: PathBuf,
    /// VM `id` runs its jobs as uid `first_uid + id % uids`: distinct for
    /// VMs running at once, because the autodriver kills all of its uid's
    /// processes after a job. Pick a range no account on the host uses.
    pub first_uid: u32,
    pub uids: u32,
    /// Address space limit of a job (`--mem-bytes`) when the VM names none.
    pub default_memory_mb: u64,
}

impl LocalConfig {
    pub fn new(root: PathBuf, autodriver: PathBuf) -> Self {
        LocalConfig {
            root,
            autodriver,
            first_uid: 61000,
            uids: 1000,
            default_memory_mb: 1024,
        }
    }
}

pub struct Local {
    config: LocalConfig,
}

impl Local {
    /// Checks what every job needs, so a bad setting fails at start.
    pub fn new(config: LocalConfig) -> Result<Self, VmmsError> {
        if !config.autodriver.is_file() {
            return Err(VmmsError::Backend(format!(
                "local: the autodriver {} is not a file (build it with `cargo build --release -p autodriver`)",
                config.autodriver.display()
            )));
        }
        if config.uids == 0 {
            return Err(VmmsError::Backend("local: uids must be at least 1".into()));
        }
        std::fs::create_dir_all(&config.root)
            .map_err(|e| VmmsError::io(format!("local: creating {}", config.root.display()), e))?;
        set_mode(&config.root, 0o711)?;
        // Jobs run as other uids: they must be able to reach their VM.
        let root = config
            .root
            .canonicalize()
            .map_err(|e| VmmsError::io(format!("local: resolving {}", config.root.display()), e))?;
        for dir in root.ancestors() {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir)
                .map_err(|e| VmmsError::io(format!("local: reading {}", dir.display()), e))?
                .permissions()
                .mode();
            if mode & 0o001 == 0 {
                return Err(VmmsError::Backend(format!(
                    "local: jobs run as other users and cannot reach {} (mode {:o}): \
                     make it searchable by all (chmod o+x) or choose another root",
                    dir.display(),
                    mode & 0o777
                )));
            }
        }
        Ok(Local { config })
    }

    /// The VM's directory. Names come from the engine, but a name that
    /// could leave `root` is refused rather than trusted.
    fn dir(&self, vm: &Machine) -> Result<PathBuf, VmmsError> {
        if vm.name.is_empty() || vm.name.contains('/') || vm.name.starts_with('.') {
            return Err(VmmsError::Backend(format!(
                "local: {:?} cannot be a VM name",
                vm.name
            )));
        }
        Ok(self.config.root.join(&vm.name))
    }

    /// The VM's directory, or `NoSuchVm`.
    fn existing(&self, vm: &Machine) -> Result<PathBuf, VmmsError> {
        let dir = self.dir(vm)?;
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(VmmsError::NoSuchVm(vm.name.clone()))
        }
    }

    fn uid(&self, vm: &Machine) -> u32 {
        // uids >= 1 (checked in new), so the remainder fits in u32.
        self.config.first_uid + (vm.id % u64::from(self.config.uids)) as u32
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), VmmsError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| VmmsError::io(format!("local: setting the mode of {}", path.display()), e))
}

async fn remove_if_present(path: &Path) -> Result<(), VmmsError> {
    let removed = if path.is_dir() {
        tokio::fs::remove_dir_all(path).await
    } else {
        tokio::fs::remove_file(path).await
    };
    match removed {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(VmmsError::io(
            format!("local: removing {}", path.display()),
            e,
        )),
        _ => Ok(()),
    }
}

/// Sends SIGTERM to the autodriver if `run_job` is dropped (the engine's
/// timeout, or shutdown) while it runs: on SIGTERM the autodriver kills the
/// job and everything its uid left, where SIGKILL would orphan them.
struct TermOnDrop(Option<u32>);

impl Drop for TermOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|pid| i32::try_from(pid).ok()) {
            // SAFETY: kill has no memory effects; the pid is our child, not
            // yet reaped (we are dropped before wait() returned).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

#[async_trait]
impl Vmms for Local {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn initialize_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        if vm.image != IMAGE {
            return Err(VmmsError::NoSuchImage(vm.image.clone()));
        }
        let dir = self.dir(vm)?;
        // Initialising a VM that exists starts it afresh.
        remove_if_present(&dir).await?;
        for sub in [&dir, &dir.join("job"), &dir.join("home")] {
            tokio::fs::create_dir_all(sub)
                .await
                .map_err(|e| VmmsError::io(format!("local: creating {}", sub.display()), e))?;
            set_mode(sub, 0o711)?;
        }
        Ok(())
    }

    async fn wait_vm(&self, vm: &Machine, _max: Duration) -> Result<(), VmmsError> {
        // Nothing boots: a VM is ready once its directory exists.
        self.existing(vm).map(drop)
    }

    async fn copy_in(&self, vm: &Machine, files: &[InputFile]) -> Result<(), VmmsError> {
        let dir = self.existing(vm)?;
        let job = dir.join("job");
        // A job starts with nothing of the last one: files, output, stream.
        for stale in [&job, &dir.join("output"), &dir.join("stream")] {
            remove_if_present(stale).await?;
        }
        tokio::fs::create_dir(&job)
            .await
            .map_err(|e| VmmsError::io(format!("local: creating {}", job.display()), e))?;
        set_mode(&job, 0o711)?;
        for file in files {
            let dest = job.join(&file.dest_file);
            tokio::fs::copy(&file.path, &dest).await.map_err(|e| {
                VmmsError::io(
                    format!("local: copying {} into {}", file.path.display(), vm.name),
                    e,
                )
            })?;
        }
        Ok(())
    }

    async fn run_job(&self, vm: &Machine, req: &RunRequest) -> Result<RunOutcome, VmmsError> {
        let dir = self.existing(vm)?;
        let uid = self.uid(vm);
        let summary = dir.join("summary.json");
        let mut args = req.autodriver_args(
            &format!("{uid}:{uid}"),
            &summary.display().to_string(),
            &dir.join("job").display().to_string(),
        );
        // The job directory comes last; the example's own options go before it.
        let job_dir = args.pop().unwrap_or_default();
        let memory_mb = vm.memory_mb.unwrap_or(self.config.default_memory_mb);
        args.extend([
            "--home".into(),
            dir.join("home").display().to_string(),
            "--stream".into(),
            dir.join("stream").display().to_string(),
            "--mem-bytes".into(),
            (memory_mb << 20).to_string(),
            job_dir,
        ]);
        let output_path = dir.join("output");
        let output = std::fs::File::create(&output_path)
            .map_err(|e| VmmsError::io(format!("local: creating {}", output_path.display()), e))?;
        // No network but loopback: a network namespace of its own (its
        // loopback stays down, which is fine for an example).
        let mut command = if req.disable_network {
            let mut c = tokio::process::Command::new("unshare");
            c.arg("--net").arg("--").arg(&self.config.autodriver);
            c
        } else {
            tokio::process::Command::new(&self.config.autodriver)
        };
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(Stdio::inherit());
        let mut child = command.spawn().map_err(|e| {
            VmmsError::io(
                format!("local: starting {}", self.config.autodriver.display()),
                e,
            )
        })?;
        let mut guard = TermOnDrop(child.id());
        let status = child.wait().await.map_err(|e| {
            VmmsError::io(
                format!("local: waiting for the autodriver of {}", vm.name),
                e,
            )
        })?;
        guard.0 = None;
        let status_kind = RunStatus::from_exit_code(status.code());
        // The summary is this run's only when the autodriver ran the job.
        let summary = match status_kind {
            RunStatus::Completed | RunStatus::TimedOut => tokio::fs::read(&summary)
                .await
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok()),
            _ => None,
        };
        Ok(RunOutcome {
            status: status_kind,
            exit_code: status.code(),
            summary,
            notes: Vec::new(),
        })
    }

    async fn copy_out(&self, vm: &Machine, dest: &Path) -> Result<(), VmmsError> {
        let output = self.existing(vm)?.join("output");
        tokio::fs::copy(&output, dest)
            .await
            .map(drop)
            .map_err(|e| VmmsError::io(format!("local: copying the output of {}", vm.name), e))
    }

    async fn destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        remove_if_present(&self.dir(vm)?).await
    }

    async fn safe_destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        // Absent is success: the engine destroys VMs in every state.
        let dir = self.dir(vm)?;
        remove_if_present(&dir).await?;
        if dir.exists() {
            return Err(VmmsError::Backend(format!(
                "local: {} is still there after removing it",
                dir.display()
            )));
        }
        Ok(())
    }

    async fn get_vms(&self, prefix: &str) -> Result<Vec<Machine>, VmmsError> {
        let mut entries = tokio::fs::read_dir(&self.config.root).await.map_err(|e| {
            VmmsError::io(format!("local: listing {}", self.config.root.display()), e)
        })?;
        let mut vms = Vec::new();
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|e| VmmsError::io("local: listing VMs", e))?
        {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            // Only names that really carry the prefix: `tango` must not
            // list (and so destroy) the VMs of a server with prefix `tango2`.
            if let Some((id, image)) = parse_machine_name(prefix, &name) {
                let mut vm = Machine::new(prefix, id, &image, self.name());
                vm.name = name;
                vms.push(vm);
            }
        }
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(vms)
    }

    async fn exists_vm(&self, vm: &Machine) -> Result<bool, VmmsError> {
        Ok(self.dir(vm)?.is_dir())
    }

    async fn get_images(&self) -> Result<Vec<String>, VmmsError> {
        Ok(vec![IMAGE.to_string()])
    }

    async fn partial_output(&self, vm: &Machine, max_bytes: usize) -> Result<Vec<u8>, VmmsError> {
        let stream = self.existing(vm)?.join("stream");
        match tokio::fs::read(&stream).await {
            Ok(mut bytes) => {
                bytes.truncate(max_bytes);
                Ok(bytes)
            }
            // Before the autodriver starts there is no stream yet.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(VmmsError::io(
                format!("local: reading {}", stream.display()),
                e,
            )),
        }
    }

    async fn reset_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        // The autodriver already killed the job's processes and removed its
        // files in home and /tmp; what is left is this backend's own.
        let dir = self.existing(vm)?;
        for stale in ["output", "stream", "summary.json"] {
            remove_if_present(&dir.join(stale)).await?;
        }
        Ok(())
    }
}
