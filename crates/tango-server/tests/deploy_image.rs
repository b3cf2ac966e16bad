//! The tango-rs container image (scripts/build-image.sh) on this host's
//! dockerd: tangod in a container, driving job containers through the
//! mounted Docker socket, its state on a volume that outlives a restart;
//! and the compose file that puts it in place of Tango's service.

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The image's size target (issue 18).
const MAX_IMAGE_BYTES: u64 = 30 * 1000 * 1000;
const IMAGE: &str = "tango-rs:test";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn docker(args: &[&str]) -> String {
    stdout(&run_ok(Command::new("docker").args(args), "docker"))
}

/// The test's container, volume and job containers, removed however the
/// test ends.
struct Deployment {
    container: String,
    volume: String,
    prefix: String,
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("docker")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        quiet(&["rm", "-f", "-v", &self.container]);
        let label = format!("label=tango.prefix={}", self.prefix);
        if let Ok(out) = Command::new("docker")
            .args(["ps", "-aq", "--filter", &label])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                quiet(&["rm", "-f", id]);
            }
        }
        quiet(&["volume", "rm", "-f", &self.volume]);
    }
}

impl Deployment {
    /// Starts tangod's container as the README says: the Docker socket
    /// and its group, the data volume, the key in RESTFUL_KEY.
    fn run_container(&self) {
        let socket_group = std::fs::metadata("/var/run/docker.sock")
            .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
            .expect("the Docker socket");
        docker(&[
            "run",
            "-d",
            "--name",
            &self.container,
            "--group-add",
            &socket_group.to_string(),
            "-v",
            "/var/run/docker.sock:/var/run/docker.sock",
            "-v",
            &format!("{}:/var/lib/tango-rs", self.volume),
            "-e",
            &format!("RESTFUL_KEY={KEY}"),
            "-e",
            &format!("DOCKER_DEPLOYMENT={}", self.prefix),
            "-p",
            "127.0.0.1::3000",
            IMAGE,
        ]);
    }

    /// Waits until the container's tangod has logged its `serving` line
    /// for the `starts`-th time, following its log as Docker writes it.
    fn wait_serving(&self, starts: usize) {
        let mut logs = Command::new("docker")
            .args(["logs", "-f", &self.container])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker logs");
        let stderr = logs.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut seen = 0;
            let mut text = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                text.push_str(&line);
                text.push('\n');
                if line.contains("tangod serving") {
                    seen += 1;
                    if seen == starts {
                        let _ = tx.send(Ok(()));
                        return;
                    }
                }
            }
            let _ = tx.send(Err(text));
        });
        let outcome = rx.recv_timeout(Duration::from_secs(60));
        let _ = logs.kill();
        let _ = logs.wait();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(log)) => panic!(
                "tangod in {} stopped before serving:\n{log}",
                self.container
            ),
            Err(_) => panic!(
                "tangod in {} did not serve within 60 s:\n{}",
                self.container,
                self.log()
            ),
        }
    }

    fn log(&self) -> String {
        Command::new("docker")
            .args(["logs", &self.container])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default()
    }

    /// The host address Docker published the container's port 3000 on
    /// (a new one at every start).
    fn url(&self) -> String {
        let published = docker(&["port", &self.container, "3000/tcp"]);
        let addr = published.lines().next().expect("a published port");
        format!("http://{addr}")
    }
}

/// The host's static `tango` client, built by scripts/build-image.sh.
fn tango_client() -> PathBuf {
    let path = target_dir_of_tests().join("x86_64-unknown-linux-musl/release/tango");
    assert!(path.is_file(), "{} missing", path.display());
    path
}

fn tango(url: &str, args: &[&str]) -> Output {
    run_ok(
        Command::new(tango_client())
            .args(["--url", url, "--key", KEY, "--http-timeout", "30"])
            .args(args),
        "tango",
    )
}

