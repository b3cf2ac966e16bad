//! Issue 19 end to end: one tangod spreading jobs over three Docker engines
//! (the machine's default one, one more on a unix socket, one over mutual
//! TLS on TCP; the extra ones from tango-vmms's tests/support/engines.rs,
//! each in its own network namespace), losing one to `kill -9` mid-batch,
//! draining one, and streaming an image to a host that lacks it.
//!
//! The tests share the engines' names, so they run one at a time (SERIAL).

mod common;
#[path = "../../tango-vmms/tests/support/engines.rs"]
mod engines;

use common::*;
use engines::{Engine, EngineOptions};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The second engine (unix socket) and the third (TCP with mutual TLS),
/// with the test image.
async fn start_engines() -> (Engine, Engine) {
    tokio::task::spawn_blocking(|| {
        let start = |name: &str, tls| -> Result<Engine, String> {
            let engine = Engine::start(EngineOptions {
                name: name.into(),
                tls,
            })?;
            engine.ensure_images(&[DOCKER_TEST_IMAGE])?;
            Ok(engine)
        };
        Ok::<_, String>((start("tango-e2", false)?, start("tango-e3", true)?))
    })
    .await
    .expect("join")
    .expect("the extra engines start")
}

fn host_toml(name: &str, url: &str, max_vms: usize) -> String {
    format!("[[docker.hosts]]\nname = \"{name}\"\nurl = \"{url}\"\nmax_vms = {max_vms}\n")
}

fn engine_toml(engine: &Engine, max_vms: usize) -> String {
    let mut toml = host_toml(&engine.name, &engine.url, max_vms);
    if let Some(tls) = &engine.tls {
        toml += &format!(
            "tls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            tls.ca.display(),
            tls.cert.display(),
            tls.key.display()
        );
    }
    toml
}

fn local_toml(max_vms: usize) -> String {
    host_toml("local", "unix:///var/run/docker.sock", max_vms)
}

/// tangod's config: the docker backend, `max_vms` in all, the hosts.
fn config(max_vms: usize, hosts: &[String]) -> String {
    format!(
        "vmms = \"docker\"\n[engine]\nmax_vms = {max_vms}\n[engine.timeouts]\n\
         initialize_secs = 30\nwait_secs = 20\n\
         [docker]\nhealth_period_secs = 1\nhealth_timeout_secs = 3\n{}",
        hosts.concat()
    )
}

/// One test's tangod over `hosts` (at most `max_vms` VMs in all), its
/// client and a callback receiver.
struct Run {
    _dir: tempfile::TempDir,
    server: Tangod,
    c: Client,
    prefix: String,
    receiver: Receiver,
}

async fn run(max_vms: usize, hosts: &[String]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let server = Tangod::start(&dir.path().join("data"), &config(max_vms, hosts));
    Run {
        c: server.client(),
        prefix: server.prefix.clone(),
        _dir: dir,
        server,
        receiver: Receiver::start().await,
    }
}

/// Adds `n` jobs whose output names them: each prints its own tag file,
/// after `sleep` seconds. Tags are `{tag}{i}`.
async fn add_jobs(c: &Client, receiver: &Receiver, tag: &str, n: usize, sleep: u32, image: &str) {
    c.open("lab").await;
    c.upload(
        "lab",
        "Makefile",
        format!("all:\n\t@sleep {sleep}\n\t@cat tag\n\t@echo finished\n").as_bytes(),
    )
    .await;
    for i in 0..n {
        let name = format!("{tag}{i}");
        c.upload("lab", &name, format!("tag-{name}\n").as_bytes())
            .await;
        let mut body = job(&name, &name, Some(&receiver.url_for(&name)), 120);
        body["image"] = image.into();
        body["files"]
            .as_array_mut()
            .expect("files")
            .push(serde_json::json!({"localFile": name, "destFile": "tag"}));
        let v = c.add_job("lab", &body).await;
        assert_eq!(v["statusMsg"], "Job added", "{v}");
    }
}

/// Every job's callback came once, with its whole output.
fn assert_outputs(receiver: &Receiver, tag: &str, n: usize) {
    for i in 0..n {
        let name = format!("{tag}{i}");
        let got = receiver.get(&name);
        assert_eq!(got.len(), 1, "job {name}: {} callbacks", got.len());
        let body = String::from_utf8_lossy(&got[0].body).into_owned();
        assert!(
            body.contains(&format!("tag-{name}\n")) && body.contains("finished"),
            "job {name}: {body}"
        );
    }
}

