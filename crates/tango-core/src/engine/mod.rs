//! The job engine: its public API ([`Engine`] and the types it takes and
//! answers) and the shared state every part works on.
//!
//! Every state change is written to the [`Store`] before it is acted on. The
//! dispatcher sleeps on a [`Notify`] woken by a new job, a freed VM or a new
//! pool VM; the outbox sleeps until its earliest due callback or a new one.
//!
//! Each concern has its own file, an `impl Inner` block and its own tests:
//! `validate` (what `addJob` checks), `scheduler` (the policy choosing the
//! next job, a pure type), `dispatch` (the queue and what starts next,
//! restart recovery), `pools` (VM pools and placement), `worker` (one job's
//! steps and retries), `outbox` (callback delivery), `sweeps` (orphan
//! VMs and unused upload blobs) and `cluster` (several servers sharing one
//! store: claiming, takeover, fencing, one result a job).

mod cluster;
mod dispatch;
mod outbox;
mod pools;
pub mod scheduler;
mod sweeps;
#[cfg(test)]
mod test_harness;
mod validate;
mod worker;

use pools::Pool;
use scheduler::Scheduler;

use crate::config::EngineConfig;
use crate::files::{DataDir, FilesError};
use crate::model::{now_ms, CloudCredentials, Job, JobId, JobState, Machine};
use crate::names::check_image;
use crate::store::{Store, StoreError};
use crate::vmms::{HostStatus, Vmms, VmmsError};
use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Delivers a callback: POSTs `body` to `url` as Tango does (multipart file
/// part `file`, header `Filename`). Implemented by the server with an HTTP
/// client; the engine only decides when.
#[async_trait]
pub trait CallbackSender: Send + Sync + 'static {
    async fn send(&self, url: &str, output_file: &str, body: Vec<u8>) -> Result<(), String>;
}

/// A job as a client submits it, before validation.
#[derive(Debug, Clone, Default)]
pub struct NewJob {
    pub name: String,
    pub courselab_dir: String,
    /// The courselab's name without the key (logs never show keys).
    pub courselab: String,
    pub image: String,
    pub vmms: Option<String>,
    /// `(localFile, destFile)` pairs.
    pub files: Vec<(String, String)>,
    pub output_file: String,
    pub timeout_secs: Option<i64>,
    pub max_kb: Option<i64>,
    pub callback_url: Option<String>,
    pub disable_network: bool,
    pub credentials: Option<CloudCredentials>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request is wrong; the message tells the client what to fix.
    #[error("{0}")]
    Invalid(String),
    #[error("Courselab not found")]
    NoCourselab,
    #[error("Invalid image name")]
    InvalidImage,
    #[error("Invalid prealloc size")]
    InvalidPreallocSize,
    #[error("Pool not found")]
    NoPool,
    #[error("the server is shutting down and accepts no new jobs")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Files(#[from] FilesError),
    #[error("backend error: {0}")]
    Vmms(#[from] VmmsError),
    #[error("{0}")]
    Timeout(String),
}

/// Tango's `/info` counters.
#[derive(Debug, Default)]
pub struct Counters {
    pub job_requests: AtomicU64,
    pub job_retries: AtomicU64,
    pub waitvm_timeouts: AtomicU64,
    pub runjob_timeouts: AtomicU64,
    pub copyin_errors: AtomicU64,
    pub runjob_errors: AtomicU64,
    pub copyout_errors: AtomicU64,
    pub jobs_finished: AtomicU64,
    pub jobs_failed: AtomicU64,
    pub callbacks_delivered: AtomicU64,
    pub callback_retries: AtomicU64,
    pub callbacks_abandoned: AtomicU64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Info {
    pub elapsed_secs: u64,
    pub job_requests: u64,
    pub job_retries: u64,
    pub waitvm_timeouts: u64,
    pub runjob_timeouts: u64,
    pub copyin_errors: u64,
    pub runjob_errors: u64,
    pub copyout_errors: u64,
    pub num_threads: u64,
}

/// A pool as `/pool` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PoolView {
    pub total: Vec<u64>,
    pub free: Vec<u64>,
    pub creating: usize,
    pub target: usize,
    pub vmms: String,
}

#[derive(Default)]
struct State {
    /// Changed only through the methods in `dispatch.rs`, where the order
    /// jobs start in is decided.
    queue: Scheduler,
    /// Queued and running jobs, by id (so pages of them are cheap). Boxed:
    /// a B-tree filled in id order leaves its nodes about half empty, and
    /// a `Job` inline would cost those empty slots at its full size
    /// (600-odd bytes each), about 500 bytes a queued job.
    live: BTreeMap<JobId, Box<Job>>,
    /// Live jobs by a hash of what makes an addJob the same (see
    /// [`same_request`]), so a repeated addJob is found without a walk of
    /// the queue.
    by_request: HashMap<u64, Vec<JobId>>,
    pools: HashMap<String, Pool>,
    /// VMs that exist or are being created, in every pool.
    vm_count: usize,
    /// Names of VMs this engine owns; anything else with the prefix is an orphan.
    owned: HashSet<String>,
    accepting: bool,
}

impl State {
    fn insert_live(&mut self, job: Job) {
        // Almost always one job a hash: a default Vec would reserve four.
        let ids =
            (self.by_request.entry(request_hash(&job))).or_insert_with(|| Vec::with_capacity(1));
        if !ids.contains(&job.id) {
            ids.push(job.id);
        }
        self.live.insert(job.id, Box::new(job));
    }

