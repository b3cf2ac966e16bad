//! The job engine: queue, dispatcher, per-image pools, worker steps,
//! retries, restart recovery and the callback outbox.
//!
//! Every state change is written to the [`Store`] before it is acted on. The
//! dispatcher sleeps on a [`Notify`] woken by a new job, a freed VM or a new
//! pool VM; the outbox sleeps until its earliest due callback or a new one.

use crate::config::EngineConfig;
use crate::files::{DataDir, FilesError};
use crate::model::{now_ms, CloudCredentials, InputFile, Job, JobId, JobState, Machine};
use crate::names::{check_component, check_image};
use crate::output::{cap_output, compose_output};
use crate::store::{OutboxEntry, Store, StoreError};
mod scheduler;

use crate::vmms::{RunOutcome, RunRequest, RunStatus, Vmms, VmmsError};
use async_trait::async_trait;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

/// How often the bytes of replaced uploads are looked for.
const BLOB_SWEEP_INTERVAL: Duration = Duration::from_secs(3600);
/// A blob this young may belong to a job being added right now.
const BLOB_MIN_AGE: Duration = Duration::from_secs(3600);

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

#[derive(Debug, Default)]
struct Pool {
    vmms: String,
    /// Size set by `prealloc`; 0 for pools made on demand.
    target: usize,
    cores: Option<u32>,
    memory_mb: Option<u64>,
    free: VecDeque<Machine>,
    /// Ids of every VM of the pool that exists (free or busy).
    all: BTreeSet<u64>,
    creating: usize,
    /// Workers whose job waits for a fresh VM being made, oldest first: a
    /// VM of the pool that comes free meanwhile goes to the first of them
    /// (see [`Pool::offer`]).
    waiting: VecDeque<Waiter>,
    /// VMs of the pool being made for jobs, by VM id (see
    /// `Inner::fresh_or_freed_vm`).
    making: HashMap<u64, Making>,
}

/// A VM being made for a job.
#[derive(Debug)]
struct Making {
    vmms: String,
    /// The worker waiting for it; `None` once that worker's job took
    /// another VM: the next job of the image that needs a new VM waits for
    /// this one instead of making another.
    owner: Option<oneshot::Sender<Made>>,
}

/// A VM that was being made, and whether it was made (else the step that
/// failed).
type Made = (Machine, Result<(), (Step, EngineError)>);

/// A worker waiting for its job's fresh VM, which takes a VM of the same
/// backend that comes free first instead.
#[derive(Debug)]
struct Waiter {
    job: JobId,
    vmms: String,
    handoff: oneshot::Sender<Machine>,
}

impl Pool {
    /// Gives a VM that is free now to the oldest worker still waiting for
    /// a fresh VM of this pool's image and its backend, or else keeps it
    /// free for the next job.
    fn offer(&mut self, mut vm: Machine) {
        while let Some(at) = self.waiting.iter().position(|w| w.vmms == vm.vmms) {
            let Some(waiter) = self.waiting.remove(at) else {
                break;
            };
            match waiter.handoff.send(vm) {
                Ok(()) => return,
                // That worker stopped waiting: the next one, if any.
                Err(unsent) => vm = unsent,
            }
        }
        self.free.push_back(vm);
    }
}

#[derive(Default)]
struct State {
    queue: BTreeSet<JobId>,
    live: HashMap<JobId, Job>,
    pools: HashMap<String, Pool>,
    /// VMs that exist or are being created, in every pool.
    vm_count: usize,
    /// Names of VMs this engine owns; anything else with the prefix is an orphan.
    owned: HashSet<String>,
    accepting: bool,
}

/// Which worker step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Initialize,
    Wait,
    CopyIn,
    Run,
    CopyOut,
}

impl Step {
    fn metric_name(self) -> &'static str {
        match self {
            Step::Initialize => "initialize",
            Step::Wait => "wait",
            Step::CopyIn => "copy_in",
            Step::Run => "run",
            Step::CopyOut => "copy_out",
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Step::Initialize => "initializing the VM",
            Step::Wait => "waiting for the VM",
            Step::CopyIn => "copying input into the VM",
            Step::Run => "running the job",
            Step::CopyOut => "copying output out of the VM",
        }
    }
}

struct SystemFailure {
    step: Step,
    message: String,
    vm: Option<Machine>,
    /// The backend could not be reached at all.
    unavailable: bool,
}

