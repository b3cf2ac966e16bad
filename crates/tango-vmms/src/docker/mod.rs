//! The `docker` backend: each VM is a container driven through the Docker
//! Engine API (bollard), never the `docker` CLI.
//!
//! A container runs the autodriver's `--idle --serve` mode as PID 1, which
//! runs each job asked for over the container's attach stream (see
//! `served.rs`; without [`DockerConfig::serve_jobs`], a `docker exec` per
//! job); the backend
//! adds the autodriver to each job image once (a derived image,
//! `tango-autodriver:<image id>-<autodriver hash>`, made by an archive
//! upload and a commit), so images need neither the autodriver nor a
//! grading user, and creating a container costs no upload. Files go in as
//! a tar: up to `jobs::STDIN_INPUT_MAX_BYTES` through the job's stdin (the
//! autodriver's `--input-tar -`), so a job costs no archive call (dockerd
//! runs a helper process for each, ~50 ms); larger inputs by an archive
//! upload. The job's output comes over the same stream, written
//! to a file under [`DockerConfig::work_dir`] on the host:
//! no host directory is shared with containers, so `tangod` can itself run
//! in a container with only the Docker socket mounted.
//!
//! Inside a container, everything of the backend lives in `/.tango` (mode
//! 0700, root): the autodriver, every copy-in (each in a fresh directory,
//! so nothing of an earlier job can leak into a later one), the summaries
//! and the live output streams.
//!
//! One concern per file, each with its own unit tests: this file holds the
//! settings ([`DockerConfig`]), the connection ([`Docker::connect`]), what
//! is remembered of each container, the Engine API's errors and archive
//! reads and writes, and the [`Vmms`] methods, each a call into one of:
//! `containers.rs` (creating and starting containers with their limits,
//! their network per job, their cgroups: OOM kills and CPU weight;
//! waiting for, checking, listing and removing them), `jobs.rs` (copy-in,
//! running a job served or by exec, its output), `images.rs` (derived
//! images, grading users, the image list, `/build`), `served.rs` (the
//! served-job protocol), `archive.rs` (tars) and `naming.rs` (container
//! names and labels).

mod archive;
mod containers;
pub mod fleet;
mod images;
mod jobs;
mod naming;
mod served;

pub use fleet::{DockerFleet, DockerHost, FleetConfig};
pub use naming::container_name;

// For fuzz/ (docker_tar target): the reading of archives the Engine API returns.
#[doc(hidden)]
pub use archive::first_file;

