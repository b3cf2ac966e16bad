//! The Tango v1 routes, exactly as `shared/spec/tango-v1-contract.md` says:
//! HTTP 200 for every outcome with `statusId`/`statusMsg`, JSON answers as
//! `application/json`, request bodies read raw whatever their Content-Type,
//! and a trailing slash optional on every route. A wrong method, a path
//! segment that does not decode, or a body over the limit get a v1 answer
//! too (statusId -1), never axum's bare 405, 400 or 413.

use crate::AppState;
use axum::body::{Body, Bytes};
use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::Router;
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use subtle::ConstantTimeEq;
use tango_core::files::{DataDir, FilesError};
use tango_core::names::MAX_NAME_BYTES;
use tango_core::{ctime, EngineError, Job, NewJob};

/// Largest body of the routes that read theirs whole (addJob, prealloc).
/// Uploads and builds stream theirs under `max_upload_bytes` instead.
pub const MAX_BODY_BYTES: usize = 4 << 20;

pub fn routes() -> Router<AppState> {
    use axum::routing::post;
    let mut router = Router::new().route("/", with_wrong_method(get(hello), "/", "GET"));
    let routes: Vec<(&'static str, &'static str, MethodRouter<AppState>)> = vec![
        ("/open/{key}/{courselab}", "GET", get(open)),
        ("/upload/{key}/{courselab}", "POST", post(upload)),
        ("/addJob/{key}/{courselab}", "POST", post(add_job)),
        ("/poll/{key}/{courselab}/{output_file}", "GET", get(poll)),
        (
            "/getPartialOutput/{key}/{job_id}",
            "GET",
            get(partial_output),
        ),
        ("/info/{key}", "GET", get(info)),
        ("/jobs/{key}/{deadjobs}", "GET", get(jobs)),
        ("/pool/{key}", "GET", get(pool_all)),
        ("/pool/{key}/{image}", "GET", get(pool_one)),
        (
            "/prealloc/{key}/{image}/{num}",
            "GET or POST",
            get(prealloc).post(prealloc),
        ),
        ("/build/{key}", "POST", post(build)),
    ];
    for (path, methods, handler) in routes {
        let handler = with_wrong_method(handler, path, methods);
        router = router
            .route(path, handler.clone())
            .route(&format!("{path}/"), handler);
    }
    router.fallback(unknown_route)
}

/// Answers a method the route does not take with a v1 failure instead of
/// axum's empty 405, which clients would take for "Tango is down".
fn with_wrong_method(
    handler: MethodRouter<AppState>,
    path: &'static str,
    methods: &'static str,
) -> MethodRouter<AppState> {
    handler.fallback(move |method: Method| async move {
        fail(format!(
            "method {method} is not allowed on {path}: it takes {methods}"
        ))
    })
}

/// [`Path`] whose rejection (a segment that does not percent-decode to
/// UTF-8) is a v1 failure instead of a 400 in plain text.
pub struct V1Path<T>(pub T);

impl<T, S> FromRequestParts<S> for V1Path<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = V1;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, V1> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(V1Path(value)),
            Err(rejection) => Err(fail(path_problem(&rejection))),
        }
    }
}

fn path_problem(rejection: &PathRejection) -> String {
    if let PathRejection::FailedToDeserializePathParams(e) = rejection {
        if let ErrorKind::InvalidUtf8InPathParam { key } = e.kind() {
            return format!("invalid URL: the {key} in the path is not valid UTF-8");
        }
    }
    format!("invalid URL: {}", rejection.body_text())
}

/// How much of a body over [`MAX_BODY_BYTES`] is read and dropped before
/// answering. Answering while the client still sends makes the kernel reset
/// the connection, and the client would see that instead of the answer.
const MAX_DISCARDED_BYTES: usize = 64 << 20;

/// The whole body of addJob or prealloc, or why it could not be read (over
/// [`MAX_BODY_BYTES`] above all).
async fn whole_body(body: Body, what: &str) -> Result<Bytes, String> {
    let mut kept = Vec::new();
    let mut size = 0usize;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("cannot read the {what}: {e}"))?;
        size = size.saturating_add(chunk.len());
        if size <= MAX_BODY_BYTES {
            kept.extend_from_slice(&chunk);
        } else if size > MAX_DISCARDED_BYTES {
            break;
        }
    }
    if size > MAX_BODY_BYTES {
        return Err(format!(
            "the {what} is larger than the server's limit of {MAX_BODY_BYTES} bytes"
        ));
    }
    Ok(Bytes::from(kept))
}

