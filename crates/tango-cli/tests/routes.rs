//! One subcommand per v1 route, against a real tangod (sandbox backend).

mod common;

use common::*;
use predicates::prelude::*;
use std::time::{Duration, Instant};

#[test]
fn open_upload_add_job_poll_jobs_info() {
    if !root_or_skip("open_upload_add_job_poll_jobs_info") {
        return;
    }
    let server = Tangod::start();
    let makefile = example("hello").join("autograde-Makefile");

    // open: created, then found; --json is the server's answer.
    server
        .tango()
        .args(["open", "lab"])
        .assert()
        .success()
        .stdout(predicate::str::contains("Created directory: lab"));
    let v = stdout_json(
        &server
            .tango()
            .args(["--json", "open", "lab"])
            .output()
            .unwrap(),
    );
    assert_eq!(v["statusMsg"], "Found directory", "{v}");

    // upload: under its own name and under --name; open shows real md5s.
    server
        .tango()
        .args(["upload", "lab"])
        .arg(&makefile)
        .assert()
        .success()
        .stdout(predicate::str::contains("autograde-Makefile"));
    let output = server
        .tango()
        .args(["--json", "upload", "lab"])
        .arg(&makefile)
        .args(["--name", "copy-of-makefile"])
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(stdout_json(&output)["statusId"], 0);
    let v = stdout_json(
        &server
            .tango()
            .args(["--json", "open", "lab"])
            .output()
            .unwrap(),
    );
    let md5 = md5_hex(&makefile);
    assert_eq!(v["files"]["autograde-Makefile"], md5.as_str(), "{v}");
    assert_eq!(v["files"]["copy-of-makefile"], md5.as_str(), "{v}");
    server
        .tango()
        .args(["open", "lab"])
        .assert()
        .success()
        .stdout(predicate::str::contains(md5.as_str()));

    // add-job from flags, then poll for its output.
    let output = server
        .tango()
        .args(["--json", "add-job", "lab", "--image", &test_image()])
        .args([
            "--file",
            "autograde-Makefile:Makefile",
            "--output-file",
            "hello.out",
        ])
        .args(["--timeout", "20", "--name", "cli-route-test"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let added = stdout_json(&output);
    assert_eq!(added["statusMsg"], "Job added", "{added}");
    let job_id: u64 = added["jobId"].as_str().unwrap().parse().unwrap();
    server
        .tango()
        .args(["poll", "lab", "hello.out", "--wait", "60"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("Received job cli-route-test:")
                .and(predicate::str::contains("Hello, tango!"))
                .and(predicate::str::ends_with(
                    "{\"scores\": {\"hello\": 100}}\n",
                )),
        );
    let v = stdout_json(
        &server
            .tango()
            .args(["--json", "poll", "lab", "hello.out"])
            .output()
            .unwrap(),
    );
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["exitStatus"], 0, "{v}");
    assert_eq!(v["score"]["scores"]["hello"], 100, "{v}");
    let out_file = tempfile::NamedTempFile::new().unwrap();
    server
        .tango()
        .args(["poll", "lab", "hello.out", "-o"])
        .arg(out_file.path())
        .assert()
        .success()
        .stdout("");
    assert!(std::fs::read_to_string(out_file.path())
        .unwrap()
        .contains("Hello, tango!"));

    // jobs --dead lists it as done, as a table and as JSON.
    let v = stdout_json(
        &server
            .tango()
            .args(["--json", "jobs", "--dead"])
            .output()
            .unwrap(),
    );
    let job = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == job_id)
        .unwrap_or_else(|| panic!("job {job_id} not among dead jobs: {v}"));
    assert_eq!(job["name"], "cli-route-test");
    server
        .tango()
        .args(["jobs", "--dead"])
        .assert()
        .success()
        .stdout(predicate::str::contains("cli-route-test").and(predicate::str::contains("done")));

    // info counts the request.
    let v = stdout_json(&server.tango().args(["--json", "info"]).output().unwrap());
    assert!(v["info"]["job_requests"].as_u64().unwrap() >= 1, "{v}");
    server
        .tango()
        .arg("info")
        .assert()
        .success()
        .stdout(predicate::str::contains("job_requests"));

    // Refusals exit 1 and say what the server said.
    server
        .tango()
        .args(["poll", "lab", "never-written.out"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "never-written.out not found in lab",
        ));
    // With --json, one document: the error, with the server's answer.
    let output = server
        .tango()
        .args(["--json", "poll", "lab", "never-written.out"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let v = stdout_json(&output);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("never-written.out not found in lab"),
        "{v}"
    );
    assert_eq!(v["answer"]["statusId"], -1, "{v}");
    assert_eq!(v["answer"]["statusMsg"], "Output file not found", "{v}");
    // A URL with a path tangod does not serve: tangod's answer echoes the
    // route, key included; tango hides the key, in text and in JSON.
    for json in [false, true] {
        let mut cmd = server.tango();
        cmd.args(["--url", &format!("{}/tango", server.url)]);
        if json {
            cmd.arg("--json");
        }
        let output = cmd.arg("info").output().unwrap();
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !stdout.contains(KEY) && !stderr.contains(KEY),
            "the key leaked:\n{stdout}\n{stderr}"
        );
        assert!(stderr.contains("/tango/info/<key>/"), "{stderr}");
        if json {
            let v = stdout_json(&output);
            let message = v["answer"]["statusMsg"].as_str().unwrap();
            assert!(message.contains("/tango/info/<key>/"), "{v}");
        }
    }
    server
        .tango()
        .args(["--key", "wrong-key", "info"])
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("Key not recognized")
                .and(predicate::str::contains("TANGO_KEY")),
        );
    let output = server
        .tango()
        .args(["--key", "wrong-key", "--json", "jobs"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stdout_json(&output)["answer"]["statusId"], -1);
}

#[test]
fn add_job_from_json_live_jobs_and_partial_output() {
    if !root_or_skip("add_job_from_json_live_jobs_and_partial_output") {
        return;
    }
    let server = Tangod::start();
    server.tango().args(["open", "endless"]).assert().success();
    server
        .tango()
        .args(["upload", "endless"])
        .arg(example("endless").join("autograde-Makefile"))
        .assert()
        .success();
    let body = serde_json::json!({
        "image": test_image(),
        "files": [{"localFile": "autograde-Makefile", "destFile": "Makefile"}],
        "jobName": "cli-endless",
        "output_file": "endless.out",
        "timeout": 4,
    });
    let body_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(body_file.path(), body.to_string()).unwrap();
    let output = server
        .tango()
        .args(["add-job", "endless", "--job-json"])
        .arg(body_file.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(stdout.starts_with("Job added: job "), "{stdout}");
    let job_id = stdout
        .trim_start_matches("Job added: job ")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();

    // While it loops, it is a live job and its partial output grows. There
    // is no event to wait for: ask again until it shows, for at most 10 s.
    let started = Instant::now();
    loop {
        let output = server
            .tango()
            .args(["partial-output", &job_id])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&output.stdout).contains("looping forever") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no partial output: {output:?}\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let v = stdout_json(
        &server
            .tango()
            .args(["--json", "partial-output", &job_id])
            .output()
            .unwrap(),
    );
    assert_eq!(v["statusId"], 0, "{v}");
    let v = stdout_json(&server.tango().args(["--json", "jobs"]).output().unwrap());
    assert!(
        v["jobs"].as_array().unwrap().iter().any(|j| j["id"]
            .as_u64()
            .map(|id| id.to_string())
            .as_deref()
            == Some(job_id.as_str())),
        "{v}"
    );
    server
        .tango()
        .arg("jobs")
        .assert()
        .success()
        .stdout(predicate::str::contains("cli-endless").and(predicate::str::contains("running")));

    // It ends at its timeout; the output says so, and poll exits 3 (the
    // job ran but failed), as run does.
    server
        .tango()
        .args(["poll", "endless", "endless.out", "--wait", "60"])
        .assert()
        .code(3)
        .stdout(predicate::str::contains(
            "Error: Job timed out after 4 seconds",
        ))
        .stderr(predicate::str::contains(
            "the job that wrote endless.out failed: Error: Job timed out",
        ));
    let output = server
        .tango()
        .args(["--json", "poll", "endless", "endless.out"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    let v = stdout_json(&output);
    assert_eq!(v["ok"], false, "{v}");
}

#[test]
fn pools_prealloc_and_build() {
    if !root_or_skip("pools_prealloc_and_build") {
        return;
    }
    let server = Tangod::start();
    let image = test_image();
    server
        .tango()
        .args(["prealloc", &image, "2"])
        .assert()
        .success()
        .stdout("VMs preallocated\n");
    let v = stdout_json(
        &server
            .tango()
            .args(["--json", "pool", &image])
            .output()
            .unwrap(),
    );
    assert_eq!(v["statusMsg"], "Found pool", "{v}");
    assert_eq!(
        v["pools"][&image]["total"].as_array().unwrap().len(),
        2,
        "{v}"
    );
    server
        .tango()
        .arg("pool")
        .assert()
        .success()
        .stdout(predicate::str::contains(image.as_str()));
    let v = stdout_json(&server.tango().args(["--json", "pool"]).output().unwrap());
    assert_eq!(v["statusMsg"], "Found all pools", "{v}");
    server
        .tango()
        .args(["prealloc", &image, "0", "--cores", "1", "--memory", "256"])
        .assert()
        .success();
    server
        .tango()
        .args(["prealloc", "bad/image", "1"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("tangod refused /prealloc/"));

    // The sandbox backend builds no images: the refusal comes through with
    // tangod's explanation. (A Docker build is tested in build_with_docker.)
    let tar = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tar.path(), b"not a tar").unwrap();
    server
        .tango()
        .args(["build", "cli-test-image"])
        .arg(tar.path())
        .assert()
        .code(1)
        .stderr(predicate::str::contains("Image build failed"));
    server
        .tango()
        .args(["build", "bad name"])
        .arg(tar.path())
        .assert()
        .code(1)
        .stderr(predicate::str::contains("Invalid image name"));
}

/// Loads a real `docker save` tar through `tango build` into a tangod
/// whose default backend is docker. Needs dockerd and an image to save
/// (TANGO_CLI_BUILD_SOURCE, default tango-test-busybox).
#[test]
fn build_with_docker() {
    let source =
        std::env::var("TANGO_CLI_BUILD_SOURCE").unwrap_or_else(|_| "tango-test-busybox".into());
    let docker_ok = std::process::Command::new("docker")
        .args(["image", "inspect", &source])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !docker_ok {
        eprintln!("SKIPPED build_with_docker: no dockerd or no image {source} to save");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("image.tar");
    let saved = std::process::Command::new("docker")
        .args(["save", "-o"])
        .arg(&tar)
        .arg(&source)
        .status()
        .unwrap();
    assert!(saved.success());
    let server = Tangod::start_with("docker");
    let name = format!("tango-cli-build-test-{}", std::process::id());
    server
        .tango()
        .args(["build", &name])
        .arg(&tar)
        .assert()
        .success()
        .stdout("Docker image built\n");
    let tagged = std::process::Command::new("docker")
        .args(["image", "inspect", &format!("{name}:latest")])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    let _ = std::process::Command::new("docker")
        .args(["image", "rm", &format!("{name}:latest")])
        .stdout(std::process::Stdio::null())
        .status();
    assert!(tagged.success(), "{name}:latest was not tagged");
}

#[test]
fn health_asks_info_with_a_key_and_the_root_without_one() {
    if !root_or_skip("health_asks_info_with_a_key_and_the_root_without_one") {
        return;
    }
    let server = Tangod::start();
    server
        .tango()
        .env_remove("RESTFUL_KEY")
        .arg("health")
        .assert()
        .success()
        .stdout(predicate::str::contains("answers /info"));
    // Inside tangod's container the key is only in tangod's variable.
    let output = tango()
        .env("TANGO_URL", &server.url)
        .env("RESTFUL_KEY", KEY)
        .args(["--json", "health"])
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(stdout_json(&output)["route"], "/info");
    tango()
        .env("TANGO_URL", &server.url)
        .env("RESTFUL_KEY", "not-the-key")
        .arg("health")
        .assert()
        .code(1)
        .stderr(predicate::str::contains("Key not recognized"));
    tango()
        .env("TANGO_URL", &server.url)
        .env_remove("RESTFUL_KEY")
        .arg("health")
        .assert()
        .success()
        .stdout(predicate::str::contains("answers /\n"));
}
