//! In-memory stand-ins for unit tests of the engine's logic: a store, a
//! VMMS whose behaviour a test scripts, and a callback recorder. Real
//! backends and the SQLite store have tests of their own against the real
//! thing.

use crate::engine::CallbackSender;
use crate::model::{parse_machine_name, InputFile, Job, JobId, JobState, Machine};
use crate::store::{OutboxEntry, ServerRecord, SharedStore, Store, StoreError};
use crate::vmms::{HostStatus, RunOutcome, RunRequest, RunStatus, Vmms, VmmsError};
use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Default)]
pub struct MemoryStore {
    job_seq: AtomicU64,
    vm_seq: AtomicU64,
    jobs: Mutex<BTreeMap<JobId, Job>>,
    files: Mutex<HashMap<(String, String), String>>,
    outbox: Mutex<BTreeMap<JobId, OutboxEntry>>,
    servers: Mutex<BTreeMap<u64, ServerRecord>>,
    server_seq: AtomicU64,
}

impl Store for MemoryStore {
    fn next_job_id(&self) -> Result<JobId, StoreError> {
        Ok(self.job_seq.fetch_add(1, Ordering::SeqCst) + 1)
    }
    fn next_vm_id(&self) -> Result<u64, StoreError> {
        Ok(self.vm_seq.fetch_add(1, Ordering::SeqCst) + 1)
    }
    fn save_job(&self, job: &Job) -> Result<(), StoreError> {
        self.jobs.lock().unwrap().insert(job.id, job.clone());
        Ok(())
    }
    fn finish_job(&self, job: &Job, callback: Option<&OutboxEntry>) -> Result<(), StoreError> {
        self.save_job(job)?;
        if let Some(entry) = callback {
            self.outbox_update(entry)?;
        }
        Ok(())
    }
    fn get_job(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        Ok(self.jobs.lock().unwrap().get(&id).cloned())
    }
    fn jobs_in_states(
        &self,
        states: &[JobState],
        limit: Option<usize>,
    ) -> Result<Vec<Job>, StoreError> {
        let jobs: Vec<Job> = self
            .jobs
            .lock()
            .unwrap()
            .values()
            .filter(|j| states.contains(&j.state))
            .cloned()
            .collect();
        let skip = limit.map(|l| jobs.len().saturating_sub(l)).unwrap_or(0);
        Ok(jobs.into_iter().skip(skip).collect())
    }
    fn set_file(&self, dir: &str, name: &str, md5: &str) -> Result<(), StoreError> {
        self.files
            .lock()
            .unwrap()
            .insert((dir.into(), name.into()), md5.into());
        Ok(())
    }
    fn file_md5(&self, dir: &str, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .files
            .lock()
            .unwrap()
            .get(&(dir.to_string(), name.to_string()))
            .cloned())
    }
    fn files(&self, dir: &str) -> Result<Vec<(String, String)>, StoreError> {
        Ok(self
            .files
            .lock()
            .unwrap()
            .iter()
            .filter(|((d, _), _)| d == dir)
            .map(|((_, n), m)| (n.clone(), m.clone()))
            .collect())
    }
    fn outbox_due(&self, now_ms: i64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        Ok(self
            .outbox
            .lock()
            .unwrap()
            .values()
            .filter(|e| e.next_attempt_ms <= now_ms)
            .take(limit)
            .cloned()
            .collect())
    }
    fn outbox_next_due(&self) -> Result<Option<i64>, StoreError> {
        Ok(self
            .outbox
            .lock()
            .unwrap()
            .values()
            .map(|e| e.next_attempt_ms)
            .min())
    }
    fn outbox_update(&self, entry: &OutboxEntry) -> Result<(), StoreError> {
        self.outbox
            .lock()
            .unwrap()
            .insert(entry.job_id, entry.clone());
        Ok(())
    }
    fn outbox_remove(&self, job_id: JobId) -> Result<(), StoreError> {
        self.outbox.lock().unwrap().remove(&job_id);
        Ok(())
    }
    fn outbox_len(&self) -> Result<usize, StoreError> {
        Ok(self.outbox.lock().unwrap().len())
    }
    fn register_server(
        &self,
        server: &ServerRecord,
    ) -> Result<(u64, Vec<ServerRecord>), StoreError> {
        let mut servers = self.servers.lock().unwrap();
        let others = servers.values().cloned().collect();
        let id = self.server_seq.fetch_add(1, Ordering::SeqCst) + 1;
        servers.insert(
            id,
            ServerRecord {
                id,
                ..server.clone()
            },
        );
        Ok((id, others))
    }
    fn heartbeat_server(&self, id: u64, now_ms: i64) -> Result<bool, StoreError> {
        Ok(self
            .servers
            .lock()
            .unwrap()
            .get_mut(&id)
            .map(|s| s.heartbeat_ms = now_ms)
            .is_some())
    }
    fn servers(&self) -> Result<Vec<ServerRecord>, StoreError> {
        Ok(self.servers.lock().unwrap().values().cloned().collect())
    }
    fn remove_server(&self, id: u64) -> Result<(), StoreError> {
        self.servers.lock().unwrap().remove(&id);
        Ok(())
    }
}

