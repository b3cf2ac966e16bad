//! The `ec2` backend: each VM is an Amazon EC2 instance reached over SSH.
//!
//! The control plane is the EC2 API (aws-sdk-ec2): an instance is launched
//! from the AMI the image name maps to, tagged with the server's prefix and
//! the VM's name (`get_vms` and the orphan sweep find instances by these
//! tags), and terminated when the VM is destroyed. Everything else goes
//! over SSH (russh), one connection per VM, one exec channel per command:
//! the input files as a tar (small inputs through the stdin of the run
//! itself, the autodriver's `--input-tar -`; large ones into `tar -x` at
//! copy-in), the autodriver (copied in once when the AMI lacks it), and
//! the job's output, which streams back over the run's channel into a file
//! on the host (as with the docker backend, so `copy_out` costs no round
//! trip).
//!
//! On the instance everything of the backend lives in
//! `<remote_dir>/<vm name>` (mode 0700, root): the job directory of the
//! last copy-in, the autodriver's summary and live output stream. Commands
//! run as root: directly when `ssh_user` is root, else through `sudo -n`.
//!
//! A VM carrying credentials (a job's `accessKeyId`/`accessKey`) is
//! launched, watched and terminated with a client for that account, built
//! once per access key id.
//!
//! One concern per file, each with its own unit tests: this file holds
//! what is remembered of each VM, the connection ([`Ec2::connect`]) and
//! the [`Vmms`] methods, each a call into one of: `config.rs` (the
//! settings, [`Ec2Config`]), `instances.rs` (launching, finding and
//! terminating instances through the EC2 API), `session.rs` (waiting for
//! an instance, its SSH connection, preparing it, commands as root),
//! `jobs.rs` (copy-in, the job's run over SSH, its output), `api.rs` (the
//! EC2 clients, filters and errors), `ssh.rs` (the SSH client) and
//! `archive.rs` (tars of the input files).

mod api;
mod archive;
mod config;
mod instances;
mod jobs;
mod session;
mod ssh;
#[doc(hidden)]
pub mod testing;

pub use api::{TAG_IMAGE, TAG_PREFIX, TAG_VM, TAG_VM_ID};
pub use config::Ec2Config;

use async_trait::async_trait;
use russh::keys::PrivateKey;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tango_core::model::{InputFile, Machine};
use tango_core::vmms::{RunOutcome, RunRequest, Vmms, VmmsError};

/// What the backend remembers of a VM between trait calls.
#[derive(Default)]
struct VmState {
    instance_id: Option<String>,
    /// Where SSH goes.
    address: Option<String>,
    /// The host key seen first; later connections must show the same.
    host_key: Option<String>,
    session: Option<Arc<ssh::Session>>,
    /// The instance was probed (autodriver in place, user known).
    prepared: Option<Prepared>,
    /// Job directory (on the instance) of the last copy-in not yet run.
    pending_job_dir: Option<String>,
    /// That copy-in's files, when they go with the run (see
    /// [`jobs::STDIN_INPUT_MAX_BYTES`]); `None` when they were unpacked
    /// already.
    pending_input: Option<Vec<(String, PathBuf)>>,
    /// The current job's autodriver was started: `partial_output` may read
    /// its stream.
    run_started: bool,
    /// Host file with the output of the last run.
    output: Option<PathBuf>,
}

#[derive(Clone)]
struct Prepared {
    /// `--user` of jobs.
    user: String,
    has_unshare: bool,
}

/// The ec2 VMMS. One instance serves every VM of the server.
pub struct Ec2 {
    config: Ec2Config,
    clients: api::Clients,
    ssh_key: Arc<PrivateKey>,
    autodriver: Arc<Vec<u8>>,
    /// Part of every launch's idempotency token: a retried request of this
    /// process is not launched twice, another process's never matches.
    nonce: String,
    vms: Mutex<HashMap<String, VmState>>,
}

/// A VM name as one path component on the instance.
fn path_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn ssh_error(vm: &str, context: &str, error: ssh::SshError) -> VmmsError {
    VmmsError::Backend(format!("ec2: {context} {vm}: {error}"))
}

