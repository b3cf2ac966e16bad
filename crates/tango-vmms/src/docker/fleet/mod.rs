//! The docker backend over several Docker engines (`[[docker.hosts]]`):
//! each new container goes to the roomiest host that takes containers
//! (`placement.rs`), images follow jobs to hosts that lack them, one
//! transfer per host and image (`transfer.rs`; `spread.rs` streams from a
//! host that has them, else pulls from the `[docker] registry`), and hosts
//! that stop answering are taken out and, once back, swept and let in again
//! (`health.rs`); what the fleet knows of each host is in `member.rs`. Each
//! host is driven by a [`Docker`] of its own; with one host this is that
//! one backend.
//!
//! A call for a VM on a host that is down answers
//! [`VmmsError::Unavailable`]: the engine then runs the job again on
//! another host without spending its retries (the fault was the host's).

mod health;
mod host;
mod member;
mod placement;
mod spread;
mod transfer;

pub(in crate::docker) use host::connect_api;
pub use host::{check_hosts, DockerHost, LOCAL_HOST};
pub use spread::check_registry;

use super::{container_name, Docker, DockerConfig};
use async_trait::async_trait;
use member::{Host, Running};
use placement::{Candidate, Choice};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tango_core::model::{InputFile, Machine};
use tango_core::vmms::{HostStatus, RunOutcome, RunRequest, RunStatus, Vmms, VmmsError};
use transfer::Fetch;

/// Settings of the fleet.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Settings of every host's backend (its `host` is set per host).
    pub docker: DockerConfig,
    /// The engines; empty: the local one ([`DockerHost::local`]).
    pub hosts: Vec<DockerHost>,
    /// The server's VM prefix: a host that answers again loses every
    /// container of it before it takes new ones.
    pub prefix: String,
    /// How often every host is pinged.
    pub health_period: Duration,
    /// How long a ping (or a reconnection) may take before the host counts
    /// as down.
    pub health_timeout: Duration,
    /// `HOST:PORT` of a registry the hosts pull an image from when no host
    /// that is up has it to stream (`HOST:PORT/NAME:TAG` for image
    /// `NAME:TAG`).
    pub registry: Option<String>,
}