/// What the fake backend should do on its next calls.
#[derive(Default)]
pub struct Script {
    /// Errors returned by the next `initialize_vm` calls, in order.
    pub initialize_failures: VecDeque<String>,
    /// How long the next `initialize_vm` calls take, in order (then none).
    pub initialize_delays: VecDeque<Duration>,
    /// The next this many `initialize_vm` calls find the backend unreachable.
    pub unavailable_calls: u32,
    /// Statuses returned by the next `run_job` calls (default Completed).
    pub run_statuses: VecDeque<RunStatus>,
    /// How long `run_job` takes.
    pub run_delay: Duration,
    /// Makes `run_job` hang forever (to test the engine's timeouts).
    pub run_hangs: bool,
    /// `run_job` waits until this turns true (a benchmark holds every VM
    /// busy while it fills the queue, then lets them all go at once).
    pub run_gate: Option<tokio::sync::watch::Receiver<bool>>,
    /// The next this many `reset_vm` calls fail.
    pub reset_failures: u32,
    /// The next this many `safe_destroy_vm` calls fail (the VM stays).
    pub destroy_failures: u32,
}

/// A file name and its contents.
type NamedBytes = (String, Vec<u8>);

/// A VMMS that keeps VMs in memory. Its "job" prints the input files it was
/// given, with their contents, as the autodriver would print output.
#[derive(Default)]
pub struct FakeVmms {
    pub script: Mutex<Script>,
    pub vms: Mutex<BTreeMap<String, Machine>>,
    inputs: Mutex<HashMap<String, Vec<NamedBytes>>>,
    outputs: Mutex<HashMap<String, Vec<u8>>>,
    pub destroyed: Mutex<Vec<String>>,
    pub run_order: Mutex<Vec<u64>>,
    pub initialized: AtomicU64,
    /// Hosts to place VMs on (none: a backend of one machine). A new VM
    /// goes to the first host that is up and not draining.
    pub hosts: Mutex<Vec<HostStatus>>,
    placed: Mutex<HashMap<String, String>>,
}

impl FakeVmms {
    /// Adds a host that is up, takes VMs, and holds none.
    pub fn add_host(&self, name: &str) {
        self.hosts.lock().unwrap().push(HostStatus {
            name: name.into(),
            vmms: "fake".into(),
            url: format!("fake://{name}"),
            up: true,
            draining: false,
            max_vms: 8,
            vms: 0,
            running_jobs: 0,
            vm_starts: 0,
            vm_start_failures: 0,
        });
    }
}

