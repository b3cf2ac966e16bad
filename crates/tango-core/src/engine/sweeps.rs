//! Periodic sweeps: VMs with this server's prefix that nothing owns, and
//! the bytes of replaced uploads that no pending job needs.

use super::{call, Inner};
use crate::model::JobState;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// How often the bytes of replaced uploads are looked for.
const BLOB_SWEEP_INTERVAL: Duration = Duration::from_secs(3600);
/// A blob this young may belong to a job being added right now.
const BLOB_MIN_AGE: Duration = Duration::from_secs(3600);

impl Inner {
    pub(super) async fn sweep_loop(self: Arc<Self>) {
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
    pub(super) async fn sweep_orphans(&self) {
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
}

#[cfg(test)]
#[path = "sweeps_tests.rs"]
mod tests;