impl FleetConfig {
    /// One local host, pinged every 5 s with 10 s to answer (a daemon busy
    /// starting containers can be slow; a host wrongly found down costs
    /// every job on it a rerun).
    pub fn new(docker: DockerConfig, prefix: impl Into<String>) -> FleetConfig {
        FleetConfig {
            docker,
            hosts: Vec::new(),
            prefix: prefix.into(),
            health_period: Duration::from_secs(5),
            health_timeout: Duration::from_secs(10),
            registry: None,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The right to bring one image to one host.
type Turn = Arc<tokio::sync::Mutex<()>>;

/// Where a VM of this server is.
struct Placed {
    host: String,
    /// Its host went down: the VM is forgotten (the host's sweep removes
    /// it), and calls for it answer `Unavailable` until the engine drops it.
    lost: bool,
}

struct Inner {
    base: DockerConfig,
    prefix: String,
    period: Duration,
    ping_timeout: Duration,
    registry: Option<String>,
    hosts: RwLock<BTreeMap<String, Arc<Host>>>,
    vms: Mutex<HashMap<String, Placed>>,
    /// One image transfer per (host, image) at a time; the VMs that need
    /// it wait for that one.
    transfers: Mutex<HashMap<(String, String), Turn>>,
    /// Wakes the health checks at once (a call to a host failed).
    wake: tokio::sync::Notify,
}

impl Inner {
    fn all_hosts(&self) -> Vec<Arc<Host>> {
        self.hosts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn host(&self, name: &str) -> Option<Arc<Host>> {
        self.hosts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    fn up_hosts(&self) -> Vec<(Arc<Host>, Arc<Docker>)> {
        self.all_hosts()
            .into_iter()
            .filter_map(|host| host.docker().map(|docker| (host, docker)))
            .collect()
    }

    async fn connect(&self, spec: &DockerHost) -> Result<Docker, VmmsError> {
        let config = DockerConfig {
            host: Some(spec.clone()),
            ..self.base.clone()
        };
        Docker::connect(config).await
    }

    /// Takes `host` out: no new containers, its VMs forgotten, the health
    /// checks try to bring it back.
    fn mark_down(&self, host: &Host, why: &str) {
        let was_up = {
            let mut state = lock(&host.state);
            state.images = None;
            state.cut.cancel();
            state.docker.take().is_some()
        };
        if !was_up {
            return;
        }
        let mut lost = 0;
        for placed in lock(&self.vms).values_mut() {
            if placed.host == host.name && !placed.lost {
                placed.lost = true;
                lost += 1;
            }
        }
        tracing::warn!(
            host = %host.name,
            lost_vms = lost,
            "docker host is down ({why}): its jobs run again elsewhere"
        );
        self.wake.notify_one();
    }

    fn vms_on(&self, host: &str) -> usize {
        lock(&self.vms)
            .values()
            .filter(|p| p.host == host && !p.lost)
            .count()
    }

    fn drop_removed_hosts(&self) {
        let removed: Vec<String> = self
            .all_hosts()
            .iter()
            .filter(|h| lock(&h.state).removed)
            .filter(|h| h.docker().is_none() || self.vms_on(&h.name) == 0)
            .map(|h| h.name.clone())
            .collect();
        if removed.is_empty() {
            return;
        }
        let mut hosts = self.hosts.write().unwrap_or_else(|e| e.into_inner());
        for name in removed {
            // A SIGHUP may have listed it again since.
            if !hosts.get(&name).is_some_and(|h| lock(&h.state).removed) {
                continue;
            }
            hosts.remove(&name);
            tracing::info!(host = %name, "docker host removed from the config is gone");
        }
    }

    /// What a failed call on `host` means: when the host no longer answers
    /// a ping it is down, and the call's error becomes `Unavailable`.
    async fn settle<T>(
        &self,
        host: &Host,
        docker: &Docker,
        result: Result<T, VmmsError>,
    ) -> Result<T, VmmsError> {
        match result {
            Err(e @ (VmmsError::Unavailable(_) | VmmsError::Backend(_))) => {
                match health::ping(docker, self.ping_timeout).await {
                    Ok(()) => Err(e),
                    Err(why) => {
                        self.mark_down(host, &why);
                        Err(VmmsError::Unavailable(format!(
                            "docker host {} stopped answering: {e}",
                            host.name
                        )))
                    }
                }
            }
            other => other,
        }
    }

    /// The host of an existing VM and its backend.
    async fn locate(&self, vm: &Machine) -> Result<(Arc<Host>, Arc<Docker>), VmmsError> {
        let name = container_name(vm);
        let placed = lock(&self.vms).get(&name).map(|p| (p.host.clone(), p.lost));
        let host_name = match placed {
            Some((host, true)) => {
                return Err(VmmsError::Unavailable(format!(
                    "docker host {host} went down; VM {name} is lost"
                )))
            }
            Some((host, false)) => host,
            None => match &vm.host {
                Some(host) => host.clone(),
                None => self.find(vm).await?,
            },
        };
        let host = self
            .host(&host_name)
            .ok_or_else(|| VmmsError::NoSuchVm(name.clone()))?;
        let docker = host.docker().ok_or_else(|| {
            VmmsError::Unavailable(format!("docker host {host_name} of VM {name} is down"))
        })?;
        Ok((host, docker))
    }

    /// Looks for a VM of unknown host on every host that is up.
    async fn find(&self, vm: &Machine) -> Result<String, VmmsError> {
        for (host, docker) in self.up_hosts() {
            if host.unless_cut(docker.exists_vm(vm)).await.unwrap_or(false) {
                self.record(vm, &host.name);
                return Ok(host.name.clone());
            }
        }
        Err(VmmsError::NoSuchVm(container_name(vm)))
    }

    fn record(&self, vm: &Machine, host: &str) {
        lock(&self.vms).insert(
            container_name(vm),
            Placed {
                host: host.to_string(),
                lost: false,
            },
        );
    }

    fn forget(&self, vm: &Machine) {
        lock(&self.vms).remove(&container_name(vm));
    }

    /// Whether the VM's host went down after the VM was placed: whatever a
    /// call on it answered then, the fault was the host's.
    fn is_lost(&self, vm: &Machine) -> bool {
        lock(&self.vms)
            .get(&container_name(vm))
            .is_some_and(|p| p.lost)
    }

    /// A call's error for a VM whose host went down meanwhile (and may
    /// have been swept on its return) becomes `Unavailable`, so the engine
    /// runs the job again without spending one of its retries.
    fn blame_host_if_lost(&self, vm: &Machine, e: VmmsError) -> VmmsError {
        if matches!(e, VmmsError::Unavailable(_)) || !self.is_lost(vm) {
            return e;
        }
        VmmsError::Unavailable(format!(
            "the docker host of VM {} went down during the call: {e}",
            vm.name
        ))
    }

    fn unless_lost<T>(&self, vm: &Machine, result: Result<T, VmmsError>) -> Result<T, VmmsError> {
        result.map_err(|e| self.blame_host_if_lost(vm, e))
    }

    /// Reads the image lists of the hosts that are up and have none (or
    /// all of them, with `all`).
    async fn refresh_images(&self, all: bool) {
        let stale: Vec<_> = self
            .up_hosts()
            .into_iter()
            .filter(|(host, _)| all || lock(&host.state).images.is_none())
            .collect();
        let reads = stale.iter().map(|(host, docker)| async move {
            let images = host.unless_cut(docker.get_images()).await;
            let images = self.settle(host, docker, images).await;
            if let Ok(images) = images {
                lock(&host.state).images = Some(images.into_iter().collect());
            }
        });
        futures_util::future::join_all(reads).await;
    }

    /// Chooses the host of a new VM and reserves a place there (so that
    /// VMs made at once spread); streams or pulls the image there first
    /// when needed.
    async fn place(self: &Arc<Self>, vm: &Machine) -> Result<(Arc<Host>, Arc<Docker>), VmmsError> {
        let image = &vm.image;
        for attempt in 0..2 {
            self.refresh_images(attempt > 0).await;
            // Only once every image list was read again: one may be stale.
            let can_pull = attempt > 0 && self.registry.is_some();
            let hosts = self.all_hosts();
            let snapshot: Vec<(bool, bool, usize, bool)> = hosts
                .iter()
                .map(|h| {
                    let state = lock(&h.state);
                    let has_image = state.has_image(image);
                    let max_vms = lock(&h.spec).max_vms;
                    (state.docker.is_some(), state.draining, max_vms, has_image)
                })
                .collect();
            let name = container_name(vm);
            let (chosen, fetch, free) = {
                let mut vms = lock(&self.vms);
                let candidates: Vec<Candidate> = hosts
                    .iter()
                    .zip(&snapshot)
                    .map(|(h, &(up, draining, max_vms, has_image))| Candidate {
                        name: &h.name,
                        up,
                        draining,
                        max_vms,
                        vms: vms.values().filter(|p| p.host == h.name && !p.lost).count(),
                        has_image,
                    })
                    .collect();
                let (chosen, fetch, free) = match placement::choose(&candidates, can_pull) {
                    Choice::Place { host, free } => (host.to_string(), None, free),
                    Choice::Stream { host, from, free } => (
                        host.to_string(),
                        Some(Fetch::Stream(from.to_string())),
                        free,
                    ),
                    Choice::Pull { host, free } => (
                        host.to_string(),
                        self.registry.clone().map(Fetch::Pull),
                        free,
                    ),
                    Choice::NoHost => {
                        return Err(VmmsError::Unavailable(
                            "no docker host takes new containers (all are down or draining)".into(),
                        ))
                    }
                    Choice::NoImage if attempt == 0 => continue,
                    Choice::NoImage if snapshot.iter().any(|&(up, ..)| !up) => {
                        // It may be on a host that is down: wait for it.
                        return Err(VmmsError::Unavailable(format!(
                            "no docker host that is up has image {image}; some are down"
                        )));
                    }
                    Choice::NoImage => return Err(VmmsError::NoSuchImage(image.clone())),
                };
                vms.insert(
                    name,
                    Placed {
                        host: chosen.clone(),
                        lost: false,
                    },
                );
                (chosen, fetch, free)
            };
            let host = self.host(&chosen);
            let docker = host.as_ref().and_then(|h| h.docker());
            let (Some(host), Some(docker)) = (host, docker) else {
                self.forget(vm);
                continue; // went down meanwhile
            };
            tracing::info!(vm = %vm.name, host = %host.name, free, "docker: placing the VM");
            if let Some(fetch) = fetch {
                if let Err(e) = self.bring(&host, &docker, fetch, image).await {
                    self.forget(vm);
                    return Err(match e {
                        // A host that is down may have it: wait for it.
                        VmmsError::NoSuchImage(_) if snapshot.iter().any(|&(up, ..)| !up) => {
                            VmmsError::Unavailable(format!(
                                "the registry has no image {image}, and some docker hosts \
                                 that may have it are down"
                            ))
                        }
                        e => e,
                    });
                }
            }
            return Ok((host, docker));
        }
        Err(VmmsError::Unavailable(format!(
            "the docker host chosen for VM {} went down before it was made",
            vm.name
        )))
    }
}

/// Stops the health checks with the fleet.
struct HealthTask(tokio::task::JoinHandle<()>);

impl Drop for HealthTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The docker VMMS over every configured Docker engine.
pub struct DockerFleet {
    inner: Arc<Inner>,
    _health: HealthTask,
}

impl DockerFleet {
    /// Connects to every host (at once). A host that does not answer now
    /// starts down and joins when it does; with none answering this fails,
    /// saying why for each.
    pub async fn connect(config: FleetConfig) -> Result<DockerFleet, VmmsError> {
        let specs = if config.hosts.is_empty() {
            vec![DockerHost::local(usize::MAX)]
        } else {
            config.hosts.clone()
        };
        check_hosts(&specs).map_err(VmmsError::Backend)?;
        if let Some(registry) = &config.registry {
            check_registry(registry).map_err(VmmsError::Backend)?;
        }
        let inner = Arc::new(Inner {
            base: config.docker.clone(),
            prefix: config.prefix.clone(),
            period: config.health_period.max(Duration::from_millis(100)),
            ping_timeout: config.health_timeout.max(Duration::from_millis(100)),
            registry: config.registry.clone(),
            hosts: RwLock::new(BTreeMap::new()),
            vms: Mutex::new(HashMap::new()),
            transfers: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
        });
        let connected =
            futures_util::future::join_all(specs.iter().map(|spec| inner.connect(spec))).await;
        let mut errors = Vec::new();
        {
            let mut hosts = inner.hosts.write().unwrap_or_else(|e| e.into_inner());
            for (spec, docker) in specs.into_iter().zip(connected) {
                let docker = match docker {
                    Ok(docker) => Some(Arc::new(docker)),
                    Err(e) => {
                        tracing::warn!(host = %spec.name, "docker host is down at start: {e}");
                        errors.push(format!("{}: {e}", spec.name));
                        None
                    }
                };
                hosts.insert(spec.name.clone(), Arc::new(Host::new(spec, docker)));
            }
        }
        if inner.up_hosts().is_empty() {
            return Err(VmmsError::Backend(errors.join("; ")));
        }
        let health = tokio::spawn(health::run(inner.clone()));
        Ok(DockerFleet {
            inner,
            _health: HealthTask(health),
        })
    }

    /// Applies a new host list (SIGHUP): new hosts join once they answer;
    /// hosts no longer listed drain and go once their VMs are gone; a host
    /// whose url or TLS files changed reconnects (its VMs are lost and
    /// their jobs run again elsewhere).
    pub fn set_hosts(&self, specs: Vec<DockerHost>) -> Result<(), VmmsError> {
        let specs = if specs.is_empty() {
            vec![DockerHost::local(usize::MAX)]
        } else {
            specs
        };
        check_hosts(&specs).map_err(VmmsError::Backend)?;
        let wanted: BTreeSet<String> = specs.iter().map(|s| s.name.clone()).collect();
        for spec in specs {
            let existing = self.inner.host(&spec.name);
            let Some(host) = existing else {
                tracing::info!(host = %spec.name, url = %spec.display_url(), "docker host added");
                let host = Arc::new(Host::new(spec, None));
                self.inner
                    .hosts
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(host.name.clone(), host);
                continue;
            };
            let moved = {
                let mut current = lock(&host.spec);
                let moved = current.url != spec.url
                    || current.tls_ca != spec.tls_ca
                    || current.tls_cert != spec.tls_cert
                    || current.tls_key != spec.tls_key
                    || current.insecure != spec.insecure;
                *current = spec;
                moved
            };
            let mut state = lock(&host.state);
            if state.removed {
                // Listed again before it was gone.
                state.removed = false;
                state.draining = false;
            }
            drop(state);
            if moved {
                self.inner.mark_down(&host, "its url or TLS files changed");
            }
        }
        for host in self.inner.all_hosts() {
            if !wanted.contains(&host.name) {
                let mut state = lock(&host.state);
                if !state.removed {
                    state.removed = true;
                    state.draining = true;
                    tracing::info!(
                        host = %host.name,
                        "docker host left the config: it drains and goes once its VMs are gone"
                    );
                }
            }
        }
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Runs the health checks now and waits for them (tests, and callers
    /// that want a host's state settled).
    pub async fn check_now(&self) {
        health::check_all(&self.inner).await;
    }

    /// [`Docker::remove_stale_derived_images`] on every host that is up.
    pub async fn remove_stale_derived_images(&self) -> Result<usize, VmmsError> {
        let mut removed = 0;
        for (_, docker) in self.inner.up_hosts() {
            removed += docker.remove_stale_derived_images().await?;
        }
        Ok(removed)
    }

    /// The backend of host `name`, while it is up (tests, tools).
    pub fn host_backend(&self, name: &str) -> Option<Arc<Docker>> {
        self.inner.host(name).and_then(|h| h.docker())
    }

    /// Calls `f` on the VM's host's backend and settles its error.
    async fn on_vm<'a, T, F, Fut>(&'a self, vm: &'a Machine, f: F) -> Result<T, VmmsError>
    where
        F: FnOnce(Arc<Docker>) -> Fut,
        Fut: std::future::Future<Output = Result<T, VmmsError>> + 'a,
    {
        let (host, docker) = self.inner.locate(vm).await?;
        let result = host.unless_cut(f(docker.clone())).await;
        let settled = self.inner.settle(&host, &docker, result).await;
        self.inner.unless_lost(vm, settled)
    }
}

#[async_trait]
impl Vmms for DockerFleet {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn initialize_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        for attempt in 0..2 {
            let (host, docker) = self.inner.place(vm).await?;
            let made = host.unless_cut(docker.initialize_vm(vm)).await;
            match self.inner.settle(&host, &docker, made).await {
                Ok(()) if self.inner.is_lost(vm) => {
                    // Made after the host's return swept its containers:
                    // nobody would remove it later.
                    let _ = docker.safe_destroy_vm(vm).await;
                    self.inner.forget(vm);
                    return Err(VmmsError::Unavailable(format!(
                        "docker host {} went down while VM {} was made",
                        host.name, vm.name
                    )));
                }
                Ok(()) => {
                    host.vm_starts.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(VmmsError::NoSuchImage(_)) if attempt == 0 => {
                    // Its image list was stale (the image was removed).
                    self.inner.forget(vm);
                    lock(&host.state).images = None;
                }
                Err(e) => {
                    let e = self.inner.blame_host_if_lost(vm, e);
                    self.inner.forget(vm);
                    host.vm_start_failures.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        Err(VmmsError::NoSuchImage(vm.image.clone()))
    }

    async fn wait_vm(&self, vm: &Machine, max: Duration) -> Result<(), VmmsError> {
        self.on_vm(vm, |d| async move { d.wait_vm(vm, max).await })
            .await
    }

    async fn copy_in(&self, vm: &Machine, files: &[InputFile]) -> Result<(), VmmsError> {
        self.on_vm(vm, |d| async move { d.copy_in(vm, files).await })
            .await
    }

    async fn run_job(&self, vm: &Machine, req: &RunRequest) -> Result<RunOutcome, VmmsError> {
        let (host, docker) = self.inner.locate(vm).await?;
        let ran = {
            let _running = Running::start(&host.running_jobs);
            host.unless_cut(docker.run_job(vm, req)).await
        };
        let settled = self.inner.settle(&host, &docker, ran).await;
        match self.inner.unless_lost(vm, settled) {
            // Its container was killed by the host's fault, not the job's.
            Ok(outcome)
                if self.inner.is_lost(vm)
                    && matches!(outcome.status, RunStatus::OsError | RunStatus::UsageError) =>
            {
                Err(VmmsError::Unavailable(format!(
                    "the docker host of VM {} went down while its job ran",
                    vm.name
                )))
            }
            other => other,
        }
    }

    async fn copy_out(&self, vm: &Machine, dest: &Path) -> Result<(), VmmsError> {
        self.on_vm(vm, |d| async move { d.copy_out(vm, dest).await })
            .await
    }

    async fn destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.remove(vm, false).await
    }

    async fn safe_destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.remove(vm, true).await
    }

    async fn get_vms(&self, prefix: &str) -> Result<Vec<Machine>, VmmsError> {
        let up = self.inner.up_hosts();
        let lists = futures_util::future::join_all(up.iter().map(|(host, docker)| async move {
            let vms = host.unless_cut(docker.get_vms(prefix)).await;
            (host, self.inner.settle(host, docker, vms).await)
        }))
        .await;
        let mut all = Vec::new();
        for (host, vms) in lists {
            match vms {
                Ok(vms) => {
                    for mut vm in vms {
                        vm.host = Some(host.name.clone());
                        let name = container_name(&vm);
                        lock(&self.inner.vms).entry(name).or_insert(Placed {
                            host: host.name.clone(),
                            lost: false,
                        });
                        all.push(vm);
                    }
                }
                // Its containers go in its sweep when it is back.
                Err(VmmsError::Unavailable(_)) => {}
                Err(e) => return Err(e),
            }
        }
        all.sort_by(|a, b| (a.id, &a.host).cmp(&(b.id, &b.host)));
        Ok(all)
    }

    async fn exists_vm(&self, vm: &Machine) -> Result<bool, VmmsError> {
        match self.inner.locate(vm).await {
            Ok((host, docker)) => {
                let exists = host.unless_cut(docker.exists_vm(vm)).await;
                self.inner.settle(&host, &docker, exists).await
            }
            Err(VmmsError::NoSuchVm(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn get_images(&self) -> Result<Vec<String>, VmmsError> {
        if self.inner.up_hosts().is_empty() {
            return Err(VmmsError::Unavailable("no docker host is up".into()));
        }
        self.inner.refresh_images(true).await;
        let mut union = BTreeSet::new();
        for host in self.inner.all_hosts() {
            if let Some(images) = &lock(&host.state).images {
                union.extend(images.iter().cloned());
            }
        }
        Ok(union.into_iter().collect())
    }

    async fn partial_output(&self, vm: &Machine, max_bytes: usize) -> Result<Vec<u8>, VmmsError> {
        self.on_vm(vm, |d| async move { d.partial_output(vm, max_bytes).await })
            .await
    }

    /// A VM on a draining host is not reused: the engine then removes it.
    async fn reset_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        let (host, docker) = self.inner.locate(vm).await?;
        if lock(&host.state).draining {
            return Err(VmmsError::Backend(format!(
                "docker host {} is draining: its VMs are not reused",
                host.name
            )));
        }
        let reset = host.unless_cut(docker.reset_vm(vm)).await;
        self.inner.settle(&host, &docker, reset).await
    }

    async fn build_image(&self, name: &str, tar: &Path) -> Result<(), VmmsError> {
        let up = self.inner.up_hosts();
        if up.is_empty() {
            return Err(VmmsError::Unavailable("no docker host is up".into()));
        }
        let loads = futures_util::future::join_all(up.iter().map(|(host, docker)| async move {
            let built = host.unless_cut(docker.build_image(name, tar)).await;
            (host, self.inner.settle(host, docker, built).await)
        }))
        .await;
        let mut failures = Vec::new();
        let mut loaded_on = BTreeSet::new();
        for (host, built) in loads {
            match built {
                Ok(()) => {
                    loaded_on.insert(host.name.clone());
                    let mut state = lock(&host.state);
                    state.outdated.remove(name);
                    if let Some(images) = state.images.as_mut() {
                        images.insert(name.to_string());
                    }
                }
                // A host that went down gets the image streamed when a job
                // needs it there.
                Err(VmmsError::Unavailable(e)) => {
                    tracing::warn!(host = %host.name, "image {name} not loaded: {e}")
                }
                Err(e) => failures.push(format!("on docker host {}: {e}", host.name)),
            }
        }
        // The hosts that missed this build hold an older image of the name,
        // if any: jobs there get this one streamed first.
        if !loaded_on.is_empty() {
            for host in self.inner.all_hosts() {
                if !loaded_on.contains(&host.name) {
                    lock(&host.state).outdated.insert(name.to_string());
                }
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(VmmsError::Backend(failures.join("; ")))
        }
    }

    fn hosts(&self) -> Vec<HostStatus> {
        let vms = lock(&self.inner.vms);
        self.inner
            .all_hosts()
            .iter()
            .map(|host| {
                let state = lock(&host.state);
                let spec = lock(&host.spec);
                HostStatus {
                    name: host.name.clone(),
                    vmms: "docker".into(),
                    url: spec.display_url(),
                    up: state.docker.is_some(),
                    draining: state.draining,
                    max_vms: spec.max_vms,
                    vms: vms
                        .values()
                        .filter(|p| p.host == host.name && !p.lost)
                        .count(),
                    running_jobs: host.running_jobs.load(Ordering::Relaxed),
                    vm_starts: host.vm_starts.load(Ordering::Relaxed),
                    vm_start_failures: host.vm_start_failures.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    async fn set_host_draining(&self, name: &str, draining: bool) -> Result<(), VmmsError> {
        let host = self
            .inner
            .host(name)
            .ok_or_else(|| VmmsError::NoSuchHost(name.to_string()))?;
        let mut state = lock(&host.state);
        if state.removed && !draining {
            return Err(VmmsError::HostLeaving(name.to_string()));
        }
        state.draining = draining;
        tracing::info!(host = %name, draining, "docker host drain set");
        Ok(())
    }

    fn host_of(&self, vm: &Machine) -> Option<String> {
        lock(&self.inner.vms)
            .get(&container_name(vm))
            .map(|p| p.host.clone())
    }
}

impl DockerFleet {
    /// Removes a VM; one whose host is down, gone or never had it is
    /// already gone for this server (a host that answers again is swept).
    async fn remove(&self, vm: &Machine, safe: bool) -> Result<(), VmmsError> {
        let (host, docker) = match self.inner.locate(vm).await {
            Ok(found) => found,
            Err(VmmsError::NoSuchVm(_) | VmmsError::Unavailable(_)) => {
                self.inner.forget(vm);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let removed = if safe {
            host.unless_cut(docker.safe_destroy_vm(vm)).await
        } else {
            host.unless_cut(docker.destroy_vm(vm)).await
        };
        let removed = match self.inner.settle(&host, &docker, removed).await {
            Err(VmmsError::Unavailable(_)) => Ok(()),
            other => other,
        };
        if removed.is_ok() {
            self.inner.forget(vm);
        }
        removed
    }
}