#[async_trait]
impl Vmms for FakeVmms {
    fn name(&self) -> &'static str {
        "fake"
    }
    async fn initialize_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        let delay = self.script.lock().unwrap().initialize_delays.pop_front();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        {
            let mut script = self.script.lock().unwrap();
            if script.unavailable_calls > 0 {
                script.unavailable_calls -= 1;
                return Err(VmmsError::Unavailable("daemon down".into()));
            }
            if let Some(err) = script.initialize_failures.pop_front() {
                return Err(VmmsError::Backend(err));
            }
        }
        let host = self
            .hosts
            .lock()
            .unwrap()
            .iter()
            .find(|h| h.up && !h.draining)
            .map(|h| h.name.clone());
        if let Some(host) = host {
            self.placed.lock().unwrap().insert(vm.name.clone(), host);
        } else if !self.hosts.lock().unwrap().is_empty() {
            return Err(VmmsError::Unavailable("no host takes VMs".into()));
        }
        self.initialized.fetch_add(1, Ordering::SeqCst);
        self.vms.lock().unwrap().insert(vm.name.clone(), vm.clone());
        Ok(())
    }
    async fn wait_vm(&self, vm: &Machine, _max: Duration) -> Result<(), VmmsError> {
        if self.vms.lock().unwrap().contains_key(&vm.name) {
            Ok(())
        } else {
            Err(VmmsError::NoSuchVm(vm.name.clone()))
        }
    }
    async fn copy_in(&self, vm: &Machine, files: &[InputFile]) -> Result<(), VmmsError> {
        let mut copied = Vec::new();
        for f in files {
            let bytes = std::fs::read(&f.path).map_err(|e| VmmsError::io("read input", e))?;
            copied.push((f.dest_file.clone(), bytes));
        }
        self.inputs.lock().unwrap().insert(vm.name.clone(), copied);
        Ok(())
    }
    async fn run_job(&self, vm: &Machine, req: &RunRequest) -> Result<RunOutcome, VmmsError> {
        let (status, delay, hangs, gate) = {
            let mut s = self.script.lock().unwrap();
            (
                s.run_statuses.pop_front().unwrap_or(RunStatus::Completed),
                s.run_delay,
                s.run_hangs,
                s.run_gate.clone(),
            )
        };
        self.run_order.lock().unwrap().push(req.job_id);
        if hangs {
            std::future::pending::<()>().await;
        }
        if let Some(mut gate) = gate {
            // A dropped sender opens the gate too: nothing could open it later.
            let _ = gate.wait_for(|open| *open).await;
        }
        tokio::time::sleep(delay).await;
        let mut out = match status {
            RunStatus::TimedOut => format!(
                "Autodriver: Job timed out after {} seconds\n",
                req.timeout_secs
            ),
            _ => "Autodriver: Job exited with status 0\n".to_string(),
        }
        .into_bytes();
        for (name, bytes) in self
            .inputs
            .lock()
            .unwrap()
            .get(&vm.name)
            .cloned()
            .unwrap_or_default()
        {
            out.extend_from_slice(format!("{name}: ").as_bytes());
            out.extend_from_slice(&bytes);
            out.push(b'\n');
        }
        self.outputs.lock().unwrap().insert(vm.name.clone(), out);
        Ok(RunOutcome {
            status,
            exit_code: Some(match status {
                RunStatus::Completed => 0,
                RunStatus::UsageError => 1,
                RunStatus::TimedOut => 2,
                RunStatus::OsError => 3,
            }),
            summary: None,
            notes: vec![],
        })
    }
    async fn copy_out(&self, vm: &Machine, dest: &Path) -> Result<(), VmmsError> {
        let out = self
            .outputs
            .lock()
            .unwrap()
            .get(&vm.name)
            .cloned()
            .ok_or_else(|| VmmsError::Backend("no output".into()))?;
        std::fs::write(dest, out).map_err(|e| VmmsError::io("write output", e))
    }
    async fn destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.vms.lock().unwrap().remove(&vm.name);
        self.destroyed.lock().unwrap().push(vm.name.clone());
        Ok(())
    }
    async fn safe_destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        {
            let mut script = self.script.lock().unwrap();
            if script.destroy_failures > 0 {
                script.destroy_failures -= 1;
                return Err(VmmsError::Backend("scripted destroy failure".into()));
            }
        }
        self.destroy_vm(vm).await
    }
    async fn reset_vm(&self, _vm: &Machine) -> Result<(), VmmsError> {
        let mut script = self.script.lock().unwrap();
        if script.reset_failures > 0 {
            script.reset_failures -= 1;
            return Err(VmmsError::Backend("scripted reset failure".into()));
        }
        Ok(())
    }
    async fn get_vms(&self, prefix: &str) -> Result<Vec<Machine>, VmmsError> {
        Ok(self
            .vms
            .lock()
            .unwrap()
            .values()
            .filter(|vm| parse_machine_name(prefix, &vm.name).is_some())
            // As on a cloud: VMs in a job's own account are not listed with
            // the server's keys.
            .filter(|vm| vm.credentials.is_none())
            .cloned()
            .collect())
    }
    async fn exists_vm(&self, vm: &Machine) -> Result<bool, VmmsError> {
        Ok(self.vms.lock().unwrap().contains_key(&vm.name))
    }
    async fn get_images(&self) -> Result<Vec<String>, VmmsError> {
        Ok(vec!["img".into(), "other".into()])
    }
    async fn partial_output(&self, _vm: &Machine, _max: usize) -> Result<Vec<u8>, VmmsError> {
        Ok(b"partial".to_vec())
    }
    fn hosts(&self) -> Vec<HostStatus> {
        self.hosts.lock().unwrap().clone()
    }
    async fn set_host_draining(&self, host: &str, draining: bool) -> Result<(), VmmsError> {
        let mut hosts = self.hosts.lock().unwrap();
        let host = hosts
            .iter_mut()
            .find(|h| h.name == host)
            .ok_or_else(|| VmmsError::NoSuchHost(host.to_string()))?;
        host.draining = draining;
        Ok(())
    }
    fn host_of(&self, vm: &Machine) -> Option<String> {
        self.placed.lock().unwrap().get(&vm.name).cloned()
    }
}

