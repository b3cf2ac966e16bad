//! `/metrics`, `/v2/` and `/dashboard` against a real tangod (sandbox
//! backend) running real jobs; the dashboard is loaded in headless Chromium
//! (Debian's `chromium`), which must list the jobs and show live output.

mod common;

use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const HELLO_MAKEFILE: &[u8] =
    b"all:\n\t@echo 'Hello, dashboard!'\n\t@echo '{\"scores\": {\"hello\": 100}}'\n";
/// Prints a line every 2 s for 20 s. The dashboard shows a running job's
/// last 6 lines, so "tick 2" stays on the page from 2 s to 14 s, and the job
/// is still running when the checks and the browser look at it, however
/// slowly they start (a line every 0.5 s for 8 s left a window of 1.5 s to
/// 3.5 s: in one CI run the job had ended, in another tick 2 had scrolled
/// away).
const TICKING_MAKEFILE: &[u8] =
    b"all:\n\t@for i in $$(seq 1 10); do echo \"tick $$i\"; sleep 2; done\n";

/// One sample line of the text exposition format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses `name{label="value",...} number`; `Err` says what is wrong.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("bad metric name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = rest.find('=').ok_or("label without =")?;
            let label = &rest[..eq];
            if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("bad label name {label:?}"));
            }
            rest = rest[eq + 1..]
                .strip_prefix('"')
                .ok_or("label value not quoted")?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let close = loop {
                match chars.next().ok_or("unterminated label value")? {
                    (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                        'n' => value.push('\n'),
                        c @ ('\\' | '"') => value.push(c),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            labels.insert(label.to_string(), value);
            rest = &rest[close + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

struct Exposition {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    /// Parses a whole exposition, failing on any line that is neither a
    /// comment nor a sample.
    fn parse(text: &str) -> Exposition {
        let mut types = BTreeMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(comment) = line.strip_prefix('#') {
                let words: Vec<&str> = comment.split_whitespace().collect();
                if words.first() == Some(&"TYPE") {
                    assert_eq!(words.len(), 3, "bad TYPE line {line:?}");
                    types.insert(words[1].to_string(), words[2].to_string());
                }
                continue;
            }
            match parse_sample(line) {
                Ok(sample) => samples.push(sample),
                Err(e) => panic!("metrics line {line:?} does not parse: {e}"),
            }
        }
        Exposition { types, samples }
    }

    /// The value of the one sample with this name and these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
        found[0].value
    }
}

async fn metrics(c: &Client) -> Exposition {
    let r = c
        .http
        .get(format!("{}/metrics", c.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = r.text().await.unwrap();
    assert!(!text.contains(KEY), "the key appears in /metrics:\n{text}");
    Exposition::parse(&text)
}

async fn v2(c: &Client, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = c.http.get(format!("{}{path}", c.url));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("application/json"), "{path}: {ct}");
    (status, r.json().await.unwrap())
}

/// Waits until `check` holds for a fresh `/metrics`, or fails after 20 s.
async fn wait_metrics(c: &Client, what: &str, check: impl Fn(&Exposition) -> bool) -> Exposition {
    let start = Instant::now();
    loop {
        let m = metrics(c).await;
        if check(&m) {
            return m;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The text of the element with this id in a dumped DOM (no nested tags).
fn element_text(dom: &str, id: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = at + dom[at..].find('>')? + 1;
    let end = start + dom[start..].find('<')?;
    Some(dom[start..end].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_v2_and_dashboard_show_the_jobs() {
    if !root_or_skip("metrics_v2_and_dashboard_show_the_jobs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_broken_image(&data);
    // Short callback deadlines, so the dead callback below is abandoned
    // within the test.
    let server = Tangod::start(
        &data,
        "[engine]\ncallback_deadline_secs = 2\ncallback_initial_backoff_ms = 100\n",
    );
    let c = server.client();
    let receiver = Receiver::start().await;

    // Three quick jobs, one with a callback.
    c.open("dashlab").await;
    c.upload("dashlab", "Makefile", HELLO_MAKEFILE).await;
    let callback = receiver.url_for("cb1");
    for (i, cb) in [(1, Some(callback.as_str())), (2, None), (3, None)] {
        let v = c
            .add_job(
                "dashlab",
                &job(&format!("dash-job-{i}"), &format!("out{i}"), cb, 20),
            )
            .await;
        assert_eq!(v["statusId"], 0, "{v}");
    }
    for i in 1..=3 {
        let out = c
            .wait_output("dashlab", &format!("out{i}"), Duration::from_secs(30))
            .await;
        assert!(String::from_utf8_lossy(&out).contains("Hello, dashboard!"));
    }
    receiver.wait_for(1, Duration::from_secs(20)).await;

    // A job done whose callback goes nowhere (retried, then abandoned), and
    // one on an image the backend cannot start (a backend error on every
    // try, then failed).
    let v = c
        .add_job(
            "dashlab",
            &job("dash-deadcb", "outdead", Some("http://127.0.0.1:1/cb"), 20),
        )
        .await;
    let deadcb_id = v["jobId"].as_str().unwrap().to_string();
    c.open("brokenlab").await;
    c.upload("brokenlab", "Makefile", HELLO_MAKEFILE).await;
    let mut broken = job("dash-broken", "brokenout", None, 20);
    broken["image"] = "broken".into();
    let v = c.add_job("brokenlab", &broken).await;
    assert_eq!(v["statusId"], 0, "{v}");
    c.wait_output("dashlab", "outdead", Duration::from_secs(30))
        .await;
    let out = c
        .wait_output("brokenlab", "brokenout", Duration::from_secs(30))
        .await;
    assert!(
        String::from_utf8_lossy(&out).contains("Internal error"),
        "{}",
        String::from_utf8_lossy(&out)
    );

    // A job that is still running (and printing) while we look.
    c.open("ticking").await;
    c.upload("ticking", "Makefile", TICKING_MAKEFILE).await;
    let v = c
        .add_job("ticking", &job("dash-ticking", "tickout", None, 60))
        .await;
    let ticking_id = v["jobId"].as_str().unwrap().to_string();
    let start = Instant::now();
    loop {
        let (status, v) = v2(&c, &format!("/v2/jobs/{ticking_id}"), Some(KEY)).await;
        assert_eq!(status, 200, "{v}");
        if v["state"] == "running" && v["output_tail"].as_str().unwrap_or("").contains("tick 2") {
            assert_eq!(v["output_source"], "live");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no live output: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // /metrics: every line parses, the families exist, counts match.
    let m = wait_metrics(&c, "the callbacks counted", |m| {
        m.value("tango_callbacks_delivered_total", &[]) == 1.0
            && m.value("tango_callbacks_abandoned_total", &[]) == 1.0
    })
    .await;
    for (family, kind) in [
        ("tango_jobs", "gauge"),
        ("tango_jobs_finished_total", "counter"),
        ("tango_queue_depth", "gauge"),
        ("tango_oldest_waiting_job_seconds", "gauge"),
        ("tango_phase_seconds", "histogram"),
        ("tango_pool_vms", "gauge"),
        ("tango_backend_errors_total", "counter"),
        ("tango_callback_retries_total", "counter"),
        ("tango_callbacks_delivered_total", "counter"),
        ("tango_callbacks_abandoned_total", "counter"),
        ("tango_http_request_duration_seconds", "histogram"),
    ] {
        assert_eq!(
            m.types.get(family).map(String::as_str),
            Some(kind),
            "{family}"
        );
    }
    assert_eq!(m.value("tango_jobs", &[("state", "running")]), 1.0);
    assert_eq!(m.value("tango_jobs", &[("state", "queued")]), 0.0);
    assert_eq!(m.value("tango_queue_depth", &[]), 0.0);
    assert_eq!(
        m.value("tango_jobs_finished_total", &[("outcome", "done")]),
        4.0
    );
    assert_eq!(
        m.value("tango_jobs_finished_total", &[("outcome", "failed")]),
        1.0
    );
    // Only the jobs that ran to an outcome (the 4 done) are timed.
    for phase in ["waiting_for_vm", "copy_in", "run", "copy_out", "total"] {
        let count = m.value("tango_phase_seconds_count", &[("phase", phase)]);
        assert_eq!(count, 4.0, "{phase}");
        let inf = m.value(
            "tango_phase_seconds_bucket",
            &[("phase", phase), ("le", "+Inf")],
        );
        assert_eq!(inf, count, "{phase}");
    }
    assert_eq!(
        m.value(
            "tango_phase_seconds_count",
            &[("phase", "callback_delivery")]
        ),
        1.0
    );
    assert!(m.value("tango_pool_vms", &[("image", "host"), ("state", "total")]) >= 1.0);
    // The broken image failed at initialize on the first try and on each of
    // the default 2 retries.
    assert_eq!(
        m.value(
            "tango_backend_errors_total",
            &[("backend", "sandbox"), ("step", "initialize")]
        ),
        3.0
    );
    assert!(m.value("tango_callback_retries_total", &[]) >= 1.0);
    let add_jobs = m.value(
        "tango_http_request_duration_seconds_count",
        &[
            ("route", "/addJob/{key}/{courselab}"),
            ("method", "POST"),
            ("status", "200"),
        ],
    );
    assert_eq!(add_jobs, 6.0);
    let routes: BTreeSet<&str> = m
        .samples
        .iter()
        .filter_map(|s| s.labels.get("route").map(String::as_str))
        .collect();
    assert!(
        routes
            .iter()
            .all(|r| *r == "unmatched" || r.starts_with('/')),
        "{routes:?}"
    );

    // /v2 authentication.
    let (status, v) = v2(&c, "/v2/jobs", None).await;
    assert_eq!(status, 401, "{v}");
    assert!(v["error"].is_string());
    let (status, _) = v2(&c, "/v2/jobs", Some("wrongkey")).await;
    assert_eq!(status, 401);
    let (status, _) = v2(&c, &format!("/v2/summary?key={KEY}"), Some(KEY)).await;
    assert_eq!(status, 400, "a key in the URL is refused");
    let (status, v) = v2(&c, "/v2/jobs?state=sleeping", Some(KEY)).await;
    assert_eq!(status, 400, "{v}");

    // /v2 contents.
    let (status, v) = v2(&c, "/v2/jobs?state=done", Some(KEY)).await;
    assert_eq!(status, 200, "{v}");
    let names: Vec<&str> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["dash-deadcb", "dash-job-3", "dash-job-2", "dash-job-1"]
    );
    assert_eq!(v["jobs"][0]["courselab"], "dashlab");
    let (_, failed) = v2(&c, "/v2/jobs?state=failed", Some(KEY)).await;
    assert_eq!(failed["jobs"].as_array().unwrap().len(), 1, "{failed}");
    assert_eq!(failed["jobs"][0]["name"], "dash-broken");
    assert_eq!(failed["jobs"][0]["courselab"], "brokenlab");
    // Pages of two, newest first, until there is no next page.
    let mut pages: Vec<Vec<String>> = Vec::new();
    let mut query = "/v2/jobs?limit=2".to_string();
    loop {
        let (status, page) = v2(&c, &query, Some(KEY)).await;
        assert_eq!(status, 200, "{page}");
        pages.push(
            page["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| j["name"].as_str().unwrap().to_string())
                .collect(),
        );
        let Some(before) = page["next_before_id"].as_u64() else {
            break;
        };
        assert!(pages.len() < 10, "paging does not end: {pages:?}");
        query = format!("/v2/jobs?limit=2&before_id={before}");
    }
    assert_eq!(
        pages,
        [
            ["dash-ticking", "dash-broken"],
            ["dash-deadcb", "dash-job-3"],
            ["dash-job-2", "dash-job-1"],
        ]
    );
    let (_, v) = v2(&c, "/v2/jobs?courselab=ticking", Some(KEY)).await;
    assert_eq!(v["jobs"].as_array().unwrap().len(), 1);

    // Newest first: dash-job-1 is the last one listed.
    let id = v2(&c, "/v2/jobs?state=done", Some(KEY)).await.1["jobs"][3]["id"]
        .as_u64()
        .unwrap();
    let (status, one) = v2(&c, &format!("/v2/jobs/{id}"), Some(KEY)).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["name"], "dash-job-1");
    assert_eq!(one["output_source"], "file");
    assert!(one["output_tail"]
        .as_str()
        .unwrap()
        .contains("Hello, dashboard!"));
    assert!(one["phases"]["callback_delivered"].is_i64(), "{one}");
    assert!(one["trace"].as_array().unwrap().len() >= 2);
    // The engine counts the abandoned callback a moment before it notes
    // it in the job's trace.
    let start = Instant::now();
    loop {
        let (_, dead) = v2(&c, &format!("/v2/jobs/{deadcb_id}"), Some(KEY)).await;
        assert!(dead["phases"]["callback_delivered"].is_null(), "{dead}");
        let noted = dead["trace"].as_array().unwrap().iter().any(|t| {
            t["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("Callback abandoned after")
        });
        if noted {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the abandoned callback is not in the trace: {dead}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = v2(&c, "/v2/jobs/999999", Some(KEY)).await;
    assert_eq!(status, 404);

    let (_, pools) = v2(&c, "/v2/pools", Some(KEY)).await;
    let images: BTreeSet<&str> = pools["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["image"].as_str().unwrap())
        .collect();
    assert!(images.contains("host"), "{pools}");
    let (_, summary) = v2(&c, "/v2/summary", Some(KEY)).await;
    assert_eq!(summary["jobs"]["running"], 1);
    assert_eq!(summary["finished_total"]["done"], 4);
    assert_eq!(summary["finished_total"]["failed"], 1);
    let done_last_hour: u64 = summary["throughput"]["done"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(done_last_hour, 4);

    // The page and its assets, embedded, with a content security policy.
    for path in [
        "/dashboard",
        "/dashboard/dashboard.js",
        "/dashboard/dashboard.css",
    ] {
        let r = reqwest::get(format!("{}{path}", c.url)).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(
            r.headers().contains_key("content-security-policy"),
            "{path}"
        );
    }

    // The dashboard in a real browser: the key from the fragment, the jobs
    // listed, the running job's live output shown.
    let dom = chromium(
        &format!("{}/dashboard#key={KEY}", c.url),
        &["--dump-dom".into()],
    )
    .await;
    let Some(dom) = dom else {
        eprintln!(
            "SKIPPED the browser part of metrics_v2_and_dashboard_show_the_jobs: no `chromium` \
             (apt-get install -y chromium)"
        );
        return;
    };
    for name in [
        "dash-job-1",
        "dash-job-2",
        "dash-job-3",
        "dash-ticking",
        "dash-deadcb",
        "dash-broken",
    ] {
        assert!(dom.contains(name), "{name} is not in the dashboard:\n{dom}");
    }
    // The tiles count the failure and the callback that gave up.
    assert_eq!(element_text(&dom, "t-done").as_deref(), Some("4"), "{dom}");
    assert_eq!(
        element_text(&dom, "t-failed").as_deref(),
        Some("1"),
        "{dom}"
    );
    let callbacks = element_text(&dom, "t-callbacks-sub").unwrap_or_default();
    let retries: u32 = callbacks
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("callbacks tile: {callbacks:?}"));
    assert!(retries >= 1, "callbacks tile: {callbacks:?}");
    assert!(callbacks.ends_with("1 abandoned"), "{callbacks:?}");
    // "Recent failures" lists the broken job, and it alone.
    let failures = table_body(&dom, "failures");
    assert_eq!(failures.matches("<tr").count(), 1, "{failures}");
    assert!(
        failures.contains("dash-broken") && failures.contains("brokenlab"),
        "the broken job is not among the recent failures:\n{failures}"
    );
    assert!(
        dom.contains("tick 2"),
        "no live output in the dashboard:\n{dom}"
    );
    assert!(dom.contains("updated "), "the page never refreshed:\n{dom}");
    if let Some(path) = std::env::var_os("TANGO_DASHBOARD_SCREENSHOT") {
        chromium(
            &format!("{}/dashboard#key={KEY}", c.url),
            &[
                format!("--screenshot={}", std::path::Path::new(&path).display()),
                // Tall enough for everything down to "Recent jobs".
                "--window-size=1280,1150".into(),
            ],
        )
        .await;
    }

    // A wrong key brings the sign-in form back with a message.
    let dom = chromium(
        &format!("{}/dashboard#key=wrongkey", c.url),
        &["--dump-dom".into()],
    )
    .await
    .unwrap();
    assert!(dom.contains("That key was not recognized."), "{dom}");

    // The running job finishes and is counted.
    c.wait_output("ticking", "tickout", Duration::from_secs(60))
        .await;
    wait_metrics(&c, "5 jobs done", |m| {
        m.value("tango_jobs_finished_total", &[("outcome", "done")]) == 5.0
            && m.value("tango_jobs", &[("state", "running")]) == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_require_the_key() {
    if !root_or_skip("metrics_can_require_the_key") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Tangod::start(&dir.path().join("data"), "metrics_require_key = true\n");
    let c = server.client();
    let url = format!("{}/metrics", c.url);
    let r = c.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .http
        .get(&url)
        .bearer_auth("wrongkey")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c.http.get(&url).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    Exposition::parse(&r.text().await.unwrap());
}

/// A tangod run with `--log-format json` whose standard output and error
/// both go to one file: tangod logs to standard output, which the common
/// harness does not keep.
struct JsonLoggedTangod {
    child: std::process::Child,
    url: String,
    log: std::path::PathBuf,
}

impl JsonLoggedTangod {
    async fn start(data_dir: &std::path::Path, engine_toml: &str) -> JsonLoggedTangod {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Its own VM prefix, so other tests' orphan sweeps leave it alone.
        let prefix = format!("tjson{}x{port}", std::process::id());
        let config = data_dir.with_extension("toml");
        std::fs::write(
            &config,
            format!("[engine]\nprefix = \"{prefix}\"\n{engine_toml}"),
        )
        .unwrap();
        let log = data_dir.with_extension("log");
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tangod"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--key")
            .arg(KEY)
            .arg("--autodriver")
            .arg(autodriver())
            .arg("--config")
            .arg(&config)
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info,tango_core=debug")
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start tangod");
        let start = Instant::now();
        loop {
            if let Ok(r) = reqwest::get(format!("{url}/")).await {
                if r.status() == 200 {
                    break;
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "tangod exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "tangod did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        JsonLoggedTangod { child, url, log }
    }

    fn client(&self) -> Client {
        Client {
            http: reqwest::Client::new(),
            url: self.url.clone(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for JsonLoggedTangod {
    fn drop(&mut self) {
        // SIGTERM so the server removes its sandboxes.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The job id a JSON log line is about: its own `job` field or that of a
/// span it was logged in.
fn logged_job(line: &Value) -> Option<u64> {
    std::iter::once(&line["fields"])
        .chain(std::iter::once(&line["span"]))
        .chain(line["spans"].as_array().into_iter().flatten())
        .find_map(|fields| fields["job"].as_u64())
}

/// The courselab a JSON log line names, in its fields or a span's.
fn logged_courselab(line: &Value) -> Option<&str> {
    std::iter::once(&line["fields"])
        .chain(std::iter::once(&line["span"]))
        .chain(line["spans"].as_array().into_iter().flatten())
        .find_map(|fields| fields["courselab"].as_str())
}

/// Makes `data_dir/images/broken`: a "root filesystem" with only `bin/`,
/// which the sandbox lists as an image but cannot start a VM of (it lacks
/// the directories it mounts over): a real backend error at initialize.
fn make_broken_image(data_dir: &std::path::Path) {
    std::fs::create_dir_all(data_dir.join("images/broken/bin")).unwrap();
}

/// Sleeps a second: still queued or running when the same addJob comes again.
const SLEEPY_MAKEFILE: &[u8] = b"all:\n\t@sleep 1\n\t@echo slept\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_about_a_job_name_its_courselab() {
    if !root_or_skip("json_log_lines_about_a_job_name_its_courselab") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_broken_image(&data);
    let server = JsonLoggedTangod::start(
        &data,
        "callback_deadline_secs = 2\ncallback_initial_backoff_ms = 100\n",
    )
    .await;
    let c = server.client();

    // A job whose callback goes nowhere: retried, then abandoned.
    c.open("deadlab").await;
    c.upload("deadlab", "Makefile", HELLO_MAKEFILE).await;
    let v = c
        .add_job(
            "deadlab",
            &job("log-deadcb", "deadout", Some("http://127.0.0.1:1/cb"), 20),
        )
        .await;
    let dead_id: u64 = v["jobId"].as_str().unwrap().parse().unwrap();

    // The same addJob twice while the first is live: one job.
    c.open("duplab").await;
    c.upload("duplab", "Makefile", SLEEPY_MAKEFILE).await;
    let sleepy = job("log-dup", "dupout", None, 20);
    let first = c.add_job("duplab", &sleepy).await;
    let again = c.add_job("duplab", &sleepy).await;
    assert_eq!(first["jobId"], again["jobId"], "{first} {again}");
    let dup_id: u64 = first["jobId"].as_str().unwrap().parse().unwrap();

    // A job on an image the backend cannot start: retried, then failed.
    c.open("brokenlab").await;
    c.upload("brokenlab", "Makefile", HELLO_MAKEFILE).await;
    let mut broken = job("log-broken", "brokenout", None, 20);
    broken["image"] = "broken".into();
    let v = c.add_job("brokenlab", &broken).await;
    let broken_id: u64 = v["jobId"].as_str().unwrap().parse().unwrap();

    for (lab, out) in [
        ("deadlab", "deadout"),
        ("duplab", "dupout"),
        ("brokenlab", "brokenout"),
    ] {
        c.wait_output(lab, out, Duration::from_secs(30)).await;
    }
    wait_metrics(&c, "the dead callback abandoned", |m| {
        m.value("tango_callbacks_abandoned_total", &[]) == 1.0
    })
    .await;

    let log = server.log();
    let expected = [
        (dead_id, "deadlab"),
        (dup_id, "duplab"),
        (broken_id, "brokenlab"),
    ];
    let mut messages: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for text in log.lines() {
        let line: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {text}"));
        let Some(id) = logged_job(&line) else {
            continue;
        };
        let Some((_, lab)) = expected.iter().find(|(job, _)| *job == id) else {
            panic!("a log line about a job this test never added: {text}");
        };
        assert_eq!(
            logged_courselab(&line),
            Some(*lab),
            "a log line about job {id} does not name its courselab: {text}"
        );
        let message = line["fields"]["message"].as_str().unwrap_or_default();
        messages.entry(id).or_default().push(message.to_string());
    }
    // The lines the test is about were logged at all.
    for (id, wanted) in [
        (dead_id, "job added"),
        (dead_id, "job finished"),
        (dead_id, "callback failed"),
        (dead_id, "callback abandoned"),
        (dup_id, "duplicate addJob"),
        (broken_id, "system error"),
        (broken_id, "job finished"),
    ] {
        let said = messages.get(&id).cloned().unwrap_or_default();
        assert!(
            said.iter().any(|m| m.starts_with(wanted)),
            "no {wanted:?} line about job {id}: {said:?}\n{log}"
        );
    }
}

/// The submitter (the email in Autolab's jobName) of queued and running
/// jobs, in v1 `/jobs`, in `/v2/jobs` and on the dashboard (issue 20).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_show_their_submitters() {
    if !root_or_skip("jobs_show_their_submitters") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // One VM: the first job runs, the others wait behind it.
    let server = Tangod::start(
        &dir.path().join("data"),
        "[engine]\nmax_vms = 1\nshutdown_grace_secs = 1\n",
    );
    let c = server.client();
    let lab = "15213-f26-datalab";
    c.open(lab).await;
    c.upload(lab, "Makefile", b"all:\n\t@sleep 60\n").await;
    // Autolab's `<course>_<assessment>_<version>_<email>`, emails with
    // underscores and digits, and a name from another client.
    let jobs = [
        (
            "15213-f26_datalab_1_ann_lee7@andrew.cmu.edu",
            "ann_lee7@andrew.cmu.edu",
        ),
        ("15213-f26_datalab_12_bob@cmu.edu", "bob@cmu.edu"),
        ("15213-f26_data_lab_2_3_c_99@cmu.edu", "c_99@cmu.edu"),
        ("nightly-regrade", "nightly-regrade"),
    ];
    let mut ids = Vec::new();
    for (i, (name, _)) in jobs.iter().enumerate() {
        let v = c
            .add_job(lab, &job(name, &format!("out{i}"), None, 120))
            .await;
        assert_eq!(v["statusId"], 0, "{v}");
        ids.push(v["jobId"].as_str().unwrap().parse::<u64>().unwrap());
    }
    let start = Instant::now();
    loop {
        let (_, v) = v2(&c, &format!("/v2/jobs/{}", ids[0]), Some(KEY)).await;
        if v["state"] == "running" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the first job never ran: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let by_name = |list: &Value| -> BTreeMap<String, String> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|j| {
                let submitter = j["submitter"].as_str().unwrap_or_else(|| panic!("{j}"));
                (
                    j["name"].as_str().unwrap().to_string(),
                    submitter.to_string(),
                )
            })
            .collect()
    };
    let expected: BTreeMap<String, String> = jobs
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .collect();
    let v1 = c.get(&format!("/jobs/{KEY}/0/")).await;
    assert_eq!(by_name(&v1["jobs"]), expected, "{v1}");
    let (status, listed) = v2(&c, "/v2/jobs", Some(KEY)).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(by_name(&listed["jobs"]), expected, "{listed}");
    let (_, one) = v2(&c, &format!("/v2/jobs/{}", ids[1]), Some(KEY)).await;
    assert_eq!(one["submitter"], "bob@cmu.edu", "{one}");

    let Some(dom) = chromium(
        &format!("{}/dashboard#key={KEY}", c.url),
        &["--dump-dom".into()],
    )
    .await
    else {
        eprintln!(
            "SKIPPED the browser part of jobs_show_their_submitters: no `chromium` \
             (apt-get install -y chromium)"
        );
        return;
    };
    let queue = table_body(&dom, "queue");
    for (_, submitter) in &jobs[1..] {
        assert!(
            queue.contains(&format!("<td>{submitter}</td>")),
            "{submitter} is not in the queue's Submitter column:\n{queue}"
        );
    }
    assert!(
        dom.contains("by ann_lee7@andrew.cmu.edu"),
        "the running job's submitter is not on its card:\n{dom}"
    );
}
