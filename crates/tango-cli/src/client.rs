//! The Tango v1 protocol as a client sees it: one method per route, and
//! errors that say what went wrong and what to try.

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde_json::Value;
use std::fmt;
use std::time::Duration;
use url::Url;

/// What went wrong talking to tangod. Each variant's message names the
/// server and the route (never the key) and suggests a next step.
#[derive(Debug)]
pub enum ClientError {
    /// No connection could be made (refused, unknown host, timeout...).
    Unreachable { base: String, cause: String },
    /// The server took longer than the request timeout.
    TimedOut {
        base: String,
        route: String,
        secs: u64,
    },
    /// The server's TLS certificate is not one this client trusts.
    Untrusted { base: String, cause: String },
    /// Any other transport failure (reset connection, bad TLS...).
    Transport {
        base: String,
        route: String,
        cause: String,
    },
    /// An answer other than HTTP 200: v1 servers answer 200 even for errors,
    /// so this is not a Tango server, or a proxy in front of it failed.
    Http {
        base: String,
        route: String,
        status: StatusCode,
        body: String,
    },
    /// A 200 answer that is not the JSON object the route promises.
    BadAnswer {
        route: String,
        cause: String,
        body: String,
    },
    /// The server refused: `statusId` < 0.
    Refused {
        route: String,
        status_id: i64,
        message: String,
        answer: Value,
    },
    /// A `/v2/` route answered with an error status and, from tangod, a
    /// JSON `{"error": "..."}` saying why.
    V2 {
        base: String,
        route: String,
        status: StatusCode,
        message: String,
    },
    /// A local problem (bad path, unreadable file...).
    Local(String),
}

impl ClientError {
    /// The server's JSON answer, when there was one (for `--json` output).
    pub fn answer(&self) -> Option<&Value> {
        match self {
            ClientError::Refused { answer, .. } => Some(answer),
            _ => None,
        }
    }

