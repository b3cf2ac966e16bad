//! `tango run` and `tango bench`: upload a job directory, add jobs, wait
//! for their results (callback or polling) and measure them.

use crate::callback::{CallbackListener, Delivery};
use crate::client::{JobFile, JobRequest, PollResult, TangoClient, Upload};
use crate::outcome::Outcome;
use anyhow::{anyhow, bail, Context, Result};
use md5::{Digest, Md5};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One file of a job directory and where it goes.
#[derive(Debug, Clone)]
pub struct DirFile {
    pub path: PathBuf,
    /// Name it is uploaded under (its file name).
    pub upload_name: String,
    /// Name inside the VM (`Makefile` for the makefile).
    pub dest_name: String,
}

/// Lists the top-level regular files of a job directory. Its
/// `autograde-Makefile` (or, failing that, `Makefile`) becomes `Makefile`.
pub fn job_dir_files(dir: &Path) -> Result<Vec<DirFile>> {
    let entries = std::fs::read_dir(dir).with_context(|| {
        format!(
            "cannot read job directory {} — give a directory with an autograde-Makefile",
            dir.display()
        )
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let path = entry.path();
        // Follows symlinks: a link to a file is uploaded as that file.
        let is_file = std::fs::metadata(&path)
            .map(|m| m.is_file())
            .unwrap_or(false);
        if !is_file {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            bail!("{} has a name that is not UTF-8; rename it", path.display());
        };
        files.push(DirFile {
            path,
            dest_name: name.clone(),
            upload_name: name,
        });
    }
    files.sort_by(|a, b| a.upload_name.cmp(&b.upload_name));
    let has_autograde = files.iter().any(|f| f.upload_name == "autograde-Makefile");
    if has_autograde {
        // Two files may not both land on `Makefile`.
        files.retain(|f| f.upload_name != "Makefile");
        for file in &mut files {
            if file.upload_name == "autograde-Makefile" {
                file.dest_name = "Makefile".into();
            }
        }
    } else if !files.iter().any(|f| f.upload_name == "Makefile") {
        bail!(
            "{} has no autograde-Makefile or Makefile — a job needs one, whose default target runs the job",
            dir.display()
        );
    }
    Ok(files)
}

fn md5_of(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex::encode(Md5::digest(&bytes)))
}

/// Which files `prepare` sent and which the server already had.
#[derive(Debug, Default, Serialize)]
pub struct UploadReport {
    pub uploaded: Vec<String>,
    pub unchanged: Vec<String>,
}

/// Opens the courselab and uploads every file whose md5 differs from what
/// `open` reports. Returns the job's file list.
pub async fn prepare(
    client: &TangoClient,
    courselab: &str,
    files: &[DirFile],
) -> Result<(Vec<JobFile>, UploadReport)> {
    let opened = client.open(courselab).await?;
    let stored = opened.get("files").and_then(Value::as_object);
    let mut report = UploadReport::default();
    for file in files {
        let md5 = md5_of(&file.path)?;
        let same = stored
            .and_then(|s| s.get(&file.upload_name))
            .and_then(Value::as_str)
            .is_some_and(|stored_md5| stored_md5.eq_ignore_ascii_case(&md5));
        if same {
            report.unchanged.push(file.upload_name.clone());
            continue;
        }
        let body = open_file(&file.path).await?;
        client
            .upload(courselab, &file.upload_name, body)
            .await
            .with_context(|| format!("uploading {}", file.path.display()))?;
        report.uploaded.push(file.upload_name.clone());
    }
    let job_files = files
        .iter()
        .map(|f| JobFile {
            local_file: f.upload_name.clone(),
            dest_file: f.dest_name.clone(),
        })
        .collect();
    Ok((job_files, report))
}

pub async fn open_file(path: &Path) -> Result<Upload> {
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let len = file
        .metadata()
        .await
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len();
    Ok(Upload { file, len })
}

/// How results come back.
pub enum Wait {
    Callback(Arc<CallbackListener>),
    Poll,
}

