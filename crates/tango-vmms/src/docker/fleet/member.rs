//! One host as the fleet sees it between health checks: its backend while
//! it is up, drain and removal, its images, and the token that cuts off the
//! calls waiting on it when it is found down.

use super::super::Docker;
use super::host::DockerHost;
use super::lock;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tango_core::vmms::VmmsError;
use tokio_util::sync::CancellationToken;

/// What the fleet knows of one host between checks.
#[derive(Default)]
pub(super) struct HostState {
    /// Its backend, while it is up.
    pub(super) docker: Option<Arc<Docker>>,
    pub(super) draining: bool,
    /// Gone from the config: dropped once it holds no VM of ours.
    pub(super) removed: bool,
    /// Its images as of the last look; `None`: to be read again.
    pub(super) images: Option<BTreeSet<String>>,
    /// Images a `/build` loaded onto other hosts but not this one (it was
    /// down, or the load failed): its copy is older, so it counts as not
    /// having them until one is streamed to it. Kept across down and up.
    pub(super) outdated: BTreeSet<String>,
    /// Cancelled when the host is found down: calls still waiting on it
    /// (a host cut off without a reset never answers them) give up then.
    pub(super) cut: CancellationToken,
}

pub(super) struct Host {
    pub(super) name: String,
    pub(super) spec: Mutex<DockerHost>,
    pub(super) state: Mutex<HostState>,
    pub(super) running_jobs: AtomicUsize,
    pub(super) vm_starts: AtomicU64,
    pub(super) vm_start_failures: AtomicU64,
    /// A health check of this host is under way (a slow one, e.g. the sweep
    /// of a host that came back, must not hold up the others' checks).
    pub(super) checking: AtomicBool,
}

impl Host {
    pub(super) fn new(spec: DockerHost, docker: Option<Arc<Docker>>) -> Host {
        Host {
            name: spec.name.clone(),
            spec: Mutex::new(spec),
            state: Mutex::new(HostState {
                docker,
                ..Default::default()
            }),
            running_jobs: AtomicUsize::new(0),
            vm_starts: AtomicU64::new(0),
            vm_start_failures: AtomicU64::new(0),
            checking: AtomicBool::new(false),
        }
    }

    pub(super) fn spec(&self) -> DockerHost {
        lock(&self.spec).clone()
    }

    pub(super) fn docker(&self) -> Option<Arc<Docker>> {
        lock(&self.state).docker.clone()
    }

    pub(super) fn set_up(&self, docker: Arc<Docker>, images: Option<Vec<String>>) {
        let mut state = lock(&self.state);
        state.docker = Some(docker);
        state.images = images.map(|i| i.into_iter().collect());
        state.cut = CancellationToken::new();
    }

    /// Runs `call` on this host unless the host is found down first: then
    /// the call is dropped and answers `Unavailable`.
    pub(super) async fn unless_cut<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, VmmsError>>,
    ) -> Result<T, VmmsError> {
        let cut = lock(&self.state).cut.clone();
        tokio::select! {
            biased;
            result = call => result,
            () = cut.cancelled() => Err(VmmsError::Unavailable(format!(
                "docker host {} stopped answering during the call",
                self.name
            ))),
        }
    }

    pub(super) fn has_image(&self, image: &str) -> bool {
        lock(&self.state).has_image(image)
    }
}

impl HostState {
    /// Whether the host has the current `image`.
    pub(super) fn has_image(&self, image: &str) -> bool {
        !self.outdated.contains(image)
            && self
                .images
                .as_ref()
                .is_some_and(|images| images.contains(image))
    }
}

/// Counts a running job for as long as it lives: the engine drops a
/// `run_job` that outlives its time limit.
pub(super) struct Running<'a>(&'a AtomicUsize);

impl<'a> Running<'a> {
    pub(super) fn start(count: &'a AtomicUsize) -> Running<'a> {
        count.fetch_add(1, Ordering::Relaxed);
        Running(count)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        Host::new(super::super::host::DockerHost::local(4), None)
    }

    #[tokio::test]
    async fn a_waiting_call_gives_up_when_the_host_is_cut() {
        let host = Arc::new(host());
        let waiting = {
            let host = host.clone();
            tokio::spawn(async move {
                host.unless_cut(std::future::pending::<Result<(), VmmsError>>())
                    .await
            })
        };
        tokio::task::yield_now().await;
        lock(&host.state).cut.cancel();
        let answer = waiting.await.expect("join");
        assert!(
            matches!(answer, Err(VmmsError::Unavailable(_))),
            "{answer:?}"
        );
        // A call that answers is unaffected.
        let fresh = self::host();
        assert_eq!(fresh.unless_cut(async { Ok(7) }).await.ok(), Some(7));
    }

    #[test]
    fn an_outdated_image_counts_as_missing() {
        let mut state = HostState {
            images: Some(["a".to_string(), "b".to_string()].into()),
            ..Default::default()
        };
        assert!(state.has_image("a") && state.has_image("b") && !state.has_image("c"));
        state.outdated.insert("a".into());
        assert!(!state.has_image("a") && state.has_image("b"));
        state.images = None;
        assert!(!state.has_image("b"), "unknown until read");
    }
}
