//! Issue 20's queue at scale, through a real tangod over HTTP: how fast v1
//! `addJob` accepts jobs as the queue grows to 100,000, and what a queued
//! job costs in tangod's memory.
//!
//! It starts tangod (sandbox backend, image `host`, the default SQLite store)
//! with `max_vms = 1`, fills that one VM with a job that sleeps for an hour,
//! then adds jobs with unique names and output files from 8 connections as
//! fast as tangod takes them. None of them can start, so the queue only
//! grows. It prints the accept rate of each window of 10,000 jobs, tangod's
//! resident memory (VmRSS) at 0, 1k, 10k and 100k queued, and the time of a
//! few reads (`/v2/jobs` page, `/v2/summary`, v1 `/jobs`) at 1k, 10k and
//! 100k. Dispatch cost is measured in-process by tango-core's
//! `queue_scale` example (no VM backend can start 100k jobs quickly).
//!
//! Needs root (the sandbox backend). `bench/queue_scale.sh` builds what it
//! needs and runs it:
//! `queue_scale_http --tangod PATH --autodriver PATH [--jobs N] [--conns N]`

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "benchkey";
const LAB: &str = "queue-scale";
const WINDOW: usize = 10_000;
/// Queue sizes at which memory and reads are measured.
const CHECKPOINTS: [usize; 3] = [1_000, 10_000, 100_000];

struct Args {
    tangod: PathBuf,
    autodriver: PathBuf,
    jobs: usize,
    conns: usize,
}

fn parse_args() -> Result<Args> {
    let mut tangod = None;
    let mut autodriver = None;
    let mut jobs = 100_000;
    let mut conns = 8;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow!("{arg} needs a value"));
        match arg.as_str() {
            "--tangod" => tangod = Some(PathBuf::from(value()?)),
            "--autodriver" => autodriver = Some(PathBuf::from(value()?)),
            "--jobs" => jobs = value()?.parse().context("--jobs must be a number")?,
            "--conns" => conns = value()?.parse().context("--conns must be a number")?,
            other => bail!(
                "unknown argument {other:?}; usage: queue_scale_http --tangod PATH --autodriver PATH [--jobs N] [--conns N]"
            ),
        }
    }
    if jobs < WINDOW || conns == 0 {
        bail!("--jobs must be at least {WINDOW} and --conns at least 1");
    }
    Ok(Args {
        tangod: tangod.ok_or_else(|| anyhow!("--tangod PATH is required"))?,
        autodriver: autodriver.ok_or_else(|| anyhow!("--autodriver PATH is required"))?,
        jobs,
        conns,
    })
}

/// Stops tangod when the bench ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM, so that tangod stops the holding job and removes its
        // sandbox (a SIGKILL leaves its mount and its `sleep` behind).
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("tangod did not stop within 20 s of SIGTERM; killing it");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))?;
    let kib = line.split_whitespace().nth(1).unwrap_or_default();
    kib.parse().with_context(|| format!("VmRSS line {line:?}"))
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    fn v1(&self, route: &str) -> String {
        format!("{}/{route}/{KEY}/{LAB}/", self.base)
    }

    async fn add_job(&self, name: &str, output: &str, timeout: u64) -> Result<()> {
        let body = json!({
            "image": "host",
            "files": [{"localFile": "Makefile", "destFile": "Makefile"}],
            "jobName": name,
            "output_file": output,
            "timeout": timeout,
        });
        let answer: Value = self
            .http
            .post(self.v1("addJob"))
            .body(body.to_string())
            .send()
            .await?
            .json()
            .await?;
        if answer["statusId"] != 0 {
            bail!("addJob {name} refused: {answer}");
        }
        Ok(())
    }

    /// Wall time of one GET, and the size of its answer.
    async fn timed_get(&self, path: &str, bearer: bool) -> Result<(Duration, usize)> {
        let start = Instant::now();
        let mut req = self.http.get(format!("{}{path}", self.base));
        if bearer {
            req = req.bearer_auth(KEY);
        }
        let resp = req.send().await?.error_for_status()?;
        let len = resp.bytes().await?.len();
        Ok((start.elapsed(), len))
    }
}

