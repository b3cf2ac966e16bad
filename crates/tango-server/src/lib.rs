//! tangod's library half: the axum application (Tango v1 routes), the HTTP
//! callback sender, configuration and start-up. `main.rs` only parses the
//! command line and runs [`serve`].

pub mod backends;
pub mod callback;
pub mod config;
pub mod dashboard;
pub mod metrics;
pub mod servers;
pub mod tls;
pub mod v1;
pub mod v2;

use anyhow::Context;
use std::sync::Arc;
use tango_core::files::DataDir;
use tango_core::Engine;
use tokio::net::TcpListener;

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub keys: Arc<Vec<String>>,
    pub max_upload_bytes: u64,
    /// `/metrics` answers only with a key as a bearer token.
    pub metrics_require_key: bool,
    /// This server in the servers registry; None for an app not started by
    /// [`serve`] (tests that build their own engine).
    pub servers: Option<Arc<servers::Membership>>,
}

pub fn app(state: AppState) -> axum::Router {
    let routes = v1::routes()
        .merge(v2::routes(state.clone()))
        .merge(dashboard::routes());
    metrics::instrument(routes)
        // For any extractor that buffers a body. The v1 routes read theirs
        // as streams under their own limits, to answer statusId -1 when
        // one is too large.
        .layer(axum::extract::DefaultBodyLimit::max(v1::MAX_BODY_BYTES))
        .with_state(state)
}

/// Opens the data dir and store, starts the backends and the engine (which
/// recovers the previous run's jobs and VMs), and serves until SIGTERM or
/// SIGINT, then stops gracefully. `instance` says which tangod this is
/// across restarts on this machine ([`servers::instance`]); give it only
/// while holding the machine's lock on the VM prefix.
pub async fn serve(
    config: config::Config,
    listener: TcpListener,
    instance: Option<String>,
) -> anyhow::Result<()> {
    if config.keys.is_empty() {
        anyhow::bail!(
            "no key configured: pass --key KEY or --key-file FILE (key_file in the config), \
             or set RESTFUL_KEY; clients send it in every URL"
        );
    }
    // Before anything starts: a bad certificate is a mistake to fix now.
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(tls::server_config(cert, key).map_err(|e| {
            anyhow::anyhow!("{e}: check tls_cert and tls_key (--tls-cert, --tls-key)")
        })?),
        _ => None,
    };
    let store_kind = config::StoreKind::parse(&config.store)?;
    let db = config.data_dir.join("tango.db");
    if store_kind == config::StoreKind::Sqlite {
        // Before anything in the data dir is touched: a newer tangod's data
        // dir is refused as it is.
        tango_store::SqliteStore::check_version(&db)?;
    }
    let data = Arc::new(
        DataDir::open(&config.data_dir)
            .with_context(|| format!("cannot use data dir {}", config.data_dir.display()))?,
    );
    let store: Arc<dyn tango_core::Store> = match store_kind {
        config::StoreKind::Sqlite => {
            Arc::new(tango_store::SqliteStore::open(&db, config.full_sync)?)
        }
        #[cfg(feature = "postgres")]
        config::StoreKind::Postgres(url) => {
            if db.exists() {
                tracing::warn!(
                    "the data dir holds {}, the SQLite store of an earlier run: its jobs are not \
                     in PostgreSQL and are not served; move it away to silence this",
                    db.display()
                );
            }
            // Opening waits for PostgreSQL (up to a minute) and migrates.
            Arc::new(
                tokio::task::spawn_blocking(move || tango_store::PostgresStore::open(&url))
                    .await??,
            )
        }
        #[cfg(not(feature = "postgres"))]
        config::StoreKind::Postgres(_) => {
            anyhow::bail!("this tangod was built without PostgreSQL support (feature postgres)")
        }
    };
    // Before the backends and the engine start: a refused server must not
    // touch the VMs or jobs of the one that uses its prefix.
    let membership = servers::Membership::join(
        store.clone(),
        config.server.name(),
        config.server.address(listener.local_addr()?),
        std::time::Duration::from_secs(config.server.lease_secs),
        instance,
        config.engine.prefix.clone(),
    )
    .await?;
    let heartbeat = membership.keep_alive();
    let served = serve_registered(config, listener, tls, store, data, membership.clone()).await;
    heartbeat.abort();
    // However serving ended: a server that failed to start or stopped is
    // not one that died, and must not hold off the next start for a lease.
    membership.leave().await;
    served
}

