//! This server in the servers registry (issue 21): it registers itself in
//! the store at start, renews its heartbeat every third of its lease, and
//! removes its record when it stops cleanly. A server whose heartbeat is
//! older than its lease is dead.
//!
//! Several servers on one PostgreSQL database do not share the work yet
//! (each takes every live job in the database for its own at start), so
//! with PostgreSQL a server refuses to start while another is alive: at
//! most one runs, and a new one may start once the last one's lease has
//! lapsed. With SQLite only one server can use the database (it is in the
//! data dir), so records of earlier runs are dropped at start.
//!
//! A server restarted on the same machine (systemd after a crash) need not
//! wait for its own dead run's lease: when tangod holds the machine's lock
//! on its VM prefix (`main.rs`), no other tangod of that user and prefix
//! runs there, so a record of the same instance (machine id, user, prefix)
//! is a run that died.

use anyhow::Context;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tango_core::{now_ms, ServerRecord, Store};

/// Records of servers dead this long are removed when a server starts:
/// long enough to see in `tango servers` what died, short enough that
/// restarts do not pile up.
const FORGET_DEAD_AFTER_MS: i64 = 24 * 3600 * 1000;

/// This server's membership: its record's id and the last list read.
pub struct Membership {
    store: Arc<dyn Store>,
    id: AtomicU64,
    me: ServerRecord,
    seen: Mutex<Vec<ServerRecord>>,
}

/// A server in the views (`/v2/servers`, `tango servers`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerView {
    #[serde(flatten)]
    pub record: ServerRecord,
    pub alive: bool,
    pub heartbeat_age_ms: i64,
    /// The server that answered this request.
    pub answering: bool,
}

/// This server's instance, given that it holds the machine's lock on
/// `prefix`; None when the machine has no id to tell it by.
pub fn instance(prefix: &str) -> Option<String> {
    let machine = std::fs::read_to_string("/etc/machine-id").ok()?;
    let machine = machine.trim();
    if machine.is_empty() {
        return None;
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    Some(format!("{machine}/{uid}/{prefix}"))
}

/// Whether `other` is an earlier run of this very instance (so dead).
fn earlier_run(other: &ServerRecord, instance: Option<&str>) -> bool {
    instance.is_some() && other.instance.as_deref() == instance
}

/// Whether another server is alive to refuse this one's start, and why.
fn refusal(others: &[ServerRecord], now_ms: i64) -> Option<String> {
    let alive: Vec<&ServerRecord> = others.iter().filter(|s| s.alive(now_ms)).collect();
    let first = alive.first()?;
    let secs = |ms: i64| ms as f64 / 1000.0;
    Some(format!(
        "another tangod is alive on this database: server {:?} (id {}) at {}, last heartbeat \
         {:.1} s ago (lease {} s){}. Several tangod servers on one PostgreSQL database are not \
         supported yet (issue 21), so at most one runs at a time: stop that server first, or, \
         if it died, start this one after its lease lapses ({:.1} s from now)",
        first.name,
        first.id,
        first.address,
        secs(first.heartbeat_age_ms(now_ms)),
        secs(first.lease_ms),
        match alive.len() {
            1 => String::new(),
            n => format!(", and {} more", n - 1),
        },
        secs(first.lease_ms - first.heartbeat_age_ms(now_ms)),
    ))
}

/// Runs a store call off the async threads: PostgreSQL's take milliseconds,
/// and up to its call timeout when the database is away.
async fn blocking<T: Send + 'static>(
    store: &Arc<dyn Store>,
    call: impl FnOnce(&dyn Store) -> Result<T, tango_core::StoreError> + Send + 'static,
) -> anyhow::Result<T> {
    let store = store.clone();
    Ok(tokio::task::spawn_blocking(move || call(&*store)).await??)
}