    /// The hint for a refusal message clients know (the contract's list).
    fn refusal_hint(route: &str, message: &str) -> &'static str {
        match message {
            "Key not recognized" => " — check --key, TANGO_KEY or `key` in the config file",
            "Courselab not found" => " — run `tango open COURSELAB` first",
            "Output file not found" => {
                " — the job may not have finished yet (see `tango jobs`), or the name is wrong"
            }
            "Invalid image name" if route.starts_with("/build/") => {
                " — use letters, digits, '.', '_', '-' and ':', starting with a letter or digit"
            }
            "Invalid image name" | "Pool not found" => {
                " — see `tango pool` for the images this server knows"
            }
            "Invalid prealloc size" => " — N must be a non-negative number",
            "Image build failed" => {
                " — is the file a `docker save` tar, and does the server's default backend build images?"
            }
            _ => "",
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Unreachable { base, cause } => write!(
                f,
                "cannot reach tangod at {base}: {cause} — is tangod running? set --url or TANGO_URL"
            ),
            ClientError::Untrusted { base, cause } => write!(
                f,
                "tangod at {base} showed a TLS certificate this client does not trust ({cause}) \
                 — if a private CA signed it, pass that CA's certificate with --ca-cert FILE \
                 (or TANGO_CA_CERT, or ca_cert in the config file)"
            ),
            ClientError::TimedOut { base, route, secs } => write!(
                f,
                "tangod at {base} did not answer {route} within {secs} s — is it overloaded? raise --http-timeout"
            ),
            ClientError::Transport { base, route, cause } => {
                write!(f, "request {route} to tangod at {base} failed: {cause}")
            }
            ClientError::Http { base, route, status, body } => {
                write!(
                    f,
                    "{base} answered {route} with HTTP {status}, but a Tango v1 server always answers 200 — is --url the address of tangod?"
                )?;
                if !body.is_empty() {
                    write!(f, " (body: {body})")?;
                }
                Ok(())
            }
            ClientError::BadAnswer { route, cause, body } => write!(
                f,
                "tangod answered {route} with something that is not a v1 JSON answer ({cause}): {body}"
            ),
            ClientError::Refused {
                route,
                status_id,
                message,
                answer,
            } => {
                write!(f, "tangod refused {route}: {message}")?;
                // tangod explains some refusals in a `detail` field.
                if let Some(detail) = answer.get("detail").and_then(Value::as_str) {
                    write!(f, ": {detail}")?;
                }
                write!(
                    f,
                    " (statusId {status_id}){}",
                    Self::refusal_hint(route, message)
                )
            }
            ClientError::V2 {
                base,
                route,
                status,
                message,
            } => {
                write!(f, "{base} answered {route} with HTTP {status}: {message}")?;
                if *status == StatusCode::UNAUTHORIZED {
                    write!(f, " — check --key, TANGO_KEY or `key` in the config file")?;
                }
                Ok(())
            }
            ClientError::Local(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for ClientError {}

/// One input file of a job: the uploaded name and its name inside the VM.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct JobFile {
    #[serde(rename = "localFile")]
    pub local_file: String,
    #[serde(rename = "destFile")]
    pub dest_file: String,
}

/// The addJob body of the contract. Optional fields are left out when unset
/// so the server's defaults apply.
#[derive(Debug, Clone, Serialize, Default)]
pub struct JobRequest {
    pub image: String,
    pub files: Vec<JobFile>,
    #[serde(rename = "jobName")]
    pub job_name: String,
    pub output_file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_kb: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub disable_network: bool,
}

/// Optional body of `/prealloc`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct PreallocOptions {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmms: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cores: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
}

impl PreallocOptions {
    fn is_empty(&self) -> bool {
        self.vmms.is_none() && self.cores.is_none() && self.memory.is_none()
    }
}

/// What `/poll` gave back.
pub enum PollResult {
    /// The finished output file's bytes.
    Ready(Vec<u8>),
    /// `-1 Output file not found`: not finished yet (or no such file).
    NotFound(Value),
}

/// A file streamed from disk as a request body, with its length (sent as
/// Content-Length: some servers refuse chunked uploads).
pub struct Upload {
    pub file: tokio::fs::File,
    pub len: u64,
}

impl Upload {
    fn into_body(self) -> (reqwest::Body, String) {
        (
            reqwest::Body::wrap_stream(tokio_util_stream::reader_stream(self.file)),
            self.len.to_string(),
        )
    }
}

/// Streams a file as a body without reading it all into memory.
mod tokio_util_stream {
    use futures_util::stream::{self, Stream};
    use tokio::io::AsyncReadExt;

    pub fn reader_stream(
        file: tokio::fs::File,
    ) -> impl Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static {
        stream::try_unfold(file, |mut file| async move {
            let mut chunk = vec![0u8; 256 * 1024];
            let n = file.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            chunk.truncate(n);
            Ok(Some((chunk, file)))
        })
    }
}

/// What stands for the key in everything `tango` prints.
pub const KEY_PLACEHOLDER: &str = "<key>";

/// Hides the key in text that did not come from `tango` itself: server
/// answers (a server may echo the route, key included, e.g. "no such
/// route: /tango/info/<key>/"), HTTP bodies and transport errors (which
/// may quote the URL). Every form the key can take there is replaced: as
/// given, percent-encoded as it travels in the URL path, and JSON-escaped.
/// The replacement is literal: a very short key also hides the same
/// letters inside other words, which garbles a message but never shows
/// the key.
#[derive(Clone, Debug)]
pub struct KeyRedactor {
    /// Longest first, so a longer form wins over a shorter one it contains.
    forms: Vec<String>,
}

impl KeyRedactor {
    pub fn new(key: &str) -> KeyRedactor {
        if key.is_empty() {
            return KeyRedactor { forms: Vec::new() };
        }
        let mut forms = vec![key.to_string()];
        // Encoded exactly as `TangoClient::route` encodes it.
        if let Ok(mut probe) = Url::parse("http://localhost/") {
            if let Ok(mut path) = probe.path_segments_mut() {
                path.clear().push(key);
            }
            forms.push(probe.path().trim_start_matches('/').to_string());
        }
        for form in forms.clone() {
            if let Ok(quoted) = serde_json::to_string(&form) {
                forms.push(quoted[1..quoted.len() - 1].to_string());
            }
        }
        forms.retain(|form| !form.is_empty());
        forms.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        forms.dedup();
        KeyRedactor { forms }
    }

