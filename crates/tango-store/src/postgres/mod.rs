//! The PostgreSQL store, through sqlx: the same tables as the SQLite store
//! (jobs as JSON records, with their state as an indexed column), with ids
//! from sequences, so that they are unique across servers sharing the
//! database. Schema migrations are embedded in the binary and run on open
//! under sqlx's advisory lock, so several servers may start at once.
//!
//! Several servers share one database ([`tango_core::SharedStore`],
//! `shared.rs`): uploads, outputs and callback bodies are kept in it too,
//! jobs are claimed with `FOR UPDATE SKIP LOCKED`, and `LISTEN` wakes the
//! servers when a job waits for one or a callback is due.
//!
//! # Threads
//!
//! [`Store`](tango_core::Store) is synchronous and the engine calls it from
//! async code, as it does the SQLite store, whose calls take microseconds.
//! sqlx is async, and its connections belong to the runtime they were made
//! on: blocking on them from the engine's own runtime would stall, or panic
//! in `block_on`. So the pool lives on a thread of its own, with its own
//! single-threaded tokio runtime. Each call sends its work there over a
//! channel and waits for the answer on a `std::sync::mpsc` channel: a
//! tokio oneshot's `blocking_recv` panics when called inside a runtime,
//! which is where the engine calls from; a std channel just blocks the
//! calling thread for the length of the query.
//!
//! Every call has a time limit ([`PostgresOptions::call_timeout`]): a
//! database that is down or unreachable gives an error, never a hang, and
//! the pool makes new connections when it is back (a restarted PostgreSQL
//! is found on the next call).

mod migrate;
mod queries;
mod shared;

/// The schema version this build writes and the newest it can open.
pub use migrate::SCHEMA_VERSION;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tango_core::StoreError;

/// Settings of a [`PostgresStore`].
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Connections the pool may hold at once.
    pub max_connections: u32,
    /// The longest a call may take, waiting for a connection included.
    pub call_timeout: Duration,
    /// The longest opening may take: the first connection and the
    /// migrations (which may wait for another server's).
    pub open_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            max_connections: 8,
            call_timeout: Duration::from_secs(10),
            open_timeout: Duration::from_secs(60),
        }
    }
}

type Work = Box<dyn FnOnce(PgPool) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Woken by the database's notifications (see the migrations' triggers).
#[derive(Default)]
struct Signals {
    jobs: Arc<tokio::sync::Notify>,
    outbox: Arc<tokio::sync::Notify>,
}

impl Signals {
    /// Wakes both: after a lost connection, whatever was notified
    /// meanwhile is unknown.
    fn all(&self) {
        self.jobs.notify_one();
        self.outbox.notify_one();
    }
}

