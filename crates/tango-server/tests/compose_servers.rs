//! deploy/compose/servers/ (three tangod on one PostgreSQL behind HAProxy)
//! without containers: the same topology as real processes. A real
//! PostgreSQL, three tangod on the sandbox backend whose configs are the
//! example's tango{1,2,3}.toml (store, backend and prefix changed for the
//! test), and Debian's HAProxy with the example's haproxy.cfg (addresses
//! changed). A job goes through the load balancer (each request on another
//! server), `/info` through it names every server, and a killed server's
//! requests go to the others. The example files themselves are checked by
//! `haproxy -c` and `docker-compose config`.

mod common;
#[path = "../../tango-store/tests/support/postgres.rs"]
mod postgres;

use common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERVERS: [&str; 3] = ["tango1", "tango2", "tango3"];

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/compose/servers")
}

fn example_file(name: &str) -> String {
    let path = example_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Whether Debian's haproxy is installed (CI installs it).
fn haproxy_or_skip(test: &str) -> bool {
    let found = Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("SKIPPED {test}: no haproxy (apt-get install -y haproxy)");
    }
    found
}

/// `haproxy -c` on a configuration file: its output when valid.
fn haproxy_check(cfg: &Path) -> String {
    let out = run_ok(
        Command::new("haproxy").arg("-c").arg("-f").arg(cfg),
        "haproxy -c",
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_example_haproxy_cfg_is_valid() {
    if !haproxy_or_skip("the_example_haproxy_cfg_is_valid") {
        return;
    }
    let out = haproxy_check(&example_dir().join("haproxy.cfg"));
    assert!(out.contains("Configuration file is valid"), "{out}");
    let cfg = example_file("haproxy.cfg");
    for part in ["balance roundrobin", "option httpchk GET /", "bind :3000"] {
        assert!(cfg.contains(part), "no {part:?} in haproxy.cfg");
    }
    for server in SERVERS {
        assert!(
            cfg.contains(&format!("server {server} {server}:3000 check")),
            "no checked server {server} in haproxy.cfg"
        );
    }
}

/// An example server's config: (name, prefix, store, the whole table).
fn example_config(server: &str) -> (String, String, String, toml::Table) {
    let text = example_file(&format!("{server}.toml"));
    let table: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("{server}.toml: {e}"));
    let field = |section: Option<&str>, key: &str| {
        let scope = match section {
            Some(s) => table[s].as_table().unwrap_or_else(|| panic!("[{s}]")),
            None => &table,
        };
        scope[key]
            .as_str()
            .unwrap_or_else(|| panic!("{server}.toml: no {key}"))
            .to_string()
    };
    (
        field(Some("server"), "name"),
        field(Some("engine"), "prefix"),
        field(None, "store"),
        table,
    )
}

#[test]
fn the_example_servers_share_a_store_and_nothing_else() {
    let configs: Vec<_> = SERVERS.iter().map(|s| example_config(s)).collect();
    let names: BTreeSet<&str> = configs.iter().map(|c| c.0.as_str()).collect();
    let prefixes: BTreeSet<&str> = configs.iter().map(|c| c.1.as_str()).collect();
    let stores: BTreeSet<&str> = configs.iter().map(|c| c.2.as_str()).collect();
    assert_eq!(names, BTreeSet::from(SERVERS));
    assert_eq!(
        prefixes.len(),
        SERVERS.len(),
        "one prefix each: {prefixes:?}"
    );
    assert_eq!(stores.len(), 1, "one store: {stores:?}");
    let store = stores.first().unwrap();
    assert!(store.starts_with("postgres://"), "{store}");
    let user = store["postgres://".len()..]
        .split_once('@')
        .map_or("", |(user, _)| user);
    assert!(
        !user.contains(':'),
        "the password comes from PGPASSWORD, not the file: {store}"
    );
}

/// `docker-compose config` of the example with these variables (and none
/// of the images' from the environment); None without docker-compose.
fn compose_config(envs: &[(&str, &str)]) -> Option<std::process::Output> {
    let mut command = Command::new("docker-compose");
    command
        .arg("-f")
        .arg(example_dir().join("docker-compose.yml"))
        .arg("config");
    for name in [
        "TANGO_RS_IMAGE",
        "TANGO_PG_IMAGE",
        "TANGO_LB_IMAGE",
        "DOCKER_GID",
        "RESTFUL_KEY",
        "POSTGRES_PASSWORD",
    ] {
        command.env_remove(name);
    }
    match command.envs(envs.iter().copied()).output() {
        Ok(output) => Some(output),
        Err(e) => {
            eprintln!("SKIPPED the_example_compose_file_is_valid: no docker-compose ({e})");
            None
        }
    }
}

#[test]
fn the_example_compose_file_is_valid() {
    const REQUIRED: [(&str, &str); 3] = [
        ("DOCKER_GID", "105"),
        ("RESTFUL_KEY", "k"),
        ("POSTGRES_PASSWORD", "pw"),
    ];
    let Some(output) = compose_config(&REQUIRED) else {
        return;
    };
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "image: postgres:15",
        "image: haproxy:2.6",
        "image: tango-rs:latest",
        "/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro",
        "published: 3000",
        "PGPASSWORD: pw",
        "POSTGRES_PASSWORD: pw",
        "condition: service_healthy",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
    for (i, server) in SERVERS.iter().enumerate() {
        for expected in [
            format!("\n  {server}:\n"),
            format!("/{server}.toml:/etc/tango-rs/tangod.toml:ro"),
            format!("tango-rs-data{}:/var/lib/tango-rs", i + 1),
        ] {
            assert!(text.contains(&expected), "no {expected:?} in:\n{text}");
        }
    }
    assert!(
        !text.contains("DOCKER_DEPLOYMENT"),
        "DOCKER_DEPLOYMENT would give the servers one prefix:\n{text}"
    );
    for (missing, _) in REQUIRED {
        let envs: Vec<_> = REQUIRED
            .into_iter()
            .filter(|(n, _)| *n != missing)
            .collect();
        let output = compose_config(&envs).expect("docker-compose");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "config without {missing} passed");
        assert!(stderr.contains(&format!("set {missing}")), "{stderr}");
    }
}

