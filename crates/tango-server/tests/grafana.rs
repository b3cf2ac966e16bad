//! deploy/grafana-dashboard.json reads only metrics tangod exports: every
//! metric its queries name (every label value they match on, every label
//! they group by) is in the `/metrics` of a real tangod (sandbox backend)
//! that ran jobs; the Servers row charts the servers registry's metrics.
//! The Docker hosts' metrics have samples only where the docker backend
//! has hosts: those are checked against tangod's application over a
//! backend of two hosts (tests/common/hosts_backend.rs).

mod common;

use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const HELLO_MAKEFILE: &[u8] = b"all:\n\t@echo 'Hello, Grafana!'\n";

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../deploy/grafana-dashboard.json"
);

/// Where a metric name ends, in PromQL.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// One use of a metric in a query: its name and the `label="value"` (or
/// `=~`, `!=`, `!~`) matchers in braces after it.
#[derive(Debug)]
struct Selector {
    name: String,
    matchers: Vec<(String, String, String)>,
}

/// Every `tango_*` selector in a PromQL expression. Label names in
/// `by (...)` are not metric names; they do not start with `tango_`.
fn selectors(expr: &str) -> Vec<Selector> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("tango_") {
        let preceded_by_name = rest[..at].chars().next_back().is_some_and(is_name_char);
        let after = &rest[at..];
        let len = after.find(|c| !is_name_char(c)).unwrap_or(after.len());
        let name = &after[..len];
        rest = &after[len..];
        if preceded_by_name {
            continue;
        }
        let mut matchers = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let close = inner
                .find('}')
                .unwrap_or_else(|| panic!("unclosed braces in {expr:?}"));
            for matcher in inner[..close].split(',').filter(|m| !m.trim().is_empty()) {
                let op_at = matcher
                    .find(['=', '!'])
                    .unwrap_or_else(|| panic!("bad matcher {matcher:?} in {expr:?}"));
                let label = matcher[..op_at].trim();
                let after_label = &matcher[op_at..];
                let op_len = after_label
                    .find('"')
                    .unwrap_or_else(|| panic!("unquoted value in {matcher:?} of {expr:?}"));
                let op = after_label[..op_len].trim();
                let value = after_label[op_len..].trim().trim_matches('"');
                matchers.push((label.to_string(), op.to_string(), value.to_string()));
            }
            rest = &inner[close + 1..];
        }
        found.push(Selector {
            name: name.to_string(),
            matchers,
        });
    }
    found
}

/// The labels of every `by (...)` in a PromQL expression.
fn grouping_labels(expr: &str) -> Vec<String> {
    let mut labels = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("by (") {
        let inner = &rest[at + "by (".len()..];
        let close = inner
            .find(')')
            .unwrap_or_else(|| panic!("unclosed by ( in {expr:?}"));
        labels.extend(
            inner[..close]
                .split(',')
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty()),
        );
        rest = &inner[close..];
    }
    labels
}

/// Every PromQL text in the dashboard: panel target `expr`s (panels may be
/// nested in rows) and the template variables' queries.
fn queries(dashboard: &Value) -> Vec<String> {
    fn walk(value: &Value, key: Option<&str>, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    walk(v, Some(k), out);
                }
            }
            Value::Array(items) => {
                for item in items {
                    walk(item, key, out);
                }
            }
            Value::String(s) if matches!(key, Some("expr" | "query" | "definition")) => {
                out.push(s.clone())
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, None, &mut out);
    out
}

/// The family a sample belongs to: a histogram's `_bucket`, `_sum` and
/// `_count` series are its family's.
fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.get(base).map(String::as_str) == Some("histogram") {
                return base;
            }
        }
    }
    name
}

struct Scrape {
    /// Family name -> type, from the `# TYPE` lines.
    types: BTreeMap<String, String>,
    /// Sample name -> the label sets of its samples.
    samples: BTreeMap<String, Vec<BTreeMap<String, String>>>,
}

/// The exposition's `# TYPE` lines and its samples' names and labels (the
/// dashboard test checks the format itself in detail).
fn parse_scrape(text: &str) -> Scrape {
    let mut types = BTreeMap::new();
    let mut samples: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# TYPE ") {
            let words: Vec<&str> = comment.split_whitespace().collect();
            assert_eq!(words.len(), 2, "bad TYPE line {line:?}");
            types.insert(words[0].to_string(), words[1].to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let name_end = line.find(|c| !is_name_char(c)).unwrap_or(line.len());
        let mut labels = BTreeMap::new();
        if let Some(inner) = line[name_end..].strip_prefix('{') {
            // Label values of tangod's metrics hold no `",` or `}`.
            let close = inner.rfind('}').expect("closing brace");
            for pair in inner[..close].split("\",").filter(|p| !p.is_empty()) {
                let (label, value) = pair.split_once("=\"").expect("label=\"value\"");
                labels.insert(label.to_string(), value.trim_end_matches('"').to_string());
            }
        }
        samples
            .entry(line[..name_end].to_string())
            .or_default()
            .push(labels);
    }
    Scrape { types, samples }
}