    /// `text` with every form of the key replaced by `<key>`, in one pass
    /// (so a placeholder just written is never matched again).
    pub fn text(&self, text: &str) -> String {
        if self.forms.is_empty() {
            return text.to_string();
        }
        let mut hidden = String::with_capacity(text.len());
        let mut rest = text;
        'scan: while !rest.is_empty() {
            for form in &self.forms {
                if let Some(after) = rest.strip_prefix(form.as_str()) {
                    hidden.push_str(KEY_PLACEHOLDER);
                    rest = after;
                    continue 'scan;
                }
            }
            let mut chars = rest.chars();
            if let Some(c) = chars.next() {
                hidden.push(c);
            }
            rest = chars.as_str();
        }
        hidden
    }

    /// A JSON answer with the key hidden in every string and object key.
    pub fn value(&self, value: Value) -> Value {
        if self.forms.is_empty() {
            return value;
        }
        match value {
            Value::String(s) => Value::String(self.text(&s)),
            Value::Array(items) => Value::Array(items.into_iter().map(|v| self.value(v)).collect()),
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .map(|(k, v)| (self.text(&k), self.value(v)))
                    .collect(),
            ),
            other => other,
        }
    }
}

/// A client of one tangod, with one key.
#[derive(Clone)]
pub struct TangoClient {
    http: reqwest::Client,
    base: Url,
    key: String,
    redactor: KeyRedactor,
    timeout_secs: u64,
}

impl TangoClient {
    /// `ca_cert`: PEM certificates trusted besides the public roots (a
    /// tangod whose certificate a private CA signed).
    pub fn new(
        base: &str,
        key: &str,
        timeout: Duration,
        ca_cert: Option<&std::path::Path>,
    ) -> Result<Self, ClientError> {
        let base = Url::parse(base).map_err(|e| {
            ClientError::Local(format!(
                "the server URL {base:?} is not a URL ({e}) — use e.g. http://127.0.0.1:3000"
            ))
        })?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(ClientError::Local(format!(
                "the server URL {base} must start with http:// or https://"
            )));
        }
        let mut http = reqwest::Client::builder();
        if let Some(path) = ca_cert {
            for cert in read_ca_certs(path)? {
                http = http.add_root_certificate(cert);
            }
        }
        let http = http
            .connect_timeout(Duration::from_secs(10))
            .timeout(timeout)
            .user_agent(concat!("tango-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Local(format!("cannot set up the HTTP client: {e}")))?;
        Ok(TangoClient {
            http,
            base,
            key: key.to_string(),
            redactor: KeyRedactor::new(key),
            timeout_secs: timeout.as_secs(),
        })
    }

    /// `<base>/<verb>/<key>/<segments...>/`, each segment percent-encoded,
    /// with Tango's trailing slash. Also returns the route as shown in
    /// messages, with the key hidden.
    fn route(&self, verb: &str, segments: &[&str]) -> (Url, String) {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty()
                .push(verb)
                .push(&self.key)
                .extend(segments)
                .push("");
        }
        let mut shown = format!("/{verb}/<key>/");
        for segment in segments {
            shown.push_str(segment);
            shown.push('/');
        }
        (url, shown)
    }

    fn base_display(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_string()
    }

    fn transport_error(&self, route: &str, err: reqwest::Error) -> ClientError {
        let base = self.base_display();
        if err.is_timeout() && !err.is_connect() {
            return ClientError::TimedOut {
                base,
                route: route.to_string(),
                secs: self.timeout_secs,
            };
        }
        let is_connect = err.is_connect();
        let untrusted = is_certificate_error(&err);
        // reqwest's message may quote the URL, key and all.
        let cause = self.redactor.text(&root_cause(&err.without_url()));
        if untrusted {
            ClientError::Untrusted { base, cause }
        } else if is_connect {
            ClientError::Unreachable { base, cause }
        } else {
            ClientError::Transport {
                base,
                route: route.to_string(),
                cause,
            }
        }
    }

