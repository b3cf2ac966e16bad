//! `/v2/hosts`, drain and the per-host metrics of a real tangod whose docker
//! backend spreads jobs over two real Docker engines: the machine's own
//! (`local`) and one more started by the test in a network namespace of its
//! own (tango-vmms/tests/support/engines.rs).

mod common;

#[path = "../../tango-vmms/tests/support/engines.rs"]
mod engines;

use common::*;
use engines::{Engine, EngineOptions};
use serde_json::Value;
use std::time::{Duration, Instant};

const ENGINE: &str = "tango-hostsapi";
const MAKEFILE: &[u8] = b"all:\n\t@echo 'Hello from a docker host'\n";

async fn metric(c: &Client, line_start: &str) -> Option<f64> {
    c.metrics_text()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(line_start)?.strip_prefix(' ')?.parse().ok())
}

/// Waits until host `name` is up (or down), or fails after 60 s.
async fn wait_up(c: &Client, name: &str, up: bool) {
    let start = Instant::now();
    loop {
        let all = c.v2_list("/v2/hosts", "hosts").await;
        if by_name(&all, name)["up"] == up {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{name} never {}: {all:?}",
            if up { "up" } else { "down" }
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_engine_takes_no_jobs_and_a_dead_one_shows_down() {
    if !docker_or_skip("a_drained_engine_takes_no_jobs_and_a_dead_one_shows_down") {
        return;
    }
    let mut engine = Engine::start(EngineOptions {
        name: ENGINE.into(),
        tls: false,
    })
    .expect("start the extra engine");
    engine
        .ensure_images(&[DOCKER_TEST_IMAGE])
        .expect("the test image on the extra engine");
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "vmms = \"docker\"\n\
         [docker]\nhealth_period_secs = 1\nhealth_timeout_secs = 2\n\
         [[docker.hosts]]\nname = \"local\"\nurl = \"unix:///var/run/docker.sock\"\nmax_vms = 4\n\
         [[docker.hosts]]\nname = \"{ENGINE}\"\nurl = \"{}\"\nmax_vms = 4\n\
         [engine]\nmax_vms = 8\n",
        engine.url
    );
    let server = Tangod::start(&dir.path().join("data"), &config);
    let c = server.client();

    let all = c.v2_list("/v2/hosts", "hosts").await;
    let names: Vec<&str> = all.iter().map(|h| h["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["local", ENGINE], "{all:?}");
    assert!(
        all.iter().all(|h| h["up"] == true && h["vmms"] == "docker"),
        "{all:?}"
    );
    assert_eq!(by_name(&all, ENGINE)["url"], engine.url.as_str());

    // Drain the machine's own engine: every job runs on the other one.
    let r = c
        .http
        .post(format!("{}/v2/hosts/local/drain", c.url))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let drained: Value = r.json().await.unwrap();
    assert_eq!(drained["draining"], true, "{drained}");
    c.open("fleetlab").await;
    c.upload("fleetlab", "Makefile", MAKEFILE).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let mut body = job(&format!("fleet-{i}"), &format!("out{i}"), None, 60);
        body["image"] = DOCKER_TEST_IMAGE.into();
        let v = c.add_job("fleetlab", &body).await;
        assert_eq!(v["statusId"], 0, "{v}");
        ids.push(v["jobId"].as_str().unwrap().to_string());
    }
    for i in 0..4 {
        let out = c
            .wait_output("fleetlab", &format!("out{i}"), Duration::from_secs(120))
            .await;
        assert!(
            String::from_utf8_lossy(&out).contains("Hello from a docker host"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }
    for id in &ids {
        let v: Value = c
            .http
            .get(format!("{}/v2/jobs/{id}", c.url))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["host"], ENGINE, "job {id} ran elsewhere: {v}");
    }
    let starts = format!("tango_docker_host_vm_starts_total{{host=\"{ENGINE}\"}}");
    assert!(metric(&c, &starts).await >= Some(1.0), "{starts}");
    assert_eq!(
        metric(&c, "tango_docker_host_vm_starts_total{host=\"local\"}").await,
        Some(0.0)
    );
    assert_eq!(
        metric(&c, "tango_docker_host_draining{host=\"local\"}").await,
        Some(1.0)
    );

    // The engine dies: down in /v2/hosts and /metrics; back once restarted.
    let up = format!("tango_docker_host_up{{host=\"{ENGINE}\"}}");
    assert_eq!(metric(&c, &up).await, Some(1.0));
    engine.kill9();
    wait_up(&c, ENGINE, false).await;
    assert_eq!(metric(&c, &up).await, Some(0.0));
    engine.restart().expect("restart the extra engine");
    wait_up(&c, ENGINE, true).await;
    assert_eq!(metric(&c, &up).await, Some(1.0));
}
