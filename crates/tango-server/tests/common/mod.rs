//! Test harness: a real `tangod` process on the sandbox backend, a client
//! for its v1 routes, and a callback receiver.
#![allow(dead_code)]

pub mod hosts_backend;

use axum::extract::{Multipart, Path as UrlPath, State};
use axum::http::HeaderMap;
use serde_json::Value;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const KEY: &str = "testkey";

/// Whether tests that need root (namespaces, cgroups) can run.
pub fn root_or_skip(test: &str) -> bool {
    if unsafe { libc::geteuid() } == 0 {
        true
    } else {
        eprintln!("SKIPPED {test}: the sandbox backend needs root");
        false
    }
}

/// The Docker image the Docker tests use (scripts/build-docker-test-image.sh).
pub const DOCKER_TEST_IMAGE: &str = "tango-test-bookworm";

/// Whether a dockerd with the test image is there (CI starts one and builds
/// the image; elsewhere the Docker tests skip, saying why).
pub fn docker_or_skip(test: &str) -> bool {
    let ok = std::process::Command::new("docker")
        .args(["image", "inspect", DOCKER_TEST_IMAGE])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!(
            "SKIPPED {test}: no dockerd or no image {DOCKER_TEST_IMAGE} (run scripts/build-docker-test-image.sh)"
        );
    }
    ok
}

/// VMs of a server's prefix still present: sandbox directories or containers.
pub fn leftover_vms(vmms: &str, prefix: &str, data_dir: &Path) -> Vec<String> {
    match vmms {
        "docker" => {
            let out = std::process::Command::new("docker")
                .args(["ps", "-a", "--format", "{{.Names}}", "--filter"])
                .arg(format!("label=tango.prefix={prefix}"))
                .output()
                .expect("docker ps");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect()
        }
        _ => std::fs::read_dir(data_dir.join("sandbox"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&format!("{prefix}-")))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Stops `server` and checks that none of its VMs of backend `vmms` is left.
pub fn stop_leaving_no_vms(server: Tangod, vmms: &str) {
    let (prefix, data_dir) = (server.prefix.clone(), server.data_dir.clone());
    drop(server);
    assert_eq!(leftover_vms(vmms, &prefix, &data_dir), Vec::<String>::new());
}

/// The entry named `name` of a /v2 list (`/v2/hosts`, `/v2/servers`).
pub fn by_name<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter()
        .find(|entry| entry["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {list:?}"))
}

/// The static autodriver: $TANGO_AUTODRIVER, or built now with cargo.
pub fn autodriver() -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap();
    if let Some(p) = built.as_ref() {
        return p.clone();
    }
    let path = match std::env::var_os("TANGO_AUTODRIVER") {
        Some(p) => PathBuf::from(p),
        None => {
            let target = target_dir();
            let status = Command::new(env!("CARGO"))
                .args([
                    "build",
                    "--release",
                    "-p",
                    "autodriver",
                    "--target",
                    "x86_64-unknown-linux-musl",
                ])
                .env("CARGO_TARGET_DIR", &target)
                .status()
                .expect("run cargo");
            assert!(status.success(), "building the autodriver failed");
            target.join("x86_64-unknown-linux-musl/release/autodriver")
        }
    };
    assert!(path.is_file(), "autodriver {} missing", path.display());
    *built = Some(path.clone());
    path
}

/// tangod: $TANGOD_BIN (a copy no other build replaces, where several
/// checkouts share one target directory), else the one cargo built.
pub fn tangod_bin() -> PathBuf {
    std::env::var_os("TANGOD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tangod")))
}

fn target_dir() -> PathBuf {
    // .../target/debug/tangod -> .../target
    PathBuf::from(env!("CARGO_BIN_EXE_tangod"))
        .parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .to_path_buf()
}