/// Adds jobs `from..to` from `conns` connections at once; each job has its
/// own name (1,000 submitters) and output file.
async fn add_range(client: &Arc<Client>, from: usize, to: usize, conns: usize) -> Result<()> {
    let next = Arc::new(AtomicUsize::new(from));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (client, next) = (client.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to {
                    return Ok::<(), anyhow::Error>(());
                }
                let name = format!(
                    "15213-f26_lab3_{}_s{:04}@andrew.cmu.edu",
                    i / 1000,
                    i % 1000
                );
                client.add_job(&name, &format!("q{i}.out"), 60).await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let work = tempfile::tempdir()?;
    let config = work.path().join("tangod.toml");
    std::fs::write(
        &config,
        "vmms = \"sandbox\"\n[engine]\nmax_vms = 1\nprefix = \"qs\"\n# The holding job would otherwise delay the stop by 30 s.\nshutdown_grace_secs = 1\n",
    )?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let log = std::fs::File::create(work.path().join("tangod.log"))?;
    let server = Server(
        Command::new(&args.tangod)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(work.path().join("data"))
            .args(["--key", KEY, "--config"])
            .arg(&config)
            .arg("--autodriver")
            .arg(&args.autodriver)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", args.tangod.display()))?,
    );
    let pid = server.0.id();
    let client = Arc::new(Client {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(args.conns)
            .build()?,
        base: format!("http://127.0.0.1:{port}"),
    });

    let started = Instant::now();
    while client.http.get(&client.base).send().await.is_err() {
        if started.elapsed() > Duration::from_secs(30) {
            let log = std::fs::read_to_string(work.path().join("tangod.log"))?;
            bail!("tangod did not answer within 30 s; its log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.http.get(client.v1("open")).send().await?;
    client
        .http
        .post(client.v1("upload"))
        .header("Filename", "Makefile")
        .body("autograde:\n\tsleep 3600\n")
        .send()
        .await?
        .error_for_status()?;
    // The one VM runs this job for the whole bench, so the rest queue.
    client
        .add_job("hold_1_holder@x.edu", "hold.out", 3600)
        .await?;
    let started = Instant::now();
    loop {
        let (_, _) = client.timed_get("/v2/summary", true).await?;
        let page: Value = client
            .http
            .get(format!("{}/v2/jobs?state=running&limit=1", client.base))
            .bearer_auth(KEY)
            .send()
            .await?
            .json()
            .await?;
        if page["jobs"].as_array().is_some_and(|j| !j.is_empty()) {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the holding job did not start within 30 s: {page}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss0 = rss_kib(pid)?;
    println!(
        "tangod pid {pid}, {} jobs from {} connections; VmRSS with the queue empty: {rss0} KiB",
        args.jobs, args.conns
    );

    let mut stops: Vec<usize> = (1..=args.jobs / WINDOW).map(|w| w * WINDOW).collect();
    stops.extend(CHECKPOINTS.iter().filter(|&&c| c <= args.jobs));
    stops.sort_unstable();
    stops.dedup();
    let mut queued = 0;
    let mut window_time = Duration::ZERO;
    let mut rates = Vec::new();
    let mut reads = Vec::new();
    for stop in stops {
        let t = Instant::now();
        add_range(&client, queued, stop, args.conns).await?;
        window_time += t.elapsed();
        queued = stop;
        if queued % WINDOW == 0 {
            rates.push((queued, WINDOW as f64 / window_time.as_secs_f64()));
            window_time = Duration::ZERO;
        }
        if CHECKPOINTS.contains(&queued) {
            let rss = rss_kib(pid)?;
            let page = client
                .timed_get("/v2/jobs?state=queued&limit=500", true)
                .await?;
            let summary = client.timed_get("/v2/summary", true).await?;
            let v1_jobs = client.timed_get(&format!("/jobs/{KEY}/0/"), false).await?;
            reads.push((queued, rss, page, summary, v1_jobs));
        }
    }

    println!("\naddJob accept rate by queue size (jobs/s):");
    println!("| queued | jobs/s |");
    println!("|---|---|");
    for (upto, rate) in &rates {
        println!(
            "| {}k-{}k | {rate:.0} |",
            (upto - WINDOW) / 1000,
            upto / 1000
        );
    }
    if let (Some(first), Some(last)) = (rates.first(), rates.last()) {
        println!(
            "last window / first window: {:.2} (target: at least 0.67)",
            last.1 / first.1
        );
    }
    println!("\nat each queue size (reads: wall time, answer size):");
    println!("| queued | VmRSS | per queued job | /v2/jobs?state=queued&limit=500 | /v2/summary | v1 /jobs/KEY/0 |");
    println!("|---|---|---|---|---|---|");
    for (n, rss, page, summary, v1_jobs) in &reads {
        let per_job = (*rss as f64 - rss0 as f64) * 1024.0 / *n as f64;
        let read = |(d, len): &(Duration, usize)| {
            format!("{:.1} ms, {} KB", d.as_secs_f64() * 1e3, len / 1000)
        };
        println!(
            "| {n} | {:.1} MiB | {per_job:.0} B | {} | {} | {} |",
            *rss as f64 / 1024.0,
            read(page),
            read(summary),
            read(v1_jobs)
        );
    }
    println!("(per queued job = (VmRSS at n - VmRSS at 0) / n; target: under 1,500 B at 100k)");
    drop(server);
    Ok(())
}
