//! End-to-end tests of the autodriver binary (run as root).

mod common;

use common::*;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

#[test]
fn normal_job_prints_status_and_output() {
    if !root_or_skip("normal_job_prints_status_and_output") {
        return;
    }
    let scratch = Scratch::with_job(&[
        (
            "Makefile",
            "all:\n\t@echo hello world\n\t@id -u\n\t@id -G\n\t@pwd\n\t@cat data.txt\n",
        ),
        ("data.txt", "some input\n"),
    ]);
    let out = run(&scratch, 64001, &["-t", "20"]);
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let expected = format!(
        "Autodriver: Job exited with status 0\nhello world\n64001\n64001\n{}\nsome input\n",
        scratch.home().join("job").display()
    );
    assert_eq!(out.text(), expected);
    assert!(!scratch.job().exists(), "the job directory was moved away");
    // The home stays, emptied of the user's files.
    let home = std::fs::metadata(scratch.home()).unwrap();
    assert_eq!((home.uid(), home.mode() & 0o777), (64001, 0o700));
    assert_eq!(std::fs::read_dir(scratch.home()).unwrap().count(), 0);
}

#[test]
fn failing_make_reports_its_status_and_still_exits_zero() {
    if !root_or_skip("failing_make_reports_its_status_and_still_exits_zero") {
        return;
    }
    let scratch = Scratch::with_job(&[("Makefile", "all:\n\t@echo before failing\n\t@false\n")]);
    let out = run(&scratch, 64002, &[]);
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert_eq!(out.first_line(), "Autodriver: Job exited with status 2");
    assert!(out.text().contains("before failing\n"));
    assert!(
        out.text().contains("make: *** [Makefile:3: all] Error 1"),
        "{}",
        out.text()
    );
}

#[test]
fn timeout_kills_the_job_and_its_detached_daemons() {
    if !root_or_skip("timeout_kills_the_job_and_its_detached_daemons") {
        return;
    }
    let uid = 64003;
    // Two escapees: a double-forked daemon in its own session that holds
    // the output pipe open, and one that ignores the polite signals.
    let makefile = "all:\n\
        \t@echo started\n\
        \t@sh -c 'setsid sh -c \"sleep 1000\" & exit 0'\n\
        \t@nohup sh -c 'trap \"\" TERM HUP INT; sleep 1001' >/dev/null 2>&1 &\n\
        \t@sleep 1002\n";
    let scratch = Scratch::with_job(&[("Makefile", makefile)]);
    let summary = scratch.path().join("summary.json");
    let out = run(
        &scratch,
        uid,
        &["-t", "2", "--summary", summary.to_str().unwrap()],
    );
    assert_eq!(out.code, 2, "stderr: {}", out.stderr);
    assert_eq!(
        out.text(),
        "Autodriver: Job timed out after 2 seconds\nstarted\n"
    );
    assert!(
        out.elapsed < Duration::from_secs(10),
        "took {:?}",
        out.elapsed
    );
    assert_eq!(processes_of(uid), Vec::<String>::new());
    let s = read_summary(&summary);
    assert_eq!(s["timed_out"], true);
    assert_eq!(s["killed_by"], "timeout");
    assert_eq!(s["exit_status"], serde_json::Value::Null);
    assert!(s["wall_ms"].as_u64().unwrap() >= 2000);
}

#[test]
fn daemons_left_after_a_normal_exit_are_killed_too() {
    if !root_or_skip("daemons_left_after_a_normal_exit_are_killed_too") {
        return;
    }
    let uid = 64004;
    let makefile = "all:\n\
                    \t@sh -c 'setsid sh -c \"touch up; exec sleep 1000\" & exit 0'\n\
                    \t@while [ ! -e up ]; do sleep 0.05; done\n\
                    \t@echo done\n";
    let scratch = Scratch::with_job(&[("Makefile", makefile)]);
    let out = run(&scratch, uid, &["-t", "30"]);
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert_eq!(out.text(), "Autodriver: Job exited with status 0\ndone\n");
    // The daemon held the pipe: the driver must not wait for it.
    assert!(
        out.elapsed < Duration::from_secs(10),
        "took {:?}",
        out.elapsed
    );
    assert_eq!(processes_of(uid), Vec::<String>::new());
}

