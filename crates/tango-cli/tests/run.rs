//! `tango run` and `tango bench` against a real tangod (sandbox backend).

mod common;

use common::*;
use predicates::prelude::*;

#[test]
fn run_hello_with_a_callback_and_with_polling() {
    if !root_or_skip("run_hello_with_a_callback_and_with_polling") {
        return;
    }
    let server = Tangod::start();
    // The callback listener (default).
    server
        .tango()
        .args(["run", "examples/jobs/hello"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("Success: Autodriver returned normally")
                .and(predicate::str::contains("Hello, tango!"))
                .and(predicate::str::ends_with(
                    "{\"scores\": {\"hello\": 100}}\n",
                )),
        )
        .stderr(
            predicate::str::contains("uploaded README.md, autograde-Makefile")
                .and(predicate::str::contains("succeeded")),
        );
    // Polling; the files are unchanged, so nothing is uploaded again.
    server
        .tango()
        .args(["run", "examples/jobs/hello", "--poll"])
        .assert()
        .success()
        .stdout(predicate::str::contains("Hello, tango!"))
        .stderr(predicate::str::contains("uploaded none"));
    // JSON for scripts, by callback and by polling.
    for wait in [None, Some("--poll")] {
        let mut cmd = server.tango();
        cmd.args([
            "--json",
            "run",
            "examples/jobs/hello",
            "--courselab",
            "other",
        ]);
        if let Some(flag) = wait {
            cmd.arg(flag);
        }
        let output = cmd.output().unwrap();
        assert!(output.status.success(), "{output:?}");
        let v = stdout_json(&output);
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["exitStatus"], 0, "{v}");
        assert_eq!(v["courselab"], "other", "{v}");
        assert_eq!(v["score"]["scores"]["hello"], 100, "{v}");
        assert!(
            v["output"].as_str().unwrap().contains("Hello, tango!"),
            "{v}"
        );
        assert!(v["latency_ms"].as_f64().unwrap() > 0.0, "{v}");
    }
    // The callback run's job went through tangod with our callback URL.
    let v = stdout_json(
        &server
            .tango()
            .args(["--json", "jobs", "--dead"])
            .output()
            .unwrap(),
    );
    let urls: Vec<String> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| j["notifyURL"].as_str().map(str::to_string))
        .filter(|u| !u.is_empty())
        .collect();
    assert_eq!(urls.len(), 2, "two jobs used a callback: {v}");
    assert!(
        urls.iter().all(|u| u.starts_with("http://127.0.0.1:")),
        "{urls:?}"
    );
}

