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
//! a tar: up to [`STDIN_INPUT_MAX_BYTES`] through the job's stdin (the
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

mod archive;
pub mod fleet;
mod naming;
mod served;

pub use fleet::{DockerFleet, DockerHost, FleetConfig};
pub use naming::container_name;

// For fuzz/ (docker_tar target): the reading of archives the Engine API returns.
#[doc(hidden)]
pub use archive::first_file;

use crate::cgroupfs::{self, CpuPriority};
use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::errors::Error as ApiError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{
    ContainerConfig, ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum,
    ContainerUpdateBody, HostConfig, HostConfigCgroupnsModeEnum, HostConfigLogConfig,
    NetworkConnectRequest, NetworkDisconnectRequest,
};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CommitContainerOptionsBuilder, CreateContainerOptionsBuilder,
    DownloadFromContainerOptionsBuilder, EventsOptionsBuilder, ImportImageOptionsBuilder,
    ListContainersOptionsBuilder, ListImagesOptionsBuilder, RemoveContainerOptionsBuilder,
    TagImageOptionsBuilder, UploadToContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tango_core::model::{InputFile, Machine};
use tango_core::vmms::{RunOutcome, RunRequest, RunStatus, Vmms, VmmsError};
use tokio::io::AsyncWriteExt;

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
/// Writable directories given private tmpfs mounts (path, mode, size in
/// eighths of the memory limit). Together they stay below the limit: a job
/// that fills them gets ENOSPC, not a memory cgroup thrashing for seconds
/// over tmpfs pages it cannot reclaim before the OOM killer acts.
const SCRATCH_DIRS: [(&str, &str, u64); 3] = [
    ("/home", "755", 4),
    ("/tmp", "1777", 1),
    ("/var/tmp", "1777", 1),
];
/// Linux capabilities the autodriver needs as root in the container: switch
/// to the grading user, hand it the job's files, remove what it leaves
/// anywhere, kill what it leaves running. Everything else is dropped.
const AUTODRIVER_CAPS: [&str; 8] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETUID",
    "SETGID",
];
/// How long past the job's own time limit the backend waits for the
/// autodriver to report (it kills the job at the limit, then cleans up).
const RUN_GRACE: Duration = Duration::from_secs(60);
/// Loading a large `docker save` tar can take a while.
const IMAGE_LOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Bytes of autodriver output kept on the host beyond the job's output cap
/// (its header line and its own error messages).
const OUTPUT_SLACK: u64 = 1 << 20;
/// Input files up to this size (as a tar) are kept in memory at copy-in and
/// sent through the stdin of the job's exec (`--input-tar -`): no archive
/// upload, for which dockerd runs a helper process (~50 ms). Larger inputs
/// are uploaded, streamed from their files.
const STDIN_INPUT_MAX_BYTES: u64 = 8 << 20;
/// Tar header name field: longer names would need an extension header,
/// which the autodriver's tar reader refuses.
const STDIN_INPUT_MAX_NAME: usize = 99;
/// CPU shares of a container whose job has run longer than
/// [`DockerConfig::cpu_background_after`]: a tenth of the default, as the
/// sandbox does (cgroup v1 `cpu.shares`; Docker converts it for v2).
const BACKGROUND_CPU_SHARES: i64 = 102;
/// The default CPU shares, restored when a reused container's next job
/// starts. (Containers are created without a value, which means the same.)
const NORMAL_CPU_SHARES: i64 = 1024;
/// How long a job's container keeps ten times the default CPU weight (when
/// its cgroup is writable here; see `Docker::cpu_priority_by_age`).
const FRESH_CPU_FOR: Duration = Duration::from_millis(50);

/// Aborts a background task when the job it watches ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

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

