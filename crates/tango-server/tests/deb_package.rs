//! The Debian package, end to end: scripts/build-deb.sh builds
//! tango-rs_<version>_amd64.deb, dpkg installs it into a copy of a fresh
//! debootstrap root (scripts/build-deb-test-rootfs.sh), `systemd-analyze
//! verify` checks the installed unit there, and the installed tangod, run in
//! that root with the packaged config and key, runs examples/jobs/hello for
//! the installed `tango` client; then, with dockerd, systemd boots that
//! root in a container and runs the packaged unit. Slow (release builds):
//! only with TANGO_TEST_DEB=1, as root.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The target directory this test was built in (…/target/debug/tangod).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_tangod"))
        .ancestors()
        .nth(2)
        .expect("target dir")
        .to_path_buf()
}

/// Runs a script of scripts/ and returns the last line it prints.
fn script(name: &str) -> PathBuf {
    let out = Command::new(repo().join("scripts").join(name))
        .env("CARGO_TARGET_DIR", target_dir())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run scripts/{name}: {e}"));
    assert!(out.status.success(), "scripts/{name} failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(stdout.lines().last().expect("a path printed").trim())
}

/// `CMD` run in ROOT as a service would see it: in a mount namespace of its
/// own (its mounts vanish with it, and never reach the host) where ROOT is
/// a mount point (the sandbox makes `/` private) with /proc, /sys (the
/// cgroups) and /dev.
fn in_root(root: &Path, cmd: &[&str]) -> Command {
    const ENTER: &str = r#"set -e
root=$1; shift
mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
exec chroot "$root" "$@""#;
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        ENTER,
        "sh",
    ])
    .arg(root)
    .args(cmd);
    c
}

/// The copied root; removed only once no mount is left inside it (a
/// recursive delete through a bound /dev or /sys would reach the host's).
struct Root(Option<tempfile::TempDir>);

impl Drop for Root {
    fn drop(&mut self) {
        let Some(dir) = self.0.take() else { return };
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let path = dir.path().to_string_lossy().into_owned();
        if mounts.lines().any(|l| l.contains(&path)) {
            eprintln!("mounts are left under {path}: not removing it");
            let _ = dir.keep();
        }
    }
}

/// tangod in the root; killed if the test ends before it stopped.
struct Server {
    child: Child,
    log: Arc<Mutex<String>>,
    /// Sent when tangod's standard error closes: it has exited.
    closed: mpsc::Receiver<()>,
}

impl Server {
    fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The next sd_notify message, within `limit`.
fn notified(socket: &UnixDatagram, limit: Duration, server: &Server) -> String {
    socket.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!(
            "no sd_notify message from tangod within {limit:?} ({e}); its log:\n{}",
            server.log()
        ),
    }
}

