//! Benchmark of the sandbox backend at the VMMS level (no tangod, no HTTP):
//! latency of initialize + copy_in + run + copy_out + destroy for a trivial
//! job, one at a time, and throughput at concurrency 16.
//!
//! Needs root. Usage:
//!   cargo run --release -p tango-vmms --example sandbox_bench -- \
//!       [--autodriver PATH] [--image host] [--image-root DIR] [--latency-jobs 50]
//!       [--jobs 200] [--concurrency 16] [--network]
//! The autodriver defaults to $TANGO_AUTODRIVER. `--image-root DIR` links a
//! root filesystem directory in as the image (e.g. --image bookworm
//! --image-root /var/cache/tango-rs/rootfs-bookworm).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tango_core::{InputFile, Machine, RunRequest, RunStatus, Vmms};
use tango_vmms::sandbox::{Sandbox, SandboxConfig};

struct Options {
    autodriver: PathBuf,
    image: String,
    image_root: Option<PathBuf>,
    /// Give jobs the host's network (no network namespace per job).
    network: bool,
    latency_jobs: u64,
    jobs: u64,
    concurrency: usize,
}

fn parse_options() -> anyhow::Result<Options> {
    let mut options = Options {
        autodriver: std::env::var_os("TANGO_AUTODRIVER")
            .map(PathBuf::from)
            .unwrap_or_default(),
        image: "host".into(),
        image_root: None,
        network: false,
        latency_jobs: 50,
        jobs: 200,
        concurrency: 16,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--network" {
            options.network = true;
            continue;
        }
        let value = args
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--autodriver" => options.autodriver = value.into(),
            "--image" => options.image = value,
            "--image-root" => options.image_root = Some(value.into()),
            "--latency-jobs" => options.latency_jobs = value.parse()?,
            "--jobs" => options.jobs = value.parse()?,
            "--concurrency" => options.concurrency = value.parse()?,
            other => anyhow::bail!("unknown option {other}"),
        }
    }
    if options.autodriver.as_os_str().is_empty() {
        anyhow::bail!("give --autodriver PATH or set TANGO_AUTODRIVER");
    }
    Ok(options)
}

/// Durations of one job's phases: initialize, copy_in, run, copy_out,
/// destroy, and the total.
type Phases = [Duration; 6];
const PHASE_NAMES: [&str; 6] = [
    "initialize",
    "copy_in",
    "run",
    "copy_out",
    "destroy",
    "total",
];

/// One whole job on a fresh VM.
async fn one_job(
    sandbox: &Sandbox,
    id: u64,
    options: &Options,
    inputs: &[InputFile],
    out_dir: &std::path::Path,
) -> anyhow::Result<Phases> {
    let started = Instant::now();
    let mut phases = [Duration::ZERO; 6];
    let mut mark = started;
    let mut lap = |index: usize| {
        let now = Instant::now();
        phases[index] = now - mark;
        mark = now;
    };
    let vm = Machine::new("bench", id, &options.image, "sandbox");
    let request = RunRequest {
        job_id: id,
        timeout_secs: 20,
        output_cap_bytes: 1 << 20,
        max_procs: 256,
        max_file_bytes: 1 << 26,
        disable_network: !options.network,
    };
    sandbox.initialize_vm(&vm).await?;
    lap(0);
    sandbox.copy_in(&vm, inputs).await?;
    lap(1);
    let outcome = sandbox.run_job(&vm, &request).await?;
    lap(2);
    let dest = out_dir.join(format!("out-{id}"));
    sandbox.copy_out(&vm, &dest).await?;
    lap(3);
    sandbox.destroy_vm(&vm).await?;
    lap(4);
    phases[5] = started.elapsed();
    anyhow::ensure!(
        outcome.status == RunStatus::Completed,
        "job {id}: {outcome:?}"
    );
    let output = std::fs::read_to_string(&dest)?;
    anyhow::ensure!(output.contains("hello"), "job {id} printed {output:?}");
    std::fs::remove_file(&dest)?;
    Ok(phases)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// "name p50" for every phase.
fn phase_p50s(all: &[Phases]) -> String {
    (0..6)
        .map(|i| {
            let mut column: Vec<Duration> = all.iter().map(|p| p[i]).collect();
            column.sort();
            format!("{} {:.1}", PHASE_NAMES[i], ms(percentile(&column, 0.5)))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = Arc::new(parse_options()?);
    let work = tempfile::Builder::new()
        .prefix("tango-sandbox-bench-")
        .tempdir_in("/var/tmp")?;
    let sandbox = Arc::new(Sandbox::new(SandboxConfig {
        data_dir: work.path().join("data"),
        autodriver: options.autodriver.clone(),
        cgroup_root_name: "tango-rs-bench".into(),
        allow_network: options.network,
        ..SandboxConfig::default()
    })?);
    sandbox.cleanup_leftovers("bench").await?;
    if let Some(root) = &options.image_root {
        std::os::unix::fs::symlink(root, work.path().join("data/images").join(&options.image))?;
    }
    let makefile = work.path().join("Makefile");
    std::fs::write(&makefile, "all:\n\t@echo hello\n")?;
    let inputs = Arc::new(vec![InputFile {
        local_file: "Makefile".into(),
        dest_file: "Makefile".into(),
        path: makefile,
        md5: String::new(),
    }]);
    let out_dir = Arc::new(work.path().to_path_buf());
    println!(
        "cgroup layout: {:?}, image: {}, network namespace per job: {}",
        sandbox.cgroup_version(),
        options.image,
        !options.network
    );

    // Warm-up (page cache, first cgroup creation).
    one_job(&sandbox, 0, &options, &inputs, &out_dir).await?;

    let mut sequential = Vec::new();
    for id in 1..=options.latency_jobs {
        sequential.push(one_job(&sandbox, id, &options, &inputs, &out_dir).await?);
    }
    let mut totals: Vec<Duration> = sequential.iter().map(|p| p[5]).collect();
    totals.sort();
    println!(
        "sequential, {} jobs: p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        totals.len(),
        ms(percentile(&totals, 0.5)),
        ms(percentile(&totals, 0.9)),
        ms(totals.last().copied().unwrap_or_default()),
    );
    println!("  phase p50 (ms): {}", phase_p50s(&sequential));

    let semaphore = Arc::new(tokio::sync::Semaphore::new(options.concurrency));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for id in 0..options.jobs {
        let permit = semaphore.clone().acquire_owned().await?;
        let (sandbox, inputs, out_dir, options) = (
            sandbox.clone(),
            inputs.clone(),
            out_dir.clone(),
            options.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let result = one_job(&sandbox, 10_000 + id, &options, &inputs, &out_dir).await;
            drop(permit);
            result
        }));
    }
    let mut concurrent = Vec::new();
    for task in tasks {
        concurrent.push(task.await??);
    }
    let wall = started.elapsed();
    let mut totals: Vec<Duration> = concurrent.iter().map(|p| p[5]).collect();
    totals.sort();
    println!(
        "concurrency {}, {} jobs: {:.1} jobs/s (wall {:.2} s), per-job p50 {:.1} ms, p90 {:.1} ms",
        options.concurrency,
        options.jobs,
        options.jobs as f64 / wall.as_secs_f64(),
        wall.as_secs_f64(),
        ms(percentile(&totals, 0.5)),
        ms(percentile(&totals, 0.9)),
    );
    println!("  phase p50 (ms): {}", phase_p50s(&concurrent));
    Ok(())
}
