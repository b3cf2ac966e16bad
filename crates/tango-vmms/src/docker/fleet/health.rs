//! The fleet's health checks: every host is pinged on a period, and at once
//! when a call to it fails. A host that does not answer is down; one that
//! answers again is swept of this server's containers before it rejoins.

use super::{Host, Inner};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tango_core::vmms::Vmms;

/// Runs until the fleet is dropped (which aborts it). Each host is checked
/// on its own, so one that is slow to answer delays no other.
pub(super) async fn run(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Dropped with this task, which aborts the checks under way.
    let mut checks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = inner.wake.notified() => {}
        }
        while checks.try_join_next().is_some() {}
        for host in inner.all_hosts() {
            if host.checking.swap(true, Ordering::AcqRel) {
                continue; // its last check is still under way
            }
            let inner = inner.clone();
            checks.spawn(async move {
                check(&inner, &host).await;
                host.checking.store(false, Ordering::Release);
            });
        }
        inner.drop_removed_hosts();
    }
}

/// Checks every host at once, then drops the hosts removed from the
/// config that no longer hold a VM of this server.
pub(super) async fn check_all(inner: &Arc<Inner>) {
    let hosts = inner.all_hosts();
    futures_util::future::join_all(hosts.iter().map(|host| check(inner, host))).await;
    inner.drop_removed_hosts();
}

async fn check(inner: &Arc<Inner>, host: &Arc<Host>) {
    match host.docker() {
        Some(docker) => {
            if let Err(why) = ping(&docker, inner.ping_timeout).await {
                inner.mark_down(host, &why);
            }
        }
        None => rejoin(inner, host).await,
    }
}

/// Whether the engine answers a ping within `timeout`.
pub(super) async fn ping(docker: &super::Docker, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, docker.api().ping()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer to a ping within {timeout:?}")),
    }
}

/// Connects to a host that is down; if it answers, removes every container
/// of this server's prefix on it (their jobs were retried elsewhere when it
/// went down) and lets it take containers again.
async fn rejoin(inner: &Arc<Inner>, host: &Arc<Host>) {
    let docker = match tokio::time::timeout(inner.ping_timeout, inner.connect(&host.spec())).await {
        Ok(Ok(docker)) => Arc::new(docker),
        Ok(Err(e)) => {
            tracing::debug!(host = %host.name, "docker host still down: {e}");
            return;
        }
        Err(_) => return,
    };
    // Best effort: a container that cannot be removed now must not keep
    // the host out for good; it carries the prefix, so a later sweep (the
    // engine's orphan sweep, or the next return) removes it.
    let swept = async {
        let left = docker.get_vms(&inner.prefix).await?;
        let removals = left.iter().map(|vm| docker.safe_destroy_vm(vm));
        let results = futures_util::future::join_all(removals).await;
        for (vm, result) in left.iter().zip(&results) {
            if let Err(e) = result {
                tracing::warn!(host = %host.name, vm = %vm.name, "cannot remove an old container: {e}");
            }
        }
        Ok::<_, tango_core::vmms::VmmsError>(results.iter().filter(|r| r.is_ok()).count())
    };
    match swept.await {
        Ok(removed) => {
            let images = docker.get_images().await.ok();
            host.set_up(docker, images);
            tracing::info!(
                host = %host.name,
                removed,
                "docker host answers again: removed this server's old containers; it takes \
                 containers again"
            );
        }
        Err(e) => tracing::warn!(
            host = %host.name,
            "docker host answers but its containers cannot be listed ({e}); it stays down"
        ),
    }
}
