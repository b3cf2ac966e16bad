//! Brings an image to a host that lacks it, once per host and image: the
//! VMs that need it wait for that one transfer, which runs in a task of its
//! own so that it outlives a caller that gives up.

use super::member::Host;
use super::{lock, spread, Inner};
use crate::docker::Docker;
use std::sync::Arc;
use tango_core::vmms::VmmsError;

/// How a host that lacks an image gets it.
pub(super) enum Fetch {
    /// Streamed from the host of that name.
    Stream(String),
    /// Pulled from this registry.
    Pull(String),
}

impl Inner {
    /// Brings `image` to `host` in a task of its own: a transfer that
    /// outlasts the caller (the engine's initialize timeout) goes on, and
    /// the VM's next attempt waits for it instead of starting over.
    pub(super) async fn bring(
        self: &Arc<Self>,
        host: &Arc<Host>,
        docker: &Arc<Docker>,
        fetch: Fetch,
        image: &str,
    ) -> Result<(), VmmsError> {
        let (inner, host, docker, image) = (
            self.clone(),
            host.clone(),
            docker.clone(),
            image.to_string(),
        );
        tokio::spawn(async move { inner.bring_now(&host, &docker, fetch, &image).await })
            .await
            .map_err(|e| VmmsError::Backend(format!("docker: the image transfer failed: {e}")))?
    }

    /// Brings `image` to `host` (streamed from another host or pulled
    /// from the registry) unless it is there by the time this transfer's
    /// turn comes.
    async fn bring_now(
        &self,
        host: &Arc<Host>,
        docker: &Docker,
        fetch: Fetch,
        image: &str,
    ) -> Result<(), VmmsError> {
        let turn = lock(&self.transfers)
            .entry((host.name.clone(), image.to_string()))
            .or_default()
            .clone();
        let _turn = turn.lock().await;
        if host.has_image(image) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let (brought, how) = match fetch {
            Fetch::Stream(from) => {
                let (source_host, source) = self
                    .host(&from)
                    .and_then(|h| h.docker().map(|d| (h, d)))
                    .ok_or_else(|| VmmsError::Unavailable(format!("docker host {from} is down")))?;
                tracing::info!(image, from, to = %host.name, "docker: streaming the image");
                // Either end stopping to answer ends the transfer.
                let streamed = source_host
                    .unless_cut(host.unless_cut(spread::stream_image(&source, docker, image)))
                    .await;
                // A source that died mid-stream is the fault of its host,
                // not the job's: `Unavailable`, as for the target below.
                let streamed = self.settle(&source_host, &source, streamed).await;
                (streamed, format!("streamed from docker host {from}"))
            }
            Fetch::Pull(registry) => {
                tracing::info!(image, registry, to = %host.name, "docker: pulling the image");
                let pulled = host
                    .unless_cut(spread::pull_image(docker, &registry, image))
                    .await;
                (pulled, format!("pulled from registry {registry}"))
            }
        };
        self.settle(host, docker, brought).await?;
        {
            let mut state = lock(&host.state);
            state.outdated.remove(image);
            if let Some(images) = state.images.as_mut() {
                images.insert(image.to_string());
            }
        }
        tracing::info!(
            image,
            to = %host.name,
            secs = started.elapsed().as_secs_f64(),
            "docker: image {how}"
        );
        Ok(())
    }
}