/// A free port below the kernel's ephemeral range (32768 and up), so that
/// no outgoing connection takes it while tangod restarts on it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Spread test processes running at once over the range.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let seed = ((std::process::id().wrapping_mul(7919) ^ nanos) % 12_000) as u16;
    loop {
        let port = 20_000 + (seed + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub struct Tangod {
    pub child: Option<Child>,
    pub url: String,
    pub data_dir: PathBuf,
    pub config: Option<PathBuf>,
    pub prefix: String,
    port: u16,
    run_as: Option<RootlessUser>,
    /// The CA of the server's certificate when it serves HTTPS.
    pub tls_ca: Option<PathBuf>,
}

/// An unprivileged user to run tangod as (rootless sandbox), with
/// subordinate ids in /etc/subuid and a cgroup delegated to it for the
/// test; `.ci/run` creates the user and names it in
/// TANGO_TEST_ROOTLESS_USER.
#[derive(Clone)]
pub struct RootlessUser {
    pub uid: u32,
    pub gid: u32,
    /// The delegated cgroup, one directory per hierarchy (v1) or one (v2).
    pub cgroups: Vec<PathBuf>,
}

impl RootlessUser {
    /// The user of TANGO_TEST_ROOTLESS_USER with a fresh delegated cgroup;
    /// None (saying why) where that cannot be had.
    pub fn from_env(test: &str) -> Option<RootlessUser> {
        let Some(name) = std::env::var_os("TANGO_TEST_ROOTLESS_USER") else {
            eprintln!(
                "SKIPPED {test}: TANGO_TEST_ROOTLESS_USER names no user with /etc/subuid ids"
            );
            return None;
        };
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED {test}: delegating a cgroup to the test user needs root");
            return None;
        }
        let cname = std::ffi::CString::new(name.to_string_lossy().as_bytes()).unwrap();
        let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
        assert!(!pw.is_null(), "no user {name:?}");
        let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
        let leaf = format!("tango-rootless-test-{}", std::process::id());
        let root = Path::new("/sys/fs/cgroup");
        let mut cgroups = Vec::new();
        if root.join("cgroup.controllers").exists() {
            // v2: the delegation systemd's Delegate=yes does.
            let dir = root.join(&leaf);
            std::fs::create_dir_all(&dir).unwrap();
            for file in [
                "",
                "cgroup.procs",
                "cgroup.subtree_control",
                "cgroup.threads",
            ] {
                chown(&dir.join(file), uid, gid);
            }
            cgroups.push(dir);
        } else {
            for controller in ["memory", "pids", "cpu"] {
                let dir = root.join(controller).join(&leaf);
                std::fs::create_dir_all(&dir).unwrap();
                for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                    chown(&entry.path(), uid, gid);
                }
                chown(&dir, uid, gid);
                cgroups.push(dir);
            }
        }
        Some(RootlessUser { uid, gid, cgroups })
    }

    /// Gives `path` to the user.
    pub fn own(&self, path: &Path) {
        chown(path, self.uid, self.gid);
    }

    /// Removes the delegated cgroups (tangod made subgroups in them), once
    /// tangod is gone.
    pub fn remove_cgroups(&self) {
        fn remove(dir: &Path) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    remove(&entry.path());
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        for dir in &self.cgroups {
            remove(dir);
        }
    }
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

impl Tangod {
    /// Starts tangod on `data_dir` with an optional TOML config snippet.
    pub fn start(data_dir: &Path, config_toml: &str) -> Tangod {
        Tangod::start_as(data_dir, config_toml, None)
    }

    /// As [`Tangod::start`], as `run_as` (rootless) when given. The data
    /// directory's parent must be one the user may enter.
    pub fn start_as(data_dir: &Path, config_toml: &str, run_as: Option<RootlessUser>) -> Tangod {
        Tangod::start_with(data_dir, config_toml, run_as, None)
    }

    /// As [`Tangod::start`] for a config that serves HTTPS with a
    /// certificate of the CA in `ca` (a PEM file).
    pub fn start_https(data_dir: &Path, config_toml: &str, ca: &Path) -> Tangod {
        Tangod::start_with(data_dir, config_toml, None, Some(ca.to_path_buf()))
    }

    fn start_with(
        data_dir: &Path,
        config_toml: &str,
        run_as: Option<RootlessUser>,
        tls_ca: Option<PathBuf>,
    ) -> Tangod {
        // A distinct VM prefix per server keeps parallel tests' orphan
        // sweeps from destroying each other's sandboxes.
        let prefix = format!(
            "t{}x{}",
            std::process::id(),
            data_dir.to_string_lossy().len() + free_port() as usize
        );
        let config = data_dir.with_extension("toml");
        let body = if config_toml.contains("[engine]") {
            config_toml.replace("[engine]", &format!("[engine]\nprefix = \"{prefix}\""))
        } else {
            format!("{config_toml}\n[engine]\nprefix = \"{prefix}\"\n")
        };
        std::fs::write(&config, body).unwrap();
        let mut t = Tangod {
            child: None,
            url: String::new(),
            data_dir: data_dir.to_path_buf(),
            config: Some(config.clone()),
            prefix,
            port: free_port(),
            run_as,
            tls_ca,
        };
        if let Some(user) = &t.run_as {
            std::fs::create_dir_all(data_dir).unwrap();
            user.own(data_dir);
            user.own(&config);
        }
        t.spawn();
        t
    }

    fn spawn(&mut self) {
        let scheme = if self.tls_ca.is_some() {
            "https"
        } else {
            "http"
        };
        self.url = format!("{scheme}://127.0.0.1:{}", self.port);
        let mut cmd = Command::new(tangod_bin());
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--key")
            .arg(KEY)
            .arg("--autodriver")
            .arg(autodriver())
            .env("RUST_LOG", "info,tango_core=debug")
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.data_dir.with_extension("log"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            );
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        if let Some(user) = &self.run_as {
            // Joins the delegated cgroup as root (v2 checks the common
            // ancestor's permissions), then drops to the user.
            let procs: Vec<std::fs::File> = user
                .cgroups
                .iter()
                .map(|d| {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(d.join("cgroup.procs"))
                        .unwrap()
                })
                .collect();
            let (uid, gid) = (user.uid, user.gid);
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            unsafe {
                cmd.pre_exec(move || {
                    for file in &procs {
                        if libc::write(file.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        self.child = Some(cmd.spawn().expect("start tangod"));
        let start = Instant::now();
        loop {
            if is_serving(&self.url, self.tls_ca.as_deref()) {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "tangod exited with {status}: {}",
                    std::fs::read_to_string(self.data_dir.with_extension("log"))
                        .unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "tangod did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap()
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    pub fn client(&self) -> Client {
        let mut http = reqwest::Client::builder();
        if let Some(ca) = &self.tls_ca {
            http = http.add_root_certificate(
                reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap(),
            );
        }
        Client {
            http: http.build().unwrap(),
            url: self.url.clone(),
        }
    }
}

impl Drop for Tangod {
    fn drop(&mut self) {
        // SIGTERM so the server removes its sandboxes.
        if let Some(child) = self.child.as_mut() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A tiny synchronous liveness probe (no tokio runtime needed), over TLS
/// with a certificate of the CA in `tls_ca` when given.
fn is_serving(url: &str, tls_ca: Option<&Path>) -> bool {
    use std::io::{Read, Write};
    let addr = url.split_once("://").map_or(url, |(_, a)| a).to_string();
    let Ok(tcp) = std::net::TcpStream::connect(&addr) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
    let mut s: Box<dyn ReadWrite> = match tls_ca {
        None => Box::new(tcp),
        Some(ca) => Box::new(tls_client(tcp, ca)),
    };
    if write!(s, "GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200")
}

trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

/// A blocking TLS connection to 127.0.0.1 trusting only the CA in `ca`.
pub fn tls_client(
    tcp: std::net::TcpStream,
    ca: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(tango_server::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    pub url: String,
}

impl Client {
    /// The `/metrics` exposition as text (answered 200).
    pub async fn metrics_text(&self) -> String {
        let r = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    }

    /// The list under `field` of `GET path`, a /v2 route, with the key as a
    /// bearer token (answered 200).
    pub async fn v2_list(&self, path: &str, field: &str) -> Vec<Value> {
        let v = self.v2_get(path).await;
        v[field]
            .as_array()
            .unwrap_or_else(|| panic!("GET {path}: no list {field}: {v}"))
            .clone()
    }

    /// `GET path`, a /v2 route, with the key as a bearer token (answered 200).
    pub async fn v2_get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.json().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{}", self.url, path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("application/json"), "GET {path}: {ct}");
        r.json().await.unwrap()
    }

    pub async fn post(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> Value {
        let mut req = self
            .http
            .post(format!("{}{}", self.url, path))
            // What Autolab's HTTP library sends for raw bytes.
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200, "POST {path}");
        r.json().await.unwrap()
    }

    pub async fn open(&self, lab: &str) -> Value {
        self.get(&format!("/open/{KEY}/{lab}/")).await
    }

    pub async fn upload(&self, lab: &str, name: &str, bytes: &[u8]) -> Value {
        self.post(
            &format!("/upload/{KEY}/{lab}/"),
            bytes.to_vec(),
            &[("Filename", name)],
        )
        .await
    }

    pub async fn add_job(&self, lab: &str, job: &Value) -> Value {
        self.post(&format!("/addJob/{KEY}/{lab}/"), job.to_string(), &[])
            .await
    }

    /// The output file's bytes, or None while it does not exist.
    pub async fn poll(&self, lab: &str, output: &str) -> Option<Vec<u8>> {
        let r = self
            .http
            .get(format!("{}/poll/{KEY}/{lab}/{output}", self.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        let bytes = r.bytes().await.unwrap().to_vec();
        if ct.starts_with("application/json") {
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(v["statusMsg"], "Output file not found");
            None
        } else {
            Some(bytes)
        }
    }

    /// The pool of `image` as `/pool` shows it, once it has `free` free VMs.
    pub async fn wait_pool(&self, image: &str, free: usize) -> Value {
        let start = Instant::now();
        loop {
            let v = self.get(&format!("/pool/{KEY}/{image}/")).await;
            assert_eq!(v["statusMsg"], "Found pool", "{v}");
            let pool = v["pools"][image].clone();
            if pool["free"].as_array().map_or(0, Vec::len) >= free {
                return pool;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the pool of {image} never had {free} free VMs: {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_output(&self, lab: &str, output: &str, limit: Duration) -> Vec<u8> {
        let start = Instant::now();
        loop {
            if let Some(bytes) = self.poll(lab, output).await {
                return bytes;
            }
            assert!(
                start.elapsed() < limit,
                "no output {output} after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A job body as Autolab sends it.
pub fn job(name: &str, output: &str, callback: Option<&str>, timeout: u64) -> Value {
    let mut job = serde_json::json!({
        "image": "host",
        "files": [{"localFile": "Makefile", "destFile": "Makefile"}],
        "jobName": name,
        "output_file": output,
        "timeout": timeout,
        "max_kb": 256,
        "disable_network": true,
    });
    if let Some(url) = callback {
        job["callback_url"] = Value::String(url.to_string());
    }
    job
}

#[derive(Debug, Clone)]
pub struct Callback {
    pub path: String,
    pub filename_header: String,
    pub part_name: String,
    pub part_filename: String,
    pub body: Vec<u8>,
}

/// Receives callbacks on 127.0.0.1; `fail_first` answers 500 that many times.
#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    pub got: Arc<Mutex<Vec<Callback>>>,
    pub notify: Arc<tokio::sync::Notify>,
}

#[derive(Clone)]
struct RecvState {
    got: Arc<Mutex<Vec<Callback>>>,
    notify: Arc<tokio::sync::Notify>,
}

async fn receive(
    State(state): State<RecvState>,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
    mut multipart: Multipart,
) -> axum::http::StatusCode {
    while let Ok(Some(field)) = multipart.next_field().await {
        let part_name = field.name().unwrap_or_default().to_string();
        let part_filename = field.file_name().unwrap_or_default().to_string();
        let body = field.bytes().await.unwrap_or_default().to_vec();
        state.got.lock().unwrap().push(Callback {
            path: path.clone(),
            filename_header: headers
                .get("Filename")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            part_name,
            part_filename,
            body,
        });
    }
    state.notify.notify_waiters();
    axum::http::StatusCode::NO_CONTENT
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        Receiver::serve(listener, url)
    }

    /// An HTTPS receiver with this certificate and key (PEM files), served
    /// by tangod's own TLS listener.
    pub async fn start_https(cert: &Path, key: &Path) -> Receiver {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", tcp.local_addr().unwrap());
        let config = tango_server::tls::server_config(cert, key).unwrap();
        Receiver::serve(
            tango_server::tls::TlsListener::new(tcp, config).unwrap(),
            url,
        )
    }

    fn serve<L>(listener: L, url: String) -> Receiver
    where
        L: axum::serve::Listener,
        L::Addr: std::fmt::Debug,
    {
        let got = Arc::new(Mutex::new(Vec::new()));
        let notify = Arc::new(tokio::sync::Notify::new());
        let app = axum::Router::new()
            .route("/cb/{path}", axum::routing::post(receive))
            .with_state(RecvState {
                got: got.clone(),
                notify: notify.clone(),
            });
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, got, notify }
    }

    pub fn url_for(&self, tag: &str) -> String {
        format!("{}/cb/{tag}", self.url)
    }

    pub fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    pub async fn wait_for(&self, n: usize, limit: Duration) {
        let start = Instant::now();
        while self.count() < n {
            let left = limit.saturating_sub(start.elapsed());
            assert!(
                !left.is_zero(),
                "only {} of {n} callbacks after {limit:?}",
                self.count()
            );
            let _ =
                tokio::time::timeout(left.min(Duration::from_millis(200)), self.notify.notified())
                    .await;
        }
    }

    pub fn get(&self, tag: &str) -> Vec<Callback> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.path == tag)
            .cloned()
            .collect()
    }
}

/// Runs `cmd` to its end; the test fails, showing the command and its
/// output, unless it succeeded.
pub fn run_ok(cmd: &mut std::process::Command, what: &str) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {cmd:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs headless Chromium on `url`; `None` when it is not installed.
pub async fn chromium(url: &str, extra: &[String]) -> Option<String> {
    let found = std::process::Command::new("chromium")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        return None;
    }
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=5000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(extra)
    .arg(url)
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("chromium did not finish in 60 s")
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `<tbody>` of the table with this id in a dumped DOM.
pub fn table_body<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom
        .find(&format!("<table id=\"{id}\""))
        .unwrap_or_else(|| panic!("no table {id}:\n{dom}"));
    let table = &dom[at..at + dom[at..].find("</table>").expect("</table>")];
    let body = table.find("<tbody>").expect("<tbody>");
    &table[body..]
}

/// The `tango` client: $TANGO_BIN, else built into this target directory.
pub fn tango_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(build_tango).clone()
}

fn build_tango() -> PathBuf {
    if let Some(bin) = std::env::var_os("TANGO_BIN") {
        return PathBuf::from(bin);
    }
    let tangod = PathBuf::from(env!("CARGO_BIN_EXE_tangod"));
    let profile_dir = tangod.parent().expect("tangod's directory");
    let target = profile_dir.parent().expect("the target directory");
    let mut args = vec!["build", "-p", "tango-cli", "--bin", "tango"];
    if profile_dir.file_name().is_some_and(|p| p == "release") {
        args.push("--release");
    }
    let status = Command::new(env!("CARGO"))
        .args(&args)
        .env("CARGO_TARGET_DIR", target)
        .status()
        .expect("run cargo");
    assert!(status.success(), "building tango failed");
    profile_dir.join("tango")
}

/// `tango --url URL --key KEY ARGS...` in a blocking thread, with a HOME
/// holding no config file; (exit code, stdout, stderr).
pub async fn tango(url: &str, key: &str, args: &[&str]) -> (i32, String, String) {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(tango_bin());
    cmd.args(["--url", url, "--key", key])
        .args(args)
        .env("HOME", home.path());
    for var in ["TANGO_CONFIG", "TANGO_URL", "TANGO_KEY", "TANGO_CA_CERT"] {
        cmd.env_remove(var);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("run tango");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
