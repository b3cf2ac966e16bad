//! `GET /metrics` in the Prometheus text exposition format (version 0.0.4),
//! and the middleware that times every HTTP request by route template.
//!
//! Labels never carry a raw request path: v1 URLs contain the client key, so
//! requests are labelled by the matched route template (`/open/{key}/...`).

use crate::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tango_core::metrics::HistogramSnapshot;

/// Bucket bounds (seconds) of the HTTP request duration histogram: most
/// routes answer in well under a millisecond; uploads and builds take longer.
const HTTP_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];

/// One (route, method, status) series of the HTTP histogram.
#[derive(Debug, Clone, Default)]
struct HttpSeries {
    /// Non-cumulative counts per bucket of [`HTTP_BUCKETS`], plus +Inf.
    counts: [u64; HTTP_BUCKETS.len() + 1],
    sum_secs: f64,
}

/// Request durations by (route template, method, status).
#[derive(Debug, Default)]
pub struct HttpMetrics {
    series: Mutex<BTreeMap<(String, &'static str, u16), HttpSeries>>,
}

impl HttpMetrics {
    pub fn observe(&self, route: &str, method: &Method, status: u16, secs: f64) {
        let slot = HTTP_BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(HTTP_BUCKETS.len());
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let entry = series
            .entry((route.to_string(), method_label(method), status))
            .or_default();
        entry.counts[slot] += 1;
        entry.sum_secs += secs;
    }

    fn render(&self, out: &mut String) {
        family(
            out,
            "tango_http_request_duration_seconds",
            "histogram",
            "Time to answer HTTP requests (until the response headers), by route template.",
        );
        let series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        for ((route, method, status), s) in series.iter() {
            let status = status.to_string();
            let labels = [
                ("route", route.as_str()),
                ("method", method),
                ("status", &status),
            ];
            let mut cumulative = 0;
            let mut buckets = Vec::with_capacity(HTTP_BUCKETS.len());
            for (i, bound) in HTTP_BUCKETS.iter().enumerate() {
                cumulative += s.counts[i];
                buckets.push((*bound, cumulative));
            }
            cumulative += s.counts[HTTP_BUCKETS.len()];
            histogram(
                out,
                "tango_http_request_duration_seconds",
                &labels,
                &HistogramSnapshot {
                    buckets,
                    sum_secs: s.sum_secs,
                    count: cumulative,
                },
            );
        }
    }
}

/// Methods outside the standard set share one label value, so a client
/// cannot grow the series without bound.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// The route label of a request: its matched template without a trailing
/// slash (v1 routes exist with and without one), or `unmatched`.
fn route_label(matched: Option<&MatchedPath>) -> String {
    match matched {
        Some(path) => {
            let path = path.as_str();
            match path.strip_suffix('/') {
                Some(trimmed) if !trimmed.is_empty() => trimmed.to_string(),
                _ => path.to_string(),
            }
        }
        None => "unmatched".to_string(),
    }
}

async fn record_duration(
    State(http): State<Arc<HttpMetrics>>,
    request: Request,
    next: Next,
) -> Response {
    let route = route_label(request.extensions().get::<MatchedPath>());
    let method = request.method().clone();
    let start = Instant::now();
    let response = next.run(request).await;
    http.observe(
        &route,
        &method,
        response.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    response
}

/// Adds `GET /metrics` to `router` and times every request of the result.
pub fn instrument(router: Router<AppState>) -> Router<AppState> {
    let http = Arc::new(HttpMetrics::default());
    router
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(
            http.clone(),
            record_duration,
        ))
        .layer(Extension(http))
}

async fn metrics(
    State(state): State<AppState>,
    Extension(http): Extension<Arc<HttpMetrics>>,
    headers: HeaderMap,
) -> Response {
    if state.metrics_require_key && crate::v2::bearer_key(&state, &headers).is_none() {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "metrics require a key: send it as `Authorization: Bearer <key>`\n",
        )
            .into_response();
    }
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        render(&state, &http),
    )
        .into_response()
}

