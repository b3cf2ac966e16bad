//! tangod's settings: command-line options over a TOML file over defaults.

use clap::Parser;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use tango_core::{CourselabPolicy, EngineConfig, MAX_POOL_SIZE};

/// tangod: a drop-in Tango v1 job server for Autolab.
///
/// Every option may also be set in the TOML file given with --config; the
/// command line wins. `tangod --print-config` shows the effective settings.
#[derive(Debug, Parser)]
#[command(name = "tangod", version)]
pub struct Cli {
    /// Address to listen on [default: 127.0.0.1:3000]
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Directory for courselabs, outputs, the database and VMs [default: ./tango-data]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Default backend: sandbox (Linux namespaces, no daemon), docker, or ec2 (builds with the `ec2` feature) [default: sandbox]
    #[arg(long)]
    pub vmms: Option<String>,
    /// A client key (repeatable). The key in RESTFUL_KEY, Tango's variable,
    /// is accepted too.
    #[arg(long = "key")]
    pub keys: Vec<String>,
    /// A file holding one more client key (surrounding whitespace ignored),
    /// so that the key is in no command line or environment; the Debian
    /// package makes /etc/tango-rs/key
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// TOML configuration file
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where jobs are kept: sqlite (the file tango.db in the data dir) or a
    /// PostgreSQL database, postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE
    /// (PGPASSWORD is read too) [default: sqlite]
    #[arg(long)]
    pub store: Option<String>,
    /// Static autodriver binary put into VMs [default: next to tangod, or
    /// target/x86_64-unknown-linux-musl/{release,debug}/autodriver]
    #[arg(long, env = "TANGO_AUTODRIVER")]
    pub autodriver: Option<PathBuf>,
    /// Log format: text or json
    #[arg(long)]
    pub log_format: Option<LogFormat>,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key); a
    /// renewed file is served without a restart
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A PEM CA certificate (or bundle) trusted for HTTPS callback URLs
    /// besides the usual public roots, e.g. Autolab's private CA
    #[arg(long)]
    pub callback_ca_cert: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit
    #[arg(long)]
    pub print_config: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub vmms: String,
    /// Backends to enable besides the default one.
    pub extra_vmms: Vec<String>,
    pub keys: Vec<String>,
    /// A file holding one more key; sandbox jobs never see it.
    pub key_file: Option<PathBuf>,
    pub autodriver: Option<PathBuf>,
    pub log_format: LogFormat,
    /// Serve HTTPS with this certificate chain and key (both or neither).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Trusted for HTTPS callbacks besides the public roots.
    pub callback_ca_cert: Option<PathBuf>,
    /// The file these settings were read from (`--config`); it holds the
    /// keys, so sandbox jobs never see it.
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
    /// Largest upload (and /build tar) accepted, in bytes.
    pub max_upload_bytes: u64,
    /// `synchronous=FULL` for SQLite: survive power loss, slower.
    pub full_sync: bool,
    /// `sqlite` or a PostgreSQL URL (see [`StoreKind`]); its password is
    /// not printed by `--print-config`.
    #[serde(serialize_with = "serialize_store")]
    pub store: String,
    /// Answer `/metrics` only with a key as `Authorization: Bearer <key>`
    /// (it shows counts only, so by default it needs none).
    #[serde(default)]
    pub metrics_require_key: bool,
    /// This server among the servers sharing the store (`[server]`).
    pub server: ServerSettings,
    pub engine: EngineConfig,
    pub sandbox: SandboxSettings,
    pub docker: DockerSettings,
    /// Pools preallocated at every start (`[[pools]]`), as `/prealloc` does.
    pub pools: Vec<PoolSettings>,
    /// Weights and caps of courselabs for the fair scheduler
    /// (`[[courselabs]]`), first match wins; handed to the engine.
    pub courselabs: Vec<CourselabPolicy>,
    /// Read whether or not tangod was built with the `ec2` feature, so a
    /// config file means the same to every build.
    pub ec2: Ec2Settings,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
            data_dir: PathBuf::from("tango-data"),
            vmms: "sandbox".into(),
            extra_vmms: vec![],
            keys: vec![],
            key_file: None,
            autodriver: None,
            log_format: LogFormat::Text,
            tls_cert: None,
            tls_key: None,
            callback_ca_cert: None,
            config_file: None,
            max_upload_bytes: 1 << 30,
            full_sync: false,
            store: "sqlite".into(),
            metrics_require_key: false,
            server: ServerSettings::default(),
            engine: EngineConfig::default(),
            sandbox: SandboxSettings::default(),
            docker: DockerSettings::default(),
            pools: vec![],
            courselabs: vec![],
            ec2: Ec2Settings::default(),
        }
    }
}