/// The fixed part of every job of a run.
pub struct JobTemplate {
    pub courselab: String,
    pub image: String,
    pub files: Vec<JobFile>,
    pub name_prefix: String,
    pub timeout: Option<u64>,
    pub max_kb: Option<u64>,
    pub disable_network: bool,
    /// Makes output file names unique across runs.
    pub run_id: String,
    /// Longest wait for one result, after addJob.
    pub wait_limit: Duration,
}

impl JobTemplate {
    pub fn new(courselab: &str, image: &str, files: Vec<JobFile>, name_prefix: &str) -> Self {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        JobTemplate {
            courselab: courselab.to_string(),
            image: image.to_string(),
            files,
            name_prefix: name_prefix.to_string(),
            timeout: None,
            max_kb: None,
            disable_network: false,
            run_id: format!("{millis}-{}", std::process::id()),
            wait_limit: Duration::from_secs(600),
        }
    }
}

/// One finished job as a client saw it.
#[derive(Debug, Serialize)]
pub struct JobResult {
    #[serde(rename = "jobId")]
    pub job_id: u64,
    pub courselab: String,
    #[serde(rename = "outputFile")]
    pub output_file: String,
    pub ok: bool,
    pub outcome: Option<String>,
    #[serde(rename = "exitStatus")]
    pub exit_status: Option<i32>,
    #[serde(rename = "timedOut")]
    pub timed_out: bool,
    pub failure: Option<String>,
    pub score: Option<Value>,
    /// From sending addJob to receiving the result.
    pub latency_ms: f64,
    /// From sending addJob to its answer.
    #[serde(rename = "addjob_ms")]
    pub add_ms: f64,
    #[serde(skip)]
    pub output: Vec<u8>,
}

/// The addJob request of job number `index`, and its output file.
fn job_request(
    template: &JobTemplate,
    index: usize,
    callback_url: Option<String>,
) -> (JobRequest, String) {
    let output_file = format!("tango-cli-{}-{index}.out", template.run_id);
    let request = JobRequest {
        image: template.image.clone(),
        files: template.files.clone(),
        job_name: format!("{}_{index}", template.name_prefix),
        output_file: output_file.clone(),
        timeout: template.timeout,
        max_kb: template.max_kb,
        callback_url,
        disable_network: template.disable_network,
    };
    (request, output_file)
}

/// A job tangod accepted: its id, and how long addJob took to answer.
#[derive(Debug, Clone, Copy)]
pub struct Added {
    pub job_id: u64,
    pub sent_at: Instant,
    pub add_ms: f64,
}

async fn add(client: &TangoClient, courselab: &str, request: &JobRequest) -> Result<Added> {
    let sent_at = Instant::now();
    let answer = client.add_job(courselab, request).await?;
    Ok(Added {
        job_id: job_id_of(&answer)?,
        sent_at,
        add_ms: sent_at.elapsed().as_secs_f64() * 1000.0,
    })
}

/// Adds job number `index` and waits for its result.
pub async fn run_job(
    client: &TangoClient,
    template: &JobTemplate,
    wait: &Wait,
    index: usize,
) -> Result<JobResult> {
    let (callback_url, receiver) = match wait {
        Wait::Callback(listener) => {
            let (url, receiver) = listener.expect();
            (Some(url), Some(receiver))
        }
        Wait::Poll => (None, None),
    };
    let (request, output_file) = job_request(template, index, callback_url);
    let Added {
        job_id,
        sent_at,
        add_ms,
    } = add(client, &template.courselab, &request).await?;
    let waited = async {
        match receiver {
            Some(receiver) => {
                let Delivery {
                    output,
                    received_at,
                } = receiver
                    .await
                    .map_err(|_| anyhow!("the callback listener stopped"))?;
                Ok::<_, anyhow::Error>((output, received_at))
            }
            None => {
                let output = poll_until_ready(client, &template.courselab, &output_file).await?;
                Ok((output, Instant::now()))
            }
        }
    };
    let (output, finished_at) = tokio::time::timeout(template.wait_limit, waited)
        .await
        .map_err(|_| {
            anyhow!(
                "no result for job {job_id} after {} s — it may still be queued or running (see `tango jobs`); raise --wait-timeout to wait longer, or use --poll if tangod cannot reach the callback URL",
                template.wait_limit.as_secs()
            )
        })??;
    let outcome = Outcome::parse(&output);
    Ok(JobResult {
        job_id,
        courselab: template.courselab.clone(),
        output_file,
        ok: outcome.ok(),
        failure: outcome.failure_reason(),
        outcome: outcome.line,
        exit_status: outcome.exit_status,
        timed_out: outcome.timed_out,
        score: outcome.score,
        latency_ms: finished_at.duration_since(sent_at).as_secs_f64() * 1000.0,
        add_ms,
        output,
    })
}

