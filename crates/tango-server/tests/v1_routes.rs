//! Every v1 route of the contract over HTTP against a real tangod (sandbox
//! backend): status strings, JSON shapes, transport rules, and a full
//! upload -> addJob -> callback -> poll round trip.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const HELLO_MAKEFILE: &[u8] =
    b"all:\n\t@echo 'Hello, tango!'\n\t@echo '{\"scores\": {\"hello\": 100}}'\n";

fn md5_hex(bytes: &[u8]) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..32].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_and_status_string() {
    if !root_or_skip("every_route_and_status_string") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Tangod::start(&dir.path().join("data"), "");
    let c = server.client();

    // Liveness.
    let text = reqwest::get(format!("{}/", c.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("Tango"), "{text}");

    // Unknown key on every route.
    for path in [
        "/open/nokey/lab/",
        "/poll/nokey/lab/out/",
        "/getPartialOutput/nokey/1/",
        "/info/nokey/",
        "/jobs/nokey/0/",
        "/pool/nokey/",
        "/pool/nokey/host/",
        "/prealloc/nokey/host/1/",
    ] {
        let v = c.get(path).await;
        assert_eq!(v["statusId"], -1, "{path}");
        assert_eq!(v["statusMsg"], "Key not recognized", "{path}");
    }
    for path in [
        "/upload/nokey/lab/",
        "/addJob/nokey/lab/",
        "/build/nokey/",
        "/prealloc/nokey/host/1/",
    ] {
        let v = c
            .post(path, "x", &[("Filename", "f"), ("imageName", "i")])
            .await;
        assert_eq!(v["statusMsg"], "Key not recognized", "{path}");
    }

    // open: created, then found with real md5s; trailing slash optional.
    let v = c.open("lab").await;
    assert_eq!(
        (v["statusId"].clone(), v["statusMsg"].clone()),
        (json!(0), json!("Created directory"))
    );
    assert_eq!(v["files"], json!({}));
    let v = c.get(&format!("/open/{KEY}/lab")).await;
    assert_eq!(v["statusMsg"], "Found directory");

    // upload: raw body whatever the Content-Type; same bytes -> File exists.
    let v = c.upload("lab", "Makefile", HELLO_MAKEFILE).await;
    assert_eq!(
        (v["statusId"].clone(), v["statusMsg"].clone()),
        (json!(0), json!("Uploaded file"))
    );
    let v = c.upload("lab", "Makefile", HELLO_MAKEFILE).await;
    assert_eq!(v["statusMsg"], "File exists");
    let form_like = b"a=1&b=2&c";
    let v = c
        .post(
            &format!("/upload/{KEY}/lab"),
            form_like.to_vec(),
            &[("Filename", "data.txt")],
        )
        .await;
    assert_eq!(v["statusMsg"], "Uploaded file");
    let v = c.open("lab").await;
    assert_eq!(v["files"]["Makefile"], md5_hex(HELLO_MAKEFILE));
    assert_eq!(v["files"]["data.txt"], md5_hex(form_like));
    let stored = std::fs::read(
        server
            .data_dir
            .join(format!("courselabs/{KEY}-lab/data.txt")),
    )
    .unwrap();
    assert_eq!(stored, form_like);
    let v = c.upload("nolab", "Makefile", b"x").await;
    assert_eq!(v["statusMsg"], "Courselab not found");

    // info.
    let v = c.get(&format!("/info/{KEY}/")).await;
    assert_eq!(v["statusMsg"], "Found info successfully");
    for field in [
        "elapsed_secs",
        "job_requests",
        "job_retries",
        "waitvm_timeouts",
        "runjob_timeouts",
        "copyin_errors",
        "runjob_errors",
        "copyout_errors",
        "num_threads",
    ] {
        assert!(v["info"][field].is_u64(), "info.{field}: {v}");
    }

    // poll before the output exists.
    assert!(c.poll("lab", "out.txt").await.is_none());

    // addJob + round trip with callback.
    let receiver = Receiver::start().await;
    let body = job(
        "course_lab_1_a@b.c",
        "out.txt",
        Some(&receiver.url_for("one")),
        20,
    );
    let v = c.add_job("lab", &body).await;
    assert_eq!(
        (v["statusId"].clone(), v["statusMsg"].clone()),
        (json!(0), json!("Job added"))
    );
    let id = v["jobId"].as_str().expect("jobId is a string");
    assert!(id.chars().all(|ch| ch.is_ascii_digit()) && !id.is_empty());

    receiver.wait_for(1, Duration::from_secs(30)).await;
    let cb = receiver.get("one").remove(0);
    assert_eq!(cb.filename_header, "out.txt");
    assert_eq!(cb.part_name, "file");
    assert_eq!(cb.part_filename, "file");
    let polled = c.poll("lab", "out.txt").await.expect("output");
    assert_eq!(polled, cb.body);
    let text = String::from_utf8(polled).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("Autograder ["), "{text}");
    assert!(
        lines[0].ends_with(&format!("]: Received job course_lab_1_a@b.c:{id}")),
        "{text}"
    );
    assert!(
        lines[1].ends_with("]: Success: Autodriver returned normally"),
        "{text}"
    );
    assert!(
        lines[2].ends_with("]: Here is the output from the autograder:"),
        "{text}"
    );
    assert_eq!(lines[3], "---");
    assert_eq!(lines[4], "Autodriver: Job exited with status 0", "{text}");
    assert!(text.contains("Hello, tango!"));
    assert_eq!(
        *lines.last().unwrap(),
        "{\"scores\": {\"hello\": 100}}",
        "{text}"
    );
    // poll with a URL-encoded name.
    c.upload("lab", "Makefile", HELLO_MAKEFILE).await;
    let v = c.add_job("lab", &job("enc", "out put.txt", None, 20)).await;
    assert_eq!(v["statusMsg"], "Job added");
    c.wait_output("lab", "out%20put.txt", Duration::from_secs(30))
        .await;

    // jobs: dead list has the job in Tango's shape.
    let v = c.get(&format!("/jobs/{KEY}/1/")).await;
    assert_eq!(v["statusMsg"], "Found list of jobs");
    let jobs = v["jobs"].as_array().unwrap();
    let rec = jobs
        .iter()
        .find(|j| j["id"].as_u64().map(|n| n.to_string()).as_deref() == Some(id))
        .expect("job listed");
    for field in [
        "id",
        "name",
        "assigned",
        "retries",
        "timeout",
        "maxOutputFileSize",
        "outputFile",
        "notifyURL",
        "input",
        "vm",
        "trace",
    ] {
        assert!(rec.get(field).is_some(), "job field {field}: {rec}");
    }
    assert!(rec["id"].is_u64());
    assert_eq!(rec["notifyURL"], receiver.url_for("one"));
    assert_eq!(
        rec["outputFile"],
        format!("courselabs/{KEY}-lab/output/out.txt")
    );
    assert_eq!(
        rec["input"][0]["localFile"],
        format!("courselabs/{KEY}-lab/Makefile")
    );
    assert_eq!(rec["input"][0]["destFile"], "Makefile");
    for field in [
        "name", "id", "image", "vmms", "cores", "memory", "disk", "network", "resume",
    ] {
        assert!(rec["vm"].get(field).is_some(), "vm field {field}");
    }
    let trace = rec["trace"].as_array().unwrap();
    let last = trace.last().unwrap().as_str().unwrap();
    let (when, msg) = last.split_once('|').unwrap();
    assert_eq!(when.split_whitespace().count(), 5, "{when}");
    assert!(msg.contains("Autodriver returned normally"), "{msg}");
    // Beside Tango's fields: the job's state and its 8 phase timestamps,
    // all set and in order once the callback was delivered.
    let rec = record_once_delivered(&c, id).await;
    assert_eq!(rec["state"], "done", "{rec}");
    assert_eq!(rec["assigned"], false, "{rec}");
    assert_eq!(rec["retries"], 0, "{rec}");
    assert_eq!(rec["timeout"], 20, "{rec}");
    assert_eq!(rec["maxOutputFileSize"], 256 * 1024, "{rec}");
    assert_eq!(rec["name"], "course_lab_1_a@b.c", "{rec}");
    let times = phase_times(&rec, &PHASES);
    assert!(
        times[0] <= now_ms() && now_ms() - times[0] < 5 * 60 * 1000,
        "added {} is not a recent unix time in ms",
        times[0]
    );
    // A job without a callback has every phase but the last.
    let v = c.get(&format!("/jobs/{KEY}/1/")).await;
    let enc = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == "enc")
        .expect("job enc listed")
        .clone();
    phase_times(&enc, &PHASES[..7]);
    assert!(enc["phases"]["callback_delivered"].is_null(), "{enc}");
    let v = c.get(&format!("/jobs/{KEY}/0")).await;
    assert_eq!(v["statusMsg"], "Found list of jobs");
    assert!(v["jobs"].is_array());

    // Rejected jobs answer -1 and are listed dead with the reason.
    let mut bad = job("bad", "x", None, 10);
    bad["image"] = json!("no-such-image");
    let v = c.add_job("lab", &bad).await;
    assert_eq!(
        (v["statusId"].clone(), v["statusMsg"].clone()),
        (json!(-1), json!("Invalid image name"))
    );
    let v = c.get(&format!("/jobs/{KEY}/1/")).await;
    let last = v["jobs"].as_array().unwrap().last().unwrap().clone();
    assert!(last["trace"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_str()
        .unwrap()
        .contains("Error"));
    let v = c.add_job("nolab", &job("x", "x", None, 10)).await;
    assert_eq!(v["statusMsg"], "Courselab not found");

    // pools and prealloc.
    let v = c.get(&format!("/pool/{KEY}/nosuch/")).await;
    assert_eq!(v["statusMsg"], "Pool not found");
    let v = c.get(&format!("/prealloc/{KEY}/host/x/")).await;
    assert_eq!(v["statusMsg"], "Invalid prealloc size");
    let v = c.get(&format!("/prealloc/{KEY}/host/-1/")).await;
    assert_eq!(v["statusMsg"], "Invalid prealloc size");
    let v = c.get(&format!("/prealloc/{KEY}/nosuch/1/")).await;
    assert_eq!(v["statusMsg"], "Invalid image name");
    let v = c
        .post(
            &format!("/prealloc/{KEY}/host/2"),
            r#"{"cores": 1, "memory": 512}"#,
            &[],
        )
        .await;
    assert_eq!(
        (v["statusId"].clone(), v["statusMsg"].clone()),
        (json!(0), json!("VMs preallocated"))
    );
    c.wait_pool("host", 2).await;
    let v = c.get(&format!("/pool/{KEY}")).await;
    assert_eq!(v["statusMsg"], "Found all pools");
    assert!(v["pools"]["host"]["total"].as_array().unwrap().len() >= 2);
    // A backend this server does not run cannot make VMs.
    let v = c
        .post(
            &format!("/prealloc/{KEY}/host/1/"),
            r#"{"vmms": "docker"}"#,
            &[],
        )
        .await;
    assert_eq!(
        (v["statusId"].clone(), v["statusMsg"].clone()),
        (json!(-1), json!("Preallocate VM failed")),
        "{v}"
    );
    assert!(v["detail"].as_str().unwrap().contains("docker"), "{v}");
    let v = c.get(&format!("/pool/{KEY}/host/")).await;
    assert!(v["pools"]["host"]["total"].as_array().unwrap().len() >= 2);

    // getPartialOutput of an unknown job.
    let v = c.get(&format!("/getPartialOutput/{KEY}/999999/")).await;
    assert_eq!(v["statusId"], -1);

    // build is answered (the sandbox backend cannot load docker images).
    let v = c
        .post(
            &format!("/build/{KEY}/"),
            b"not a tar".to_vec(),
            &[("imageName", "img")],
        )
        .await;
    assert_eq!(
        (v["statusId"].clone(), v["statusMsg"].clone()),
        (json!(-1), json!("Image build failed"))
    );
    let v = c
        .post(
            &format!("/build/{KEY}/"),
            b"x".to_vec(),
            &[("imageName", "../x")],
        )
        .await;
    assert_eq!(v["statusMsg"], "Invalid image name");

    let v: Value = c.get(&format!("/info/{KEY}")).await;
    assert!(v["info"]["job_requests"].as_u64().unwrap() >= 2);
}

