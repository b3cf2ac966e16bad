//! Containers: creating and starting them (limits, capabilities, scratch
//! tmpfs, the autodriver as PID 1), their network per job, their cgroups
//! (OOM kills, CPU weight by the job's age), and waiting for, checking,
//! listing and removing them.

use super::{
    api_error, container_name, is_not_found, naming, status_code, vm_error, Docker, VmmsError,
    AUTODRIVER_PATH, WRITABLE_DIRS_PATH,
};
use crate::cgroupfs::{self, CpuPriority};
use bollard::errors::Error as ApiError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, ContainerUpdateBody,
    HostConfig, HostConfigCgroupnsModeEnum, HostConfigLogConfig, NetworkConnectRequest,
    NetworkDisconnectRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures_util::{StreamExt, TryStreamExt};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tango_core::model::Machine;

/// Writable directories given private tmpfs mounts (path, mode, size in
/// eighths of the memory limit). Together they stay below the limit: a job
/// that fills them gets ENOSPC, not a memory cgroup thrashing for seconds
/// over tmpfs pages it cannot reclaim before the OOM killer acts.
const SCRATCH_DIRS: [(&str, &str, u64); 3] = [
    ("/home", "755", 4),
    ("/tmp", "1777", 1),
    ("/var/tmp", "1777", 1),
];
/// Linux capabilities the autodriver needs as root in the container: switch
/// to the grading user, hand it the job's files, remove what it leaves
/// anywhere, kill what it leaves running. Everything else is dropped.
const AUTODRIVER_CAPS: [&str; 8] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETUID",
    "SETGID",
];
/// CPU shares of a container whose job has run longer than
/// [`DockerConfig::cpu_background_after`]: a tenth of the default, as the
/// sandbox does (cgroup v1 `cpu.shares`; Docker converts it for v2).
const BACKGROUND_CPU_SHARES: i64 = 102;
/// The default CPU shares, restored when a reused container's next job
/// starts. (Containers are created without a value, which means the same.)
const NORMAL_CPU_SHARES: i64 = 1024;
/// How long a job's container keeps ten times the default CPU weight (when
/// its cgroup is writable here; see `Docker::cpu_priority_by_age`).
const FRESH_CPU_FOR: Duration = Duration::from_millis(50);

/// Aborts a background task when the job it watches ends, however it ends.
pub(super) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A container's cgroups as seen on this host. Read and written there, they
/// save Engine API round trips: the OOM-kill counter (which the kernel
/// counts before the victim dies, so unlike Docker's `oom` event it is never
/// late) and the CPU weight (set three times per job).
#[derive(Debug, Default)]
pub(super) enum HostCgroup {
    /// Not looked for yet.
    #[default]
    Unknown,
    /// The daemon's cgroups are not visible here (a remote daemon, tangod in
    /// a container of its own): Docker's events and API instead.
    Unavailable,
    Found {
        cgroup: cgroupfs::ForeignCgroup,
        /// The OOM-kill count when the current job started, if known.
        oom_kills_at_start: Option<u64>,
    },
}

async fn set_cpu_shares(api: &bollard::Docker, name: &str, shares: i64) -> Result<(), ApiError> {
    let update = ContainerUpdateBody {
        cpu_shares: Some(shares),
        ..Default::default()
    };
    api.update_container(name, update).await
}

fn unix_seconds(at: SystemTime) -> String {
    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    format!(
        "{}.{:09}",
        since_epoch.as_secs(),
        since_epoch.subsec_nanos()
    )
}

/// The cgroups of a running container, when the daemon runs on this host
/// and tangod sees its processes and cgroups.
fn container_cgroup(inspect: &ContainerInspectResponse) -> Option<cgroupfs::ForeignCgroup> {
    let id = inspect.id.as_deref().filter(|id| id.len() >= 12)?;
    let pid = inspect.state.as_ref()?.pid.filter(|&pid| pid > 0)?;
    let proc_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    cgroupfs::ForeignCgroup::find(&proc_cgroup, Path::new("/sys/fs/cgroup"), id)
}

