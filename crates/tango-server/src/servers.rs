//! This server in the servers registry (issue 21): it registers itself in
//! the store at start, renews its heartbeat every third of its lease, and
//! removes its record when it stops cleanly. A server whose heartbeat is
//! older than its lease is dead.
//!
//! With PostgreSQL several servers share the work (the engine's
//! `cluster.rs`): each heartbeat also looks for servers whose lease
//! lapsed, retires them and takes over their jobs and VMs; a server that
//! finds its own heartbeat refused was retired by another (it was frozen
//! or cut off) and is fenced: its jobs stop unreported, and it goes on as
//! a new server. Servers sharing a store must each have their own VM
//! prefix: a server whose prefix an alive one uses is refused. With SQLite
//! only one server can use the database (it is in the data dir), so
//! records of earlier runs are dropped at start.
//!
//! A server restarted on the same machine (systemd after a crash) need not
//! wait for its own dead run's lease: when tangod holds the machine's lock
//! on its VM prefix (`main.rs`), no other tangod of that user and prefix
//! runs there, so a record of the same instance (machine id, user, prefix)
//! is a run that died.

use anyhow::Context;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tango_core::store::call_blocking;
use tango_core::{now_ms, Engine, ServerRecord, Store};

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
    /// With a shared store, the engine whose jobs the heartbeat guards.
    engine: OnceLock<Arc<Engine>>,
    /// Unix ms of the last heartbeat that failed (the store away).
    last_failure_ms: AtomicI64,
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

/// Whether an alive server uses this one's VM prefix (so that each would
/// destroy the other's VMs), to refuse this one's start, and why.
fn refusal(others: &[ServerRecord], prefix: &str, now_ms: i64) -> Option<String> {
    let first = others
        .iter()
        .find(|s| s.alive(now_ms) && s.prefix == prefix)?;
    let secs = |ms: i64| ms as f64 / 1000.0;
    Some(format!(
        "another tangod alive on this database uses the VM prefix {prefix:?}: server {:?} \
         (id {}) at {}, last heartbeat {:.1} s ago (lease {} s). Servers sharing a database \
         each need their own prefix, or each destroys the other's VMs: set a different \
         `prefix` in this server's config. If that server died, this one may start after its \
         lease lapses ({:.1} s from now)",
        first.name,
        first.id,
        first.address,
        secs(first.heartbeat_age_ms(now_ms)),
        secs(first.lease_ms),
        secs(first.lease_ms - first.heartbeat_age_ms(now_ms)),
    ))
}

