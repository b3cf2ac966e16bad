//! Unit tests of the engine's logic against the in-memory test VMMS.

use crate::config::EngineConfig;
use crate::engine::{Engine, NewJob};
use crate::files::DataDir;
use crate::model::{Job, JobState, Machine};
use crate::store::Store;
use crate::testing::{FakeVmms, MemoryStore, RecordingCallbacks};
use crate::vmms::{RunStatus, Vmms};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Harness {
    _dir: tempfile::TempDir,
    data: Arc<DataDir>,
    store: Arc<MemoryStore>,
    vmms: Arc<FakeVmms>,
    callbacks: Arc<RecordingCallbacks>,
}

fn config() -> EngineConfig {
    EngineConfig {
        default_vmms: "fake".into(),
        callback_initial_backoff_ms: 10,
        ..EngineConfig::default()
    }
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let data = Arc::new(DataDir::open(dir.path()).unwrap());
        Harness {
            _dir: dir,
            data,
            store: Arc::new(MemoryStore::default()),
            vmms: Arc::new(FakeVmms::default()),
            callbacks: Arc::new(RecordingCallbacks::default()),
        }
    }

    async fn engine(&self, config: EngineConfig) -> Engine {
        Engine::start(
            config,
            self.store.clone(),
            self.data.clone(),
            vec![self.vmms.clone() as Arc<dyn Vmms>],
            self.callbacks.clone(),
        )
        .await
        .unwrap()
    }

    async fn upload(&self, name: &str, bytes: &[u8]) {
        self.data.open_courselab("k-lab").await.unwrap();
        let mut up = self
            .data
            .begin_upload("k-lab", name, 1 << 20)
            .await
            .unwrap();
        up.write(bytes).await.unwrap();
        up.finish(&self.data, self.store.as_ref()).await.unwrap();
    }

    fn job(&self, output: &str) -> NewJob {
        NewJob {
            name: format!("job-{output}"),
            courselab_dir: "k-lab".into(),
            courselab: "lab".into(),
            image: "img".into(),
            files: vec![("Makefile".into(), "Makefile".into())],
            output_file: output.into(),
            callback_url: Some("http://127.0.0.1:9/cb".into()),
            ..NewJob::default()
        }
    }

    fn output(&self, name: &str) -> String {
        std::fs::read_to_string(self.data.output_path("k-lab", name)).unwrap_or_default()
    }

    /// A job that brings its own cloud keys.
    fn job_with_own_keys(&self, output: &str) -> NewJob {
        NewJob {
            credentials: Some(crate::model::CloudCredentials {
                access_key_id: "AKIDEXAMPLE".into(),
                secret_access_key: "secret".into(),
            }),
            ..self.job(output)
        }
    }

    /// Waits until the pool of image `img` holds a free VM.
    async fn wait_free_vm(&self, engine: &Engine) {
        self.wait_free_vms(engine, 1).await;
    }

    /// Waits until the pool of image `img` holds `n` free VMs.
    async fn wait_free_vms(&self, engine: &Engine, n: usize) {
        let start = Instant::now();
        while engine.pools()["img"].free.len() < n {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "fewer than {n} free VMs: {:?}",
                engine.pools()["img"]
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until job `id` has its files in its VM (it is running).
    async fn wait_copied_in(&self, engine: &Engine, id: u64) {
        let start = Instant::now();
        while engine
            .get_job(id)
            .unwrap()
            .unwrap()
            .phases
            .copied_in
            .is_none()
        {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "job {id} never ran"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn wait_dead(&self, id: u64) -> Job {
        let start = Instant::now();
        loop {
            if let Some(job) = self.store.get_job(id).unwrap() {
                if !job.state.is_live() {
                    return job;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "job {id} did not finish"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn wait_callbacks(&self, n: usize) {
        let start = Instant::now();
        while self.callbacks.delivered.lock().unwrap().len() < n {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "callbacks missing"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test]
async fn job_runs_to_output_file_and_callback() {
    let h = Harness::new();
    h.upload("Makefile", b"all:\n\techo hi\n").await;
    let engine = h.engine(config()).await;
    let id = engine.add_job(h.job("out.txt")).await.unwrap();
    let job = h.wait_dead(id).await;
    assert_eq!(job.state, JobState::Done);
    let out = h.output("out.txt");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].ends_with(&format!("Received job job-out.txt:{id}")),
        "{out}"
    );
    assert!(
        lines[1].ends_with("Success: Autodriver returned normally"),
        "{out}"
    );
    assert!(lines[2].ends_with("Here is the output from the autograder:"));
    assert_eq!(lines[3], "---");
    assert_eq!(lines[4], "Autodriver: Job exited with status 0");
    assert!(out.ends_with("Makefile: all:\n\techo hi\n\n"), "{out}");
    h.wait_callbacks(1).await;
    let (url, file, body) = h.callbacks.delivered.lock().unwrap()[0].clone();
    assert_eq!(url, "http://127.0.0.1:9/cb");
    assert_eq!(file, "out.txt");
    assert_eq!(body, out.as_bytes());
    let last = job.trace.last().unwrap();
    assert!(last.message.contains("Autodriver returned normally"));
}

#[tokio::test]
async fn jobs_dispatch_in_order_with_one_vm() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms.script.lock().unwrap().run_delay = Duration::from_millis(20);
    let engine = h
        .engine(EngineConfig {
            max_vms: 1,
            ..config()
        })
        .await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(engine.add_job(h.job(&format!("o{i}"))).await.unwrap());
    }
    for id in &ids {
        h.wait_dead(*id).await;
    }
    assert_eq!(*h.vmms.run_order.lock().unwrap(), ids);
    // One VM, reused for every job.
    assert_eq!(h.vmms.initialized.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn without_reuse_each_job_gets_a_fresh_vm() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    let engine = h
        .engine(EngineConfig {
            reuse_vms: false,
            ..config()
        })
        .await;
    let mut used = Vec::new();
    for i in 0..3 {
        let id = engine.add_job(h.job(&format!("o{i}"))).await.unwrap();
        used.push(h.wait_dead(id).await.vm.unwrap().name);
        // The spare made after this job is ready for the next one.
        h.wait_free_vm(&engine).await;
    }
    used.dedup();
    assert_eq!(used.len(), 3, "a VM ran two jobs: {used:?}");
    // Three VMs ran a job each and are gone; one spare waits.
    assert_eq!(h.vmms.initialized.load(Ordering::SeqCst), 4);
    let start = Instant::now();
    while h.vmms.vms.lock().unwrap().len() > 1 {
        assert!(start.elapsed() < Duration::from_secs(5), "VMs leaked");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for name in &used {
        assert!(h.vmms.destroyed.lock().unwrap().contains(name));
    }
    engine.shutdown().await;
    assert!(h.vmms.vms.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_job_takes_a_vm_that_comes_free_before_its_own_is_made() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    {
        let mut script = h.vmms.script.lock().unwrap();
        script.run_delay = Duration::from_millis(100);
        // The first VM is made at once, the second takes long.
        script
            .initialize_delays
            .extend([Duration::ZERO, Duration::from_secs(3)]);
    }
    let engine = h.engine(config()).await;
    let first = engine.add_job(h.job("o1")).await.unwrap();
    h.wait_copied_in(&engine, first).await;
    let started = Instant::now();
    let second = engine.add_job(h.job("o2")).await.unwrap();
    h.wait_copied_in(&engine, second).await;
    // The third job needs a VM while the second's is still being made: it
    // waits for that one (or a freed one) rather than making another.
    let third = engine.add_job(h.job("o3")).await.unwrap();
    let first = h.wait_dead(first).await;
    let second = h.wait_dead(second).await;
    let third = h.wait_dead(third).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the jobs waited {:?} for the VM made for them",
        started.elapsed()
    );
    assert_eq!(
        (second.state, third.state),
        (JobState::Done, JobState::Done)
    );
    let first_vm = first.vm.unwrap().name;
    assert_eq!(second.vm.unwrap().name, first_vm);
    assert_eq!(third.vm.unwrap().name, first_vm);
    // The VM made meanwhile joins the pool when it is ready.
    h.wait_free_vms(&engine, 2).await;
    assert_eq!(h.vmms.initialized.load(Ordering::SeqCst), 2);
    let fourth = engine.add_job(h.job("o4")).await.unwrap();
    assert_eq!(h.wait_dead(fourth).await.state, JobState::Done);
    assert_eq!(h.vmms.initialized.load(Ordering::SeqCst), 2);
    engine.shutdown().await;
    assert!(h.vmms.vms.lock().unwrap().is_empty(), "a VM was left");
}

#[tokio::test]
async fn a_vm_that_fails_to_start_after_its_job_took_another_gives_its_slot_back() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    {
        let mut script = h.vmms.script.lock().unwrap();
        script.run_delay = Duration::from_millis(50);
        script
            .initialize_delays
            .extend([Duration::ZERO, Duration::from_millis(500)]);
    }
    let engine = h
        .engine(EngineConfig {
            max_vms: 2,
            ..config()
        })
        .await;
    let first = engine.add_job(h.job("o1")).await.unwrap();
    h.wait_copied_in(&engine, first).await;
    // The second job's own VM fails, after the first job's VM came free
    // and served it: no retry of the job's.
    h.vmms
        .script
        .lock()
        .unwrap()
        .initialize_failures
        .push_back("no such image".into());
    let second = engine.add_job(h.job("o2")).await.unwrap();
    let second = h.wait_dead(second).await;
    assert_eq!((second.state, second.retries), (JobState::Done, 0));
    let start = Instant::now();
    while h.vmms.destroyed.lock().unwrap().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the failed VM stayed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Its slot is free again: of two jobs at once under max_vms 2, one
    // gets a new VM.
    h.vmms.script.lock().unwrap().run_delay = Duration::from_millis(200);
    let a = engine.add_job(h.job("o3")).await.unwrap();
    let b = engine.add_job(h.job("o4")).await.unwrap();
    let (a, b) = (h.wait_dead(a).await, h.wait_dead(b).await);
    assert_ne!(a.vm.unwrap().name, b.vm.unwrap().name);
    assert_eq!(h.vmms.initialized.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn failed_resets_and_destroys_count_as_backend_errors() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    {
        let mut script = h.vmms.script.lock().unwrap();
        script.reset_failures = 1;
        script.destroy_failures = 1;
    }
    let engine = h.engine(config()).await;
    let id = engine.add_job(h.job("o1")).await.unwrap();
    let job = h.wait_dead(id).await;
    assert_eq!(job.state, JobState::Done);
    // The VM that could not be reset is destroyed, which fails too.
    let start = Instant::now();
    loop {
        let errors = engine.metrics().backend_errors();
        let count = |step: &str| errors.get(&("fake".to_string(), step.to_string())).copied();
        if count("reset") == Some(1) && count("destroy") == Some(1) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "backend errors: {errors:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    engine.shutdown().await;
}

#[tokio::test]
async fn prealloc_fills_the_pool_and_jobs_use_it() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    let engine = h.engine(config()).await;
    engine
        .prealloc("img", 2, None, Some(1), Some(256))
        .await
        .unwrap();
    h.wait_free_vms(&engine, 2).await;
    let id = engine.add_job(h.job("o")).await.unwrap();
    let job = h.wait_dead(id).await;
    assert_eq!(h.vmms.initialized.load(Ordering::SeqCst), 2);
    let vm = job.vm.unwrap();
    assert_eq!(vm.cores, Some(1));
    assert_eq!(vm.memory_mb, Some(256));
    assert!(engine.prealloc("nope", 1, None, None, None).await.is_err());
    assert!(engine.prealloc("img", -1, None, None, None).await.is_err());
    engine.prealloc("img", 0, None, None, None).await.unwrap();
    assert!(engine.pools()["img"].total.is_empty());
}

#[tokio::test]
async fn system_errors_are_retried_then_reported() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms
        .script
        .lock()
        .unwrap()
        .initialize_failures
        .extend(["boom 1".to_string(), "boom 2".to_string()]);
    let engine = h.engine(config()).await;
    let id = engine.add_job(h.job("o1")).await.unwrap();
    let job = h.wait_dead(id).await;
    assert_eq!(job.state, JobState::Done);
    assert_eq!(job.retries, 2);
    assert!(job.trace.iter().any(|t| t.message.contains("boom 1")));

    h.vmms
        .script
        .lock()
        .unwrap()
        .initialize_failures
        .extend((0..3).map(|i| format!("dead {i}")));
    // No warm VM may serve the second job, so it must initialize one.
    engine.prealloc("img", 0, None, None, None).await.unwrap();
    let free_before = engine.pools()["img"].free.len();
    assert_eq!(free_before, 0);
    let id = engine.add_job(h.job("o2")).await.unwrap();
    let job = h.wait_dead(id).await;
    assert_eq!(job.state, JobState::Failed);
    let out = h.output("o2");
    assert!(
        out.contains("Internal error: Unable to complete job after 3 tries. Please resubmit"),
        "{out}"
    );
    assert!(
        out.contains("Job status: failed while initializing the VM: backend error: dead 2"),
        "{out}"
    );
    assert!(job.trace.last().unwrap().message.contains("Error"));
    // Failed jobs get their callback too.
    h.wait_callbacks(2).await;
    assert_eq!(engine.info().job_retries, 5);
}

#[tokio::test]
async fn timeouts_and_os_errors() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms.script.lock().unwrap().run_statuses.extend([
        RunStatus::TimedOut,
        RunStatus::OsError,
        RunStatus::Completed,
    ]);
    let engine = h.engine(config()).await;
    let mut job = h.job("t");
    job.timeout_secs = Some(7);
    let id = engine.add_job(job).await.unwrap();
    h.wait_dead(id).await;
    assert!(h
        .output("t")
        .contains("Error: Job timed out after 7 seconds"));
    let id = engine.add_job(h.job("os")).await.unwrap();
    let job = h.wait_dead(id).await;
    // The OS error damaged the VM: it was destroyed and the job retried.
    assert_eq!(job.retries, 1);
    assert_eq!(job.state, JobState::Done);
    assert!(!h.vmms.destroyed.lock().unwrap().is_empty());
    assert_eq!(engine.info().runjob_timeouts, 1);
}

#[tokio::test]
async fn hung_backend_call_times_out() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms.script.lock().unwrap().run_hangs = true;
    let mut cfg = config();
    cfg.max_retries = 0;
    cfg.timeouts.run_grace_secs = 1;
    let engine = h.engine(cfg).await;
    let mut job = h.job("hang");
    job.timeout_secs = Some(1);
    let id = engine.add_job(job).await.unwrap();
    let job = h.wait_dead(id).await;
    assert_eq!(job.state, JobState::Failed);
    assert!(h
        .output("hang")
        .contains("running the job timed out after 2 s"));
}

#[tokio::test]
async fn inputs_are_frozen_when_the_job_is_added() {
    let h = Harness::new();
    h.upload("Makefile", b"version one").await;
    let engine = h
        .engine(EngineConfig {
            max_vms: 1,
            ..config()
        })
        .await;
    h.vmms.script.lock().unwrap().run_delay = Duration::from_millis(100);
    let first = engine.add_job(h.job("a")).await.unwrap();
    let second = engine.add_job(h.job("b")).await.unwrap();
    // The second job is queued behind the first; a new upload must not
    // change what it runs.
    h.upload("Makefile", b"version two").await;
    h.wait_dead(first).await;
    h.wait_dead(second).await;
    assert!(
        h.output("b").contains("Makefile: version one"),
        "{}",
        h.output("b")
    );
    let third = engine.add_job(h.job("c")).await.unwrap();
    h.wait_dead(third).await;
    assert!(h.output("c").contains("Makefile: version two"));
}

#[tokio::test]
async fn rejects_bad_jobs() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    let engine = h.engine(config()).await;
    let mut bad = h.job("o");
    bad.image = "missing".into();
    assert_eq!(
        engine.add_job(bad).await.unwrap_err().to_string(),
        "Invalid image name"
    );
    let mut bad = h.job("o");
    bad.files = vec![("Makefile".into(), "notmake".into())];
    assert!(engine
        .add_job(bad)
        .await
        .unwrap_err()
        .to_string()
        .contains("Makefile"));
    let mut bad = h.job("o");
    bad.files = vec![("../../etc/passwd".into(), "Makefile".into())];
    assert!(engine.add_job(bad).await.is_err());
    let mut bad = h.job("../o");
    bad.output_file = "../escape".into();
    assert!(engine.add_job(bad).await.is_err());
    let mut bad = h.job("o");
    bad.courselab_dir = "k-nolab".into();
    assert_eq!(
        engine.add_job(bad).await.unwrap_err().to_string(),
        "Courselab not found"
    );
    let mut bad = h.job("o");
    bad.callback_url = Some("file:///etc/passwd".into());
    assert!(engine.add_job(bad).await.is_err());
}

#[tokio::test]
async fn duplicate_add_job_returns_the_live_job() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms.script.lock().unwrap().run_delay = Duration::from_millis(200);
    let engine = h.engine(config()).await;
    let a = engine.add_job(h.job("same")).await.unwrap();
    let b = engine.add_job(h.job("same")).await.unwrap();
    assert_eq!(a, b);
    h.wait_dead(a).await;
}

#[tokio::test]
async fn restart_requeues_running_jobs_and_destroys_orphans() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    // A previous run left a running job and its VM behind.
    let engine = h.engine(config()).await;
    h.vmms.script.lock().unwrap().run_hangs = true;
    let id = engine.add_job(h.job("r")).await.unwrap();
    let start = Instant::now();
    while h.store.get_job(id).unwrap().unwrap().state != JobState::Running
        || h.vmms.run_order.lock().unwrap().is_empty()
    {
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(engine);
    let orphan = Machine::new("tango", 999, "img", "fake");
    h.vmms
        .vms
        .lock()
        .unwrap()
        .insert(orphan.name.clone(), orphan.clone());
    h.vmms.script.lock().unwrap().run_hangs = false;

    let _engine = h.engine(config()).await;
    let job = h.wait_dead(id).await;
    assert_eq!(job.state, JobState::Done);
    assert_eq!(job.retries, 1);
    assert!(job
        .trace
        .iter()
        .any(|t| t.message.contains("server restart")));
    assert!(h.vmms.destroyed.lock().unwrap().contains(&orphan.name));
}

#[tokio::test]
async fn callbacks_are_retried_until_delivered() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.callbacks.fail_first.store(3, Ordering::SeqCst);
    let engine = h.engine(config()).await;
    let id = engine.add_job(h.job("cb")).await.unwrap();
    h.wait_callbacks(1).await;
    assert_eq!(h.callbacks.attempts.load(Ordering::SeqCst), 4);
    let start = Instant::now();
    while h
        .store
        .get_job(id)
        .unwrap()
        .unwrap()
        .phases
        .callback_delivered
        .is_none()
    {
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(h.store.outbox_len().unwrap(), 0);
    assert!(!h.data.outbox_path(id).exists());
}

#[tokio::test]
async fn outbox_survives_restart() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.callbacks.fail_first.store(u64::MAX, Ordering::SeqCst);
    let engine = h.engine(config()).await;
    let id = engine.add_job(h.job("cb")).await.unwrap();
    h.wait_dead(id).await;
    engine.shutdown().await;
    drop(engine);
    assert_eq!(h.store.outbox_len().unwrap(), 1);
    h.callbacks.fail_first.store(0, Ordering::SeqCst);
    // The claimed entry is due again once its claim runs out; make it due now.
    let mut entry = h.store.outbox_due(i64::MAX, 1).unwrap().remove(0);
    entry.next_attempt_ms = 0;
    h.store.outbox_update(&entry).unwrap();
    let _engine = h.engine(config()).await;
    h.wait_callbacks(1).await;
}

#[tokio::test]
async fn shutdown_destroys_idle_vms() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    let engine = h.engine(config()).await;
    let id = engine.add_job(h.job("o")).await.unwrap();
    h.wait_dead(id).await;
    // The reused VM waits in the pool until the server stops.
    h.wait_free_vm(&engine).await;
    assert_eq!(h.vmms.vms.lock().unwrap().len(), 1);
    engine.shutdown().await;
    assert!(h.vmms.vms.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_unavailable_backend_is_waited_for_without_spending_retries() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms.script.lock().unwrap().unavailable_calls = 3;
    let engine = h.engine(config()).await;
    let started = Instant::now();
    let id = engine.add_job(h.job("wait")).await.unwrap();
    let job = h.wait_dead(id).await;
    assert_eq!(job.state, JobState::Done);
    assert_eq!(job.retries, 0);
    assert_eq!(job.backend_wait_ms, 1000 + 1000 + 2000);
    // Waits of 1 s, 1 s and 2 s happened before it ran.
    assert!(started.elapsed() >= Duration::from_secs(4));
    let waits = job
        .trace
        .iter()
        .filter(|t| t.message.contains("Backend unavailable"))
        .count();
    assert_eq!(waits, 3);
}

#[tokio::test]
async fn shutdown_stops_jobs_that_outlive_the_grace_period_and_destroys_their_vms() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms.script.lock().unwrap().run_hangs = true;
    let engine = h
        .engine(EngineConfig {
            shutdown_grace_secs: 0,
            ..config()
        })
        .await;
    let id = engine.add_job(h.job("hangs")).await.unwrap();
    h.wait_copied_in(&engine, id).await;
    assert_eq!(h.vmms.vms.lock().unwrap().len(), 1);
    tokio::time::timeout(Duration::from_secs(10), engine.shutdown())
        .await
        .expect("shutdown waits no longer than grace + destroy");
    assert!(
        h.vmms.vms.lock().unwrap().is_empty(),
        "the job's VM is left"
    );
    // The store still holds the job as running: the next start re-queues it.
    let job = h.store.get_job(id).unwrap().unwrap();
    assert_eq!(job.state, JobState::Running);
    assert!(h.callbacks.delivered.lock().unwrap().is_empty());
}

