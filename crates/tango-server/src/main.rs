use anyhow::Context;
use clap::Parser;
use tango_server::config::{Cli, Config, LogFormat};

fn main() -> anyhow::Result<()> {
    // Before the runtime starts its threads.
    limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(&cli)?;
    if cli.print_config {
        print!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Standard error, as daemons log; colours only for a terminal, not for
    // the log file or journal it is redirected to.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let prefix_lock = lock_prefix(&config.engine.prefix).await?;
    // Only with the lock held is a record of the same instance surely dead.
    let instance = prefix_lock
        .as_ref()
        .and_then(|_| tango_server::servers::instance(&config.engine.prefix));
    let listener = bind(config.listen).await?;
    tango_server::serve(config, listener, instance).await
}

/// Host-wide lock files of the VM prefixes in use (root's servers).
const PREFIX_LOCK_DIR: &str = "/run/tango-rs";

/// Where this user's servers lock their prefixes: /run for root, else the
/// user's runtime directory (a rootless server's sandboxes and cgroups are
/// its own; only Docker containers are shared with other users' servers).
fn prefix_lock_dir() -> Option<std::path::PathBuf> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Some(PREFIX_LOCK_DIR.into());
    }
    std::env::var_os("XDG_RUNTIME_DIR").map(|d| std::path::Path::new(&d).join("tango-rs"))
}

/// Holds this host's lock on the VM prefix for as long as tangod runs. Two
/// servers with one prefix would each take the other's VMs for orphans and
/// destroy them (Docker containers are host-wide). The lock goes with the
/// process, however it ends. Without a lock directory there is no check.
async fn lock_prefix(prefix: &str) -> anyhow::Result<Option<std::fs::File>> {
    tango_core::names::check_component("engine prefix", prefix)
        .map_err(|e| anyhow::anyhow!("{e}: set [engine] prefix to a plain name"))?;
    let Some(dir) = prefix_lock_dir() else {
        tracing::warn!(
            "cannot check that no other tangod of this user uses prefix {prefix:?}: \
             XDG_RUNTIME_DIR is not set"
        );
        return Ok(None);
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::warn!("cannot check that no other tangod uses prefix {prefix:?}: {e}");
        return Ok(None);
    }
    let path = dir.join(format!("prefix-{prefix}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // Right after a crash a job process of the dead server that was being
    // set up may hold the lock for a moment (as with the socket above).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "another tangod on this host uses the VM prefix {prefix:?} (it holds {}): \
                 give each server its own [engine] prefix, or they destroy each other's VMs",
                path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
    }
}

/// Binds the listen address. Right after a crash, job processes of the dead
/// server that were being set up (forked, not yet exec'd) may hold its
/// socket for a moment, and no event says when it is free: retry briefly.
async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => return other.with_context(|| format!("cannot listen on {addr}")),
        }
    }
}

/// glibc gives each thread that allocates its own malloc arena (up to 8
/// per core); a queue of 100,000 jobs built by tokio's worker threads then
/// leaves memory scattered over all of them. One arena (threads still keep
/// their own small caches) measured 1.6 KB a queued job against 2.1 KB
/// with two and 2.2 KB with glibc's default, with no loss of addJob rate
/// (bench/queue_scale.sh). An operator's own
/// `MALLOC_ARENA_MAX` wins. (musl, as in the container image, has no
/// arenas.)
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a malloc parameter, and no other thread
        // exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}