impl Membership {
    /// Registers this server. With `exclusive` (PostgreSQL), refuses while
    /// another registered server is alive, leaving no record of this one;
    /// otherwise records of earlier runs are dropped.
    pub async fn join(
        store: Arc<dyn Store>,
        name: String,
        address: String,
        lease: Duration,
        instance: Option<String>,
        exclusive: bool,
    ) -> anyhow::Result<Arc<Membership>> {
        let now = now_ms();
        let mut me = ServerRecord {
            id: 0,
            name,
            address,
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_ms: now,
            heartbeat_ms: now,
            lease_ms: lease.as_millis() as i64,
            instance,
        };
        let record = me.clone();
        let (id, others) = blocking(&store, move |s| s.register_server(&record))
            .await
            .context("cannot register this server in the store")?;
        me.id = id;
        let (earlier, others): (Vec<ServerRecord>, Vec<ServerRecord>) = others
            .into_iter()
            .partition(|s| earlier_run(s, me.instance.as_deref()));
        if exclusive {
            if let Some(why) = refusal(&others, now_ms()) {
                if let Err(e) = blocking(&store, move |s| s.remove_server(id)).await {
                    tracing::warn!("cannot remove this server's record after refusing: {e:#}");
                }
                anyhow::bail!(why);
            }
        }
        let now = now_ms();
        let forget: Vec<u64> = others
            .iter()
            .filter(|s| !exclusive || s.heartbeat_age_ms(now) > FORGET_DEAD_AFTER_MS)
            .chain(&earlier)
            .map(|s| s.id)
            .collect();
        if !forget.is_empty() {
            let gone = forget.clone();
            blocking(&store, move |s| {
                gone.iter().try_for_each(|id| s.remove_server(*id))
            })
            .await
            .context("cannot remove dead servers' records")?;
        }
        let seen: Vec<ServerRecord> = others
            .into_iter()
            .filter(|s| !forget.contains(&s.id))
            .chain([me.clone()])
            .collect();
        tracing::info!(
            server = %me.name,
            id,
            alive = seen.iter().filter(|s| s.alive(now)).count(),
            "registered in the servers registry"
        );
        Ok(Arc::new(Membership {
            store,
            id: AtomicU64::new(id),
            me,
            seen: Mutex::new(seen),
        }))
    }

    pub fn name(&self) -> &str {
        &self.me.name
    }