/// Clients treat any non-200 answer as "Tango is down", so even a request
/// that matches no route gets a 200 with a message saying what exists.
async fn unknown_route(uri: axum::http::Uri) -> V1 {
    fail(format!(
        "no such route: {}; routes are /open, /upload, /addJob, /poll, /getPartialOutput, \
         /info, /jobs, /pool, /prealloc and /build, each followed by /<key>/...",
        uri.path()
    ))
}

/// A v1 answer: always HTTP 200 and a JSON object.
pub struct V1(Value);

impl IntoResponse for V1 {
    fn into_response(self) -> Response {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            self.0.to_string(),
        )
            .into_response()
    }
}

fn ok(msg: &str, extra: Value) -> V1 {
    let mut body = Map::new();
    body.insert("statusId".into(), json!(0));
    body.insert("statusMsg".into(), json!(msg));
    if let Value::Object(fields) = extra {
        body.extend(fields);
    }
    V1(Value::Object(body))
}

fn fail(msg: impl Into<String>) -> V1 {
    V1(json!({"statusId": -1, "statusMsg": msg.into()}))
}

/// A failure whose `statusMsg` is one of the contract's fixed strings that
/// clients match on; what went wrong goes in `detail`.
fn fail_detail(msg: &str, detail: impl std::fmt::Display) -> V1 {
    V1(json!({"statusId": -1, "statusMsg": msg, "detail": detail.to_string()}))
}

impl From<EngineError> for V1 {
    fn from(e: EngineError) -> V1 {
        match &e {
            EngineError::Store(_) | EngineError::Files(FilesError::Io { .. }) => {
                tracing::error!("request failed inside the server: {e}");
            }
            _ => {}
        }
        fail(e.to_string())
    }
}

impl From<FilesError> for V1 {
    fn from(e: FilesError) -> V1 {
        EngineError::Files(e).into()
    }
}

/// Compares the key with every configured key in constant time.
fn key_ok(state: &AppState, key: &str) -> bool {
    let mut found = subtle::Choice::from(0u8);
    for known in state.keys.iter() {
        found |= known.as_bytes().ct_eq(key.as_bytes());
    }
    found.into()
}

macro_rules! check_key {
    ($state:expr, $key:expr) => {
        if !key_ok(&$state, &$key) {
            return fail("Key not recognized").into_response();
        }
    };
}

async fn hello() -> &'static str {
    "Hello, world! RESTful Tango here!\n"
}

fn courselab_dir(key: &str, courselab: &str) -> Result<String, V1> {
    DataDir::courselab_dir_name(key, courselab).map_err(|e| {
        let dir_len = key.len() + 1 + courselab.len();
        if tango_core::names::check_component("courselab name", courselab).is_ok()
            && dir_len > MAX_NAME_BYTES
        {
            // The name is fine alone; its directory `<key>-<courselab>` is not.
            fail(format!(
                "invalid courselab name: its directory, the key, '-' and the name, would be \
                 {dir_len} bytes, longer than {MAX_NAME_BYTES}; with this key the name may be \
                 at most {} bytes",
                MAX_NAME_BYTES.saturating_sub(key.len() + 1)
            ))
        } else {
            fail(e.to_string())
        }
    })
}

/// Checks the key, then yields the courselab's directory name or answers
/// with what is wrong with the name.
macro_rules! checked_courselab_dir {
    ($state:expr, $key:expr, $courselab:expr) => {{
        check_key!($state, $key);
        match courselab_dir(&$key, &$courselab) {
            Ok(dir) => dir,
            Err(e) => return e.into_response(),
        }
    }};
}

