//! Every job in examples/jobs/ through tangod end to end on the sandbox
//! backend, the hostile ones all at once with normal jobs running beside
//! them. Each must end with the right outcome line and a callback within its
//! timeout plus 10 s.

mod common;

use common::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const TIMEOUT: u64 = 8;

fn example_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/jobs")
        .join(name)
}

/// Uploads an example job's files (its autograde-Makefile as Makefile) into
/// courselab `lab` and returns its `files` list.
async fn upload_example(
    c: &Client,
    lab: &str,
    name: &str,
    extra: &[(&str, Vec<u8>)],
) -> serde_json::Value {
    c.open(lab).await;
    let mut files = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(example_dir(name))
        .unwrap()
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let file = entry.file_name().to_string_lossy().into_owned();
        if file == "README.md" {
            continue;
        }
        let dest = if file == "autograde-Makefile" {
            "Makefile".to_string()
        } else {
            file.clone()
        };
        let local = format!("{name}-{file}");
        let v = c
            .upload(lab, &local, &std::fs::read(entry.path()).unwrap())
            .await;
        assert_eq!(v["statusId"], 0, "{v}");
        files.push(serde_json::json!({"localFile": local, "destFile": dest}));
    }
    for (file, bytes) in extra {
        let local = format!("{name}-{file}");
        c.upload(lab, &local, bytes).await;
        files.push(serde_json::json!({"localFile": local, "destFile": file}));
    }
    serde_json::Value::Array(files)
}

/// Processes running as a sandbox grading uid (root: 200000 + VM id %
/// 100000; rootless: one of the user's subordinate uids): every one of them
/// belongs to a job. Counting these, not all host processes, keeps the
/// check exact on a machine doing other work.
fn job_processes(grading_uids: std::ops::Range<u32>) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|uid| uid.parse::<u32>().ok())
                .is_some_and(|uid| grading_uids.contains(&uid))
        })
        .collect()
}

