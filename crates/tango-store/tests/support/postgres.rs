//! A real PostgreSQL server for tests: `initdb` in a temporary directory and
//! `pg_ctl` on a free loopback port, run as the unprivileged `postgres` user
//! when the tests run as root (PostgreSQL refuses to run as root). Stopped
//! on drop. Uses only std, so other crates' tests can include it with
//! `#[path = "…/tango-store/tests/support/postgres.rs"] mod postgres;`.
//!
//! Servers live under `$TMPDIR/tango-rs-pg-tests/<pid>-…`: one left by a
//! test run that crashed (its pid gone) is stopped and removed by the next.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct PgServer {
    bin: PathBuf,
    dir: PathBuf,
    pub port: u16,
    /// The user the server runs as (`postgres` when the tests are root).
    run_as: Option<String>,
}

/// The directory of `initdb` and `pg_ctl`: `TANGO_TEST_PG_BIN`, else
/// Debian's newest `/usr/lib/postgresql/N/bin`, else the `PATH`.
fn bindir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("TANGO_TEST_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).find(|dir| dir.join("initdb").is_file()))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn root_dir() -> PathBuf {
    std::env::temp_dir().join("tango-rs-pg-tests")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl PgServer {
    /// Starts a fresh server, or says why `test` is skipped (no PostgreSQL
    /// binaries: install Debian's `postgresql` package) and returns None.
    pub fn start(test: &str) -> Option<PgServer> {
        let Some(bin) = bindir() else {
            eprintln!(
                "skipping {test}: no initdb found (install Debian's postgresql package, or set \
                 TANGO_TEST_PG_BIN to the directory of initdb and pg_ctl)"
            );
            return None;
        };
        let run_as = is_root().then(|| "postgres".to_string());
        let root = root_dir();
        std::fs::create_dir_all(&root).unwrap();
        // Others (the postgres user) must pass through it.
        std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        stop_stale(&bin, &root, run_as.as_deref());
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-", std::process::id()))
            .tempdir_in(&root)
            .unwrap()
            .keep();
        if let Some(user) = &run_as {
            let ids = run_ok(Command::new("id").arg("-u").arg(user), "id -u postgres");
            let uid: u32 = String::from_utf8_lossy(&ids.stdout).trim().parse().unwrap();
            let gids = run_ok(Command::new("id").arg("-g").arg(user), "id -g postgres");
            let gid: u32 = String::from_utf8_lossy(&gids.stdout)
                .trim()
                .parse()
                .unwrap();
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        let mut server = PgServer {
            bin,
            dir,
            port: 0,
            run_as,
        };
        let data = server.data();
        server.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
        );
        // A port taken between finding it free and the server binding it:
        // try another.
        for attempt in 0.. {
            server.port = free_port();
            if server.pg_ctl_start().status.success() {
                break;
            }
            assert!(attempt < 3, "PostgreSQL does not start:\n{}", server.log());
        }
        Some(server)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        run_ok(self.command(program).args(args), program)
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let mut c = self.command("pg_ctl");
        c.arg("-D").arg(self.data()).args(args);
        c.output().expect("pg_ctl runs")
    }

    fn pg_ctl_start(&self) -> Output {
        let options = format!("-k {} -p {} -h 127.0.0.1", self.dir.display(), self.port);
        let log = self.dir.join("log");
        self.pg_ctl(&[
            "-w",
            "-t",
            "60",
            "-l",
            log.to_str().unwrap(),
            "-o",
            &options,
            "start",
        ])
    }

    /// A new empty database; its URL.
    pub fn create_db(&self, name: &str) -> String {
        run_ok(self.client_tool("createdb").arg(name), "createdb");
        self.url(name)
    }

    /// A client program of PostgreSQL's (`psql`, `createdb`) pointed at this
    /// server as the superuser.
    fn client_tool(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
        ]);
        command
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// SQL run by `psql` as the superuser; its output, unaligned.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = run_ok(
            self.client_tool("psql")
                .args(["-d", db, "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql]),
            "psql",
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Stops the server (fast: connections are cut).
    pub fn stop(&self) {
        let out = self.pg_ctl(&["-w", "-m", "fast", "stop"]);
        assert!(out.status.success(), "pg_ctl stop: {out:?}");
    }

    /// Starts it again after [`stop`](Self::stop), on the same port.
    pub fn start_again(&self) {
        let out = self.pg_ctl_start();
        assert!(
            out.status.success(),
            "pg_ctl start: {out:?}\n{}",
            self.log()
        );
    }

    pub fn restart(&self) {
        self.stop();
        self.start_again();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-w", "-m", "immediate", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Stops and removes the servers of test processes that are gone.
fn stop_stale(bin: &Path, root: &Path, run_as: Option<&str>) {
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next() else {
            continue;
        };
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        let data = entry.path().join("data");
        if data.join("postmaster.pid").exists() {
            let stale = PgServer {
                bin: bin.to_path_buf(),
                dir: entry.path(),
                port: 0,
                run_as: run_as.map(str::to_string),
            };
            eprintln!(
                "stopping a stale test PostgreSQL in {}",
                entry.path().display()
            );
            drop(stale);
        } else {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
