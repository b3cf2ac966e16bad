//! `/v2/`: a JSON API for the dashboard and for scripts: read-only but for
//! draining and undraining a backend's hosts.
//!
//! Unlike v1 this API is tango-rs's own: errors are HTTP status codes with a
//! JSON `{"error": "..."}` body, and the key travels only as
//! `Authorization: Bearer <key>`, never in the URL (URLs end up in logs,
//! browser history and proxies). A caller sees the jobs of its own key's
//! courselabs; pools, hosts and the summary are server-wide, as in v1, and
//! any configured key may drain a host (as any key may `/prealloc`).

use crate::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use subtle::ConstantTimeEq;
use tango_core::{now_ms, EngineError, HostStatus, Job, JobState, VmmsError};

/// How much of a job's output `/v2/jobs/{id}` returns: its end, where the
/// score and the errors are.
pub const OUTPUT_TAIL_BYTES: usize = 16 * 1024;
/// How much live output is read from a running job to take the tail of.
const LIVE_OUTPUT_READ_BYTES: usize = 1 << 20;
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 500;
/// Throughput buckets: one per minute over the last hour.
const THROUGHPUT_MINUTES: usize = 60;

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/v2/jobs", get(list_jobs))
        .route("/v2/jobs/{id}", get(one_job))
        .route("/v2/pools", get(pools))
        .route("/v2/summary", get(summary))
        .route("/v2/hosts", get(hosts))
        .route("/v2/hosts/{name}/drain", post(drain))
        .route("/v2/hosts/{name}/undrain", post(undrain))
        .route("/v2/servers", get(servers))
        .route("/v2/{*rest}", any(no_such_route))
        .route_layer(axum::middleware::from_fn_with_state(state, authenticate))
}

/// An error answer: a status code and `{"error": message}`.
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError(status, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.0,
            [(header::CACHE_CONTROL, "no-store")],
            Json(json!({ "error": self.1 })),
        )
            .into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<tango_core::EngineError> for ApiError {
    fn from(e: tango_core::EngineError) -> ApiError {
        tracing::error!("v2 request failed inside the server: {e}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

/// An answer that must not be cached (it changes every second).
fn fresh(body: Value) -> Response {
    ([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

/// The key a request authenticated with.
#[derive(Clone)]
struct Caller {
    key: String,
}

/// The configured key sent as `Authorization: Bearer <key>`, compared with
/// every configured key in constant time.
pub(crate) fn bearer_key(state: &AppState, headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    let mut found = None;
    for known in state.keys.iter() {
        if bool::from(known.as_bytes().ct_eq(token.as_bytes())) {
            found = Some(known.clone());
        }
    }
    found
}

async fn authenticate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let key_in_url = request.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|pair| pair.split('=').next().is_some_and(|k| k == "key"))
    });
    if key_in_url {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "a key in the URL is never accepted: send it as `Authorization: Bearer <key>`",
        )
        .into_response();
    }
    if request.headers().get(header::AUTHORIZATION).is_none() {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing `Authorization: Bearer <key>`",
        )
        .into_response();
    }
    let Some(key) = bearer_key(&state, request.headers()) else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "key not recognized").into_response();
    };
    request.extensions_mut().insert(Caller { key });
    next.run(request).await
}

async fn no_such_route() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such route; v2 has GET /v2/jobs, /v2/jobs/{id}, /v2/pools, /v2/summary and \
         /v2/hosts and /v2/servers, and POST /v2/hosts/{name}/drain and /v2/hosts/{name}/undrain",
    )
}

/// The key whose courselab directory `dir` (`<key>-<courselab>`) is. Keys
/// may contain `-`, so with keys `a` and `a-b` the directory `a-b-lab`
/// belongs to the longer one.
fn owner<'k>(keys: &'k [String], dir: &str) -> Option<&'k str> {
    keys.iter()
        .filter(|k| {
            dir.len() > k.len() + 1
                && dir.starts_with(k.as_str())
                && dir[k.len()..].starts_with('-')
        })
        .max_by_key(|k| k.len())
        .map(String::as_str)
}

