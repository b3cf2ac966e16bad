//! Unit tests of two servers sharing one store: the in-memory shared
//! store keeps the PostgreSQL store's rules of ownership (which its own
//! suite checks against a real database).

use crate::engine::test_harness::{config, job, upload};
use crate::engine::Engine;
use crate::files::DataDir;
use crate::model::{now_ms, JobState};
use crate::store::{ServerRecord, SharedStore, Store};
use crate::testing::{FakeVmms, RecordingCallbacks, SharedMemoryStore};
use crate::vmms::Vmms;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One server: its own data dir, backend and callbacks, on the shared store.
struct Server {
    _dir: tempfile::TempDir,
    data: Arc<DataDir>,
    vmms: Arc<FakeVmms>,
    callbacks: Arc<RecordingCallbacks>,
    engine: Engine,
    id: u64,
}

async fn server(store: &Arc<SharedMemoryStore>, name: &str) -> Server {
    let server = server_with(store, name, config()).await;
    server.engine.join_cluster(server.id);
    server
}

/// A server that has not joined yet (it claims nothing).
async fn server_with(
    store: &Arc<SharedMemoryStore>,
    name: &str,
    config: crate::config::EngineConfig,
) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let data = Arc::new(DataDir::open(dir.path()).unwrap());
    let vmms = Arc::new(FakeVmms::default());
    let callbacks = Arc::new(RecordingCallbacks::default());
    let engine = Engine::start(
        crate::config::EngineConfig {
            prefix: name.into(),
            max_vms: 2,
            ..config
        },
        store.clone(),
        data.clone(),
        vec![vmms.clone() as Arc<dyn Vmms>],
        callbacks.clone(),
    )
    .await
    .unwrap();
    let (id, _) = store
        .register_server(&ServerRecord {
            id: 0,
            name: name.into(),
            address: "x".into(),
            version: "0".into(),
            started_ms: now_ms(),
            heartbeat_ms: now_ms(),
            lease_ms: 15_000,
            instance: None,
            prefix: name.into(),
        })
        .unwrap();
    Server {
        _dir: dir,
        data,
        vmms,
        callbacks,
        engine,
        id,
    }
}

impl Server {
    async fn upload(&self, name: &str, bytes: &[u8], store: &dyn Store) {
        self.engine.open_courselab("k-lab").await.unwrap();
        upload(&self.data, store, name, bytes).await;
    }

