//! tangod's HTTP application (`tango_server::app`) served in-process on a
//! real socket, with the real SQLite store, data dir and engine, over a
//! stand-in backend named `docker` that spreads its VMs over two hosts,
//! `alpha` and `beta`. The hosts' routes, metrics and dashboard are checked
//! against it where no fleet of Docker engines is at hand; the VMs
//! themselves are tango-core's in-memory `FakeVmms`.

use async_trait::async_trait;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tango_core::testing::FakeVmms;
use tango_core::{HostStatus, InputFile, Machine, RunOutcome, RunRequest, Vmms, VmmsError};

/// The image `FakeVmms` knows.
pub const IMAGE: &str = "img";

#[derive(Default)]
struct Placement {
    hosts: Vec<HostStatus>,
    /// VM name -> the host it was placed on.
    placed: HashMap<String, String>,
    /// VM name of each running job -> its host.
    running: HashMap<String, String>,
}

/// A backend of two hosts: a new VM goes to the first host that is not
/// drained and has room.
pub struct TwoHosts {
    vms: FakeVmms,
    state: Mutex<Placement>,
}

impl TwoHosts {
    pub fn new(max_vms: usize) -> TwoHosts {
        let host = |name: &str| HostStatus {
            name: name.to_string(),
            vmms: "docker".to_string(),
            url: format!("tcp://{name}.example.edu:2376"),
            up: true,
            draining: false,
            max_vms,
            vms: 0,
            running_jobs: 0,
            vm_starts: 0,
            vm_start_failures: 0,
        };
        TwoHosts {
            vms: FakeVmms::default(),
            state: Mutex::new(Placement {
                hosts: vec![host("alpha"), host("beta")],
                ..Placement::default()
            }),
        }
    }

    /// Marks a host down (as failed health checks would).
    pub fn set_up(&self, host: &str, up: bool) {
        let mut state = self.state.lock().unwrap();
        for h in state.hosts.iter_mut().filter(|h| h.name == host) {
            h.up = up;
        }
    }

    fn forget(&self, vm: &Machine) {
        let mut state = self.state.lock().unwrap();
        state.placed.remove(&vm.name);
        state.running.remove(&vm.name);
    }
}

#[async_trait]
impl Vmms for TwoHosts {
    fn name(&self) -> &'static str {
        "docker"
    }
    async fn initialize_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        let host = {
            let mut state = self.state.lock().unwrap();
            let Placement { hosts, placed, .. } = &mut *state;
            let chosen = hosts.iter_mut().find(|h| {
                h.up && !h.draining && placed.values().filter(|p| **p == h.name).count() < h.max_vms
            });
            let Some(host) = chosen else {
                return Err(VmmsError::Unavailable("no host takes VMs".into()));
            };
            host.vm_starts += 1;
            placed.insert(vm.name.clone(), host.name.clone());
            host.name.clone()
        };
        let made = self.vms.initialize_vm(vm).await;
        if made.is_err() {
            let mut state = self.state.lock().unwrap();
            state.placed.remove(&vm.name);
            for h in state.hosts.iter_mut().filter(|h| h.name == host) {
                h.vm_start_failures += 1;
            }
        }
        made
    }
    async fn wait_vm(&self, vm: &Machine, max: Duration) -> Result<(), VmmsError> {
        self.vms.wait_vm(vm, max).await
    }
    async fn copy_in(&self, vm: &Machine, files: &[InputFile]) -> Result<(), VmmsError> {
        self.vms.copy_in(vm, files).await
    }
    async fn run_job(&self, vm: &Machine, req: &RunRequest) -> Result<RunOutcome, VmmsError> {
        {
            let mut state = self.state.lock().unwrap();
            if let Some(host) = state.placed.get(&vm.name).cloned() {
                state.running.insert(vm.name.clone(), host);
            }
        }
        let outcome = self.vms.run_job(vm, req).await;
        self.state.lock().unwrap().running.remove(&vm.name);
        outcome
    }
    async fn copy_out(&self, vm: &Machine, dest: &Path) -> Result<(), VmmsError> {
        self.vms.copy_out(vm, dest).await
    }
    async fn destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.forget(vm);
        self.vms.destroy_vm(vm).await
    }
    async fn safe_destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.forget(vm);
        self.vms.safe_destroy_vm(vm).await
    }
    async fn get_vms(&self, prefix: &str) -> Result<Vec<Machine>, VmmsError> {
        self.vms.get_vms(prefix).await
    }
    async fn exists_vm(&self, vm: &Machine) -> Result<bool, VmmsError> {
        self.vms.exists_vm(vm).await
    }
    async fn get_images(&self) -> Result<Vec<String>, VmmsError> {
        self.vms.get_images().await
    }
    async fn partial_output(&self, vm: &Machine, max: usize) -> Result<Vec<u8>, VmmsError> {
        self.vms.partial_output(vm, max).await
    }
    fn hosts(&self) -> Vec<HostStatus> {
        let state = self.state.lock().unwrap();
        state
            .hosts
            .iter()
            .map(|h| HostStatus {
                vms: state.placed.values().filter(|p| **p == h.name).count(),
                running_jobs: state.running.values().filter(|p| **p == h.name).count(),
                ..h.clone()
            })
            .collect()
    }
    async fn set_host_draining(&self, host: &str, draining: bool) -> Result<(), VmmsError> {
        let mut state = self.state.lock().unwrap();
        let found = state.hosts.iter_mut().find(|h| h.name == host);
        let Some(found) = found else {
            return Err(VmmsError::NoSuchHost(host.to_string()));
        };
        found.draining = draining;
        Ok(())
    }
    fn host_of(&self, vm: &Machine) -> Option<String> {
        self.state.lock().unwrap().placed.get(&vm.name).cloned()
    }
}

/// The application on 127.0.0.1 until dropped.
pub struct HostsServer {
    pub url: String,
    pub backend: Arc<TwoHosts>,
    pub engine: Arc<tango_core::Engine>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl HostsServer {
    /// `max_vms` per host; the engine reuses no VM, so every job starts one.
    pub async fn start(max_vms: usize) -> HostsServer {
        let dir = tempfile::tempdir().unwrap();
        let data = Arc::new(tango_core::files::DataDir::open(dir.path().join("data")).unwrap());
        let store =
            Arc::new(tango_store::SqliteStore::open(&dir.path().join("tango.db"), false).unwrap());
        let backend = Arc::new(TwoHosts::new(max_vms));
        let config = tango_core::EngineConfig {
            default_vmms: "docker".into(),
            reuse_vms: false,
            ..tango_core::EngineConfig::default()
        };
        let callbacks = Arc::new(tango_server::callback::HttpCallbacks::new(None).unwrap());
        let engine = Arc::new(
            tango_core::Engine::start(config, store, data, vec![backend.clone()], callbacks)
                .await
                .unwrap(),
        );
        let state = tango_server::AppState {
            engine: engine.clone(),
            keys: Arc::new(vec![super::KEY.to_string()]),
            max_upload_bytes: 1 << 20,
            metrics_require_key: false,
            servers: None,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = tango_server::app(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        HostsServer {
            url,
            backend,
            engine,
            task,
            _dir: dir,
        }
    }

    pub fn client(&self) -> super::Client {
        super::Client {
            http: reqwest::Client::new(),
            url: self.url.clone(),
        }
    }
}

impl Drop for HostsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
