//! Builds the configured backends.

use crate::config::Config;
use std::sync::Arc;
use tango_core::Vmms;

pub async fn start(config: &Config) -> anyhow::Result<Vec<Arc<dyn Vmms>>> {
    let mut names = vec![config.vmms.clone()];
    names.extend(config.extra_vmms.iter().cloned());
    names.sort();
    names.dedup();
    let mut backends: Vec<Arc<dyn Vmms>> = Vec::new();
    for name in names {
        backends.push(match name.as_str() {
            other => anyhow::bail!("unknown backend {other:?}: use sandbox or docker"),
        });
    }
    Ok(backends)
}