fn is_callers(state: &AppState, caller: &Caller, job: &Job) -> bool {
    owner(&state.keys, &job.courselab_dir) == Some(caller.key.as_str())
}

/// The courselab name a client knows (the directory without `<key>-`).
fn courselab_name<'d>(caller: &Caller, dir: &'d str) -> &'d str {
    dir.strip_prefix(caller.key.as_str())
        .and_then(|rest| rest.strip_prefix('-'))
        .unwrap_or(dir)
}

fn job_summary(caller: &Caller, job: &Job) -> Value {
    json!({
        "id": job.id,
        "name": job.name,
        "courselab": courselab_name(caller, &job.courselab_dir),
        "submitter": job.submitter_or_derived(),
        "state": job.state.as_str(),
        "outcome": job.outcome,
        "image": job.image,
        "vmms": job.vmms,
        "vm": job.vm.as_ref().map(|vm| vm.name.clone()),
        // The machine of a backend of several the VM was placed on.
        "host": job.vm.as_ref().and_then(|vm| vm.host.clone()),
        "retries": job.retries,
        "timeout_secs": job.timeout_secs,
        "output_file": job.output_file,
        "phases": job.phases,
        "last_trace": job.trace.last().map(|t| t.message.clone()),
    })
}

/// Finished jobs from the store (the newest `dead_jobs_listed`), read off
/// the async threads since SQLite blocks.
async fn dead_jobs(state: &AppState) -> Result<Vec<Job>, ApiError> {
    let engine = state.engine.clone();
    tokio::task::spawn_blocking(move || engine.dead_jobs())
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    state: Option<String>,
    courselab: Option<String>,
    limit: Option<String>,
    before_id: Option<String>,
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

/// `GET /v2/jobs?state=&courselab=&limit=&before_id=`: the caller's jobs,
/// newest first. `next_before_id` fetches the next page.
async fn list_jobs(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| bad_request(e.body_text()))?;
    let wanted = match query.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            bad_request(format!(
                "state must be queued, running, done or failed, not {s:?}"
            ))
        })?),
    };
    let limit = match query.limit.as_deref().filter(|s| !s.is_empty()) {
        None => DEFAULT_PAGE,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => {
                return Err(bad_request(format!(
                    "limit must be a number from 1 to {MAX_PAGE}, not {s:?}"
                )))
            }
        },
    };
    let before_id = match query.before_id.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(
            s.parse::<u64>()
                .map_err(|_| bad_request(format!("before_id must be a job id, not {s:?}")))?,
        ),
    };
    let courselab_dir = query
        .courselab
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|c| format!("{}-{c}", caller.key));

    let want_live = wanted.is_none_or(JobState::is_live);
    let want_dead = wanted.is_none_or(|s| !s.is_live());
    // By id, so a job finishing between the two reads is listed once.
    let mut jobs: BTreeMap<u64, Job> = BTreeMap::new();
    if want_dead {
        jobs.extend(dead_jobs(&state).await?.into_iter().map(|j| (j.id, j)));
    }
    if want_live {
        // One page more than asked at most: a queue of 100,000 jobs is not
        // copied for a page of it.
        let page = state.engine.live_jobs_page(
            before_id,
            limit + 1,
            wanted == Some(JobState::Running),
            |job| {
                wanted.is_none_or(|s| job.state == s)
                    && courselab_dir
                        .as_deref()
                        .is_none_or(|d| job.courselab_dir == d)
                    && is_callers(&state, &caller, job)
            },
        );
        for job in page {
            jobs.entry(job.id).or_insert(job);
        }
    }
    let mut page = Vec::with_capacity(limit);
    let mut more = false;
    for job in jobs.values().rev() {
        if before_id.is_some_and(|b| job.id >= b)
            || wanted.is_some_and(|s| job.state != s)
            || courselab_dir
                .as_deref()
                .is_some_and(|d| job.courselab_dir != d)
            || !is_callers(&state, &caller, job)
        {
            continue;
        }
        if page.len() == limit {
            more = true;
            break;
        }
        page.push(job_summary(&caller, job));
    }
    let next_before_id = if more {
        page.last().and_then(|j| j["id"].as_u64())
    } else {
        None
    };
    Ok(fresh(json!({
        "jobs": page,
        "next_before_id": next_before_id,
        "finished_jobs_kept": state.engine.config().dead_jobs_listed,
    })))
}