struct Ran {
    vm: Machine,
    outcome: RunOutcome,
    output: Vec<u8>,
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
        let inner = Arc::new(Inner {
            config,
            store,
            data,
            backends,
            callbacks,
            state: Mutex::new(State {
                accepting: true,
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
        });
        inner.sweep_orphans().await;
        inner.recover().await?;

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

    /// Queued jobs, and the age in ms of the oldest one waiting.
    pub fn queue_stats(&self) -> (usize, Option<i64>) {
        let st = self.inner.lock();
        let oldest = st
            .queue
            .iter()
            .filter_map(|id| st.live.get(id))
            .filter_map(|job| job.phases.added)
            .min();
        (st.queue.len(), oldest.map(|added| now_ms() - added))
    }

    /// Live jobs by state: (queued, running).
    pub fn live_counts(&self) -> (usize, usize) {
        let st = self.inner.lock();
        let running = st
            .live
            .values()
            .filter(|j| j.state == JobState::Running)
            .count();
        (st.live.len() - running, running)
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
        {
            let st = inner.lock();
            if let Some(existing) = st.live.values().find(|j| {
                j.courselab_dir == job.courselab_dir
                    && j.output_file == job.output_file
                    && j.name == job.name
                    && j.inputs == job.inputs
                    && j.callback_url == job.callback_url
            }) {
                info!(
                    job = existing.id,
                    courselab = %existing.courselab,
                    "duplicate addJob answered with the live job"
                );
                return Ok(existing.id);
            }
        }
        let mut job = job;
        job.id = inner.store.next_job_id()?;
        job.add_trace(format!("Added job {}:{} to queue", job.name, job.id));
        inner.store.save_job(&job)?;
        inner.counters.job_requests.fetch_add(1, Ordering::Relaxed);
        let id = job.id;
        info!(job = id, courselab = %job.courselab, image = %job.image, "job added");
        {
            let mut st = inner.lock();
            st.queue.insert(id);
            st.live.insert(id, job);
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

    /// Live jobs (queued or running), oldest first.
    pub fn live_jobs(&self) -> Vec<Job> {
        let st = self.inner.lock();
        let mut jobs: Vec<Job> = st.live.values().cloned().collect();
        jobs.sort_by_key(|j| j.id);
        jobs
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
            return Ok(Some(job.clone()));
        }
        Ok(self.inner.store.get_job(id)?)
    }

    pub fn queue_len(&self) -> usize {
        self.inner.lock().queue.len()
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
        let running = self
            .inner
            .lock()
            .live
            .values()
            .filter(|j| j.state == JobState::Running)
            .count() as u64;
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

    async fn validate(&self, new: NewJob) -> Result<Job, EngineError> {
        let invalid = |m: String| EngineError::Invalid(m);
        if new.name.len() > 1024 {
            return Err(invalid("jobName is longer than 1024 bytes".into()));
        }
        check_image(&new.image).map_err(|_| EngineError::InvalidImage)?;
        check_component("output_file", &new.output_file).map_err(|e| invalid(e.to_string()))?;
        if !self.data.courselab_exists(&new.courselab_dir) {
            return Err(EngineError::NoCourselab);
        }
        if new.files.is_empty() {
            return Err(invalid(
                "files is empty: a job needs at least a Makefile".into(),
            ));
        }
        if new.files.len() > 1000 {
            return Err(invalid("a job may have at most 1000 files".into()));
        }
        let mut dests = HashSet::new();
        for (local, dest) in &new.files {
            check_component("localFile", local).map_err(|e| invalid(e.to_string()))?;
            check_component("destFile", dest).map_err(|e| invalid(e.to_string()))?;
            if !dests.insert(dest.as_str()) {
                return Err(invalid(format!("destFile {dest:?} appears twice")));
            }
        }
        if !dests.contains("Makefile") {
            return Err(invalid(
                "no file has destFile \"Makefile\": exactly one file must be the Makefile".into(),
            ));
        }
        if let Some(url) = &new.callback_url {
            let ok_scheme = url.starts_with("http://") || url.starts_with("https://");
            if !ok_scheme || url.len() > 4096 || url.chars().any(|c| c.is_control() || c == ' ') {
                return Err(invalid(format!(
                    "callback_url {url:?} is not an http:// or https:// URL"
                )));
            }
        }
        let vmms = new
            .vmms
            .clone()
            .unwrap_or_else(|| self.config.default_vmms.clone());
        self.backend(&vmms)?;
        if !self.images(&vmms).await?.iter().any(|i| i == &new.image) {
            return Err(EngineError::InvalidImage);
        }
        let timeout_secs = match new.timeout_secs {
            Some(t) if t > 0 => (t as u64).min(self.config.max_timeout_secs),
            _ => self.config.default_timeout_secs,
        };
        let max_kb = match new.max_kb {
            Some(k) if k > 0 => (k as u64).min(self.config.max_output_kb),
            _ => self.config.default_output_kb,
        };
        let mut inputs = Vec::with_capacity(new.files.len());
        for (local, dest) in &new.files {
            let (path, md5) = self
                .data
                .snapshot(self.store.as_ref(), &new.courselab_dir, local)
                .await?;
            inputs.push(InputFile {
                local_file: local.clone(),
                dest_file: dest.clone(),
                path,
                md5,
            });
        }
        let (cores, memory_mb) = {
            let st = self.lock();
            st.pools
                .get(&new.image)
                .map(|p| (p.cores, p.memory_mb))
                .unwrap_or((None, None))
        };
        Ok(Job {
            inputs,
            output_file: new.output_file,
            timeout_secs,
            max_output_bytes: max_kb * 1024,
            callback_url: new.callback_url,
            disable_network: new.disable_network,
            cores,
            memory_mb,
            credentials: new.credentials,
            ..Job::new(new.name, new.courselab_dir, new.courselab, new.image, vmms)
        })
    }

    async fn recover(self: &Arc<Self>) -> Result<(), EngineError> {
        let jobs = self
            .store
            .jobs_in_states(&[JobState::Queued, JobState::Running], None)?;
        let mut requeued = 0;
        for mut job in jobs {
            if job.state == JobState::Running {
                job.retries += 1;
                // A VM in the job's own cloud account is invisible to the
                // orphan sweep (which lists with the server's keys): it is
                // destroyed here, with the keys the job brought.
                if let Some(vm) = job.vm.take().filter(|vm| vm.credentials.is_some()) {
                    info!(
                        job = job.id,
                        courselab = %job.courselab,
                        vm = %vm.name,
                        "destroying the VM an interrupted job had in its own account"
                    );
                    self.destroy(&vm).await;
                }
                if job.retries > self.config.max_retries {
                    let failure = SystemFailure {
                        step: Step::Run,
                        unavailable: false,
                        message: "the server stopped while the job was running".into(),
                        vm: None,
                    };
                    // Its lines say which job, as a worker's do.
                    let span = tracing::info_span!("job", job = job.id, courselab = %job.courselab);
                    self.fail_job(job, failure).instrument(span).await;
                    continue;
                }
                job.state = JobState::Queued;
                job.add_trace(format!(
                    "Re-queued after a server restart interrupted the job (retry {} of {})",
                    job.retries, self.config.max_retries
                ));
                self.store.save_job(&job)?;
                requeued += 1;
            }
            let mut st = self.lock();
            st.queue.insert(job.id);
            st.live.insert(job.id, job);
        }
        let queued = self.lock().queue.len();
        if queued > 0 {
            info!(queued, requeued, "recovered jobs from the store");
        }
        Ok(())
    }

    async fn dispatch_loop(self: Arc<Self>) {
        loop {
            self.dispatch();
            tokio::select! {
                _ = self.dispatch_wake.notified() => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    /// Gives every queued job that can have a VM now its VM, oldest first.
    fn dispatch(self: &Arc<Self>) {
        let mut st = self.lock();
        if self.stop.is_cancelled() {
            return;
        }
        let max_vms = self.config.max_vms;
        let candidates: Vec<JobId> = st.queue.iter().copied().collect();
        for id in candidates {
            let no_free_anywhere = st.pools.values().all(|p| p.free.is_empty());
            if no_free_anywhere && st.vm_count >= max_vms {
                break;
            }
            let Some((image, vmms, own_account)) = st
                .live
                .get(&id)
                .map(|j| (j.image.clone(), j.vmms.clone(), j.credentials.is_some()))
            else {
                st.queue.remove(&id);
                continue;
            };
            let pool = st.pools.entry(image.clone()).or_insert_with(|| Pool {
                vmms: vmms.clone(),
                ..Pool::default()
            });
            // Only a VM of the job's own backend can run it. A job with its
            // own cloud credentials runs on a fresh VM in that account,
            // never on a pool VM of the server's.
            let warm = if own_account {
                None
            } else {
                pool.free
                    .iter()
                    .position(|vm| vm.vmms == vmms && vm.credentials.is_none())
                    .and_then(|at| pool.free.remove(at))
            };
            if warm.is_none() {
                if st.vm_count < max_vms {
                    st.vm_count += 1;
                } else if let Some(idle) = evict_idle(&mut st) {
                    // The slot of an idle VM of another image goes to this job.
                    self.clone().spawn_destroy_keep_count(idle);
                } else {
                    continue;
                }
            }
            st.queue.remove(&id);
            let Some(job) = st.live.get_mut(&id) else {
                continue;
            };
            job.state = JobState::Running;
            job.phases.assigned = Some(now_ms());
            if let Some(vm) = &warm {
                job.vm = Some(vm.clone());
            }
            let job = job.clone();
            let inner = self.clone();
            let span = tracing::info_span!("job", job = id, courselab = %job.courselab);
            self.workers
                .spawn(async move { inner.run_worker(job, warm).await }.instrument(span));
        }
    }

    fn update_live(&self, job: &Job) {
        if let Some(slot) = self.lock().live.get_mut(&job.id) {
            *slot = job.clone();
        }
    }

    async fn run_worker(self: Arc<Self>, mut job: Job, warm: Option<Machine>) {
        job.add_trace(format!(
            "Dispatched job {}:{} [try {}]",
            job.name,
            job.id,
            job.retries + 1
        ));
        if let Err(e) = self.store.save_job(&job) {
            // The job runs anyway: its record still says queued, so a crash
            // before the next write re-runs it after the restart (a lost
            // retry count at worst), and nothing is lost.
            warn!("cannot record job dispatch: {e}");
        }
        self.update_live(&job);
        let executed = tokio::select! {
            // Steps cut short by the shutdown may fail: that is no failure
            // of the job's.
            biased;
            () = self.abandon.cancelled() => {
                // Dropping the steps stopped the job; its VM goes too.
                if let Some(vm) = job.vm.clone() {
                    self.destroy(&vm).await;
                }
                return;
            }
            executed = self.execute(&mut job, warm) => executed,
        };
        match executed {
            Ok(ran) => {
                let healthy = ran.outcome.status != RunStatus::OsError;
                self.finish_ran(job, ran.outcome, ran.output).await;
                self.release_vm(ran.vm, healthy).await;
            }
            Err(failure) => {
                let vm = failure.vm.clone();
                self.count_failure(&job.vmms, &failure);
                if let Some(vm) = vm {
                    self.release_vm(vm, false).await;
                } else {
                    self.forget_unborn_vm();
                }
                self.retry_or_fail(job, failure).await;
            }
        }
        self.dispatch_wake.notify_one();
    }

    fn count_failure(&self, vmms: &str, failure: &SystemFailure) {
        let c = &self.counters;
        let timed_out = failure.message.contains("timed out");
        let counter = match failure.step {
            Step::Initialize | Step::Wait if timed_out => Some(&c.waitvm_timeouts),
            Step::Initialize | Step::Wait => None,
            Step::CopyIn => Some(&c.copyin_errors),
            Step::Run => Some(&c.runjob_errors),
            Step::CopyOut => Some(&c.copyout_errors),
        };
        if let Some(counter) = counter {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics.backend_error(vmms, failure.step.metric_name());
    }

    /// The worker steps: VM, copy in, run, copy out.
    async fn execute(
        self: &Arc<Self>,
        job: &mut Job,
        warm: Option<Machine>,
    ) -> Result<Ran, SystemFailure> {
        let t = &self.config.timeouts;
        let fail = |step: Step, e: EngineError, vm: Option<&Machine>| SystemFailure {
            step,
            unavailable: matches!(e, EngineError::Vmms(VmmsError::Unavailable(_))),
            message: e.to_string(),
            vm: vm.cloned(),
        };
        let backend = self
            .backend(&job.vmms)
            .map_err(|e| fail(Step::Initialize, e, None))?;
        let vm = match warm {
            Some(vm) => vm,
            None if job.credentials.is_some() => {
                let mut vm = self
                    .new_machine(&job.image, &job.vmms, job.cores, job.memory_mb, true)
                    .map_err(|e| fail(Step::Initialize, e, None))?;
                vm.credentials = job.credentials.clone();
                job.vm = Some(vm.clone());
                // Recorded before it exists: after a crash only this
                // record finds a VM in the job's own account.
                if let Err(e) = self.store.save_job(job) {
                    warn!("cannot record the job's VM: {e}");
                }
                self.update_live(job);
                self.make_vm(backend.as_ref(), &vm)
                    .await
                    .map_err(|(step, e)| fail(step, e, Some(&vm)))?;
                vm
            }
            None => self
                .fresh_or_freed_vm(job, backend.clone())
                .await
                .map_err(|(step, e, vm)| fail(step, e, vm.as_ref()))?,
        };
        job.vm = Some(vm.clone());
        job.phases.vm_ready = Some(now_ms());
        job.add_trace(format!("Assigned job to VM {}", vm.name));
        self.update_live(job);

        call(
            self.timeout(t.copy_in_secs),
            "copying input into the VM",
            backend.copy_in(&vm, &job.inputs),
        )
        .await
        .map_err(|e| fail(Step::CopyIn, e, Some(&vm)))?;
        job.phases.copied_in = Some(now_ms());
        self.update_live(job);

        let request = RunRequest {
            job_id: job.id,
            timeout_secs: job.timeout_secs,
            output_cap_bytes: job.max_output_bytes,
            max_procs: self.config.max_procs,
            max_file_bytes: self.config.max_file_bytes,
            disable_network: job.disable_network,
        };
        let run_limit = Duration::from_secs(job.timeout_secs + t.run_grace_secs);
        let outcome = call(run_limit, "running the job", backend.run_job(&vm, &request))
            .await
            .map_err(|e| fail(Step::Run, e, Some(&vm)))?;
        job.phases.ran = Some(now_ms());
        self.update_live(job);
        if matches!(outcome.status, RunStatus::OsError | RunStatus::UsageError) {
            return Err(SystemFailure {
                step: Step::Run,
                unavailable: false,
                message: format!(
                    "the autodriver reported an OS error (exit code {:?})",
                    outcome.exit_code
                ),
                vm: Some(vm),
            });
        }

        let temp = self.data.temp_path("copyout");
        let copied = call(
            self.timeout(t.copy_out_secs),
            "copying output out of the VM",
            backend.copy_out(&vm, &temp),
        )
        .await;
        let output = match copied {
            Ok(()) => tokio::fs::read(&temp).await.map_err(|e| SystemFailure {
                step: Step::CopyOut,
                unavailable: false,
                message: format!("cannot read the copied output: {e}"),
                vm: Some(vm.clone()),
            }),
            Err(e) => Err(fail(Step::CopyOut, e, Some(&vm))),
        };
        let _ = tokio::fs::remove_file(&temp).await;
        let output = output?;
        job.phases.copied_out = Some(now_ms());
        // The autodriver already capped the output; this bounds what a
        // broken backend could hand back, keeping the tail (the score line).
        let output = cap_output(&output, job.max_output_bytes as usize + 4096);
        Ok(Ran {
            vm,
            outcome,
            output,
        })
    }

    /// Initializes a new VM and waits until it is ready, each under its
    /// timeout; the step that failed, if one did.
    async fn make_vm(&self, backend: &dyn Vmms, vm: &Machine) -> Result<(), (Step, EngineError)> {
        let t = &self.config.timeouts;
        call(
            self.timeout(t.initialize_secs),
            "initializing the VM",
            backend.initialize_vm(vm),
        )
        .await
        .map_err(|e| (Step::Initialize, e))?;
        call(
            self.timeout(t.wait_secs),
            "waiting for the VM",
            backend.wait_vm(vm, self.timeout(t.wait_secs)),
        )
        .await
        .map_err(|e| (Step::Wait, e))
    }

    /// A VM being made for the job, or a VM of its pool that comes free
    /// while that one is being made, whichever is ready first: in a burst
    /// of jobs, a job need not wait for VMs made one after another
    /// (container starts wait their turn; an instance boots for a minute)
    /// while those of the jobs before it come free. The VM it waits for is
    /// one made for an earlier job that took another VM meanwhile, if there
    /// is one, else one made for it; a VM whose job took another joins the
    /// pool when it is ready.
    async fn fresh_or_freed_vm(
        self: &Arc<Self>,
        job: &Job,
        backend: Arc<dyn Vmms>,
    ) -> Result<Machine, (Step, EngineError, Option<Machine>)> {
        let (owner, mut made) = oneshot::channel();
        let (handoff, mut freed) = oneshot::channel();
        let claimed = {
            let mut st = self.lock();
            let claimed = st.pools.get_mut(&job.image).and_then(|pool| {
                pool.waiting.push_back(Waiter {
                    job: job.id,
                    vmms: job.vmms.clone(),
                    handoff,
                });
                pool.making
                    .iter_mut()
                    .find(|(_, m)| m.owner.is_none() && m.vmms == job.vmms)
                    .map(|(&id, making)| (id, making))
            });
            match claimed {
                Some((id, making)) => {
                    making.owner = Some(owner);
                    // That VM has its slot: the one counted for this job
                    // is given back.
                    st.vm_count = st.vm_count.saturating_sub(1);
                    Ok(id)
                }
                None => Err(owner),
            }
        };
        let waited_for = match claimed {
            Ok(id) => id,
            Err(owner) => {
                let vm =
                    match self.new_machine(&job.image, &job.vmms, job.cores, job.memory_mb, true) {
                        Ok(vm) => vm,
                        Err(e) => {
                            self.stop_waiting(&job.image, job.id, &mut freed);
                            return Err((Step::Initialize, e, None));
                        }
                    };
                if let Some(pool) = self.lock().pools.get_mut(&vm.image) {
                    pool.making.insert(
                        vm.id,
                        Making {
                            vmms: vm.vmms.clone(),
                            owner: Some(owner),
                        },
                    );
                }
                self.clone().spawn_maker(vm.clone(), backend);
                vm.id
            }
        };
        tokio::select! {
            result = &mut made => {
                self.stop_waiting(&job.image, job.id, &mut freed);
                match result {
                    Ok((vm, Ok(()))) => Ok(vm),
                    Ok((vm, Err((step, e)))) => Err((step, e, Some(vm))),
                    Err(_) => {
                        let stopped = VmmsError::Backend("the task making the VM stopped".into());
                        Err((Step::Initialize, stopped.into(), None))
                    }
                }
            }
            Ok(taken) = &mut freed => {
                debug!(vm = %taken.name, "took a VM that came free before VM {waited_for} was made");
                let sent = {
                    let mut st = self.lock();
                    let making = st
                        .pools
                        .get_mut(&job.image)
                        .and_then(|pool| pool.making.get_mut(&waited_for));
                    match making {
                        // Still being made: for the next job that needs one.
                        Some(making) => {
                            making.owner = None;
                            None
                        }
                        // Made and sent here already, or being sent (then
                        // the maker finds this end gone and keeps it).
                        None => made.try_recv().ok(),
                    }
                };
                if let Some((vm, result)) = sent {
                    self.adopt_made_vm(vm, result).await;
                }
                Ok(taken)
            }
        }
    }

    /// Makes a VM for a worker waiting for it ([`Pool::making`]) and hands
    /// it to the worker that owns it when it is ready, or to the pool.
    fn spawn_maker(self: Arc<Self>, vm: Machine, backend: Arc<dyn Vmms>) {
        let maker = self.clone();
        self.workers.spawn(
            async move {
                let result = tokio::select! {
                    result = maker.make_vm(backend.as_ref(), &vm) => result,
                    () = maker.abandon.cancelled() => {
                        // As for a job's VM: stopped where it is, and gone.
                        maker.destroy(&vm).await;
                        return;
                    }
                };
                let owner = maker
                    .lock()
                    .pools
                    .get_mut(&vm.image)
                    .and_then(|pool| pool.making.remove(&vm.id))
                    .and_then(|m| m.owner);
                let unsent = match owner {
                    Some(owner) => owner.send((vm, result)).err(),
                    None => Some((vm, result)),
                };
                if let Some((vm, result)) = unsent {
                    maker.adopt_made_vm(vm, result).await;
                }
            }
            .in_current_span(),
        );
    }

    /// Takes the job's worker off its pool's waiting list; a VM handed to
    /// it before that goes to the next one.
    fn stop_waiting(&self, image: &str, job: JobId, freed: &mut oneshot::Receiver<Machine>) {
        if let Some(pool) = self.lock().pools.get_mut(image) {
            pool.waiting.retain(|w| w.job != job);
        }
        freed.close();
        if let Ok(handed) = freed.try_recv() {
            self.offer_free(handed);
        }
    }

    /// A VM that is free now goes to a waiting worker or its pool's free
    /// VMs, and the dispatcher looks for a job for it.
    fn offer_free(&self, vm: Machine) {
        if let Some(pool) = self.lock().pools.get_mut(&vm.image) {
            pool.offer(vm);
        }
        self.dispatch_wake.notify_one();
    }

    /// A VM made for a job that took another one meanwhile: it joins the
    /// pool, unless it could not be made or the server is stopping.
    async fn adopt_made_vm(self: &Arc<Self>, vm: Machine, made: Result<(), (Step, EngineError)>) {
        match made {
            Ok(()) if !self.stop.is_cancelled() => self.offer_free(vm),
            Ok(()) => self.release_vm(vm, false).await,
            Err((step, e)) => {
                let failure = SystemFailure {
                    step,
                    unavailable: matches!(e, EngineError::Vmms(VmmsError::Unavailable(_))),
                    message: e.to_string(),
                    vm: None,
                };
                self.count_failure(&vm.vmms, &failure);
                warn!(vm = %vm.name, "cannot make a VM for the pool: {e}");
                self.release_vm(vm, false).await;
            }
        }
    }

    fn new_machine(
        &self,
        image: &str,
        vmms: &str,
        cores: Option<u32>,
        memory_mb: Option<u64>,
        busy: bool,
    ) -> Result<Machine, EngineError> {
        let id = self.store.next_vm_id()?;
        let mut vm = Machine::new(&self.config.prefix, id, image, vmms);
        vm.cores = cores;
        vm.memory_mb = memory_mb;
        let mut st = self.lock();
        st.owned.insert(vm.name.clone());
        if busy {
            st.pools
                .entry(image.to_string())
                .or_insert_with(|| Pool {
                    vmms: vmms.to_string(),
                    ..Pool::default()
                })
                .all
                .insert(id);
        }
        Ok(vm)
    }

    /// A job's fresh VM could not even be named: give its slot back.
    fn forget_unborn_vm(&self) {
        let mut st = self.lock();
        st.vm_count = st.vm_count.saturating_sub(1);
    }

    async fn finish_ran(&self, mut job: Job, outcome: RunOutcome, output: Vec<u8>) {
        let outcome_line = match outcome.status {
            RunStatus::TimedOut => {
                self.counters
                    .runjob_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                format!("Error: Job timed out after {} seconds", job.timeout_secs)
            }
            _ => "Success: Autodriver returned normally".to_string(),
        };
        self.complete(
            &mut job,
            JobState::Done,
            outcome_line,
            &outcome.notes,
            Some(&output),
            None,
        )
        .await;
    }

    /// Writes the output file, records the job as finished together with
    /// its callback, and wakes the outbox.
    async fn complete(
        &self,
        job: &mut Job,
        state: JobState,
        outcome_line: String,
        extra: &[String],
        output: Option<&[u8]>,
        closing_trace: Option<String>,
    ) {
        let received = job.phases.added.unwrap_or_else(now_ms);
        let content = compose_output(&job.name, job.id, received, &outcome_line, extra, output);
        let dest = self.data.output_path(&job.courselab_dir, &job.output_file);
        let frozen = job
            .callback_url
            .as_ref()
            .map(|_| self.data.outbox_path(job.id));
        if let Err(e) = self
            .data
            .write_atomically(&dest, &content, frozen.as_deref())
            .await
        {
            warn!(job = job.id, "cannot write the output file: {e}");
            job.add_trace(format!("Error: cannot write the output file: {e}"));
        }
        job.state = state;
        job.outcome = Some(outcome_line.clone());
        job.phases.finished = Some(now_ms());
        if state == JobState::Done {
            self.metrics.observe_phases(&job.phases);
        }
        job.add_trace(outcome_line);
        if let Some(line) = closing_trace {
            job.add_trace(line);
        }
        let callback = match (&job.callback_url, frozen) {
            (Some(url), Some(path)) => Some(OutboxEntry {
                job_id: job.id,
                url: url.clone(),
                output_file: job.output_file.clone(),
                body_path: path.to_string_lossy().into_owned(),
                attempts: 0,
                next_attempt_ms: now_ms(),
                deadline_ms: now_ms() + (self.config.callback_deadline_secs as i64) * 1000,
                last_error: None,
            }),
            _ => None,
        };
        // A finished job needs its cloud keys no more: they are not kept.
        job.credentials = None;
        if let Some(vm) = &mut job.vm {
            vm.credentials = None;
        }
        if let Err(e) = self.store.finish_job(job, callback.as_ref()) {
            warn!(job = job.id, "cannot record the finished job: {e}");
        }
        match state {
            JobState::Done => &self.counters.jobs_finished,
            _ => &self.counters.jobs_failed,
        }
        .fetch_add(1, Ordering::Relaxed);
        info!(job = job.id, state = state.as_str(), "job finished");
        self.lock().live.remove(&job.id);
        if callback.is_some() {
            self.outbox_wake.notify_one();
        }
    }

    async fn retry_or_fail(self: &Arc<Self>, mut job: Job, failure: SystemFailure) {
        let waited = job.backend_wait_ms;
        if failure.unavailable && waited < self.config.backend_wait_max_secs * 1000 {
            // Doubling waits from 1 s up to 30 s, not counted as retries.
            let delay_ms = waited.clamp(1000, 30_000);
            job.backend_wait_ms += delay_ms;
            job.state = JobState::Queued;
            job.vm = None;
            job.add_trace(format!(
                "Backend unavailable while {}: {}; trying again in {} s (no retry counted)",
                failure.step.as_str(),
                failure.message,
                delay_ms / 1000
            ));
            warn!(job = job.id, "backend unavailable: {}", failure.message);
            if let Err(e) = self.store.save_job(&job) {
                warn!(job = job.id, "cannot record the wait: {e}");
            }
            let id = job.id;
            self.lock().live.insert(id, job);
            let inner = self.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(delay_ms)) => {}
                    _ = inner.stop.cancelled() => return,
                }
                inner.lock().queue.insert(id);
                inner.dispatch_wake.notify_one();
            });
            return;
        }
        job.retries += 1;
        self.counters.job_retries.fetch_add(1, Ordering::Relaxed);
        warn!(
            job = job.id,
            step = failure.step.as_str(),
            "system error: {}",
            failure.message
        );
        if job.retries > self.config.max_retries {
            self.fail_job(job, failure).await;
            return;
        }
        job.state = JobState::Queued;
        job.vm = None;
        job.add_trace(format!(
            "System error while {}: {}; retrying (retry {} of {})",
            failure.step.as_str(),
            failure.message,
            job.retries,
            self.config.max_retries
        ));
        if let Err(e) = self.store.save_job(&job) {
            warn!(job = job.id, "cannot record the retry: {e}");
        }
        let mut st = self.lock();
        st.queue.insert(job.id);
        st.live.insert(job.id, job);
    }

    /// Ends a job that could not run after every retry: an output file that
    /// says so and a callback, like every other job.
    async fn fail_job(&self, mut job: Job, failure: SystemFailure) {
        let tries = job.retries;
        let internal =
            format!("Internal error: Unable to complete job after {tries} tries. Please resubmit");
        let status = format!(
            "Job status: failed while {}: {}",
            failure.step.as_str(),
            failure.message
        );
        let (outcome, extra) = match failure.step {
            Step::CopyIn => (
                "Error: Copy in to VM failed (status=1)".to_string(),
                vec![internal, status],
            ),
            Step::Run if failure.message.contains("OS error") => (
                "Error: OS error while running job on VM".to_string(),
                vec![internal, status],
            ),
            _ => (internal, vec![status]),
        };
        // Autolab reads a dead job whose last trace contains "Error" as failed.
        let closing = format!("Error: job failed after {tries} tries: {}", failure.message);
        self.complete(
            &mut job,
            JobState::Failed,
            outcome,
            &extra,
            None,
            Some(closing),
        )
        .await;
    }

    /// After a job: keep a healthy VM for the next job (reuse), or destroy it
    /// and top the pool up to its target.
    async fn release_vm(self: &Arc<Self>, vm: Machine, healthy: bool) {
        // A VM in a job's own cloud account served that job only.
        let own_account = vm.credentials.is_some();
        if healthy && self.config.reuse_vms && !own_account {
            let reset = match self.backend(&vm.vmms) {
                Ok(backend) => call(
                    self.timeout(self.config.timeouts.query_secs),
                    "resetting the VM",
                    backend.reset_vm(&vm),
                )
                .await
                .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match reset {
                Ok(()) => {
                    self.offer_free(vm);
                    return;
                }
                Err(e) => {
                    self.metrics.backend_error(&vm.vmms, "reset");
                    warn!(vm = %vm.name, "cannot reset VM for reuse: {e}");
                }
            }
        }
        let image = vm.image.clone();
        {
            let mut st = self.lock();
            if let Some(pool) = st.pools.get_mut(&image) {
                pool.all.remove(&vm.id);
            }
        }
        self.clone().spawn_destroy(vm);
        let on_demand = self.lock().pools.get(&image).is_some_and(|p| p.target == 0);
        if on_demand && healthy && !self.config.reuse_vms && !own_account {
            // Without reuse, a fresh VM for the next job of this image is
            // made now, off the next job's critical path.
            {
                let mut st = self.lock();
                if let Some(pool) = st.pools.get_mut(&image) {
                    pool.creating += 1;
                }
                st.vm_count += 1;
            }
            self.clone().spawn_pool_vm(image);
        } else {
            self.top_up(&image);
        }
    }

    /// Starts creating VMs until the pool of `image` reaches its target.
    fn top_up(self: &Arc<Self>, image: &str) {
        let missing = {
            let mut st = self.lock();
            let Some(pool) = st.pools.get_mut(image) else {
                return;
            };
            let missing = pool.target.saturating_sub(pool.all.len() + pool.creating);
            pool.creating += missing;
            st.vm_count += missing;
            missing
        };
        for _ in 0..missing {
            self.clone().spawn_pool_vm(image.to_string());
        }
    }

    /// Creates one free VM for the pool of `image` (slot already counted).
    fn spawn_pool_vm(self: Arc<Self>, image: String) {
        let inner = self.clone();
        inner.workers.spawn(async move {
            let (vmms, cores, memory_mb) = {
                let st = self.lock();
                match st.pools.get(&image) {
                    Some(p) => (p.vmms.clone(), p.cores, p.memory_mb),
                    None => return,
                }
            };
            let created = async {
                let backend = self.backend(&vmms)?;
                let vm = self.new_machine(&image, &vmms, cores, memory_mb, false)?;
                match self.make_vm(backend.as_ref(), &vm).await {
                    Ok(()) => Ok(vm),
                    Err((_, e)) => {
                        // The slot is given back below, not by the destroyer.
                        self.clone().spawn_destroy_keep_count(vm);
                        Err(e)
                    }
                }
            }
            .await;
            let stopping = self.stop.is_cancelled();
            let unused = {
                let mut st = self.lock();
                let pool = st.pools.entry(image.clone()).or_default();
                pool.creating = pool.creating.saturating_sub(1);
                match created {
                    Ok(vm) if !stopping => {
                        pool.all.insert(vm.id);
                        pool.offer(vm);
                        None
                    }
                    other => Some(other),
                }
            };
            match unused {
                None => self.dispatch_wake.notify_one(),
                // Made while stopping: nothing will use it.
                Some(Ok(vm)) => self.clone().spawn_destroy(vm),
                Some(Err(e)) => {
                    {
                        let mut st = self.lock();
                        st.vm_count = st.vm_count.saturating_sub(1);
                    }
                    if matches!(e, EngineError::Timeout(_)) {
                        self.counters
                            .waitvm_timeouts
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    self.metrics.backend_error(&vmms, "initialize");
                    warn!(image = %image, "cannot create a pool VM: {e}");
                }
            }
        });
    }

    /// Destroys a VM in the background; its slot is freed when it is gone.
    fn spawn_destroy(self: Arc<Self>, vm: Machine) {
        let inner = self.clone();
        inner.workers.spawn(async move {
            self.destroy(&vm).await;
            let mut st = self.lock();
            st.vm_count = st.vm_count.saturating_sub(1);
            drop(st);
            self.dispatch_wake.notify_one();
        });
    }

    /// Destroys a VM whose slot was handed to another job already.
    fn spawn_destroy_keep_count(self: Arc<Self>, vm: Machine) {
        let inner = self.clone();
        inner.workers.spawn(async move { self.destroy(&vm).await });
    }

    async fn destroy(&self, vm: &Machine) {
        let result = match self.backend(&vm.vmms) {
            Ok(backend) => {
                call(
                    self.timeout(self.config.timeouts.destroy_secs),
                    "destroying the VM",
                    backend.safe_destroy_vm(vm),
                )
                .await
            }
            Err(e) => Err(e),
        };
        match result {
            // Still owned when destruction failed: the sweeper retries it
            // only once it is no longer owned, so release ownership now.
            Ok(()) => debug!(vm = %vm.name, "VM destroyed"),
            Err(e) => {
                self.metrics.backend_error(&vm.vmms, "destroy");
                warn!(vm = %vm.name, "cannot destroy VM (the orphan sweep will retry): {e}");
            }
        }
        self.lock().owned.remove(&vm.name);
    }

    async fn sweep_loop(self: Arc<Self>) {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        every.tick().await;
        let mut blobs_every = tokio::time::interval(BLOB_SWEEP_INTERVAL);
        blobs_every.tick().await;
        loop {
            tokio::select! {
                _ = every.tick() => self.sweep_orphans().await,
                _ = blobs_every.tick() => self.sweep_blobs().await,
                _ = self.stop.cancelled() => return,
            }
        }
    }

    /// Frees the bytes of replaced uploads that no job still to run needs.
    async fn sweep_blobs(&self) {
        let pending = self
            .store
            .jobs_in_states(&[JobState::Queued, JobState::Running], None);
        let keep = match pending {
            Ok(jobs) => jobs
                .iter()
                .flat_map(|job| job.inputs.iter().map(|input| input.md5.clone()))
                .collect(),
            Err(e) => {
                warn!("cannot list pending jobs for the blob sweep: {e}");
                return;
            }
        };
        match self.data.remove_unused_blobs(keep, BLOB_MIN_AGE).await {
            Ok(0) => {}
            Ok(removed) => info!(removed, "removed the bytes of replaced uploads"),
            Err(e) => warn!("cannot sweep unused upload blobs: {e}"),
        }
    }

    /// Destroys every VM with this server's prefix that no job or pool owns.
    async fn sweep_orphans(&self) {
        for (vmms, backend) in &self.backends {
            let listed = call(
                self.timeout(self.config.timeouts.query_secs),
                "listing VMs",
                backend.get_vms(&self.config.prefix),
            )
            .await;
            let vms = match listed {
                Ok(vms) => vms,
                Err(e) => {
                    warn!(
                        backend = backend.name(),
                        "cannot list VMs for the orphan sweep: {e}"
                    );
                    continue;
                }
            };
            for vm in vms {
                if self.lock().owned.contains(&vm.name) {
                    continue;
                }
                info!(vm = %vm.name, "destroying orphan VM");
                let _ = call(
                    self.timeout(self.config.timeouts.destroy_secs),
                    "destroying an orphan VM",
                    backend.safe_destroy_vm(&vm),
                )
                .await
                .map_err(|e| {
                    // Counted under the backend that listed it, whatever
                    // the listed machine says.
                    self.metrics.backend_error(vmms, "destroy");
                    warn!(vm = %vm.name, "cannot destroy orphan VM: {e}")
                });
            }
        }
    }

    async fn outbox_loop(self: Arc<Self>) {
        let in_flight = Arc::new(Semaphore::new(32));
        loop {
            let now = now_ms();
            let due = match self.store.outbox_due(now, 64) {
                Ok(due) => due,
                Err(e) => {
                    warn!("cannot read the callback outbox: {e}");
                    Vec::new()
                }
            };
            for mut entry in due {
                let span = self.callback_span(entry.job_id);
                // Claim it: a crash mid-delivery retries it after this.
                entry.next_attempt_ms = now + 90_000;
                if let Err(e) = self.store.outbox_update(&entry) {
                    span.in_scope(|| warn!(job = entry.job_id, "cannot claim callback: {e}"));
                    continue;
                }
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    return;
                };
                let inner = self.clone();
                tokio::spawn(
                    async move {
                        inner.deliver(entry).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            let next = match self.store.outbox_next_due() {
                Ok(next) => next,
                Err(_) => Some(now_ms() + 5000),
            };
            let sleep = match next {
                Some(at) => Duration::from_millis((at - now_ms()).clamp(0, 3_600_000) as u64),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.outbox_wake.notified() => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    /// The span a job's callback delivery logs in: the worker's `job`
    /// span, with the courselab read from the job's record (the outbox
    /// keeps only the job id).
    fn callback_span(&self, id: JobId) -> tracing::Span {
        let span = tracing::info_span!("job", job = id, courselab = tracing::field::Empty);
        match self.store.get_job(id) {
            Ok(Some(job)) => {
                span.record("courselab", job.courselab.as_str());
            }
            Ok(None) => {}
            Err(e) => warn!(job = id, "cannot read job record: {e}"),
        }
        span
    }

    async fn deliver(self: Arc<Self>, mut entry: OutboxEntry) {
        let body = match tokio::fs::read(&entry.body_path).await {
            Ok(body) => body,
            Err(e) => {
                warn!(
                    job = entry.job_id,
                    "callback body is gone ({e}); dropping the callback"
                );
                let _ = self.store.outbox_remove(entry.job_id);
                return;
            }
        };
        let sent = tokio::time::timeout(
            Duration::from_secs(60),
            self.callbacks.send(&entry.url, &entry.output_file, body),
        )
        .await
        .unwrap_or_else(|_| Err("no answer within 60 s".into()));
        let now = now_ms();
        match sent {
            Ok(()) => {
                let _ = self.store.outbox_remove(entry.job_id);
                let _ = tokio::fs::remove_file(&entry.body_path).await;
                self.counters
                    .callbacks_delivered
                    .fetch_add(1, Ordering::Relaxed);
                self.note_on_dead_job(entry.job_id, |job| {
                    job.phases.callback_delivered = Some(now);
                    if let Some(finished) = job.phases.finished {
                        self.metrics.callback_delivery.observe_ms(now - finished);
                    }
                });
                debug!(job = entry.job_id, "callback delivered");
            }
            Err(e) => {
                entry.attempts += 1;
                entry.last_error = Some(e.clone());
                let backoff_ms = (self.config.callback_initial_backoff_ms as i64)
                    .saturating_mul(1i64 << entry.attempts.min(30).saturating_sub(1))
                    .min(self.config.callback_max_backoff_secs as i64 * 1000);
                entry.next_attempt_ms = now + backoff_ms;
                if entry.next_attempt_ms > entry.deadline_ms {
                    warn!(
                        job = entry.job_id,
                        attempts = entry.attempts,
                        "callback abandoned: {e}"
                    );
                    self.counters
                        .callbacks_abandoned
                        .fetch_add(1, Ordering::Relaxed);
                    let _ = self.store.outbox_remove(entry.job_id);
                    let _ = tokio::fs::remove_file(&entry.body_path).await;
                    let attempts = entry.attempts;
                    self.note_on_dead_job(entry.job_id, |job| {
                        job.add_trace(format!("Callback abandoned after {attempts} attempts: {e}"))
                    });
                } else {
                    self.counters
                        .callback_retries
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(
                        job = entry.job_id,
                        attempts = entry.attempts,
                        "callback failed: {e}"
                    );
                    if let Err(e) = self.store.outbox_update(&entry) {
                        warn!(job = entry.job_id, "cannot reschedule callback: {e}");
                    }
                    self.outbox_wake.notify_one();
                }
            }
        }
    }

    fn note_on_dead_job(&self, id: JobId, change: impl FnOnce(&mut Job)) {
        match self.store.get_job(id) {
            Ok(Some(mut job)) => {
                change(&mut job);
                if let Err(e) = self.store.save_job(&job) {
                    warn!(job = id, "cannot update job record: {e}");
                }
            }
            Ok(None) => {}
            Err(e) => warn!(job = id, "cannot read job record: {e}"),
        }
    }
}

/// Takes a free VM out of its pool (beyond that pool's target) so its slot
/// can serve a waiting job. Any free VM will do, of the job's image too:
/// when this is called none can run the job (another image or backend, or
/// the server's account for a job with its own keys).
fn evict_idle(st: &mut State) -> Option<Machine> {
    let (image, _) = st
        .pools
        .iter()
        .filter(|(_, pool)| !pool.free.is_empty() && pool.all.len() > pool.target)
        .max_by_key(|(_, pool)| pool.free.len())?;
    let image = image.clone();
    let pool = st.pools.get_mut(&image)?;
    let vm = pool.free.pop_front()?;
    pool.all.remove(&vm.id);
    Some(vm)
}
