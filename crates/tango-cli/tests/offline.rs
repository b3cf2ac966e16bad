//! What `tango` does without a server: where settings come from, and the
//! messages when something is missing or unreachable. No root needed.

mod common;

use common::*;
use predicates::prelude::*;

/// A URL nobody listens on.
fn dead_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}")
}

#[test]
fn unreachable_server_says_what_to_try() {
    let url = dead_url();
    tango()
        .args(["--url", &url, "--key", "k", "info"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(format!(
            "cannot reach tangod at {url}: connection refused — is tangod running? set --url or TANGO_URL"
        )));
}

#[test]
fn unreachable_server_with_json_prints_a_json_error() {
    let url = dead_url();
    let output = tango()
        .args(["--url", &url, "--key", "k", "--json", "jobs"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let v = stdout_json(&output);
    assert!(
        v["error"].as_str().unwrap().contains("cannot reach tangod"),
        "{v}"
    );
}

#[test]
fn missing_key_is_explained() {
    tango()
        .args(["--url", &dead_url(), "info"])
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("no key given").and(predicate::str::contains("TANGO_KEY")),
        );
}

#[test]
fn flag_beats_environment_beats_config_file() {
    let (flag, env, file) = (dead_url(), dead_url(), dead_url());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("url = \"{file}\"\nkey = \"k\"\n")).unwrap();
    let reached = |url: &str| predicate::str::contains(format!("cannot reach tangod at {url}:"));

    // The config file alone (given with --config).
    tango()
        .args(["--config", config.to_str().unwrap(), "info"])
        .assert()
        .code(1)
        .stderr(reached(&file));
    // The environment over the file.
    tango()
        .args(["--config", config.to_str().unwrap(), "info"])
        .env("TANGO_URL", &env)
        .assert()
        .code(1)
        .stderr(reached(&env));
    // The flag over both.
    tango()
        .args(["--config", config.to_str().unwrap(), "--url", &flag, "info"])
        .env("TANGO_URL", &env)
        .assert()
        .code(1)
        .stderr(reached(&flag));
}

#[test]
fn default_config_file_is_read_from_home() {
    let url = dead_url();
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join(".config/tango");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.toml"),
        format!("url = \"{url}\"\nkey = \"k\"\n"),
    )
    .unwrap();
    tango()
        .env("HOME", home.path())
        .arg("pool")
        .assert()
        .code(1)
        .stderr(predicate::str::contains(format!(
            "cannot reach tangod at {url}:"
        )));
}

#[test]
fn a_named_config_file_must_exist_and_be_valid() {
    tango()
        .args(["--config", "/nonexistent/tango.toml", "info"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "cannot read config file /nonexistent/tango.toml",
        ));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "adress = \"x\"\n").unwrap();
    tango()
        .args(["--config", config.to_str().unwrap(), "info"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("is not valid"));
}

#[test]
fn bad_job_directories_and_files_are_explained() {
    let url = dead_url();
    let empty = tempfile::tempdir().unwrap();
    tango()
        .args(["--url", &url, "--key", "k", "run"])
        .arg(empty.path())
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "has no autograde-Makefile or Makefile",
        ));
    tango()
        .args(["--url", &url, "--key", "k", "bench", "no_such_job"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("no job directory \"no_such_job\""));
    tango()
        .args([
            "--url", &url, "--key", "k", "add-job", "lab", "--image", "i",
        ])
        .args(["--file", "a.c", "--output-file", "o"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("destination Makefile"));
}

/// A stand-in for a server that echoes the request path back in its
/// answers (as tangod's "no such route: ..." does, and as many proxies'
/// error pages do). The first path segment picks the answer:
/// `/refuse/...` a v1 refusal (HTTP 200), `/missing/...` HTTP 404 with a
/// text body, `/html/...` HTTP 200 that is not JSON. The path is echoed
/// both as sent (percent-encoded) and decoded.
fn echoing_server() -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let mut reader = BufReader::new(stream);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            // Skip the headers.
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .to_string();
            let decoded = percent_decode(&path);
            let (status, content_type, body) = if path.starts_with("/refuse/") {
                (
                    "200 OK",
                    "application/json",
                    serde_json::json!({
                        "statusId": -1,
                        "statusMsg": format!("no such route: {path}"),
                        "detail": decoded,
                    })
                    .to_string(),
                )
            } else if path.starts_with("/missing/") {
                (
                    "404 Not Found",
                    "text/plain",
                    format!("Cannot GET {path} ({decoded})"),
                )
            } else {
                (
                    "200 OK",
                    "text/html",
                    format!("<p>no route {path} ({decoded})</p>"),
                )
            };
            let mut stream = reader.into_inner();
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

fn percent_decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            if let Ok(byte) = u8::from_str_radix(&path[i + 1..i + 3], 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn the_key_never_appears_in_messages_or_json() {
    let base = echoing_server();
    // A key that is percent-encoded in the URL, to check both forms.
    let key = "s3cret key/6";
    for mode in ["refuse", "missing", "html"] {
        let url = format!("{base}/{mode}");
        for json in [false, true] {
            let mut cmd = tango();
            cmd.args(["--url", &url, "--key", key]);
            if json {
                cmd.arg("--json");
            }
            let output = cmd.args(["pool", "img"]).output().unwrap();
            let stdout = String::from_utf8_lossy(&output.stdout);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(1), "{mode}: {stderr}");
            for text in [&stdout, &stderr] {
                assert!(
                    !text.contains(key) && !text.contains("s3cret%20key%2F6"),
                    "{mode}, json {json}: the key leaked:\n{text}"
                );
            }
            // The echo is there, with the key hidden.
            assert!(
                stderr.contains(&format!("/{mode}/pool/<key>/img/")),
                "{mode}: {stderr}"
            );
            if json {
                let v = stdout_json(&output);
                assert!(
                    v["error"].as_str().unwrap().contains("<key>"),
                    "{mode}: {v}"
                );
                if mode == "refuse" {
                    assert_eq!(
                        v["answer"]["detail"],
                        format!("/{mode}/pool/<key>/img/"),
                        "{v}"
                    );
                }
            }
        }
    }
}

#[test]
fn only_bench_takes_several_urls() {
    let urls = format!("{},{}", dead_url(), dead_url());
    tango()
        .args(["--url", &urls, "--key", "k", "info"])
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("2 server URLs given")
                .and(predicate::str::contains("only `tango bench`")),
        );
}

#[test]
fn concurrency_zero_is_refused_like_jobs_zero() {
    let url = dead_url();
    for (flag, message) in [
        ("--jobs", "--jobs must be at least 1"),
        ("--concurrency", "--concurrency must be at least 1"),
    ] {
        tango()
            .args(["--url", &url, "--key", "k", "run", "examples/jobs/hello"])
            .args([flag, "0"])
            .assert()
            .code(1)
            .stderr(predicate::str::contains(message));
    }
    tango()
        .args(["--url", &url, "--key", "k", "bench", "hello", "-c", "0"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "-c/--concurrency must be at least 1",
        ));
}

#[test]
fn usage_errors_with_json_print_one_json_document() {
    let output = tango().args(["--json", "poll", "lab"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let v = stdout_json(&output);
    assert!(
        v["error"].as_str().unwrap().contains("required arguments"),
        "{v}"
    );
    assert!(v["answer"].is_null(), "{v}");
    // Help is not an error, and not JSON.
    tango()
        .args(["--json", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("Usage"));
}

#[test]
fn health_fails_when_nothing_answers() {
    let url = dead_url();
    tango()
        .env_remove("RESTFUL_KEY")
        .args(["--url", &url, "health"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("cannot reach tangod"));
}