async fn v2(c: &Client, method: reqwest::Method, path: &str) -> Value {
    let r = c
        .http
        .request(method, format!("{}{path}", c.url))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("tangod answers");
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.expect("json")
}

/// Job name to the host its VM was placed on, for every job with a host.
async fn job_hosts(c: &Client) -> BTreeMap<String, String> {
    let v = v2(c, reqwest::Method::GET, "/v2/jobs?limit=500").await;
    v["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(|j| Some((j["name"].as_str()?.into(), j["host"].as_str()?.into())))
        .collect()
}

async fn host_status(c: &Client, name: &str) -> Value {
    let v = v2(c, reqwest::Method::GET, "/v2/hosts").await;
    v["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .find(|h| h["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no host {name} in {v}"))
}

/// This server's containers on `engine`.
fn containers_of(engine: &Engine, prefix: &str) -> Vec<String> {
    engine
        .container_names()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect()
}

/// Waits (asking every 200 ms) until `check` holds, or fails saying `what`.
async fn wait_until(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn assert_no_leftovers(server: Tangod, engines: &[&Engine]) {
    let prefix = server.prefix.clone();
    stop_leaving_no_vms(server, "docker");
    for engine in engines {
        assert_eq!(
            containers_of(engine, &prefix),
            Vec::<String>::new(),
            "on {}",
            engine.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_spread_over_three_engines() {
    if !docker_or_skip("jobs_spread_over_three_engines") {
        return;
    }
    let _serial = SERIAL.lock().await;
    const JOBS: usize = 90;
    let (e2, e3) = start_engines().await;
    let Run {
        _dir,
        server,
        c,
        prefix: _,
        receiver,
    } = run(
        12,
        &[local_toml(4), engine_toml(&e2, 4), engine_toml(&e3, 4)],
    )
    .await;
    add_jobs(&c, &receiver, "s", JOBS, 0, DOCKER_TEST_IMAGE).await;
    receiver.wait_for(JOBS, Duration::from_secs(600)).await;
    assert_outputs(&receiver, "s", JOBS);

    let hosts = job_hosts(&c).await;
    let mut per_host: BTreeMap<&str, usize> = BTreeMap::new();
    for i in 0..JOBS {
        let host = hosts
            .get(&format!("s{i}"))
            .unwrap_or_else(|| panic!("job s{i} has no host: {hosts:?}"));
        *per_host.entry(host).or_default() += 1;
    }
    eprintln!("jobs per host: {per_host:?}");
    for host in ["local", "tango-e2", "tango-e3"] {
        assert!(
            per_host.get(host).is_some_and(|&n| n > 0),
            "no job ran on {host}: {per_host:?}"
        );
    }
    assert_no_leftovers(server, &[&e2, &e3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_killed_mid_batch_loses_no_job() {
    if !docker_or_skip("an_engine_killed_mid_batch_loses_no_job") {
        return;
    }
    let _serial = SERIAL.lock().await;
    const JOBS: usize = 100;
    let (mut e2, e3) = start_engines().await;
    let Run {
        _dir,
        server,
        c,
        prefix,
        receiver,
    } = run(
        12,
        &[local_toml(4), engine_toml(&e2, 4), engine_toml(&e3, 4)],
    )
    .await;
    add_jobs(&c, &receiver, "k", JOBS, 1, DOCKER_TEST_IMAGE).await;
    receiver.wait_for(10, Duration::from_secs(300)).await;
    // Some of the batch must be on the engine when it dies.
    wait_until(
        "jobs running on tango-e2",
        Duration::from_secs(60),
        async || !containers_of(&e2, &prefix).is_empty(),
    )
    .await;
    e2.kill9();
    let during = receiver.count();
    eprintln!("tango-e2 killed after {during} of {JOBS} callbacks");
    wait_until(
        "tango-e2 marked down",
        Duration::from_secs(60),
        async || host_status(&c, "tango-e2").await["up"] == false,
    )
    .await;
    receiver.wait_for(JOBS, Duration::from_secs(600)).await;
    assert!(
        during < JOBS,
        "the batch ended before the engine died; nothing was tested"
    );
    assert_outputs(&receiver, "k", JOBS);

    let e2 = tokio::task::spawn_blocking(move || {
        e2.restart().expect("tango-e2 restarts");
        e2
    })
    .await
    .expect("join");
    wait_until("tango-e2 back up", Duration::from_secs(60), async || {
        host_status(&c, "tango-e2").await["up"] == true
    })
    .await;
    // The sweep on rejoining removes this server's old containers there.
    wait_until(
        "tango-e2 swept of this server's containers",
        Duration::from_secs(60),
        async || containers_of(&e2, &prefix).is_empty(),
    )
    .await;
    assert_no_leftovers(server, &[&e2, &e3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_host_takes_no_new_jobs_and_finishes_its_own() {
    if !docker_or_skip("a_drained_host_takes_no_new_jobs_and_finishes_its_own") {
        return;
    }
    let _serial = SERIAL.lock().await;
    const JOBS: usize = 40;
    let (e2, e3) = start_engines().await;
    let Run {
        _dir,
        server,
        c,
        prefix,
        receiver,
    } = run(8, &[local_toml(4), engine_toml(&e2, 4)]).await;
    add_jobs(&c, &receiver, "d", JOBS, 2, DOCKER_TEST_IMAGE).await;
    wait_until(
        "jobs running on tango-e2",
        Duration::from_secs(120),
        async || job_hosts(&c).await.values().any(|h| h == "tango-e2"),
    )
    .await;
    let status = v2(&c, reqwest::Method::POST, "/v2/hosts/tango-e2/drain").await;
    assert_eq!(status["draining"], true, "{status}");
    // What may still end up on tango-e2: the jobs placed there and those
    // running without a host yet (their VM being made when the drain came).
    let listed = v2(&c, reqwest::Method::GET, "/v2/jobs?limit=500").await;
    let mut allowed = BTreeSet::new();
    for j in listed["jobs"].as_array().expect("jobs") {
        let name = j["name"].as_str().unwrap_or_default().to_string();
        if j["host"] == "tango-e2" || (j["state"] == "running" && j["host"].is_null()) {
            allowed.insert(name);
        }
    }
    let during = receiver.count();
    receiver.wait_for(JOBS, Duration::from_secs(600)).await;
    assert!(
        during < JOBS,
        "the batch ended before the drain; nothing was tested"
    );
    assert_outputs(&receiver, "d", JOBS);
    let hosts = job_hosts(&c).await;
    let after: Vec<&String> = hosts
        .iter()
        .filter(|(name, host)| *host == "tango-e2" && !allowed.contains(*name))
        .map(|(name, _)| name)
        .collect();
    assert!(
        after.is_empty(),
        "placed on tango-e2 after the drain: {after:?}"
    );
    assert!(
        hosts.values().filter(|h| *h == "local").count() > JOBS / 2,
        "the rest of the batch ran on local: {hosts:?}"
    );
    // Drained: its idle containers are gone too.
    wait_until("tango-e2 emptied", Duration::from_secs(60), async || {
        containers_of(&e2, &prefix).is_empty()
    })
    .await;
    assert_no_leftovers(server, &[&e2, &e3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_on_one_host_is_streamed_to_another() {
    if !docker_or_skip("an_image_on_one_host_is_streamed_to_another") {
        return;
    }
    let _serial = SERIAL.lock().await;
    // Only the default engine has this image.
    const IMAGE: &str = "tango-test-streamed";
    let (e2, e3) = start_engines().await;
    run_ok(
        std::process::Command::new("docker").args(["tag", DOCKER_TEST_IMAGE, IMAGE]),
        "docker tag",
    );
    let e2_docker = format!("unix://{}", e2.socket.display());
    let _ = std::process::Command::new("docker")
        .args(["-H", &e2_docker, "rmi", "-f", IMAGE])
        .output();
    let Run {
        _dir,
        server,
        c,
        prefix: _,
        receiver,
    } = run(4, &[local_toml(4), engine_toml(&e2, 4)]).await;
    // The only host that has it takes no new containers: the job's VM can
    // only be made on tango-e2, after the image is streamed there.
    let status = v2(&c, reqwest::Method::POST, "/v2/hosts/local/drain").await;
    assert_eq!(status["draining"], true, "{status}");
    add_jobs(&c, &receiver, "i", 2, 0, IMAGE).await;
    receiver.wait_for(2, Duration::from_secs(300)).await;
    assert_outputs(&receiver, "i", 2);
    let hosts = job_hosts(&c).await;
    assert_eq!(hosts.get("i0").map(String::as_str), Some("tango-e2"));
    assert_eq!(hosts.get("i1").map(String::as_str), Some("tango-e2"));
    run_ok(
        std::process::Command::new("docker").args(["-H", &e2_docker, "image", "inspect", IMAGE]),
        "the image is on tango-e2",
    );
    assert_no_leftovers(server, &[&e2, &e3]);
    let _ = std::process::Command::new("docker")
        .args(["-H", &e2_docker, "rmi", "-f", IMAGE])
        .output();
    let _ = std::process::Command::new("docker")
        .args(["rmi", IMAGE])
        .output();
}