#[test]
fn fork_bomb_is_contained_and_wiped_out() {
    if !root_or_skip("fork_bomb_is_contained_and_wiped_out") {
        return;
    }
    let uid = 64005;
    // In its own session, out of reach of a kill of make's process group,
    // and persistent: every process keeps forking while the limit allows.
    // The recipe's shell then execs the sleep: a fork after the bomb could
    // fail at the limit and end make before the timeout.
    let makefile = "all:\n\t@echo bombing\n\
                    \t@setsid sh -c 'b() { while :; do b & sleep 1000 & done; }; b' 2>/dev/null \
                    & exec sleep 1000\n";
    let scratch = Scratch::with_job(&[("Makefile", makefile)]);
    let out = run(&scratch, uid, &["-u", "20", "-t", "3"]);
    assert_eq!(out.code, 2, "stderr: {}", out.stderr);
    assert_eq!(
        out.first_line(),
        "Autodriver: Job timed out after 3 seconds"
    );
    assert!(
        out.elapsed < Duration::from_secs(15),
        "took {:?}",
        out.elapsed
    );
    assert_eq!(processes_of(uid), Vec::<String>::new());
}

#[test]
fn output_flood_keeps_head_and_tail_byte_for_byte() {
    if !root_or_skip("output_flood_keeps_head_and_tail_byte_for_byte") {
        return;
    }
    let scratch = Scratch::with_job(&[("Makefile", "all:\n\t@seq 1 200000\n")]);
    let summary = scratch.path().join("summary.json");
    let stream = scratch.path().join("partial.out");
    let cap = 1001usize;
    let out = run(
        &scratch,
        64006,
        &[
            "-o",
            &cap.to_string(),
            "--summary",
            summary.to_str().unwrap(),
            "--stream",
            stream.to_str().unwrap(),
        ],
    );
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let full: String = (1..=200000).map(|i| format!("{i}\n")).collect();
    let half = cap / 2;
    let mut expected = b"Autodriver: Job exited with status 0\n".to_vec();
    expected.extend_from_slice(&full.as_bytes()[..half]);
    expected.extend_from_slice(b"\n...[excess bytes elided]...\n");
    expected.extend_from_slice(&full.as_bytes()[full.len() - half..]);
    assert!(out.stdout == expected, "output differs:\n{}", out.text());
    let s = read_summary(&summary);
    assert_eq!(s["output_bytes_total"].as_u64(), Some(full.len() as u64));
    assert_eq!(s["output_bytes_kept"].as_u64(), Some(2 * half as u64));
    assert_eq!(std::fs::read(&stream).unwrap(), &full.as_bytes()[..half]);
    let meta = std::fs::metadata(&stream).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
}

#[test]
fn output_at_the_cap_is_printed_whole() {
    if !root_or_skip("output_at_the_cap_is_printed_whole") {
        return;
    }
    let scratch = Scratch::with_job(&[("Makefile", "all:\n\t@seq 1 100\n")]);
    let full: String = (1..=100).map(|i| format!("{i}\n")).collect();
    let out = run(&scratch, 64007, &["-o", &full.len().to_string()]);
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert_eq!(
        out.text(),
        format!("Autodriver: Job exited with status 0\n{full}")
    );
}

