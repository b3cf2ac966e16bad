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

mod api;
mod archive;
mod ssh;
#[doc(hidden)]
pub mod testing;

pub use api::{TAG_IMAGE, TAG_PREFIX, TAG_VM, TAG_VM_ID};

use async_trait::async_trait;
use aws_sdk_ec2::types::{
    InstanceInterruptionBehavior, InstanceMarketOptionsRequest, InstanceStateName, InstanceType,
    MarketType, ResourceType, SpotInstanceType, SpotMarketOptions, Tag, TagSpecification,
};
use russh::keys::PrivateKey;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tango_core::model::{CloudCredentials, InputFile, Machine};
use tango_core::vmms::{RunOutcome, RunRequest, RunStatus, Vmms, VmmsError};
use tokio::time::Instant;

/// How long past the job's own time limit the backend waits for the
/// autodriver to report (it kills the job at the limit, then cleans up).
const RUN_GRACE: Duration = Duration::from_secs(60);
/// Bytes of autodriver output kept on the host beyond the job's output cap
/// (its header line and its own error messages).
const OUTPUT_SLACK: u64 = 1 << 20;
/// Input files up to this size (in all) go to the instance with the run
/// itself, through the stdin of the autodriver (`--input-tar -`): each
/// SSH exec costs a round trip and sshd's session setup (~130 ms on
/// loopback here). Larger inputs are unpacked by `tar` at copy-in, so
/// their transfer does not count against the job's run time.
const STDIN_INPUT_MAX_BYTES: u64 = 8 << 20;
/// The autodriver's tar reader takes names under 100 bytes only.
const STDIN_INPUT_MAX_NAME: usize = 99;

/// Settings of the ec2 backend.
#[derive(Debug, Clone)]
pub struct Ec2Config {
    pub region: String,
    /// The EC2 API endpoint instead of AWS's (e.g. moto for tests).
    pub endpoint_url: Option<String>,
    /// The server's own keys; `None`: the SDK's chain (environment,
    /// profile, instance role).
    pub credentials: Option<CloudCredentials>,
    /// Image name (as jobs give it) to AMI id.
    pub images: BTreeMap<String, String>,
    pub instance_type: String,
    pub security_group_ids: Vec<String>,
    /// The EC2 key pair installed for `ssh_user` (its private half is
    /// `ssh_key`).
    pub key_name: Option<String>,
    pub subnet_id: Option<String>,
    /// Ask for spot instances; when EC2 cannot give one, launch on demand.
    pub spot: bool,
    /// SSH to the public IP instead of the private one (tangod outside the
    /// VPC).
    pub use_public_ip: bool,
    /// SSH to this host whatever the instance's address (tests: a local
    /// sshd standing in for the instance).
    pub ssh_host_override: Option<String>,
    pub ssh_port: u16,
    pub ssh_user: String,
    /// Private key file (OpenSSH or PEM).
    pub ssh_key: PathBuf,
    /// Host path of the static autodriver binary.
    pub autodriver: PathBuf,
    /// The autodriver's path on instances; copied there when missing.
    pub remote_autodriver: String,
    /// The backend's directory on instances.
    pub remote_dir: String,
    /// The grading user when the instance has it, else `fallback_user`
    /// (`UID:GID`). A `UID:GID` here is used as it is.
    pub grading_user: String,
    pub fallback_user: String,
    /// The grading user's home (`--home`); `None`: the autodriver's default.
    pub grading_home: Option<String>,
    /// Run jobs with `disable_network` in a new network namespace
    /// (`unshare --net`, loopback only).
    pub isolate_network: bool,
    /// Host directory for the captured output of each VM's job.
    pub work_dir: PathBuf,
    /// Bound on each EC2 API request.
    pub api_timeout: Duration,
    /// Bound on one SSH connection attempt.
    pub ssh_connect_timeout: Duration,
    /// Bound on an SSH command other than the job (copy-in, probes).
    pub ssh_command_timeout: Duration,
    /// Pause between looks at an instance that is starting or stopping.
    pub poll_interval: Duration,
    /// How long `safe_destroy_vm` waits for `terminated` (EC2 takes up to
    /// a minute or so; keep it below the engine's `destroy_secs`, which
    /// bounds the whole call).
    pub terminate_wait: Duration,
    /// Read the autodriver's `--summary` after each job (one more command).
    pub read_summary: bool,
}