impl Ec2 {
    /// Reads the autodriver and the SSH key and builds the API client; asks
    /// nothing of the API yet (see [`Ec2::check`]).
    pub async fn connect(config: Ec2Config) -> Result<Ec2, VmmsError> {
        let binary = tokio::fs::read(&config.autodriver).await.map_err(|e| {
            VmmsError::io(
                format!("cannot read the autodriver {}", config.autodriver.display()),
                e,
            )
        })?;
        if !binary.starts_with(b"\x7fELF") {
            return Err(VmmsError::Backend(format!(
                "{} is not an executable (ELF) file",
                config.autodriver.display()
            )));
        }
        let ssh_key = russh::keys::load_secret_key(&config.ssh_key, None).map_err(|e| {
            VmmsError::Backend(format!(
                "ec2: cannot load the SSH key {} (an unencrypted OpenSSH or PEM private key): {e}",
                config.ssh_key.display()
            ))
        })?;
        tokio::fs::create_dir_all(&config.work_dir)
            .await
            .map_err(|e| {
                VmmsError::io(format!("cannot create {}", config.work_dir.display()), e)
            })?;
        let clients = api::Clients::new(&config).await;
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        Ok(Ec2 {
            config,
            clients,
            ssh_key: Arc::new(ssh_key),
            autodriver: Arc::new(binary),
            nonce: format!("{:x}{:x}", nonce, std::process::id()),
            vms: Mutex::new(HashMap::new()),
        })
    }

    fn with_state<T>(&self, name: &str, f: impl FnOnce(&mut VmState) -> T) -> T {
        let mut vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
        f(vms.entry(name.to_string()).or_default())
    }

    fn forget(&self, name: &str) -> Option<VmState> {
        self.vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }

    /// Drops what is known of a VM: closes its connection, removes its
    /// output file.
    async fn forget_vm(&self, name: &str) {
        if let Some(state) = self.forget(name) {
            if let Some(session) = state.session {
                session.close().await;
            }
            if let Some(output) = state.output {
                let _ = tokio::fs::remove_file(output).await;
            }
        }
    }

    fn vm_dir(&self, vm: &Machine) -> String {
        format!(
            "{}/{}",
            self.config.remote_dir.trim_end_matches('/'),
            path_safe(&vm.name)
        )
    }
}

#[async_trait]
impl Vmms for Ec2 {
    fn name(&self) -> &'static str {
        "ec2"
    }

    async fn initialize_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.launch_vm(vm).await
    }

    async fn wait_vm(&self, vm: &Machine, max: Duration) -> Result<(), VmmsError> {
        self.wait_or_terminate(vm, max).await
    }

    async fn copy_in(&self, vm: &Machine, files: &[InputFile]) -> Result<(), VmmsError> {
        self.copy_inputs(vm, files).await
    }

    async fn run_job(&self, vm: &Machine, req: &RunRequest) -> Result<RunOutcome, VmmsError> {
        self.run(vm, req).await
    }

    async fn copy_out(&self, vm: &Machine, dest: &Path) -> Result<(), VmmsError> {
        self.copy_output(vm, dest).await
    }

    async fn destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.terminate(vm).await.map(|_| ())
    }

    async fn safe_destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.terminate_confirmed(vm).await
    }

    async fn get_vms(&self, prefix: &str) -> Result<Vec<Machine>, VmmsError> {
        self.list_vms(prefix).await
    }

    async fn exists_vm(&self, vm: &Machine) -> Result<bool, VmmsError> {
        self.instance_exists(vm).await
    }

    async fn get_images(&self) -> Result<Vec<String>, VmmsError> {
        Ok(self.config.images.keys().cloned().collect())
    }

    async fn partial_output(&self, vm: &Machine, max_bytes: usize) -> Result<Vec<u8>, VmmsError> {
        self.read_partial_output(vm, max_bytes).await
    }

    async fn reset_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.check_reusable(vm).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let vm = Machine::new("prod", 7, "course/img:v2", "ec2");
        assert_eq!(path_safe(&vm.name), "prod-7-course_img_v2");
    }
}
