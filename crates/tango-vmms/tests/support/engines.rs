//! Extra Docker engines beside the machine's default one, for the tests of
//! a fleet of Docker hosts (issue 19). Included with `#[path]` by the tests
//! of tango-vmms and tango-server, so it uses only std, libc and rcgen, and
//! drives dockerd, docker, ip, nsenter and socat as programs.
//!
//! Each engine's dockerd runs in a network namespace of its own
//! (`/run/netns/NAME`): with `--bridge none` in the host's namespace,
//! dockerd deletes the host's `docker0` and breaks the default engine. The
//! namespace is a named one (not `unshare --net`), so it outlives a killed
//! dockerd: a restarted dockerd gets the same namespace and the TLS
//! forwarder keeps working across the restart. Unix sockets work across
//! namespaces, so the engine's socket is reachable from the host as is.
//!
//! A TLS engine listens on 127.0.0.1:2376 inside its namespace with mutual
//! TLS (a CA and certificates made here with rcgen); socat carries a free
//! port of the host's loopback to it through `nsenter --net`.
//!
//! The data root is kept under /var/cache/tango-rs/engines/NAME, so an image
//! loaded once stays between test runs. Whatever a crashed run left (a
//! dockerd, a forwarder, a pidfile, a socket) is cleaned when the engine
//! starts again.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the engines keep their data roots, logs and certificates.
const ENGINES_DIR: &str = "/var/cache/tango-rs/engines";
/// dockerd's TLS port inside the engine's namespace.
const TLS_PORT_INSIDE: u16 = 2376;
/// How long dockerd gets to answer after it starts (a first start makes its
/// data root; a restart cleans up after the killed one).
const READY_WITHIN: Duration = Duration::from_secs(60);
/// How long dockerd gets to stop its containers on SIGTERM before SIGKILL.
const STOP_WITHIN: Duration = Duration::from_secs(30);

pub struct EngineOptions {
    /// Names the socket, namespace and directories: `tango-e2` gives
    /// `/run/tango-e2.sock`. Lower-case letters, digits and `-`.
    pub name: String,
    /// Also listen on TCP with mutual TLS.
    pub tls: bool,
}

/// The client-side files a TLS engine's clients (tangod) use.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct Engine {
    pub name: String,
    /// `unix:///run/NAME.sock`, or `tcp://127.0.0.1:PORT` for a TLS engine.
    pub url: String,
    /// The unix socket, there for TLS engines too (docker CLI, save | load).
    pub socket: PathBuf,
    pub tls: Option<TlsFiles>,
    dir: PathBuf,
    dockerd: Option<Child>,
    socat: Option<Child>,
    port: Option<u16>,
}