/// The whole exposition: engine state, engine metrics, HTTP durations.
pub fn render(state: &AppState, http: &HttpMetrics) -> String {
    let engine = &state.engine;
    let mut out = String::with_capacity(16 * 1024);

    let (queued, running) = engine.live_counts();
    family(&mut out, "tango_jobs", "gauge", "Live jobs by state.");
    sample(
        &mut out,
        "tango_jobs",
        &[("state", "queued")],
        queued as f64,
    );
    sample(
        &mut out,
        "tango_jobs",
        &[("state", "running")],
        running as f64,
    );

    let counters = engine.counters();
    let count = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    family(
        &mut out,
        "tango_jobs_finished_total",
        "counter",
        "Jobs that ended since start: done (ran to an outcome the student sees) or failed (system errors after every retry).",
    );
    sample(
        &mut out,
        "tango_jobs_finished_total",
        &[("outcome", "done")],
        count(&counters.jobs_finished),
    );
    sample(
        &mut out,
        "tango_jobs_finished_total",
        &[("outcome", "failed")],
        count(&counters.jobs_failed),
    );

    let (depth, oldest_ms) = engine.queue_stats();
    family(
        &mut out,
        "tango_queue_depth",
        "gauge",
        "Jobs waiting for a VM.",
    );
    sample(&mut out, "tango_queue_depth", &[], depth as f64);
    family(
        &mut out,
        "tango_oldest_waiting_job_seconds",
        "gauge",
        "How long the oldest queued job has waited (0 when none waits).",
    );
    sample(
        &mut out,
        "tango_oldest_waiting_job_seconds",
        &[],
        oldest_ms.unwrap_or(0).max(0) as f64 / 1000.0,
    );

    let m = engine.metrics();
    family(
        &mut out,
        "tango_phase_seconds",
        "histogram",
        "Duration of each phase of jobs that ran to an outcome: waiting for a VM, copy-in, run, copy-out, callback delivery, and added-to-finished.",
    );
    for (phase, h) in [
        ("waiting_for_vm", &m.waiting_for_vm),
        ("copy_in", &m.copy_in),
        ("run", &m.run),
        ("copy_out", &m.copy_out),
        ("callback_delivery", &m.callback_delivery),
        ("total", &m.total),
    ] {
        histogram(
            &mut out,
            "tango_phase_seconds",
            &[("phase", phase)],
            &h.snapshot(),
        );
    }

    family(
        &mut out,
        "tango_pool_vms",
        "gauge",
        "VMs per image pool: total (free or busy), free, being created.",
    );
    let mut pools: Vec<_> = engine.pools().into_iter().collect();
    pools.sort_by(|a, b| a.0.cmp(&b.0));
    for (image, pool) in &pools {
        for (which, n) in [
            ("total", pool.total.len()),
            ("free", pool.free.len()),
            ("creating", pool.creating),
        ] {
            sample(
                &mut out,
                "tango_pool_vms",
                &[("image", image), ("state", which)],
                n as f64,
            );
        }
    }

    docker_hosts(&mut out, &engine.hosts());

    if let Some(servers) = &state.servers {
        family(
            &mut out,
            "tango_servers_alive",
            "gauge",
            "tangod servers sharing the store whose heartbeat is younger than their lease.",
        );
        sample(
            &mut out,
            "tango_servers_alive",
            &[],
            servers.alive_count() as f64,
        );
        family(
            &mut out,
            "tango_server_info",
            "gauge",
            "Always 1; the server label names the server that answered.",
        );
        sample(
            &mut out,
            "tango_server_info",
            &[("server", servers.name())],
            1.0,
        );
    }

    family(
        &mut out,
        "tango_backend_errors_total",
        "counter",
        "Backend (VMMS) call failures by backend and step.",
    );
    for ((backend, step), n) in m.backend_errors() {
        sample(
            &mut out,
            "tango_backend_errors_total",
            &[("backend", &backend), ("step", &step)],
            n as f64,
        );
    }

    for (name, help, value) in [
        (
            "tango_callback_retries_total",
            "Failed callback deliveries that were scheduled again.",
            &counters.callback_retries,
        ),
        (
            "tango_callbacks_delivered_total",
            "Callbacks delivered.",
            &counters.callbacks_delivered,
        ),
        (
            "tango_callbacks_abandoned_total",
            "Callbacks given up after their deadline.",
            &counters.callbacks_abandoned,
        ),
        (
            "tango_job_requests_total",
            "Jobs accepted by addJob.",
            &counters.job_requests,
        ),
        (
            "tango_job_retries_total",
            "Job retries after system errors.",
            &counters.job_retries,
        ),
    ] {
        family(&mut out, name, "counter", help);
        sample(&mut out, name, &[], count(value));
    }

    family(
        &mut out,
        "tango_uptime_seconds",
        "gauge",
        "Seconds since the engine started.",
    );
    sample(
        &mut out,
        "tango_uptime_seconds",
        &[],
        engine.info().elapsed_secs as f64,
    );

    http.render(&mut out);
    out
}