/// `jobId` of an addJob answer: a string of digits (or a number).
pub fn job_id_of(answer: &Value) -> Result<u64> {
    match answer.get("jobId") {
        Some(Value::String(s)) => s.parse().ok(),
        Some(Value::Number(n)) => n.as_u64(),
        _ => None,
    }
    .ok_or_else(|| anyhow!("tangod accepted the job but its answer has no jobId: {answer}"))
}

/// Polls until the output file exists. Polling is the protocol here (the
/// server offers no way to be told); the interval grows from 100 ms to 1 s
/// to keep the load low during long jobs.
pub async fn poll_until_ready(
    client: &TangoClient,
    courselab: &str,
    output_file: &str,
) -> Result<Vec<u8>> {
    let mut interval = Duration::from_millis(100);
    loop {
        match client.poll(courselab, output_file).await? {
            PollResult::Ready(bytes) => return Ok(bytes),
            PollResult::NotFound(_) => {
                tokio::time::sleep(interval).await;
                interval = (interval * 3 / 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Latency statistics of a batch (milliseconds).
#[derive(Debug, Serialize, PartialEq)]
pub struct Latencies {
    pub min_ms: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Latencies {
    pub fn of(values: &[f64]) -> Option<Latencies> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Latencies {
            min_ms: sorted[0],
            mean_ms: sorted.iter().sum::<f64>() / sorted.len() as f64,
            p50_ms: percentile(&sorted, 50.0),
            p95_ms: percentile(&sorted, 95.0),
            p99_ms: percentile(&sorted, 99.0),
            max_ms: sorted[sorted.len() - 1],
        })
    }
}

/// Runs `count` jobs at most `concurrency` at a time, ticking `progress`.
/// Job `i` goes to `clients[i % clients.len()]` (and is polled there).
pub async fn run_batch(
    clients: &[TangoClient],
    template: Arc<JobTemplate>,
    wait: Arc<Wait>,
    count: usize,
    concurrency: usize,
    progress: &indicatif::ProgressBar,
) -> (Vec<Result<JobResult>>, Duration) {
    let note = |result: &JobResult| {
        (!result.ok).then(|| {
            format!(
                "last failure: job {}: {}",
                result.job_id,
                result.failure.as_deref().unwrap_or("failed")
            )
        })
    };
    in_turns(count, concurrency, progress, note, |index| {
        let client = pick(clients, index);
        let template = template.clone();
        let wait = wait.clone();
        async move { run_job(&client, &template, &wait, index).await }
    })
    .await
}

/// Adds `count` jobs, at most `concurrency` addJob requests at a time,
/// without waiting for their results (no callback URL). Job `i` goes to
/// `clients[i % clients.len()]`.
pub async fn add_batch(
    clients: &[TangoClient],
    template: Arc<JobTemplate>,
    count: usize,
    concurrency: usize,
    progress: &indicatif::ProgressBar,
) -> (Vec<Result<Added>>, Duration) {
    in_turns(
        count,
        concurrency,
        progress,
        |_| None,
        |index| {
            let client = pick(clients, index);
            let template = template.clone();
            async move {
                let (request, _) = job_request(&template, index, None);
                add(&client, &template.courselab, &request).await
            }
        },
    )
    .await
}

fn pick(clients: &[TangoClient], index: usize) -> TangoClient {
    clients[index % clients.len()].clone()
}

/// Runs `task(0..count)`, `concurrency` at a time, each on its own tokio
/// task so the two cores are both used for the client's share of the work;
/// ticks `progress` and shows the last failure (`note` says which results
/// are one). Returns the results and the time they all took.
async fn in_turns<T, Fut>(
    count: usize,
    concurrency: usize,
    progress: &indicatif::ProgressBar,
    note: impl Fn(&T) -> Option<String>,
    task: impl Fn(usize) -> Fut,
) -> (Vec<Result<T>>, Duration)
where
    T: Send + 'static,
    Fut: std::future::Future<Output = Result<T>> + Send + 'static,
{
    use futures_util::stream::{self, StreamExt};
    let started = Instant::now();
    let results: Vec<Result<T>> = stream::iter(0..count)
        .map(|index| {
            let spawned = tokio::spawn(task(index));
            async move { spawned.await.map_err(|e| anyhow!("job task failed: {e}"))? }
        })
        .buffer_unordered(concurrency.max(1))
        .inspect(|result| {
            progress.inc(1);
            let message = match result {
                Ok(value) => note(value),
                Err(e) => Some(format!("last error: {e}")),
            };
            if let Some(message) = message {
                progress.set_message(message);
            }
        })
        .collect()
        .await;
    (results, started.elapsed())
}

/// What a batch of jobs came to.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub job: String,
    pub image: String,
    /// Servers the jobs were spread over.
    pub servers: usize,
    pub jobs: usize,
    pub concurrency: usize,
    pub ok: usize,
    /// Jobs that ran but failed, plus jobs that could not be added or whose
    /// result never came.
    pub failures: usize,
    /// Failure reason -> count.
    pub failure_reasons: BTreeMap<String, usize>,
    /// Over jobs that produced a result (ok or not); flattened into
    /// `p50_ms`, `p95_ms`... at the top level of the JSON.
    #[serde(flatten)]
    pub latency: Option<Latencies>,
    /// How long addJob took to answer, over the jobs it accepted.
    #[serde(rename = "addjob_ms")]
    pub add_latency: Option<Latencies>,
    pub wall_secs: f64,
    pub throughput_jobs_per_sec: f64,
    /// How results came back: "callback" or "poll".
    pub wait: String,
}

/// What `bench --add-only` came to.
#[derive(Debug, Serialize)]
pub struct AddSummary {
    pub job: String,
    pub image: String,
    pub servers: usize,
    pub jobs: usize,
    pub concurrency: usize,
    pub added: usize,
    pub failures: usize,
    pub failure_reasons: BTreeMap<String, usize>,
    #[serde(rename = "addjob_ms")]
    pub add_latency: Option<Latencies>,
    pub wall_secs: f64,
    /// Jobs accepted per second of the whole submission.
    pub addjob_per_sec: f64,
}

fn per_sec(count: usize, wall: Duration) -> f64 {
    let secs = wall.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

fn count_error(reasons: &mut BTreeMap<String, usize>, reason: String) {
    *reasons.entry(reason).or_insert(0) += 1;
}

/// The fixed facts of a batch, for its summary.
pub struct BatchFacts<'a> {
    pub job: &'a str,
    pub image: &'a str,
    pub servers: usize,
    pub concurrency: usize,
    pub wall: Duration,
}

pub fn summarize(facts: &BatchFacts, results: &[Result<JobResult>], wait: &Wait) -> Summary {
    let mut failure_reasons = BTreeMap::new();
    let mut latencies = Vec::new();
    let mut add_latencies = Vec::new();
    let mut ok = 0;
    for result in results {
        match result {
            Ok(r) => {
                latencies.push(r.latency_ms);
                add_latencies.push(r.add_ms);
                if r.ok {
                    ok += 1;
                } else {
                    let reason = r.failure.clone().unwrap_or_else(|| "failed".into());
                    count_error(&mut failure_reasons, reason);
                }
            }
            Err(e) => count_error(&mut failure_reasons, format!("{e:#}")),
        }
    }
    Summary {
        job: facts.job.to_string(),
        image: facts.image.to_string(),
        servers: facts.servers,
        jobs: results.len(),
        concurrency: facts.concurrency,
        ok,
        failures: results.len() - ok,
        failure_reasons,
        latency: Latencies::of(&latencies),
        add_latency: Latencies::of(&add_latencies),
        wall_secs: facts.wall.as_secs_f64(),
        throughput_jobs_per_sec: per_sec(results.len(), facts.wall),
        wait: match wait {
            Wait::Callback(_) => "callback",
            Wait::Poll => "poll",
        }
        .to_string(),
    }
}

pub fn summarize_adds(facts: &BatchFacts, results: &[Result<Added>]) -> AddSummary {
    let mut failure_reasons = BTreeMap::new();
    let mut add_latencies = Vec::new();
    for result in results {
        match result {
            Ok(added) => add_latencies.push(added.add_ms),
            Err(e) => count_error(&mut failure_reasons, format!("{e:#}")),
        }
    }
    AddSummary {
        job: facts.job.to_string(),
        image: facts.image.to_string(),
        servers: facts.servers,
        jobs: results.len(),
        concurrency: facts.concurrency,
        added: add_latencies.len(),
        failures: results.len() - add_latencies.len(),
        failure_reasons,
        add_latency: Latencies::of(&add_latencies),
        wall_secs: facts.wall.as_secs_f64(),
        addjob_per_sec: per_sec(add_latencies.len(), facts.wall),
    }
}

/// Finds an example job: a path to a directory, or a name under
/// `examples/jobs/` of this directory or one above it (so it works from
/// anywhere in a checkout), or under `$TANGO_EXAMPLES`.
pub fn find_example_job(job: &str) -> Result<PathBuf> {
    let as_path = Path::new(job);
    if as_path.is_dir() {
        return Ok(as_path.to_path_buf());
    }
    let mut looked = Vec::new();
    if let Some(root) = std::env::var_os("TANGO_EXAMPLES") {
        let candidate = PathBuf::from(root).join(job);
        if candidate.is_dir() {
            return Ok(candidate);
        }
        looked.push(candidate);
    }
    if let Ok(cwd) = std::env::current_dir() {
        for dir in cwd.ancestors() {
            let candidate = dir.join("examples").join("jobs").join(job);
            if candidate.is_dir() {
                return Ok(candidate);
            }
            if looked.len() < 3 {
                looked.push(candidate);
            }
        }
    }
    bail!(
        "no job directory {job:?}: not a directory, and not found as examples/jobs/{job} here or above (looked at {}) — give a path, or set TANGO_EXAMPLES to the examples/jobs directory",
        looked
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        let l = Latencies::of(&values).unwrap();
        assert_eq!(l.p50_ms, 50.0);
        assert_eq!(l.p95_ms, 95.0);
        assert_eq!(l.p99_ms, 99.0);
        assert_eq!(l.min_ms, 1.0);
        assert_eq!(l.max_ms, 100.0);
        let l = Latencies::of(&[30.0, 10.0, 20.0]).unwrap();
        assert_eq!(l.p50_ms, 20.0);
        assert_eq!(l.p99_ms, 30.0);
        assert!(Latencies::of(&[]).is_none());
    }

    #[test]
    fn job_dirs_map_the_makefile() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("autograde-Makefile"), "all:\n\techo hi\n").unwrap();
        std::fs::write(dir.path().join("Makefile"), "ignored").unwrap();
        std::fs::write(dir.path().join("hello.py"), "print(1)").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let files = job_dir_files(dir.path()).unwrap();
        let pairs: Vec<(&str, &str)> = files
            .iter()
            .map(|f| (f.upload_name.as_str(), f.dest_name.as_str()))
            .collect();
        assert_eq!(
            pairs,
            vec![("autograde-Makefile", "Makefile"), ("hello.py", "hello.py")]
        );

        let plain = tempfile::tempdir().unwrap();
        std::fs::write(plain.path().join("Makefile"), "all:\n").unwrap();
        let files = job_dir_files(plain.path()).unwrap();
        assert_eq!(files[0].dest_name, "Makefile");

        let empty = tempfile::tempdir().unwrap();
        let err = job_dir_files(empty.path()).unwrap_err();
        assert!(err.to_string().contains("autograde-Makefile"), "{err}");
    }

    #[test]
    fn job_ids_are_digits_or_numbers() {
        assert_eq!(job_id_of(&serde_json::json!({"jobId": "12"})).unwrap(), 12);
        assert_eq!(job_id_of(&serde_json::json!({"jobId": 7})).unwrap(), 7);
        assert!(job_id_of(&serde_json::json!({"statusId": 0})).is_err());
    }
}