/// The `[server]` section: how this server shows in the servers registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// The name `/info`, `/metrics` and `tango servers` show; unset: the
    /// machine's host name.
    pub name: Option<String>,
    /// A server whose heartbeat is older than this is dead; the heartbeat
    /// is renewed every third of it.
    pub lease_secs: u64,
    /// Where the other servers sharing the store reach this one
    /// (`HOST:PORT`, asked for the output so far of a job it runs); unset:
    /// the address it listens on, with the host name for 0.0.0.0 or ::.
    pub address: Option<String>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            name: None,
            lease_secs: 15,
            address: None,
        }
    }
}

impl ServerSettings {
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=3600).contains(&self.lease_secs),
            "[server] lease_secs is {}: give 1 to 3600 seconds",
            self.lease_secs
        );
        if let Some(name) = &self.name {
            anyhow::ensure!(
                !name.trim().is_empty() && name.len() <= 255,
                "[server] name must be 1 to 255 characters, or unset for the host name"
            );
        }
        if let Some(address) = &self.address {
            let port = address.trim().rsplit_once(':').map(|(_, port)| port);
            anyhow::ensure!(
                port.is_some_and(|p| p.parse::<u16>().is_ok()) && !address.contains('/'),
                "[server] address is {address:?}: write HOST:PORT (how the other servers \
                 reach this one), or leave it unset for the address tangod listens on"
            );
        }
        Ok(())
    }

    /// The name this server goes by: the configured one, else the host name.
    pub fn name(&self) -> String {
        if let Some(name) = &self.name {
            return name.trim().to_string();
        }
        host_name()
    }

    /// Where the other servers reach this one, listening on `listening`.
    pub fn address(&self, listening: std::net::SocketAddr) -> String {
        match &self.address {
            Some(address) => address.trim().to_string(),
            None if listening.ip().is_unspecified() => {
                format!("{}:{}", host_name(), listening.port())
            }
            None => listening.to_string(),
        }
    }
}

/// The machine's host name, or "tangod" when it has none.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tangod".to_string())
}