#[test]
fn installed_package_serves_a_job_with_its_packaged_config() {
    if !common::root_or_skip("installed_package_serves_a_job_with_its_packaged_config") {
        return;
    }
    if std::env::var("TANGO_TEST_DEB").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED installed_package_serves_a_job_with_its_packaged_config: \
             set TANGO_TEST_DEB=1 (it builds the .deb in release mode; needs cargo-deb, \
             which scripts/build-deb.sh installs, debootstrap and systemd-analyze)"
        );
        return;
    }
    let deb = script("build-deb.sh");
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(name, format!("tango-rs_{version}_amd64.deb"));

    let fresh = script("build-deb-test-rootfs.sh");
    let tmp = tempfile::Builder::new()
        .prefix("tango-deb-test")
        .tempdir_in("/var/tmp")
        .unwrap();
    let root_guard = Root(Some(tmp));
    let root = root_guard.0.as_ref().unwrap().path().join("root");
    let mut cp = Command::new("cp");
    cp.arg("-a").arg(&fresh).arg(&root);
    common::run_ok(&mut cp, "copying the test root");
    std::fs::copy(&deb, root.join("tmp").join(&name)).unwrap();

    let mut install = in_root(&root, &["dpkg", "-i", &format!("/tmp/{name}")]);
    common::run_ok(&mut install, "dpkg -i");

    // What the package and its postinst put there.
    for file in [
        "usr/bin/tangod",
        "usr/bin/tango",
        "usr/lib/tango-rs/autodriver",
    ] {
        let meta = std::fs::metadata(root.join(file)).unwrap_or_else(|e| panic!("/{file}: {e}"));
        assert!(
            meta.permissions().mode() & 0o111 != 0,
            "/{file} not executable"
        );
    }
    let key_path = root.join("etc/tango-rs/key");
    let meta = std::fs::metadata(&key_path).expect("postinst made /etc/tango-rs/key");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "key mode");
    let key = std::fs::read_to_string(&key_path)
        .unwrap()
        .trim()
        .to_string();
    assert!(
        key.len() >= 32 && key.chars().all(|c| c.is_ascii_alphanumeric()),
        "key {key:?}"
    );
    assert!(root.join("var/lib/tango-rs").is_dir(), "no data dir");
    // An absolute link, to be read inside the root.
    let wants = root.join("etc/systemd/system/multi-user.target.wants/tangod.service");
    let target = std::fs::read_link(&wants).expect("tangod.service is not enabled");
    let target = target.strip_prefix("/").unwrap_or(&target);
    assert!(
        root.join(target).is_file(),
        "enabled as {}",
        target.display()
    );
    let conffiles = common::run_ok(
        &mut in_root(&root, &["dpkg-query", "-W", "-f=${Conffiles}", "tango-rs"]),
        "dpkg-query",
    );
    assert!(
        String::from_utf8_lossy(&conffiles.stdout).contains("/etc/tango-rs/tangod.toml "),
        "tangod.toml is no conffile: {}",
        String::from_utf8_lossy(&conffiles.stdout)
    );
    // A reinstall (an upgrade) keeps the key Autolab was given.
    common::run_ok(
        &mut in_root(&root, &["dpkg", "-i", &format!("/tmp/{name}")]),
        "dpkg -i again",
    );
    let again = std::fs::read_to_string(&key_path).unwrap();
    assert_eq!(again.trim(), key, "the reinstall replaced the key");

    // The unit, with the units it names, as systemd would load it there;
    // systemd-analyze only warns (exit 0) about unknown or invalid
    // settings, so any output fails.
    let verify = common::run_ok(
        &mut {
            let mut c = Command::new("systemd-analyze");
            c.arg("verify")
                .arg(format!("--root={}", root.display()))
                .arg("/usr/lib/systemd/system/tangod.service");
            c
        },
        "systemd-analyze verify",
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(said.trim().is_empty(), "systemd-analyze verify: {said}");

    // The installed tangod with the packaged config (only the port is the
    // test's), as the unit starts it: told ready through NOTIFY_SOCKET.
    let notify_path = root.join("run/tangod-notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = in_root(
        &root,
        &[
            "/usr/bin/tangod",
            "--config",
            "/etc/tango-rs/tangod.toml",
            "--listen",
            &listen,
        ],
    );
    cmd.env("NOTIFY_SOCKET", "/run/tangod-notify.sock")
        .env_remove("RESTFUL_KEY")
        .env_remove("TANGO_AUTODRIVER")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start tangod");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (closed_tx, closed) = mpsc::channel();
    {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut l) = log.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
            let _ = closed_tx.send(());
        });
    }
    let server = Server { child, log, closed };
    let ready = notified(&notify, Duration::from_secs(120), &server);
    assert!(
        ready.lines().any(|l| l == "READY=1"),
        "first message {ready:?}"
    );

    // examples/jobs/hello on image `host` (the root's own /, which has make).
    let job = root.join("tmp/hello");
    std::fs::create_dir(&job).unwrap();
    for entry in std::fs::read_dir(repo().join("examples/jobs/hello")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), job.join(entry.file_name())).unwrap();
    }
    let url = format!("http://{listen}");
    let out = in_root(
        &root,
        &[
            "/usr/bin/tango",
            "--url",
            &url,
            "--key",
            &key,
            "run",
            "/tmp/hello",
            "--image",
            "host",
        ],
    )
    .output()
    .expect("run tango");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("Hello, tango!")
            && stdout.contains(r#"{"scores": {"hello": 100}}"#),
        "tango run: {}\n{stdout}{}\ntangod's log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );

    // SIGTERM, as systemctl stop sends it (KillMode=mixed: tangod alone).
    let pid = server.child.id() as libc::pid_t;
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let stopping = notified(&notify, Duration::from_secs(60), &server);
    assert!(
        stopping.lines().any(|l| l == "STOPPING=1"),
        "message after SIGTERM {stopping:?}"
    );
    let mut server = server;
    server
        .closed
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("tangod did not stop; its log:\n{}", server.log()));
    let status = server.child.wait().unwrap();
    assert!(
        status.success(),
        "tangod exited {status}:\n{}",
        server.log()
    );
    drop(server);
    drop(notify);
    std::fs::remove_file(&notify_path).unwrap();

    under_systemd(&root);
    drop(root_guard);
}

/// A container of the installed root (`docker import`), removed at the end.
struct Booted {
    name: String,
}

impl Booted {
    fn exec(&self, cmd: &[&str]) -> Output {
        Command::new("docker")
            .args(["exec", &self.name])
            .args(cmd)
            .output()
            .expect("docker exec")
    }