impl Docker {
    /// Creates and starts the container of `vm` (Tango's initializeVM):
    /// limits, capabilities, network and the autodriver as PID 1.
    pub(super) async fn create_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        let name = container_name(vm);
        let prefix = naming::machine_prefix(vm).ok_or_else(|| {
            VmmsError::Backend(format!(
                "VM name {:?} does not follow <prefix>-<id>-<image>",
                vm.name
            ))
        })?;
        let memory_bytes = i64::try_from(self.memory_mb(vm).saturating_mul(1 << 20))
            .map_err(|_| VmmsError::Backend("memory limit too large".into()))?;
        let cores = vm.cores.map(f64::from).or(self.config.default_cores);
        let host_config = HostConfig {
            memory: Some(memory_bytes),
            memory_swap: Some(memory_bytes),
            nano_cpus: cores.map(|c| (c * 1e9) as i64),
            pids_limit: Some(self.config.default_max_pids),
            network_mode: Some(
                if self.config.allow_network {
                    "bridge"
                } else {
                    "none"
                }
                .into(),
            ),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            tmpfs: self.config.scratch_tmpfs.then(|| {
                let memory_mb = self.memory_mb(vm);
                SCRATCH_DIRS
                    .iter()
                    .map(|(path, mode, eighths)| {
                        let size = (memory_mb * eighths / 8).max(1);
                        let options = format!("rw,exec,nosuid,nodev,size={size}m,mode={mode}");
                        (path.to_string(), options)
                    })
                    .collect()
            }),
            // The container's own cgroup appears as its root (Docker's
            // default on cgroup v2 only), so the autodriver reads its own
            // counters and the job learns nothing of the host's layout.
            cgroupns_mode: Some(HostConfigCgroupnsModeEnum::PRIVATE),
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: Some(AUTODRIVER_CAPS.iter().map(|c| c.to_string()).collect()),
            // PID 1 prints nothing and job output is attached, not logged.
            log_config: Some(HostConfigLogConfig {
                typ: Some("none".into()),
                config: None,
            }),
            init: Some(false),
            ..Default::default()
        };
        // Normally from the derived image with the autodriver in it; if that
        // cannot be made, the autodriver is uploaded into each container.
        let mut derived = match self.derived_image(&vm.image).await {
            Ok(derived) => Some(derived),
            Err(e @ VmmsError::NoSuchImage(_)) => return Err(e),
            Err(e) => {
                tracing::warn!("docker: {e}; uploading the autodriver into {name} instead");
                None
            }
        };
        let mut entrypoint = vec![AUTODRIVER_PATH.to_string(), "--idle".to_string()];
        if self.config.serve_jobs {
            entrypoint.push("--serve".into());
        }
        if !self.config.allow_network {
            // Created with `NetworkDisabled`, so that Docker sets up no
            // network sandbox (no `libnetwork-setkey` hook nor `set-ipv6`:
            // two runs of the dockerd binary, ~80 ms of CPU per container
            // here); the loopback is still up (runc), but Docker then leaves
            // /etc/hosts empty (its init layer hides the image's), and
            // `localhost` must resolve. PID 1 writes it: an archive upload
            // would cost another run of the dockerd binary.
            entrypoint.push("--loopback-hosts".into());
        }
        if !self.config.single_use {
            // The list the reused container's jobs purge, made at start.
            entrypoint.extend(["--purge-writable".into(), WRITABLE_DIRS_PATH.into()]);
        }
        let mut body = ContainerCreateBody {
            image: Some(derived.clone().unwrap_or_else(|| vm.image.clone())),
            entrypoint: Some(entrypoint),
            cmd: Some(vec![]),
            // The attach stream of `serve_jobs`; the stdin stays open when
            // a connection closes.
            open_stdin: Some(self.config.serve_jobs),
            attach_stdin: Some(self.config.serve_jobs),
            stdin_once: Some(false),
            user: Some("0:0".into()),
            working_dir: Some("/".into()),
            labels: Some(naming::labels(vm, prefix)),
            // No network sandbox at all (see --loopback-hosts); with networking
            // allowed, the bridge is connected and disconnected per job.
            network_disabled: Some(!self.config.allow_network),
            host_config: Some(host_config),
            ..Default::default()
        };
        // Container starts are work of dockerd, containerd and runc, in no
        // container's cgroup: a burst of them takes the CPU from the jobs
        // already running (see `max_concurrent_starts`).
        let _start_permit = self
            .starts
            .acquire()
            .await
            .map_err(|_| VmmsError::Backend("the docker backend is shutting down".into()))?;
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        let mut created = self
            .api
            .create_container(Some(options.clone()), body.clone())
            .await;
        if created.as_ref().err().and_then(status_code) == Some(409) {
            // A container of that name is left from before (e.g. a crash):
            // the VM starts afresh, as on every backend.
            self.remove(&name).await?;
            created = self.api.create_container(Some(options), body.clone()).await;
        }
        if derived.is_some() && created.as_ref().err().and_then(status_code) == Some(404) {
            // The derived image was removed meanwhile (another server
            // rebuilt the job image): fall back to uploading the autodriver.
            derived = None;
            body.image = Some(vm.image.clone());
            let options = CreateContainerOptionsBuilder::default().name(&name).build();
            created = self.api.create_container(Some(options), body).await;
        }
        if let Err(e) = created {
            return Err(match status_code(&e) {
                Some(404) => VmmsError::NoSuchImage(vm.image.clone()),
                _ => api_error(format_args!("cannot create {name}"), e),
            });
        }
        self.forget(&name);
        if let Err(e) = self.create_and_start(vm, &name, derived.is_none()).await {
            // A half-made container must not be left behind.
            let _ = self.remove(&name).await;
            return Err(e);
        }
        self.with_state(&name, |state| state.created_here = true);
        Ok(())
    }

    /// Waits until the container of `vm` runs (Tango's waitVM).
    pub(super) async fn wait_running(&self, vm: &Machine, max: Duration) -> Result<(), VmmsError> {
        let name = container_name(vm);
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let inspect = self
                .api
                .inspect_container(&name, None)
                .await
                .map_err(|e| vm_error(&name, "cannot inspect", e))?;
            let state = inspect.state.clone().unwrap_or_default();
            match state.status {
                Some(ContainerStateStatusEnum::RUNNING) if state.running == Some(true) => {
                    let fresh = self.with_state(&name, |s| s.created_here && !s.ran_a_job);
                    self.find_cgroup(&name, &inspect, fresh);
                    return Ok(());
                }
                Some(
                    ContainerStateStatusEnum::CREATED
                    | ContainerStateStatusEnum::RESTARTING
                    | ContainerStateStatusEnum::RUNNING,
                ) => {}
                other => {
                    return Err(VmmsError::Backend(format!(
                        "container {name} is not running ({other:?}, exit code {:?})",
                        state.exit_code
                    )))
                }
            }
            // Docker has no event for "started" on an already created
            // container that start_container did not report: poll briefly.
            if tokio::time::Instant::now() >= deadline {
                return Err(VmmsError::Backend(format!(
                    "container {name} did not start within {max:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The autodriver cleaned up after the job and every copy-in gets a
    /// fresh directory; what is left to check is that the container still
    /// runs (its PID 1 may have been killed, e.g. by the OOM killer).
    pub(super) async fn check_reusable(&self, vm: &Machine) -> Result<(), VmmsError> {
        let name = container_name(vm);
        // The next job may be asked for partial output before its copy-in:
        // it must not see this job's stream.
        self.with_state(&name, |state| state.stream = None);
        // Seen running just after the job (the OOM check asks): no need to
        // ask again a moment later.
        if self.with_state(&name, |state| std::mem::take(&mut state.running_after_job)) {
            return Ok(());
        }
        let inspect = self
            .api
            .inspect_container(&name, None)
            .await
            .map_err(|e| vm_error(&name, "cannot inspect", e))?;
        if inspect.state.and_then(|s| s.running) != Some(true) {
            return Err(VmmsError::Backend(format!(
                "container {name} stopped; it cannot be reused"
            )));
        }
        Ok(())
    }

    async fn create_and_start(
        &self,
        vm: &Machine,
        name: &str,
        needs_autodriver: bool,
    ) -> Result<(), VmmsError> {
        if needs_autodriver {
            self.upload(name, self.autodriver_tar.clone())
                .await
                .map_err(|e| api_error(format_args!("cannot put the autodriver into {name}"), e))?;
        }
        self.grading_user(name, &vm.image).await?;
        self.api
            .start_container(name, None)
            .await
            .map_err(|e| api_error(format_args!("cannot start {name}"), e))
    }

    /// With networking allowed, a job without network runs disconnected
    /// from every network; a job with network gets the default bridge back.
    pub(super) async fn apply_network(&self, name: &str, disable: bool) -> Result<(), VmmsError> {
        if !self.config.allow_network {
            return Ok(()); // network_mode none since creation
        }
        let inspect = self
            .api
            .inspect_container(name, None)
            .await
            .map_err(|e| vm_error(name, "cannot inspect", e))?;
        let networks: Vec<String> = inspect
            .network_settings
            .and_then(|s| s.networks)
            .map(|n| n.into_keys().collect())
            .unwrap_or_default();
        if disable {
            for network in networks {
                let request = NetworkDisconnectRequest {
                    container: name.to_string(),
                    force: Some(true),
                };
                self.api
                    .disconnect_network(&network, request)
                    .await
                    .map_err(|e| {
                        api_error(format_args!("cannot disconnect {name} from {network}"), e)
                    })?;
            }
        } else if networks.is_empty() {
            let request = NetworkConnectRequest {
                container: name.to_string(),
                endpoint_config: None,
            };
            self.api
                .connect_network("bridge", request)
                .await
                .map_err(|e| api_error(format_args!("cannot connect {name} to bridge"), e))?;
        }
        Ok(())
    }

    /// Whether the memory limit killed something in the container since
    /// `since`: Docker's `oom` events of this container, or the OOMKilled
    /// flag of a container that died. (Not the autodriver's `killed_by`:
    /// where it cannot find its cgroup it counts OOM kills host-wide.)
    pub(super) async fn oom_killed(&self, name: &str, since: SystemTime) -> bool {
        let inspect = tokio::time::timeout(
            self.config.api_timeout,
            self.api.inspect_container(name, None),
        )
        .await;
        let state = match &inspect {
            Ok(Ok(inspect)) => inspect.state.as_ref(),
            _ => None,
        };
        let running = state.and_then(|s| s.running) == Some(true);
        self.with_state(name, |state| state.running_after_job = running);
        // Some Docker versions keep OOMKilled set for the rest of a
        // container's life once anything in it was killed: trust the flag
        // only when the container itself died, i.e. during this job.
        let died_of_oom = state.is_some_and(|s| !running && s.oom_killed == Some(true));
        if died_of_oom {
            return true;
        }
        let counted = match &inspect {
            Ok(Ok(inspect)) => self.oom_kills_during_job(name, inspect),
            _ => None,
        };
        match counted {
            Some(killed) => killed,
            None => self.oom_event_since(name, since).await,
        }
    }

    /// Looks for the cgroups of a running container, once. `fresh`: this
    /// instance created it and no job has run there, so its OOM-kill count
    /// so far is 0.
    fn find_cgroup(&self, name: &str, inspect: &ContainerInspectResponse, fresh: bool) {
        if !self.with_state(name, |state| matches!(state.cgroup, HostCgroup::Unknown)) {
            return;
        }
        let found = container_cgroup(inspect).filter(|_| self.config.host_cgroups);
        self.with_state(name, |state| {
            state.cgroup = match found {
                // Of a container found running, the count so far is not
                // known to be this job's.
                Some(cgroup) => HostCgroup::Found {
                    oom_kills_at_start: fresh.then_some(0),
                    cgroup,
                },
                None => HostCgroup::Unavailable,
            }
        });
    }

    /// Whether the container's OOM-kill counter rose since the job started;
    /// `None` when it cannot be read here.
    fn oom_kills_during_job(&self, name: &str, inspect: &ContainerInspectResponse) -> Option<bool> {
        let fresh = self.with_state(name, |state| state.created_here);
        self.find_cgroup(name, inspect, fresh);
        self.oom_counter_rose(name)
    }

    /// Whether the OOM-kill counter of the container's cgroup (already
    /// found) rose since the job started; `None` when that is not known
    /// (nothing is changed then, so a second look answers the same).
    pub(super) fn oom_counter_rose(&self, name: &str) -> Option<bool> {
        self.with_state(name, |state| match &mut state.cgroup {
            HostCgroup::Found {
                cgroup,
                oom_kills_at_start: Some(at_start),
            } => {
                let now = cgroupfs::read_oom_kills(&cgroup.oom_counter)?;
                Some(now > std::mem::replace(at_start, now))
            }
            _ => None,
        })
    }

    /// Records the container's OOM-kill count as the job starts (so that
    /// kills during the set-up since the last job are not blamed on it) and
    /// gives it the fresh job's CPU weight; the cgroup, when found.
    pub(super) fn start_job_in_cgroup(&self, name: &str) -> Option<cgroupfs::ForeignCgroup> {
        self.with_state(name, |state| match &mut state.cgroup {
            HostCgroup::Found {
                cgroup,
                oom_kills_at_start,
            } => {
                *oom_kills_at_start = cgroupfs::read_oom_kills(&cgroup.oom_counter);
                Some(cgroup.clone())
            }
            _ => None,
        })
    }

    /// A long job yields contended CPU to short ones: its container's CPU
    /// weight is ten times the default for the job's first
    /// [`FRESH_CPU_FOR`] (so that a burst of new jobs does not hold up the
    /// short ones), the default until `cpu_background_after`, then a tenth
    /// of it. Written to the cgroup directly: no round trip to the daemon.
    pub(super) fn cpu_priority_by_age(
        &self,
        name: &str,
        cgroup: &cgroupfs::ForeignCgroup,
    ) -> Option<AbortOnDrop> {
        let after = self.config.cpu_background_after?;
        let set = |cgroup: &cgroupfs::ForeignCgroup, name: &str, priority| {
            if let Err(e) = cgroup.set_cpu_priority(priority) {
                tracing::debug!("docker: cannot set the CPU weight of {name}: {e}");
            }
        };
        set(cgroup, name, CpuPriority::Fresh);
        let (cgroup, name) = (cgroup.clone(), name.to_string());
        Some(AbortOnDrop(tokio::spawn(async move {
            let fresh_for = FRESH_CPU_FOR.min(after);
            tokio::time::sleep(fresh_for).await;
            set(&cgroup, &name, CpuPriority::Normal);
            tokio::time::sleep(after - fresh_for).await;
            set(&cgroup, &name, CpuPriority::Background);
        })))
    }

    /// [`Self::cpu_priority_by_age`] through the Engine API, for a daemon
    /// whose cgroups are not visible here: only the lowering after
    /// `cpu_background_after`, since each change is a round trip.
    pub(super) async fn lower_cpu_shares_by_api(
        &self,
        name: &str,
    ) -> Result<Option<AbortOnDrop>, VmmsError> {
        // A reused container starts every job at the default weight.
        let cpu_lowered = self.with_state(name, |state| state.cpu_lowered.clone());
        if cpu_lowered.swap(false, Ordering::SeqCst) {
            set_cpu_shares(&self.api, name, NORMAL_CPU_SHARES)
                .await
                .map_err(|e| vm_error(name, "cannot restore the CPU shares of", e))?;
        }
        Ok(self.config.cpu_background_after.map(|after| {
            let (api, name) = (self.api.clone(), name.to_string());
            AbortOnDrop(tokio::spawn(async move {
                tokio::time::sleep(after).await;
                cpu_lowered.store(true, Ordering::SeqCst);
                if let Err(e) = set_cpu_shares(&api, &name, BACKGROUND_CPU_SHARES).await {
                    tracing::debug!("docker: cannot lower the CPU shares of {name}: {e}");
                }
            }))
        }))
    }

    /// Docker's `oom` events of this container since `since`.
    async fn oom_event_since(&self, name: &str, since: SystemTime) -> bool {
        let filters = HashMap::from([
            ("container", vec![name]),
            ("type", vec!["container"]),
            ("event", vec!["oom"]),
        ]);
        let options = EventsOptionsBuilder::default()
            .since(&unix_seconds(since))
            .until(&unix_seconds(SystemTime::now()))
            .filters(&filters)
            .build();
        let events = self.api.events(Some(options)).try_collect::<Vec<_>>();
        let Ok(Ok(events)) = tokio::time::timeout(self.config.api_timeout, events).await else {
            return false;
        };
        // Docker matches the container filter by name prefix: keep only
        // events of this very container.
        events.iter().any(|event| {
            event
                .actor
                .as_ref()
                .and_then(|actor| actor.attributes.as_ref())
                .and_then(|attributes| attributes.get("name"))
                .is_some_and(|n| n == name)
        })
    }

    pub(super) async fn remove(&self, name: &str) -> Result<(), VmmsError> {
        self.remove_confirmed(name).await.map(|_| ())
    }

    /// [`Self::remove`], saying whether the container is known to be gone:
    /// `false` when Docker reported a removal already in progress.
    async fn remove_confirmed(&self, name: &str) -> Result<bool, VmmsError> {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        let removed = self.api.remove_container(name, Some(options)).await;
        if let Some(state) = self.forget(name) {
            if let Some(output) = state.output {
                let _ = tokio::fs::remove_file(output).await;
            }
        }
        match removed {
            // A forced removal answers once the container is gone.
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(true),
            // 409: a removal is already in progress.
            Err(e) if status_code(&e) == Some(409) => Ok(false),
            Err(e) => Err(api_error(format_args!("cannot remove {name}"), e)),
        }
    }

    /// Removes the container of `vm` and confirms it is gone.
    pub(super) async fn remove_confirmed_gone(&self, vm: &Machine) -> Result<(), VmmsError> {
        let name = container_name(vm);
        if self.remove_confirmed(&name).await? {
            return Ok(());
        }
        // A removal Docker reported as in progress ends with "removed".
        let options = WaitContainerOptionsBuilder::default()
            .condition("removed")
            .build();
        let mut wait = self.api.wait_container(&name, Some(options));
        let _ = tokio::time::timeout(self.config.api_timeout, wait.next()).await;
        match self.api.inspect_container(&name, None).await {
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(api_error(format_args!("cannot confirm {name} is gone"), e)),
            Ok(_) => Err(VmmsError::Backend(format!(
                "container {name} still exists after removal"
            ))),
        }
    }

    /// The machines of this server's containers, by their labels.
    pub(super) async fn list_vms(&self, prefix: &str) -> Result<Vec<Machine>, VmmsError> {
        let filters =
            HashMap::from([("label", vec![format!("{}={prefix}", naming::LABEL_PREFIX)])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self
            .api
            .list_containers(Some(options))
            .await
            .map_err(|e| api_error("cannot list containers", e))?;
        let mut machines: Vec<Machine> = containers
            .into_iter()
            .filter_map(|c| c.labels.as_ref().and_then(naming::machine_from_labels))
            .filter(|m| naming::machine_prefix(m) == Some(prefix))
            .collect();
        machines.sort_by_key(|m| m.id);
        Ok(machines)
    }

    pub(super) async fn container_exists(&self, vm: &Machine) -> Result<bool, VmmsError> {
        let name = container_name(vm);
        match self.api.inspect_container(&name, None).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(api_error(format_args!("cannot inspect {name}"), e)),
        }
    }
}

#[cfg(test)]
#[path = "containers_tests.rs"]
mod tests;
