//! The engine tests' harness: an engine on the in-memory test VMMS, store
//! and callbacks, with helpers to add jobs and wait for them.

use crate::config::EngineConfig;
use crate::engine::{Engine, NewJob};
use crate::files::DataDir;
use crate::model::Job;
use crate::store::Store;
use crate::testing::{FakeVmms, MemoryStore, RecordingCallbacks};
use crate::vmms::Vmms;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) struct Harness {
    _dir: tempfile::TempDir,
    pub(super) data: Arc<DataDir>,
    pub(super) store: Arc<MemoryStore>,
    pub(super) vmms: Arc<FakeVmms>,
    pub(super) callbacks: Arc<RecordingCallbacks>,
}

pub(super) fn config() -> EngineConfig {
    EngineConfig {
        default_vmms: "fake".into(),
        callback_initial_backoff_ms: 10,
        ..EngineConfig::default()
    }
}

/// A job of courselab `k-lab` running its Makefile, with a callback.
pub(super) fn job(output: &str) -> NewJob {
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

/// Uploads `bytes` as `name` into courselab `k-lab` of `data`.
pub(super) async fn upload(data: &DataDir, store: &dyn Store, name: &str, bytes: &[u8]) {
    let mut up = data.begin_upload("k-lab", name, 1 << 20).await.unwrap();
    up.write(bytes).await.unwrap();
    up.finish(data, store).await.unwrap();
}

impl Harness {
    pub(super) fn new() -> Harness {
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

    pub(super) async fn engine(&self, config: EngineConfig) -> Engine {
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

    pub(super) async fn upload(&self, name: &str, bytes: &[u8]) {
        self.data.open_courselab("k-lab").await.unwrap();
        upload(&self.data, self.store.as_ref(), name, bytes).await;
    }

    pub(super) fn job(&self, output: &str) -> NewJob {
        job(output)
    }

    pub(super) fn output(&self, name: &str) -> String {
        std::fs::read_to_string(self.data.output_path("k-lab", name)).unwrap_or_default()
    }

    /// A job that brings its own cloud keys.
    pub(super) fn job_with_own_keys(&self, output: &str) -> NewJob {
        NewJob {
            credentials: Some(crate::model::CloudCredentials {
                access_key_id: "AKIDEXAMPLE".into(),
                secret_access_key: "secret".into(),
            }),
            ..self.job(output)
        }
    }

    /// Waits until the pool of image `img` holds a free VM.
    pub(super) async fn wait_free_vm(&self, engine: &Engine) {
        self.wait_free_vms(engine, 1).await;
    }

    /// Waits until the pool of image `img` holds `n` free VMs.
    pub(super) async fn wait_free_vms(&self, engine: &Engine, n: usize) {
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
    pub(super) async fn wait_copied_in(&self, engine: &Engine, id: u64) {
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

    pub(super) async fn wait_dead(&self, id: u64) -> Job {
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

    pub(super) async fn wait_callbacks(&self, n: usize) {
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