/// The part of [`serve`] after this server registered.
async fn serve_registered(
    config: config::Config,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    store: Arc<dyn tango_core::Store>,
    data: Arc<DataDir>,
    membership: Arc<servers::Membership>,
) -> anyhow::Result<()> {
    let backends = backends::start(&config).await?;
    // Before the engine starts, so that no SIGHUP meanwhile ends tangod.
    let hangups = match &backends.docker {
        Some(_) => Some(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .context("cannot handle SIGHUP")?,
        ),
        None => None,
    };
    let docker_fleet = backends.docker.clone();
    let backends = backends.all;
    let callbacks = Arc::new(callback::HttpCallbacks::new(
        config.callback_ca_cert.as_deref(),
    )?);
    let engine =
        Arc::new(Engine::start(config.engine.clone(), store, data, backends, callbacks).await?);
    membership.attach(engine.clone()).await;
    for pool in &config.pools {
        tokio::spawn(keep_pool(engine.clone(), pool.clone()));
    }
    if let (Some(fleet), Some(hangups)) = (docker_fleet, hangups) {
        tokio::spawn(backends::reload_docker_hosts_on_sighup(
            engine.clone(),
            fleet,
            config.clone(),
            hangups,
        ));
    }
    let state = AppState {
        engine: engine.clone(),
        keys: Arc::new(config.keys.clone()),
        max_upload_bytes: config.max_upload_bytes,
        metrics_require_key: config.metrics_require_key,
        servers: Some(membership),
    };
    tracing::info!(
        listen = %listener.local_addr()?,
        vmms = %config.vmms,
        data_dir = %config.data_dir.display(),
        https = tls.is_some(),
        "tangod serving"
    );
    // The listener is bound and the engine has recovered: under systemd
    // (Type=notify) units ordered after tangod may start now. Without
    // NOTIFY_SOCKET this does nothing.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!("cannot tell systemd that tangod is ready: {e}");
    }
    match tls {
        Some(tls) => {
            let listener = tls::TlsListener::new(listener, tls)?;
            axum::serve(listener, app(state))
                .with_graceful_shutdown(shutdown_signal())
                .await?
        }
        None => {
            axum::serve(listener, app(state))
                .with_graceful_shutdown(shutdown_signal())
                .await?
        }
    }
    tracing::info!("stopping: no new jobs; waiting for running jobs");
    engine.shutdown().await;
    Ok(())
}

/// Preallocates a `[[pools]]` entry. The backend may not answer yet at
/// start (dockerd starting) or may not have the image yet (it is being
/// built): the server serves meanwhile and tries again, less and less often.
async fn keep_pool(engine: Arc<Engine>, pool: config::PoolSettings) {
    let mut wait = std::time::Duration::from_secs(1);
    loop {
        let made = engine
            .prealloc(
                &pool.image,
                pool.size as i64,
                pool.vmms.as_deref(),
                pool.cores,
                pool.memory_mb,
            )
            .await;
        match made {
            Ok(()) => {
                tracing::info!(image = %pool.image, size = pool.size, "pool from the config preallocated");
                return;
            }
            Err(e) => {
                let why = match e {
                    tango_core::EngineError::InvalidImage => {
                        format!("the backend has no image {:?}", pool.image)
                    }
                    e => e.to_string(),
                };
                tracing::warn!(
                    image = %pool.image,
                    "cannot preallocate the pool of [[pools]] ({why}); trying again in {} s: \
                     make sure the backend runs and has the image, or remove the entry",
                    wait.as_secs()
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(60));
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // Running jobs may take shutdown_grace_secs: systemd shows the unit as
    // stopping meanwhile, not as running.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Stopping]) {
        tracing::warn!("cannot tell systemd that tangod is stopping: {e}");
    }
}