#[test]
fn failed_jobs_exit_non_zero() {
    if !root_or_skip("failed_jobs_exit_non_zero") {
        return;
    }
    let server = Tangod::start();
    server
        .tango()
        .args(["run", "examples/jobs/failing"])
        .assert()
        .code(3)
        .stdout(predicate::str::contains(
            "Autodriver: Job exited with status 2",
        ))
        .stderr(predicate::str::contains(
            "failed: make exited with status 2",
        ));
    let output = server
        .tango()
        .args([
            "--json",
            "run",
            "examples/jobs/endless",
            "--timeout",
            "2",
            "--poll",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    let v = stdout_json(&output);
    assert_eq!(v["ok"], false);
    assert_eq!(v["timedOut"], true);
    assert_eq!(v["failure"], "Error: Job timed out after 2 seconds", "{v}");
}

#[test]
fn run_many_and_bench() {
    if !root_or_skip("run_many_and_bench") {
        return;
    }
    let server = Tangod::start();
    let output = server
        .tango()
        .args([
            "--json",
            "run",
            "examples/jobs/hello",
            "--jobs",
            "4",
            "--concurrency",
            "2",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let v = stdout_json(&output);
    assert_eq!(v["jobs"], 4, "{v}");
    assert_eq!(v["ok"], 4, "{v}");
    assert_eq!(v["failures"], 0, "{v}");
    // People get a table.
    server
        .tango()
        .args([
            "run",
            "examples/jobs/hello",
            "--jobs",
            "3",
            "--concurrency",
            "3",
            "--poll",
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("latency p95").and(predicate::str::contains("jobs/s")));

    let output = server
        .tango()
        .args(["bench", "hello", "-n", "5", "-c", "2", "--json"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let v = stdout_json(&output);
    assert_eq!(v["job"], "hello", "{v}");
    assert_eq!(v["jobs"], 5, "{v}");
    assert_eq!(v["concurrency"], 2, "{v}");
    assert_eq!(v["ok"], 5, "{v}");
    assert_eq!(v["failures"], 0, "{v}");
    assert_eq!(v["wait"], "callback", "{v}");
    let p50 = v["p50_ms"].as_f64().unwrap();
    let p95 = v["p95_ms"].as_f64().unwrap();
    let p99 = v["p99_ms"].as_f64().unwrap();
    assert!(0.0 < p50 && p50 <= p95 && p95 <= p99, "{v}");
    assert!(v["throughput_jobs_per_sec"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["servers"], 1, "{v}");
    // addJob's answer comes before the job's result.
    let add_p50 = v["addjob_ms"]["p50_ms"].as_f64().unwrap();
    assert!(0.0 < add_p50 && add_p50 <= p50, "{v}");
    eprintln!("bench hello -n 5 -c 2: {v}");

    // A failing job counts as failures and exits 3.
    let output = server
        .tango()
        .args(["bench", "failing", "-n", "2", "-c", "2", "--json"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    let v = stdout_json(&output);
    assert_eq!(v["failures"], 2, "{v}");
    assert_eq!(v["failure_reasons"]["make exited with status 2"], 2, "{v}");
}

/// Names of the finished jobs of `server` whose name starts with `prefix`.
fn dead_job_names(server: &Tangod, prefix: &str) -> Vec<String> {
    let v = stdout_json(
        &server
            .tango()
            .args(["--json", "jobs", "--dead"])
            .output()
            .unwrap(),
    );
    let mut names: Vec<String> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| j["name"].as_str())
        .filter(|name| name.starts_with(prefix))
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

#[test]
fn bench_spreads_jobs_over_several_servers_in_turn() {
    if !root_or_skip("bench_spreads_jobs_over_several_servers_in_turn") {
        return;
    }
    let (a, b) = (Tangod::start(), Tangod::start());
    // Two servers that share no store: the bench uploads to the first
    // only, so the second gets the same files by hand.
    b.tango()
        .args(["run", "examples/jobs/hello", "--courselab", "spread"])
        .assert()
        .success();
    let urls = format!("{},{}", a.url, b.url);
    let output = a
        .tango()
        .args(["--url", &urls, "--json", "bench", "hello"])
        .args(["--courselab", "spread", "-n", "6", "-c", "3"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let v = stdout_json(&output);
    assert_eq!(
        (v["servers"].as_u64(), v["ok"].as_u64()),
        (Some(2), Some(6)),
        "{v}"
    );
    // Job i went to server i mod 2, and its callback came back.
    let prefix = "tango-cli_hello_";
    let names =
        |list: &[u32]| -> Vec<String> { list.iter().map(|i| format!("{prefix}{i}")).collect() };
    assert_eq!(dead_job_names(&a, prefix), names(&[0, 2, 4]));
    // (B's job 0 is the `tango run` above.)
    assert_eq!(dead_job_names(&b, prefix), names(&[0, 1, 3, 5]));

    // --add-only: every addJob answered, none waited for; a repeated
    // --url counts like a comma-separated list.
    let output = a
        .tango()
        .args(["--url", &a.url, "--url", &b.url, "--json", "bench", "hello"])
        .args(["--courselab", "spread", "-n", "4", "-c", "2", "--add-only"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let v = stdout_json(&output);
    assert_eq!(
        (v["servers"].as_u64(), v["added"].as_u64()),
        (Some(2), Some(4)),
        "{v}"
    );
    assert_eq!(v["failures"], 0, "{v}");
    assert!(v["addjob_per_sec"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["addjob_ms"]["p95_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert!(
        v.get("p50_ms").is_none(),
        "no job latency without results: {v}"
    );
}
