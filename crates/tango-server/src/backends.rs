//! Builds the configured backends and clears what a previous run left.

use crate::config::Config;
use anyhow::Context;
use std::sync::Arc;
use tango_core::Vmms;

/// The running backends; the docker one also by its type, for SIGHUP's
/// host list.
pub struct Backends {
    pub all: Vec<Arc<dyn Vmms>>,
    pub docker: Option<Arc<tango_vmms::docker::DockerFleet>>,
}

pub async fn start(config: &Config) -> anyhow::Result<Backends> {
    let mut names = vec![config.vmms.clone()];
    names.extend(config.extra_vmms.iter().cloned());
    names.sort();
    names.dedup();
    let mut backends: Vec<Arc<dyn Vmms>> = Vec::new();
    let mut docker_fleet = None;
    for name in names {
        backends.push(match name.as_str() {
            "sandbox" => Arc::new(sandbox(config).await?),
            "docker" => {
                let fleet = Arc::new(docker(config).await?);
                docker_fleet = Some(fleet.clone());
                fleet
            }
            #[cfg(feature = "ec2")]
            "ec2" => Arc::new(ec2(config).await?),
            #[cfg(not(feature = "ec2"))]
            "ec2" => anyhow::bail!(
                "this tangod was built without the ec2 backend; rebuild it with \
                 `cargo build --release -p tango-server --features ec2`"
            ),
            #[cfg(feature = "local-example")]
            "local" => Arc::new(local(config)?),
            #[cfg(not(feature = "local-example"))]
            "local" => anyhow::bail!(
                "this tangod was built without the example backend `local`; rebuild it with \
                 `cargo build -p tango-server --features local-example` (it isolates nothing: \
                 for development only)"
            ),
            other => anyhow::bail!("unknown backend {other:?}: use sandbox, docker or ec2"),
        });
    }
    Ok(Backends {
        all: backends,
        docker: docker_fleet,
    })
}

async fn sandbox(config: &Config) -> anyhow::Result<tango_vmms::sandbox::Sandbox> {
    use tango_vmms::sandbox::{Sandbox, SandboxConfig};
    let settings = &config.sandbox;
    let sandbox = Sandbox::new(SandboxConfig {
        data_dir: config.data_dir.clone(),
        autodriver: config.find_autodriver()?,
        default_memory_mb: settings.memory_mb,
        default_max_pids: settings.max_pids,
        default_cores: settings.cores,
        allow_network: settings.allow_network,
        cgroup_root_name: settings.cgroup_name.clone(),
        hidden_paths: settings
            .hidden_paths
            .iter()
            .chain(&config.config_file)
            // The host image shows the host's files: a world-readable
            // TLS key must not be a job's to read.
            .chain(&config.tls_key)
            .chain(&config.key_file)
            .cloned()
            .collect(),
    })
    .context("cannot start the sandbox backend")?;
    let removed = sandbox
        .cleanup_leftovers(&config.engine.prefix)
        .await
        .context("cannot remove the sandboxes a previous run left")?;
    if removed > 0 {
        tracing::info!(removed, "removed sandboxes left by a previous run");
    }
    Ok(sandbox)
}

/// The worked example of docs/writing-a-vmms.md: no isolation at all.
#[cfg(feature = "local-example")]
fn local(config: &Config) -> anyhow::Result<tango_local_vmms::Local> {
    use tango_local_vmms::{Local, LocalConfig};
    tracing::warn!(
        "the `local` backend runs jobs as host processes with no isolation: development only"
    );
    let local_config = LocalConfig::new(config.data_dir.join("local"), config.find_autodriver()?);
    Local::new(local_config).context("cannot start the local example backend")
}