#[test]
fn file_size_limit_stops_a_growing_file() {
    if !root_or_skip("file_size_limit_stops_a_growing_file") {
        return;
    }
    let makefile = "all:\n\t-head -c 50000 /dev/zero > big\n\t@echo size=$$(wc -c < big)\n\
                    \thead -c 50000 /dev/zero > big2\n";
    let scratch = Scratch::with_job(&[("Makefile", makefile)]);
    let summary = scratch.path().join("summary.json");
    let out = run(
        &scratch,
        64008,
        &["-f", "1000", "--summary", summary.to_str().unwrap()],
    );
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert_eq!(out.first_line(), "Autodriver: Job exited with status 2");
    assert!(out.text().contains("size=1000\n"), "{}", out.text());
    assert!(
        out.text().contains("File size limit exceeded"),
        "{}",
        out.text()
    );
    let s = read_summary(&summary);
    assert_eq!(s["exit_status"], 2);
    assert_eq!(s["killed_by"], "file_size_limit");
}

#[test]
fn memory_limit_makes_big_allocations_fail() {
    if !root_or_skip("memory_limit_makes_big_allocations_fail") {
        return;
    }
    let makefile = "all:\n\t@dd if=/dev/zero of=/dev/null bs=300M count=1 2>&1 | grep -o 'memory exhausted' || true\n\
                    \t@dd if=/dev/zero of=/dev/null bs=300M count=1 2>/dev/null\n\t@echo allocated\n";
    // Control: without the limit the allocation succeeds.
    let scratch = Scratch::with_job(&[("Makefile", makefile)]);
    let out = run(&scratch, 64009, &[]);
    assert_eq!(
        out.text(),
        "Autodriver: Job exited with status 0\nallocated\n",
        "{}",
        out.stderr
    );

    let scratch = Scratch::with_job(&[("Makefile", makefile)]);
    let out = run(&scratch, 64009, &["--mem-bytes", "100000000"]);
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert_eq!(out.first_line(), "Autodriver: Job exited with status 2");
    assert!(out.text().contains("memory exhausted\n"), "{}", out.text());
    assert!(!out.text().contains("allocated"), "{}", out.text());
}

#[test]
fn summary_json_has_every_field() {
    if !root_or_skip("summary_json_has_every_field") {
        return;
    }
    let makefile = "all:\n\t@i=0; while [ $$i -lt 200000 ]; do i=$$((i+1)); done; echo counted $$i\n\t@exit 3\n";
    let scratch = Scratch::with_job(&[("Makefile", makefile)]);
    let summary = scratch.path().join("summary.json");
    let out = run(&scratch, 64010, &["--summary", summary.to_str().unwrap()]);
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let s = read_summary(&summary);
    let object = s.as_object().unwrap();
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "cpu_ms",
            "exit_status",
            "killed_by",
            "output_bytes_kept",
            "output_bytes_total",
            "peak_rss_kb",
            "signal",
            "timed_out",
            "wall_ms"
        ]
    );
    assert_eq!(s["exit_status"], 2);
    assert_eq!(s["signal"], serde_json::Value::Null);
    assert_eq!(s["timed_out"], false);
    assert_eq!(s["killed_by"], serde_json::Value::Null);
    assert!(s["cpu_ms"].as_u64().unwrap() > 0, "{s}");
    assert!(s["peak_rss_kb"].as_u64().unwrap() > 0, "{s}");
    assert!(
        s["wall_ms"].as_u64().unwrap() >= s["cpu_ms"].as_u64().unwrap() / 2,
        "{s}"
    );
    let total = s["output_bytes_total"].as_u64().unwrap();
    assert_eq!(total, s["output_bytes_kept"].as_u64().unwrap());
    assert_eq!(
        total as usize,
        out.stdout.len() - "Autodriver: Job exited with status 2\n".len()
    );
    let meta = std::fs::metadata(&summary).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
}

#[test]
fn cpu_limit_is_reported() {
    if !root_or_skip("cpu_limit_is_reported") {
        return;
    }
    let makefile = "all:\n\t@while :; do :; done\n";
    let scratch = Scratch::with_job(&[("Makefile", makefile)]);
    let summary = scratch.path().join("summary.json");
    let out = run(
        &scratch,
        64011,
        &[
            "--cpu-seconds",
            "1",
            "-t",
            "20",
            "--summary",
            summary.to_str().unwrap(),
        ],
    );
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert_eq!(out.first_line(), "Autodriver: Job exited with status 2");
    assert!(out.elapsed < Duration::from_secs(10));
    assert_eq!(read_summary(&summary)["killed_by"], "cpu_limit");
}

