//! Benchmark of the sandbox backend at the VMMS level (no tangod, no HTTP):
//! latency of initialize + copy_in + run + copy_out + destroy for a trivial
//! job, one at a time, and throughput at concurrency 16.
//!
//! Needs root. Usage:
//!   cargo run --release -p tango-vmms --example sandbox_bench -- \
//!       [--autodriver PATH] [--image host] [--latency-jobs 50] [--jobs 200] [--concurrency 16]
//! The autodriver defaults to $TANGO_AUTODRIVER.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tango_core::{InputFile, Machine, RunRequest, RunStatus, Vmms};
use tango_vmms::sandbox::{Sandbox, SandboxConfig};

struct Options {
    autodriver: PathBuf,
    image: String,
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
        latency_jobs: 50,
        jobs: 200,
        concurrency: 16,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--autodriver" => options.autodriver = value.into(),
            "--image" => options.image = value,
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

/// One whole job on a fresh VM; returns its duration.
async fn one_job(
    sandbox: &Sandbox,
    id: u64,
    image: &str,
    inputs: &[InputFile],
    out_dir: &std::path::Path,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let vm = Machine::new("bench", id, image, "sandbox");
    let request = RunRequest {
        job_id: id,
        timeout_secs: 20,
        output_cap_bytes: 1 << 20,
        max_procs: 256,
        max_file_bytes: 1 << 26,
        disable_network: true,
    };
    sandbox.initialize_vm(&vm).await?;
    sandbox.copy_in(&vm, inputs).await?;
    let outcome = sandbox.run_job(&vm, &request).await?;
    let dest = out_dir.join(format!("out-{id}"));
    sandbox.copy_out(&vm, &dest).await?;
    sandbox.destroy_vm(&vm).await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(
        outcome.status == RunStatus::Completed,
        "job {id}: {outcome:?}"
    );
    let output = std::fs::read_to_string(&dest)?;
    anyhow::ensure!(output.contains("hello"), "job {id} printed {output:?}");
    std::fs::remove_file(&dest)?;
    Ok(elapsed)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = parse_options()?;
    let work = tempfile::Builder::new()
        .prefix("tango-sandbox-bench-")
        .tempdir_in("/var/tmp")?;
    let sandbox = Arc::new(Sandbox::new(SandboxConfig {
        data_dir: work.path().join("data"),
        autodriver: options.autodriver.clone(),
        cgroup_root_name: "tango-rs-bench".into(),
        ..SandboxConfig::default()
    })?);
    sandbox.cleanup_leftovers("bench").await?;
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
        "cgroup layout: {:?}, image: {}",
        sandbox.cgroup_version(),
        options.image
    );

    // Warm-up (page cache, first cgroup creation).
    one_job(&sandbox, 0, &options.image, &inputs, &out_dir).await?;

    let mut latencies = Vec::new();
    for id in 1..=options.latency_jobs {
        latencies.push(one_job(&sandbox, id, &options.image, &inputs, &out_dir).await?);
    }
    latencies.sort();
    println!(
        "sequential, {} jobs: p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        latencies.len(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.9).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );

    let semaphore = Arc::new(tokio::sync::Semaphore::new(options.concurrency));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for id in 0..options.jobs {
        let permit = semaphore.clone().acquire_owned().await?;
        let (sandbox, inputs, out_dir, image) = (
            sandbox.clone(),
            inputs.clone(),
            out_dir.clone(),
            options.image.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let result = one_job(&sandbox, 10_000 + id, &image, &inputs, &out_dir).await;
            drop(permit);
            result
        }));
    }
    let mut concurrent = Vec::new();
    for task in tasks {
        concurrent.push(task.await??);
    }
    let wall = started.elapsed();
    concurrent.sort();
    println!(
        "concurrency {}, {} jobs: {:.1} jobs/s (wall {:.2} s), per-job p50 {:.1} ms, p90 {:.1} ms",
        options.concurrency,
        options.jobs,
        options.jobs as f64 / wall.as_secs_f64(),
        wall.as_secs_f64(),
        percentile(&concurrent, 0.5).as_secs_f64() * 1e3,
        percentile(&concurrent, 0.9).as_secs_f64() * 1e3,
    );
    Ok(())
}