/// Records callbacks; fails the first `fail_first` deliveries.
#[derive(Default)]
pub struct RecordingCallbacks {
    pub fail_first: AtomicU64,
    pub attempts: AtomicU64,
    pub delivered: Mutex<Vec<(String, String, Vec<u8>)>>,
    pub notify: tokio::sync::Notify,
}

#[async_trait]
impl CallbackSender for RecordingCallbacks {
    async fn send(&self, url: &str, output_file: &str, body: Vec<u8>) -> Result<(), String> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        let left = self.fail_first.load(Ordering::SeqCst);
        if left > 0 {
            self.fail_first.store(left - 1, Ordering::SeqCst);
            return Err("scripted failure".into());
        }
        self.delivered
            .lock()
            .unwrap()
            .push((url.into(), output_file.into(), body));
        self.notify.notify_waiters();
        Ok(())
    }
}

/// A [`MemoryStore`] as several servers share one ([`SharedStore`]): the
/// same rules of ownership as the PostgreSQL store, in memory, for unit
/// tests of the engine's cluster logic (the PostgreSQL store's own suite
/// checks the real one).
#[derive(Default)]
pub struct SharedMemoryStore {
    pub base: MemoryStore,
    courselabs: Mutex<std::collections::HashSet<String>>,
    blobs: Mutex<HashMap<String, Vec<u8>>>,
    outputs: Mutex<HashMap<(String, String), Vec<u8>>>,
    bodies: Mutex<HashMap<JobId, Vec<u8>>>,
    retired: Mutex<std::collections::HashSet<u64>>,
    jobs_signal: std::sync::Arc<tokio::sync::Notify>,
    outbox_signal: std::sync::Arc<tokio::sync::Notify>,
}

impl SharedMemoryStore {
    /// Every server waiting, as PostgreSQL notifies every listener.
    fn wake_servers(&self) {
        self.jobs_signal.notify_waiters();
        self.jobs_signal.notify_one();
    }

    fn owner_of(&self, id: JobId) -> Option<Option<u64>> {
        self.base.jobs.lock().unwrap().get(&id).map(|j| j.owner)
    }
}