    /// Sends a request and returns the raw 200 answer.
    async fn send(
        &self,
        method: Method,
        url: Url,
        route: &str,
        headers: &[(&str, &str)],
        body: Option<reqwest::Body>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut request = self.http.request(method, url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| self.transport_error(route, e))?;
        let status = response.status();
        if status != StatusCode::OK {
            let body = response.text().await.unwrap_or_default();
            return Err(ClientError::Http {
                base: self.base_display(),
                route: route.to_string(),
                status,
                // Hidden before it is cut, so no part of the key is left.
                body: snippet(&self.redactor.text(&body)),
            });
        }
        Ok(response)
    }

    /// Sends a request whose answer is a v1 JSON object, and turns
    /// `statusId` < 0 into an error.
    async fn call(
        &self,
        method: Method,
        url: Url,
        route: &str,
        headers: &[(&str, &str)],
        body: Option<reqwest::Body>,
    ) -> Result<Value, ClientError> {
        let response = self.send(method, url, route, headers, body).await?;
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(route, e))?;
        parse_answer(route, &bytes, &self.redactor)
    }

    pub async fn open(&self, courselab: &str) -> Result<Value, ClientError> {
        let (url, route) = self.route("open", &[courselab]);
        self.call(Method::GET, url, &route, &[], None).await
    }

    pub async fn upload(
        &self,
        courselab: &str,
        name: &str,
        body: Upload,
    ) -> Result<Value, ClientError> {
        let (url, route) = self.route("upload", &[courselab]);
        let (body, len) = body.into_body();
        self.call(
            Method::POST,
            url,
            &route,
            &[("Filename", name), ("Content-Length", &len)],
            Some(body),
        )
        .await
    }

    pub async fn add_job(&self, courselab: &str, job: &JobRequest) -> Result<Value, ClientError> {
        let body = serde_json::to_vec(job)
            .map_err(|e| ClientError::Local(format!("cannot encode the job: {e}")))?;
        self.add_job_raw(courselab, body).await
    }

    /// addJob with a body given as is (`add-job --json FILE`).
    pub async fn add_job_raw(&self, courselab: &str, body: Vec<u8>) -> Result<Value, ClientError> {
        let (url, route) = self.route("addJob", &[courselab]);
        self.call(Method::POST, url, &route, &[], Some(body.into()))
            .await
    }

    pub async fn poll(
        &self,
        courselab: &str,
        output_file: &str,
    ) -> Result<PollResult, ClientError> {
        let (url, route) = self.route("poll", &[courselab, output_file]);
        let response = self.send(Method::GET, url, &route, &[], None).await?;
        let is_json = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(&route, e))?;
        if !is_json {
            return Ok(PollResult::Ready(bytes.to_vec()));
        }
        // A JSON answer is the "not found" refusal; any other refusal is an
        // error of its own (e.g. a wrong key).
        match parse_answer(&route, &bytes, &self.redactor) {
            Err(ClientError::Refused {
                message, answer, ..
            }) if message == "Output file not found" => Ok(PollResult::NotFound(answer)),
            Err(e) => Err(e),
            // A finished output that happens to be a JSON object with
            // statusId >= 0 is still output.
            Ok(_) => Ok(PollResult::Ready(bytes.to_vec())),
        }
    }

    pub async fn partial_output(&self, job_id: u64) -> Result<Value, ClientError> {
        let id = job_id.to_string();
        let (url, route) = self.route("getPartialOutput", &[&id]);
        self.call(Method::GET, url, &route, &[], None).await
    }

    /// `GET /`, which needs no key: Tango's greeting.
    pub async fn hello(&self) -> Result<String, ClientError> {
        let route = "/";
        let response = self
            .send(Method::GET, self.base.clone(), route, &[], None)
            .await?;
        response
            .text()
            .await
            .map_err(|e| self.transport_error(route, e))
    }

    pub async fn info(&self) -> Result<Value, ClientError> {
        let (url, route) = self.route("info", &[]);
        self.call(Method::GET, url, &route, &[], None).await
    }

    pub async fn jobs(&self, dead: bool) -> Result<Value, ClientError> {
        let (url, route) = self.route("jobs", &[if dead { "1" } else { "0" }]);
        self.call(Method::GET, url, &route, &[], None).await
    }

    pub async fn pool(&self, image: Option<&str>) -> Result<Value, ClientError> {
        let (url, route) = match image {
            Some(image) => self.route("pool", &[image]),
            None => self.route("pool", &[]),
        };
        self.call(Method::GET, url, &route, &[], None).await
    }

    pub async fn prealloc(
        &self,
        image: &str,
        count: &str,
        options: &PreallocOptions,
    ) -> Result<Value, ClientError> {
        let (url, route) = self.route("prealloc", &[image, count]);
        let body = if options.is_empty() {
            None
        } else {
            let bytes = serde_json::to_vec(options)
                .map_err(|e| ClientError::Local(format!("cannot encode options: {e}")))?;
            Some(reqwest::Body::from(bytes))
        };
        self.call(Method::POST, url, &route, &[], body).await
    }

    /// `GET /v2/hosts`: the hosts of backends that spread VMs over several.
    pub async fn hosts(&self) -> Result<Value, ClientError> {
        self.v2(Method::GET, &["hosts"]).await
    }

    /// `GET /v2/servers`: the tangod servers sharing the server's store.
    pub async fn servers(&self) -> Result<Value, ClientError> {
        self.v2(Method::GET, &["servers"]).await
    }

    /// `POST /v2/hosts/NAME/drain` (or `undrain`): the host's new status.
    pub async fn set_host_draining(&self, name: &str, drain: bool) -> Result<Value, ClientError> {
        let action = if drain { "drain" } else { "undrain" };
        self.v2(Method::POST, &["hosts", name, action]).await
    }

    /// A `/v2/` route: the key as a bearer token (never in the URL), and
    /// an answer that is JSON with an HTTP status rather than a statusId.
    async fn v2(&self, method: Method, segments: &[&str]) -> Result<Value, ClientError> {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push("v2").extend(segments);
        }
        let route = format!("/v2/{}", segments.join("/"));
        let response = self
            .http
            .request(method, url)
            .bearer_auth(&self.key)
            .send()
            .await
            .map_err(|e| self.transport_error(&route, e))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(&route, e))?;
        let answer: Option<Value> = serde_json::from_slice(&bytes)
            .ok()
            .map(|v| self.redactor.value(v));
        if !status.is_success() {
            let message = answer
                .as_ref()
                .and_then(|a| a.get("error"))
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| snippet(&self.redactor.text(&String::from_utf8_lossy(&bytes))));
            return Err(ClientError::V2 {
                base: self.base_display(),
                route,
                status,
                message,
            });
        }
        answer.ok_or_else(|| ClientError::BadAnswer {
            route,
            cause: "not JSON".into(),
            body: snippet(&self.redactor.text(&String::from_utf8_lossy(&bytes))),
        })
    }

    pub async fn build(&self, image_name: &str, tar: Upload) -> Result<Value, ClientError> {
        let (url, route) = self.route("build", &[]);
        let (body, len) = tar.into_body();
        self.call(
            Method::POST,
            url,
            &route,
            &[("imageName", image_name), ("Content-Length", &len)],
            Some(body),
        )
        .await
    }
}