/// A pool of warm VMs that tangod keeps from its start: free VMs of the
/// image waiting for jobs, so that a burst of up to `size` jobs never waits
/// for a VM to be made. Set at runtime with `/prealloc`, a size lasts until
/// the next start only; here it lasts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    pub image: String,
    pub size: usize,
    /// Backend of the pool's VMs (default: `vmms`).
    #[serde(default)]
    pub vmms: Option<String>,
    #[serde(default)]
    pub cores: Option<u32>,
    #[serde(default)]
    pub memory_mb: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxSettings {
    pub memory_mb: u64,
    pub max_pids: u64,
    pub cores: Option<f64>,
    /// Give jobs the host's network (default: loopback only).
    pub allow_network: bool,
    pub cgroup_name: String,
    /// More host paths jobs must not see in images that contain them (e.g.
    /// other services' data under `/` for the `host` image); the data dir
    /// is always hidden. Paths that do not exist are passed over.
    pub hidden_paths: Vec<PathBuf>,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        SandboxSettings {
            memory_mb: 1024,
            max_pids: 256,
            cores: None,
            allow_network: false,
            cgroup_name: "tango-rs".into(),
            hidden_paths: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerSettings {
    pub memory_mb: u64,
    pub max_pids: i64,
    pub cores: Option<f64>,
    pub allow_network: bool,
    /// Containers created and started at once; unset: half the CPUs.
    pub max_concurrent_starts: Option<usize>,
    /// The Docker engines jobs run on (`[[docker.hosts]]`); none: the local
    /// one (`DOCKER_HOST`, else the default socket). Re-read on SIGHUP.
    pub hosts: Vec<tango_vmms::docker::DockerHost>,
    /// Every host is pinged this often (and at once when a call fails).
    pub health_period_secs: u64,
    /// A host that does not answer a ping within this is down: its jobs
    /// run again on other hosts.
    pub health_timeout_secs: u64,
    /// `HOST:PORT` of an image registry: a host that needs an image no
    /// host that is up has pulls `HOST:PORT/NAME:TAG` from it.
    pub registry: Option<String>,
}

impl Default for DockerSettings {
    fn default() -> Self {
        DockerSettings {
            memory_mb: 1024,
            max_pids: 256,
            cores: None,
            allow_network: false,
            max_concurrent_starts: None,
            hosts: Vec::new(),
            health_period_secs: 5,
            health_timeout_secs: 10,
            registry: None,
        }
    }
}

impl DockerSettings {
    /// What `[docker]` settings can be checked before any engine is asked.
    pub fn check(&self) -> anyhow::Result<()> {
        tango_vmms::docker::fleet::check_hosts(&self.hosts)
            .map_err(|e| anyhow::anyhow!("[[docker.hosts]]: {e}"))?;
        anyhow::ensure!(
            self.health_period_secs > 0 && self.health_timeout_secs > 0,
            "[docker] health_period_secs and health_timeout_secs must be at least 1"
        );
        if let Some(registry) = &self.registry {
            tango_vmms::docker::fleet::check_registry(registry)
                .map_err(|e| anyhow::anyhow!("[docker] {e}"))?;
        }
        Ok(())
    }
}

/// The `[ec2]` section: jobs on EC2 instances reached over SSH.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ec2Settings {
    pub region: String,
    /// The EC2 API endpoint instead of AWS's (e.g. a moto server).
    pub endpoint_url: Option<String>,
    /// The server's keys; unset: the AWS SDK's chain (AWS_* variables,
    /// ~/.aws profile, instance role).
    pub access_key_id: Option<String>,
    /// Never printed by `--print-config`.
    #[serde(skip_serializing)]
    pub secret_access_key: Option<String>,
    /// Image name (as jobs give it) = AMI id.
    pub images: std::collections::BTreeMap<String, String>,
    pub instance_type: String,
    pub security_group_ids: Vec<String>,
    pub key_name: Option<String>,
    pub subnet_id: Option<String>,
    /// Spot instances, falling back to on-demand when none can be had.
    pub spot: bool,
    /// SSH to instances' public IPs (tangod outside their VPC).
    pub use_public_ip: bool,
    /// SSH to this host instead of the instance's address (tests).
    pub ssh_host_override: Option<String>,
    pub ssh_port: u16,
    pub ssh_user: String,
    /// Private key of the key pair (unencrypted OpenSSH or PEM).
    pub ssh_key: Option<PathBuf>,
    /// The autodriver's path on instances (copied there when missing).
    pub remote_autodriver: String,
    pub remote_dir: String,
    pub grading_user: String,
    pub fallback_user: String,
    pub grading_home: Option<String>,
    /// Jobs with disable_network run in a new network namespace.
    pub isolate_network: bool,
    pub api_timeout_secs: u64,
    pub ssh_connect_timeout_secs: u64,
    pub ssh_command_timeout_secs: u64,
    pub poll_interval_ms: u64,
    pub terminate_wait_secs: u64,
}

impl Default for Ec2Settings {
    fn default() -> Self {
        Ec2Settings {
            region: "us-east-1".into(),
            endpoint_url: None,
            access_key_id: None,
            secret_access_key: None,
            images: Default::default(),
            instance_type: "t3.micro".into(),
            security_group_ids: vec![],
            key_name: None,
            subnet_id: None,
            spot: false,
            use_public_ip: false,
            ssh_host_override: None,
            ssh_port: 22,
            ssh_user: "ubuntu".into(),
            ssh_key: None,
            remote_autodriver: "/usr/local/bin/tango-autodriver".into(),
            remote_dir: "/var/lib/tango-rs".into(),
            grading_user: "autograde".into(),
            fallback_user: "1000:1000".into(),
            grading_home: None,
            isolate_network: true,
            api_timeout_secs: 30,
            ssh_connect_timeout_secs: 10,
            ssh_command_timeout_secs: 120,
            poll_interval_ms: 2000,
            terminate_wait_secs: 50,
        }
    }
}

/// Where the engine keeps its jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// The SQLite file `tango.db` in the data dir.
    Sqlite,
    /// A PostgreSQL database, by URL.
    Postgres(String),
}

