//! Issue 20's queue at scale, in process: what `add_job` and dispatch cost
//! per job with 1k, 10k and 100k jobs queued.
//!
//! For each size N it starts a fresh engine (in-memory store, the fake
//! backend, 8 VMs, wall clock), queues N jobs from 1,000 submitters in 3
//! courselabs while the first 8 hold every VM (their `run_job` waits on a
//! gate), then opens the gate and times how long the engine takes to start
//! and finish the next min(N, 10,000) jobs, whose runs take no time. What
//! that measures is the engine's own work per job: the scheduler's choice,
//! the worker's steps, the output file, the callback. tangod's HTTP side and
//! its SQLite store are measured by tango-server's `queue_scale_http` example.
//!
//! `cargo run --release -p tango-core --example queue_scale -- [N...]`

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tango_core::files::DataDir;
use tango_core::testing::{FakeVmms, MemoryStore, RecordingCallbacks};
use tango_core::{CallbackSender, Engine, EngineConfig, NewJob, Vmms};

type Error = Box<dyn std::error::Error>;

const VMS: usize = 8;
const COURSELABS: [&str; 3] = ["15213-f26", "15122-f26", "98317-f26"];
const SUBMITTERS: usize = 1000;
/// Jobs dispatched and finished after the gate opens (at most).
const DISPATCHED: usize = 10_000;
/// The last this many adds give the cost of an add at the queue's size.
const LAST_ADDS: usize = 1000;

struct Measure {
    queued: usize,
    /// Per add, over the last LAST_ADDS adds.
    add: Duration,
    dispatched: usize,
    /// Per job, from the gate opening to the callback.
    dispatch: Duration,
}

/// Outputs in memory where there is one: the engine syncs each output file,
/// and on a disk the syncs would be most of what is measured.
fn data_tempdir() -> std::io::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    match tempfile::tempdir_in(shm) {
        Ok(dir) if shm.is_dir() => Ok(dir),
        _ => tempfile::tempdir(),
    }
}

async fn delivered_at_least(callbacks: &RecordingCallbacks, n: usize) {
    loop {
        let notified = callbacks.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if callbacks.delivered.lock().map(|d| d.len()).unwrap_or(n) >= n {
            return;
        }
        notified.await;
    }
}

async fn measure(queued: usize) -> Result<Measure, Error> {
    let dir = data_tempdir()?;
    let data = Arc::new(DataDir::open(dir.path())?);
    let store = Arc::new(MemoryStore::default());
    for lab in COURSELABS {
        let lab = format!("key-{lab}");
        data.open_courselab(&lab).await?;
        let mut upload = data.begin_upload(&lab, "Makefile", 1 << 20).await?;
        upload.write(b"autograde:\n\ttrue\n").await?;
        upload.finish(&data, store.as_ref()).await?;
    }
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    let vmms = Arc::new(FakeVmms::default());
    vmms.script.lock().map_err(|_| "poisoned")?.run_gate = Some(gate_rx);
    let callbacks = Arc::new(RecordingCallbacks::default());
    let config = EngineConfig {
        default_vmms: "fake".into(),
        max_vms: VMS,
        reuse_vms: true,
        ..EngineConfig::default()
    };
    let engine = Engine::start(
        config,
        store,
        data,
        vec![vmms as Arc<dyn Vmms>],
        callbacks.clone() as Arc<dyn CallbackSender>,
    )
    .await?;

    let mut last_adds = Instant::now();
    for i in 0..queued + VMS {
        if i == queued + VMS - LAST_ADDS.min(queued) {
            last_adds = Instant::now();
        }
        let lab = COURSELABS[i % COURSELABS.len()];
        let submitter = (i / COURSELABS.len()) % SUBMITTERS;
        engine
            .add_job(NewJob {
                name: format!("{lab}_lab3_{}_s{submitter:04}@andrew.cmu.edu", i / 3000),
                courselab_dir: format!("key-{lab}"),
                courselab: lab.into(),
                image: "img".into(),
                files: vec![("Makefile".into(), "Makefile".into())],
                output_file: format!("q{i}.out"),
                timeout_secs: Some(600),
                callback_url: Some(format!("http://autolab.invalid/cb?job={i}")),
                ..NewJob::default()
            })
            .await?;
    }
    let add = last_adds.elapsed() / LAST_ADDS.min(queued) as u32;

    let dispatched = queued.min(DISPATCHED);
    let opened = Instant::now();
    gate.send_replace(true);
    // The VMS jobs that held the VMs finish first; then `dispatched` more.
    tokio::time::timeout(
        Duration::from_secs(600),
        delivered_at_least(&callbacks, VMS + dispatched),
    )
    .await
    .map_err(|_| format!("{dispatched} jobs did not finish within 600 s"))?;
    let dispatch = opened.elapsed() / (VMS + dispatched) as u32;
    engine.shutdown().await;
    Ok(Measure {
        queued,
        add,
        dispatched,
        dispatch,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    let sizes: Vec<usize> = match std::env::args().skip(1).map(|a| a.parse()).collect() {
        Ok(sizes) if !Vec::is_empty(&sizes) => sizes,
        Ok(_) => vec![1_000, 10_000, 100_000],
        Err(e) => return Err(format!("each argument must be a queue size: {e}").into()),
    };
    println!("| queued | add_job, per job (last {LAST_ADDS} adds) | dispatch + finish, per job | jobs timed |");
    println!("|---|---|---|---|");
    for n in sizes {
        let m = measure(n).await?;
        println!(
            "| {} | {:.1} µs | {:.1} µs | {} |",
            m.queued,
            m.add.as_secs_f64() * 1e6,
            m.dispatch.as_secs_f64() * 1e6,
            m.dispatched + VMS
        );
    }
    Ok(())
}