    fn remove_live(&mut self, id: JobId) -> Option<Job> {
        let job = *self.live.remove(&id)?;
        let key = request_hash(&job);
        if let Some(ids) = self.by_request.get_mut(&key) {
            ids.retain(|other| *other != id);
            if ids.is_empty() {
                self.by_request.remove(&key);
            }
        }
        Some(job)
    }

    /// The live job an identical addJob made, if any.
    fn same_live_request(&self, job: &Job) -> Option<&Job> {
        self.by_request
            .get(&request_hash(job))?
            .iter()
            .filter_map(|id| self.live.get(id).map(|live| &**live))
            .find(|live| same_request(live, job))
    }
}

/// Whether two jobs came from the same addJob (a client sending it twice).
fn same_request(a: &Job, b: &Job) -> bool {
    a.courselab_dir == b.courselab_dir
        && a.output_file == b.output_file
        && a.name == b.name
        && a.inputs == b.inputs
        && a.callback_url == b.callback_url
}

/// A hash of part of what [`same_request`] compares.
fn request_hash(job: &Job) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (&job.courselab_dir, &job.output_file, &job.name).hash(&mut hasher);
    hasher.finish()
}

/// Largest pool a `/prealloc` request or a `[[pools]]` entry may ask for.
pub const MAX_POOL_SIZE: usize = 1024;

pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    config: EngineConfig,
    store: Arc<dyn Store>,
    data: Arc<DataDir>,
    backends: HashMap<String, Arc<dyn Vmms>>,
    callbacks: Arc<dyn CallbackSender>,
    state: Mutex<State>,
    dispatch_wake: Notify,
    outbox_wake: Notify,
    counters: Counters,
    metrics: crate::metrics::EngineMetrics,
    started: Instant,
    /// Stops the dispatcher, the outbox and the sweeper.
    stop: CancellationToken,
    /// Cancelled when the shutdown grace period is over: running jobs stop
    /// where they are and their VMs are destroyed (the store still says
    /// running, so the next start re-queues them).
    abandon: CancellationToken,
    workers: TaskTracker,
    images_cache: Mutex<HashMap<String, (Instant, Vec<String>)>>,
    /// With a shared store: this server among the others (`cluster.rs`).
    cluster: Option<cluster::Cluster>,
    /// Cancelled when this server is fenced (it lost its jobs to the
    /// other servers): each worker holds the one current at its start.
    epoch: Mutex<CancellationToken>,
}