/// Listens for the database's notifications for as long as the pool is
/// open, connecting again after the connection is lost.
async fn listen(pool: PgPool, signals: Arc<Signals>, target: String) {
    loop {
        let listener = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
            listener.listen_all(["tango_jobs", "tango_outbox"]).await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        let mut listener = match listener {
            Ok(listener) => listener,
            Err(e) => {
                tracing::debug!(store = %target, "cannot listen for notifications yet: {e}");
                // The database is away: try again in a second.
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        signals.all();
        loop {
            match listener.try_recv().await {
                Ok(Some(note)) if note.channel() == "tango_jobs" => signals.jobs.notify_one(),
                Ok(Some(_)) => signals.outbox.notify_one(),
                // The connection was lost; the next call makes a new one.
                Ok(None) => signals.all(),
                Err(e) => {
                    tracing::warn!(store = %target, "listening for notifications failed: {e}");
                    break;
                }
            }
        }
    }
}

pub struct PostgresStore {
    work: tokio::sync::mpsc::UnboundedSender<Work>,
    signals: Arc<Signals>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The database, without the password, for messages.
    target: String,
    call_timeout: Duration,
}

/// `postgres://user@host:port/db`: where the store is, without the
/// password, for messages and logs.
fn describe(options: &PgConnectOptions) -> String {
    format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or(options.get_username())
    )
}

/// What went wrong in `what`, and what to do about it.
fn explain(target: &str, what: &str, e: sqlx::Error) -> StoreError {
    let hint = match &e {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
            "is PostgreSQL running and reachable there (host, port, firewall, sslmode)?"
        }
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // invalid_authorization_specification, invalid_password
            Some("28000") | Some("28P01") => {
                "does the role exist, with this password (PGPASSWORD or the URL), and does \
                 pg_hba.conf let it in?"
            }
            // invalid_catalog_name
            Some("3D000") => "create the database (`createdb`) or fix its name in the URL",
            // insufficient_privilege
            Some("42501") => "grant the role the rights on the database (or make it its owner)",
            _ => "see PostgreSQL's log",
        },
        _ => "see PostgreSQL's log",
    };
    StoreError(format!(
        "PostgreSQL store {target}: {what} failed: {e}; {hint}"
    ))
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user[:password]@host
    /// [:port]/database`, or any form libpq takes as a URL; `PGPASSWORD` is
    /// read too) and brings its schema up to date. A database of a newer
    /// schema is refused untouched.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, PostgresOptions::default())
    }

    pub fn open_with(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        let not_postgres = |why: String| {
            StoreError(format!(
                "the store URL is not a PostgreSQL URL ({why}): write it as \
                 postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
            ))
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(not_postgres("it does not start with postgres://".into()));
        }
        let connect: PgConnectOptions = url.parse().map_err(|e| not_postgres(format!("{e}")))?;
        let target = describe(&connect);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError(format!("cannot start the PostgreSQL store's runtime: {e}")))?;
        let (work, mut queue) = tokio::sync::mpsc::unbounded_channel::<Work>();
        let (ready, opened) = std::sync::mpsc::sync_channel(1);
        let (thread_target, thread_options) = (target.clone(), options.clone());
        let signals = Arc::new(Signals::default());
        let thread_signals = signals.clone();
        let thread = std::thread::Builder::new()
            .name("tango-postgres".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let pool = PgPoolOptions::new()
                        .max_connections(thread_options.max_connections)
                        .acquire_timeout(thread_options.call_timeout)
                        .connect_lazy_with(connect);
                    let migrated = tokio::time::timeout(
                        thread_options.open_timeout,
                        migrate::run(&pool, &thread_target),
                    )
                    .await
                    .unwrap_or_else(|_| {
                        Err(StoreError(format!(
                            "PostgreSQL store {thread_target}: opening took over {:?}: is \
                             PostgreSQL running and reachable there, or is another server \
                             holding the migration lock?",
                            thread_options.open_timeout
                        )))
                    });
                    let failed = migrated.is_err();
                    if ready.send(migrated).is_err() || failed {
                        pool.close().await;
                        return;
                    }
                    let listening =
                        tokio::spawn(listen(pool.clone(), thread_signals, thread_target.clone()));
                    // Calls run side by side, each on a connection of the pool.
                    while let Some(work) = queue.recv().await {
                        tokio::spawn(work(pool.clone()));
                    }
                    listening.abort();
                    pool.close().await;
                })
            })
            .map_err(|e| StoreError(format!("cannot start the PostgreSQL store's thread: {e}")))?;
        let result = opened.recv().unwrap_or_else(|_| {
            Err(StoreError(format!(
                "PostgreSQL store {target}: its thread stopped while opening"
            )))
        });
        if let Err(e) = result {
            let _ = thread.join();
            return Err(e);
        }
        tracing::info!(store = %target, "PostgreSQL store open");
        Ok(PostgresStore {
            work,
            signals,
            thread: Some(thread),
            target,
            call_timeout: options.call_timeout,
        })
    }

    /// Runs `query` on the store's thread and waits for its answer, for at
    /// most the call timeout.
    fn call<T, F, Fut>(&self, what: &'static str, query: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(PgPool) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, sqlx::Error>> + Send + 'static,
    {
        self.call_for(self.call_timeout, what, query)
    }

    /// [`Self::call`] with a time limit of its own.
    fn call_for<T, F, Fut>(
        &self,
        limit: Duration,
        what: &'static str,
        query: F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(PgPool) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, sqlx::Error>> + Send + 'static,
    {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let work: Work = Box::new(move |pool| {
            Box::pin(async move {
                // A call cut off by the timeout drops its future, which
                // rolls back its transaction, if any.
                let _ = reply.send(tokio::time::timeout(limit, query(pool)).await);
            })
        });
        let stopped = || {
            StoreError(format!(
                "PostgreSQL store {}: its thread has stopped; restart tangod",
                self.target
            ))
        };
        self.work.send(work).map_err(|_| stopped())?;
        match answer.recv().map_err(|_| stopped())? {
            Ok(result) => result.map_err(|e| explain(&self.target, what, e)),
            Err(_) => Err(StoreError(format!(
                "PostgreSQL store {}: {what} took over {limit:?}: is PostgreSQL overloaded or \
                 unreachable?",
                self.target
            ))),
        }
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Ends the thread's loop: it closes the pool and returns.
        let (closed, _) = tokio::sync::mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.work, closed));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
