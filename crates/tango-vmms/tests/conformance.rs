//! The conformance suite (`tango_vmms::conformance`) against the real
//! sandbox (root, namespaces, cgroups) and docker (a real dockerd) backends.
//! The ec2 backend runs it in tests/ec2.rs, with its moto and sshd fixtures.
//!
//! Each test skips, saying why, exactly where that backend's own tests skip:
//! the sandbox without root, docker without a Docker socket.

use std::sync::Arc;
use tango_core::Vmms;
use tango_vmms::conformance::{run, Damage, Target};

#[path = "support/autodriver.rs"]
mod autodriver_build;
use autodriver_build::autodriver;

/// A damage that runs blocking host work, as a [`Damage`].
fn damage(f: impl Fn(tango_core::Machine) -> Result<(), String> + Send + Sync + 'static) -> Damage {
    let f = Arc::new(f);
    Arc::new(move |vm| {
        let f = f.clone();
        Box::pin(async move { f(vm) })
    })
}

#[cfg(feature = "sandbox")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sandbox_backend_conforms() {
    use tango_vmms::sandbox::{Sandbox, SandboxConfig};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the sandbox backend needs root (namespaces, mounts, cgroups)");
        return;
    }
    // In /var/lib, not /tmp: a sandbox replaces /tmp, which would hide
    // the data dir for the wrong reason.
    let dir = tempfile::Builder::new()
        .prefix("tango-conformance-sandbox-")
        .tempdir_in("/var/lib")
        .expect("temp dir");
    let data_dir = dir.path().join("data");
    let sandbox = Sandbox::new(SandboxConfig {
        data_dir: data_dir.clone(),
        autodriver: autodriver(),
        cgroup_root_name: "tango-rs-test".into(),
        default_memory_mb: 256,
        ..SandboxConfig::default()
    })
    .expect("Sandbox::new");
    // A VM whose job directory is gone, as after a lost disk.
    let vms_dir = data_dir.join("sandbox");
    let damage = damage(move |vm| {
        std::fs::remove_dir_all(vms_dir.join(&vm.name).join("home")).map_err(|e| e.to_string())
    });
    let target = Target::new(Arc::new(sandbox), "host", "cfsb").with_damage(damage);
    run(&target).await.assert_passed();
}

/// The docker backends' settings for the suite (its work dir lives as
/// long as the guard), once the test images are built; none without a
/// Docker engine.
#[cfg(feature = "docker")]
fn docker_config() -> Option<(tango_vmms::docker::DockerConfig, tempfile::TempDir)> {
    if std::env::var_os("DOCKER_HOST").is_none()
        && !std::path::Path::new("/var/run/docker.sock").exists()
    {
        eprintln!("skipping: no /var/run/docker.sock and no DOCKER_HOST");
        return None;
    }
    let status = std::process::Command::new(
        autodriver_build::workspace_root().join("scripts/build-docker-test-image.sh"),
    )
    .status()
    .expect("the image script runs");
    assert!(status.success(), "building the test images failed");
    let work = tempfile::tempdir().expect("tempdir");
    let mut config = tango_vmms::docker::DockerConfig::new(autodriver(), work.path().to_path_buf());
    config.default_memory_mb = 256;
    Some((config, work))
}

#[cfg(feature = "docker")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_docker_backend_conforms() {
    use tango_vmms::docker::{container_name, Docker};
    let Some((config, _work)) = docker_config() else {
        return;
    };
    let docker = Arc::new(Docker::connect(config).await.expect("dockerd answers"));
    // A container whose PID 1 died (OOM-killed, or killed from outside).
    let api = docker.clone();
    let damage: Damage = Arc::new(move |vm| {
        let api = api.clone();
        Box::pin(async move {
            api.api()
                .kill_container(
                    &container_name(&vm),
                    None::<bollard::query_parameters::KillContainerOptions>,
                )
                .await
                .map_err(|e| e.to_string())
        })
    });
    let backend: Arc<dyn Vmms> = docker;
    let target = Target::new(backend, "tango-test-bookworm", "cfdk").with_damage(damage);
    run(&target).await.assert_passed();
}

/// The docker backend as tangod runs it with no `[[docker.hosts]]`: the
/// fleet of the one local engine.
#[cfg(feature = "docker")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_docker_fleet_of_one_host_conforms() {
    use tango_vmms::docker::{container_name, DockerFleet, FleetConfig};
    let Some((config, _work)) = docker_config() else {
        return;
    };
    let prefix = "cfdf";
    let fleet = DockerFleet::connect(FleetConfig::new(config, prefix))
        .await
        .expect("dockerd answers");
    let api = fleet.host_backend("local").expect("the local host is up");
    let damage: Damage = Arc::new(move |vm| {
        let api = api.clone();
        Box::pin(async move {
            api.api()
                .kill_container(
                    &container_name(&vm),
                    None::<bollard::query_parameters::KillContainerOptions>,
                )
                .await
                .map_err(|e| e.to_string())
        })
    });
    let backend: Arc<dyn Vmms> = Arc::new(fleet);
    let target = Target::new(backend, "tango-test-bookworm", prefix).with_damage(damage);
    run(&target).await.assert_passed();
}