async fn docker(config: &Config) -> anyhow::Result<tango_vmms::docker::DockerFleet> {
    use std::time::Duration;
    use tango_vmms::docker::{DockerConfig, DockerFleet, FleetConfig};
    let settings = &config.docker;
    let mut docker_config =
        DockerConfig::new(config.find_autodriver()?, config.data_dir.join("docker"));
    docker_config.default_memory_mb = settings.memory_mb;
    docker_config.default_cores = settings.cores;
    docker_config.default_max_pids = settings.max_pids;
    docker_config.allow_network = settings.allow_network;
    if let Some(starts) = settings.max_concurrent_starts {
        anyhow::ensure!(
            starts > 0,
            "[docker] max_concurrent_starts must be at least 1 (or left out: half the CPUs)"
        );
        docker_config.max_concurrent_starts = starts;
    }
    // Without reuse the engine runs one job per container: skip what only
    // a later job would need.
    docker_config.single_use = !config.engine.reuse_vms;
    let mut fleet_config = FleetConfig::new(docker_config, config.engine.prefix.clone());
    fleet_config.hosts = docker_hosts(config);
    check_tls_files(&fleet_config.hosts)?;
    fleet_config.health_period = Duration::from_secs(settings.health_period_secs.max(1));
    fleet_config.health_timeout = Duration::from_secs(settings.health_timeout_secs.max(1));
    fleet_config.registry = settings.registry.clone();
    let docker = DockerFleet::connect(fleet_config).await.context(
        "cannot start the docker backend (is dockerd running? is DOCKER_HOST or \
         [[docker.hosts]] right?)",
    )?;
    match docker.remove_stale_derived_images().await {
        Ok(0) => {}
        Ok(removed) => tracing::info!(removed, "removed stale autodriver images"),
        Err(e) => tracing::warn!("cannot remove stale autodriver images: {e}"),
    }
    Ok(docker)
}

/// `[[docker.hosts]]`, or the local engine sized by `[engine] max_vms`.
fn docker_hosts(config: &Config) -> Vec<tango_vmms::docker::DockerHost> {
    if config.docker.hosts.is_empty() {
        vec![tango_vmms::docker::DockerHost::local(
            config.engine.max_vms.max(1),
        )]
    } else {
        config.docker.hosts.clone()
    }
}

/// The TLS files of every host can be read: a wrong path is a mistake to
/// fix now, not a host that stays down with the reason in a debug log.
fn check_tls_files(hosts: &[tango_vmms::docker::DockerHost]) -> anyhow::Result<()> {
    for host in hosts {
        let files = [
            ("tls_ca", &host.tls_ca),
            ("tls_cert", &host.tls_cert),
            ("tls_key", &host.tls_key),
        ];
        for (key, path) in files {
            if let Some(path) = path {
                std::fs::File::open(path).with_context(|| {
                    format!(
                        "[[docker.hosts]] {}: cannot read {key} {}",
                        host.name,
                        path.display()
                    )
                })?;
            }
        }
    }
    Ok(())
}

/// On SIGHUP, applies the config file's `[[docker.hosts]]` (the other
/// settings take a restart): new hosts join, hosts no longer listed drain
/// (the engine drops its idle VMs there) and go once their jobs are done.
pub async fn reload_docker_hosts_on_sighup(
    engine: Arc<tango_core::Engine>,
    fleet: Arc<tango_vmms::docker::DockerFleet>,
    config: Config,
    mut hangups: tokio::signal::unix::Signal,
) {
    while hangups.recv().await.is_some() {
        match reload_docker_hosts(&engine, &fleet, &config).await {
            Ok(hosts) => tracing::info!(?hosts, "SIGHUP: docker hosts reloaded"),
            Err(e) => tracing::warn!("SIGHUP: docker hosts unchanged: {e:#}"),
        }
    }
}

