//! The callback outbox: delivers each finished job's callback from the
//! store's outbox, retrying with backoff until its deadline.

use super::cluster::BodyError;
use super::Inner;
use crate::model::{now_ms, Job, JobId};
use crate::store::OutboxEntry;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tracing::{debug, warn, Instrument};

impl Inner {
    pub(super) async fn outbox_loop(self: Arc<Self>) {
        let in_flight = Arc::new(Semaphore::new(32));
        // With a shared store, another server's finished job may be due
        // here (when that server dies before delivering it).
        let added_elsewhere = self.shared().map(|s| s.outbox_signal());
        let signalled = || async {
            match &added_elsewhere {
                Some(signal) => signal.notified().await,
                None => std::future::pending().await,
            }
        };
        loop {
            let now = now_ms();
            // Claimed: no other delivery takes it, and a crash
            // mid-delivery retries it after this.
            let due = match self.store.outbox_claim(now, now + 90_000, 64) {
                Ok(due) => due,
                Err(e) => {
                    warn!("cannot read the callback outbox: {e}");
                    Vec::new()
                }
            };
            for entry in due {
                let span = self.callback_span(entry.job_id);
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
                _ = signalled() => {}
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
        let body = match self.callback_body(&entry).await {
            Ok(body) => body,
            Err(BodyError::Unreachable(e)) => {
                // The body is in the store, which is away for now: the
                // callback waits for it rather than being dropped.
                warn!(
                    job = entry.job_id,
                    "cannot read the callback's body from the store ({e}); trying again"
                );
                entry.next_attempt_ms = now_ms() + self.config.callback_initial_backoff_ms as i64;
                if let Err(e) = self.store.outbox_update(&entry) {
                    warn!(job = entry.job_id, "cannot reschedule callback: {e}");
                }
                self.outbox_wake.notify_one();
                return;
            }
            Err(BodyError::Gone(e)) => {
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
                self.remove_body(&entry).await;
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
                    self.remove_body(&entry).await;
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

    /// Removes a callback's frozen body file (a shared store's body went
    /// with its outbox entry).
    async fn remove_body(&self, entry: &OutboxEntry) {
        if !entry.body_path.is_empty() {
            let _ = tokio::fs::remove_file(&entry.body_path).await;
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

#[cfg(test)]
#[path = "outbox_tests.rs"]
mod tests;