struct Submitted {
    name: &'static str,
    at: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_job_end_to_end_in_the_sandbox() {
    if !root_or_skip("every_example_job_end_to_end_in_the_sandbox") {
        return;
    }
    every_example_job("sandbox", "host", None).await;
}

/// The same, tangod running as an unprivileged user: every job in a user
/// namespace, grading users among the user's subordinate uids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_job_end_to_end_in_the_rootless_sandbox() {
    let test = "every_example_job_end_to_end_in_the_rootless_sandbox";
    let Some(user) = RootlessUser::from_env(test) else {
        return;
    };
    every_example_job("sandbox", "host", Some(user.clone())).await;
    user.remove_cgroups();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_job_end_to_end_in_docker() {
    if !docker_or_skip("every_example_job_end_to_end_in_docker") {
        return;
    }
    every_example_job("docker", DOCKER_TEST_IMAGE, None).await;
}

async fn every_example_job(vmms: &str, image: &str, run_as: Option<RootlessUser>) {
    let dir = tempfile::tempdir().unwrap();
    let grading_uids = match &run_as {
        Some(user) => {
            user.own(dir.path());
            let subuid = std::fs::read_to_string("/etc/subuid").unwrap();
            let uid = user.uid.to_string();
            let name = unsafe { std::ffi::CStr::from_ptr((*libc::getpwuid(user.uid)).pw_name) }
                .to_string_lossy()
                .into_owned();
            let (start, count) = subuid
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() == 3 && (f[0] == name || f[0] == uid))
                        .then(|| (f[1].parse::<u32>().unwrap(), f[2].parse::<u32>().unwrap()))
                })
                .next()
                .expect("the user's /etc/subuid range");
            start..start + count
        }
        None => 200_000..300_000,
    };
    let server = Tangod::start_as(
        &dir.path().join("data"),
        &format!(
            "vmms = \"{vmms}\"\n[engine]\nmax_file_bytes = 67108864\n\
             [sandbox]\nmemory_mb = 256\nmax_pids = 64\n[docker]\nmemory_mb = 256\nmax_pids = 64\n"
        ),
        run_as,
    );
    let c = server.client();
    let receiver = Receiver::start().await;

    // A secret in another courselab, which snoop must not see.
    c.open("otherlab").await;
    c.upload("otherlab", "secret.txt", b"SECRET-OF-ANOTHER-COURSELAB")
        .await;
    // A host service on loopback, which network_probe must not reach.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();

    // Idle latency of the hello job.
    let hello_files = upload_example(&c, "lab", "hello", &[]).await;
    let mut idle = Duration::ZERO;
    for i in 0..3 {
        let mut body = job(
            &format!("idle{i}"),
            &format!("idle{i}"),
            Some(&receiver.url_for(&format!("idle{i}"))),
            TIMEOUT,
        );
        body["files"] = hello_files.clone();
        body["image"] = image.into();
        let start = Instant::now();
        c.add_job("lab", &body).await;
        receiver.wait_for(i + 1, Duration::from_secs(20)).await;
        idle = idle.max(start.elapsed());
    }

    let hostile = [
        "failing",
        "endless",
        "output_flood",
        "fork_bomb",
        "memory_hog",
        "daemon",
        "disk_filler",
        "network_probe",
        "snoop",
        "kill_autodriver",
    ];
    let mut submitted = Vec::new();
    for name in hostile {
        let extra: Vec<(&str, Vec<u8>)> = if name == "network_probe" {
            vec![("port.txt", port.to_string().into_bytes())]
        } else {
            vec![]
        };
        let files = upload_example(&c, "lab", name, &extra).await;
        let mut body = job(name, name, Some(&receiver.url_for(name)), TIMEOUT);
        body["files"] = files;
        body["image"] = image.into();
        body["max_kb"] = serde_json::json!(64);
        let v = c.add_job("lab", &body).await;
        assert_eq!(v["statusMsg"], "Job added", "{name}: {v}");
        submitted.push(Submitted {
            name,
            at: Instant::now(),
        });
    }
    // Normal jobs beside the hostile ones.
    let mut normal = Vec::new();
    for i in 0..5 {
        let tag = format!("beside{i}");
        let mut body = job(&tag, &tag, Some(&receiver.url_for(&tag)), TIMEOUT);
        body["files"] = hello_files.clone();
        body["image"] = image.into();
        let start = Instant::now();
        c.add_job("lab", &body).await;
        normal.push((tag, start));
    }
    for (tag, start) in &normal {
        let limit = Duration::from_secs(TIMEOUT + 10);
        while receiver.get(tag).is_empty() {
            assert!(start.elapsed() < limit, "{tag} got no callback");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = start.elapsed();
        eprintln!("{tag}: {took:?} beside the hostile jobs (idle: {idle:?})");
    }

    for job in &submitted {
        let limit = Duration::from_secs(TIMEOUT + 10);
        while receiver.get(job.name).is_empty() {
            assert!(
                job.at.elapsed() < limit,
                "{} got no callback within {limit:?}",
                job.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("{}: callback after {:?}", job.name, job.at.elapsed());
    }
    let out = |name: &str| String::from_utf8_lossy(&receiver.get(name)[0].body).into_owned();
    let success = "Success: Autodriver returned normally";

    let o = out("failing");
    assert!(
        o.contains(success) && o.contains("Autodriver: Job exited with status 2"),
        "{o}"
    );

    let o = out("endless");
    assert!(
        o.contains(&format!("Error: Job timed out after {TIMEOUT} seconds")),
        "{o}"
    );

    let o = out("output_flood");
    assert!(o.contains(success), "{o}");
    assert!(
        o.contains("...[excess bytes elided]..."),
        "flood not capped"
    );
    assert!(o.len() < 64 * 1024 + 4096, "flood output {} bytes", o.len());
    assert!(
        o.ends_with("{\"scores\": {\"output_flood\": 1}}\n"),
        "score line lost: {:?}",
        &o[o.len() - 100..]
    );

    let o = out("fork_bomb");
    assert!(o.contains("starting a fork bomb"), "{o}");
    assert!(
        o.contains(success) || o.contains("Error: Job timed out"),
        "{o}"
    );

    let o = out("memory_hog");
    assert!(o.contains("exceeded its memory limit of 256 MiB"), "{o}");

    let o = out("daemon");
    assert!(o.contains(success) && o.contains("make is done"), "{o}");

    let o = out("disk_filler");
    assert!(o.contains(success), "{o}");

    let o = out("network_probe");
    assert!(o.contains("interfaces: lo\n"), "{o}");
    assert!(o.contains("default route: no"), "{o}");
    assert!(o.contains(&format!("tcp 127.0.0.1:{port}: no")), "{o}");
    assert!(!o.contains("CONNECTED"), "{o}");

    let o = out("snoop");
    assert!(o.contains(success), "{o}");
    assert!(!o.contains("SECRET-OF-ANOTHER-COURSELAB"), "{o}");
    assert!(o.contains("read /etc/shadow: no"), "{o}");
    // /tmp, /var/tmp and /dev/shm are the VM's own scratch space, wiped with it.
    for path in ["/escaped", "/etc/escaped", "/usr/escaped"] {
        assert!(
            o.contains(&format!("write {path}: no")),
            "wrote {path}: {o}"
        );
    }
    assert!(!o.contains("otherlab"), "{o}");
    assert!(!std::path::Path::new("/escaped").exists());

    let o = out("kill_autodriver");
    assert!(o.contains(success), "{o}");

    // No container or sandbox of this server is left once it stops.
    stop_leaving_no_vms(server, vmms);
    // Every process of the hostile jobs is gone.
    if vmms == "sandbox" {
        assert_eq!(
            job_processes(grading_uids),
            Vec::<u32>::new(),
            "job processes left"
        );
    }
    drop(listener);
}
