//! The backend's settings ([`Ec2Config`]) and their defaults.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use tango_core::model::CloudCredentials;

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