/// The last `OUTPUT_TAIL_BYTES` of a finished job's output file.
async fn output_file_tail(state: &AppState, job: &Job) -> Option<(Vec<u8>, bool)> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    if job.output_file.is_empty() {
        return None;
    }
    if let Ok(Some(shared)) = state
        .engine
        .shared_output(&job.courselab_dir, &job.output_file)
        .await
    {
        let content = shared?;
        let start = content.len().saturating_sub(OUTPUT_TAIL_BYTES);
        return Some((content[start..].to_vec(), start > 0));
    }
    let path = state
        .engine
        .data()
        .output_path(&job.courselab_dir, &job.output_file);
    let mut file = tokio::fs::File::open(&path).await.ok()?;
    let len = file.metadata().await.ok()?.len();
    let start = len.saturating_sub(OUTPUT_TAIL_BYTES as u64);
    file.seek(std::io::SeekFrom::Start(start)).await.ok()?;
    let mut bytes = Vec::with_capacity(OUTPUT_TAIL_BYTES);
    file.take(OUTPUT_TAIL_BYTES as u64)
        .read_to_end(&mut bytes)
        .await
        .ok()?;
    Some((bytes, start > 0))
}

/// `GET /v2/jobs/{id}`: one of the caller's jobs with its trace, phases and
/// the tail of its output (the output file once finished, the live output
/// while running).
async fn one_job(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| bad_request(format!("job id must be a number, not {id:?}")))?;
    let engine = state.engine.clone();
    let job = tokio::task::spawn_blocking(move || engine.get_job(id))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    // Another key's job answers like a missing one: ids are not secrets,
    // but whether a job id belongs to someone else is none of the caller's.
    let Some(job) = job.filter(|j| is_callers(&state, &caller, j)) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no job {id} in this key's courselabs"),
        ));
    };
    let (output, source, truncated) = match job.state {
        JobState::Running => match state
            .engine
            .partial_output(job.id, LIVE_OUTPUT_READ_BYTES)
            .await
        {
            Ok(bytes) => {
                let start = bytes.len().saturating_sub(OUTPUT_TAIL_BYTES);
                (Some(bytes[start..].to_vec()), "live", start > 0)
            }
            // The job may have finished since it was read.
            Err(_) => (None, "none", false),
        },
        JobState::Done | JobState::Failed => match output_file_tail(&state, &job).await {
            Some((bytes, truncated)) => (Some(bytes), "file", truncated),
            None => (None, "none", false),
        },
        JobState::Queued => (None, "none", false),
    };
    let mut body = job_summary(&caller, &job);
    body["trace"] = job
        .trace
        .iter()
        .map(|t| json!({"at_ms": t.at_ms, "message": t.message}))
        .collect();
    body["output_tail"] = json!(output.map(|b| String::from_utf8_lossy(&b).into_owned()));
    body["output_source"] = json!(source);
    body["output_truncated"] = json!(truncated);
    Ok(fresh(body))
}

/// `GET /v2/pools`: every image pool, sorted by image.
async fn pools(State(state): State<AppState>) -> Response {
    let mut pools: Vec<_> = state.engine.pools().into_iter().collect();
    pools.sort_by(|a, b| a.0.cmp(&b.0));
    let pools: Vec<Value> = pools
        .into_iter()
        .map(|(image, p)| {
            json!({
                "image": image,
                "vmms": p.vmms,
                "total": p.total.len(),
                "free": p.free.len(),
                "busy": p.total.len().saturating_sub(p.free.len()),
                "creating": p.creating,
                "target": p.target,
            })
        })
        .collect();
    fresh(json!({ "pools": pools }))
}