impl Store for SharedMemoryStore {
    fn next_job_id(&self) -> Result<JobId, StoreError> {
        self.base.next_job_id()
    }
    fn next_vm_id(&self) -> Result<u64, StoreError> {
        self.base.next_vm_id()
    }
    fn save_job(&self, job: &Job) -> Result<(), StoreError> {
        let mut jobs = self.base.jobs.lock().unwrap();
        if let Some(stored) = jobs.get(&job.id) {
            if stored.owner != job.owner {
                return Err(StoreError(format!(
                    "job {} belongs to another server now",
                    job.id
                )));
            }
        }
        jobs.insert(job.id, job.clone());
        if job.state == JobState::Queued && job.owner.is_none() {
            self.wake_servers();
        }
        Ok(())
    }
    fn finish_job(&self, job: &Job, callback: Option<&OutboxEntry>) -> Result<(), StoreError> {
        self.save_job(job)?;
        if let Some(entry) = callback {
            self.base.outbox_update(entry)?;
        }
        Ok(())
    }
    fn get_job(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        self.base.get_job(id)
    }
    fn jobs_in_states(
        &self,
        states: &[JobState],
        limit: Option<usize>,
    ) -> Result<Vec<Job>, StoreError> {
        self.base.jobs_in_states(states, limit)
    }
    fn set_file(&self, dir: &str, name: &str, md5: &str) -> Result<(), StoreError> {
        self.base.set_file(dir, name, md5)
    }
    fn file_md5(&self, dir: &str, name: &str) -> Result<Option<String>, StoreError> {
        self.base.file_md5(dir, name)
    }
    fn files(&self, dir: &str) -> Result<Vec<(String, String)>, StoreError> {
        self.base.files(dir)
    }
    fn outbox_due(&self, now_ms: i64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        self.base.outbox_due(now_ms, limit)
    }
    fn outbox_next_due(&self) -> Result<Option<i64>, StoreError> {
        self.base.outbox_next_due()
    }
    fn outbox_update(&self, entry: &OutboxEntry) -> Result<(), StoreError> {
        self.base.outbox_update(entry)
    }
    fn outbox_remove(&self, job_id: JobId) -> Result<(), StoreError> {
        self.bodies.lock().unwrap().remove(&job_id);
        self.base.outbox_remove(job_id)
    }
    fn outbox_len(&self) -> Result<usize, StoreError> {
        self.base.outbox_len()
    }
    fn register_server(
        &self,
        server: &ServerRecord,
    ) -> Result<(u64, Vec<ServerRecord>), StoreError> {
        self.base.register_server(server)
    }
    fn heartbeat_server(&self, id: u64, now_ms: i64) -> Result<bool, StoreError> {
        if self.retired.lock().unwrap().contains(&id) {
            return Ok(false);
        }
        self.base.heartbeat_server(id, now_ms)
    }
    fn servers(&self) -> Result<Vec<ServerRecord>, StoreError> {
        self.base.servers()
    }
    fn remove_server(&self, id: u64) -> Result<(), StoreError> {
        self.base.remove_server(id)
    }
    fn shared(&self) -> Option<&dyn SharedStore> {
        Some(self)
    }
}