impl Membership {
    /// Registers this server. With a shared store (PostgreSQL), refuses
    /// while an alive server has the same VM prefix, leaving no record of
    /// this one; otherwise records of earlier runs are dropped.
    pub async fn join(
        store: Arc<dyn Store>,
        name: String,
        address: String,
        lease: Duration,
        instance: Option<String>,
        prefix: String,
    ) -> anyhow::Result<Arc<Membership>> {
        let shared = store.shared().is_some();
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
            prefix,
        };
        let record = me.clone();
        let (id, others) = call_blocking(store.clone(), move |s| s.register_server(&record))
            .await
            .context("cannot register this server in the store")?;
        me.id = id;
        let (earlier, others): (Vec<ServerRecord>, Vec<ServerRecord>) = others
            .into_iter()
            .partition(|s| earlier_run(s, me.instance.as_deref()));
        if shared {
            if let Some(why) = refusal(&others, &me.prefix, now_ms()) {
                if let Err(e) = call_blocking(store.clone(), move |s| s.remove_server(id)).await {
                    tracing::warn!("cannot remove this server's record after refusing: {e:#}");
                }
                anyhow::bail!(why);
            }
        }
        let now = now_ms();
        let forget: Vec<u64> = others
            .iter()
            .filter(|s| !shared || s.heartbeat_age_ms(now) > FORGET_DEAD_AFTER_MS)
            .chain(&earlier)
            .map(|s| s.id)
            .collect();
        if !forget.is_empty() {
            let gone = forget.clone();
            call_blocking(store.clone(), move |s| {
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
            engine: OnceLock::new(),
            last_failure_ms: AtomicI64::new(0),
        }))
    }

    /// Hands the engine to the heartbeat: with a shared store, the engine
    /// claims jobs as this server, and takes over from dead servers now
    /// (among them an earlier run of this very server).
    pub async fn attach(&self, engine: Arc<Engine>) {
        engine.join_cluster(self.id());
        let _ = self.engine.set(engine);
        if let Err(e) = self.take_over().await {
            tracing::warn!("cannot take over from dead servers: {e:#}");
        }
    }

    /// Retires the servers whose lease lapsed and takes over their jobs
    /// and VMs; also re-queues any job whose owner was retired before (by
    /// a server that died in the middle of a takeover). Not while this
    /// server's own store calls failed within a lease: after PostgreSQL
    /// was away, every server's heartbeat is late, and each must have the
    /// time to renew it before it counts as dead.
    async fn take_over(&self) -> anyhow::Result<()> {
        let Some(engine) = self.engine.get().filter(|e| e.is_shared()) else {
            return Ok(());
        };
        let now = now_ms();
        if now - self.last_failure_ms.load(Ordering::Relaxed) < self.me.lease_ms {
            return Ok(());
        }
        let me = self.id();
        let earlier = self.me.instance.clone();
        let seen = self.last_seen();
        let mut retired = Vec::new();
        for server in &seen {
            let dead = !server.alive(now) || earlier_run(server, earlier.as_deref());
            if server.id == me || !dead {
                continue;
            }
            let id = server.id;
            let newly = call_blocking(self.store.clone(), move |s| match s.shared() {
                Some(shared) => shared.retire_server(id, now),
                None => Ok(false),
            })
            .await?;
            // Its VMs go once, and not when a live server (a restart of
            // it) uses its prefix now: that one's own sweep removes them.
            let prefix_in_use = seen
                .iter()
                .any(|s| s.id != id && s.alive(now) && s.prefix == server.prefix);
            if newly && !prefix_in_use {
                retired.push(server.clone());
            }
        }
        let requeued = engine.take_over(&retired).await?;
        if requeued > 0 {
            tracing::warn!(
                requeued,
                retired = ?retired.iter().map(|s| &s.name).collect::<Vec<_>>(),
                "took over the jobs of servers whose lease lapsed"
            );
        }
        Ok(())
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
        let list = call_blocking(self.store.clone(), |s| s.servers()).await?;
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
        let kept =
            match call_blocking(self.store.clone(), move |s| s.heartbeat_server(id, now)).await {
                Ok(kept) => kept,
                Err(e) => {
                    self.last_failure_ms.store(now_ms(), Ordering::Relaxed);
                    return Err(e.into());
                }
            };
        if !kept {
            let record = ServerRecord {
                heartbeat_ms: now,
                ..self.me.clone()
            };
            let (id, _) =
                call_blocking(self.store.clone(), move |s| s.register_server(&record)).await?;
            tracing::warn!(
                id,
                "this server's heartbeat was refused (another server took over its jobs, or its \
                 record was removed): registered again"
            );
            self.id.store(id, Ordering::Relaxed);
            if let Some(engine) = self.engine.get() {
                engine.fence(id).await;
            }
        }
        // The renewal itself may have waited out the store's absence (a
        // connection that PostgreSQL's restart cut is waited for, not
        // failed): measured after it, not before.
        let renewed = now_ms();
        if renewed - *last_ok >= self.me.lease_ms {
            // Frozen, or the store was away: another server may have
            // counted this one dead meanwhile, and every other server's
            // heartbeat is as late as this one's. Like a failed call, this
            // holds off taking over from them for a lease, the time they
            // need to renew theirs.
            self.last_failure_ms.store(renewed, Ordering::Relaxed);
            tracing::warn!(
                "this server's heartbeat lapsed: the last one stored was {:.1} s ago, over its \
                 lease of {} s",
                (renewed - *last_ok) as f64 / 1000.0,
                self.me.lease_ms / 1000
            );
        }
        *last_ok = now;
        let list = call_blocking(self.store.clone(), |s| s.servers()).await?;
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = list;
        self.take_over().await
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
        if let Err(e) = call_blocking(self.store.clone(), move |s| s.remove_server(id)).await {
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
            prefix: format!("p{id}"),
        }
    }

    #[test]
    fn only_an_alive_server_of_the_same_prefix_refuses_a_start_and_is_named() {
        let now = 100_000;
        assert_eq!(refusal(&[], "p2", now), None);
        let dead = ServerRecord {
            prefix: "p2".into(),
            ..server(1, "old", now - 15_000)
        };
        assert_eq!(refusal(std::slice::from_ref(&dead), "p2", now), None);
        let others = [dead, server(2, "grader1", now - 2_500), server(3, "b", now)];
        assert_eq!(refusal(&others, "p9", now), None, "other prefixes share");
        let why = refusal(&others, "p2", now).unwrap();
        for part in [
            "prefix \"p2\"",
            "\"grader1\" (id 2)",
            "at 10.0.0.2:3000",
            "2.5 s ago",
            "lease 15 s",
            "12.5 s from now",
        ] {
            assert!(why.contains(part), "{part:?} in {why}");
        }
    }

    #[tokio::test]
    async fn joining_a_store_of_its_own_removes_earlier_runs() {
        let store: Arc<dyn Store> = Arc::new(tango_core::testing::MemoryStore::default());
        let lease = Duration::from_secs(15);
        let join = |name: &str| {
            Membership::join(
                store.clone(),
                name.into(),
                "x:1".into(),
                lease,
                Some(format!("machine/0/{name}")),
                "tango".into(),
            )
        };
        let first = join("a").await.unwrap();
        // A store of its own (SQLite): the earlier record is a dead run.
        let second = join("c").await.unwrap();
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
        let again = join("a").await.unwrap();
        let left: Vec<u64> = store.servers().unwrap().iter().map(|s| s.id).collect();
        assert_eq!(left, [again.id()]);
    }
}