impl StoreKind {
    pub fn parse(store: &str) -> anyhow::Result<StoreKind> {
        if store == "sqlite" {
            return Ok(StoreKind::Sqlite);
        }
        if store.starts_with("postgres://") || store.starts_with("postgresql://") {
            if !cfg!(feature = "postgres") {
                anyhow::bail!(
                    "this tangod was built without PostgreSQL support: build it with the \
                     `postgres` feature (on by default), or set store = \"sqlite\""
                );
            }
            return Ok(StoreKind::Postgres(store.to_string()));
        }
        anyhow::bail!(
            "store {:?} is neither \"sqlite\" nor a PostgreSQL URL \
             (postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE): fix --store or store in the config",
            redact_password(store)
        )
    }
}

/// `url` with the password of its user info, if any, replaced.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The last '@' before the query ends the user info, even when an
    // unencoded '/' or '?' is in the password.
    let (mut redacted, rest) = match rest.rsplit_once('@') {
        Some((userinfo, after)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            (format!("{scheme}://{user}:REDACTED@"), after)
        }
        _ => (format!("{scheme}://"), rest),
    };
    // libpq and sqlx also take `?password=...`.
    match rest.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                        format!("{key}=REDACTED")
                    }
                    _ => param.to_string(),
                })
                .collect();
            redacted.push_str(path);
            redacted.push('?');
            redacted.push_str(&params.join("&"));
        }
        None => redacted.push_str(rest),
    }
    redacted
}

fn serialize_store<S: serde::Serializer>(store: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_password(store))
}

/// The key in `path`, without the newline an editor or `echo` adds.
fn read_key_file(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the key file {} (key_file / --key-file): {e}",
            path.display()
        )
    })?;
    let key = text.trim();
    if key.is_empty() {
        anyhow::bail!(
            "the key file {} (key_file / --key-file) is empty: write a key into it, \
             e.g. `head -c 24 /dev/urandom | base64 | tr -d '/+=' > {}`",
            path.display(),
            path.display()
        );
    }
    Ok(key.to_string())
}