#[test]
fn the_image_runs_jobs_through_the_docker_socket_and_keeps_them_across_a_restart() {
    let test = "the_image_runs_jobs_through_the_docker_socket_and_keeps_them_across_a_restart";
    if !docker_or_skip(test) {
        return;
    }
    let started = Instant::now();
    let built = run_ok(
        Command::new(repo_root().join("scripts/build-image.sh"))
            .env("TANGO_RS_IMAGE", IMAGE)
            .env("CARGO_TARGET_DIR", target_dir_of_tests())
            .stderr(Stdio::inherit()),
        "scripts/build-image.sh",
    );
    eprintln!(
        "scripts/build-image.sh took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(stdout(&built), IMAGE, "the script prints the image's name");
    let size: u64 = docker(&["image", "inspect", "-f", "{{.Size}}", IMAGE])
        .parse()
        .expect("a size");
    eprintln!("{IMAGE}: {size} bytes");
    assert!(
        size < MAX_IMAGE_BYTES,
        "{IMAGE} is {size} bytes, over {MAX_IMAGE_BYTES}"
    );
    assert_eq!(
        docker(&["image", "inspect", "-f", "{{.Config.User}}", IMAGE]),
        "10001:10001",
        "tangod runs as a non-root user"
    );

    let id = std::process::id();
    let deployment = Deployment {
        container: format!("tango-rs-image-test-{id}"),
        volume: format!("tango-rs-image-test-{id}"),
        // Not the prefix of any other test's tangod on this dockerd.
        prefix: format!("imagetest{id}"),
    };
    deployment.run_container();
    deployment.wait_serving(1);
    let url = deployment.url();

    // The healthcheck's command, inside the scratch image, with only the
    // container's RESTFUL_KEY: it checks /info with the key.
    let health = docker(&[
        "exec",
        &deployment.container,
        "/usr/local/bin/tango",
        "--http-timeout",
        "5",
        "health",
    ]);
    assert!(health.contains("answers /info"), "{health}");

    let hello = repo_root().join("examples/jobs/hello");
    let ran = tango(
        &url,
        &[
            "--json",
            "run",
            "--poll",
            "--image",
            DOCKER_TEST_IMAGE,
            hello.to_str().expect("a UTF-8 path"),
        ],
    );
    let result: Value = serde_json::from_slice(&ran.stdout).expect("run --json prints JSON");
    assert_eq!(result["ok"], true, "{result}");
    assert!(
        result["output"]
            .as_str()
            .is_some_and(|o| o.contains("Hello, tango!")),
        "{result}"
    );
    let job_id = result["jobId"].as_u64().expect("a job id");
    let courselab = result["courselab"].as_str().expect("a courselab");
    let output_file = result["outputFile"].as_str().expect("an output file");
    // The job's containers were the host's, under the container's prefix.
    let job_containers = docker(&[
        "ps",
        "-a",
        "--format",
        "{{.Names}}",
        "--filter",
        &format!("label=tango.prefix={}", deployment.prefix),
    ]);
    assert!(
        job_containers.starts_with(&deployment.prefix),
        "job containers: {job_containers:?}"
    );

    docker(&["stop", &deployment.container]);
    docker(&["start", &deployment.container]);
    deployment.wait_serving(2);
    let url = deployment.url();

    assert_job_kept(&url, job_id, courselab, output_file);

    // A new container (a new image, say) on the same volume.
    docker(&["rm", "-f", &deployment.container]);
    deployment.run_container();
    deployment.wait_serving(1);
    assert_job_kept(&deployment.url(), job_id, courselab, output_file);
}

/// The finished job's record and output are there.
fn assert_job_kept(url: &str, job_id: u64, courselab: &str, output_file: &str) {
    let dead: Value = serde_json::from_slice(&tango(url, &["--json", "jobs", "--dead"]).stdout)
        .expect("jobs --json prints JSON");
    let jobs = dead["jobs"].as_array().expect("a job list");
    assert!(
        jobs.iter().any(|j| j["id"].as_u64() == Some(job_id)),
        "job {job_id} is not among the finished jobs: {dead}"
    );
    let polled = tango(url, &["poll", courselab, output_file]);
    assert!(
        stdout(&polled).contains("Hello, tango!"),
        "the job's output: {}",
        stdout(&polled)
    );
}

/// The tests' CARGO_TARGET_DIR, so the script reuses this build's cache.
fn target_dir_of_tests() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tangod"))
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

#[test]
fn the_compose_file_is_valid_and_asks_for_what_it_needs() {
    let compose = repo_root().join("deploy/compose/docker-compose.yml");
    let config = |envs: &[(&str, &str)]| {
        let mut command = Command::new("docker-compose");
        command
            .arg("-f")
            .arg(&compose)
            .arg("config")
            .env_remove("DOCKER_GID")
            .env_remove("RESTFUL_KEY")
            .envs(envs.iter().copied());
        command.output()
    };
    let output = match config(&[("DOCKER_GID", "105"), ("RESTFUL_KEY", "k")]) {
        Ok(output) => output,
        Err(e) => {
            eprintln!("SKIPPED the_compose_file_is_valid_and_asks_for_what_it_needs: no docker-compose ({e})");
            return;
        }
    };
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "container_name: tango",
        "published: 3000",
        "target: 3000",
        "/var/run/docker.sock:/var/run/docker.sock",
        ":/var/lib/tango-rs",
        "RESTFUL_KEY: k",
        "- '105'",
        "restart: unless-stopped",
        "max-size: 10m",
        "- health",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
    for missing in ["DOCKER_GID", "RESTFUL_KEY"] {
        let envs: Vec<_> = [("DOCKER_GID", "105"), ("RESTFUL_KEY", "k")]
            .into_iter()
            .filter(|(name, _)| *name != missing)
            .collect();
        let output = config(&envs).expect("docker-compose");
        assert!(!output.status.success(), "config without {missing} passed");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(&format!("set {missing}")),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