impl Ec2Config {
    /// The defaults: us-east-1, t3.micro on demand, private IPs, SSH as
    /// `ubuntu` on port 22, the autodriver at
    /// `/usr/local/bin/tango-autodriver`, user `autograde` or else
    /// `1000:1000`, network isolation on.
    pub fn new(autodriver: PathBuf, work_dir: PathBuf, ssh_key: PathBuf) -> Self {
        Ec2Config {
            region: "us-east-1".into(),
            endpoint_url: None,
            credentials: None,
            images: BTreeMap::new(),
            instance_type: "t3.micro".into(),
            security_group_ids: vec![],
            key_name: None,
            subnet_id: None,
            spot: false,
            use_public_ip: false,
            ssh_host_override: None,
            ssh_port: 22,
            ssh_user: "ubuntu".into(),
            ssh_key,
            autodriver,
            remote_autodriver: "/usr/local/bin/tango-autodriver".into(),
            remote_dir: "/var/lib/tango-rs".into(),
            grading_user: "autograde".into(),
            fallback_user: "1000:1000".into(),
            grading_home: None,
            isolate_network: true,
            work_dir,
            api_timeout: Duration::from_secs(30),
            ssh_connect_timeout: Duration::from_secs(10),
            ssh_command_timeout: Duration::from_secs(120),
            poll_interval: Duration::from_secs(2),
            terminate_wait: Duration::from_secs(50),
            read_summary: false,
        }
    }
}

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
    /// [`STDIN_INPUT_MAX_BYTES`]); `None` when they were unpacked already.
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

