//! Several servers on one shared store (issue 21): what a server does
//! differently when its store is a [`SharedStore`].
//!
//! - A job added on any server waits in the store, owned by none; each
//!   server claims as many as it has room for (the store's claim order
//!   is per-submitter turns) and runs them as its own.
//! - Only the owner changes a claimed job, and only the owner finishes
//!   it, once, with its output file and callback in the store: a result
//!   from a server that lost the job is refused there.
//! - The servers registry says who is alive (the server crate keeps it):
//!   a server that finds another dead takes over, re-queuing its jobs
//!   without counting a retry and destroying its VMs where it can reach
//!   them; a server that finds itself taken over (it was frozen or cut
//!   off) is fenced: its jobs stop and are not reported.
//! - Upload bytes come from the store when this server lacks them.

use super::worker::{Step, SystemFailure};
use super::{call, Engine, EngineError, Inner};
use crate::model::{Job, JobId, JobState};
use crate::store::{
    call_blocking, OutboxEntry, ServerRecord, SharedOutput, SharedStore, Store, StoreError,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// This server's place among the servers sharing the store.
#[derive(Default)]
pub(super) struct Cluster {
    /// Its id in the servers registry; 0 until it joined, and while it is
    /// being fenced: no job is claimed then.
    server_id: AtomicU64,
}

/// The longest wait between two tries to record a finished job while the
/// store is away.
const FINISH_RETRY_MAX: Duration = Duration::from_secs(10);

impl Inner {
    /// The shared side of the store, when several servers may share it.
    pub(super) fn shared(&self) -> Option<&dyn SharedStore> {
        self.store.shared()
    }

    /// This server's id among the servers sharing the store, once joined.
    pub(super) fn server_id(&self) -> Option<u64> {
        self.cluster
            .as_ref()
            .map(|c| c.server_id.load(Ordering::Acquire))
            .filter(|id| *id != 0)
    }

    /// The token this server's running jobs stop on when it is fenced.
    pub(super) fn epoch(&self) -> CancellationToken {
        self.epoch.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs a store call off the async threads ([`call_blocking`]).
    pub(super) async fn on_store<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        call_blocking(self.store.clone(), call).await
    }

    /// [`Self::on_store`] on the shared side.
    async fn on_shared<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn SharedStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.on_store(move |store| match store.shared() {
            Some(shared) => call(shared),
            None => Err(StoreError("the store is not shared".into())),
        })
        .await
    }

    /// Claims queued jobs from the store for the room this server has:
    /// a job waits in the store, where any server may take it, rather
    /// than in this server's queue.
    pub(super) async fn claim(self: &Arc<Self>) {
        let Some(me) = self.server_id() else {
            return;
        };
        let room = self.config.max_vms.saturating_sub(self.lock().live.len());
        if room == 0 || self.stop.is_cancelled() {
            return;
        }
        let claimed = match self.on_shared(move |s| s.claim_jobs(me, room)).await {
            Ok(claimed) => claimed,
            Err(e) => {
                warn!("cannot claim queued jobs from the store: {e}");
                return;
            }
        };
        let mut busy = Vec::new();
        {
            let mut st = self.lock();
            if self.server_id() != Some(me) {
                // Fenced meanwhile: the store gives these back to the others.
                return;
            }
            for job in claimed {
                if st.live.contains_key(&job.id) {
                    // This server ran it before it was fenced, and that run
                    // is still winding down: when it ends it drops the job
                    // by id, which would drop this claim too and leave the
                    // job owned in the store and run by no one.
                    busy.push(job);
                    continue;
                }
                st.enqueue(&job, &self.config);
                st.insert_live(job);
            }
        }
        for job in busy {
            let id = job.id;
            if let Err(e) = self.on_shared(move |s| s.release_job(&job, me)).await {
                warn!(
                    job = id,
                    "cannot give back a job this server still winds down: {e}"
                );
            }
        }
    }

    /// Gives `job`'s inputs this server's copies of their bytes, fetched
    /// from the store when it has none yet.
    pub(super) async fn fetch_inputs(&self, job: &mut Job) -> Result<(), SystemFailure> {
        for input in &mut job.inputs {
            let local = self.data.blob_path(&input.md5);
            if !tokio::fs::try_exists(&local).await.unwrap_or(false) {
                let temp = self.data.temp_path("fetch");
                let (md5, into) = (input.md5.clone(), temp.clone());
                let fetched = self.on_shared(move |s| s.fetch_blob(&md5, &into)).await;
                // (why, whether the store was away: the job then waits for
                // it without spending a retry, as for a backend away).
                let placed = match fetched {
                    Ok(true) => tokio::fs::rename(&temp, &local)
                        .await
                        .map_err(|e| (format!("cannot keep the fetched bytes: {e}"), false)),
                    Ok(false) => Err(("the store has no bytes for it".to_string(), false)),
                    Err(e) => Err((e.to_string(), true)),
                };
                if let Err((why, unavailable)) = placed {
                    let _ = tokio::fs::remove_file(&temp).await;
                    return Err(SystemFailure {
                        step: Step::CopyIn,
                        unavailable,
                        message: format!(
                            "cannot fetch input file {} (md5 {}) from the store: {why}",
                            input.local_file, input.md5
                        ),
                        vm: None,
                    });
                }
            }
            input.path = local;
        }
        Ok(())
    }

    /// Records a finished job this server owns, with its output file and
    /// callback, trying again while the store is away. False when the job
    /// is not this server's any more (taken over, or fenced meanwhile):
    /// nothing of its result was recorded.
    pub(super) async fn finish_owned(
        &self,
        job: &Job,
        content: Vec<u8>,
        callback: Option<OutboxEntry>,
    ) -> bool {
        let Some(owner) = job.owner else {
            warn!(
                job = job.id,
                "a finished job has no owner; its result is dropped"
            );
            return false;
        };
        let epoch = self.epoch();
        let output = Arc::new(SharedOutput {
            courselab_dir: job.courselab_dir.clone(),
            output_file: job.output_file.clone(),
            content,
        });
        let (job, callback) = (Arc::new(job.clone()), callback.map(Arc::new));
        let mut delay = Duration::from_secs(1);
        loop {
            let (job, output, callback) = (job.clone(), output.clone(), callback.clone());
            let recorded = self
                .on_shared(move |s| s.finish_owned(&job, owner, &output, callback.as_deref()))
                .await;
            match recorded {
                Ok(mine) => return mine,
                Err(e) => warn!(
                    "cannot record the finished job (trying again in {} s): {e}",
                    delay.as_secs()
                ),
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                // Another server re-runs it.
                _ = epoch.cancelled() => return false,
                _ = self.abandon.cancelled() => return false,
            }
            delay = (delay * 2).min(FINISH_RETRY_MAX);
        }
    }

    /// A callback's body: its frozen file, or with a shared store, its
    /// bytes there.
    pub(super) async fn callback_body(&self, entry: &OutboxEntry) -> Result<Vec<u8>, BodyError> {
        if !entry.body_path.is_empty() {
            return tokio::fs::read(&entry.body_path)
                .await
                .map_err(|e| BodyError::Gone(e.to_string()));
        }
        let id = entry.job_id;
        match self.on_shared(move |s| s.callback_body(id)).await {
            Ok(Some(body)) => Ok(body),
            Ok(None) => Err(BodyError::Gone("the store has no body for it".into())),
            Err(e) => Err(BodyError::Unreachable(e.to_string())),
        }
    }
}

