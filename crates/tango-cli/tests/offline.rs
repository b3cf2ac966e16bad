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