/// The prefix part of `<prefix>-<id>-<image>`.
fn machine_prefix(vm: &Machine) -> Option<&str> {
    vm.name
        .strip_suffix(&format!("-{}-{}", vm.id, vm.image))
        .filter(|prefix| !prefix.is_empty())
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

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `user` is a `UID[:GID]`, not a name to look up.
fn is_numeric_user(user: &str) -> bool {
    user.split(':')
        .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
}

/// The grading uid must not be the SSH user's: after every job the
/// autodriver kills every process of the grading uid, the backend's own
/// session included, and deletes its files (e.g. `authorized_keys`). On an
/// AMI without an `autograde` user the fallback `1000:1000` is often the
/// SSH user (`ubuntu`, `admin`, `ec2-user`).
fn check_grading_uid(
    grader_uid: Option<u32>,
    ssh_uid: Option<u32>,
    grading_user: &str,
    ssh_user: &str,
) -> Result<(), VmmsError> {
    match (grader_uid, ssh_uid) {
        (Some(grader), Some(ssh)) if grader == ssh => Err(VmmsError::Backend(format!(
            "ec2: the grading user {grading_user} (uid {grader}) is the SSH user {ssh_user}: \
             jobs would kill the backend's session and delete its files; give the AMI an \
             `autograde` user or set [ec2] fallback_user to an unused uid"
        ))),
        _ => Ok(()),
    }
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

    /// One cheap API call with the server's credentials: fails when the
    /// endpoint, region or credentials are wrong.
    pub async fn check(&self) -> Result<(), VmmsError> {
        self.clients
            .server()
            .describe_instances()
            .max_results(5)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| api::sdk_error(&self.clients.endpoint, "cannot list instances", e))
    }

    /// Every instance of `prefix` in the account of `credentials` (the
    /// server's for `None`), terminated ones included: id, VM name, state.
    pub async fn instances(
        &self,
        prefix: &str,
        credentials: Option<&CloudCredentials>,
    ) -> Result<Vec<(String, String, String)>, VmmsError> {
        let client = self.clients.for_credentials(credentials);
        let found = self
            .bounded(api::describe(
                &client,
                &self.clients.endpoint,
                vec![api::tag_filter(TAG_PREFIX, prefix)],
                vec![],
            ))
            .await?;
        Ok(found
            .iter()
            .map(|i| {
                (
                    i.instance_id().unwrap_or_default().to_string(),
                    api::tag(i, TAG_VM).unwrap_or_default().to_string(),
                    api::state(i).map(|s| s.as_str()).unwrap_or("").to_string(),
                )
            })
            .collect())
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

    fn client(&self, vm: &Machine) -> aws_sdk_ec2::Client {
        self.clients.for_credentials(vm.credentials.as_ref())
    }

    /// An API future bounded by the API timeout (the SDK bounds each
    /// request; this bounds paging and retries together).
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, VmmsError>>,
    ) -> Result<T, VmmsError> {
        let limit = self.config.api_timeout * 3;
        tokio::time::timeout(limit, call).await.map_err(|_| {
            VmmsError::Backend(format!(
                "ec2: the EC2 API at {} did not answer within {limit:?}",
                self.clients.endpoint
            ))
        })?
    }

    /// `script` as the remote command, run by `sh` as root.
    fn remote(&self, script: &str) -> String {
        let sh = format!("sh -c {}", ssh::quote(script));
        if self.config.ssh_user == "root" {
            sh
        } else {
            format!("sudo -n {sh}")
        }
    }

    fn vm_dir(&self, vm: &Machine) -> String {
        format!(
            "{}/{}",
            self.config.remote_dir.trim_end_matches('/'),
            path_safe(&vm.name)
        )
    }

    /// The VM's instances that are not terminated (normally one): the one
    /// this process launched, or those carrying its name tag.
    async fn instance_ids(&self, vm: &Machine, states: &[&str]) -> Result<Vec<String>, VmmsError> {
        let client = self.client(vm);
        let found = self
            .bounded(api::describe(
                &client,
                &self.clients.endpoint,
                vec![api::tag_filter(TAG_VM, &vm.name), api::state_filter(states)],
                vec![],
            ))
            .await?;
        let mut ids: Vec<String> = found
            .iter()
            .filter_map(|i| i.instance_id().map(String::from))
            .collect();
        // A just launched instance may not show in filtered lists yet.
        if let Some(known) = self.with_state(&vm.name, |s| s.instance_id.clone()) {
            if !ids.contains(&known) {
                ids.push(known);
            }
        }
        Ok(ids)
    }

    async fn launch(
        &self,
        vm: &Machine,
        ami: &str,
        prefix: &str,
        spot: bool,
    ) -> Result<String, VmmsError> {
        let tags = [
            ("Name", vm.name.clone()),
            (TAG_PREFIX, prefix.to_string()),
            (TAG_VM, vm.name.clone()),
            (TAG_VM_ID, vm.id.to_string()),
            (TAG_IMAGE, vm.image.clone()),
        ]
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
        let market = spot.then(|| {
            InstanceMarketOptionsRequest::builder()
                .market_type(MarketType::Spot)
                .spot_options(
                    SpotMarketOptions::builder()
                        .spot_instance_type(SpotInstanceType::OneTime)
                        .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                        .build(),
                )
                .build()
        });
        let token = format!(
            "{:016x}-{}-{}",
            fnv1a(vm.name.as_bytes()),
            self.nonce,
            if spot { "s" } else { "o" }
        );
        let launched = self
            .client(vm)
            .run_instances()
            .image_id(ami)
            .instance_type(InstanceType::from(self.config.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .set_security_group_ids(
                (!self.config.security_group_ids.is_empty())
                    .then(|| self.config.security_group_ids.clone()),
            )
            .set_key_name(self.config.key_name.clone())
            .set_subnet_id(self.config.subnet_id.clone())
            .set_instance_market_options(market)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .set_tags(Some(tags))
                    .build(),
            )
            .client_token(token.chars().take(64).collect::<String>())
            .send();
        let output = self
            .bounded(async {
                launched.await.map_err(|e| {
                    api::sdk_error(
                        &self.clients.endpoint,
                        &format!("cannot launch an instance of {ami} for {}", vm.name),
                        e,
                    )
                })
            })
            .await?;
        output
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .map(String::from)
            .ok_or_else(|| VmmsError::Backend("ec2: RunInstances returned no instance".into()))
    }

    /// Sends terminate for the VM's instances; which ones (none: nothing
    /// was left of the VM).
    async fn terminate(&self, vm: &Machine) -> Result<Vec<String>, VmmsError> {
        let mut live = api::LIVE_STATES.to_vec();
        live.push("shutting-down");
        let ids = self.instance_ids(vm, &live).await?;
        if ids.is_empty() {
            return Ok(ids);
        }
        let sent = self
            .client(vm)
            .terminate_instances()
            .set_instance_ids(Some(ids.clone()))
            .send();
        let result = self
            .bounded(async {
                match sent.await {
                    Ok(_) => Ok(()),
                    Err(e) if api::is_instance_not_found(&e) => Ok(()),
                    Err(e) => Err(api::sdk_error(
                        &self.clients.endpoint,
                        &format!("cannot terminate {} ({})", vm.name, ids.join(", ")),
                        e,
                    )),
                }
            })
            .await;
        if result.is_ok() {
            self.forget_vm(&vm.name).await;
        }
        result.map(|()| ids)
    }

    /// The address SSH goes to, once the instance runs; `None` while it is
    /// still pending.
    async fn running_address(&self, vm: &Machine, id: &str) -> Result<Option<String>, VmmsError> {
        let client = self.client(vm);
        let found = self
            .bounded(api::describe(
                &client,
                &self.clients.endpoint,
                vec![],
                vec![id.to_string()],
            ))
            .await?;
        // Right after RunInstances EC2 may not know the id yet.
        let Some(instance) = found.first() else {
            return Ok(None);
        };
        match api::state(instance) {
            Some(InstanceStateName::Running) => {}
            Some(InstanceStateName::Pending) | None => return Ok(None),
            Some(other) => {
                let reason = instance
                    .state_reason()
                    .and_then(|r| r.message())
                    .unwrap_or("no reason given");
                return Err(VmmsError::Backend(format!(
                    "ec2: instance {id} of {} is {} ({reason})",
                    vm.name,
                    other.as_str()
                )));
            }
        }
        if let Some(host) = &self.config.ssh_host_override {
            return Ok(Some(host.clone()));
        }
        let address = if self.config.use_public_ip {
            instance.public_ip_address()
        } else {
            instance.private_ip_address()
        };
        address.map(|a| Some(a.to_string())).ok_or_else(|| {
            VmmsError::Backend(format!(
                "ec2: instance {id} has no {} IP address; check use_public_ip and the subnet",
                if self.config.use_public_ip {
                    "public"
                } else {
                    "private"
                }
            ))
        })
    }

    fn target(&self, host: String) -> ssh::Target {
        ssh::Target {
            host,
            port: self.config.ssh_port,
            user: self.config.ssh_user.clone(),
            key: self.ssh_key.clone(),
        }
    }

    /// Waits until the instance runs and SSH answers, then prepares it.
    async fn wait_ready(
        &self,
        vm: &Machine,
        deadline: Instant,
        max: Duration,
    ) -> Result<(), VmmsError> {
        let ids = self.instance_ids(vm, &api::LIVE_STATES).await?;
        let id = ids
            .first()
            .cloned()
            .ok_or_else(|| VmmsError::NoSuchVm(vm.name.clone()))?;
        let address = loop {
            if let Some(address) = self.running_address(vm, &id).await? {
                break address;
            }
            if Instant::now() + self.config.poll_interval >= deadline {
                return Err(VmmsError::Backend(format!(
                    "ec2: instance {id} of {} was not running within {max:?}",
                    vm.name
                )));
            }
            // EC2 has no push notification of state changes to wait on.
            tokio::time::sleep(self.config.poll_interval).await;
        };
        self.with_state(&vm.name, |s| {
            s.instance_id = Some(id.clone());
            s.address = Some(address.clone());
        });
        let target = self.target(address);
        let session = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt =
                ssh::connect(&target, None, left.min(self.config.ssh_connect_timeout)).await;
            match attempt {
                Ok(session) => break session,
                Err(e) => {
                    // sshd starts late in a boot, and cloud-init installs
                    // the key even later: every failure may pass.
                    if Instant::now() + self.config.poll_interval >= deadline {
                        return Err(VmmsError::Backend(format!(
                            "ec2: SSH on instance {id} of {} did not answer within {max:?} (last: {e}); check the security group allows port {} from this host, ssh_user and the key pair",
                            vm.name, self.config.ssh_port
                        )));
                    }
                    tokio::time::sleep(self.config.poll_interval).await;
                }
            }
        };
        let session = Arc::new(session);
        self.with_state(&vm.name, |s| {
            s.host_key = Some(session.host_key.clone());
            s.session = Some(session.clone());
        });
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, self.prepare(vm, &session))
            .await
            .map_err(|_| {
                VmmsError::Backend(format!(
                    "ec2: preparing instance {id} of {} took longer than {max:?}",
                    vm.name
                ))
            })??;
        Ok(())
    }

    /// Probes the instance (autodriver, grading user, unshare) and copies
    /// the autodriver in when it lacks it. Once per VM.
    async fn prepare(&self, vm: &Machine, session: &ssh::Session) -> Result<Prepared, VmmsError> {
        if let Some(prepared) = self.with_state(&vm.name, |s| s.prepared.clone()) {
            return Ok(prepared);
        }
        let autodriver = ssh::quote(&self.config.remote_autodriver);
        let user = &self.config.grading_user;
        let user_check = if is_numeric_user(user) {
            "echo user=given".to_string()
        } else {
            format!(
                "if id -u {} >/dev/null 2>&1; then echo user=yes; else echo user=no; fi",
                ssh::quote(user)
            )
        };
        let grader_uid = if is_numeric_user(user) {
            String::new()
        } else {
            format!(
                "echo grader_uid=$(id -u {} 2>/dev/null)\n",
                ssh::quote(user)
            )
        };
        let script = format!(
            "umask 077; mkdir -p {dir} || exit 1\n\
             if [ -x {autodriver} ]; then echo autodriver=yes; else echo autodriver=no; fi\n\
             {user_check}\n{grader_uid}\
             echo ssh_uid=${{SUDO_UID:-$(id -u)}}\n\
             if command -v unshare >/dev/null 2>&1; then echo unshare=yes; else echo unshare=no; fi\n",
            dir = ssh::quote(&self.vm_dir(vm)),
        );
        let (stdout, exit) = self.command(vm, session, &script, None, 4096).await?;
        if !exit.success() {
            return Err(VmmsError::Backend(format!(
                "ec2: cannot prepare {} ({}); as {}, commands run {}",
                vm.name,
                exit.describe(),
                self.config.ssh_user,
                if self.config.ssh_user == "root" {
                    "directly"
                } else {
                    "with sudo -n, which must not ask for a password"
                }
            )));
        }
        let probe = String::from_utf8_lossy(&stdout);
        let has = |line: &str| probe.lines().any(|l| l.trim() == line);
        if has("autodriver=no") {
            let script = format!(
                "set -e; umask 022; mkdir -p \"$(dirname {autodriver})\"; \
                 tmp={autodriver}.upload.$$; cat > \"$tmp\"; chmod 0755 \"$tmp\"; mv -f \"$tmp\" {autodriver}"
            );
            let (_, exit) = self
                .command(vm, session, &script, Some(self.autodriver.to_vec()), 0)
                .await?;
            if !exit.success() {
                return Err(VmmsError::Backend(format!(
                    "ec2: cannot copy the autodriver to {} on {} ({})",
                    self.config.remote_autodriver,
                    vm.name,
                    exit.describe()
                )));
            }
        }
        let user = if has("user=no") {
            self.config.fallback_user.clone()
        } else {
            self.config.grading_user.clone()
        };
        let value = |key: &str| {
            probe
                .lines()
                .find_map(|l| l.trim().strip_prefix(key))
                .and_then(|v| v.parse::<u32>().ok())
        };
        let grader_uid = if is_numeric_user(&user) {
            user.split(':').next().and_then(|uid| uid.parse().ok())
        } else {
            value("grader_uid=")
        };
        check_grading_uid(grader_uid, value("ssh_uid="), &user, &self.config.ssh_user)?;
        let prepared = Prepared {
            user,
            has_unshare: has("unshare=yes"),
        };
        self.with_state(&vm.name, |s| s.prepared = Some(prepared.clone()));
        Ok(prepared)
    }

    /// A short command as root, bounded by `ssh_command_timeout`.
    async fn command(
        &self,
        vm: &Machine,
        session: &ssh::Session,
        script: &str,
        input: Option<Vec<u8>>,
        cap: u64,
    ) -> Result<(Vec<u8>, ssh::Exit), VmmsError> {
        let limit = self.config.ssh_command_timeout;
        tokio::time::timeout(limit, session.run(&self.remote(script), input, cap))
            .await
            .map_err(|_| {
                VmmsError::Backend(format!(
                    "ec2: a command on {} did not finish within {limit:?}",
                    vm.name
                ))
            })?
            .map_err(|e| ssh_error(&vm.name, "command on", e))
    }

    /// The VM's SSH connection, made again if it dropped, and the VM
    /// prepared.
    async fn session(&self, vm: &Machine) -> Result<(Arc<ssh::Session>, Prepared), VmmsError> {
        let (cached, address, host_key) = self.with_state(&vm.name, |s| {
            (s.session.clone(), s.address.clone(), s.host_key.clone())
        });
        let session = match cached.filter(|s| !s.is_closed()) {
            Some(session) => session,
            None => {
                let address = match address {
                    Some(address) => address,
                    None => {
                        let ids = self.instance_ids(vm, &api::LIVE_STATES).await?;
                        let id = ids
                            .first()
                            .ok_or_else(|| VmmsError::NoSuchVm(vm.name.clone()))?;
                        self.running_address(vm, id).await?.ok_or_else(|| {
                            VmmsError::Backend(format!(
                                "ec2: instance {id} of {} is not running yet",
                                vm.name
                            ))
                        })?
                    }
                };
                let session = ssh::connect(
                    &self.target(address.clone()),
                    host_key,
                    self.config.ssh_connect_timeout,
                )
                .await
                .map_err(|e| ssh_error(&vm.name, "cannot reach", e))?;
                let session = Arc::new(session);
                self.with_state(&vm.name, |s| {
                    s.address = Some(address);
                    s.host_key = Some(session.host_key.clone());
                    s.session = Some(session.clone());
                });
                session
            }
        };
        let prepared = self.prepare(vm, &session).await?;
        Ok((session, prepared))
    }
}