/// Jobs finished per minute over the last hour, oldest minute first, from
/// the (state, finished at) of the finished jobs the store keeps.
/// `complete` is false when that window does not reach back a full hour
/// (more jobs finished than the store keeps, `kept`).
fn throughput(finished: &[(JobState, Option<i64>)], kept: usize, now: i64) -> Value {
    let minute = 60_000i64;
    let end = (now / minute + 1) * minute;
    let start = end - THROUGHPUT_MINUTES as i64 * minute;
    let mut done = vec![0u64; THROUGHPUT_MINUTES];
    let mut failed = vec![0u64; THROUGHPUT_MINUTES];
    for (state, at) in finished {
        let Some(at) = *at else {
            continue;
        };
        if at < start || at >= end {
            continue;
        }
        let slot = ((at - start) / minute) as usize;
        match state {
            JobState::Done => done[slot] += 1,
            _ => failed[slot] += 1,
        }
    }
    let oldest_kept = finished.iter().filter_map(|(_, at)| *at).min();
    let complete = finished.len() < kept || oldest_kept.is_none_or(|t| t < start);
    json!({
        "start_ms": start,
        "minute_ms": minute,
        "done": done,
        "failed": failed,
        "complete": complete,
    })
}

/// `GET /v2/summary`: the server's state at a glance.
async fn summary(State(state): State<AppState>) -> Result<Response, ApiError> {
    let engine = &state.engine;
    let (queued, running) = engine.live_counts();
    let (depth, oldest_ms) = engine.queue_stats();
    let counters = engine.counters();
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let finished: Vec<(JobState, Option<i64>)> = dead_jobs(&state)
        .await?
        .iter()
        .map(|j| (j.state, j.phases.finished))
        .collect();
    let now = now_ms();
    Ok(fresh(json!({
        "now_ms": now,
        "uptime_secs": engine.info().elapsed_secs,
        "jobs": { "queued": queued, "running": running },
        "queue_depth": depth,
        "oldest_wait_secs": oldest_ms.map(|ms| ms.max(0) as f64 / 1000.0),
        "finished_total": {
            "done": get(&counters.jobs_finished),
            "failed": get(&counters.jobs_failed),
        },
        "job_requests_total": get(&counters.job_requests),
        "job_retries_total": get(&counters.job_retries),
        "callbacks": {
            "delivered": get(&counters.callbacks_delivered),
            "retries": get(&counters.callback_retries),
            "abandoned": get(&counters.callbacks_abandoned),
        },
        "throughput": throughput(&finished, engine.config().dead_jobs_listed, now),
    })))
}

/// The longest host name a URL may carry: config names are short words.
const MAX_HOST_NAME: usize = 64;

/// A host name from the URL, before it is looked up or logged: 1 to 64
/// letters, digits, `.`, `_` or `-`.
fn host_name(name: &str) -> Result<&str, ApiError> {
    let well_formed = !name.is_empty()
        && name.len() <= MAX_HOST_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if well_formed {
        Ok(name)
    } else {
        Err(bad_request(format!(
            "a host name is 1 to {MAX_HOST_NAME} letters, digits, '.', '_' or '-'; \
             GET /v2/hosts lists the hosts"
        )))
    }
}

/// `GET /v2/hosts`: the machines of backends that spread VMs over several
/// (the docker backend's hosts), sorted by backend and name; empty when no
/// backend has any.
async fn hosts(State(state): State<AppState>) -> Response {
    fresh(json!({ "hosts": state.engine.hosts() }))
}