    fn journal(&self) -> String {
        let out = self.exec(&["journalctl", "-u", "tangod", "--no-pager"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `tango run` of an example job (copied in) on image `host`.
    fn run_example(&self, job: &str) -> Output {
        let dir = format!("/tmp/examples/{job}");
        assert!(self
            .exec(&["mkdir", "-p", "/tmp/examples"])
            .status
            .success());
        let copy = Command::new("docker")
            .arg("cp")
            .arg(repo().join("examples/jobs").join(job))
            .arg(format!("{}:{dir}", self.name))
            .status()
            .expect("docker cp");
        assert!(copy.success(), "docker cp {job}");
        self.exec(&[
            "sh",
            "-c",
            &format!("exec tango --key \"$(cat /etc/tango-rs/key)\" run {dir} --image host"),
        ])
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.name])
            .output();
        let _ = Command::new("docker").args(["rmi", &self.name]).output();
    }
}

/// The installed unit as systemd runs it: systemd as PID 1 of a container
/// made from the root, the unit enabled by the package starting at boot
/// (Type=notify), jobs under its hardening and delegated cgroup, and a
/// graceful `systemctl stop`. Needs dockerd (no image is pulled).
fn under_systemd(root: &Path) {
    let docker_up = Command::new("docker")
        .arg("info")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !docker_up {
        eprintln!("SKIPPED the unit under systemd (in a container): no dockerd");
        return;
    }
    let booted = Booted {
        name: format!("tango-rs-deb-test-{}", std::process::id()),
    };
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .expect("tar");
    let import = Command::new("docker")
        .args(["import", "-", &booted.name])
        .stdin(tar.stdout.take().unwrap())
        .stdout(Stdio::null())
        .status()
        .expect("docker import");
    assert!(
        tar.wait().unwrap().success() && import.success(),
        "docker import"
    );
    // systemd needs CAP_SYS_ADMIN and a writable cgroup tree; tangod's own
    // needs are what the unit leaves it. On cgroup v1 (hybrid) systemd runs
    // on the host's hierarchy; on v2 in a cgroup namespace of its own.
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let mut run = Command::new("docker");
    run.args(["run", "-d", "--name", &booted.name])
        .args(["--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN"])
        .args(["--security-opt", "seccomp=unconfined"])
        .args(["--security-opt", "apparmor=unconfined"])
        .args(["--tmpfs", "/run", "--tmpfs", "/run/lock"]);
    if v2 {
        run.args(["--cgroupns=private"]);
    } else {
        run.args(["--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw"]);
    }
    run.args([&booted.name, "/lib/systemd/systemd"]);
    common::run_ok(&mut run, "docker run (systemd)");

    // `is-system-running --wait` waits for the boot to finish, but only once
    // systemd's bus is up, which nothing outside the container can wait
    // for: retried briefly while it is not.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = booted.exec(&["systemctl", "is-system-running", "--wait"]);
        let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if ["running", "degraded"].contains(&said.as_str()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "systemd did not boot: {said} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let state = booted.exec(&[
        "systemctl",
        "show",
        "tangod",
        "-p",
        "ActiveState,SubState,Type,NRestarts",
    ]);
    let state = String::from_utf8_lossy(&state.stdout).into_owned();
    assert!(
        state.contains("ActiveState=active")
            && state.contains("SubState=running")
            && state.contains("Type=notify")
            && state.contains("NRestarts=0"),
        "tangod.service after boot: {state}\n{}",
        booted.journal()
    );

    let hello = booted.run_example("hello");
    let stdout = String::from_utf8_lossy(&hello.stdout);
    assert!(
        hello.status.success() && stdout.contains("Hello, tango!"),
        "hello under systemd: {}\n{stdout}{}\n{}",
        hello.status,
        String::from_utf8_lossy(&hello.stderr),
        booted.journal()
    );
    // The VM's memory cgroup, made in the unit's delegated subtree, holds.
    let hog = booted.run_example("memory_hog");
    let stdout = String::from_utf8_lossy(&hog.stdout);
    assert!(
        !hog.status.success()
            && stdout.contains("holding 256 MiB")
            && !stdout.contains("did NOT stop me"),
        "memory_hog under systemd: {}\n{stdout}{}",
        hog.status,
        String::from_utf8_lossy(&hog.stderr)
    );

    common::run_ok(
        &mut {
            let mut c = Command::new("docker");
            c.args(["exec", &booted.name, "systemctl", "stop", "tangod"]);
            c
        },
        "systemctl stop tangod",
    );
    let result = booted.exec(&["systemctl", "show", "tangod", "-p", "Result,ExecMainStatus"]);
    let result = String::from_utf8_lossy(&result.stdout).into_owned();
    let journal = booted.journal();
    assert!(
        result.contains("Result=success")
            && result.contains("ExecMainStatus=0")
            && journal.contains("stopping: no new jobs"),
        "systemctl stop: {result}\n{journal}"
    );
}