async fn reload_docker_hosts(
    engine: &tango_core::Engine,
    fleet: &tango_vmms::docker::DockerFleet,
    config: &Config,
) -> anyhow::Result<Vec<String>> {
    let path = config
        .config_file
        .as_ref()
        .context("tangod was started without --config: there is no file to re-read")?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let new: Config = toml::from_str(&text)
        .with_context(|| format!("config file {} is not valid", path.display()))?;
    new.docker.check()?;
    let reloaded = Config {
        docker: new.docker,
        ..config.clone()
    };
    let hosts = docker_hosts(&reloaded);
    check_tls_files(&hosts)?;
    let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
    for gone in fleet
        .hosts()
        .into_iter()
        .filter(|h| !names.contains(&h.name))
    {
        if let Err(e) = engine.set_host_draining(&gone.name, true).await {
            tracing::warn!(host = %gone.name, "cannot drain the host left out of the config: {e}");
        }
    }
    fleet.set_hosts(hosts).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(names)
}

#[cfg(feature = "ec2")]
async fn ec2(config: &Config) -> anyhow::Result<tango_vmms::ec2::Ec2> {
    use std::time::Duration;
    use tango_core::model::CloudCredentials;
    use tango_vmms::ec2::{Ec2, Ec2Config};
    let settings = &config.ec2;
    let ssh_key = settings
        .ssh_key
        .clone()
        .context("[ec2] needs ssh_key: the private key of the instances' key pair")?;
    if settings.images.is_empty() {
        tracing::warn!("[ec2] images is empty: no job can run on ec2");
    }
    let mut ec2_config = Ec2Config::new(
        config.find_autodriver()?,
        config.data_dir.join("ec2"),
        ssh_key,
    );
    ec2_config.region = settings.region.clone();
    ec2_config.endpoint_url = settings.endpoint_url.clone();
    ec2_config.credentials = match (&settings.access_key_id, &settings.secret_access_key) {
        (Some(id), Some(secret)) => Some(CloudCredentials {
            access_key_id: id.clone(),
            secret_access_key: secret.clone(),
        }),
        (None, None) => None,
        _ => anyhow::bail!("[ec2] needs both access_key_id and secret_access_key, or neither"),
    };
    ec2_config.images = settings.images.clone();
    ec2_config.instance_type = settings.instance_type.clone();
    ec2_config.security_group_ids = settings.security_group_ids.clone();
    ec2_config.key_name = settings.key_name.clone();
    ec2_config.subnet_id = settings.subnet_id.clone();
    ec2_config.spot = settings.spot;
    ec2_config.use_public_ip = settings.use_public_ip;
    ec2_config.ssh_host_override = settings.ssh_host_override.clone();
    ec2_config.ssh_port = settings.ssh_port;
    ec2_config.ssh_user = settings.ssh_user.clone();
    ec2_config.remote_autodriver = settings.remote_autodriver.clone();
    ec2_config.remote_dir = settings.remote_dir.clone();
    ec2_config.grading_user = settings.grading_user.clone();
    ec2_config.fallback_user = settings.fallback_user.clone();
    ec2_config.grading_home = settings.grading_home.clone();
    ec2_config.isolate_network = settings.isolate_network;
    ec2_config.api_timeout = Duration::from_secs(settings.api_timeout_secs.max(1));
    ec2_config.ssh_connect_timeout = Duration::from_secs(settings.ssh_connect_timeout_secs.max(1));
    ec2_config.ssh_command_timeout = Duration::from_secs(settings.ssh_command_timeout_secs.max(1));
    ec2_config.poll_interval = Duration::from_millis(settings.poll_interval_ms.max(10));
    ec2_config.terminate_wait = Duration::from_secs(settings.terminate_wait_secs);
    let ec2 = Ec2::connect(ec2_config)
        .await
        .context("cannot start the ec2 backend")?;
    match ec2.check().await {
        Ok(()) => {}
        // The engine waits for an endpoint that is down; wrong settings
        // are better reported now.
        Err(e @ tango_core::VmmsError::Unavailable(_)) => tracing::warn!("{e}"),
        Err(e) => return Err(anyhow::anyhow!("cannot start the ec2 backend: {e}")),
    }
    Ok(ec2)
}