impl Engine {
    /// Builds the engine and recovers from the previous run: jobs that were
    /// running are re-queued (counting a retry), queued jobs keep their
    /// order, and every VM with this prefix is destroyed (none is owned yet).
    pub async fn start(
        config: EngineConfig,
        store: Arc<dyn Store>,
        data: Arc<DataDir>,
        backends: Vec<Arc<dyn Vmms>>,
        callbacks: Arc<dyn CallbackSender>,
    ) -> Result<Engine, EngineError> {
        let backends: HashMap<String, Arc<dyn Vmms>> = backends
            .into_iter()
            .map(|b| (b.name().to_string(), b))
            .collect();
        if !backends.contains_key(&config.default_vmms) {
            return Err(EngineError::Invalid(format!(
                "the default backend {:?} is not enabled",
                config.default_vmms
            )));
        }
        config
            .validate()
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        let scheduling = config.scheduling;
        let cluster = store.shared().map(|_| cluster::Cluster::default());
        let inner = Arc::new(Inner {
            config,
            store,
            data,
            backends,
            callbacks,
            state: Mutex::new(State {
                accepting: true,
                queue: Scheduler::new(scheduling),
                ..State::default()
            }),
            dispatch_wake: Notify::new(),
            outbox_wake: Notify::new(),
            counters: Counters::default(),
            metrics: crate::metrics::EngineMetrics::default(),
            started: Instant::now(),
            stop: CancellationToken::new(),
            abandon: CancellationToken::new(),
            workers: TaskTracker::new(),
            images_cache: Mutex::new(HashMap::new()),
            cluster,
            epoch: Mutex::new(CancellationToken::new()),
        });
        inner.sweep_orphans().await;
        if inner.cluster.is_none() {
            // With a shared store, the jobs of a run that died are taken
            // over like any dead server's (`take_over`).
            inner.recover().await?;
        }

        let dispatcher = inner.clone();
        tokio::spawn(async move { dispatcher.dispatch_loop().await });
        let outbox = inner.clone();
        tokio::spawn(async move { outbox.outbox_loop().await });
        let sweeper = inner.clone();
        tokio::spawn(async move { sweeper.sweep_loop().await });
        inner.dispatch_wake.notify_one();
        Ok(Engine { inner })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    pub fn data(&self) -> &Arc<DataDir> {
        &self.inner.data
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    pub fn metrics(&self) -> &crate::metrics::EngineMetrics {
        &self.inner.metrics
    }

    /// Queued jobs, and the age in ms of the oldest one waiting (ids grow
    /// with time, so the oldest is the lowest id).
    pub fn queue_stats(&self) -> (usize, Option<i64>) {
        let st = self.inner.lock();
        let oldest = st
            .queue
            .oldest()
            .and_then(|id| st.live.get(&id))
            .and_then(|job| job.phases.added);
        let queued = st.queued();
        drop(st);
        let queued = match self.inner.shared() {
            Some(_) => self.queue_len(),
            None => queued,
        };
        (queued, oldest.map(|added| now_ms() - added))
    }

    /// Live jobs by state: (queued, running).
    pub fn live_counts(&self) -> (usize, usize) {
        let st = self.inner.lock();
        let running = st.queue.running_len();
        (st.live.len().saturating_sub(running), running)
    }

    pub fn backend_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.backends.keys().cloned().collect();
        names.sort();
        names
    }

    /// Validates and queues a job. Returns the id of the new job, or of the
    /// identical live job when a client sent the same addJob twice.
    pub async fn add_job(&self, new: NewJob) -> Result<JobId, EngineError> {
        let inner = &self.inner;
        if !inner.lock().accepting {
            return Err(EngineError::ShuttingDown);
        }
        let job = inner.validate(new).await?;
        let shared_queued = inner.shared_queued_of(&job).await?;
        {
            let st = inner.lock();
            if let Some(existing) = st.same_live_request(&job) {
                info!(
                    job = existing.id,
                    courselab = %existing.courselab,
                    "duplicate addJob answered with the live job"
                );
                return Ok(existing.id);
            }
            if let Some(max) = inner.config.max_queued_per_submitter {
                let queued = shared_queued
                    .unwrap_or_else(|| st.queue.queued_of(&job.courselab_dir, &job.submitter));
                if queued >= max {
                    return Err(EngineError::Invalid(format!(
                        "{} already has {queued} jobs queued in courselab {} (the server's \
                         max_queued_per_submitter is {max}): wait for one to start, then submit again",
                        job.submitter, job.courselab
                    )));
                }
            }
        }
        // A shared store's calls wait on the network and the database's
        // commit: made here, they would hold one of the few async threads
        // (one per core) for that long, and those threads, not the
        // database, would bound the addJob rate.
        let job = if inner.shared().is_some() {
            inner
                .on_store(move |store| record_new_job(store, job))
                .await?
        } else {
            record_new_job(inner.store.as_ref(), job)?
        };
        inner.counters.job_requests.fetch_add(1, Ordering::Relaxed);
        let id = job.id;
        info!(job = id, courselab = %job.courselab, image = %job.image, "job added");
        if inner.cluster.is_some() {
            // It waits in the shared store, for whichever server has room.
            inner.dispatch_wake.notify_one();
            return Ok(id);
        }
        {
            let mut st = inner.lock();
            st.enqueue(&job, &inner.config);
            st.insert_live(job);
        }
        inner.dispatch_wake.notify_one();
        Ok(id)
    }

    /// Records a rejected addJob among the dead jobs, with the reason.
    pub fn record_rejected(&self, name: &str, courselab_dir: &str, reason: &str) {
        let inner = &self.inner;
        let result = (|| -> Result<(), StoreError> {
            let mut job = Job {
                id: inner.store.next_job_id()?,
                state: JobState::Failed,
                ..Job::new(
                    name.chars().take(255).collect(),
                    courselab_dir.chars().take(300).collect(),
                    String::new(),
                    String::new(),
                    inner.config.default_vmms.clone(),
                )
            };
            job.add_trace(format!("Error: job rejected: {reason}"));
            inner.store.save_job(&job)
        })();
        if let Err(e) = result {
            warn!("cannot record a rejected job: {e}");
        }
    }

    /// Live jobs (queued or running), oldest first; with a shared store,
    /// those of every server.
    pub fn live_jobs(&self) -> Vec<Job> {
        if let Some(jobs) = self.shared_live_jobs() {
            return jobs;
        }
        let st = self.inner.lock();
        st.live.values().map(|job| Job::clone(job)).collect()
    }

    /// Up to `limit` live jobs that `wanted` accepts, newest first, older
    /// than `before` if given: a page, without copying the whole queue.
    /// Running jobs alone (`running_only`) are found without a walk of the
    /// queued ones.
    pub fn live_jobs_page(
        &self,
        before: Option<JobId>,
        limit: usize,
        running_only: bool,
        mut wanted: impl FnMut(&Job) -> bool,
    ) -> Vec<Job> {
        let below = ..before.unwrap_or(JobId::MAX);
        if let Some(jobs) = self.shared_live_jobs() {
            return jobs
                .into_iter()
                .rev()
                .filter(|job| below.contains(&job.id))
                .filter(|job| !running_only || job.state == JobState::Running)
                .filter(|job| wanted(job))
                .take(limit)
                .collect();
        }
        let st = self.inner.lock();
        if running_only {
            let mut ids: Vec<JobId> = st.queue.running().filter(|id| below.contains(id)).collect();
            ids.sort_unstable_by(|a, b| b.cmp(a));
            return ids
                .into_iter()
                .filter_map(|id| st.live.get(&id))
                .filter(|job| job.state == JobState::Running && wanted(job))
                .take(limit)
                .map(|job| Job::clone(job))
                .collect();
        }
        st.live
            .range(below)
            .rev()
            .map(|(_, job)| job)
            .filter(|job| wanted(job))
            .take(limit)
            .map(|job| Job::clone(job))
            .collect()
    }

    /// Finished jobs, oldest first, at most `dead_jobs_listed` of the newest.
    pub fn dead_jobs(&self) -> Result<Vec<Job>, EngineError> {
        Ok(self.inner.store.jobs_in_states(
            &[JobState::Done, JobState::Failed],
            Some(self.inner.config.dead_jobs_listed),
        )?)
    }

    pub fn get_job(&self, id: JobId) -> Result<Option<Job>, EngineError> {
        if let Some(job) = self.inner.lock().live.get(&id) {
            return Ok(Some(Job::clone(job)));
        }
        Ok(self.inner.store.get_job(id)?)
    }

    pub fn queue_len(&self) -> usize {
        if let Some(shared) = self.inner.shared() {
            match shared.queued_count() {
                Ok(n) => return n,
                Err(e) => warn!("cannot count the queued jobs: {e}"),
            }
        }
        self.inner.lock().queued()
    }

    /// Output printed so far by a running job.
    pub async fn partial_output(
        &self,
        id: JobId,
        max_bytes: usize,
    ) -> Result<Vec<u8>, EngineError> {
        let (vm, vmms) = {
            let st = self.inner.lock();
            match st.live.get(&id) {
                Some(job) if job.state == JobState::Running => match &job.vm {
                    Some(vm) => (vm.clone(), job.vmms.clone()),
                    None => return Ok(Vec::new()),
                },
                Some(_) => return Ok(Vec::new()),
                None => {
                    return Err(EngineError::Invalid(format!(
                        "job {id} is not running (it is unknown or already finished)"
                    )))
                }
            }
        };
        let backend = self.inner.backend(&vmms)?;
        let limit = Duration::from_secs(self.inner.config.timeouts.query_secs);
        call(
            limit,
            "partial output",
            backend.partial_output(&vm, max_bytes),
        )
        .await
    }

    pub fn info(&self) -> Info {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let running = self.inner.lock().queue.running_len() as u64;
        Info {
            elapsed_secs: self.inner.started.elapsed().as_secs(),
            job_requests: get(&c.job_requests),
            job_retries: get(&c.job_retries),
            waitvm_timeouts: get(&c.waitvm_timeouts),
            runjob_timeouts: get(&c.runjob_timeouts),
            copyin_errors: get(&c.copyin_errors),
            runjob_errors: get(&c.runjob_errors),
            copyout_errors: get(&c.copyout_errors),
            num_threads: running,
        }
    }

    pub fn pools(&self) -> HashMap<String, PoolView> {
        let st = self.inner.lock();
        st.pools
            .iter()
            .map(|(image, pool)| {
                (
                    image.clone(),
                    PoolView {
                        total: pool.all.iter().copied().collect(),
                        free: pool.free.iter().map(|vm| vm.id).collect(),
                        creating: pool.creating,
                        target: pool.target,
                        vmms: pool.vmms.clone(),
                    },
                )
            })
            .collect()
    }

    /// Image names a backend offers (cached for a few seconds).
    pub async fn images(&self, vmms: Option<&str>) -> Result<Vec<String>, EngineError> {
        self.inner
            .images(vmms.unwrap_or(&self.inner.config.default_vmms))
            .await
    }

    /// Sets the pool size of `image` and creates or destroys free VMs to
    /// reach it.
    pub async fn prealloc(
        &self,
        image: &str,
        size: i64,
        vmms: Option<&str>,
        cores: Option<u32>,
        memory_mb: Option<u64>,
    ) -> Result<(), EngineError> {
        let inner = &self.inner;
        check_image(image).map_err(|_| EngineError::InvalidImage)?;
        if !(0..=MAX_POOL_SIZE as i64).contains(&size) {
            return Err(EngineError::InvalidPreallocSize);
        }
        let vmms = vmms.unwrap_or(&inner.config.default_vmms).to_string();
        inner.backend(&vmms)?;
        if !inner.images(&vmms).await?.iter().any(|i| i == image) {
            return Err(EngineError::InvalidImage);
        }
        let size = size as usize;
        let (to_create, to_destroy) = {
            let mut st = inner.lock();
            let pool = st.pools.entry(image.to_string()).or_default();
            pool.vmms = vmms;
            pool.target = size;
            pool.cores = cores.or(pool.cores);
            pool.memory_mb = memory_mb.or(pool.memory_mb);
            let have = pool.all.len() + pool.creating;
            let mut destroy = Vec::new();
            while pool.all.len() + pool.creating > size {
                match pool.free.pop_back() {
                    Some(vm) => {
                        pool.all.remove(&vm.id);
                        destroy.push(vm);
                    }
                    None => break,
                }
            }
            let create = size.saturating_sub(have);
            pool.creating += create;
            st.vm_count += create;
            (create, destroy)
        };
        for vm in to_destroy {
            inner.clone().spawn_destroy(vm);
        }
        for _ in 0..to_create {
            inner.clone().spawn_pool_vm(image.to_string());
        }
        Ok(())
    }

    /// Loads a `docker save` tar as image `<name>:latest` on a backend.
    pub async fn build_image(
        &self,
        vmms: Option<&str>,
        name: &str,
        tar: &std::path::Path,
    ) -> Result<(), EngineError> {
        check_image(name).map_err(|_| EngineError::InvalidImage)?;
        let vmms = vmms.unwrap_or(&self.inner.config.default_vmms);
        let backend = self.inner.backend(vmms)?;
        call(
            Duration::from_secs(1800),
            "building the image",
            backend.build_image(name, tar),
        )
        .await?;
        self.inner
            .images_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(vmms);
        Ok(())
    }

    /// Every host of the backends that spread their VMs over several
    /// machines, by backend and name.
    pub fn hosts(&self) -> Vec<HostStatus> {
        let mut hosts: Vec<HostStatus> = self
            .inner
            .backends
            .values()
            .flat_map(|backend| backend.hosts())
            .collect();
        hosts.sort_by(|a, b| (&a.vmms, &a.name).cmp(&(&b.vmms, &b.name)));
        hosts
    }

    /// Drains `host` (no new VMs go there, its idle VMs are removed, its
    /// running jobs finish) or, with `draining` false, lets it take VMs again.
    pub async fn set_host_draining(&self, host: &str, draining: bool) -> Result<(), EngineError> {
        let inner = &self.inner;
        let backend = inner
            .backends
            .values()
            .find(|backend| backend.hosts().iter().any(|h| h.name == host))
            .cloned()
            .ok_or_else(|| VmmsError::NoSuchHost(host.to_string()))?;
        call(
            Duration::from_secs(60),
            "draining the host",
            backend.set_host_draining(host, draining),
        )
        .await?;
        if draining {
            let idle = pools::take_idle_on_host(&mut inner.lock(), host);
            for vm in idle {
                inner.clone().spawn_destroy(vm);
            }
        }
        Ok(())
    }

    /// Graceful stop: refuse new jobs, let running ones finish within the
    /// grace period, and stop. Jobs still running after it are re-queued by
    /// the next start.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.lock().accepting = false;
        inner.stop.cancel();
        inner.workers.close();
        let grace = Duration::from_secs(inner.config.shutdown_grace_secs);
        if tokio::time::timeout(grace, inner.workers.wait())
            .await
            .is_err()
        {
            warn!(
                "jobs still running after the shutdown grace period: stopping them; \
                 the next start re-queues them"
            );
            inner.abandon.cancel();
            let destroying = Duration::from_secs(inner.config.timeouts.destroy_secs + 5);
            if tokio::time::timeout(destroying, inner.workers.wait())
                .await
                .is_err()
            {
                warn!("VMs of stopped jobs are still being destroyed; the next start removes them");
            }
        }
        // Leave nothing behind: idle VMs go now.
        let idle: Vec<Machine> = {
            let mut st = inner.lock();
            st.pools
                .values_mut()
                .flat_map(|pool| {
                    let free: Vec<Machine> = pool.free.drain(..).collect();
                    for vm in &free {
                        pool.all.remove(&vm.id);
                    }
                    free
                })
                .collect()
        };
        futures_util::future::join_all(idle.iter().map(|vm| inner.destroy(vm))).await;
        // VMs whose destruction failed earlier (e.g. while a daemon was
        // away) are no longer owned: one last sweep removes them.
        inner.sweep_orphans().await;
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
}

/// Runs a backend call under a time limit.
async fn call<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, VmmsError>>,
) -> Result<T, EngineError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(EngineError::Timeout(format!(
            "{what} timed out after {} s",
            limit.as_secs()
        ))),
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough state:
        // every mutation is a few field updates.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn backend(&self, name: &str) -> Result<Arc<dyn Vmms>, EngineError> {
        self.backends.get(name).cloned().ok_or_else(|| {
            EngineError::Invalid(format!(
                "backend {name:?} is not enabled on this server (enabled: {})",
                self.backends.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    fn timeout(&self, secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    async fn images(&self, vmms: &str) -> Result<Vec<String>, EngineError> {
        const FRESH: Duration = Duration::from_secs(5);
        if let Some((at, images)) = self
            .images_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(vmms)
        {
            if at.elapsed() < FRESH {
                return Ok(images.clone());
            }
        }
        let backend = self.backend(vmms)?;
        let images = call(
            self.timeout(self.config.timeouts.query_secs),
            "listing images",
            backend.get_images(),
        )
        .await?;
        self.images_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vmms.to_string(), (Instant::now(), images.clone()));
        Ok(images)
    }
}

/// Gives a new job its id and first trace entry and stores it, queued.
fn record_new_job(store: &dyn Store, mut job: Job) -> Result<Job, StoreError> {
    job.id = store.next_job_id()?;
    job.add_trace(format!("Added job {}:{} to queue", job.name, job.id));
    // A queued job's record stays in memory until it runs: no spare
    // room in its trace (the next entry comes when it is dispatched).
    job.trace.shrink_to_fit();
    store.save_job(&job)?;
    Ok(job)
}

#[cfg(test)]
#[path = "api_tests.rs"]
mod tests;