#[tokio::test]
async fn blobs_of_replaced_uploads_are_removed_unless_a_pending_job_needs_them() {
    let h = Harness::new();
    h.upload("Makefile", b"first version").await;
    let first = h.store.file_md5("k-lab", "Makefile").unwrap().unwrap();
    h.upload("Makefile", b"second version").await;
    let second = h.store.file_md5("k-lab", "Makefile").unwrap().unwrap();
    assert_ne!(first, second);
    assert!(h.data.blob_path(&first).is_file());
    let none = std::collections::HashSet::new();

    // Too young: a job being added may still take it.
    let removed = h
        .data
        .remove_unused_blobs(none.clone(), Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(removed, 0);
    // Named by a job still to run: kept.
    let keep = std::collections::HashSet::from([first.clone()]);
    let removed = h
        .data
        .remove_unused_blobs(keep, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(removed, 0);
    // Otherwise the replaced version goes; the current one stays.
    let removed = h
        .data
        .remove_unused_blobs(none, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    assert!(!h.data.blob_path(&first).exists());
    assert!(h.data.blob_path(&second).is_file());
    assert_eq!(
        std::fs::read(h.data.courselab_path("k-lab").join("Makefile")).unwrap(),
        b"second version"
    );
}

#[tokio::test]
async fn a_job_with_its_own_credentials_gets_a_fresh_vm_that_is_not_reused() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    let engine = h.engine(config()).await;
    let plain = engine.add_job(h.job("plain")).await.unwrap();
    h.wait_dead(plain).await;
    h.wait_free_vm(&engine).await;
    let warm: Vec<String> = h.vmms.vms.lock().unwrap().keys().cloned().collect();
    assert_eq!(warm.len(), 1);

    let own = engine.add_job(h.job_with_own_keys("own")).await.unwrap();
    h.wait_dead(own).await;
    let job = engine.get_job(own).unwrap().unwrap();
    // The keys are not kept once the job is done.
    let stored = h.store.get_job(own).unwrap().unwrap();
    assert!(stored.credentials.is_none());
    assert!(stored
        .vm
        .as_ref()
        .is_some_and(|vm| vm.credentials.is_none()));
    let vm = job.vm.expect("the job's VM");
    assert!(!warm.contains(&vm.name), "ran on the server's warm VM");
    // Its VM is destroyed, not kept; the warm one is still there.
    let start = Instant::now();
    while h.vmms.vms.lock().unwrap().contains_key(&vm.name) {
        assert!(start.elapsed() < Duration::from_secs(5), "kept for reuse");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(h.vmms.vms.lock().unwrap().contains_key(&warm[0]));
    engine.shutdown().await;
}

#[tokio::test]
async fn a_restart_destroys_the_vm_an_interrupted_job_had_in_its_own_account() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    h.vmms.script.lock().unwrap().run_hangs = true;
    let engine = h.engine(config()).await;
    let id = engine.add_job(h.job_with_own_keys("own")).await.unwrap();
    h.wait_copied_in(&engine, id).await;
    let vm_name = engine.get_job(id).unwrap().unwrap().vm.unwrap().name;
    // A crash: the engine is gone without a shutdown (its hung worker is
    // left behind), and the VM is not listed by the orphan sweep.
    drop(engine);
    h.vmms.script.lock().unwrap().run_hangs = false;
    let _engine = h.engine(config()).await;
    assert!(
        !h.vmms.vms.lock().unwrap().contains_key(&vm_name),
        "the job's own VM outlived the restart"
    );
    h.wait_dead(id).await;
}

#[tokio::test]
async fn a_job_with_its_own_credentials_is_not_starved_by_warm_vms_it_cannot_use() {
    let h = Harness::new();
    h.upload("Makefile", b"x").await;
    let engine = h
        .engine(EngineConfig {
            max_vms: 1,
            ..config()
        })
        .await;
    let plain = engine.add_job(h.job("plain")).await.unwrap();
    h.wait_dead(plain).await;
    h.wait_free_vm(&engine).await;
    // The only slot holds a warm VM of the server's account.
    let own = engine.add_job(h.job_with_own_keys("own")).await.unwrap();
    h.wait_dead(own).await;
    assert_eq!(engine.get_job(own).unwrap().unwrap().state, JobState::Done);
    engine.shutdown().await;
}