use async_trait::async_trait;
use bollard::errors::Error as ApiError;
use bollard::query_parameters::{
    DownloadFromContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use bytes::Bytes;
use containers::HostCgroup;
use futures_util::TryStreamExt;
use images::fnv1a;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tango_core::model::{InputFile, Machine};
use tango_core::vmms::{RunOutcome, RunRequest, Vmms, VmmsError};

/// The backend's directory inside every container (relative form for tar).
const DRIVER_DIR_REL: &str = ".tango";
const AUTODRIVER_PATH: &str = "/.tango/autodriver";
/// The autodriver's `--summary` and `--stream` files. The autodriver
/// creates (truncates) both when it starts; a copy-in by archive upload
/// also empties them in the same upload. Until the job's exec has started
/// `partial_output` reports nothing, and the summary is read only when the
/// autodriver says it ran the job, so nothing of an earlier job is reported.
const SUMMARY_PATH: &str = "/.tango/summary.json";
const STREAM_PATH: &str = "/.tango/stream";
/// The autodriver's list of the image's writable directories, made when
/// the container starts and read by every job's cleanup.
const WRITABLE_DIRS_PATH: &str = "/.tango/writable-dirs";
/// Repository of the images derived from job images with the autodriver
/// added (see `Docker::derived_image`); hidden from `get_images`.
pub const DERIVED_REPO: &str = "tango-autodriver";
/// The job directory's name: jobs run in `<grading home>/autolab`, as under
/// Tango.
const JOB_DIR_NAME: &str = "autolab";

/// Settings of the docker backend.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// Host path of the static autodriver binary; the backend copies it into
    /// every container.
    pub autodriver: PathBuf,
    /// Host directory for the captured output of each container's job.
    pub work_dir: PathBuf,
    /// Memory limit of a container unless its pool says otherwise; swap is
    /// limited to the same amount, i.e. none.
    pub default_memory_mb: u64,
    /// CPUs of a container unless its pool says otherwise; `None`: no limit.
    pub default_cores: Option<f64>,
    /// Process limit of a whole container.
    pub default_max_pids: i64,
    /// `false`: every container has `network_mode none`. `true`: containers
    /// are on the default bridge, and jobs with `disable_network` have it
    /// disconnected while they run.
    pub allow_network: bool,
    /// The grading user when the image's `/etc/passwd` has it (Tango's
    /// images have `autograde`).
    pub grading_user: String,
    /// `UID:GID` the job runs as when the image lacks `grading_user`.
    pub fallback_user: String,
    /// Bound on each Engine API request (to its response headers).
    pub api_timeout: Duration,
    /// Read the autodriver's `--summary` after each job into
    /// [`RunOutcome::summary`]. Off by default: it costs one archive
    /// download per job (Docker 20.10 runs a helper process for every
    /// archive call; 10-50 ms here) and the engine does not use it. The
    /// OOM note does not depend on it.
    pub read_summary: bool,
    /// Give every container private tmpfs mounts on `/home` (half the
    /// memory limit), `/tmp` and `/var/tmp` (an eighth each). What a job writes
    /// there is charged to the container's memory, so it cannot fill the
    /// host's disk (overlay2 has no size limit without xfs quotas). The
    /// image's own `/home` content is hidden (the autodriver empties the
    /// grading user's home after every job anyway).
    pub scratch_tmpfs: bool,
    /// A job that has run this long gets a tenth of the default CPU shares,
    /// so that short jobs beside endless loops and fork bombs keep their
    /// latency (shares only matter under contention); its container's next
    /// job starts at the default again. With `host_cgroups`, every job also
    /// gets ten times the default for its first 50 ms, so that a burst of
    /// new jobs does not hold up the short ones. `None`: neither.
    pub cpu_background_after: Option<Duration>,
    /// Every container runs one job and is then removed (the engine's
    /// `reuse_vms = false`). Then no list of the image's writable
    /// directories is made (a container start walks the whole image for
    /// it, 20-30 ms of CPU) and jobs do not purge them afterwards, as no
    /// later job sees the container; a second job in a container is
    /// refused. Default `false`.
    pub single_use: bool,
    /// Read and write the containers' cgroups on this host, where the
    /// daemon's are visible (OOM kills counted, CPU weights set without a
    /// round trip to the daemon); `false`: only through the Engine API.
    pub host_cgroups: bool,
    /// Jobs are run by the container's PID 1 over an attach stream (see
    /// `served.rs`) instead of one `docker exec` each, which spares every
    /// job tens of ms of daemon and runc work. `false`: an exec per job.
    pub serve_jobs: bool,
    /// Containers created and started at once; more wait. A start is
    /// 100-200 ms of CPU in dockerd, containerd and runc, outside every
    /// container's cgroup, where no CPU weight of the jobs' reaches it: a
    /// burst of submissions starting containers all at once slows the
    /// jobs already running. Default: half the host's CPUs (at least 1).
    pub max_concurrent_starts: usize,
    /// The engine to drive; `None`: the one `DOCKER_HOST` names, by default
    /// the local socket.
    pub host: Option<DockerHost>,
}

impl DockerConfig {
    /// The defaults: 1024 MiB, no CPU limit, 256 processes, no network,
    /// user `autograde` or else `1000:1000`, 30 s per API request, no
    /// summary, tmpfs scratch directories, CPU shares lowered after 1 s.
    pub fn new(autodriver: PathBuf, work_dir: PathBuf) -> Self {
        DockerConfig {
            autodriver,
            work_dir,
            default_memory_mb: 1024,
            default_cores: None,
            default_max_pids: 256,
            allow_network: false,
            grading_user: "autograde".into(),
            fallback_user: "1000:1000".into(),
            api_timeout: Duration::from_secs(30),
            read_summary: false,
            scratch_tmpfs: true,
            cpu_background_after: Some(Duration::from_secs(1)),
            single_use: false,
            host_cgroups: true,
            serve_jobs: true,
            max_concurrent_starts: default_concurrent_starts(),
            host: None,
        }
    }
}

/// Half the CPUs this process may use, rounded up.
fn default_concurrent_starts() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().div_ceil(2))
        .unwrap_or(1)
}