/// Per Docker host, read at scrape time. The families are there with no
/// samples when the docker backend has no hosts (another backend, or none
/// configured), so dashboards find them either way.
fn docker_hosts(out: &mut String, hosts: &[tango_core::HostStatus]) {
    type Value = fn(&tango_core::HostStatus) -> f64;
    let families: [(&str, &str, &str, Value); 7] = [
        (
            "tango_docker_host_up",
            "gauge",
            "1 when the Docker host answered its last health check, 0 when it is down.",
            |h| f64::from(u8::from(h.up)),
        ),
        (
            "tango_docker_host_draining",
            "gauge",
            "1 when the Docker host is drained: it takes no new containers, its running jobs finish.",
            |h| f64::from(u8::from(h.draining)),
        ),
        (
            "tango_docker_host_vms",
            "gauge",
            "This server's containers on the Docker host, busy or idle.",
            |h| h.vms as f64,
        ),
        (
            "tango_docker_host_max_vms",
            "gauge",
            "The Docker host's max_vms: at most this many of this server's containers.",
            |h| h.max_vms as f64,
        ),
        (
            "tango_docker_host_running_jobs",
            "gauge",
            "Jobs running on the Docker host.",
            |h| h.running_jobs as f64,
        ),
        (
            "tango_docker_host_vm_starts_total",
            "counter",
            "Containers started on the Docker host since tangod started.",
            |h| h.vm_starts as f64,
        ),
        (
            "tango_docker_host_vm_start_failures_total",
            "counter",
            "Containers the Docker host failed to create or start since tangod started.",
            |h| h.vm_start_failures as f64,
        ),
    ];
    for (name, kind, help, value) in families {
        family(out, name, kind, help);
        for host in hosts.iter().filter(|h| h.vmms == "docker") {
            sample(out, name, &[("host", &host.name)], value(host));
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    write_labels(out, labels);
    let _ = writeln!(out, " {}", number(value));
}

fn histogram(out: &mut String, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
    for (bound, n) in &h.buckets {
        let le = number(*bound);
        let mut with_le = labels.to_vec();
        with_le.push(("le", &le));
        sample(out, &format!("{name}_bucket"), &with_le, *n as f64);
    }
    let mut with_inf = labels.to_vec();
    with_inf.push(("le", "+Inf"));
    sample(out, &format!("{name}_bucket"), &with_inf, h.count as f64);
    sample(out, &format!("{name}_sum"), labels, h.sum_secs);
    sample(out, &format!("{name}_count"), labels, h.count as f64);
}

fn write_labels(out: &mut String, labels: &[(&str, &str)]) {
    if labels.is_empty() {
        return;
    }
    out.push('{');
    for (i, (name, value)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{name}=\"{}\"", escape_label(value));
    }
    out.push('}');
}

/// Label values escape backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// HELP text escapes backslash and newline.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value as Prometheus reads it (`+Inf`, `NaN`, or a float).
fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        let mut out = String::new();
        sample(&mut out, "x", &[("image", "a\"b\\c\nd")], 1.0);
        assert_eq!(out, "x{image=\"a\\\"b\\\\c\\nd\"} 1\n");
    }

    #[test]
    fn http_histogram_is_cumulative_and_labelled_by_template() {
        let http = HttpMetrics::default();
        http.observe("/open/{key}/{courselab}", &Method::GET, 200, 0.0001);
        http.observe("/open/{key}/{courselab}", &Method::GET, 200, 2.0);
        let mut out = String::new();
        http.render(&mut out);
        assert!(out.contains(
            "tango_http_request_duration_seconds_bucket{route=\"/open/{key}/{courselab}\",method=\"GET\",status=\"200\",le=\"0.0005\"} 1\n"
        ), "{out}");
        assert!(out.contains(
            "tango_http_request_duration_seconds_bucket{route=\"/open/{key}/{courselab}\",method=\"GET\",status=\"200\",le=\"5\"} 2\n"
        ), "{out}");
        assert!(out.contains(
            "tango_http_request_duration_seconds_count{route=\"/open/{key}/{courselab}\",method=\"GET\",status=\"200\"} 2\n"
        ), "{out}");
    }

    #[test]
    fn docker_hosts_are_one_series_each_with_escaped_names() {
        let host = |name: &str, vmms: &str| tango_core::HostStatus {
            name: name.into(),
            vmms: vmms.into(),
            url: "tcp://h:2376".into(),
            up: true,
            draining: false,
            max_vms: 8,
            vms: 3,
            running_jobs: 2,
            vm_starts: 40,
            vm_start_failures: 1,
        };
        let mut out = String::new();
        docker_hosts(
            &mut out,
            &[host("a\"b", "docker"), host("elsewhere", "other")],
        );
        assert!(out.contains("# TYPE tango_docker_host_up gauge\n"), "{out}");
        assert!(
            out.contains("tango_docker_host_up{host=\"a\\\"b\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("tango_docker_host_vms{host=\"a\\\"b\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("tango_docker_host_vm_starts_total{host=\"a\\\"b\"} 40\n"),
            "{out}"
        );
        assert!(!out.contains("elsewhere"), "{out}");
        // No hosts: the families alone.
        let mut empty = String::new();
        docker_hosts(&mut empty, &[]);
        assert_eq!(empty.lines().filter(|l| !l.starts_with('#')).count(), 0);
        assert!(empty.contains("# TYPE tango_docker_host_vm_start_failures_total counter\n"));
    }

    #[test]
    fn route_labels_never_hold_raw_paths() {
        assert_eq!(route_label(None), "unmatched");
    }
}