async fn open(
    State(state): State<AppState>,
    V1Path((key, courselab)): V1Path<(String, String)>,
) -> Response {
    let dir = checked_courselab_dir!(state, key, courselab);
    let engine = &state.engine;
    let created = match engine.open_courselab(&dir).await {
        Ok(created) => created,
        Err(e) => return V1::from(e).into_response(),
    };
    let files = match engine.store().files(&dir) {
        Ok(files) => files,
        Err(e) => return V1::from(EngineError::Store(e)).into_response(),
    };
    let courselab_path = engine.data().courselab_path(&dir);
    // A shared store's files may have been uploaded on another server.
    let shared = engine.is_shared();
    let files: Map<String, Value> = files
        .into_iter()
        .filter(|(name, _)| shared || courselab_path.join(name).is_file())
        .map(|(name, md5)| (name, json!(md5)))
        .collect();
    let msg = if created {
        "Created directory"
    } else {
        "Found directory"
    };
    ok(msg, json!({ "files": files })).into_response()
}

async fn upload(
    State(state): State<AppState>,
    V1Path((key, courselab)): V1Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let dir = checked_courselab_dir!(state, key, courselab);
    let Some(name) = headers.get("filename") else {
        return fail("missing header Filename: it names the uploaded file").into_response();
    };
    let Ok(name) = name.to_str() else {
        return fail("header Filename is not valid text").into_response();
    };
    let engine = &state.engine;
    // With a shared store, a courselab opened on another server.
    if let Err(e) = engine.courselab_exists(&dir).await {
        return V1::from(e).into_response();
    }
    let mut upload = match engine
        .data()
        .begin_upload(&dir, name, state.max_upload_bytes)
        .await
    {
        Ok(upload) => upload,
        Err(e) => return V1::from(e).into_response(),
    };
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => return fail(format!("upload interrupted: {e}")).into_response(),
        };
        if let Err(e) = upload.write(&chunk).await {
            return V1::from(e).into_response();
        }
    }
    match upload.finish(engine.data(), engine.store().as_ref()).await {
        Ok(done) if done.existed => ok("File exists", json!({})).into_response(),
        Ok(_) => ok("Uploaded file", json!({})).into_response(),
        Err(e) => V1::from(e).into_response(),
    }
}

/// Reads an integer field that clients send as a number or a numeric string.
fn int_field(job: &Map<String, Value>, field: &str) -> Result<Option<i64>, String> {
    match job.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| format!("{field} must be an integer")),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => s
            .trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|_| format!("{field} must be an integer, not {s:?}")),
        Some(other) => Err(format!("{field} must be an integer, not {other}")),
    }
}

fn str_field(
    job: &Map<String, Value>,
    field: &str,
    required: bool,
) -> Result<Option<String>, String> {
    match job.get(field) {
        None | Some(Value::Null) if required => Err(format!("missing field {field}")),
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("{field} must be a string, not {other}")),
    }
}

fn bool_field(job: &Map<String, Value>, field: &str) -> Result<bool, String> {
    match job.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::Number(n)) if n.as_i64() == Some(0) => Ok(false),
        Some(Value::Number(n)) if n.as_i64() == Some(1) => Ok(true),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
        Some(other) => Err(format!("{field} must be true or false, not {other}")),
    }
}