/// What the backend remembers of a container between trait calls.
#[derive(Debug, Default)]
struct VmState {
    /// This instance created the container (and has not removed it): a
    /// copy-in may then skip the daemon. Others get the upload, which
    /// fails when the container does not exist.
    created_here: bool,
    /// Copy-ins so far; each gets a fresh directory.
    copy_ins: u64,
    /// Job directory (in the container) of the last copy-in not yet run.
    pending_job_dir: Option<String>,
    /// The input files of that copy-in as a tar, to be sent through the
    /// exec's stdin; `None` when they were uploaded into the directory.
    pending_input: Option<Bytes>,
    /// The current job's stream file, once its autodriver has been asked
    /// to start: what `partial_output` reads.
    stream: Option<String>,
    /// Jobs sent to the serving PID 1: each has a stream file of its own,
    /// so that none is read while it still holds an earlier job's output.
    served_jobs: u64,
    /// The container was seen running after the last job (by the OOM
    /// check), so `reset_vm` need not ask again.
    running_after_job: bool,
    /// The container's cgroups, when they can be seen from here.
    cgroup: HostCgroup,
    /// Host file with the output of the last run.
    output: Option<PathBuf>,
    /// The attach connection to the container's serving PID 1, between jobs.
    attached: Option<served::Attached>,
    /// The nonce of a served job whose end was not read (its `run_job` was
    /// cut short): the next job first skips the rest of its output.
    unfinished_nonce: Option<String>,
    /// A job has been started in the container (by this instance).
    ran_a_job: bool,
    /// The container's CPU shares may have been lowered (set before the
    /// request is sent, so a lowering cut short counts too): the next job
    /// restores them.
    cpu_lowered: Arc<AtomicBool>,
}

/// The docker VMMS. One instance serves every container of the server.
pub struct Docker {
    api: bollard::Docker,
    config: DockerConfig,
    /// The tar that installs the autodriver, built once.
    autodriver_tar: Bytes,
    /// Bounds the containers being created and started at once
    /// ([`DockerConfig::max_concurrent_starts`]).
    starts: tokio::sync::Semaphore,
    /// Hash of the autodriver binary, part of the derived images' tags.
    autodriver_hash: String,
    /// Serialises making derived images (rare, and racing makes no sense).
    deriving: tokio::sync::Mutex<()>,
    vms: Mutex<HashMap<String, VmState>>,
    /// `--user` value per image, from the image's `/etc/passwd`.
    users: Mutex<HashMap<String, String>>,
}