impl Engine {
    /// Starts the engine and waits until it answers (over TLS too, for a
    /// TLS engine).
    pub fn start(opts: EngineOptions) -> Result<Engine, String> {
        let name = opts.name;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(format!(
                "engine name {name:?}: use lower-case letters, digits and '-'"
            ));
        }
        let dir = Path::new(ENGINES_DIR).join(&name);
        std::fs::create_dir_all(dir.join("data"))
            .map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        let mut engine = Engine {
            socket: PathBuf::from(format!("/run/{name}.sock")),
            url: format!("unix:///run/{name}.sock"),
            name,
            tls: None,
            dir,
            dockerd: None,
            socat: None,
            port: None,
        };
        engine.clean_stale();
        engine.make_netns()?;
        if opts.tls {
            engine.tls = Some(engine.make_certificates()?);
        }
        engine.spawn_dockerd()?;
        if opts.tls {
            engine.spawn_forwarder()?;
            engine.check_tls()?;
        }
        Ok(engine)
    }

    /// Loads each image the engine lacks from the default engine
    /// (`docker save IMG | docker -H unix://SOCKET load`).
    pub fn ensure_images(&self, images: &[&str]) -> Result<(), String> {
        for image in images {
            let present = self
                .docker()
                .args(["image", "inspect", "--format", "{{.Id}}", image])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| format!("docker: {e}"))?
                .success();
            if !present {
                self.load_from_default(image)?;
            }
        }
        Ok(())
    }

    fn load_from_default(&self, image: &str) -> Result<(), String> {
        let mut save = Command::new("docker")
            .args(["save", image])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("docker save {image}: {e}"))?;
        let Some(stdout) = save.stdout.take() else {
            return Err("docker save: no stdout".into());
        };
        let load = self
            .docker()
            .arg("load")
            .stdin(stdout)
            .stdout(Stdio::null())
            .status();
        let saved = save.wait().map_err(|e| format!("docker save: {e}"))?;
        let loaded = load.map_err(|e| format!("docker load: {e}"))?;
        if !saved.success() || !loaded.success() {
            return Err(format!(
                "moving {image} to engine {} failed (save: {saved}, load: {loaded}); \
                 does the default engine have it?",
                self.name
            ));
        }
        Ok(())
    }

    /// SIGKILLs dockerd (its containerd dies with it; the shims of its
    /// containers live on, as on a machine whose dockerd crashed).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.dockerd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOPs dockerd: it holds its connections open and answers nothing,
    /// as a machine cut off without a reset does. [`Engine::thaw`] undoes it.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONTs a frozen dockerd.
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let child = self.dockerd.as_ref().expect("dockerd runs");
        // SAFETY: kill(2) with a pid of our own child.
        let sent = unsafe { libc::kill(child.id() as i32, signal) };
        assert_eq!(sent, 0, "signal {signal} to dockerd {}", self.name);
    }

    /// Starts dockerd again with the same namespace, directories, socket,
    /// port and certificates (stopping it first if it runs).
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop_dockerd();
        self.spawn_dockerd()?;
        if self.tls.is_some() {
            self.check_tls()?;
        }
        Ok(())
    }

    /// The names of all containers on this engine (`docker ps -a`). Panics
    /// if the engine does not answer, so that "none left" cannot pass on a
    /// dead engine.
    pub fn container_names(&self) -> Vec<String> {
        let out = self
            .docker()
            .args(["ps", "-a", "--format", "{{.Names}}"])
            .output();
        match out {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect(),
            Ok(out) => panic!(
                "docker ps on engine {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => panic!("docker ps on engine {}: {e}", self.name),
        }
    }

    /// The docker CLI aimed at this engine's unix socket.
    fn docker(&self) -> Command {
        let mut cmd = Command::new("docker");
        cmd.arg("-H")
            .arg(format!("unix://{}", self.socket.display()));
        cmd
    }

    fn exec_root(&self) -> PathBuf {
        PathBuf::from(format!("/run/{}-exec", self.name))
    }

    fn pidfile(&self) -> PathBuf {
        PathBuf::from(format!("/run/{}.pid", self.name))
    }

    fn netns(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    fn socat_pidfile(&self) -> PathBuf {
        self.dir.join("socat.pid")
    }

    /// Stops what an earlier run of this engine left running.
    fn clean_stale(&self) {
        let socket = self.socket.to_string_lossy().into_owned();
        if let Some(pid) = read_pid(&self.pidfile()) {
            if cmdline(pid).is_some_and(|c| c.contains(&socket)) {
                terminate(pid, STOP_WITHIN);
            }
        }
        if let Some(pid) = read_pid(&self.socat_pidfile()) {
            if cmdline(pid).is_some_and(|c| c.starts_with("socat")) {
                terminate(pid, Duration::from_secs(2));
            }
        }
        kill_shims(&self.exec_root());
        self.unmount_leftovers();
        let _ = std::fs::remove_file(self.pidfile());
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(self.socat_pidfile());
    }

    /// The mounts a dockerd that did not stop cleanly leaves in the host's
    /// mount namespace (its engine shares it): its data root bound onto
    /// itself, its containers' root filesystems and network namespaces.
    fn unmount_leftovers(&self) {
        unmount_under(&[self.dir.join("data"), self.exec_root()]);
    }

    fn make_netns(&self) -> Result<(), String> {
        if !self.netns().exists() {
            run(Command::new("ip").args(["netns", "add", &self.name]))?;
        }
        // dockerd binds 127.0.0.1:2376 in there, which needs lo up.
        run(Command::new("ip").args(["-n", &self.name, "link", "set", "lo", "up"]))
    }

    fn make_certificates(&self) -> Result<TlsFiles, String> {
        let dir = self.dir.join("tls");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let err = |e: rcgen::Error| format!("making certificates: {e}");

        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{} test CA", self.name));
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = rcgen::KeyPair::generate().map_err(err)?;
        let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);

        let leaf = |sans: Vec<String>, purpose| -> Result<(String, String), String> {
            let mut params = rcgen::CertificateParams::new(sans).map_err(err)?;
            params.extended_key_usages.push(purpose);
            let key = rcgen::KeyPair::generate().map_err(err)?;
            let cert = params.signed_by(&key, &issuer).map_err(err)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (client_cert, client_key) = leaf(vec![], rcgen::ExtendedKeyUsagePurpose::ClientAuth)?;

        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("client-cert.pem"),
            key: dir.join("client-key.pem"),
        };
        for (path, text) in [
            (files.ca.clone(), ca_cert.pem()),
            (dir.join("server-cert.pem"), server_cert),
            (dir.join("server-key.pem"), server_key),
            (files.cert.clone(), client_cert),
            (files.key.clone(), client_key),
        ] {
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(files)
    }

    fn spawn_dockerd(&mut self) -> Result<(), String> {
        // A killed dockerd leaves its pidfile and socket behind.
        let _ = std::fs::remove_file(self.pidfile());
        let _ = std::fs::remove_file(&self.socket);
        self.forget_dead_containerd();
        let log_path = self.dir.join("dockerd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns().display()))
            .arg("dockerd")
            .arg("--host")
            .arg(self.url_unix())
            .arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.exec_root())
            .arg("--pidfile")
            .arg(self.pidfile())
            .args(["--bridge", "none", "--iptables=false", "--ip6tables=false"]);
        if self.tls.is_some() {
            let tls = self.dir.join("tls");
            cmd.arg("--host")
                .arg(format!("tcp://127.0.0.1:{TLS_PORT_INSIDE}"))
                .arg("--tlsverify")
                .arg("--tlscacert")
                .arg(tls.join("ca.pem"))
                .arg("--tlscert")
                .arg(tls.join("server-cert.pem"))
                .arg("--tlskey")
                .arg(tls.join("server-key.pem"));
        }
        // Its own process group: a ^C to the tests reaches the tests only,
        // and Drop stops dockerd in order.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("cannot start dockerd for {}: {e}", self.name))?;
        self.dockerd = Some(child);
        self.wait_ready(&log_path)
    }

    /// A killed dockerd's containerd dies with it, but not at once, and a
    /// dying one still counts as running for the next dockerd, which then
    /// waits for its socket and gives up. So wait for it to be gone (or
    /// kill it), then remove its pidfile.
    fn forget_dead_containerd(&self) {
        let pidfile = self.exec_root().join("containerd/containerd.pid");
        if let Some(pid) = read_pid(&pidfile) {
            if cmdline(pid).is_some_and(|c| c.starts_with("containerd")) {
                terminate(pid, Duration::from_secs(5));
            }
        }
        let _ = std::fs::remove_file(pidfile);
    }

    fn url_unix(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Waits until dockerd answers `/_ping` on its socket. Nothing tells
    /// when a daemon is ready but asking it, so this asks every 50 ms.
    fn wait_ready(&mut self, log: &Path) -> Result<(), String> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if ping(&self.socket) {
                return Ok(());
            }
            if let Some(child) = self.dockerd.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.dockerd = None;
                    return Err(format!(
                        "dockerd for {} exited ({status}); its log ends:\n{}",
                        self.name,
                        tail(log)
                    ));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "dockerd for {} did not answer within {READY_WITHIN:?}; its log ends:\n{}",
                    self.name,
                    tail(log)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Carries a free port of the host's loopback to dockerd's TLS port in
    /// the namespace. The forwarder lives as long as the engine, across
    /// restarts of dockerd.
    fn spawn_forwarder(&mut self) -> Result<(), String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let mut cmd = Command::new("socat");
        cmd.arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
            .arg(format!(
                "EXEC:nsenter --net={} socat STDIO TCP\\:127.0.0.1\\:{TLS_PORT_INSIDE}",
                self.netns().display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start socat ({e}); install it: apt-get install socat"))?;
        let _ = std::fs::write(self.socat_pidfile(), child.id().to_string());
        self.socat = Some(child);
        self.port = Some(port);
        self.url = format!("tcp://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(format!("socat did not listen on 127.0.0.1:{port}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// `docker version` over TLS, through the forwarder, with the client
    /// certificate: the whole path tangod will take.
    fn check_tls(&self) -> Result<(), String> {
        let Some(tls) = &self.tls else {
            return Ok(());
        };
        let out = Command::new("docker")
            .arg("--tlsverify")
            .arg("--tlscacert")
            .arg(&tls.ca)
            .arg("--tlscert")
            .arg(&tls.cert)
            .arg("--tlskey")
            .arg(&tls.key)
            .args([
                "-H",
                &self.url,
                "version",
                "--format",
                "{{.Server.Version}}",
            ])
            .output()
            .map_err(|e| format!("docker: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "engine {} does not answer over TLS at {}: {}",
                self.name,
                self.url,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// SIGTERM to dockerd (it stops its containers), SIGKILL if it takes too
    /// long; then the shims of a dockerd that died earlier.
    fn stop_dockerd(&mut self) {
        if let Some(mut child) = self.dockerd.take() {
            terminate(child.id() as i32, STOP_WITHIN);
            let _ = child.wait();
        }
        kill_shims(&self.exec_root());
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop_dockerd();
        self.unmount_leftovers();
        if let Some(mut socat) = self.socat.take() {
            // Its forks serve single connections and end with them.
            let _ = socat.kill();
            let _ = socat.wait();
        }
        let _ = std::fs::remove_file(self.socat_pidfile());
        let _ = std::fs::remove_file(self.pidfile());
        let _ = std::fs::remove_file(&self.socket);
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Whether a Docker engine answers `GET /_ping` on `socket`.
fn ping(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200")
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A process's command line with spaces between its arguments.
fn cmdline(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        String::from_utf8_lossy(&raw)
            .trim_end_matches('\0')
            .replace('\0', " "),
    )
}

fn alive(pid: i32) -> bool {
    // A zombie has no command line any more: it is as good as gone.
    cmdline(pid).is_some_and(|c| !c.is_empty())
}

/// SIGTERM, then SIGKILL if `pid` still runs after `within`.
fn terminate(pid: i32, within: Duration) {
    // SAFETY: kill(2) with a pid this module started or found by its command line.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + within;
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Kills the containers left by a dead dockerd whose exec root is
/// `exec_root`: each shim's children (a container's init: its PID namespace
/// dies with it), then the shim. A live dockerd has no such shims: it owns
/// them and stops its containers itself.
fn kill_shims(exec_root: &Path) {
    let marker = format!("{}/containerd/", exec_root.display());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    let mut parents = Vec::new();
    let mut shims = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Some(line) = cmdline(pid) else { continue };
        if line.contains("containerd-shim") && line.contains(&marker) {
            shims.push(pid);
        }
        if let Some(ppid) = parent(pid) {
            parents.push((pid, ppid));
        }
    }
    for shim in &shims {
        for (pid, _) in parents.iter().filter(|(_, ppid)| ppid == shim) {
            // SAFETY: a container process of a shim of this engine.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        // SAFETY: a shim of this engine.
        unsafe { libc::kill(*shim, libc::SIGKILL) };
    }
}

/// Detaches every mount at or below one of `roots`, deepest first.
fn unmount_under(roots: &[PathBuf]) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(unescape_mount_point(point)))
        .filter(|point| roots.iter().any(|root| point.starts_with(root)))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    points.dedup();
    for point in points {
        let Ok(c_point) = std::ffi::CString::new(point.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: a NUL-terminated path; MNT_DETACH never blocks.
        unsafe { libc::umount2(c_point.as_ptr(), libc::MNT_DETACH) };
    }
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_point(point: &str) -> String {
    let bytes = point.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parent(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may hold spaces: count from its end.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