/// Where the per-host metrics of the docker backend start.
const HOST_METRICS: &str = "tango_docker_host_";

/// The dashboard and every (query, selector) of it.
fn dashboard_selectors() -> (Value, Vec<String>, Vec<(String, Selector)>) {
    let text = std::fs::read_to_string(DASHBOARD).expect("read deploy/grafana-dashboard.json");
    let dashboard: Value = serde_json::from_str(&text).expect("the Grafana dashboard is JSON");
    let queries = queries(&dashboard);
    let used: Vec<(String, Selector)> = queries
        .iter()
        .flat_map(|q| selectors(q).into_iter().map(move |s| (q.clone(), s)))
        .collect();
    (dashboard, queries, used)
}

/// What the selectors ask for that the scrape lacks: a family, samples
/// (unless `families_only`), a label value, a label grouped by.
fn missing<'a>(
    used: impl Iterator<Item = &'a (String, Selector)>,
    metrics: &Scrape,
    families_only: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut missing = Vec::new();
    for (query, selector) in used {
        let name = selector.name.as_str();
        let family = family_of(name, &metrics.types);
        if !metrics.types.contains_key(family) {
            missing.push(format!("{name}: no such metric family (in {query})"));
            continue;
        }
        if families_only(name) {
            continue;
        }
        let Some(series) = metrics.samples.get(name) else {
            missing.push(format!("{name}: no samples (in {query})"));
            continue;
        };
        if name.ends_with("_bucket") && !series.iter().all(|l| l.contains_key("le")) {
            missing.push(format!("{name}: buckets without le"));
        }
        // A query of one metric groups by labels its series have (in a
        // query of several, a label may be another metric's).
        if selectors(query).len() == 1 {
            for label in grouping_labels(query) {
                // `instance` is the label Prometheus adds to every scraped
                // series.
                if label != "instance" && !series.iter().any(|l| l.contains_key(&label)) {
                    missing.push(format!(
                        "{name}: no series has the label {label} it is grouped by (in {query})"
                    ));
                }
            }
        }
        for (label, op, value) in &selector.matchers {
            if label == "instance" {
                continue;
            }
            let matched = series.iter().any(|labels| match op.as_str() {
                "=" => labels.get(label) == Some(value),
                // The dashboard's regex and negative matchers (none today)
                // need at least the label to be there.
                _ => labels.contains_key(label),
            });
            if !matched {
                missing.push(format!(
                    "{name}{{{label}{op}\"{value}\"}}: no such series (in {query})"
                ));
            }
        }
    }
    missing
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_dashboard_queries_only_exported_metrics() {
    // The dashboard file first: this part needs no root.
    let (dashboard, queries, used) = dashboard_selectors();
    let names: BTreeSet<&str> = used.iter().map(|(_, s)| s.name.as_str()).collect();
    // Not vacuous: the panels chart the queue, phases, pools, errors,
    // callbacks and HTTP durations.
    assert!(names.len() >= 10, "only {names:?} in {queries:#?}");
    let panels_without_query: Vec<&str> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["type"] != "row" && p["type"] != "text")
        .filter(|p| {
            !p["targets"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["expr"].is_string()))
        })
        .map(|p| p["title"].as_str().unwrap_or("?"))
        .collect();
    assert!(
        panels_without_query.is_empty(),
        "panels with no PromQL target: {panels_without_query:?}"
    );

    // The Servers row (issue 21) charts the servers registry's metrics.
    let panels = dashboard["panels"].as_array().expect("panels");
    let row = panels
        .iter()
        .position(|p| p["type"] == "row" && p["title"] == "Servers")
        .expect("a Servers row");
    let in_row: BTreeSet<String> = panels[row + 1..]
        .iter()
        .take_while(|p| p["type"] != "row")
        .flat_map(crate::queries)
        .flat_map(|q| selectors(&q).into_iter().map(|s| s.name))
        .collect();
    assert_eq!(
        in_row,
        BTreeSet::from(["tango_server_info".into(), "tango_servers_alive".into()]),
        "the Servers row's metrics"
    );
    assert!(
        queries.iter().any(|q| q.contains("by (server")),
        "no panel lists the servers by name"
    );

    if !root_or_skip("grafana_dashboard_queries_only_exported_metrics") {
        return;
    }
    // A tangod that ran jobs: one done with a callback delivered, one done
    // with a callback abandoned, one failed on an image the backend cannot
    // start, so that every family has samples (the error counters have
    // none before the first error).
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("images/broken/bin")).unwrap();
    let server = Tangod::start(
        &data,
        "[engine]\ncallback_deadline_secs = 2\ncallback_initial_backoff_ms = 100\n",
    );
    let c = server.client();
    let receiver = Receiver::start().await;
    c.open("grafanalab").await;
    c.upload("grafanalab", "Makefile", HELLO_MAKEFILE).await;
    let live = receiver.url_for("cb");
    for (i, callback) in [(1, Some(live.as_str())), (2, Some("http://127.0.0.1:1/cb"))] {
        let v = c
            .add_job(
                "grafanalab",
                &job(&format!("grafana-{i}"), &format!("out{i}"), callback, 20),
            )
            .await;
        assert_eq!(v["statusId"], 0, "{v}");
    }
    let mut broken = job("grafana-broken", "brokenout", None, 20);
    broken["image"] = "broken".into();
    c.add_job("grafanalab", &broken).await;
    for out in ["out1", "out2", "brokenout"] {
        c.wait_output("grafanalab", out, Duration::from_secs(30))
            .await;
    }
    receiver.wait_for(1, Duration::from_secs(20)).await;
    let start = Instant::now();
    let metrics = loop {
        let text = c.metrics_text().await;
        if text.contains("\ntango_callbacks_abandoned_total 1\n") {
            break parse_scrape(&text);
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the dead callback was never abandoned:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // A sandbox tangod has no Docker hosts: their families are there,
    // empty (their samples are checked below).
    let missing = missing(used.iter(), &metrics, |name| name.starts_with(HOST_METRICS));
    assert!(
        missing.is_empty(),
        "the Grafana dashboard asks for what tangod does not export:\n{}",
        missing.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_host_panels_query_exported_host_metrics() {
    let (_, _, used) = dashboard_selectors();
    let host_selectors: Vec<&(String, Selector)> = used
        .iter()
        .filter(|(_, s)| s.name.starts_with(HOST_METRICS))
        .collect();
    let names: BTreeSet<&str> = host_selectors
        .iter()
        .map(|(_, s)| s.name.as_str())
        .collect();
    // Up, drained, containers, max_vms, running jobs, starts, failed starts.
    assert_eq!(names.len(), 7, "{names:?}");
    let server = common::hosts_backend::HostsServer::start(4).await;
    let c = server.client();
    // A VM on a host, so every counter has moved off its start.
    let v = c
        .get(&format!(
            "/prealloc/{KEY}/{}/1/",
            common::hosts_backend::IMAGE
        ))
        .await;
    assert_eq!(v["statusId"], 0, "{v}");
    c.wait_pool(common::hosts_backend::IMAGE, 1).await;
    let metrics = parse_scrape(&c.metrics_text().await);
    assert_eq!(
        metrics.samples.get("tango_docker_host_up").map(Vec::len),
        Some(2),
        "one series per host"
    );
    let missing = missing(host_selectors.into_iter(), &metrics, |_| false);
    assert!(
        missing.is_empty(),
        "the Grafana dashboard's host panels ask for what tangod does not export:\n{}",
        missing.join("\n")
    );
}

#[test]
fn selectors_are_found_in_promql() {
    let found = selectors(
        "histogram_quantile(0.95, sum by (le, phase) (rate(tango_phase_seconds_bucket{instance=~\"$instance\", phase=\"run\"}[5m]))) / tango_queue_depth",
    );
    let names: Vec<&str> = found.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["tango_phase_seconds_bucket", "tango_queue_depth"]);
    assert_eq!(
        found[0].matchers,
        [
            ("instance".into(), "=~".into(), "$instance".into()),
            ("phase".into(), "=".into(), "run".into())
        ]
    );
    assert!(found[1].matchers.is_empty());
    // A name that merely contains tango_ is not a tango metric.
    assert!(selectors("not_tango_metric").is_empty());
    let types = BTreeMap::from([("tango_phase_seconds".to_string(), "histogram".to_string())]);
    assert_eq!(
        family_of("tango_phase_seconds_bucket", &types),
        "tango_phase_seconds"
    );
    assert_eq!(family_of("tango_jobs_count", &types), "tango_jobs_count");
    assert_eq!(
        grouping_labels("max by (server, instance) (x) + sum by (le) (y)"),
        ["server", "instance", "le"]
    );
    assert!(grouping_labels("sum(tango_queue_depth)").is_empty());
}