/// The phases of `/jobs` records, in the order a job goes through them.
const PHASES: [&str; 8] = [
    "added",
    "assigned",
    "vm_ready",
    "copied_in",
    "ran",
    "copied_out",
    "finished",
    "callback_delivered",
];

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The timestamps of `phases` in a job record, asserting that the record
/// has exactly the 8 phases and that these are set and non-decreasing.
fn phase_times(rec: &Value, phases: &[&str]) -> Vec<i64> {
    let all = rec["phases"].as_object().expect("phases object");
    let mut names: Vec<&str> = all.keys().map(String::as_str).collect();
    names.sort_unstable();
    let mut expected = PHASES.to_vec();
    expected.sort_unstable();
    assert_eq!(names, expected, "{rec}");
    let times: Vec<i64> = phases
        .iter()
        .map(|p| {
            all[*p]
                .as_i64()
                .unwrap_or_else(|| panic!("phase {p} not set: {rec}"))
        })
        .collect();
    for (pair, t) in phases.windows(2).zip(times.windows(2)) {
        assert!(t[0] <= t[1], "{} after {}: {rec}", pair[0], pair[1]);
    }
    times
}

/// The finished job's `/jobs` record once its callback delivery is stored
/// (the receiver sees the callback a moment before tangod records it).
async fn record_once_delivered(c: &Client, id: &str) -> Value {
    let start = std::time::Instant::now();
    loop {
        let v = c.get(&format!("/jobs/{KEY}/1/")).await;
        let rec = v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"].as_u64().map(|n| n.to_string()).as_deref() == Some(id))
            .expect("job listed")
            .clone();
        if !rec["phases"]["callback_delivered"].is_null() {
            return rec;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "callback_delivered never set: {rec}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Removes a Docker image a test made, however the test ends.
struct RemoveImage(String);

impl Drop for RemoveImage {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["image", "rm", "-f", &self.0])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn docker_image_id(image: &str) -> Option<String> {
    let out = std::process::Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", image])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `/build` on the docker backend: a `docker save` tar is loaded and tagged
/// `<imageName>:latest`, and jobs and pools may then name it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_loads_a_docker_image() {
    const TEST: &str = "build_loads_a_docker_image";
    const SOURCE: &str = "tango-test-busybox";
    if !docker_or_skip(TEST) {
        return;
    }
    let Some(source_id) = docker_image_id(SOURCE) else {
        eprintln!("SKIPPED {TEST}: no image {SOURCE} (run scripts/build-docker-test-image.sh)");
        return;
    };
    let tar = std::process::Command::new("docker")
        .args(["save", SOURCE])
        .output()
        .unwrap();
    assert!(
        tar.status.success(),
        "docker save: {}",
        String::from_utf8_lossy(&tar.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let server = Tangod::start(&dir.path().join("data"), "vmms = \"docker\"\n");
    let c = server.client();
    let name = format!("{}-built", server.prefix);
    let _cleanup = RemoveImage(format!("{name}:latest"));
    assert_eq!(docker_image_id(&name), None, "{name} exists already");

    let v = c.get(&format!("/prealloc/{KEY}/{name}/0/")).await;
    assert_eq!(
        v["statusMsg"], "Invalid image name",
        "before the build: {v}"
    );
    let v = c
        .post(
            &format!("/build/{KEY}/"),
            tar.stdout,
            &[("imageName", &name)],
        )
        .await;
    assert_eq!(
        (v["statusId"].clone(), v["statusMsg"].clone()),
        (json!(0), json!("Docker image built")),
        "{v}"
    );
    assert_eq!(
        docker_image_id(&format!("{name}:latest")),
        Some(source_id),
        "{name}:latest is not the image that was sent"
    );
    let v = c.get(&format!("/prealloc/{KEY}/{name}/0/")).await;
    assert_eq!(v["statusMsg"], "VMs preallocated", "after the build: {v}");

    // Not a docker save tar: the contract's failure string.
    let v = c
        .post(
            &format!("/build/{KEY}/"),
            b"not a tar".to_vec(),
            &[("imageName", &name)],
        )
        .await;
    assert_eq!(
        (v["statusId"].clone(), v["statusMsg"].clone()),
        (json!(-1), json!("Image build failed")),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_output_of_a_running_job() {
    if !root_or_skip("partial_output_of_a_running_job") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Tangod::start(&dir.path().join("data"), "");
    let c = server.client();
    c.open("lab").await;
    c.upload(
        "lab",
        "Makefile",
        b"all:\n\t@echo started-output\n\t@sleep 3\n\t@echo done\n",
    )
    .await;
    let v = c.add_job("lab", &job("p", "p.out", None, 20)).await;
    let id = v["jobId"].as_str().unwrap().to_string();
    let mut seen = String::new();
    for _ in 0..100 {
        let v = c.get(&format!("/getPartialOutput/{KEY}/{id}/")).await;
        if v["statusId"] == 0 {
            assert_eq!(v["statusMsg"], "Partial output obtained");
            seen = v["output"].as_str().unwrap().to_string();
            if seen.contains("started-output") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen.contains("started-output"), "partial output: {seen:?}");
    let out = c.wait_output("lab", "p.out", Duration::from_secs(30)).await;
    assert!(String::from_utf8_lossy(&out).contains("done"));
}

/// `tangod --help` documents every option of the command line, with the
/// defaults and environment variables the issue names.
#[test]
fn help_documents_every_option() {
    use clap::CommandFactory;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tangod"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    let mut cli = tango_server::config::Cli::command();
    cli.build();
    let mut options = 0;
    for arg in cli.get_arguments() {
        let Some(long) = arg.get_long() else {
            continue;
        };
        options += 1;
        let line = help
            .lines()
            .find(|l| l.contains(&format!("--{long}")))
            .unwrap_or_else(|| panic!("--{long} is not in --help:\n{help}"));
        assert!(
            arg.get_help()
                .is_some_and(|h| !h.to_string().trim().is_empty()),
            "--{long} has no description: {line}"
        );
    }
    assert!(options >= 10, "{options} options");
    for must in [
        "--listen",
        "127.0.0.1:3000",
        "--data-dir",
        "./tango-data",
        "--vmms",
        "sandbox",
        "--key",
        "RESTFUL_KEY",
        "--config",
        "TOML",
        "--print-config",
    ] {
        assert!(help.contains(must), "{must:?} is not in --help:\n{help}");
    }
}

/// The key may come from RESTFUL_KEY alone, as with Tango.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restful_key_is_read() {
    let printed = std::process::Command::new(env!("CARGO_BIN_EXE_tangod"))
        .arg("--print-config")
        .env("RESTFUL_KEY", "envkey")
        .output()
        .unwrap();
    assert!(printed.status.success(), "{printed:?}");
    let config: toml::Value = toml::from_str(&String::from_utf8_lossy(&printed.stdout)).unwrap();
    assert_eq!(config["keys"], toml::Value::Array(vec!["envkey".into()]));
    let printed = std::process::Command::new(env!("CARGO_BIN_EXE_tangod"))
        .arg("--print-config")
        .env_remove("RESTFUL_KEY")
        .output()
        .unwrap();
    let config: toml::Value = toml::from_str(&String::from_utf8_lossy(&printed.stdout)).unwrap();
    assert_eq!(config["keys"], toml::Value::Array(vec![]));
    // Beside --key, not instead of it.
    let printed = std::process::Command::new(env!("CARGO_BIN_EXE_tangod"))
        .args(["--print-config", "--key", "cli,key"])
        .env("RESTFUL_KEY", "envkey")
        .output()
        .unwrap();
    assert!(printed.status.success(), "{printed:?}");
    let config: toml::Value = toml::from_str(&String::from_utf8_lossy(&printed.stdout)).unwrap();
    assert_eq!(
        config["keys"],
        toml::Value::Array(vec!["cli,key".into(), "envkey".into()])
    );

    // And a server started that way answers that key, and only it.
    if !root_or_skip("restful_key_is_read (serving)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tangod.toml");
    std::fs::write(
        &config,
        format!("[engine]\nprefix = \"t{}envkey\"\n", std::process::id()),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tangod"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .arg("--autodriver")
        .arg(autodriver())
        .env("RESTFUL_KEY", "envkey")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Stop<'a>(&'a mut std::process::Child);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
    let stop = Stop(&mut child);
    let c = Client {
        http: reqwest::Client::new(),
        url: format!("http://127.0.0.1:{port}"),
    };
    let start = std::time::Instant::now();
    while reqwest::get(format!("{}/", c.url)).await.is_err() {
        if let Some(status) = stop.0.try_wait().unwrap() {
            panic!("tangod exited with {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "tangod did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v = c.get("/info/envkey/").await;
    assert_eq!(v["statusMsg"], "Found info successfully", "{v}");
    let v = c.get(&format!("/info/{KEY}/")).await;
    assert_eq!(v["statusMsg"], "Key not recognized", "{v}");
}
