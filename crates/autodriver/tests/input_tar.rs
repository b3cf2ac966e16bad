//! End-to-end tests of `--input-tar` (run as root): the job's files arrive
//! as a tar on stdin or in a file and are written into DIR before the run.

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

const BLOCK: usize = 512;

/// One ustar header, checksum included.
fn header(name: &str, kind: u8, mode: u32, size: usize) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(format!("{mode:07o}\0").as_bytes());
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let sum: u32 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

fn tar(entries: &[(&str, u8, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, mode, data) in entries {
        out.extend_from_slice(&header(name, *kind, *mode, data.len()));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
    }
    out.extend_from_slice(&[0u8; 2 * BLOCK]);
    out
}

/// Runs the driver as `uid` on `dir` with `--input-tar -`, `input` on stdin.
fn run_with_stdin(scratch: &Scratch, uid: u32, dir: &str, input: &[u8]) -> Outcome {
    let home = scratch.home();
    let mut child = Command::new(BIN)
        .args(["--user", &uid.to_string(), "--home", home.to_str().unwrap()])
        .args(["-t", "20", "--input-tar", "-", dir])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("autodriver runs");
    // The driver may refuse the archive before reading all of it.
    let _ = child.stdin.take().unwrap().write_all(input);
    let output = child.wait_with_output().unwrap();
    Outcome {
        code: output.status.code().unwrap_or(-1),
        stdout: output.stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        elapsed: Default::default(),
    }
}

const MAKEFILE: &[u8] = b"all:\n\t@./greet.sh\n\t@cat data.txt\n\t@ls\n";

#[test]
fn files_from_stdin_are_put_into_a_new_job_directory() {
    if !root_or_skip("files_from_stdin_are_put_into_a_new_job_directory") {
        return;
    }
    let scratch = Scratch::with_job(&[]);
    let dir = scratch.path().join("fresh/autolab");
    let input = tar(&[
        ("Makefile", b'0', 0o600, MAKEFILE),
        (
            "greet.sh",
            b'0',
            0o700,
            b"#!/bin/sh\necho hello from stdin\n",
        ),
        ("data.txt", b'0', 0o644, &[b'z'; 700]),
    ]);
    let out = run_with_stdin(&scratch, 64022, dir.to_str().unwrap(), &input);
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let expected = format!(
        "Autodriver: Job exited with status 0\nhello from stdin\n{}Makefile\ndata.txt\ngreet.sh\n",
        "z".repeat(700)
    );
    assert_eq!(out.text(), expected);
    assert!(!dir.exists(), "the job directory was moved into the home");
    assert_eq!(std::fs::read_dir(scratch.home()).unwrap().count(), 0);
}

#[test]
fn files_from_a_tar_file_join_an_existing_directory() {
    if !root_or_skip("files_from_a_tar_file_join_an_existing_directory") {
        return;
    }
    let scratch = Scratch::with_job(&[("data.txt", "already there\n")]);
    let tar_path = scratch.path().join("inputs.tar");
    std::fs::write(
        &tar_path,
        tar(&[
            ("./", b'5', 0o755, b""),
            ("./Makefile", b'0', 0o644, MAKEFILE),
            ("greet.sh", b'0', 0o755, b"#!/bin/sh\necho hi\n"),
        ]),
    )
    .unwrap();
    let out = run(
        &scratch,
        64023,
        &["-t", "20", "--input-tar", tar_path.to_str().unwrap()],
    );
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert_eq!(
        out.text(),
        "Autodriver: Job exited with status 0\nhi\nalready there\nMakefile\ndata.txt\ngreet.sh\n"
    );
}

#[test]
fn anything_but_plain_files_is_an_os_error_and_nothing_runs() {
    if !root_or_skip("anything_but_plain_files_is_an_os_error_and_nothing_runs") {
        return;
    }
    let scratch = Scratch::with_job(&[]);
    let victim = scratch.path().join("victim");
    std::fs::write(&victim, "keep me\n").unwrap();
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("a path", tar(&[("../escape", b'0', 0o644, b"x")])),
        ("a subdirectory", tar(&[("sub/file", b'0', 0o644, b"x")])),
        (
            "a symlink",
            tar(&[
                ("link", b'2', 0o777, b""),
                ("Makefile", b'0', 0o644, MAKEFILE),
            ]),
        ),
        ("a directory", tar(&[("sub/", b'5', 0o755, b"")])),
        ("garbage", vec![b'x'; 2048]),
        ("a truncated file", {
            let mut t = tar(&[("Makefile", b'0', 0o644, &[b'a'; 600])]);
            t.truncate(BLOCK + 100);
            t
        }),
    ];
    for (what, input) in bad {
        let dir = scratch.path().join("job-bad");
        let out = run_with_stdin(&scratch, 64024, dir.to_str().unwrap(), &input);
        assert_eq!(out.code, 3, "{what}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{what}: nothing ran");
        assert!(
            out.stderr.contains("cannot write the input files"),
            "{what}: {}",
            out.stderr
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me\n");
    assert!(!scratch.path().join("escape").exists());
}