#[test]
fn the_users_files_are_deleted_and_nothing_else() {
    if !root_or_skip("the_users_files_are_deleted_and_nothing_else") {
        return;
    }
    let uid = 64012;
    let scratch = Scratch::with_job(&[]);
    // Root-owned files the job can reach must survive, even through links.
    let precious = scratch.path().join("precious");
    std::fs::write(&precious, "keep me").unwrap();
    let shared = format!("/tmp/autodriver-shared-{uid}");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::set_permissions(
        &shared,
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    std::fs::write(format!("{shared}/root-file"), "root's").unwrap();
    let makefile = format!(
        "all:\n\
         \t@touch /tmp/mine-{uid} /var/tmp/mine-{uid} /dev/shm/mine-{uid}\n\
         \t@mkdir -p /tmp/dir-{uid}/a/b && touch /tmp/dir-{uid}/a/b/f\n\
         \t@ln -s {precious} /tmp/link-{uid}\n\
         \t@ln -s / /tmp/dir-{uid}/root-link\n\
         \t@touch {shared}/user-file\n\
         \t@touch ~/dotfile\n\
         \t@echo ok\n",
        precious = precious.display()
    );
    std::fs::write(scratch.job().join("Makefile"), makefile).unwrap();
    let out = run(&scratch, uid, &[]);
    assert_eq!(
        out.text(),
        "Autodriver: Job exited with status 0\nok\n",
        "{}",
        out.stderr
    );
    for gone in [
        format!("/tmp/mine-{uid}"),
        format!("/var/tmp/mine-{uid}"),
        format!("/dev/shm/mine-{uid}"),
        format!("/tmp/dir-{uid}"),
        format!("/tmp/link-{uid}"),
        format!("{shared}/user-file"),
    ] {
        assert!(std::fs::symlink_metadata(&gone).is_err(), "{gone} survived");
    }
    assert_eq!(std::fs::read_dir(scratch.home()).unwrap().count(), 0);
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
    assert_eq!(
        std::fs::read_to_string(format!("{shared}/root-file")).unwrap(),
        "root's"
    );
    std::fs::remove_dir_all(&shared).unwrap();
}

#[test]
fn job_directory_moves_across_file_systems() {
    if !root_or_skip("job_directory_moves_across_file_systems") {
        return;
    }
    let uid = 64013;
    let source = tempfile::Builder::new()
        .prefix("autodriver-xfs-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let job = source.path().join("job");
    std::fs::create_dir_all(job.join("sub")).unwrap();
    std::fs::write(
        job.join("Makefile"),
        "all:\n\t@cat sub/data\n\t@test -L link && echo link kept\n",
    )
    .unwrap();
    std::fs::write(job.join("sub/data"), "across\n").unwrap();
    std::os::unix::fs::symlink("sub/data", job.join("link")).unwrap();
    let scratch = Scratch::with_job(&[]);
    let out = run_raw(&[
        "--user",
        &uid.to_string(),
        "--home",
        scratch.home().to_str().unwrap(),
        job.to_str().unwrap(),
    ]);
    assert_eq!(
        out.text(),
        "Autodriver: Job exited with status 0\nacross\nlink kept\n",
        "{}",
        out.stderr
    );
    assert!(!job.exists());
}

#[test]
fn usage_errors_exit_one() {
    if !root_or_skip("usage_errors_exit_one") {
        return;
    }
    let scratch = Scratch::with_job(&[("Makefile", "all:\n\t@echo never\n")]);
    let job = scratch.job();
    let job = job.to_str().unwrap();
    for args in [
        vec![],
        vec!["-u"],
        vec!["-u", "many", job],
        vec!["--frobnicate", job],
        vec![job, job],
        vec!["--user", "0", job],
        vec!["--user", "64014:0", job],
        vec!["--user", "64014", "--home", "/", job],
        vec!["--user", "64014", "--home", "relative", job],
    ] {
        let out = run_raw(&args);
        assert_eq!(out.code, 1, "{args:?}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    assert!(job_exists(job), "nothing was moved");
    // An unknown grading user means a broken image: an OS error.
    let out = run_raw(&["--user", "no-such-user-here", job]);
    assert_eq!(out.code, 3, "{}", out.stderr);
}

fn job_exists(path: &str) -> bool {
    std::path::Path::new(path).join("Makefile").exists()
}

#[test]
fn missing_directory_is_an_os_error() {
    if !root_or_skip("missing_directory_is_an_os_error") {
        return;
    }
    let scratch = Scratch::with_job(&[]);
    let out = run_raw(&[
        "--user",
        "64015",
        "--home",
        scratch.home().to_str().unwrap(),
        scratch.path().join("nope").to_str().unwrap(),
    ]);
    assert_eq!(out.code, 3, "{}", out.stderr);
}

#[test]
fn idle_reaps_and_exits_on_sigterm() {
    let mut child = std::process::Command::new(BIN)
        .arg("--idle")
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(child.try_wait().unwrap().is_none(), "idle keeps running");
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// A memory cgroup limited to `bytes`, removed on drop.
struct MemoryCgroup {
    dir: std::path::PathBuf,
}

impl MemoryCgroup {
    fn create(bytes: u64) -> Option<MemoryCgroup> {
        let name = format!("autodriver-oom-test-{}", std::process::id());
        let v1 = std::path::Path::new("/sys/fs/cgroup/memory");
        let (dir, limit_file) = if v1.join("memory.limit_in_bytes").exists() {
            (v1.join(&name), "memory.limit_in_bytes")
        } else if std::fs::read_to_string("/sys/fs/cgroup/cgroup.subtree_control")
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
        {
            (
                std::path::Path::new("/sys/fs/cgroup").join(&name),
                "memory.max",
            )
        } else {
            return None;
        };
        std::fs::create_dir(&dir).ok()?;
        let group = MemoryCgroup { dir };
        std::fs::write(group.dir.join(limit_file), bytes.to_string()).ok()?;
        // No swap to escape to, where the knob exists.
        let _ = std::fs::write(group.dir.join("memory.swap.max"), "0");
        let _ = std::fs::write(group.dir.join("memory.swappiness"), "0");
        Some(group)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn oom_kill_in_the_memory_cgroup_is_reported() {
    if !root_or_skip("oom_kill_in_the_memory_cgroup_is_reported") {
        return;
    }
    let Some(cgroup) = MemoryCgroup::create(64 << 20) else {
        skip("oom_kill_in_the_memory_cgroup_is_reported: cannot create a memory cgroup");
        return;
    };
    let scratch = Scratch::with_job(&[(
        "Makefile",
        "all:\n\t@echo before\n\tdd if=/dev/zero of=/dev/null bs=200M count=1\n",
    )]);
    let summary = scratch.path().join("summary.json");
    // The driver enters the cgroup before it starts, so the job is in it.
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"",
        cgroup.dir.display()
    );
    let output = std::process::Command::new("sh")
        .args(["-c", &script, BIN, "--user", "64016", "--home"])
        .arg(scratch.home())
        .arg("--summary")
        .arg(&summary)
        .arg(scratch.job())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.starts_with("Autodriver: Job exited with status 2\nbefore\n"),
        "{text}"
    );
    let s = read_summary(&summary);
    assert_eq!(s["killed_by"], "oom", "{s}\n{text}");
    assert_eq!(processes_of(64016), Vec::<String>::new());
}

/// Sends one `--serve` request; the output up to its end line, and the code.
fn serve_request(
    stdin: &mut impl std::io::Write,
    stdout: &mut impl std::io::BufRead,
    nonce: &str,
    args: &[&str],
    input: &[u8],
) -> (String, i32) {
    let args: Vec<u8> = args
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    writeln!(stdin, "run {nonce} {} {}", args.len(), input.len()).unwrap();
    stdin.write_all(&args).unwrap();
    stdin.write_all(input).unwrap();
    stdin.flush().unwrap();
    let end = format!("\0autodriver-done {nonce} ");
    let mut output = Vec::new();
    while !output.ends_with(end.as_bytes()) {
        let mut byte = [0u8];
        stdout.read_exact(&mut byte).expect("the end line comes");
        output.push(byte[0]);
    }
    output.truncate(output.len() - end.len());
    let mut code = String::new();
    stdout.read_line(&mut code).unwrap();
    (
        String::from_utf8_lossy(&output).into_owned(),
        code.trim().parse().unwrap(),
    )
}

#[test]
fn serve_runs_the_requested_jobs_one_after_another() {
    if !root_or_skip("serve_runs_the_requested_jobs_one_after_another") {
        return;
    }
    use std::io::Read;
    let mut idle = std::process::Command::new(BIN)
        .args(["--idle", "--serve"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = idle.stdin.take().unwrap();
    let mut stdout = std::io::BufReader::new(idle.stdout.take().unwrap());

    // A job whose output fakes an end line with another nonce.
    let scratch = Scratch::with_job(&[(
        "Makefile",
        "all:\n\t@printf 'before\\0autodriver-done 0000000000000000 0\\nafter\\n'\n",
    )]);
    let home = scratch.home();
    let job = scratch.job();
    let args = [
        "--user",
        "64001",
        "--home",
        home.to_str().unwrap(),
        "-t",
        "20",
        job.to_str().unwrap(),
    ];
    let (output, code) =
        serve_request(&mut stdin, &mut stdout, "nonce0123456789abcdef", &args, b"");
    assert_eq!(code, 0, "{output}");
    assert!(
        output.starts_with("Autodriver: Job exited with status 0\n"),
        "{output:?}"
    );
    assert!(output.ends_with("after\n"), "{output:?}");

    // A usage error, with input the job never reads: it is skipped and the
    // next request is served.
    let (output, code) = serve_request(
        &mut stdin,
        &mut stdout,
        "nonceABCDEFGHIJKLMNOP",
        &["--no-such-option", "/x"],
        &vec![7u8; 300_000],
    );
    assert_eq!(code, 1, "{output}");
    // A served job's stream file keeps its output after the job (the host
    // may still read it as the partial output) until the next job is asked
    // for: then it is removed, so that no file can show an earlier job's
    // output as a later one's.
    let scratch = Scratch::with_job(&[("Makefile", "all:\n\t@echo second\n")]);
    let (home, job) = (scratch.home(), scratch.job());
    let stream = scratch.path().join("partial.out");
    let args = [
        "--user",
        "64001",
        "--home",
        home.to_str().unwrap(),
        "--stream",
        stream.to_str().unwrap(),
        job.to_str().unwrap(),
    ];
    let (output, code) =
        serve_request(&mut stdin, &mut stdout, "nonce2222222222222222", &args, b"");
    assert_eq!(code, 0);
    assert!(output.ends_with("second\n"), "{output:?}");
    let meta = std::fs::metadata(&stream).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (0, 0o600),
        "the stream file after the served job"
    );
    assert_eq!(std::fs::read_to_string(&stream).unwrap(), "second\n");
    let (_, code) = serve_request(
        &mut stdin,
        &mut stdout,
        "nonce3333333333333333",
        &["--no-such-option", "/x"],
        b"",
    );
    assert_eq!(code, 1);
    assert!(
        !stream.exists(),
        "the previous job's stream file is removed when the next job is asked for"
    );

    // A malformed request ends the serving (nothing more is written), not
    // PID 1.
    stdin.write_all(b"run x 1 1\n").unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(idle.try_wait().unwrap().is_none(), "idle keeps running");
    unsafe { libc::kill(idle.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(idle.wait().unwrap().code(), Some(0));
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "");
}
