//! `GET /v2/hosts`, `POST /v2/hosts/{name}/drain|undrain`, the per-host
//! metrics, `vm.host` in job records, the dashboard's Hosts table and
//! `tango hosts`, against tangod's application served in-process over a
//! stand-in backend of two hosts (tests/common/hosts_backend.rs): the real
//! engine, store and HTTP stack, and the real `tango` binary.

mod common;

use common::hosts_backend::{HostsServer, IMAGE};
use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const MAKEFILE: &[u8] = b"all:\n\t@echo hello\n";

async fn v2(c: &Client, method: reqwest::Method, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = c.http.request(method, format!("{}{path}", c.url));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

/// Waits until `check` holds for `GET /v2/hosts`, or fails after 20 s.
async fn wait_hosts(c: &Client, what: &str, check: impl Fn(&[Value]) -> bool) {
    let start = Instant::now();
    loop {
        let hosts = c.v2_list("/v2/hosts", "hosts").await;
        if check(&hosts) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never: {what}: {hosts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs one job to its end and returns its id.
async fn run_job(c: &Client, output: &str) -> u64 {
    let mut body = job(output, output, None, 20);
    body["image"] = IMAGE.into();
    let v = c.add_job("hostlab", &body).await;
    assert_eq!(v["statusId"], 0, "{v}");
    c.wait_output("hostlab", output, Duration::from_secs(20))
        .await;
    v["jobId"].as_str().unwrap().parse().unwrap()
}

/// The cells of a host's row in `tango hosts` (empty cells left out).
fn expected_row(h: &Value) -> Vec<String> {
    let text = |field: &str| match &h[field] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut row = vec![text("name"), text("vmms")];
    row.push(if h["up"] == true { "up" } else { "down" }.into());
    if h["draining"] == true {
        row.push("draining".into());
    }
    row.push(format!("{}/{}", text("vms"), text("max_vms")));
    for field in ["running_jobs", "vm_starts", "vm_start_failures", "url"] {
        row.push(text(field));
    }
    row
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_are_listed_drained_undrained_and_measured() {
    let server = HostsServer::start(4).await;
    let c = server.client();
    use reqwest::Method;

    // The key as a bearer token, as on every /v2 route.
    for method in [Method::GET, Method::POST] {
        let path = if method == Method::GET {
            "/v2/hosts"
        } else {
            "/v2/hosts/alpha/drain"
        };
        let (status, v) = v2(&c, method.clone(), path, None).await;
        assert_eq!(status, 401, "{method} {path}: {v}");
        assert!(v["error"].as_str().unwrap().contains("Bearer"), "{v}");
        let (status, _) = v2(&c, method.clone(), path, Some("wrongkey")).await;
        assert_eq!(status, 401, "{method} {path}");
        let (status, _) = v2(&c, method.clone(), &format!("{path}?key={KEY}"), Some(KEY)).await;
        assert_eq!(status, 400, "{method} {path}: a key in the URL is refused");
    }
    assert!(
        !c.v2_list("/v2/hosts", "hosts").await[0]["draining"]
            .as_bool()
            .unwrap(),
        "nothing was drained without the key"
    );

    let hosts = c.v2_list("/v2/hosts", "hosts").await;
    let names: Vec<&str> = hosts.iter().map(|h| h["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    let alpha = by_name(&hosts, "alpha");
    for (field, value) in [
        ("vmms", Value::from("docker")),
        ("url", "tcp://alpha.example.edu:2376".into()),
        ("up", true.into()),
        ("draining", false.into()),
        ("max_vms", 4.into()),
        ("vms", 0.into()),
        ("running_jobs", 0.into()),
        ("vm_starts", 0.into()),
        ("vm_start_failures", 0.into()),
    ] {
        assert_eq!(alpha[field], value, "{field}: {alpha}");
    }

    // Host names from the URL are checked before use; unknown ones are 404.
    let long = "h".repeat(65);
    for bad in ["a%20b", "%C3%A9", "a%22b", long.as_str()] {
        let (status, v) = v2(
            &c,
            Method::POST,
            &format!("/v2/hosts/{bad}/drain"),
            Some(KEY),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(v["error"].as_str().unwrap().contains("host name"), "{v}");
    }
    let (status, v) = v2(&c, Method::POST, "/v2/hosts/gamma/undrain", Some(KEY)).await;
    assert_eq!(status, 404, "{v}");
    let message = v["error"].as_str().unwrap();
    assert!(
        message.contains("\"gamma\"") && message.contains("/v2/hosts"),
        "{message}"
    );
    let (status, _) = v2(&c, Method::GET, "/v2/hosts/alpha/drain", Some(KEY)).await;
    assert_eq!(status, 405, "drain is a POST");

    // Two idle VMs in a pool, both on alpha (the first host with room).
    c.open("hostlab").await;
    c.upload("hostlab", "Makefile", MAKEFILE).await;
    let v = c.get(&format!("/prealloc/{KEY}/{IMAGE}/2/")).await;
    assert_eq!(v["statusId"], 0, "{v}");
    c.wait_pool(IMAGE, 2).await;
    assert_eq!(
        by_name(&c.v2_list("/v2/hosts", "hosts").await, "alpha")["vms"],
        2
    );

    // Drained: the answer is its new status; its idle VMs go.
    let (status, v) = v2(&c, Method::POST, "/v2/hosts/alpha/drain", Some(KEY)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["name"], "alpha", "{v}");
    assert_eq!(v["draining"], true, "{v}");
    wait_hosts(&c, "alpha's idle VMs removed", |h| {
        by_name(h, "alpha")["vms"] == 0
    })
    .await;
    let pool = c.get(&format!("/pool/{KEY}/{IMAGE}/")).await;
    assert_eq!(
        pool["pools"][IMAGE]["free"].as_array().map(Vec::len),
        Some(0),
        "{pool}"
    );

    // A job now runs on beta, and its records say so.
    let id = run_job(&c, "on-beta").await;
    let (status, one) = v2(&c, Method::GET, &format!("/v2/jobs/{id}"), Some(KEY)).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["host"], "beta", "{one}");
    let (_, list) = v2(&c, Method::GET, "/v2/jobs?state=done", Some(KEY)).await;
    let listed = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(listed["host"], "beta", "{listed}");
    let dead = c.get(&format!("/jobs/{KEY}/1/")).await;
    let record = dead["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .unwrap_or_else(|| panic!("{dead}"));
    assert_eq!(record["vm"]["host"], "beta", "{record}");

    // The metrics, one series per host, as /v2/hosts says. The pool
    // (target 2) was topped up on beta after the job: wait for that first.
    c.wait_pool(IMAGE, 2).await;
    let text = c.metrics_text().await;
    let hosts = c.v2_list("/v2/hosts", "hosts").await;
    assert_eq!(by_name(&hosts, "alpha")["vm_starts"], 2, "{hosts:?}");
    assert!(
        by_name(&hosts, "beta")["vm_starts"].as_u64() >= Some(1),
        "{hosts:?}"
    );
    let mut lines = vec![
        "# TYPE tango_docker_host_up gauge".to_string(),
        "# TYPE tango_docker_host_vm_starts_total counter".to_string(),
    ];
    for h in &hosts {
        let name = h["name"].as_str().unwrap();
        let flag = |f: &str| u8::from(h[f] == true);
        lines.push(format!(
            "tango_docker_host_up{{host=\"{name}\"}} {}",
            flag("up")
        ));
        lines.push(format!(
            "tango_docker_host_draining{{host=\"{name}\"}} {}",
            flag("draining")
        ));
        for (metric, field) in [
            ("vms", "vms"),
            ("max_vms", "max_vms"),
            ("running_jobs", "running_jobs"),
            ("vm_starts_total", "vm_starts"),
            ("vm_start_failures_total", "vm_start_failures"),
        ] {
            lines.push(format!(
                "tango_docker_host_{metric}{{host=\"{name}\"}} {}",
                h[field]
            ));
        }
    }
    assert!(lines.contains(&"tango_docker_host_draining{host=\"alpha\"} 1".to_string()));
    for line in lines {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in /metrics:\n{text}"
        );
    }

    // A host that stops answering shows as down.
    server.backend.set_up("beta", false);
    assert!(c
        .metrics_text()
        .await
        .lines()
        .any(|l| l == "tango_docker_host_up{host=\"beta\"} 0"));
    assert_eq!(
        by_name(&c.v2_list("/v2/hosts", "hosts").await, "beta")["up"],
        false
    );

    // `tango hosts`: the table, JSON, drain and undrain, and the errors.
    let url = server.url.clone();
    let (code, out, err) = tango(&url, KEY, &["hosts"]).await;
    assert_eq!(code, 0, "{out}{err}");
    for header in [
        "name", "vmms", "state", "draining", "vms/max", "running", "starts", "failures", "url",
    ] {
        assert!(out.contains(header), "no column {header}:\n{out}");
    }
    let row = |out: &str, name: &str| -> Vec<String> {
        let line = out
            .lines()
            .find(|l| l.contains(&format!(" {name} ")))
            .unwrap_or_else(|| panic!("no row {name}:\n{out}"));
        line.split(['│', '┆'])
            .map(|cell| cell.trim().to_string())
            .filter(|cell| !cell.is_empty())
            .collect()
    };
    let hosts = c.v2_list("/v2/hosts", "hosts").await;
    assert_eq!(
        row(&out, "alpha"),
        expected_row(by_name(&hosts, "alpha")),
        "{out}"
    );
    assert_eq!(
        row(&out, "beta"),
        expected_row(by_name(&hosts, "beta")),
        "{out}"
    );
    assert_eq!(row(&out, "alpha")[2..4], ["up", "draining"], "{out}");
    assert_eq!(row(&out, "beta")[2], "down", "{out}");
    let (code, out, err) = tango(&url, KEY, &["--json", "hosts"]).await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["hosts"].as_array().unwrap().len(), 2, "{v}");

    let (code, out, err) = tango(&url, KEY, &["hosts", "undrain", "alpha"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("alpha undrained"), "{out}");
    assert_eq!(
        row(&out, "alpha"),
        expected_row(by_name(&c.v2_list("/v2/hosts", "hosts").await, "alpha")),
        "{out}"
    );
    assert_eq!(
        by_name(&c.v2_list("/v2/hosts", "hosts").await, "alpha")["draining"],
        false
    );
    let (code, out, err) = tango(&url, KEY, &["--json", "hosts", "drain", "beta"]).await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["name"].as_str(), v["draining"].as_bool()),
        (Some("beta"), Some(true)),
        "{v}"
    );
    let id = run_job(&c, "on-alpha").await;
    let (_, one) = v2(&c, Method::GET, &format!("/v2/jobs/{id}"), Some(KEY)).await;
    assert_eq!(one["host"], "alpha", "undrained alpha takes the job: {one}");

    let (code, out, err) = tango(&url, KEY, &["hosts", "drain", "gamma"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("HTTP 404") && err.contains("no host named \"gamma\""),
        "{err}"
    );
    let (code, _, err) = tango(&url, "wrongkey", &["hosts"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("HTTP 401") && err.contains("TANGO_KEY"),
        "{err}"
    );
    assert!(!err.contains("wrongkey"), "the key is shown: {err}");
    let (code, _, err) = tango(&url, KEY, &["hosts", "drain", "a/b"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("HTTP 400") && err.contains("host name"),
        "{err}"
    );

    // The dashboard's Hosts table and the job's host, in a real browser.
    let Some(dom) = chromium(
        &format!("{url}/dashboard#key={KEY}"),
        &["--dump-dom".into()],
    )
    .await
    else {
        eprintln!(
            "SKIPPED the browser part of hosts_are_listed_drained_undrained_and_measured: \
             no `chromium` (apt-get install -y chromium)"
        );
        return;
    };
    let at = dom
        .find("<section id=\"hosts-card\"")
        .unwrap_or_else(|| panic!("no hosts card:\n{dom}"));
    let tag = &dom[at..at + dom[at..].find('>').unwrap()];
    assert!(!tag.contains("hidden"), "the hosts card is hidden: {tag}");
    let table = table_body(&dom, "hosts");
    for h in c.v2_list("/v2/hosts", "hosts").await {
        let state = match (h["up"].as_bool(), h["draining"].as_bool()) {
            (Some(true), Some(false)) => "up",
            (Some(true), Some(true)) => "up, draining",
            (Some(false), Some(false)) => "down",
            _ => "down, draining",
        };
        let cells = format!(
            "<td>{}</td><td>{state}</td><td>{} / {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            h["name"].as_str().unwrap(),
            h["vms"],
            h["max_vms"],
            h["running_jobs"],
            h["vm_starts"],
            h["vm_start_failures"],
            h["url"].as_str().unwrap()
        );
        assert!(
            table.contains(&cells),
            "no {cells} in the Hosts table:\n{table}"
        );
    }
    assert!(table.contains("<td>down, draining</td>"), "{table}");
    let recent = table_body(&dom, "recent");
    assert!(
        recent.contains("<td>alpha</td>") && recent.contains("<td>beta</td>"),
        "the recent jobs show no host:\n{recent}"
    );
}
