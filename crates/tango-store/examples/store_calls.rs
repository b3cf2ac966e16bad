//! How long one `Store` call takes, SQLite against PostgreSQL, made as the
//! engine makes them: from a thread that waits for the answer. Issue 21's
//! benchmark (`bench/servers.sh`) found addJob slower on PostgreSQL; this
//! separates the calls, and times the same read made straight through sqlx
//! on a runtime of the caller's own (no channel, no hop to the store's
//! thread). Last, the four calls of an addJob of a two-file job
//! (`file_md5` twice, `next_job_id`, `save_job`) from 2 and from 16 threads
//! at once: a tangod on two cores has two runtime threads, and each blocks
//! for the length of its store call.
//!
//! ```sh
//! cargo run --release -p tango-store --features postgres --example store_calls -- \
//!     postgres://USER@HOST:PORT/DATABASE [CALLS]
//! ```
//! The database should be a scratch one: jobs are written into it.

use anyhow::{bail, Context, Result};
use std::sync::Arc;
use std::time::Instant;
use tango_core::{Job, Store};
use tango_store::{PostgresStore, SqliteStore};

fn job(i: usize) -> Job {
    Job::new(
        format!("user{i}_hello"),
        "bench-course".into(),
        "bench-course".into(),
        "host".into(),
        "sandbox".into(),
    )
}

/// Mean and p50 of `calls` runs of `call`, in microseconds.
fn time(calls: usize, mut call: impl FnMut(usize) -> Result<()>) -> Result<(f64, f64)> {
    let mut micros = Vec::with_capacity(calls);
    for i in 0..calls {
        let start = Instant::now();
        call(i)?;
        micros.push(start.elapsed().as_secs_f64() * 1e6);
    }
    micros.sort_by(f64::total_cmp);
    let mean = micros.iter().sum::<f64>() / micros.len().max(1) as f64;
    Ok((mean, micros.get(micros.len() / 2).copied().unwrap_or(0.0)))
}

/// One kind of store call, by its number in the run.
type Call<'a> = Box<dyn FnMut(usize) -> Result<()> + 'a>;

fn calls_of(name: &str, store: &dyn Store, calls: usize) -> Result<()> {
    store.set_file(
        "bench-course",
        "hello.py",
        "0123456789abcdef0123456789abcdef",
    )?;
    let mut saved = Vec::with_capacity(calls);
    let rows: [(&str, Call); 4] = [
        (
            "next_job_id",
            Box::new(|_| {
                store.next_job_id()?;
                Ok(())
            }),
        ),
        (
            "next_job_id, then save_job of the new job (an INSERT, a commit)",
            Box::new(|i| {
                let mut job = job(i);
                job.id = store.next_job_id()?;
                store.save_job(&job)?;
                saved.push(job.id);
                Ok(())
            }),
        ),
        (
            "file_md5 (a read)",
            Box::new(|_| {
                store.file_md5("bench-course", "hello.py")?;
                Ok(())
            }),
        ),
        (
            "get_job (a read)",
            Box::new(|i| {
                store.get_job(1 + (i as u64 % 100))?;
                Ok(())
            }),
        ),
    ];
    for (what, call) in rows {
        let (mean, p50) = time(calls, call)?;
        println!("| {name} | {what} | {mean:.0} µs | {p50:.0} µs |");
    }
    Ok(())
}

/// addJob's store calls from `threads` threads at once: addJobs per second.
fn add_rate(store: Arc<dyn Store>, threads: usize, per_thread: usize) -> Result<f64> {
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || -> Result<()> {
                for i in 0..per_thread {
                    store.file_md5("bench-course", "hello.py")?;
                    store.file_md5("bench-course", "Makefile")?;
                    let mut job = job(t * per_thread + i);
                    job.id = store.next_job_id()?;
                    store.save_job(&job)?;
                }
                Ok(())
            })
        })
        .collect();
    for worker in workers {
        match worker.join() {
            Ok(result) => result?,
            Err(_) => bail!("a thread panicked"),
        }
    }
    Ok((threads * per_thread) as f64 / start.elapsed().as_secs_f64())
}

/// The same read as `file_md5`, straight through sqlx from the caller's
/// own runtime.
fn direct_read(url: &str, calls: usize) -> Result<(f64, f64)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let pool = runtime.block_on(
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(url),
    )?;
    time(calls, |_| {
        runtime.block_on(
            sqlx::query_scalar::<_, String>(
                "SELECT md5 FROM files WHERE courselab = $1 AND name = $2",
            )
            .bind("bench-course")
            .bind("hello.py")
            .fetch_optional(&pool),
        )?;
        Ok(())
    })
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(url) = args.next() else {
        bail!("usage: store_calls postgres://USER@HOST:PORT/DATABASE [CALLS]");
    };
    let calls: usize = match args.next() {
        Some(n) => n.parse().context("CALLS must be a number")?,
        None => 2000,
    };
    let dir = tempfile::tempdir()?;
    let sqlite: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("tango.db"), false)?);
    let postgres: Arc<dyn Store> = Arc::new(PostgresStore::open(&url)?);
    println!("| store | call, one at a time | mean | p50 |");
    println!("|---|---|---|---|");
    calls_of("SQLite", sqlite.as_ref(), calls)?;
    calls_of("PostgreSQL", postgres.as_ref(), calls)?;
    let (mean, p50) = direct_read(&url, calls)?;
    println!(
        "| PostgreSQL | the file_md5 read, straight through sqlx | {mean:.0} µs | {p50:.0} µs |"
    );
    println!();
    println!("| store | addJob's four calls from 2 threads | from 16 threads |");
    println!("|---|---|---|");
    for (name, store) in [("SQLite", &sqlite), ("PostgreSQL", &postgres)] {
        let two = add_rate(store.clone(), 2, calls / 2)?;
        let sixteen = add_rate(store.clone(), 16, calls / 16)?;
        println!("| {name} | {two:.0} addJobs/s | {sixteen:.0} addJobs/s |");
    }
    Ok(())
}