fn status_code(error: &ApiError) -> Option<u16> {
    match error {
        ApiError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn is_not_found(error: &ApiError) -> bool {
    status_code(error) == Some(404)
}

/// The daemon itself cannot be reached (stopped, restarting, socket gone),
/// as opposed to a request it refused.
fn is_unreachable(error: &ApiError) -> bool {
    use std::io::ErrorKind;
    match error {
        ApiError::SocketNotFoundError(_) => true,
        ApiError::HyperLegacyError { err } => err.is_connect(),
        ApiError::IOError { err } => matches!(
            err.kind(),
            ErrorKind::ConnectionRefused | ErrorKind::NotFound | ErrorKind::ConnectionReset
        ),
        _ => false,
    }
}

fn api_error(context: impl std::fmt::Display, error: ApiError) -> VmmsError {
    if is_unreachable(&error) {
        // The engine waits for the daemon instead of spending retries.
        return VmmsError::Unavailable(format!("docker: {context}: {error}"));
    }
    VmmsError::Backend(format!("docker: {context}: {error}"))
}

/// Maps a 404 on a container to [`VmmsError::NoSuchVm`].
fn vm_error(vm: &str, context: &str, error: ApiError) -> VmmsError {
    if is_not_found(&error) {
        VmmsError::NoSuchVm(vm.to_string())
    } else {
        api_error(format_args!("{context} {vm}"), error)
    }
}
impl Docker {
    /// Connects to the daemon named by `DOCKER_HOST` (`unix://` or `tcp://`),
    /// by default `/var/run/docker.sock`, and agrees on an API version with
    /// it. Fails clearly when the daemon cannot be reached.
    pub async fn connect(config: DockerConfig) -> Result<Docker, VmmsError> {
        let binary = tokio::fs::read(&config.autodriver).await.map_err(|e| {
            VmmsError::io(
                format!("cannot read the autodriver {}", config.autodriver.display()),
                e,
            )
        })?;
        if !binary.starts_with(b"\x7fELF") {
            return Err(VmmsError::Backend(format!(
                "{} is not an executable (ELF) file",
                config.autodriver.display()
            )));
        }
        let autodriver_tar = archive::autodriver_tar(DRIVER_DIR_REL, "autodriver", &binary)
            .map_err(|e| VmmsError::io("cannot pack the autodriver", e))?;
        tokio::fs::create_dir_all(&config.work_dir)
            .await
            .map_err(|e| {
                VmmsError::io(format!("cannot create {}", config.work_dir.display()), e)
            })?;

        let host = match &config.host {
            Some(host) => host.display_url(),
            None => std::env::var("DOCKER_HOST")
                .unwrap_or_else(|_| "unix:///var/run/docker.sock".to_string()),
        };
        let api = fleet::connect_api(config.host.as_ref(), config.api_timeout)
            .map_err(|e| {
                VmmsError::Backend(format!("cannot reach the Docker daemon at {host}: {e}"))
            })?
            .with_timeout(config.api_timeout);
        let api = match tokio::time::timeout(config.api_timeout, api.negotiate_version()).await {
            Ok(Ok(api)) => api,
            Ok(Err(e)) => {
                return Err(VmmsError::Backend(format!(
                    "cannot reach the Docker daemon at {host}: {e}"
                )))
            }
            Err(_) => {
                return Err(VmmsError::Backend(format!(
                    "the Docker daemon at {host} did not answer within {:?}",
                    config.api_timeout
                )))
            }
        };
        Ok(Docker {
            api,
            starts: tokio::sync::Semaphore::new(config.max_concurrent_starts.max(1)),
            config,
            autodriver_tar: Bytes::from(autodriver_tar),
            autodriver_hash: format!("{:016x}", fnv1a(&binary)),
            deriving: tokio::sync::Mutex::new(()),
            vms: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
        })
    }

    /// The bollard client, for callers that need more of the Engine API.
    pub fn api(&self) -> &bollard::Docker {
        &self.api
    }

    fn with_state<T>(&self, name: &str, f: impl FnOnce(&mut VmState) -> T) -> T {
        let mut vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
        f(vms.entry(name.to_string()).or_default())
    }

    fn forget(&self, name: &str) -> Option<VmState> {
        self.vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }

    fn memory_mb(&self, vm: &Machine) -> u64 {
        vm.memory_mb.unwrap_or(self.config.default_memory_mb)
    }

    /// The whole body of an archive download, bounded in time.
    async fn download(&self, container: &str, path: &str) -> Result<Vec<u8>, ApiError> {
        let options = DownloadFromContainerOptionsBuilder::default()
            .path(path)
            .build();
        let collect = self
            .api
            .download_from_container(container, Some(options))
            .try_fold(Vec::new(), |mut all, chunk| async move {
                all.extend_from_slice(&chunk);
                Ok(all)
            });
        tokio::time::timeout(self.config.api_timeout, collect)
            .await
            .unwrap_or(Err(ApiError::RequestTimeoutError))
    }

    /// One file of a container, at most `max` bytes; `None` if it does not
    /// exist.
    async fn read_file(
        &self,
        container: &str,
        path: &str,
        max: usize,
    ) -> Result<Option<Vec<u8>>, VmmsError> {
        match self.download(container, path).await {
            Ok(tar) => archive::first_file(&tar, max)
                .map_err(|e| VmmsError::io(format!("bad archive of {path} from {container}"), e)),
            // The same status says the container is gone.
            Err(ApiError::DockerResponseServerError {
                status_code: 404,
                message,
            }) if message.contains("No such container") => {
                Err(VmmsError::NoSuchVm(container.to_string()))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(api_error(
                format_args!("cannot read {path} of {container}"),
                e,
            )),
        }
    }

    async fn upload(&self, container: &str, tar: Bytes) -> Result<(), ApiError> {
        let options = UploadToContainerOptionsBuilder::default().path("/").build();
        self.api
            .upload_to_container(container, Some(options), bollard::body_full(tar))
            .await
    }
}

#[async_trait]
impl Vmms for Docker {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn initialize_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.create_vm(vm).await
    }

    async fn wait_vm(&self, vm: &Machine, max: Duration) -> Result<(), VmmsError> {
        self.wait_running(vm, max).await
    }

    async fn copy_in(&self, vm: &Machine, files: &[InputFile]) -> Result<(), VmmsError> {
        self.copy_inputs(vm, files).await
    }

    async fn run_job(&self, vm: &Machine, req: &RunRequest) -> Result<RunOutcome, VmmsError> {
        self.run(vm, req).await
    }

    async fn copy_out(&self, vm: &Machine, dest: &Path) -> Result<(), VmmsError> {
        self.copy_output(vm, dest).await
    }

    async fn destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.remove(&container_name(vm)).await
    }

    async fn safe_destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.remove_confirmed_gone(vm).await
    }

    async fn get_vms(&self, prefix: &str) -> Result<Vec<Machine>, VmmsError> {
        self.list_vms(prefix).await
    }

    async fn exists_vm(&self, vm: &Machine) -> Result<bool, VmmsError> {
        self.container_exists(vm).await
    }

    async fn get_images(&self) -> Result<Vec<String>, VmmsError> {
        self.list_images().await
    }

    async fn partial_output(&self, vm: &Machine, max_bytes: usize) -> Result<Vec<u8>, VmmsError> {
        self.read_partial_output(vm, max_bytes).await
    }

    async fn reset_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.check_reusable(vm).await
    }

    async fn build_image(&self, name: &str, tar: &Path) -> Result<(), VmmsError> {
        self.load_image(name, tar).await
    }
}