    fn delivered(&self) -> Vec<u64> {
        let delivered = self.callbacks.delivered.lock().unwrap();
        delivered
            .iter()
            .map(|(_, _, body)| String::from_utf8_lossy(body).into_owned())
            .filter_map(|body| {
                // "Received job NAME:ID" on the first line.
                let line = body.lines().next()?;
                line.rsplit(':').next()?.trim().parse().ok()
            })
            .collect()
    }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_added_on_one_server_run_where_there_is_room_and_end_once() {
    let store = Arc::new(SharedMemoryStore::default());
    let a = server(&store, "a").await;
    let b = server(&store, "b").await;
    a.upload("Makefile", b"all:\n", store.as_ref()).await;
    // Slow enough that a's two VMs cannot take all eight at once.
    for s in [&a, &b] {
        s.vmms.script.lock().unwrap().run_delay = Duration::from_millis(100);
    }
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(a.engine.add_job(job(&format!("out{i}"))).await.unwrap());
    }
    wait_until("every job finished", || {
        ids.iter().all(|id| {
            store
                .get_job(*id)
                .unwrap()
                .is_some_and(|j| j.state == JobState::Done)
        })
    })
    .await;
    wait_until("every callback", || {
        a.delivered().len() + b.delivered().len() >= ids.len()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut delivered = [a.delivered(), b.delivered()].concat();
    delivered.sort_unstable();
    assert_eq!(delivered, ids, "one callback a job");
    assert!(
        !b.delivered().is_empty(),
        "b ran some (with the bytes uploaded on a)"
    );
    for (i, id) in ids.iter().enumerate() {
        let out = store.output("k-lab", &format!("out{i}")).unwrap().unwrap();
        assert!(
            String::from_utf8_lossy(&out).contains(&format!(":{id}\n")),
            "{}",
            String::from_utf8_lossy(&out)
        );
        assert_eq!(store.get_job(*id).unwrap().unwrap().owner, None);
    }
    // Both servers list every job, whichever ran it.
    assert_eq!(a.engine.dead_jobs().unwrap().len(), ids.len());
    assert_eq!(store.outbox_len().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_server_stops_its_jobs_and_the_survivor_reports_them_once() {
    let store = Arc::new(SharedMemoryStore::default());
    let a = server(&store, "a").await;
    a.upload("Makefile", b"all:\n", store.as_ref()).await;
    // a's runs never end: it is "frozen" with the job.
    a.vmms.script.lock().unwrap().run_hangs = true;
    let id = a.engine.add_job(job("out")).await.unwrap();
    wait_until("a runs the job", || {
        store
            .get_job(id)
            .unwrap()
            .is_some_and(|j| j.state == JobState::Running && j.owner == Some(a.id))
    })
    .await;
    let b = server(&store, "b").await;
    // a's lease lapsed: b retires it and takes the job over.
    assert!(store.retire_server(a.id, now_ms()).unwrap());
    let dead = store.servers().unwrap();
    let dead: Vec<ServerRecord> = dead.into_iter().filter(|s| s.id == a.id).collect();
    assert_eq!(b.engine.take_over(&dead).await.unwrap(), 1);
    assert_eq!(b.engine.take_over(&dead).await.unwrap(), 0, "once");
    let job = store.get_job(id).unwrap().unwrap();
    assert_eq!(job.retries, 0, "no retry spent");
    assert!(
        job.trace
            .iter()
            .any(|t| t.message.contains("Re-queued: server \"a\"")),
        "{:?}",
        job.trace
    );
    // Either server may deliver the callback of b's result.
    let delivered = || [a.delivered(), b.delivered()].concat();
    wait_until("b's result delivered", || delivered() == [id]).await;
    let done = store.get_job(id).unwrap().unwrap();
    assert_eq!(done.state, JobState::Done);
    let done_vm = done.vm.clone();
    assert!(done.vm.unwrap().name.starts_with("b-"), "b ran it");
    // a comes back: its heartbeat is refused, it is fenced.
    assert!(!store.heartbeat_server(a.id, now_ms()).unwrap());
    a.engine.fence(99).await;
    wait_until("a's VM destroyed", || {
        !a.vmms.destroyed.lock().unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(delivered(), [id], "a reports nothing of its own");
    assert_eq!(store.get_job(id).unwrap().unwrap().vm, done_vm);
    let out = store.output("k-lab", "out").unwrap().unwrap();
    assert!(String::from_utf8_lossy(&out).contains(&format!(":{id}\n")));
}

#[tokio::test]
async fn max_queued_per_submitter_counts_every_servers_queue() {
    let store = Arc::new(SharedMemoryStore::default());
    let limited = || crate::config::EngineConfig {
        max_queued_per_submitter: Some(2),
        ..config()
    };
    // Neither claims: the jobs stay queued in the store.
    let a = server_with(&store, "a", limited()).await;
    let b = server_with(&store, "b", limited()).await;
    a.upload("Makefile", b"all:\n", store.as_ref()).await;
    // One submitter's three jobs (its name says who).
    let of_alice = |output: &str| crate::engine::NewJob {
        name: format!("course_lab_{}_alice@x.edu", output.len()),
        ..job(output)
    };
    a.engine.add_job(of_alice("one")).await.unwrap();
    b.engine.add_job(of_alice("two")).await.unwrap();
    let e = b.engine.add_job(of_alice("three")).await.unwrap_err();
    assert!(e.to_string().contains("already has 2 jobs queued"), "{e}");
    assert_eq!(a.engine.queue_len(), 2, "the queue of every server");
}
