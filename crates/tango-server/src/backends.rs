//! Builds the configured backends and clears what a previous run left.

use crate::config::Config;
use anyhow::Context;
use std::sync::Arc;
use tango_core::Vmms;

pub async fn start(config: &Config) -> anyhow::Result<Vec<Arc<dyn Vmms>>> {
    let mut names = vec![config.vmms.clone()];
    names.extend(config.extra_vmms.iter().cloned());
    names.sort();
    names.dedup();
    let mut backends: Vec<Arc<dyn Vmms>> = Vec::new();
    for name in names {
        backends.push(match name.as_str() {
            "sandbox" => Arc::new(sandbox(config).await?),
            "docker" => Arc::new(docker(config).await?),
            other => anyhow::bail!("unknown backend {other:?}: use sandbox or docker"),
        });
    }
    Ok(backends)
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
        hidden_paths: vec![],
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

async fn docker(config: &Config) -> anyhow::Result<tango_vmms::docker::Docker> {
    use tango_vmms::docker::{Docker, DockerConfig};
    let settings = &config.docker;
    let mut docker_config =
        DockerConfig::new(config.find_autodriver()?, config.data_dir.join("docker"));
    docker_config.default_memory_mb = settings.memory_mb;
    docker_config.default_cores = settings.cores;
    docker_config.default_max_pids = settings.max_pids;
    docker_config.allow_network = settings.allow_network;
    let docker = Docker::connect(docker_config)
        .await
        .context("cannot start the docker backend (is dockerd running? is DOCKER_HOST right?)")?;
    match docker.remove_stale_derived_images().await {
        Ok(0) => {}
        Ok(removed) => tracing::info!(removed, "removed stale autodriver images"),
        Err(e) => tracing::warn!("cannot remove stale autodriver images: {e}"),
    }
    Ok(docker)
}