impl Engine {
    /// With a shared store, the live jobs of every server, oldest first.
    pub(super) fn shared_live_jobs(&self) -> Option<Vec<Job>> {
        self.inner.shared()?;
        match (self.inner.store).jobs_in_states(&[JobState::Queued, JobState::Running], None) {
            Ok(jobs) => Some(jobs),
            Err(e) => {
                warn!("cannot list the live jobs: {e}");
                None
            }
        }
    }

    /// Whether this server shares its store with other servers.
    pub fn is_shared(&self) -> bool {
        self.inner.cluster.is_some()
    }

    /// Starts claiming jobs as server `id` of the servers registry.
    pub fn join_cluster(&self, id: u64) {
        if let Some(cluster) = &self.inner.cluster {
            cluster.server_id.store(id, Ordering::Release);
            self.inner.dispatch_wake.notify_one();
        }
    }

    /// This server lost its jobs to the others (its lease lapsed while it
    /// was frozen or cut off): its running jobs stop without a result and
    /// their VMs are destroyed, its claimed jobs are dropped (the others
    /// have them), and it goes on as server `new_id`.
    pub async fn fence(&self, new_id: u64) {
        let inner = &self.inner;
        let Some(cluster) = &inner.cluster else {
            return;
        };
        cluster.server_id.store(0, Ordering::Release);
        let (old, dropped) = {
            let mut st = inner.lock();
            let old = std::mem::replace(
                &mut *inner.epoch.lock().unwrap_or_else(|e| e.into_inner()),
                CancellationToken::new(),
            );
            let queued: Vec<u64> = st
                .live
                .values()
                .filter(|job| job.state == JobState::Queued)
                .map(|job| job.id)
                .collect();
            for id in &queued {
                st.queue.remove(*id);
                st.remove_live(*id);
            }
            (old, queued.len())
        };
        old.cancel();
        warn!(
            dropped,
            new_id,
            "this server lost its jobs to the other servers (its lease lapsed): its running \
             jobs stop unreported and their VMs are destroyed; it goes on as a new server"
        );
        cluster.server_id.store(new_id, Ordering::Release);
        inner.dispatch_wake.notify_one();
    }