/// Parses an addJob body into a [`NewJob`]; errors say which field is wrong.
pub fn parse_job(
    body: &[u8],
    courselab_dir: &str,
    courselab: &str,
) -> Result<NewJob, (String, String)> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| (String::new(), format!("the job is not valid JSON: {e}")))?;
    let Value::Object(job) = value else {
        return Err((String::new(), "the job must be a JSON object".into()));
    };
    let name = match job.get("jobName") {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    let with_name = |e: String| (name.clone(), e);
    let image = str_field(&job, "image", true)
        .map_err(with_name)?
        .unwrap_or_default();
    let output_file = str_field(&job, "output_file", true)
        .map_err(with_name)?
        .unwrap_or_default();
    let Some(Value::Array(files)) = job.get("files") else {
        return Err(with_name(
            "missing field files: a list of {\"localFile\", \"destFile\"}".into(),
        ));
    };
    let mut pairs = Vec::with_capacity(files.len());
    for (i, file) in files.iter().enumerate() {
        let Value::Object(file) = file else {
            return Err(with_name(format!("files[{i}] must be an object")));
        };
        let local = str_field(file, "localFile", true)
            .map_err(|e| with_name(format!("files[{i}]: {e}")))?
            .unwrap_or_default();
        let dest = str_field(file, "destFile", true)
            .map_err(|e| with_name(format!("files[{i}]: {e}")))?
            .unwrap_or_default();
        pairs.push((local, dest));
    }
    let callback_url = str_field(&job, "callback_url", false)
        .map_err(with_name)?
        .filter(|u| !u.is_empty());
    let access_key_id = str_field(&job, "accessKeyId", false).map_err(with_name)?;
    let access_key = str_field(&job, "accessKey", false).map_err(with_name)?;
    let credentials = match (access_key_id, access_key) {
        (Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => {
            Some(tango_core::CloudCredentials {
                access_key_id: id,
                secret_access_key: secret,
            })
        }
        _ => None,
    };
    Ok(NewJob {
        name: name.clone(),
        courselab_dir: courselab_dir.to_string(),
        courselab: courselab.to_string(),
        image,
        vmms: str_field(&job, "vmms", false).map_err(with_name)?,
        files: pairs,
        output_file,
        timeout_secs: int_field(&job, "timeout").map_err(with_name)?,
        max_kb: int_field(&job, "max_kb").map_err(with_name)?,
        callback_url,
        disable_network: bool_field(&job, "disable_network").map_err(with_name)?,
        credentials,
    })
}

async fn add_job(
    State(state): State<AppState>,
    V1Path((key, courselab)): V1Path<(String, String)>,
    body: Body,
) -> Response {
    let dir = checked_courselab_dir!(state, key, courselab);
    let engine = &state.engine;
    let body = match whole_body(body, "job body").await {
        Ok(body) => body,
        Err(reason) => {
            engine.record_rejected("", &dir, &reason);
            return fail(reason).into_response();
        }
    };
    let new = match parse_job(&body, &dir, &courselab) {
        Ok(new) => new,
        Err((name, reason)) => {
            engine.record_rejected(&name, &dir, &reason);
            return fail(reason).into_response();
        }
    };
    let name = new.name.clone();
    match engine.add_job(new).await {
        Ok(id) => ok("Job added", json!({ "jobId": id.to_string() })).into_response(),
        Err(e) => {
            engine.record_rejected(&name, &dir, &e.to_string());
            V1::from(e).into_response()
        }
    }
}

async fn poll(
    State(state): State<AppState>,
    V1Path((key, courselab, output_file)): V1Path<(String, String, String)>,
) -> Response {
    let dir = checked_courselab_dir!(state, key, courselab);
    if tango_core::names::check_component("output file", &output_file).is_err() {
        return fail("Output file not found").into_response();
    }
    match state.engine.shared_output(&dir, &output_file).await {
        Ok(Some(Some(content))) => {
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/octet-stream")],
                content,
            )
                .into_response()
        }
        Ok(Some(None)) => return fail("Output file not found").into_response(),
        Ok(None) => {}
        Err(e) => return V1::from(e).into_response(),
    }
    let path = state.engine.data().output_path(&dir, &output_file);
    // Output files are renamed into place whole, so an open file is complete.
    match tokio::fs::File::open(&path).await {
        Ok(file) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/octet-stream")],
            Body::from_stream(tokio_util::io::ReaderStream::new(file)),
        )
            .into_response(),
        Err(_) => fail("Output file not found").into_response(),
    }
}

async fn partial_output(
    State(state): State<AppState>,
    V1Path((key, job_id)): V1Path<(String, String)>,
) -> Response {
    check_key!(state, key);
    let Ok(id) = job_id.parse::<u64>() else {
        return fail(format!("job id {job_id:?} is not a number")).into_response();
    };
    if let Some(forwarded) = partial_output_elsewhere(&state, &key, id).await {
        return forwarded;
    }
    match state.engine.partial_output(id, 1 << 20).await {
        Ok(bytes) => ok(
            "Partial output obtained",
            json!({ "output": String::from_utf8_lossy(&bytes) }),
        )
        .into_response(),
        Err(e) => V1::from(e).into_response(),
    }
}