impl Config {
    /// The file's settings (or defaults) with the command line applied.
    pub fn load(cli: &Cli) -> anyhow::Result<Config> {
        let mut config = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("cannot read config file {}: {e}", path.display())
                })?;
                toml::from_str(&text).map_err(|e| {
                    anyhow::anyhow!("config file {} is not valid: {e}", path.display())
                })?
            }
            None => Config::default(),
        };
        config.config_file = cli.config.clone();
        if let Some(listen) = cli.listen {
            config.listen = listen;
        }
        if let Some(dir) = &cli.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(vmms) = &cli.vmms {
            config.vmms = vmms.clone();
        }
        if let Some(store) = &cli.store {
            config.store = store.clone();
        }
        StoreKind::parse(&config.store)?;
        config
            .keys
            .extend(cli.keys.iter().filter(|k| !k.is_empty()).cloned());
        // Beside --key, not instead of it: a site moving from Tango keeps
        // its environment and may add keys.
        if let Some(key) = std::env::var_os("RESTFUL_KEY") {
            let key = key
                .into_string()
                .map_err(|_| anyhow::anyhow!("RESTFUL_KEY is not valid UTF-8"))?;
            if !key.is_empty() {
                config.keys.push(key);
            }
        }
        // Tango's name for its VM prefix, lowercased as Tango does; Autolab's
        // Docker setup passes it (DOCKER_DEPLOYMENT=prod). Over the file:
        // the environment is how a container is told its prefix.
        if let Some(deployment) = std::env::var_os("DOCKER_DEPLOYMENT") {
            let deployment = deployment
                .into_string()
                .map_err(|_| anyhow::anyhow!("DOCKER_DEPLOYMENT is not valid UTF-8"))?;
            if !deployment.is_empty() {
                let prefix = deployment.to_lowercase();
                // It names every container: what Docker takes in a name.
                tango_core::names::check_docker_prefix(&prefix).map_err(|e| {
                    anyhow::anyhow!(
                        "DOCKER_DEPLOYMENT={deployment:?} cannot prefix VM names: {e} (or unset \
                         it to use [engine] prefix)"
                    )
                })?;
                config.engine.prefix = prefix;
            }
        }
        if let Some(path) = &cli.key_file {
            config.key_file = Some(path.clone());
        }
        if let Some(path) = &config.key_file {
            config.keys.push(read_key_file(path)?);
        }
        if let Some(path) = &cli.autodriver {
            config.autodriver = Some(path.clone());
        }
        if let Some(format) = cli.log_format {
            config.log_format = format;
        }
        if cli.tls_cert.is_some() {
            config.tls_cert = cli.tls_cert.clone();
            config.tls_key = cli.tls_key.clone();
        }
        if let Some(path) = &cli.callback_ca_cert {
            config.callback_ca_cert = Some(path.clone());
        }
        if config.tls_cert.is_some() != config.tls_key.is_some() {
            anyhow::bail!(
                "tls_cert and tls_key go together: give both (HTTPS) or neither (plain HTTP)"
            );
        }
        config.engine.default_vmms = config.vmms.clone();
        config.keys.sort();
        config.keys.dedup();
        for key in &config.keys {
            tango_core::names::check_component("key", key)
                .map_err(|e| anyhow::anyhow!("{e}: keys become directory names"))?;
        }
        config.check_pools()?;
        config.docker.check()?;
        config.server.check()?;
        config.engine.courselabs = config.courselabs.clone();
        config.engine.validate()?;
        Ok(config)
    }

    /// What `[[pools]]` entries can be checked before the backends run.
    fn check_pools(&self) -> anyhow::Result<()> {
        let mut seen = std::collections::BTreeSet::new();
        for pool in &self.pools {
            let image = &pool.image;
            tango_core::names::check_image(image)
                .map_err(|e| anyhow::anyhow!("[[pools]] image {image:?}: {e}"))?;
            if pool.size > MAX_POOL_SIZE {
                anyhow::bail!(
                    "[[pools]] image {image:?}: size {} is over {MAX_POOL_SIZE}",
                    pool.size
                );
            }
            if let Some(vmms) = &pool.vmms {
                if vmms != &self.vmms && !self.extra_vmms.contains(vmms) {
                    anyhow::bail!(
                        "[[pools]] image {image:?}: backend {vmms:?} is not enabled; \
                         add it to extra_vmms or remove vmms from the pool"
                    );
                }
            }
            if !seen.insert(image) {
                anyhow::bail!("[[pools]] image {image:?} is listed twice: a pool is per image");
            }
        }
        Ok(())
    }

    /// The autodriver binary: configured, or found beside tangod.
    pub fn find_autodriver(&self) -> anyhow::Result<PathBuf> {
        if let Some(path) = &self.autodriver {
            if path.is_file() {
                return Ok(path.clone());
            }
            anyhow::bail!("autodriver {} does not exist", path.display());
        }
        let exe = std::env::current_exe()?;
        let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
        let candidates = [
            dir.join("../x86_64-unknown-linux-musl/release/autodriver"),
            dir.join("../../x86_64-unknown-linux-musl/release/autodriver"),
            dir.join("../x86_64-unknown-linux-musl/debug/autodriver"),
            dir.join("../../x86_64-unknown-linux-musl/debug/autodriver"),
            // Installed side by side (a dynamically linked one only works in
            // images with a compatible libc, such as `host`).
            dir.join("autodriver"),
        ];
        candidates
            .iter()
            .find(|p| p.is_file())
            .cloned()
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "cannot find the static autodriver binary; build it with \
                     `cargo build --release -p autodriver --target x86_64-unknown-linux-musl` \
                     or pass --autodriver PATH"
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_passwords_are_never_shown() {
        for (url, shown) in [
            (
                "postgres://tango:s3cret@db/tango",
                "postgres://tango:REDACTED@db/tango",
            ),
            (
                "postgres://tango:a/b?c@db:5432/t",
                "postgres://tango:REDACTED@db:5432/t",
            ),
            (
                "postgres://tango@db/tango?sslmode=require&password=s3cret",
                "postgres://tango@db/tango?sslmode=require&password=REDACTED",
            ),
            ("postgres://db/tango", "postgres://db/tango"),
            ("sqlite", "sqlite"),
        ] {
            assert_eq!(redact_password(url), shown);
        }
    }

    fn docker_settings(toml_text: &str) -> anyhow::Result<DockerSettings> {
        let config: Config = toml::from_str(toml_text)?;
        config.docker.check()?;
        Ok(config.docker)
    }

    #[test]
    fn docker_hosts_as_the_issue_writes_them() {
        let docker = docker_settings(
            r#"
            [[docker.hosts]]
            name = "local"
            url = "unix:///var/run/docker.sock"
            max_vms = 8
            [[docker.hosts]]
            name = "grader2"
            url = "tcp://grader2.example.edu:2376"
            tls_ca = "/etc/tango-rs/docker-ca.pem"
            tls_cert = "/etc/tango-rs/docker-cert.pem"
            tls_key = "/etc/tango-rs/docker-key.pem"
            max_vms = 16
            "#,
        )
        .unwrap();
        let names: Vec<_> = docker.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["local", "grader2"]);
        assert_eq!(docker.hosts[1].max_vms, 16);
        assert_eq!(
            docker.hosts[1].tls_key.as_deref(),
            Some(std::path::Path::new("/etc/tango-rs/docker-key.pem"))
        );
        assert!(docker_settings("").unwrap().hosts.is_empty());
    }

    #[test]
    fn docker_hosts_are_checked() {
        let plain_tcp = r#"
            [[docker.hosts]]
            name = "grader2"
            url = "tcp://grader2.example.edu:2375"
            "#;
        let why = format!("{:#}", docker_settings(plain_tcp).unwrap_err());
        assert!(why.contains("[[docker.hosts]]"), "{why}");
        assert!(why.contains("root on its machine"), "{why}");
        let insecure = format!("{plain_tcp}insecure = true\n");
        assert!(docker_settings(&insecure).is_ok());
        let twice = r#"
            [[docker.hosts]]
            name = "a"
            url = "unix:///a.sock"
            [[docker.hosts]]
            name = "a"
            url = "unix:///b.sock"
            "#;
        assert!(format!("{:#}", docker_settings(twice).unwrap_err()).contains("used twice"));
        let typo = r#"
            [[docker.hosts]]
            name = "a"
            url = "unix:///a.sock"
            max_vm = 3
            "#;
        assert!(docker_settings(typo).is_err(), "unknown fields are refused");
    }

    #[test]
    fn the_docker_registry_is_host_and_port() {
        let docker = docker_settings("[docker]\nregistry = \"127.0.0.1:5000\"\n").unwrap();
        assert_eq!(docker.registry.as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(docker_settings("").unwrap().registry, None);
        let url = "[docker]\nregistry = \"http://reg.example.edu:5000\"\n";
        let why = format!("{:#}", docker_settings(url).unwrap_err());
        assert!(why.contains("[docker] registry"), "{why}");
    }
}