    pub fn id(&self) -> u64 {
        self.id.load(Ordering::Relaxed)
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.me.lease_ms as u64)
    }

    /// The servers as last read (by the heartbeat, or a fresh list).
    pub fn last_seen(&self) -> Vec<ServerRecord> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many of the servers last read are alive now.
    pub fn alive_count(&self) -> usize {
        let now = now_ms();
        self.last_seen().iter().filter(|s| s.alive(now)).count()
    }

    /// The servers as the store has them now, for the views.
    pub async fn fresh(&self) -> anyhow::Result<Vec<ServerView>> {
        let list = blocking(&self.store, |s| s.servers()).await?;
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = list.clone();
        Ok(self.views(list, now_ms()))
    }

    fn views(&self, list: Vec<ServerRecord>, now: i64) -> Vec<ServerView> {
        let me = self.id();
        list.into_iter()
            .map(|record| ServerView {
                alive: record.alive(now),
                heartbeat_age_ms: record.heartbeat_age_ms(now),
                answering: record.id == me,
                record,
            })
            .collect()
    }

    /// One heartbeat, and a fresh list. A record that was removed (by hand,
    /// or by a server that took this one for long dead) is made again.
    async fn beat(&self, last_ok: &mut i64) -> anyhow::Result<()> {
        let id = self.id();
        let now = now_ms();
        let kept = blocking(&self.store, move |s| s.heartbeat_server(id, now)).await?;
        if !kept {
            let record = ServerRecord {
                heartbeat_ms: now,
                ..self.me.clone()
            };
            let (id, _) = blocking(&self.store, move |s| s.register_server(&record)).await?;
            tracing::warn!(
                id,
                "this server's record was gone from the servers registry; registered again"
            );
            self.id.store(id, Ordering::Relaxed);
        }
        if now - *last_ok >= self.me.lease_ms {
            // Frozen, or the store was away: another server may have
            // counted this one dead meanwhile.
            tracing::warn!(
                "this server's heartbeat lapsed: the last one stored was {:.1} s ago, over its \
                 lease of {} s",
                (now - *last_ok) as f64 / 1000.0,
                self.me.lease_ms / 1000
            );
        }
        *last_ok = now;
        let list = blocking(&self.store, |s| s.servers()).await?;
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = list;
        Ok(())
    }

    /// Renews the heartbeat every third of the lease until the task is
    /// aborted. A failed renewal is logged and tried at the next tick.
    pub fn keep_alive(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(me.lease() / 3);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick is at once: registering was the first beat.
            ticks.tick().await;
            let mut last_ok = me.me.heartbeat_ms;
            loop {
                ticks.tick().await;
                if let Err(e) = me.beat(&mut last_ok).await {
                    tracing::warn!("cannot renew this server's heartbeat: {e:#}");
                }
            }
        })
    }

    /// Removes this server's record: it stopped cleanly, it is not a
    /// server that died.
    pub async fn leave(&self) {
        let id = self.id();
        if let Err(e) = blocking(&self.store, move |s| s.remove_server(id)).await {
            tracing::warn!("cannot remove this server from the servers registry: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(id: u64, name: &str, heartbeat_ms: i64) -> ServerRecord {
        ServerRecord {
            id,
            name: name.into(),
            address: format!("10.0.0.{id}:3000"),
            version: "0.1.0".into(),
            started_ms: 0,
            heartbeat_ms,
            lease_ms: 15_000,
            instance: None,
        }
    }

    #[test]
    fn only_an_alive_server_refuses_a_start_and_is_named() {
        let now = 100_000;
        assert_eq!(refusal(&[], now), None);
        let dead = server(1, "old", now - 15_000);
        assert_eq!(refusal(std::slice::from_ref(&dead), now), None);
        let why = refusal(&[dead, server(2, "grader1", now - 2_500)], now).unwrap();
        for part in [
            "\"grader1\" (id 2)",
            "at 10.0.0.2:3000",
            "2.5 s ago",
            "lease 15 s",
            "issue 21",
            "12.5 s from now",
        ] {
            assert!(why.contains(part), "{part:?} in {why}");
        }
        let two = refusal(&[server(3, "a", now), server(4, "b", now)], now).unwrap();
        assert!(two.contains("and 1 more"), "{two}");
    }

    #[tokio::test]
    async fn joining_removes_earlier_runs_or_refuses_and_leaves_no_record() {
        let store: Arc<dyn Store> = Arc::new(tango_core::testing::MemoryStore::default());
        let lease = Duration::from_secs(15);
        let join = |name: &str, exclusive| {
            Membership::join(
                store.clone(),
                name.into(),
                "x:1".into(),
                lease,
                Some(format!("machine/0/{name}")),
                exclusive,
            )
        };
        let first = join("a", true).await.unwrap();
        let e = join("b", true).await.err().expect("a is alive");
        assert!(format!("{e}").contains("\"a\""), "{e}");
        assert_eq!(store.servers().unwrap().len(), 1, "b left no record");
        // Without exclusivity (SQLite) the earlier record is a dead run.
        let second = join("c", false).await.unwrap();
        let names: Vec<String> = store
            .servers()
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["c"]);
        assert_eq!(second.alive_count(), 1);
        // a's record is gone: its next beat makes it again.
        let mut last_ok = now_ms();
        first.beat(&mut last_ok).await.unwrap();
        assert_ne!(first.id(), 1);
        let views = second.fresh().await.unwrap();
        assert_eq!(views.len(), 2);
        assert!(views.iter().all(|v| v.alive));
        assert_eq!(
            views
                .iter()
                .filter(|v| v.answering)
                .map(|v| v.record.name.as_str())
                .collect::<Vec<_>>(),
            ["c"]
        );
        second.leave().await;
        assert_eq!(store.servers().unwrap().len(), 1);
        // The same instance again (restarted on its machine, its prefix
        // lock held): its alive-looking record is an earlier run.
        let again = join("a", true).await.unwrap();
        let left: Vec<u64> = store.servers().unwrap().iter().map(|s| s.id).collect();
        assert_eq!(left, [again.id()]);
    }
}