/// With servers sharing a store, the partial output of a job another
/// server runs, asked of that server (its VM is there).
async fn partial_output_elsewhere(state: &AppState, key: &str, id: u64) -> Option<Response> {
    let owner = state.engine.running_elsewhere(id).await?;
    let server = state
        .servers
        .as_ref()?
        .last_seen()
        .into_iter()
        .find(|s| s.id == owner)?;
    let url = format!("http://{}/getPartialOutput/{key}/{id}/", server.address);
    let asked = async {
        let answer = reqwest::Client::new()
            .get(&url)
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await?
            .error_for_status()?;
        answer.json::<Value>().await
    };
    Some(match asked.await {
        Ok(answer) => (StatusCode::OK, axum::Json(answer)).into_response(),
        Err(e) => fail(format!(
            "job {id} runs on server {:?} at {}, which did not answer for its output: {e}",
            server.name, server.address
        ))
        .into_response(),
    })
}

async fn info(State(state): State<AppState>, V1Path(key): V1Path<String>) -> Response {
    check_key!(state, key);
    let mut info = json!(state.engine.info());
    // Beyond Tango's fields: which server answered, and how many share
    // the store (issue 21).
    if let (Some(servers), Some(fields)) = (&state.servers, info.as_object_mut()) {
        fields.insert("server_name".into(), json!(servers.name()));
        fields.insert("servers_alive".into(), json!(servers.alive_count()));
    }
    ok("Found info successfully", json!({ "info": info })).into_response()
}

/// A job record in Tango's `/jobs` shape, plus `state`, `phases` and
/// `submitter` (Autolab reads the fields it knows by name and passes over
/// others).
pub fn job_json(job: &Job) -> Value {
    let dir = &job.courselab_dir;
    let vm = job.vm.as_ref();
    json!({
        "id": job.id,
        "name": job.name,
        "assigned": job.state == tango_core::JobState::Running,
        "retries": job.retries,
        "timeout": job.timeout_secs,
        "maxOutputFileSize": job.max_output_bytes,
        "outputFile": DataDir::display_path(dir, &format!("output/{}", job.output_file)),
        "notifyURL": job.callback_url,
        "input": job.inputs.iter().map(|f| json!({
            "localFile": DataDir::display_path(dir, &f.local_file),
            "destFile": f.dest_file,
        })).collect::<Vec<_>>(),
        "vm": {
            "name": vm.map(|v| v.name.clone()),
            "id": vm.map(|v| v.id),
            "image": job.image,
            "vmms": job.vmms,
            "cores": vm.and_then(|v| v.cores).or(job.cores),
            "memory": vm.and_then(|v| v.memory_mb).or(job.memory_mb),
            "disk": Value::Null,
            "network": if job.disable_network { json!("none") } else { Value::Null },
            "resume": false,
            // Not Tango's: the machine of a backend of several (docker
            // hosts) the VM is on, null elsewhere.
            "host": vm.and_then(|v| v.host.clone()),
        },
        "trace": job.trace.iter().map(|t| format!("{}|{}", ctime(t.at_ms), t.message)).collect::<Vec<_>>(),
        "state": job.state.as_str(),
        "phases": job.phases,
        "submitter": job.submitter_or_derived(),
    })
}

async fn jobs(
    State(state): State<AppState>,
    V1Path((key, dead)): V1Path<(String, String)>,
) -> Response {
    check_key!(state, key);
    let jobs = match dead.as_str() {
        "0" => state.engine.live_jobs(),
        "1" => match state.engine.dead_jobs() {
            Ok(jobs) => jobs,
            Err(e) => return V1::from(e).into_response(),
        },
        _ => return fail("deadjobs must be 0 (live jobs) or 1 (finished jobs)").into_response(),
    };
    let jobs: Vec<Value> = jobs.iter().map(job_json).collect();
    ok("Found list of jobs", json!({ "jobs": jobs })).into_response()
}

fn pool_json(view: &tango_core::engine::PoolView) -> Value {
    json!({"total": view.total, "free": view.free})
}

async fn pool_all(State(state): State<AppState>, V1Path(key): V1Path<String>) -> Response {
    pools(&state, &key, "")
}

async fn pool_one(
    State(state): State<AppState>,
    V1Path((key, image)): V1Path<(String, String)>,
) -> Response {
    pools(&state, &key, &image)
}

/// Every pool for an empty image, as Tango answers `/pool/<key>//`: that is
/// what its client asks for when given no `--image`.
fn pools(state: &AppState, key: &str, image: &str) -> Response {
    check_key!(state, key);
    let pools = state.engine.pools();
    if image.is_empty() {
        let all: Map<String, Value> = pools
            .iter()
            .map(|(image, view)| (image.clone(), pool_json(view)))
            .collect();
        return ok("Found all pools", json!({ "pools": all })).into_response();
    }
    match pools.get(image) {
        Some(view) => {
            ok("Found pool", json!({ "pools": { image: pool_json(view) } })).into_response()
        }
        None => fail("Pool not found").into_response(),
    }
}