impl SharedStore for SharedMemoryStore {
    fn open_courselab(&self, dir: &str) -> Result<bool, StoreError> {
        Ok(self.courselabs.lock().unwrap().insert(dir.to_string()))
    }
    fn courselab_exists(&self, dir: &str) -> Result<bool, StoreError> {
        Ok(self.courselabs.lock().unwrap().contains(dir))
    }
    fn put_blob(&self, md5: &str, path: &Path) -> Result<(), StoreError> {
        let bytes = std::fs::read(path).map_err(|e| StoreError(e.to_string()))?;
        self.blobs.lock().unwrap().insert(md5.to_string(), bytes);
        Ok(())
    }
    fn fetch_blob(&self, md5: &str, dest: &Path) -> Result<bool, StoreError> {
        let Some(bytes) = self.blobs.lock().unwrap().get(md5).cloned() else {
            return Ok(false);
        };
        std::fs::write(dest, bytes).map_err(|e| StoreError(e.to_string()))?;
        Ok(true)
    }
    fn claim_jobs(&self, owner: u64, limit: usize) -> Result<Vec<Job>, StoreError> {
        if self.retired.lock().unwrap().contains(&owner) {
            return Ok(Vec::new());
        }
        let mut jobs = self.base.jobs.lock().unwrap();
        let mut turns: HashMap<(String, String), usize> = HashMap::new();
        let mut order: Vec<(usize, JobId)> = jobs
            .values()
            .filter(|j| j.state == JobState::Queued && j.owner.is_none())
            .map(|j| {
                let turn = turns
                    .entry((j.courselab_dir.clone(), j.submitter.clone()))
                    .or_default();
                *turn += 1;
                (*turn, j.id)
            })
            .collect();
        order.sort_unstable();
        Ok(order
            .into_iter()
            .take(limit)
            .filter_map(|(_, id)| {
                let job = jobs.get_mut(&id)?;
                job.owner = Some(owner);
                Some(job.clone())
            })
            .collect())
    }
    fn release_job(&self, job: &Job, from: u64) -> Result<bool, StoreError> {
        if self.owner_of(job.id) != Some(Some(from)) {
            return Ok(false);
        }
        let released = Job {
            owner: None,
            ..job.clone()
        };
        self.base.jobs.lock().unwrap().insert(job.id, released);
        self.wake_servers();
        Ok(true)
    }
    fn orphaned_jobs(&self) -> Result<Vec<Job>, StoreError> {
        let alive: std::collections::HashSet<u64> = self
            .base
            .servers
            .lock()
            .unwrap()
            .keys()
            .copied()
            .filter(|id| !self.retired.lock().unwrap().contains(id))
            .collect();
        Ok(self
            .base
            .jobs
            .lock()
            .unwrap()
            .values()
            .filter(|j| j.state.is_live())
            .filter(|j| j.owner.is_some_and(|o| !alive.contains(&o)))
            .cloned()
            .collect())
    }
    fn retire_server(&self, id: u64, _now_ms: i64) -> Result<bool, StoreError> {
        Ok(self.retired.lock().unwrap().insert(id))
    }
    fn finish_owned(
        &self,
        job: &Job,
        owner: u64,
        output: &crate::store::SharedOutput,
        callback: Option<&OutboxEntry>,
    ) -> Result<bool, StoreError> {
        let mut jobs = self.base.jobs.lock().unwrap();
        let mine = jobs
            .get(&job.id)
            .is_some_and(|j| j.owner == Some(owner) && j.state.is_live());
        if !mine {
            return Ok(false);
        }
        jobs.insert(
            job.id,
            Job {
                owner: None,
                ..job.clone()
            },
        );
        drop(jobs);
        self.outputs.lock().unwrap().insert(
            (output.courselab_dir.clone(), output.output_file.clone()),
            output.content.clone(),
        );
        if let Some(entry) = callback {
            self.base.outbox_update(entry)?;
            self.bodies
                .lock()
                .unwrap()
                .insert(job.id, output.content.clone());
            self.outbox_signal.notify_one();
        }
        Ok(true)
    }
    fn output(&self, dir: &str, output_file: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .outputs
            .lock()
            .unwrap()
            .get(&(dir.to_string(), output_file.to_string()))
            .cloned())
    }
    fn callback_body(&self, job_id: JobId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.bodies.lock().unwrap().get(&job_id).cloned())
    }
    fn queued_count(&self) -> Result<usize, StoreError> {
        Ok(self.base.jobs_in_states(&[JobState::Queued], None)?.len())
    }
    fn queued_of(&self, dir: &str, submitter: &str) -> Result<usize, StoreError> {
        Ok(self
            .base
            .jobs_in_states(&[JobState::Queued], None)?
            .iter()
            .filter(|j| j.courselab_dir == dir && j.submitter == submitter)
            .count())
    }
    fn jobs_signal(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.jobs_signal.clone()
    }
    fn outbox_signal(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.outbox_signal.clone()
    }
}