    /// Takes over from servers that died: every job owned by a server no
    /// longer in the registry is queued again (no retry counted), and the
    /// VMs of `dead` (named by their prefixes) are destroyed on the
    /// backends this server reaches. Returns how many jobs it re-queued.
    pub async fn take_over(&self, dead: &[ServerRecord]) -> Result<usize, EngineError> {
        let inner = &self.inner;
        if inner.cluster.is_none() {
            return Ok(0);
        }
        let orphans = inner.on_shared(|s| s.orphaned_jobs()).await?;
        let mut requeued = 0;
        for mut job in orphans {
            let Some(from) = job.owner else {
                continue;
            };
            let who = dead
                .iter()
                .find(|s| s.id == from)
                .map(|s| format!("server {:?} (id {from})", s.name))
                .unwrap_or_else(|| format!("server {from}"));
            job.state = JobState::Queued;
            job.vm = None;
            job.add_trace(format!(
                "Re-queued: {who}, which had it, stopped renewing its lease (no retry counted)"
            ));
            let id = job.id;
            if inner.on_shared(move |s| s.release_job(&job, from)).await? {
                info!(job = id, from, "took over a job of a dead server");
                requeued += 1;
            }
        }
        for server in dead {
            if server.prefix.is_empty() || server.prefix == inner.config.prefix {
                continue;
            }
            self.destroy_vms_of(&server.prefix).await;
        }
        Ok(requeued)
    }

    /// Destroys every VM named with `prefix` on every backend.
    async fn destroy_vms_of(&self, prefix: &str) {
        let inner = &self.inner;
        let t = &inner.config.timeouts;
        for backend in inner.backends.values() {
            let listed = call(
                inner.timeout(t.query_secs),
                "listing VMs",
                backend.get_vms(prefix),
            )
            .await;
            let Ok(vms) = listed else {
                continue;
            };
            for vm in vms {
                info!(vm = %vm.name, "destroying a VM of a dead server");
                if let Err(e) = call(
                    inner.timeout(t.destroy_secs),
                    "destroying a dead server's VM",
                    backend.safe_destroy_vm(&vm),
                )
                .await
                {
                    warn!(vm = %vm.name, "cannot destroy a dead server's VM: {e}");
                }
            }
        }
    }

    /// The server running job `id`, when it is another server sharing the
    /// store (its output so far is there).
    pub async fn running_elsewhere(&self, id: JobId) -> Option<u64> {
        let me = self.inner.server_id()?;
        let job = self.inner.on_store(move |s| s.get_job(id)).await.ok()??;
        job.owner
            .filter(|owner| job.state == JobState::Running && *owner != me)
    }

    /// Makes courselab `dir` (in the shared store too); true when it is new.
    pub async fn open_courselab(&self, dir: &str) -> Result<bool, EngineError> {
        let inner = &self.inner;
        let created_here = inner.data.open_courselab(dir).await?;
        if inner.shared().is_none() {
            return Ok(created_here);
        }
        let dir = dir.to_owned();
        Ok(inner.on_shared(move |s| s.open_courselab(&dir)).await?)
    }

    /// Whether courselab `dir` exists; with a shared store, one opened on
    /// another server gets its directory here.
    pub async fn courselab_exists(&self, dir: &str) -> Result<bool, EngineError> {
        self.inner.courselab_exists(dir).await
    }

    /// Output file `output_file` of courselab `dir` as the shared store
    /// keeps it; None for a server with a store of its own (its output
    /// files are in its data dir).
    pub async fn shared_output(
        &self,
        dir: &str,
        output_file: &str,
    ) -> Result<Option<Option<Vec<u8>>>, EngineError> {
        if self.inner.shared().is_none() {
            return Ok(None);
        }
        let (dir, name) = (dir.to_owned(), output_file.to_owned());
        Ok(Some(
            self.inner.on_shared(move |s| s.output(&dir, &name)).await?,
        ))
    }
}

impl Inner {
    /// With a shared store and a `max_queued_per_submitter`, how many jobs
    /// `job`'s submitter has queued on every server.
    pub(super) async fn shared_queued_of(&self, job: &Job) -> Result<Option<usize>, StoreError> {
        if self.config.max_queued_per_submitter.is_none() || self.shared().is_none() {
            return Ok(None);
        }
        let (dir, who) = (job.courselab_dir.clone(), job.submitter.clone());
        self.on_shared(move |s| s.queued_of(&dir, &who))
            .await
            .map(Some)
    }

    pub(super) async fn courselab_exists(&self, dir: &str) -> Result<bool, EngineError> {
        if self.data.courselab_exists(dir) {
            return Ok(true);
        }
        if self.shared().is_none() {
            return Ok(false);
        }
        let name = dir.to_owned();
        if !self.on_shared(move |s| s.courselab_exists(&name)).await? {
            return Ok(false);
        }
        self.data.open_courselab(dir).await?;
        Ok(true)
    }

    /// Ends a job's stay on this server without a result: it was fenced,
    /// or another server owns it now.
    pub(super) fn drop_unowned(&self, id: u64) {
        let mut st = self.lock();
        st.remove_live(id);
        st.stopped_running(id);
    }
}

/// Why a callback's body cannot be had.
pub(super) enum BodyError {
    /// It is not there: the callback cannot be sent.
    Gone(String),
    /// The store did not answer (PostgreSQL restarting): it may later.
    Unreachable(String),
}

#[cfg(test)]
#[path = "cluster_tests.rs"]
mod tests;