/// Tango's VMMS names, which a prealloc body may carry (its client always
/// sends one): they mean the server's default backend.
const TANGO_VMMS_NAMES: [&str; 4] = ["localDocker", "distDocker", "ec2SSH", "tashiSSH"];

async fn prealloc(
    State(state): State<AppState>,
    V1Path((key, image, num)): V1Path<(String, String, String)>,
    body: Body,
) -> Response {
    check_key!(state, key);
    let body = match whole_body(body, "prealloc body").await {
        Ok(body) => body,
        Err(reason) => return fail(reason).into_response(),
    };
    let Ok(num) = num.parse::<i64>() else {
        return fail("Invalid prealloc size").into_response();
    };
    let mut vmms = None;
    let mut cores = None;
    let mut memory = None;
    if !body.iter().all(|b| b.is_ascii_whitespace()) {
        let Ok(Value::Object(opts)) = serde_json::from_slice::<Value>(&body) else {
            return fail(
                "the prealloc body must be a JSON object like {\"cores\": 1, \"memory\": 512}",
            )
            .into_response();
        };
        vmms = match str_field(&opts, "vmms", false) {
            // Tango never reads this field (its VMs all come from its one
            // configured VMMS), and its client sends "localDocker" unasked.
            Ok(Some(v)) if TANGO_VMMS_NAMES.contains(&v.as_str()) => None,
            Ok(v) => v,
            Err(e) => return fail(e).into_response(),
        };
        let positive = |field: &str| -> Result<Option<u64>, String> {
            match int_field(&opts, field)? {
                Some(n) if n > 0 && n <= 1 << 20 => Ok(Some(n as u64)),
                Some(n) => Err(format!("{field} must be a positive number, not {n}")),
                None => Ok(None),
            }
        };
        cores = match positive("cores") {
            Ok(c) => c.map(|c| c as u32),
            Err(e) => return fail(e).into_response(),
        };
        memory = match positive("memory") {
            Ok(m) => m,
            Err(e) => return fail(e).into_response(),
        };
    }
    match state
        .engine
        .prealloc(&image, num, vmms.as_deref(), cores, memory)
        .await
    {
        Ok(()) => ok("VMs preallocated", json!({})).into_response(),
        Err(e @ (EngineError::InvalidImage | EngineError::InvalidPreallocSize)) => {
            V1::from(e).into_response()
        }
        Err(e) => fail_detail("Preallocate VM failed", e).into_response(),
    }
}

async fn build(
    State(state): State<AppState>,
    V1Path(key): V1Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    check_key!(state, key);
    let Some(name) = headers.get("imagename").and_then(|v| v.to_str().ok()) else {
        return fail("missing header imageName: it names the image to build").into_response();
    };
    if tango_core::names::check_image(name).is_err() {
        return fail("Invalid image name").into_response();
    }
    let engine = &state.engine;
    let temp = engine.data().temp_path("build");
    let written = async {
        use tokio::io::AsyncWriteExt;
        let mut file = tokio::fs::File::create(&temp)
            .await
            .map_err(|e| format!("cannot store the image tar: {e}"))?;
        let mut size = 0u64;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| format!("upload interrupted: {e}"))?;
            size += chunk.len() as u64;
            if size > state.max_upload_bytes {
                return Err(format!(
                    "the image tar is larger than the server's limit of {} bytes",
                    state.max_upload_bytes
                ));
            }
            file.write_all(&chunk)
                .await
                .map_err(|e| format!("cannot store the image tar: {e}"))?;
        }
        file.flush()
            .await
            .map_err(|e| format!("cannot store the image tar: {e}"))
    }
    .await;
    let result = match written {
        Ok(()) => engine
            .build_image(None, name, &temp)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    let _ = tokio::fs::remove_file(&temp).await;
    match result {
        Ok(()) => ok("Docker image built", json!({})).into_response(),
        Err(e) => fail_detail("Image build failed", e).into_response(),
    }
}