/// `GET /v2/servers`: the tangod servers registered in the store, by id,
/// each with whether it is alive and how old its heartbeat is.
async fn servers(State(state): State<AppState>) -> Result<Response, ApiError> {
    let list = match &state.servers {
        Some(servers) => servers.fresh().await.map_err(|e| {
            tracing::error!("cannot list the servers: {e:#}");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot read the servers from the store: {e:#}"),
            )
        })?,
        None => Vec::new(),
    };
    Ok(fresh(json!({ "servers": list })))
}

/// `POST /v2/hosts/{name}/drain`: the host takes no new VMs, its idle VMs
/// are removed and its running jobs finish. Answers the host's new status.
async fn drain(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    set_draining(&state, &name, true).await
}

/// `POST /v2/hosts/{name}/undrain`: the host takes new VMs again.
async fn undrain(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    set_draining(&state, &name, false).await
}

async fn set_draining(state: &AppState, name: &str, draining: bool) -> Result<Response, ApiError> {
    let name = host_name(name)?;
    let no_such_host = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no host named {name:?}; GET /v2/hosts (or `tango hosts`) lists them"),
        )
    };
    match state.engine.set_host_draining(name, draining).await {
        Ok(()) => {}
        Err(EngineError::Vmms(VmmsError::NoSuchHost(_))) => return Err(no_such_host()),
        Err(EngineError::Vmms(e @ VmmsError::HostLeaving(_))) => {
            return Err(ApiError::new(StatusCode::CONFLICT, e.to_string()))
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(host = name, draining, "host drain state set over /v2");
    // Removed by a reload in between: as unknown as it was never there.
    let status: HostStatus = state
        .engine
        .hosts()
        .into_iter()
        .find(|h| h.name == name)
        .ok_or_else(no_such_host)?;
    Ok(fresh(json!(status)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_belong_to_the_longest_matching_key() {
        let keys = vec!["a".to_string(), "a-b".to_string(), "c".to_string()];
        assert_eq!(owner(&keys, "a-lab"), Some("a"));
        assert_eq!(owner(&keys, "a-b-lab"), Some("a-b"));
        assert_eq!(owner(&keys, "c-x"), Some("c"));
        assert_eq!(owner(&keys, "cx-lab"), None);
        assert_eq!(owner(&keys, "a-"), None);
        assert_eq!(owner(&keys, "d-lab"), None);
    }

    #[test]
    fn host_names_from_urls_are_checked() {
        for good in ["local", "grader2", "grader-2.cs.example.edu", "a_b", "x"] {
            assert!(host_name(good).is_ok(), "{good}");
        }
        let long = "h".repeat(MAX_HOST_NAME + 1);
        for bad in [
            "",
            "a b",
            "a/b",
            "..%2f",
            "\u{e9}t\u{e9}",
            "a\nb",
            "a\"b",
            long.as_str(),
        ] {
            assert!(host_name(bad).is_err(), "{bad:?}");
        }
        assert!(host_name(&"h".repeat(MAX_HOST_NAME)).is_ok());
    }

    #[test]
    fn throughput_counts_per_minute() {
        let now = 10 * 3_600_000 + 30_000;
        let dead = vec![
            (JobState::Done, Some(now - 2 * 3_600_000)),
            (JobState::Done, Some(now - 61_000)),
            (JobState::Failed, Some(now - 1_000)),
            (JobState::Failed, None),
            (JobState::Done, Some(now)),
        ];
        let t = throughput(&dead, 1000, now);
        let done: Vec<u64> = serde_json::from_value(t["done"].clone()).unwrap();
        let failed: Vec<u64> = serde_json::from_value(t["failed"].clone()).unwrap();
        assert_eq!(done.len(), 60);
        assert_eq!(done[59], 1);
        assert_eq!(done[58], 1);
        assert_eq!(failed[59], 1);
        assert_eq!(done.iter().sum::<u64>(), 2);
        assert_eq!(t["complete"], true);
        // Every kept job finished within the hour and the store is full.
        assert_eq!(throughput(&dead[1..], 4, now)["complete"], false);
    }
}