/// Parses a v1 answer: a JSON object whose `statusId` is >= 0 on success.
/// The key is hidden in the answer (and in the error) it gives back.
pub fn parse_answer(
    route: &str,
    bytes: &[u8],
    redactor: &KeyRedactor,
) -> Result<Value, ClientError> {
    let bad = |cause: String| ClientError::BadAnswer {
        route: route.to_string(),
        cause: redactor.text(&cause),
        body: snippet(&redactor.text(&String::from_utf8_lossy(bytes))),
    };
    let answer: Value = serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    let answer = redactor.value(answer);
    let Some(object) = answer.as_object() else {
        return Err(bad("not a JSON object".into()));
    };
    let Some(status_id) = object.get("statusId").and_then(Value::as_i64) else {
        return Err(bad("no integer statusId".into()));
    };
    if status_id < 0 {
        let message = object
            .get("statusMsg")
            .and_then(Value::as_str)
            .unwrap_or("(no statusMsg)")
            .to_string();
        return Err(ClientError::Refused {
            route: route.to_string(),
            status_id,
            message,
            answer,
        });
    }
    Ok(answer)
}

/// The innermost cause of an error, e.g. "connection refused" rather than
/// reqwest's "error sending request for url (...)".
/// The certificates of a `--ca-cert` file.
fn read_ca_certs(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, ClientError> {
    let pem = std::fs::read(path).map_err(|e| {
        ClientError::Local(format!("cannot read --ca-cert {}: {e}", path.display()))
    })?;
    reqwest::Certificate::from_pem_bundle(&pem)
        .ok()
        .filter(|certs| !certs.is_empty())
        .ok_or_else(|| {
            ClientError::Local(format!(
                "--ca-cert {} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
                path.display()
            ))
        })
}

/// Whether rustls refused the server's certificate somewhere down the
/// chain. io::Error's source() skips the error it wraps (where tokio-rustls
/// puts rustls's), so an io::Error is opened instead.
fn is_certificate_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(rustls::Error::InvalidCertificate(_)) = e.downcast_ref() {
            return true;
        }
        current = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    false
}

fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current: &(dyn std::error::Error + 'static) = err;
    while let Some(next) = current.source() {
        current = next;
    }
    if let Some(io) = current.downcast_ref::<std::io::Error>() {
        if let Some(code) = io.raw_os_error() {
            // "Connection refused (os error 111)" -> "connection refused"
            let text = std::io::Error::from_raw_os_error(code).to_string();
            let text = text.split(" (os error").next().unwrap_or(&text).to_string();
            return lowercase_first(&text);
        }
    }
    lowercase_first(&current.to_string())
}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// At most 300 characters of a body, for messages.
fn snippet(text: &str) -> String {
    let text = text.trim();
    if text.chars().count() > 300 {
        let cut: String = text.chars().take(300).collect();
        format!("{cut}…")
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_encode_segments_and_hide_the_key() {
        let client = TangoClient::new(
            "http://127.0.0.1:3000",
            "s3cret",
            Duration::from_secs(5),
            None,
        )
        .unwrap();
        let (url, shown) = client.route("poll", &["lab 1", "a/b%.out"]);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:3000/poll/s3cret/lab%201/a%2Fb%25.out/"
        );
        assert_eq!(shown, "/poll/<key>/lab 1/a/b%.out/");
        assert!(!shown.contains("s3cret"));
        let (url, _) = client.route("info", &[]);
        assert_eq!(url.as_str(), "http://127.0.0.1:3000/info/s3cret/");
    }

    #[test]
    fn routes_keep_a_base_path() {
        let client = TangoClient::new(
            "https://h.example/tango/",
            "k",
            Duration::from_secs(5),
            None,
        )
        .unwrap();
        let (url, _) = client.route("open", &["lab"]);
        assert_eq!(url.as_str(), "https://h.example/tango/open/k/lab/");
    }

    #[test]
    fn bad_urls_are_explained() {
        let err = TangoClient::new("127.0.0.1:3000", "k", Duration::from_secs(5), None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("http://"), "{err}");
    }

    #[test]
    fn answers_are_checked() {
        let none = KeyRedactor::new("");
        let ok = parse_answer(
            "/x/",
            br#"{"statusId":0,"statusMsg":"Found directory","files":{}}"#,
            &none,
        );
        assert!(ok.is_ok());
        let refused = parse_answer(
            "/x/",
            br#"{"statusId":-1,"statusMsg":"Key not recognized"}"#,
            &none,
        )
        .unwrap_err();
        let text = refused.to_string();
        assert!(text.contains("Key not recognized"), "{text}");
        assert!(text.contains("TANGO_KEY"), "{text}");
        assert!(refused.answer().is_some());
        assert!(matches!(
            parse_answer("/x/", b"<html>", &none),
            Err(ClientError::BadAnswer { .. })
        ));
        assert!(matches!(
            parse_answer("/x/", b"[1]", &none),
            Err(ClientError::BadAnswer { .. })
        ));
        assert!(matches!(
            parse_answer("/x/", br#"{"statusMsg":"x"}"#, &none),
            Err(ClientError::BadAnswer { .. })
        ));
    }

    #[test]
    fn the_key_is_hidden_in_every_form_it_travels_in() {
        let key = "s3cr\"et k/ey";
        let redactor = KeyRedactor::new(key);
        let client = TangoClient::new(
            "http://127.0.0.1:3000/tango",
            key,
            Duration::from_secs(5),
            None,
        )
        .unwrap();
        let (url, _) = client.route("info", &[]);
        // As sent in the URL, as given, and JSON-escaped.
        let text = format!(
            "no such route: {} ({key}) {}",
            url.path(),
            serde_json::to_string(key).unwrap()
        );
        assert_eq!(
            redactor.text(&text),
            "no such route: /tango/info/<key>/ (<key>) \"<key>\""
        );
        // A placeholder just written is not matched again, even when the
        // key is part of it.
        assert_eq!(KeyRedactor::new("k").text("a k b"), "a <key> b");
        assert_eq!(KeyRedactor::new("key").text("key keys"), "<key> <key>s");
        // No key, nothing to hide.
        assert_eq!(KeyRedactor::new("").text("abc"), "abc");
    }

    #[test]
    fn answers_and_bodies_from_the_server_hide_the_key() {
        let redactor = KeyRedactor::new("audkey6");
        let refused = parse_answer(
            "/info/<key>/",
            br#"{"statusId":-1,"statusMsg":"no such route: /tango/info/audkey6/","detail":"key audkey6","audkey6":["audkey6"]}"#,
            &redactor,
        )
        .unwrap_err();
        let text = refused.to_string();
        assert!(!text.contains("audkey6"), "{text}");
        assert!(
            text.contains("no such route: /tango/info/<key>/: key <key>"),
            "{text}"
        );
        let answer = refused.answer().unwrap().to_string();
        assert!(!answer.contains("audkey6"), "{answer}");
        assert!(answer.contains(r#""<key>":["<key>"]"#), "{answer}");
        // Successful answers are hidden too (`--json` prints them).
        let ok = parse_answer(
            "/jobs/<key>/1/",
            br#"{"statusId":0,"statusMsg":"x","jobs":[{"trace":["t|audkey6"]}]}"#,
            &redactor,
        )
        .unwrap();
        assert!(!ok.to_string().contains("audkey6"), "{ok}");
        // A body that is not JSON: hidden before it is cut to a snippet, so
        // not even the start of the key is left at the cut.
        let mut body = "x".repeat(297).into_bytes();
        body.extend_from_slice(b"audkey6 and more");
        let bad = parse_answer("/info/<key>/", &body, &redactor).unwrap_err();
        let text = bad.to_string();
        assert!(!text.contains("aud"), "{text}");
        assert!(text.contains("<ke"), "{text}");
    }

    #[test]
    fn job_body_matches_the_contract() {
        let job = JobRequest {
            image: "img".into(),
            files: vec![JobFile {
                local_file: "autograde-Makefile".into(),
                dest_file: "Makefile".into(),
            }],
            job_name: "j".into(),
            output_file: "o.out".into(),
            timeout: Some(10),
            callback_url: Some("http://127.0.0.1:1/cb".into()),
            ..JobRequest::default()
        };
        let value = serde_json::to_value(&job).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "image": "img",
                "files": [{"localFile": "autograde-Makefile", "destFile": "Makefile"}],
                "jobName": "j",
                "output_file": "o.out",
                "timeout": 10,
                "callback_url": "http://127.0.0.1:1/cb"
            })
        );
    }

    #[tokio::test]
    async fn unreachable_server_message_says_what_to_try() {
        // A port nobody listens on: bind one, note it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let base = format!("http://127.0.0.1:{port}");
        let client = TangoClient::new(&base, "k", Duration::from_secs(5), None).unwrap();
        let err = client.info().await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("cannot reach tangod at {base}")),
            "{text}"
        );
        assert!(text.contains("connection refused"), "{text}");
        assert!(text.contains("TANGO_URL"), "{text}");
    }
}