/// A container's cgroups as seen on this host. Read and written there, they
/// save Engine API round trips: the OOM-kill counter (which the kernel
/// counts before the victim dies, so unlike Docker's `oom` event it is never
/// late) and the CPU weight (set three times per job).
#[derive(Debug, Default)]
enum HostCgroup {
    /// Not looked for yet.
    #[default]
    Unknown,
    /// The daemon's cgroups are not visible here (a remote daemon, tangod in
    /// a container of its own): Docker's events and API instead.
    Unavailable,
    Found {
        cgroup: cgroupfs::ForeignCgroup,
        /// The OOM-kill count when the current job started, if known.
        oom_kills_at_start: Option<u64>,
    },
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

async fn set_cpu_shares(api: &bollard::Docker, name: &str, shares: i64) -> Result<(), ApiError> {
    let update = ContainerUpdateBody {
        cpu_shares: Some(shares),
        ..Default::default()
    };
    api.update_container(name, update).await
}

fn unix_seconds(at: SystemTime) -> String {
    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    format!(
        "{}.{:09}",
        since_epoch.as_secs(),
        since_epoch.subsec_nanos()
    )
}

/// The cgroups of a running container, when the daemon runs on this host
/// and tangod sees its processes and cgroups.
fn container_cgroup(inspect: &ContainerInspectResponse) -> Option<cgroupfs::ForeignCgroup> {
    let id = inspect.id.as_deref().filter(|id| id.len() >= 12)?;
    let pid = inspect.state.as_ref()?.pid.filter(|&pid| pid > 0)?;
    let proc_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    cgroupfs::ForeignCgroup::find(&proc_cgroup, Path::new("/sys/fs/cgroup"), id)
}

/// Appends to the job's output file what fits below `cap` bytes in all.
async fn write_capped(
    output: &mut tokio::fs::File,
    bytes: &[u8],
    cap: u64,
    written: &mut u64,
) -> Result<(), VmmsError> {
    let room = cap.saturating_sub(*written).min(bytes.len() as u64) as usize;
    if room > 0 {
        output
            .write_all(&bytes[..room])
            .await
            .map_err(|e| VmmsError::io("cannot write the job's output", e))?;
        *written += room as u64;
    }
    Ok(())
}

/// FNV-1a, 64 bits: a stable fingerprint of the autodriver binary.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The user line for `name` in a passwd file's text.
fn passwd_has_user(passwd: &str, name: &str) -> bool {
    passwd
        .lines()
        .any(|line| line.split(':').next() == Some(name))
}

/// The image a `docker load` reported, from its progress messages.
fn loaded_image(message: &str) -> Option<&str> {
    let message = message.trim();
    message
        .strip_prefix("Loaded image: ")
        .or_else(|| message.strip_prefix("Loaded image ID: "))
        .map(str::trim)
        .filter(|image| !image.is_empty())
}

/// Tango's image names: the repository for `latest`, `repo:tag` otherwise.
fn image_names(repo_tags: &[String]) -> Vec<String> {
    let mut names = BTreeSet::new();
    for tag in repo_tags {
        if tag == "<none>:<none>" || tag.starts_with(&format!("{DERIVED_REPO}:")) {
            continue;
        }
        match tag.rsplit_once(':') {
            Some((repo, "latest")) => {
                names.insert(repo.to_string());
            }
            _ => {
                names.insert(tag.clone());
            }
        }
    }
    names.into_iter().collect()
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

    /// Removes the derived images (see the module doc) made for another
    /// autodriver build that no container uses, e.g. at server start after
    /// an upgrade; returns how many went. Another server on the same daemon
    /// with another autodriver copes: it re-derives, or uploads.
    pub async fn remove_stale_derived_images(&self) -> Result<usize, VmmsError> {
        let filters = HashMap::from([("reference", vec![DERIVED_REPO.to_string()])]);
        let options = ListImagesOptionsBuilder::default()
            .filters(&filters)
            .build();
        let images = self
            .api
            .list_images(Some(options))
            .await
            .map_err(|e| api_error("cannot list images", e))?;
        let current = format!("-{}", self.autodriver_hash);
        let mut removed = 0;
        for tag in images.into_iter().flat_map(|i| i.repo_tags) {
            let ours = tag.starts_with(&format!("{DERIVED_REPO}:"));
            if ours && !tag.ends_with(&current) && self.remove_unused_image(&tag).await {
                removed += 1;
            }
        }
        Ok(removed)
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

    /// The `--user` of jobs on `image`: the grading user if the image has
    /// it, else the numeric fallback. Read once per image from a container.
    async fn grading_user(&self, container: &str, image: &str) -> Result<String, VmmsError> {
        if let Some(user) = self
            .users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(image)
        {
            return Ok(user.clone());
        }
        let passwd = self.read_file(container, "/etc/passwd", 4 << 20).await?;
        let has_user = passwd
            .map(|bytes| {
                passwd_has_user(&String::from_utf8_lossy(&bytes), &self.config.grading_user)
            })
            .unwrap_or(false);
        let user = if has_user {
            self.config.grading_user.clone()
        } else {
            self.config.fallback_user.clone()
        };
        self.users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(image.to_string(), user.clone());
        Ok(user)
    }

    /// The image `image` with the autodriver in it, made once per base
    /// image and autodriver (tagged `DERIVED_REPO:<base id>-<autodriver>`),
    /// so creating a container needs no archive upload (Docker runs a helper
    /// process for each). A rebuilt base image gets a new ID, hence a new
    /// derived image.
    async fn derived_image(&self, image: &str) -> Result<String, VmmsError> {
        let base = match self.api.inspect_image(image).await {
            Ok(base) => base,
            Err(e) if is_not_found(&e) => return Err(VmmsError::NoSuchImage(image.to_string())),
            Err(e) => return Err(api_error(format_args!("cannot inspect image {image}"), e)),
        };
        let base_id = base
            .id
            .ok_or_else(|| VmmsError::Backend(format!("image {image} has no ID")))?;
        let short_id: String = base_id
            .trim_start_matches("sha256:")
            .chars()
            .take(16)
            .collect();
        let tag = format!("{short_id}-{}", self.autodriver_hash);
        let derived = format!("{DERIVED_REPO}:{tag}");
        let exists = |api: &bollard::Docker| {
            let derived = derived.clone();
            let api = api.clone();
            async move { api.inspect_image(&derived).await.is_ok() }
        };
        if exists(&self.api).await {
            return Ok(derived);
        }
        let _making = self.deriving.lock().await;
        if exists(&self.api).await {
            return Ok(derived);
        }
        let body = ContainerCreateBody {
            image: Some(base_id.clone()),
            entrypoint: Some(vec![AUTODRIVER_PATH.into(), "--idle".into()]),
            cmd: Some(vec![]),
            labels: Some(HashMap::from([(
                naming::LABEL_DERIVED.to_string(),
                self.autodriver_hash.clone(),
            )])),
            host_config: Some(HostConfig {
                network_mode: Some("none".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let scratch = self
            .api
            .create_container(
                None::<bollard::query_parameters::CreateContainerOptions>,
                body,
            )
            .await
            .map_err(|e| api_error(format_args!("cannot derive an image from {image}"), e))?
            .id;
        let made = async {
            self.upload(&scratch, self.autodriver_tar.clone())
                .await
                .map_err(|e| api_error("cannot put the autodriver into an image", e))?;
            let options = CommitContainerOptionsBuilder::default()
                .container(&scratch)
                .repo(DERIVED_REPO)
                .tag(&tag)
                .pause(false)
                .build();
            self.api
                .commit_container(options, ContainerConfig::default())
                .await
                .map_err(|e| api_error(format_args!("cannot commit {derived}"), e))
        }
        .await;
        let _ = self.remove(&scratch).await;
        made.map(|_| derived)
    }

    /// Removes the derived images of base image `base_id` that no container
    /// uses (so a replaced job image's layers can be freed).
    async fn remove_derived_images(&self, base_id: &str) {
        let short_id: String = base_id
            .trim_start_matches("sha256:")
            .chars()
            .take(16)
            .collect();
        let filters = HashMap::from([("reference", vec![DERIVED_REPO.to_string()])]);
        let options = ListImagesOptionsBuilder::default()
            .filters(&filters)
            .build();
        let Ok(images) = self.api.list_images(Some(options)).await else {
            return;
        };
        for tag in images.into_iter().flat_map(|i| i.repo_tags) {
            if tag.starts_with(&format!("{DERIVED_REPO}:{short_id}-")) {
                self.remove_unused_image(&tag).await;
            }
        }
    }

    /// Removes an image tag; true when it was removed. Fails while a
    /// container uses the image, which is fine: it goes on a later pass.
    async fn remove_unused_image(&self, tag: &str) -> bool {
        self.api
            .remove_image(
                tag,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await
            .is_ok()
    }

    async fn create_and_start(
        &self,
        vm: &Machine,
        name: &str,
        needs_autodriver: bool,
    ) -> Result<(), VmmsError> {
        if needs_autodriver {
            self.upload(name, self.autodriver_tar.clone())
                .await
                .map_err(|e| api_error(format_args!("cannot put the autodriver into {name}"), e))?;
        }
        self.grading_user(name, &vm.image).await?;
        self.api
            .start_container(name, None)
            .await
            .map_err(|e| api_error(format_args!("cannot start {name}"), e))
    }

    /// With networking allowed, a job without network runs disconnected
    /// from every network; a job with network gets the default bridge back.
    async fn apply_network(&self, name: &str, disable: bool) -> Result<(), VmmsError> {
        if !self.config.allow_network {
            return Ok(()); // network_mode none since creation
        }
        let inspect = self
            .api
            .inspect_container(name, None)
            .await
            .map_err(|e| vm_error(name, "cannot inspect", e))?;
        let networks: Vec<String> = inspect
            .network_settings
            .and_then(|s| s.networks)
            .map(|n| n.into_keys().collect())
            .unwrap_or_default();
        if disable {
            for network in networks {
                let request = NetworkDisconnectRequest {
                    container: name.to_string(),
                    force: Some(true),
                };
                self.api
                    .disconnect_network(&network, request)
                    .await
                    .map_err(|e| {
                        api_error(format_args!("cannot disconnect {name} from {network}"), e)
                    })?;
            }
        } else if networks.is_empty() {
            let request = NetworkConnectRequest {
                container: name.to_string(),
                endpoint_config: None,
            };
            self.api
                .connect_network("bridge", request)
                .await
                .map_err(|e| api_error(format_args!("cannot connect {name} to bridge"), e))?;
        }
        Ok(())
    }

    /// Whether the memory limit killed something in the container since
    /// `since`: Docker's `oom` events of this container, or the OOMKilled
    /// flag of a container that died. (Not the autodriver's `killed_by`:
    /// where it cannot find its cgroup it counts OOM kills host-wide.)
    async fn oom_killed(&self, name: &str, since: SystemTime) -> bool {
        let inspect = tokio::time::timeout(
            self.config.api_timeout,
            self.api.inspect_container(name, None),
        )
        .await;
        let state = match &inspect {
            Ok(Ok(inspect)) => inspect.state.as_ref(),
            _ => None,
        };
        let running = state.and_then(|s| s.running) == Some(true);
        self.with_state(name, |state| state.running_after_job = running);
        // Some Docker versions keep OOMKilled set for the rest of a
        // container's life once anything in it was killed: trust the flag
        // only when the container itself died, i.e. during this job.
        let died_of_oom = state.is_some_and(|s| !running && s.oom_killed == Some(true));
        if died_of_oom {
            return true;
        }
        let counted = match &inspect {
            Ok(Ok(inspect)) => self.oom_kills_during_job(name, inspect),
            _ => None,
        };
        match counted {
            Some(killed) => killed,
            None => self.oom_event_since(name, since).await,
        }
    }

    /// Looks for the cgroups of a running container, once. `fresh`: this
    /// instance created it and no job has run there, so its OOM-kill count
    /// so far is 0.
    fn find_cgroup(&self, name: &str, inspect: &ContainerInspectResponse, fresh: bool) {
        if !self.with_state(name, |state| matches!(state.cgroup, HostCgroup::Unknown)) {
            return;
        }
        let found = container_cgroup(inspect).filter(|_| self.config.host_cgroups);
        self.with_state(name, |state| {
            state.cgroup = match found {
                // Of a container found running, the count so far is not
                // known to be this job's.
                Some(cgroup) => HostCgroup::Found {
                    oom_kills_at_start: fresh.then_some(0),
                    cgroup,
                },
                None => HostCgroup::Unavailable,
            }
        });
    }

    /// Whether the container's OOM-kill counter rose since the job started;
    /// `None` when it cannot be read here.
    fn oom_kills_during_job(&self, name: &str, inspect: &ContainerInspectResponse) -> Option<bool> {
        let fresh = self.with_state(name, |state| state.created_here);
        self.find_cgroup(name, inspect, fresh);
        self.oom_counter_rose(name)
    }

    /// Whether the OOM-kill counter of the container's cgroup (already
    /// found) rose since the job started; `None` when that is not known
    /// (nothing is changed then, so a second look answers the same).
    fn oom_counter_rose(&self, name: &str) -> Option<bool> {
        self.with_state(name, |state| match &mut state.cgroup {
            HostCgroup::Found {
                cgroup,
                oom_kills_at_start: Some(at_start),
            } => {
                let now = cgroupfs::read_oom_kills(&cgroup.oom_counter)?;
                Some(now > std::mem::replace(at_start, now))
            }
            _ => None,
        })
    }

    /// Records the container's OOM-kill count as the job starts (so that
    /// kills during the set-up since the last job are not blamed on it) and
    /// gives it the fresh job's CPU weight; the cgroup, when found.
    fn start_job_in_cgroup(&self, name: &str) -> Option<cgroupfs::ForeignCgroup> {
        self.with_state(name, |state| match &mut state.cgroup {
            HostCgroup::Found {
                cgroup,
                oom_kills_at_start,
            } => {
                *oom_kills_at_start = cgroupfs::read_oom_kills(&cgroup.oom_counter);
                Some(cgroup.clone())
            }
            _ => None,
        })
    }

    /// A long job yields contended CPU to short ones: its container's CPU
    /// weight is ten times the default for the job's first
    /// [`FRESH_CPU_FOR`] (so that a burst of new jobs does not hold up the
    /// short ones), the default until `cpu_background_after`, then a tenth
    /// of it. Written to the cgroup directly: no round trip to the daemon.
    fn cpu_priority_by_age(
        &self,
        name: &str,
        cgroup: &cgroupfs::ForeignCgroup,
    ) -> Option<AbortOnDrop> {
        let after = self.config.cpu_background_after?;
        let set = |cgroup: &cgroupfs::ForeignCgroup, name: &str, priority| {
            if let Err(e) = cgroup.set_cpu_priority(priority) {
                tracing::debug!("docker: cannot set the CPU weight of {name}: {e}");
            }
        };
        set(cgroup, name, CpuPriority::Fresh);
        let (cgroup, name) = (cgroup.clone(), name.to_string());
        Some(AbortOnDrop(tokio::spawn(async move {
            let fresh_for = FRESH_CPU_FOR.min(after);
            tokio::time::sleep(fresh_for).await;
            set(&cgroup, &name, CpuPriority::Normal);
            tokio::time::sleep(after - fresh_for).await;
            set(&cgroup, &name, CpuPriority::Background);
        })))
    }

    /// [`Self::cpu_priority_by_age`] through the Engine API, for a daemon
    /// whose cgroups are not visible here: only the lowering after
    /// `cpu_background_after`, since each change is a round trip.
    async fn lower_cpu_shares_by_api(&self, name: &str) -> Result<Option<AbortOnDrop>, VmmsError> {
        // A reused container starts every job at the default weight.
        let cpu_lowered = self.with_state(name, |state| state.cpu_lowered.clone());
        if cpu_lowered.swap(false, Ordering::SeqCst) {
            set_cpu_shares(&self.api, name, NORMAL_CPU_SHARES)
                .await
                .map_err(|e| vm_error(name, "cannot restore the CPU shares of", e))?;
        }
        Ok(self.config.cpu_background_after.map(|after| {
            let (api, name) = (self.api.clone(), name.to_string());
            AbortOnDrop(tokio::spawn(async move {
                tokio::time::sleep(after).await;
                cpu_lowered.store(true, Ordering::SeqCst);
                if let Err(e) = set_cpu_shares(&api, &name, BACKGROUND_CPU_SHARES).await {
                    tracing::debug!("docker: cannot lower the CPU shares of {name}: {e}");
                }
            }))
        }))
    }

    /// Runs the job's autodriver by a `docker exec` (without `serve_jobs`):
    /// its exit code, and whether the memory limit killed something.
    async fn run_by_exec(
        &self,
        name: &str,
        cmd: Vec<String>,
        input: Option<Bytes>,
        output: &mut tokio::fs::File,
        req: &RunRequest,
    ) -> Result<(Result<Option<i32>, VmmsError>, bool), VmmsError> {
        let exec = self
            .api
            .create_exec(
                name,
                CreateExecOptions {
                    attach_stdin: Some(input.is_some()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(cmd),
                    user: Some("0:0".to_string()),
                    working_dir: Some("/".to_string()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| vm_error(name, "cannot create the job's exec in", e))?;
        let started_at = SystemTime::now();
        let attached = self
            .api
            .start_exec(&exec.id, None)
            .await
            .map_err(|e| vm_error(name, "cannot start the job in", e))?;
        let StartExecResults::Attached {
            output: mut stream,
            input: mut stdin,
        } = attached
        else {
            return Err(VmmsError::Backend("docker: the exec did not attach".into()));
        };
        self.with_state(name, |state| state.stream = Some(STREAM_PATH.to_string()));
        // The input files go in while the output is read. A failed write
        // needs no handling here: the autodriver then reports a bad archive.
        let feed = async {
            if let Some(tar) = input {
                if stdin.write_all(&tar).await.is_ok() {
                    let _ = stdin.shutdown().await;
                }
            }
        };

        // The autodriver caps the job's output itself; the host file is
        // capped too in case something else floods the stream.
        let cap = req.output_cap_bytes.saturating_add(OUTPUT_SLACK);
        let copy = async {
            let mut written: u64 = 0;
            while let Some(chunk) = stream.next().await {
                let chunk =
                    chunk.map_err(|e| api_error(format_args!("job output of {name}"), e))?;
                let bytes = match chunk {
                    LogOutput::StdOut { message } | LogOutput::StdErr { message } => message,
                    _ => continue,
                };
                write_capped(output, &bytes, cap, &mut written).await?;
            }
            output
                .flush()
                .await
                .map_err(|e| VmmsError::io("cannot write the job's output", e))
        };
        let copy = async { futures_util::join!(feed, copy).1 };
        let bound =
            (req.timeout_secs > 0).then(|| Duration::from_secs(req.timeout_secs) + RUN_GRACE);
        match bound {
            Some(bound) => tokio::time::timeout(bound, copy).await.map_err(|_| {
                VmmsError::Backend(format!(
                    "the autodriver in {name} did not finish within {bound:?}"
                ))
            })??,
            None => copy.await?,
        }

        // The stream ends when the process exits; its exit code can lag
        // behind by a moment.
        let exit_code = async {
            let mut exit_code = None;
            for _ in 0..100 {
                let inspect = self.api.inspect_exec(&exec.id).await.map_err(|e| {
                    api_error(format_args!("cannot inspect the job's exec in {name}"), e)
                })?;
                if inspect.running != Some(true) {
                    exit_code = inspect.exit_code.and_then(|c| i32::try_from(c).ok());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, VmmsError>(exit_code)
        };
        // The OOM check does not depend on the exit code: both at once.
        let (exit_code, oom_killed) =
            futures_util::join!(exit_code, self.oom_killed(name, started_at));
        Ok((exit_code, oom_killed))
    }

    /// Runs the job through the container's serving PID 1 (`serve_jobs`):
    /// its exit code. The attach connection is kept for the next job only
    /// when this one's end was read.
    async fn run_served(
        &self,
        name: &str,
        args: &[String],
        input: Option<Bytes>,
        output: &mut tokio::fs::File,
        req: &RunRequest,
    ) -> Result<Option<i32>, VmmsError> {
        let (attached, unfinished) = self.with_state(name, |state| {
            (state.attached.take(), state.unfinished_nonce.take())
        });
        let mut attached = match attached {
            Some(attached) => attached,
            None => self.attach(name).await?,
        };
        let nonce = served::nonce().map_err(|e| VmmsError::io("cannot make a nonce", e))?;
        let input = input.unwrap_or_default();
        let request = served::request(&nonce, args, input.len());
        self.with_state(name, |state| {
            // Until the end is read; a job cut short leaves it for the next.
            state.unfinished_nonce = Some(nonce.clone());
        });
        let served::Attached {
            output: stream,
            input: stdin,
        } = &mut attached;
        let feed = async {
            stdin.write_all(&request).await?;
            stdin.write_all(&input).await?;
            stdin.flush().await
        };
        // The autodriver caps the job's output itself; the host file is
        // capped too in case something else floods the stream.
        let cap = req.output_cap_bytes.saturating_add(OUTPUT_SLACK);
        let copy = async {
            let mut skip = unfinished.map(|n| served::EndScanner::new(&n));
            let mut scanner = served::EndScanner::new(&nonce);
            let mut written: u64 = 0;
            while let Some(chunk) = stream.next().await {
                let chunk =
                    chunk.map_err(|e| api_error(format_args!("job output of {name}"), e))?;
                let mut bytes = match chunk {
                    LogOutput::StdOut { message } | LogOutput::StdErr { message } => {
                        message.to_vec()
                    }
                    _ => continue,
                };
                if let Some(previous) = &mut skip {
                    // The rest of an earlier job's output.
                    match previous.feed(&bytes) {
                        served::Scanned::Output(_) => continue,
                        served::Scanned::End(_, _, rest) => {
                            skip = None;
                            bytes = rest;
                        }
                    }
                }
                let (kept, end) = match scanner.feed(&bytes) {
                    served::Scanned::Output(kept) => (kept, None),
                    served::Scanned::End(kept, code, _) => (kept, Some(code)),
                };
                write_capped(output, &kept, cap, &mut written).await?;
                if let Some(code) = end {
                    output
                        .flush()
                        .await
                        .map_err(|e| VmmsError::io("cannot write the job's output", e))?;
                    return Ok(code);
                }
            }
            Err(VmmsError::Backend(format!(
                "the autodriver serving {name} stopped before the job ended (did the container stop?)"
            )))
        };
        let both = async {
            let (fed, copied) = futures_util::join!(feed, copy);
            match (fed, copied) {
                (_, Ok(code)) => Ok(code),
                (Err(e), Err(_)) => Err(VmmsError::io(format!("cannot send the job to {name}"), e)),
                (Ok(()), Err(e)) => Err(e),
            }
        };
        let bound =
            (req.timeout_secs > 0).then(|| Duration::from_secs(req.timeout_secs) + RUN_GRACE);
        let code = match bound {
            Some(bound) => tokio::time::timeout(bound, both).await.map_err(|_| {
                VmmsError::Backend(format!(
                    "the autodriver in {name} did not finish within {bound:?}"
                ))
            })??,
            None => both.await?,
        };
        self.with_state(name, |state| {
            state.unfinished_nonce = None;
            state.attached = Some(attached);
        });
        Ok(code)
    }

    async fn attach(&self, name: &str) -> Result<served::Attached, VmmsError> {
        let options = AttachContainerOptionsBuilder::default()
            .stream(true)
            .stdin(true)
            .stdout(true)
            .stderr(true)
            .logs(false)
            .build();
        let attached = tokio::time::timeout(
            self.config.api_timeout,
            self.api.attach_container(name, Some(options)),
        )
        .await
        .map_err(|_| VmmsError::Backend(format!("docker: attaching to {name} timed out")))?
        .map_err(|e| vm_error(name, "cannot attach to", e))?;
        Ok(served::Attached {
            output: attached.output,
            input: attached.input,
        })
    }

    /// Docker's `oom` events of this container since `since`.
    async fn oom_event_since(&self, name: &str, since: SystemTime) -> bool {
        let filters = HashMap::from([
            ("container", vec![name]),
            ("type", vec!["container"]),
            ("event", vec!["oom"]),
        ]);
        let options = EventsOptionsBuilder::default()
            .since(&unix_seconds(since))
            .until(&unix_seconds(SystemTime::now()))
            .filters(&filters)
            .build();
        let events = self.api.events(Some(options)).try_collect::<Vec<_>>();
        let Ok(Ok(events)) = tokio::time::timeout(self.config.api_timeout, events).await else {
            return false;
        };
        // Docker matches the container filter by name prefix: keep only
        // events of this very container.
        events.iter().any(|event| {
            event
                .actor
                .as_ref()
                .and_then(|actor| actor.attributes.as_ref())
                .and_then(|attributes| attributes.get("name"))
                .is_some_and(|n| n == name)
        })
    }

    async fn remove(&self, name: &str) -> Result<(), VmmsError> {
        self.remove_confirmed(name).await.map(|_| ())
    }

    /// [`Self::remove`], saying whether the container is known to be gone:
    /// `false` when Docker reported a removal already in progress.
    async fn remove_confirmed(&self, name: &str) -> Result<bool, VmmsError> {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        let removed = self.api.remove_container(name, Some(options)).await;
        if let Some(state) = self.forget(name) {
            if let Some(output) = state.output {
                let _ = tokio::fs::remove_file(output).await;
            }
        }
        match removed {
            // A forced removal answers once the container is gone.
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(true),
            // 409: a removal is already in progress.
            Err(e) if status_code(&e) == Some(409) => Ok(false),
            Err(e) => Err(api_error(format_args!("cannot remove {name}"), e)),
        }
    }
}

#[async_trait]
impl Vmms for Docker {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn initialize_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        let name = container_name(vm);
        let prefix = naming::machine_prefix(vm).ok_or_else(|| {
            VmmsError::Backend(format!(
                "VM name {:?} does not follow <prefix>-<id>-<image>",
                vm.name
            ))
        })?;
        let memory_bytes = i64::try_from(self.memory_mb(vm).saturating_mul(1 << 20))
            .map_err(|_| VmmsError::Backend("memory limit too large".into()))?;
        let cores = vm.cores.map(f64::from).or(self.config.default_cores);
        let host_config = HostConfig {
            memory: Some(memory_bytes),
            memory_swap: Some(memory_bytes),
            nano_cpus: cores.map(|c| (c * 1e9) as i64),
            pids_limit: Some(self.config.default_max_pids),
            network_mode: Some(
                if self.config.allow_network {
                    "bridge"
                } else {
                    "none"
                }
                .into(),
            ),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            tmpfs: self.config.scratch_tmpfs.then(|| {
                let memory_mb = self.memory_mb(vm);
                SCRATCH_DIRS
                    .iter()
                    .map(|(path, mode, eighths)| {
                        let size = (memory_mb * eighths / 8).max(1);
                        let options = format!("rw,exec,nosuid,nodev,size={size}m,mode={mode}");
                        (path.to_string(), options)
                    })
                    .collect()
            }),
            // The container's own cgroup appears as its root (Docker's
            // default on cgroup v2 only), so the autodriver reads its own
            // counters and the job learns nothing of the host's layout.
            cgroupns_mode: Some(HostConfigCgroupnsModeEnum::PRIVATE),
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: Some(AUTODRIVER_CAPS.iter().map(|c| c.to_string()).collect()),
            // PID 1 prints nothing and job output is attached, not logged.
            log_config: Some(HostConfigLogConfig {
                typ: Some("none".into()),
                config: None,
            }),
            init: Some(false),
            ..Default::default()
        };
        // Normally from the derived image with the autodriver in it; if that
        // cannot be made, the autodriver is uploaded into each container.
        let mut derived = match self.derived_image(&vm.image).await {
            Ok(derived) => Some(derived),
            Err(e @ VmmsError::NoSuchImage(_)) => return Err(e),
            Err(e) => {
                tracing::warn!("docker: {e}; uploading the autodriver into {name} instead");
                None
            }
        };
        let mut entrypoint = vec![AUTODRIVER_PATH.to_string(), "--idle".to_string()];
        if self.config.serve_jobs {
            entrypoint.push("--serve".into());
        }
        if !self.config.allow_network {
            // Created with `NetworkDisabled`, so that Docker sets up no
            // network sandbox (no `libnetwork-setkey` hook nor `set-ipv6`:
            // two runs of the dockerd binary, ~80 ms of CPU per container
            // here); the loopback is still up (runc), but Docker then leaves
            // /etc/hosts empty (its init layer hides the image's), and
            // `localhost` must resolve. PID 1 writes it: an archive upload
            // would cost another run of the dockerd binary.
            entrypoint.push("--loopback-hosts".into());
        }
        if !self.config.single_use {
            // The list the reused container's jobs purge, made at start.
            entrypoint.extend(["--purge-writable".into(), WRITABLE_DIRS_PATH.into()]);
        }
        let mut body = ContainerCreateBody {
            image: Some(derived.clone().unwrap_or_else(|| vm.image.clone())),
            entrypoint: Some(entrypoint),
            cmd: Some(vec![]),
            // The attach stream of `serve_jobs`; the stdin stays open when
            // a connection closes.
            open_stdin: Some(self.config.serve_jobs),
            attach_stdin: Some(self.config.serve_jobs),
            stdin_once: Some(false),
            user: Some("0:0".into()),
            working_dir: Some("/".into()),
            labels: Some(naming::labels(vm, prefix)),
            // No network sandbox at all (see --loopback-hosts); with networking
            // allowed, the bridge is connected and disconnected per job.
            network_disabled: Some(!self.config.allow_network),
            host_config: Some(host_config),
            ..Default::default()
        };
        // Container starts are work of dockerd, containerd and runc, in no
        // container's cgroup: a burst of them takes the CPU from the jobs
        // already running (see `max_concurrent_starts`).
        let _start_permit = self
            .starts
            .acquire()
            .await
            .map_err(|_| VmmsError::Backend("the docker backend is shutting down".into()))?;
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        let mut created = self
            .api
            .create_container(Some(options.clone()), body.clone())
            .await;
        if created.as_ref().err().and_then(status_code) == Some(409) {
            // A container of that name is left from before (e.g. a crash):
            // the VM starts afresh, as on every backend.
            self.remove(&name).await?;
            created = self.api.create_container(Some(options), body.clone()).await;
        }
        if derived.is_some() && created.as_ref().err().and_then(status_code) == Some(404) {
            // The derived image was removed meanwhile (another server
            // rebuilt the job image): fall back to uploading the autodriver.
            derived = None;
            body.image = Some(vm.image.clone());
            let options = CreateContainerOptionsBuilder::default().name(&name).build();
            created = self.api.create_container(Some(options), body).await;
        }
        if let Err(e) = created {
            return Err(match status_code(&e) {
                Some(404) => VmmsError::NoSuchImage(vm.image.clone()),
                _ => api_error(format_args!("cannot create {name}"), e),
            });
        }
        self.forget(&name);
        if let Err(e) = self.create_and_start(vm, &name, derived.is_none()).await {
            // A half-made container must not be left behind.
            let _ = self.remove(&name).await;
            return Err(e);
        }
        self.with_state(&name, |state| state.created_here = true);
        Ok(())
    }

    async fn wait_vm(&self, vm: &Machine, max: Duration) -> Result<(), VmmsError> {
        let name = container_name(vm);
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let inspect = self
                .api
                .inspect_container(&name, None)
                .await
                .map_err(|e| vm_error(&name, "cannot inspect", e))?;
            let state = inspect.state.clone().unwrap_or_default();
            match state.status {
                Some(ContainerStateStatusEnum::RUNNING) if state.running == Some(true) => {
                    let fresh = self.with_state(&name, |s| s.created_here && !s.ran_a_job);
                    self.find_cgroup(&name, &inspect, fresh);
                    return Ok(());
                }
                Some(
                    ContainerStateStatusEnum::CREATED
                    | ContainerStateStatusEnum::RESTARTING
                    | ContainerStateStatusEnum::RUNNING,
                ) => {}
                other => {
                    return Err(VmmsError::Backend(format!(
                        "container {name} is not running ({other:?}, exit code {:?})",
                        state.exit_code
                    )))
                }
            }
            // Docker has no event for "started" on an already created
            // container that start_container did not report: poll briefly.
            if tokio::time::Instant::now() >= deadline {
                return Err(VmmsError::Backend(format!(
                    "container {name} did not start within {max:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn copy_in(&self, vm: &Machine, files: &[InputFile]) -> Result<(), VmmsError> {
        let name = container_name(vm);
        let (number, created_here) = self.with_state(&name, |state| {
            state.copy_ins += 1;
            (state.copy_ins, state.created_here)
        });
        let dir = format!("{DRIVER_DIR_REL}/jobs/{number}/{JOB_DIR_NAME}");
        let pairs: Vec<(String, PathBuf)> = files
            .iter()
            .map(|f| (f.dest_file.clone(), f.path.clone()))
            .collect();
        if let Some(bad) = pairs
            .iter()
            .find(|(name, _)| !archive::is_plain_file_name(name))
        {
            return Err(VmmsError::Backend(format!(
                "input file name {:?} is not a plain file name",
                bad.0
            )));
        }
        self.with_state(&name, |state| {
            state.pending_job_dir = None;
            state.pending_input = None;
            state.stream = None;
        });
        // Small inputs wait in memory for the exec (see STDIN_INPUT_MAX_BYTES).
        let mut total: u64 = 0;
        for (_, path) in &pairs {
            let meta = tokio::fs::metadata(path)
                .await
                .map_err(|e| VmmsError::io(format!("cannot read {}", path.display()), e))?;
            total = total.saturating_add(meta.len());
        }
        let short_names = pairs
            .iter()
            .all(|(name, _)| name.len() <= STDIN_INPUT_MAX_NAME);
        if created_here && short_names && total <= STDIN_INPUT_MAX_BYTES {
            let files = pairs.clone();
            let packed = tokio::task::spawn_blocking(move || {
                let files = files
                    .iter()
                    .map(|(name, path)| (name.as_str(), path.as_path()));
                archive::stdin_inputs_tar(files, STDIN_INPUT_MAX_BYTES)
            })
            .await
            .map_err(|e| VmmsError::Backend(format!("packing the input files failed: {e}")))?;
            match packed {
                Ok(tar) => {
                    self.with_state(&name, |state| {
                        state.pending_job_dir = Some(format!("/{dir}"));
                        state.pending_input = Some(Bytes::from(tar));
                    });
                    return Ok(());
                }
                // Grew past the bound since they were measured: upload.
                // (or are not regular files: the upload says so).
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {}
                Err(e) => return Err(VmmsError::io("cannot pack the input files", e)),
            }
        }
        // The tar is written by a blocking thread while it is uploaded.
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let tar_dir = dir.clone();
        let packer = tokio::task::spawn_blocking(move || {
            let mut sender = archive::ChunkSender::new(tx);
            let files = pairs
                .iter()
                .map(|(name, path)| (name.as_str(), path.as_path()));
            let emptied = [&SUMMARY_PATH[1..], &STREAM_PATH[1..]];
            let written = archive::write_inputs_tar(&mut sender, &tar_dir, files, &emptied)
                .and_then(std::io::Write::flush);
            if let Err(e) = &written {
                sender.abort(e);
            }
            written
        });
        let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let options = UploadToContainerOptionsBuilder::default().path("/").build();
        let uploaded = self
            .api
            .upload_to_container(&name, Some(options), bollard::body_try_stream(body))
            .await;
        let packed = packer
            .await
            .map_err(|e| VmmsError::Backend(format!("packing the input files failed: {e}")))?;
        match (packed, uploaded) {
            (Ok(()), Ok(())) => {}
            // The upload failing first stops the packer with a broken pipe:
            // the upload's error is the one that says what happened.
            (Err(e), Err(upload)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                return Err(vm_error(&name, "cannot copy the input files into", upload))
            }
            (Err(e), _) => return Err(VmmsError::io("cannot pack the input files", e)),
            (Ok(()), Err(upload)) => {
                return Err(vm_error(&name, "cannot copy the input files into", upload))
            }
        }
        self.with_state(&name, |state| {
            state.pending_job_dir = Some(format!("/{dir}"))
        });
        Ok(())
    }

    async fn run_job(&self, vm: &Machine, req: &RunRequest) -> Result<RunOutcome, VmmsError> {
        let name = container_name(vm);
        let (job_dir, input, ran_before) = self.with_state(&name, |state| {
            state.running_after_job = false;
            let ran_before = std::mem::replace(&mut state.ran_a_job, true);
            (
                state.pending_job_dir.take(),
                state.pending_input.take(),
                ran_before,
            )
        });
        if self.config.single_use && ran_before {
            // Nothing of the last job was purged for a next one.
            return Err(VmmsError::Backend(format!(
                "{name} has run a job; with single_use a container runs one only"
            )));
        }
        let job_dir = job_dir.ok_or_else(|| {
            VmmsError::Backend(format!("run_job on {name} without copy_in before it"))
        })?;
        let user = self.grading_user(&name, &vm.image).await?;
        self.apply_network(&name, req.disable_network).await?;
        let host_cgroup = self.start_job_in_cgroup(&name);
        let _cpu_priority = match &host_cgroup {
            Some(cgroup) => self.cpu_priority_by_age(&name, cgroup),
            None => self.lower_cpu_shares_by_api(&name).await?,
        };

        let summary_path = SUMMARY_PATH.to_string();
        // A served job's stream file is its own (the serving PID 1 removes
        // the one before): it does not exist until the job's autodriver
        // makes it, even while an earlier job cut short still runs, so
        // `partial_output` may read it from now on.
        let stream_path = if self.config.serve_jobs {
            self.with_state(&name, |state| {
                state.served_jobs += 1;
                let path = format!("{STREAM_PATH}.{}", state.served_jobs);
                state.stream = Some(path.clone());
                path
            })
        } else {
            STREAM_PATH.to_string()
        };
        // RLIMIT_NPROC counts the processes of a uid across the whole host,
        // and every container's grading user has the same uid: with it, a fork
        // bomb in one container would stop `make` forking in all the others.
        // The container's pids cgroup (`default_max_pids`) bounds each job.
        let without_nproc = RunRequest {
            max_procs: 0,
            ..req.clone()
        };
        let mut args = without_nproc.autodriver_args(&user, &summary_path, &job_dir);
        let dir_arg = args.pop().unwrap_or_else(|| job_dir.clone());
        args.extend(["--stream".to_string(), stream_path.clone()]);
        // A reused container must not carry one job's files in /run/lock
        // or its IPC objects over to the next job.
        if !self.config.single_use {
            args.extend([
                "--purge-writable".to_string(),
                WRITABLE_DIRS_PATH.to_string(),
            ]);
        }
        if input.is_some() {
            args.extend(["--input-tar".to_string(), "-".to_string()]);
        }
        args.push(dir_arg);
        let output_path = self.config.work_dir.join(format!("{name}.out"));
        let mut output = tokio::fs::File::create(&output_path)
            .await
            .map_err(|e| VmmsError::io(format!("cannot create {}", output_path.display()), e))?;
        self.with_state(&name, |state| {
            state.output = Some(output_path.clone());
        });

        let (exit_code, oom_killed) = if self.config.serve_jobs {
            let started_at = SystemTime::now();
            let exit_code = self.run_served(&name, &args, input, &mut output, req).await;
            // The end line came from PID 1, so the container runs: with its
            // cgroup's counter known, no inspect (a round trip through a
            // daemon that a burst of container starts keeps busy).
            let by_counter = exit_code
                .as_ref()
                .ok()
                .and_then(|_| self.oom_counter_rose(&name));
            let oom_killed = match by_counter {
                Some(killed) => {
                    self.with_state(&name, |state| state.running_after_job = true);
                    killed
                }
                None => self.oom_killed(&name, started_at).await,
            };
            (exit_code, oom_killed)
        } else {
            let mut cmd = vec![AUTODRIVER_PATH.to_string()];
            cmd.extend(args);
            self.run_by_exec(&name, cmd, input, &mut output, req)
                .await?
        };
        if let Some(cgroup) = &host_cgroup {
            // The resets and copy-ins before the next job run at the
            // default weight.
            drop(_cpu_priority);
            if let Err(e) = cgroup.set_cpu_priority(CpuPriority::Normal) {
                tracing::debug!("docker: cannot set the CPU weight of {name}: {e}");
            }
        }
        let exit_code = exit_code?;
        let status = RunStatus::from_exit_code(exit_code);

        // The autodriver writes the summary when it ran the job (exit 0 or
        // 2); otherwise the file may be an earlier job's.
        let ran = matches!(status, RunStatus::Completed | RunStatus::TimedOut);
        let summary = if self.config.read_summary && ran {
            match self.read_file(&name, &summary_path, 1 << 20).await {
                Ok(Some(bytes)) => serde_json::from_slice::<serde_json::Value>(&bytes).ok(),
                _ => None,
            }
        } else {
            None
        };
        let mut notes = Vec::new();
        if oom_killed {
            notes.push(format!(
                "The job was killed: it exceeded its memory limit of {} MiB",
                self.memory_mb(vm)
            ));
        }
        Ok(RunOutcome {
            status,
            exit_code,
            summary,
            notes,
        })
    }

    async fn copy_out(&self, vm: &Machine, dest: &Path) -> Result<(), VmmsError> {
        let name = container_name(vm);
        let output = self
            .with_state(&name, |state| state.output.clone())
            .ok_or_else(|| VmmsError::Backend(format!("no job has run in {name}")))?;
        tokio::fs::copy(&output, dest).await.map_err(|e| {
            VmmsError::io(
                format!("cannot copy {} to {}", output.display(), dest.display()),
                e,
            )
        })?;
        Ok(())
    }

    async fn destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.remove(&container_name(vm)).await
    }

    async fn safe_destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        let name = container_name(vm);
        if self.remove_confirmed(&name).await? {
            return Ok(());
        }
        // A removal Docker reported as in progress ends with "removed".
        let options = WaitContainerOptionsBuilder::default()
            .condition("removed")
            .build();
        let mut wait = self.api.wait_container(&name, Some(options));
        let _ = tokio::time::timeout(self.config.api_timeout, wait.next()).await;
        match self.api.inspect_container(&name, None).await {
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(api_error(format_args!("cannot confirm {name} is gone"), e)),
            Ok(_) => Err(VmmsError::Backend(format!(
                "container {name} still exists after removal"
            ))),
        }
    }

    async fn get_vms(&self, prefix: &str) -> Result<Vec<Machine>, VmmsError> {
        let filters =
            HashMap::from([("label", vec![format!("{}={prefix}", naming::LABEL_PREFIX)])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self
            .api
            .list_containers(Some(options))
            .await
            .map_err(|e| api_error("cannot list containers", e))?;
        let mut machines: Vec<Machine> = containers
            .into_iter()
            .filter_map(|c| c.labels.as_ref().and_then(naming::machine_from_labels))
            .filter(|m| naming::machine_prefix(m) == Some(prefix))
            .collect();
        machines.sort_by_key(|m| m.id);
        Ok(machines)
    }

    async fn exists_vm(&self, vm: &Machine) -> Result<bool, VmmsError> {
        let name = container_name(vm);
        match self.api.inspect_container(&name, None).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(api_error(format_args!("cannot inspect {name}"), e)),
        }
    }

    async fn get_images(&self) -> Result<Vec<String>, VmmsError> {
        let images = self
            .api
            .list_images(Some(ListImagesOptionsBuilder::default().build()))
            .await
            .map_err(|e| api_error("cannot list images", e))?;
        let tags: Vec<String> = images.into_iter().flat_map(|i| i.repo_tags).collect();
        Ok(image_names(&tags))
    }

    async fn partial_output(&self, vm: &Machine, max_bytes: usize) -> Result<Vec<u8>, VmmsError> {
        let name = container_name(vm);
        // Until the job's autodriver runs (and empties it) the exec path's
        // file may hold an earlier job's output.
        let (stream, created_here) =
            self.with_state(&name, |state| (state.stream.clone(), state.created_here));
        let Some(stream) = stream else {
            if !created_here && !self.exists_vm(vm).await? {
                return Err(VmmsError::NoSuchVm(name));
            }
            return Ok(Vec::new());
        };
        Ok(self
            .read_file(&name, &stream, max_bytes)
            .await?
            .unwrap_or_default())
    }

    /// The autodriver cleaned up after the job and every copy-in gets a
    /// fresh directory; what is left to check is that the container still
    /// runs (its PID 1 may have been killed, e.g. by the OOM killer).
    async fn reset_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        let name = container_name(vm);
        // The next job may be asked for partial output before its copy-in:
        // it must not see this job's stream.
        self.with_state(&name, |state| state.stream = None);
        // Seen running just after the job (the OOM check asks): no need to
        // ask again a moment later.
        if self.with_state(&name, |state| std::mem::take(&mut state.running_after_job)) {
            return Ok(());
        }
        let inspect = self
            .api
            .inspect_container(&name, None)
            .await
            .map_err(|e| vm_error(&name, "cannot inspect", e))?;
        if inspect.state.and_then(|s| s.running) != Some(true) {
            return Err(VmmsError::Backend(format!(
                "container {name} stopped; it cannot be reused"
            )));
        }
        Ok(())
    }

    async fn build_image(&self, name: &str, tar: &Path) -> Result<(), VmmsError> {
        let previous = self
            .api
            .inspect_image(&format!("{name}:latest"))
            .await
            .ok()
            .and_then(|image| image.id);
        let file = tokio::fs::File::open(tar)
            .await
            .map_err(|e| VmmsError::io(format!("cannot open {}", tar.display()), e))?;
        let body = tokio_util::io::ReaderStream::new(file);
        let options = ImportImageOptionsBuilder::default().quiet(false).build();
        let load = async {
            let mut loaded = None;
            let mut progress = self.api.import_image_stream(options, body, None);
            while let Some(info) = progress.next().await {
                let info = info.map_err(|e| api_error("cannot load the image", e))?;
                if loaded.is_none() {
                    loaded = info
                        .stream
                        .as_deref()
                        .and_then(loaded_image)
                        .map(String::from);
                }
            }
            Ok::<_, VmmsError>(loaded)
        };
        let loaded = tokio::time::timeout(IMAGE_LOAD_TIMEOUT, load)
            .await
            .map_err(|_| VmmsError::Backend("loading the image timed out".into()))??
            .ok_or_else(|| {
                VmmsError::Backend(
                    "docker load reported no image: is this a `docker save` tar?".into(),
                )
            })?;
        let options = TagImageOptionsBuilder::default()
            .repo(name)
            .tag("latest")
            .build();
        self.api
            .tag_image(&loaded, Some(options))
            .await
            .map_err(|e| api_error(format_args!("cannot tag {loaded} as {name}:latest"), e))?;
        self.users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|image, _| image != name && image != &format!("{name}:latest"));
        let current = self
            .api
            .inspect_image(&format!("{name}:latest"))
            .await
            .ok()
            .and_then(|image| image.id);
        if let Some(previous) = previous.filter(|p| Some(p) != current.as_ref()) {
            self.remove_derived_images(&previous).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lookup() {
        let passwd = "root:x:0:0::/root:/bin/sh\nautograde:x:1001:1001::/home/autograde:/bin/sh\n";
        assert!(passwd_has_user(passwd, "autograde"));
        assert!(!passwd_has_user(passwd, "auto"));
        assert!(!passwd_has_user("", "autograde"));
    }

    #[test]
    fn load_messages() {
        assert_eq!(
            loaded_image("Loaded image: foo:latest\n"),
            Some("foo:latest")
        );
        assert_eq!(
            loaded_image("Loaded image ID: sha256:ab\n"),
            Some("sha256:ab")
        );
        assert_eq!(loaded_image("Loading layer 1/2"), None);
    }

    #[test]
    fn image_names_follow_tango() {
        let tags = [
            "tango-test-bookworm:latest".to_string(),
            "course/img:v2".to_string(),
            "<none>:<none>".to_string(),
            "localhost:5000/x:latest".to_string(),
        ];
        assert_eq!(
            image_names(&tags),
            ["course/img:v2", "localhost:5000/x", "tango-test-bookworm"]
        );
    }
}