#[async_trait]
impl Vmms for Ec2 {
    fn name(&self) -> &'static str {
        "ec2"
    }

    async fn initialize_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        let ami = self
            .config
            .images
            .get(&vm.image)
            .ok_or_else(|| VmmsError::NoSuchImage(vm.image.clone()))?;
        let prefix = machine_prefix(vm).ok_or_else(|| {
            VmmsError::Backend(format!(
                "VM name {:?} does not follow <prefix>-<id>-<image>",
                vm.name
            ))
        })?;
        self.forget_vm(&vm.name).await;
        let mut launched = None;
        if self.config.spot {
            match self.launch(vm, ami, prefix, true).await {
                Ok(id) => launched = Some(id),
                Err(e @ VmmsError::Unavailable(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(vm = %vm.name, "no spot instance, launching on demand: {e}")
                }
            }
        }
        let id = match launched {
            Some(id) => id,
            None => self.launch(vm, ami, prefix, false).await?,
        };
        tracing::info!(vm = %vm.name, instance = %id, "launched an instance");
        self.with_state(&vm.name, |s| s.instance_id = Some(id));
        Ok(())
    }

    async fn wait_vm(&self, vm: &Machine, max: Duration) -> Result<(), VmmsError> {
        // The engine bounds this call by `max` as well: keep time to
        // terminate the instance within it, so a failed VM costs nothing.
        let reserve = (max / 5).min(Duration::from_secs(20));
        let deadline = Instant::now() + max.saturating_sub(reserve);
        let waited =
            match tokio::time::timeout_at(deadline, self.wait_ready(vm, deadline, max)).await {
                Ok(result) => result,
                Err(_) => Err(VmmsError::Backend(format!(
                    "ec2: {} was not ready within {max:?}",
                    vm.name
                ))),
            };
        let Err(error) = waited else {
            return Ok(());
        };
        let terminated =
            tokio::time::timeout(reserve.max(Duration::from_secs(1)), self.terminate(vm)).await;
        let outcome = match terminated {
            Ok(Ok(ids)) if ids.is_empty() => "no instance to terminate".to_string(),
            Ok(Ok(ids)) => format!("terminated {}", ids.join(", ")),
            Ok(Err(e)) => format!("terminating it failed too: {e}"),
            Err(_) => "terminating it timed out (the orphan sweep retries)".to_string(),
        };
        tracing::warn!(vm = %vm.name, "{error}; {outcome}");
        Err(match error {
            VmmsError::Unavailable(message) => {
                VmmsError::Unavailable(format!("{message}; {outcome}"))
            }
            VmmsError::NoSuchVm(name) => VmmsError::NoSuchVm(name),
            other => VmmsError::Backend(format!("{other}; {outcome}")),
        })
    }

    async fn copy_in(&self, vm: &Machine, files: &[InputFile]) -> Result<(), VmmsError> {
        let pairs: Vec<(String, PathBuf)> = files
            .iter()
            .map(|f| (f.dest_file.clone(), f.path.clone()))
            .collect();
        if let Some((bad, _)) = pairs
            .iter()
            .find(|(name, _)| !archive::is_plain_file_name(name))
        {
            return Err(VmmsError::Backend(format!(
                "input file name {bad:?} is not a plain file name"
            )));
        }
        self.with_state(&vm.name, |s| {
            s.pending_job_dir = None;
            s.pending_input = None;
            s.run_started = false;
        });
        let job = format!("{}/job", self.vm_dir(vm));
        let dir = format!("{job}/autolab");
        let mut total: u64 = 0;
        for (_, path) in &pairs {
            let meta = tokio::fs::metadata(path)
                .await
                .map_err(|e| VmmsError::io(format!("cannot read {}", path.display()), e))?;
            if !meta.is_file() {
                return Err(VmmsError::Backend(format!(
                    "input file {} is not a regular file",
                    path.display()
                )));
            }
            total = total.saturating_add(meta.len());
        }
        let short_names = pairs
            .iter()
            .all(|(name, _)| name.len() <= STDIN_INPUT_MAX_NAME);
        if short_names && total <= STDIN_INPUT_MAX_BYTES {
            self.with_state(&vm.name, |s| {
                s.pending_job_dir = Some(dir);
                s.pending_input = Some(pairs);
            });
            return Ok(());
        }
        let (session, _) = self.session(vm).await?;
        // Every copy-in starts from an empty directory: nothing of an
        // earlier job can leak into this one.
        let script = format!(
            "set -e; rm -rf {job}; mkdir -p -m 0700 {job}; mkdir -m 0755 {dir}; tar -x -f - -C {dir}",
            job = ssh::quote(&job),
            dir = ssh::quote(&dir),
        );
        let (chunks, packer) = archive::pack(pairs);
        let limit = self.config.ssh_command_timeout;
        let command = self.remote(&script);
        let sent = tokio::time::timeout(
            limit,
            session.exec(&command, Some(chunks), &mut tokio::io::sink(), false, 0),
        )
        .await;
        let packed = packer
            .await
            .map_err(|e| VmmsError::Backend(format!("packing the input files failed: {e}")))?;
        let exit = match sent {
            Err(_) => {
                return Err(VmmsError::Backend(format!(
                    "ec2: copying the input files into {} took longer than {limit:?}",
                    vm.name
                )))
            }
            Ok(Err(e)) => return Err(ssh_error(&vm.name, "cannot copy the input files into", e)),
            Ok(Ok(exit)) => exit,
        };
        match packed {
            Ok(()) => {}
            // The remote side stopped reading: its error says why.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe && !exit.success() => {}
            Err(e) => return Err(VmmsError::io("cannot pack the input files", e)),
        }
        if !exit.success() {
            return Err(VmmsError::Backend(format!(
                "ec2: unpacking the input files on {} failed ({})",
                vm.name,
                exit.describe()
            )));
        }
        self.with_state(&vm.name, |s| s.pending_job_dir = Some(dir));
        Ok(())
    }

    async fn run_job(&self, vm: &Machine, req: &RunRequest) -> Result<RunOutcome, VmmsError> {
        let (job_dir, input) = self.with_state(&vm.name, |s| {
            (s.pending_job_dir.take(), s.pending_input.take())
        });
        let job_dir = job_dir.ok_or_else(|| {
            VmmsError::Backend(format!("run_job on {} without copy_in before it", vm.name))
        })?;
        let (session, prepared) = self.session(vm).await?;
        let vm_dir = self.vm_dir(vm);
        let summary_path = format!("{vm_dir}/summary.json");
        let stream_path = format!("{vm_dir}/stream");
        let mut args = req.autodriver_args(&prepared.user, &summary_path, &job_dir);
        let dir_arg = args.pop().unwrap_or_else(|| job_dir.clone());
        args.extend(["--stream".to_string(), stream_path]);
        if let Some(home) = &self.config.grading_home {
            args.extend(["--home".to_string(), home.clone()]);
        }
        if input.is_some() {
            args.extend(["--input-tar".to_string(), "-".to_string()]);
        }
        args.push(dir_arg);
        let mut words = vec![ssh::quote(&self.config.remote_autodriver)];
        words.extend(args.iter().map(|a| ssh::quote(a)));
        let autodriver = words.join(" ");
        // With the files on stdin the autodriver makes the job directory;
        // nothing of an earlier job may be in it.
        let clear = match input {
            Some(_) => {
                let job = job_dir.strip_suffix("/autolab").unwrap_or(&job_dir);
                format!("rm -rf {} || exit 3; ", ssh::quote(job))
            }
            None => String::new(),
        };
        let script = if req.disable_network && self.config.isolate_network {
            if !prepared.has_unshare {
                return Err(VmmsError::Backend(format!(
                    "ec2: the job needs its network disabled, but {} has no `unshare` (util-linux); install it in the AMI or set isolate_network = false",
                    vm.name
                )));
            }
            // A new network namespace has only a loopback device, down.
            let inner = format!("ip link set lo up 2>/dev/null; exec {autodriver}");
            format!("{clear}exec unshare --net -- sh -c {}", ssh::quote(&inner))
        } else {
            format!("{clear}exec {autodriver}")
        };

        let output_path = self
            .config
            .work_dir
            .join(format!("{}.out", path_safe(&vm.name)));
        let mut output = tokio::fs::File::create(&output_path)
            .await
            .map_err(|e| VmmsError::io(format!("cannot create {}", output_path.display()), e))?;
        self.with_state(&vm.name, |s| {
            s.output = Some(output_path.clone());
            s.run_started = true;
        });
        let cap = req.output_cap_bytes.saturating_add(OUTPUT_SLACK);
        let command = self.remote(&script);
        let (chunks, packer) = match input {
            Some(files) => {
                let (chunks, packer) = archive::pack(files);
                (Some(chunks), Some(packer))
            }
            None => (None, None),
        };
        let run = session.exec(&command, chunks, &mut output, true, cap);
        let exit = match (req.timeout_secs > 0)
            .then(|| Duration::from_secs(req.timeout_secs) + RUN_GRACE)
        {
            Some(bound) => tokio::time::timeout(bound, run).await.map_err(|_| {
                VmmsError::Backend(format!(
                    "ec2: the autodriver on {} did not finish within {bound:?}",
                    vm.name
                ))
            })?,
            None => run.await,
        }
        .map_err(|e| ssh_error(&vm.name, "the job's connection to", e))?;
        if let Some(packer) = packer {
            match packer.await {
                Ok(Ok(())) => {}
                // The autodriver stopped reading (it reports why).
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                Ok(Err(e)) => return Err(VmmsError::io("cannot pack the input files", e)),
                Err(e) => {
                    return Err(VmmsError::Backend(format!(
                        "packing the input files failed: {e}"
                    )))
                }
            }
        }
        let exit_code = exit.status.and_then(|code| i32::try_from(code).ok());
        let status = RunStatus::from_exit_code(exit_code);
        // The autodriver writes the summary when it ran the job (exit 0 or
        // 2); otherwise the file may be an earlier job's.
        let ran = matches!(status, RunStatus::Completed | RunStatus::TimedOut);
        let summary = if self.config.read_summary && ran {
            let script = format!("cat {}", ssh::quote(&summary_path));
            match self.command(vm, &session, &script, None, 1 << 20).await {
                Ok((bytes, exit)) if exit.success() => serde_json::from_slice(&bytes).ok(),
                _ => None,
            }
        } else {
            None
        };
        let mut notes = Vec::new();
        if let Some(signal) = exit.signal {
            notes.push(format!(
                "The autodriver was killed on the instance ({signal})"
            ));
        }
        Ok(RunOutcome {
            status,
            exit_code,
            summary,
            notes,
        })
    }

    async fn copy_out(&self, vm: &Machine, dest: &Path) -> Result<(), VmmsError> {
        let output = self
            .with_state(&vm.name, |s| s.output.clone())
            .ok_or_else(|| VmmsError::Backend(format!("no job has run in {}", vm.name)))?;
        tokio::fs::copy(&output, dest).await.map_err(|e| {
            VmmsError::io(
                format!("cannot copy {} to {}", output.display(), dest.display()),
                e,
            )
        })?;
        Ok(())
    }

    async fn destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.terminate(vm).await.map(|_| ())
    }

    async fn safe_destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        let ids = self.terminate(vm).await?;
        if ids.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + self.config.terminate_wait;
        let client = self.client(vm);
        loop {
            let found = self
                .bounded(api::describe(
                    &client,
                    &self.clients.endpoint,
                    vec![],
                    ids.clone(),
                ))
                .await?;
            let left: Vec<String> = found
                .iter()
                .filter(|i| api::state(i) != Some(&InstanceStateName::Terminated))
                .map(|i| {
                    format!(
                        "{} ({})",
                        i.instance_id().unwrap_or_default(),
                        api::state(i).map(|s| s.as_str()).unwrap_or("unknown")
                    )
                })
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() + self.config.poll_interval >= deadline {
                return Err(VmmsError::Backend(format!(
                    "ec2: {} not terminated after {:?}: {}",
                    vm.name,
                    self.config.terminate_wait,
                    left.join(", ")
                )));
            }
            tokio::time::sleep(self.config.poll_interval).await;
        }
    }

    async fn get_vms(&self, prefix: &str) -> Result<Vec<Machine>, VmmsError> {
        let found = self
            .bounded(api::describe(
                self.clients.server(),
                &self.clients.endpoint,
                vec![
                    api::tag_filter(TAG_PREFIX, prefix),
                    api::state_filter(&api::LIVE_STATES),
                ],
                vec![],
            ))
            .await?;
        let mut machines = Vec::new();
        for instance in &found {
            let (Some(name), Some(id), Some(image)) = (
                api::tag(instance, TAG_VM),
                api::tag(instance, TAG_VM_ID).and_then(|id| id.parse::<u64>().ok()),
                api::tag(instance, TAG_IMAGE),
            ) else {
                continue;
            };
            let mut machine = Machine::new(prefix, id, image, "ec2");
            if machine.name != name || api::tag(instance, TAG_PREFIX) != Some(prefix) {
                continue;
            }
            machine.name = name.to_string();
            if let Some(instance_id) = instance.instance_id() {
                self.with_state(name, |s| s.instance_id = Some(instance_id.to_string()));
            }
            machines.push(machine);
        }
        machines.sort_by_key(|m| m.id);
        machines.dedup_by(|a, b| a.name == b.name);
        Ok(machines)
    }

    async fn exists_vm(&self, vm: &Machine) -> Result<bool, VmmsError> {
        let client = self.client(vm);
        let found = self
            .bounded(api::describe(
                &client,
                &self.clients.endpoint,
                vec![
                    api::tag_filter(TAG_VM, &vm.name),
                    api::state_filter(&api::LIVE_STATES),
                ],
                vec![],
            ))
            .await?;
        Ok(!found.is_empty())
    }

    async fn get_images(&self) -> Result<Vec<String>, VmmsError> {
        Ok(self.config.images.keys().cloned().collect())
    }

    async fn partial_output(&self, vm: &Machine, max_bytes: usize) -> Result<Vec<u8>, VmmsError> {
        // Until the job's autodriver runs (and empties it) the stream file
        // may hold an earlier job's output.
        if !self.with_state(&vm.name, |s| s.run_started) {
            return Ok(Vec::new());
        }
        let (session, _) = self.session(vm).await?;
        let stream = format!("{}/stream", self.vm_dir(vm));
        let script = format!(
            "head -c {max_bytes} {} 2>/dev/null || true",
            ssh::quote(&stream)
        );
        let (bytes, _) = self
            .command(vm, &session, &script, None, max_bytes as u64)
            .await?;
        Ok(bytes)
    }

    /// The autodriver cleaned up after the job and every copy-in starts
    /// afresh; what is left to check is that the instance still answers
    /// (a spot instance may have been reclaimed). A VM launched with a
    /// job's credentials is refused: it serves that job only, and the
    /// engine destroys a VM it cannot reset.
    async fn reset_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        if vm.credentials.is_some() {
            return Err(VmmsError::Backend(format!(
                "{} runs in a job's own AWS account: it is not reused",
                vm.name
            )));
        }
        // The next job may be asked for partial output before its copy-in:
        // the stream file still holds this job's until its run starts.
        self.with_state(&vm.name, |s| s.run_started = false);
        self.session(vm).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let vm = Machine::new("prod", 7, "course/img:v2", "ec2");
        assert_eq!(machine_prefix(&vm), Some("prod"));
        assert_eq!(path_safe(&vm.name), "prod-7-course_img_v2");
        assert!(is_numeric_user("1000:1000"));
        assert!(is_numeric_user("64123"));
        assert!(!is_numeric_user("autograde"));
        assert!(!is_numeric_user("1000:"));
    }

    #[test]
    fn the_grading_uid_must_not_be_the_ssh_users() {
        assert!(check_grading_uid(Some(1000), Some(1000), "1000:1000", "ubuntu").is_err());
        assert!(check_grading_uid(Some(1001), Some(1000), "autograde", "ubuntu").is_ok());
        // Unknown on either side: nothing to compare.
        assert!(check_grading_uid(None, Some(1000), "autograde", "ubuntu").is_ok());
        assert!(check_grading_uid(Some(1000), None, "1000:1000", "root").is_ok());
    }
}
