//! One job's steps: get a VM, copy in, run, copy out, write the output
//! and queue its callback; system failures are retried or reported.

use super::{call, EngineError, Inner};
use crate::model::{now_ms, Job, JobState, Machine};
use crate::output::{cap_output, compose_output};
use crate::store::OutboxEntry;
use crate::vmms::{RunOutcome, RunRequest, RunStatus, Vmms, VmmsError};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Which worker step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
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

pub(super) struct SystemFailure {
    pub(super) step: Step,
    pub(super) message: String,
    pub(super) vm: Option<Machine>,
    /// The backend could not be reached at all.
    pub(super) unavailable: bool,
}

struct Ran {
    vm: Machine,
    outcome: RunOutcome,
    output: Vec<u8>,
}

impl Inner {
    fn update_live(&self, job: &Job) {
        if let Some(slot) = self.lock().live.get_mut(&job.id) {
            **slot = job.clone();
        }
    }

    pub(super) async fn run_worker(
        self: Arc<Self>,
        mut job: Job,
        warm: Option<Machine>,
        epoch: tokio_util::sync::CancellationToken,
    ) {
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
            () = epoch.cancelled() => {
                // Fenced: another server runs the job now. Its VM goes,
                // and its slot with it. (Stopped while its VM was still
                // being made, the job leaves that VM to the pool's own
                // bookkeeping, as a shutdown does.)
                if let Some(vm) = job.vm.take() {
                    self.release_vm(*vm, false).await;
                }
                self.drop_unowned(job.id);
                self.dispatch_wake.notify_one();
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

    pub(super) fn count_failure(&self, vmms: &str, failure: &SystemFailure) {
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
                job.vm = Some(Box::new(vm.clone()));
                // Recorded before it exists: after a crash only this
                // record finds a VM in the job's own account.
                if let Err(e) = self.store.save_job(job) {
                    warn!("cannot record the job's VM: {e}");
                }
                self.update_live(job);
                self.make_vm(backend.as_ref(), &mut vm)
                    .await
                    .map_err(|(step, e)| fail(step, e, Some(&vm)))?;
                vm
            }
            None => self
                .fresh_or_freed_vm(job, backend.clone())
                .await
                .map_err(|(step, e, vm)| fail(step, e, vm.as_ref()))?,
        };
        job.vm = Some(Box::new(vm.clone()));
        job.phases.vm_ready = Some(now_ms());
        job.add_trace(format!("Assigned job to VM {}", vm.name));
        self.update_live(job);

        if self.shared().is_some() {
            // The other servers show the running job with its VM.
            let record = job.clone();
            if let Err(e) = self.on_store(move |s| s.save_job(&record)).await {
                warn!("cannot record the job's VM: {e}");
            }
            self.fetch_inputs(job)
                .await
                .map_err(|failure| SystemFailure {
                    vm: Some(vm.clone()),
                    ..failure
                })?;
        }
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
    pub(super) async fn make_vm(
        &self,
        backend: &dyn Vmms,
        vm: &mut Machine,
    ) -> Result<(), (Step, EngineError)> {
        let t = &self.config.timeouts;
        let initialized = call(
            self.timeout(t.initialize_secs),
            "initializing the VM",
            backend.initialize_vm(vm),
        )
        .await;
        vm.host = backend.host_of(vm);
        initialized.map_err(|e| (Step::Initialize, e))?;
        call(
            self.timeout(t.wait_secs),
            "waiting for the VM",
            backend.wait_vm(vm, self.timeout(t.wait_secs)),
        )
        .await
        .map_err(|e| (Step::Wait, e))
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
        let shared = self.shared().is_some();
        // With a shared store, the output and the callback's body go to the
        // store with the finished job; alone, to the data dir first.
        let frozen = job
            .callback_url
            .as_ref()
            .filter(|_| !shared)
            .map(|_| self.data.outbox_path(job.id));
        if !shared {
            let dest = self.data.output_path(&job.courselab_dir, &job.output_file);
            if let Err(e) = self
                .data
                .write_atomically(&dest, &content, frozen.as_deref())
                .await
            {
                warn!(job = job.id, "cannot write the output file: {e}");
                job.add_trace(format!("Error: cannot write the output file: {e}"));
            }
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
            (Some(url), frozen) if shared || frozen.is_some() => Some(OutboxEntry {
                job_id: job.id,
                url: url.clone(),
                output_file: job.output_file.clone(),
                // Empty: the body is in the shared store.
                body_path: frozen
                    .map(|path| path.to_string_lossy().into_owned())
                    .unwrap_or_default(),
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
        if shared {
            if !self.finish_owned(job, content, callback.clone()).await {
                warn!(
                    job = job.id,
                    "another server owns this job now (this one lost it when its lease \
                     lapsed): its result here is dropped"
                );
                self.drop_unowned(job.id);
                return;
            }
        } else if let Err(e) = self.store.finish_job(job, callback.as_ref()) {
            warn!(job = job.id, "cannot record the finished job: {e}");
        }
        match state {
            JobState::Done => &self.counters.jobs_finished,
            _ => &self.counters.jobs_failed,
        }
        .fetch_add(1, Ordering::Relaxed);
        info!(job = job.id, state = state.as_str(), "job finished");
        {
            let mut st = self.lock();
            st.remove_live(job.id);
            st.stopped_running(job.id);
        }
        if callback.is_some() {
            self.outbox_wake.notify_one();
        }
    }

    /// Marks a job that failed a step as queued again (without its VM),
    /// with why in its trace, and records it; `what` names the record in
    /// the warning if the store cannot take it.
    fn record_back_in_queue(&self, job: &mut Job, trace: String, what: &str) {
        job.state = JobState::Queued;
        job.vm = None;
        job.add_trace(trace);
        if let Err(e) = self.store.save_job(job) {
            warn!(job = job.id, "cannot record {what}: {e}");
        }
    }

    async fn retry_or_fail(self: &Arc<Self>, mut job: Job, failure: SystemFailure) {
        let waited = job.backend_wait_ms;
        if failure.unavailable && waited < self.config.backend_wait_max_secs * 1000 {
            // Doubling waits from 1 s up to 30 s, not counted as retries.
            let delay_ms = waited.clamp(1000, 30_000);
            job.backend_wait_ms += delay_ms;
            warn!(job = job.id, "backend unavailable: {}", failure.message);
            let trace = format!(
                "Backend unavailable while {}: {}; trying again in {} s (no retry counted)",
                failure.step.as_str(),
                failure.message,
                delay_ms / 1000
            );
            self.record_back_in_queue(&mut job, trace, "the wait");
            let id = job.id;
            {
                let mut st = self.lock();
                st.stopped_running(id);
                st.live.insert(id, Box::new(job));
            }
            let inner = self.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(delay_ms)) => {}
                    _ = inner.stop.cancelled() => return,
                }
                let mut st = inner.lock();
                if let Some(job) = st.live.get(&id).cloned() {
                    st.enqueue(&job, &inner.config);
                }
                drop(st);
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
        let trace = format!(
            "System error while {}: {}; retrying (retry {} of {})",
            failure.step.as_str(),
            failure.message,
            job.retries,
            self.config.max_retries
        );
        self.record_back_in_queue(&mut job, trace, "the retry");
        let mut st = self.lock();
        st.stopped_running(job.id);
        st.enqueue(&job, &self.config);
        st.live.insert(job.id, Box::new(job));
    }

    /// Ends a job that could not run after every retry: an output file that
    /// says so and a callback, like every other job.
    pub(super) async fn fail_job(&self, mut job: Job, failure: SystemFailure) {
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
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
