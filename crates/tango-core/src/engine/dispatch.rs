//! The queue side of the engine: what starts next. The dispatcher gives
//! queued jobs, in the order the scheduler's policy chooses, a warm VM or a
//! slot for a new one; at start, jobs left queued or running by the
//! previous run are queued again.

use super::pools::{evict_idle, Pool};
use super::scheduler::{Class, LabPolicy, QueuedJob};
use super::worker::{Step, SystemFailure};
use super::{EngineError, Inner, State};
use crate::config::EngineConfig;
use crate::model::{now_ms, Job, JobId, JobState, Machine};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, Instrument};

/// With a shared store, the longest a server waits for the store's word
/// before it looks for queued jobs anyway.
const SHARED_SAFETY_NET: Duration = Duration::from_secs(30);

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
            st.enqueue(&job, &self.config);
            st.insert_live(job);
        }
        let queued = self.lock().queued();
        if queued > 0 {
            info!(queued, requeued, "recovered jobs from the store");
        }
        Ok(())
    }

    pub(super) async fn dispatch_loop(self: Arc<Self>) {
        // With a shared store, the store's notifications say when a job
        // waits for a server; the timer is a safety net for one lost
        // while the database connection was down.
        let jobs_signal = self.shared().map(|s| s.jobs_signal());
        let new_work = || async {
            match &jobs_signal {
                Some(signal) => {
                    let _ = tokio::time::timeout(SHARED_SAFETY_NET, signal.notified()).await;
                }
                None => std::future::pending().await,
            }
        };
        loop {
            self.claim().await;
            self.dispatch();
            tokio::select! {
                _ = self.dispatch_wake.notified() => {}
                _ = new_work() => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    /// Gives queued jobs VMs while any can have one (a free VM of its
    /// image, or room for a new VM), in the order the scheduler chooses.
    fn dispatch(self: &Arc<Self>) {
        let mut guard = self.lock();
        let st = &mut *guard;
        if self.stop.is_cancelled() {
            return;
        }
        let max_vms = self.config.max_vms;
        loop {
            // Room for a new VM (or an idle VM of another image whose slot
            // can be had): any job can start.
            let room = st.vm_count < max_vms
                || st
                    .pools
                    .values()
                    .any(|p| !p.free.is_empty() && p.all.len() > p.target);
            let pools = &st.pools;
            let Some(id) = st.queue.next(clock_now(), |class| {
                room || (!class.own_account
                    && pools
                        .get(&class.image)
                        .is_some_and(|pool| pool.free.iter().any(|vm| fits(vm, class))))
            }) else {
                break;
            };
            let Some(job) = st.live.get(&id) else {
                st.queue.finished(id, clock_now());
                continue;
            };
            let class = class_of(job);
            let pool = st.pools.entry(class.image.clone()).or_insert_with(|| Pool {
                vmms: class.vmms.clone(),
                ..Pool::default()
            });
            // Only a VM of the job's own backend can run it. A job with its
            // own cloud credentials runs on a fresh VM in that account,
            // never on a pool VM of the server's.
            let warm = if class.own_account {
                None
            } else {
                pool.free
                    .iter()
                    .position(|vm| fits(vm, &class))
                    .and_then(|at| pool.free.remove(at))
            };
            if warm.is_none() {
                if st.vm_count < max_vms {
                    st.vm_count += 1;
                } else if let Some(idle) = evict_idle(st) {
                    // The slot of an idle VM of another image goes to this job.
                    self.clone().spawn_destroy_keep_count(idle);
                } else {
                    // Not reached: the scheduler gave a job only where
                    // `room` or a free VM said it could start.
                    st.queue.finished(id, clock_now());
                    if let Some(job) = st.live.get(&id) {
                        let job = job.clone();
                        st.enqueue(&job, &self.config);
                    }
                    break;
                }
            }
            let Some(job) = st.live.get_mut(&id) else {
                continue;
            };
            job.state = JobState::Running;
            job.phases.assigned = Some(now_ms());
            if let Some(vm) = &warm {
                job.vm = Some(Box::new(vm.clone()));
            }
            let job = Job::clone(job);
            let inner = self.clone();
            let span = tracing::info_span!("job", job = id, courselab = %job.courselab);
            let epoch = self.epoch();
            self.workers
                .spawn(async move { inner.run_worker(job, warm, epoch).await }.instrument(span));
        }
    }
}

/// The kind of VM `job` needs.
fn class_of(job: &Job) -> Class {
    Class {
        image: job.image.clone(),
        vmms: job.vmms.clone(),
        own_account: job.credentials.is_some(),
    }
}

/// Now, by tokio's clock (which a simulation may pause and advance).
fn clock_now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Whether a free VM of the server's can run jobs of `class`.
fn fits(vm: &Machine, class: &Class) -> bool {
    vm.vmms == class.vmms && vm.credentials.is_none()
}

/// The queue, as the rest of the engine sees it: a job goes in, the
/// scheduler decides what comes out.
impl State {
    /// Queues a job whose record is (or is about to be) in `live`.
    pub(super) fn enqueue(&mut self, job: &Job, config: &EngineConfig) {
        let (weight, max_running) = config.courselab_policy(&job.courselab);
        let submitter = job.submitter_or_derived();
        self.queue.push(QueuedJob {
            id: job.id,
            courselab: &job.courselab_dir,
            submitter: &submitter,
            class: &class_of(job),
            lab: LabPolicy {
                weight,
                max_running,
            },
        });
    }

    /// A job the scheduler gave out stopped running (it ended, or goes back
    /// to the queue): its courselab may start another.
    pub(super) fn stopped_running(&mut self, id: JobId) {
        self.queue.finished(id, clock_now());
    }

    /// How many jobs are queued.
    pub(super) fn queued(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
#[path = "dispatch_tests.rs"]
mod tests;