/// HAProxy with the example's haproxy.cfg, listening on loopback ports and
/// balancing over `servers` (name -> address), as a child process.
struct Haproxy {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Haproxy {
    fn start(dir: &Path, servers: &[(&str, String)]) -> Haproxy {
        let port = free_port();
        let mut cfg = example_file("haproxy.cfg")
            .replace("bind :3000", &format!("bind 127.0.0.1:{port}"))
            .replace("bind :8404", &format!("bind 127.0.0.1:{}", free_port()));
        for (name, address) in servers {
            let line = format!("server {name} {name}:3000 ");
            assert!(cfg.contains(&line), "no {line:?} in haproxy.cfg");
            cfg = cfg.replace(&line, &format!("server {name} {address} "));
        }
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        haproxy_check(&path);
        let log = dir.join("haproxy.log");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::from(
                std::fs::File::options().append(true).open(&log).unwrap(),
            ))
            .spawn()
            .expect("start haproxy");
        Haproxy {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until HAProxy passes `GET /` on to a server.
    async fn wait_serving(&mut self, http: &reqwest::Client) {
        let start = Instant::now();
        loop {
            if let Ok(r) = http.get(format!("{}/", self.url)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("haproxy exited with {status}:\n{}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "haproxy did not serve within 20 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server that HAProxy's log (option httplog) says served the one
/// request to `route`.
fn haproxy_server_of(log: &str, route: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!(" {route}")))
        .collect();
    assert_eq!(lines.len(), 1, "requests to {route} in\n{log}");
    lines[0]
        .split_whitespace()
        .find_map(|word| word.strip_prefix("tangod/"))
        .unwrap_or_else(|| panic!("no server in {}", lines[0]))
        .to_string()
}

/// The `server_name`s that `/info` through the load balancer gives in
/// `requests` requests, checking each answer.
async fn names_behind(lb: &Client, requests: usize) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for _ in 0..requests {
        let info = lb.get(&format!("/info/{KEY}/")).await;
        assert_eq!(info["statusId"], 0, "{info}");
        names.insert(
            info["info"]["server_name"]
                .as_str()
                .unwrap_or_else(|| panic!("no server_name in {info}"))
                .to_string(),
        );
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_behind_haproxy_act_as_one() {
    let test = "three_servers_behind_haproxy_act_as_one";
    if !root_or_skip(test) || !haproxy_or_skip(test) {
        return;
    }
    let Some(pg) = postgres::PgServer::start(test) else {
        return;
    };
    let url = pg.create_db("tango");
    let dir = tempfile::tempdir().unwrap();
    let mut servers = Vec::new();
    for server in SERVERS {
        let (_, _, _, mut table) = example_config(server);
        // The harness gives the address, data dir and autodriver on the
        // command line, and each server a prefix of its own unique to
        // this test run (the example's are as distinct, checked above).
        table.insert("store".into(), url.clone().into());
        table.insert("vmms".into(), "sandbox".into());
        for key in ["listen", "data_dir", "autodriver"] {
            table.remove(key);
        }
        if let Some(engine) = table.get_mut("engine").and_then(|e| e.as_table_mut()) {
            engine.remove("prefix");
        }
        let config = toml::to_string(&table).expect("TOML");
        servers.push(Tangod::start(&dir.path().join(server), &config));
    }
    let addresses: Vec<(&str, String)> = SERVERS
        .iter()
        .zip(&servers)
        .map(|(name, s)| (*name, s.url.trim_start_matches("http://").to_string()))
        .collect();
    let mut haproxy = Haproxy::start(dir.path(), &addresses);
    let lb = Client {
        http: reqwest::Client::new(),
        url: haproxy.url.clone(),
    };
    haproxy.wait_serving(&lb.http).await;

    // Round robin: every server answers.
    assert_eq!(
        names_behind(&lb, 2 * SERVERS.len()).await,
        BTreeSet::from(SERVERS.map(String::from))
    );
    // Each server counts the alive ones at its heartbeat (every third of
    // the lease): the first started saw only itself.
    let lease = Duration::from_secs(
        example_config(SERVERS[0]).3["server"]["lease_secs"]
            .as_integer()
            .expect("lease_secs") as u64,
    );
    let start = Instant::now();
    for server in &servers {
        loop {
            let info = server.client().get(&format!("/info/{KEY}/")).await;
            if info["info"]["servers_alive"] == 3 {
                break;
            }
            assert!(start.elapsed() < lease, "{info}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // One job through the load balancer: open, upload, addJob and the
    // polls each land on another server than the one before.
    let receiver = Receiver::start().await;
    let v = lb.open("lab").await;
    assert_eq!(v["statusId"], 0, "{v}");
    let v = lb
        .upload(
            "lab",
            "Makefile",
            b"all:\n\t@echo 'Hello from behind HAProxy'\n",
        )
        .await;
    assert_eq!(v["statusId"], 0, "{v}");
    let v = lb
        .add_job(
            "lab",
            &job(
                "balanced",
                "balanced",
                Some(&receiver.url_for("balanced")),
                30,
            ),
        )
        .await;
    assert_eq!(v["statusMsg"], "Job added", "{v}");
    let out = lb
        .wait_output("lab", "balanced", Duration::from_secs(60))
        .await;
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(out.contains("Hello from behind HAProxy"), "{out}");
    receiver.wait_for(1, Duration::from_secs(30)).await;
    // Every server polled gives the same output.
    for server in &servers {
        let polled = server.client().poll("lab", "balanced").await;
        assert_eq!(
            polled.map(|b| String::from_utf8_lossy(&b).into_owned()),
            Some(out.clone())
        );
    }
    // HAProxy's log names the server of each request.
    let log = haproxy.log();
    let served: BTreeSet<String> = ["/open/", "/upload/", "/addJob/"]
        .iter()
        .map(|route| haproxy_server_of(&log, route))
        .collect();
    assert_eq!(served.len(), 3, "{served:?} in\n{log}");

    // A dead server: HAProxy sends its requests to the others at once
    // (the refused connection is retried elsewhere), before its health
    // check has failed.
    servers[1].kill9();
    assert_eq!(
        names_behind(&lb, 2 * SERVERS.len()).await,
        BTreeSet::from(["tango1".to_string(), "tango3".to_string()]),
        "{}",
        haproxy.log()
    );
    // One callback, counted last to give a second one time to come.
    let callbacks = receiver.get("balanced");
    assert_eq!(callbacks.len(), 1, "{callbacks:?}");
}
