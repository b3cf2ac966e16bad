//! The queue side of the engine: what starts next. The dispatcher gives
//! queued jobs, oldest first, a warm VM or a slot for a new one; at start,
//! jobs left queued or running by the previous run are queued again.

use super::pools::{evict_idle, Pool};
use super::worker::{Step, SystemFailure};
use super::{EngineError, Inner, State};
use crate::model::{now_ms, JobId, JobState};
use std::sync::Arc;
use tracing::{info, Instrument};

impl Inner {
    pub(super) async fn recover(self: &Arc<Self>) -> Result<(), EngineError> {
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
            st.enqueue(job.id);
            st.live.insert(job.id, job);
        }
        let queued = self.lock().queued();
        if queued > 0 {
            info!(queued, requeued, "recovered jobs from the store");
        }
        Ok(())
    }

    pub(super) async fn dispatch_loop(self: Arc<Self>) {
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
        let candidates: Vec<JobId> = st.queued_ids().collect();
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
}

/// The queue, as the rest of the engine sees it: a job goes in, the
/// dispatcher decides what comes out.
impl State {
    /// Queues a job whose record is in `live`.
    pub(super) fn enqueue(&mut self, id: JobId) {
        self.queue.insert(id);
    }

    /// How many jobs are queued.
    pub(super) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The queued jobs, in the order they may start.
    pub(super) fn queued_ids(&self) -> impl Iterator<Item = JobId> + '_ {
        self.queue.iter().copied()
    }
}

#[cfg(test)]
#[path = "dispatch_tests.rs"]
mod tests;
