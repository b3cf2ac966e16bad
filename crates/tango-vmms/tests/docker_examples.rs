//! Every job in examples/jobs/ through the docker backend directly, all at
//! once on separate containers (256 MiB, 64 processes), then a normal job
//! in each container that survived, to show hostile jobs leave nothing
//! behind.
#![cfg(feature = "docker")]

#[path = "docker_common.rs"]
mod common;

use common::{machine, request, require_docker, BOOKWORM};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tango_core::model::InputFile;
use tango_core::vmms::{RunOutcome, RunStatus, Vmms};
use tango_vmms::docker::{container_name, Docker};

const TIMEOUT: u64 = 8;
const JOBS: [&str; 11] = [
    "hello",
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

fn example_inputs(name: &str) -> Vec<InputFile> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/jobs")
        .join(name);
    let mut files: Vec<InputFile> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f != "README.md")
        .map(|f| InputFile {
            dest_file: if f == "autograde-Makefile" {
                "Makefile".into()
            } else {
                f.clone()
            },
            local_file: f.clone(),
            path: dir.join(&f),
            md5: String::new(),
        })
        .collect();
    files.sort_by(|a, b| a.dest_file.cmp(&b.dest_file));
    files
}

struct Ran {
    outcome: RunOutcome,
    output: String,
    took: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_job_in_docker() {
    require_docker!();
    let work = tempfile::tempdir().unwrap();
    common::ensure_test_images();
    let mut config = common::config(work.path());
    config.default_memory_mb = 256;
    config.default_max_pids = 64;
    let docker = Arc::new(Docker::connect(config).await.unwrap());
    let prefix = common::prefix("examples");
    common::clean(&docker, &prefix).await;

    let mut tasks = Vec::new();
    // EXAMPLE_REPEAT=N runs fork_bomb N extra times (a diagnostic).
    let repeat: usize = std::env::var("EXAMPLE_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let names: Vec<&'static str> = JOBS
        .iter()
        .copied()
        .chain(std::iter::repeat_n("fork_bomb", repeat))
        .collect();
    for (id, name) in names.into_iter().enumerate() {
        let (docker, prefix) = (docker.clone(), prefix.clone());
        let out_dir: PathBuf = work.path().join(format!("{name}-{id}"));
        std::fs::create_dir(&out_dir).unwrap();
        tasks.push(tokio::spawn(async move {
            let vm = machine(&prefix, id as u64 + 1, BOOKWORM);
            docker.initialize_vm(&vm).await.unwrap();
            docker.wait_vm(&vm, Duration::from_secs(20)).await.unwrap();
            docker.copy_in(&vm, &example_inputs(name)).await.unwrap();
            let mut req = request(id as u64, TIMEOUT);
            req.output_cap_bytes = 64 * 1024;
            req.max_file_bytes = 64 << 20;
            let started = Instant::now();
            let outcome = docker.run_job(&vm, &req).await.unwrap();
            let took = started.elapsed();
            let dest = out_dir.join("output");
            docker.copy_out(&vm, &dest).await.unwrap();
            let output = String::from_utf8_lossy(&std::fs::read(&dest).unwrap()).into_owned();
            (
                name,
                vm,
                Ran {
                    outcome,
                    output,
                    took,
                },
            )
        }));
    }
    let mut ran = std::collections::HashMap::new();
    let mut vms = Vec::new();
    for task in tasks {
        let (name, vm, r) = task.await.unwrap();
        eprintln!(
            "{name}: {:?} {:?} after {:?}; summary {}",
            r.outcome.status,
            r.outcome.notes,
            r.took,
            r.outcome.summary.clone().unwrap_or_default()
        );
        assert!(
            r.took < Duration::from_secs(TIMEOUT + 10),
            "{name} took {:?}",
            r.took
        );
        vms.push((name, vm));
        ran.insert(name, r);
    }
    let get = |name: &str| &ran[name];

    let r = get("hello");
    assert_eq!(r.outcome.status, RunStatus::Completed);
    assert!(r.output.contains("Hello, tango!"), "{}", r.output);

    let r = get("failing");
    assert_eq!(r.outcome.status, RunStatus::Completed);
    assert!(
        r.output.contains("Autodriver: Job exited with status 2"),
        "{}",
        r.output
    );

    let r = get("endless");
    assert_eq!(r.outcome.status, RunStatus::TimedOut, "{}", r.output);
    assert!(r
        .output
        .contains(&format!("Job timed out after {TIMEOUT} seconds")));

    let r = get("output_flood");
    assert_eq!(r.outcome.status, RunStatus::Completed);
    assert!(r.output.contains("...[excess bytes elided]..."));
    assert!(
        r.output.len() < 64 * 1024 + 4096,
        "{} bytes",
        r.output.len()
    );
    assert!(r.output.ends_with("{\"scores\": {\"output_flood\": 1}}\n"));

    let r = get("fork_bomb");
    assert!(r.output.contains("starting a fork bomb"), "{}", r.output);
    assert!(
        matches!(r.outcome.status, RunStatus::Completed | RunStatus::TimedOut),
        "{:?}: {}",
        r.outcome.status,
        r.output
    );

    // Beside the memory hogs, no other job gets their OOM note.
    for name in ["hello", "fork_bomb", "daemon", "snoop", "output_flood"] {
        assert!(
            get(name).outcome.notes.is_empty(),
            "{name}: {:?}",
            get(name).outcome.notes
        );
    }

    let r = get("memory_hog");
    assert!(
        r.outcome
            .notes
            .iter()
            .any(|n| n.contains("exceeded its memory limit of 256 MiB")),
        "{:?}: {}",
        r.outcome.notes,
        r.output
    );

    let r = get("daemon");
    assert_eq!(r.outcome.status, RunStatus::Completed);
    assert!(r.output.contains("make is done"), "{}", r.output);
    assert!(
        r.took < Duration::from_secs(TIMEOUT),
        "daemon kept the job alive"
    );

    let r = get("disk_filler");
    assert!(
        matches!(r.outcome.status, RunStatus::Completed),
        "{:?}: {}",
        r.outcome.status,
        r.output
    );

    let r = get("network_probe");
    assert!(r.output.contains("interfaces: lo\n"), "{}", r.output);
    assert!(r.output.contains("default route: no"), "{}", r.output);
    assert!(!r.output.contains("CONNECTED"), "{}", r.output);

    let r = get("snoop");
    assert_eq!(r.outcome.status, RunStatus::Completed);
    assert!(r.output.contains("read /etc/shadow: no"), "{}", r.output);
    assert!(r.output.contains("list /.tango: no") || !r.output.contains("/.tango"));
    for path in ["/escaped", "/etc/escaped", "/usr/escaped"] {
        assert!(
            r.output.contains(&format!("write {path}: no")),
            "{path}: {}",
            r.output
        );
    }

    let r = get("kill_autodriver");
    assert_eq!(r.outcome.status, RunStatus::Completed, "{}", r.output);
    assert!(r.output.contains("ancestors:"), "{}", r.output);

    // Every container is fine afterwards: no process of the grading user
    // left, its files gone, and the writable layer small (scratch space is
    // tmpfs, charged to memory, gone with the container).
    let check = "all:\n\t@ps -eo user= | grep -vc '^root' || true\n\t@ls -A /tmp /var/tmp /home/autograde | wc -l\n\t@echo checked\n";
    let mut after = Vec::new();
    for (name, vm) in &vms {
        docker
            .reset_vm(vm)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let dir = work.path().join(format!("{name}-{}", vm.id - 1));
        docker
            .copy_in(vm, &common::inputs(&dir, &[("Makefile", check)]))
            .await
            .unwrap();
        let outcome = docker.run_job(vm, &request(100, 20)).await.unwrap();
        let dest = dir.join("after");
        docker.copy_out(vm, &dest).await.unwrap();
        let output = std::fs::read_to_string(&dest).unwrap();
        assert_eq!(outcome.status, RunStatus::Completed, "{name}: {output}");
        let lines: Vec<&str> = output.lines().collect();
        // The check itself runs as the grading user: ps counts its own
        // make, sh, ps and grep, and ls lists the job directory.
        assert!(lines.contains(&"checked"), "{name}: {output}");
        after.push((name, output.clone()));
        let inspect = docker
            .api()
            .inspect_container(
                &container_name(vm),
                Some(bollard::query_parameters::InspectContainerOptions { size: true }),
            )
            .await
            .unwrap();
        let written = inspect.size_rw.unwrap_or(0);
        assert!(
            written < 16 << 20,
            "{name}: {written} bytes in the writable layer"
        );
    }
    let baseline = &after.iter().find(|(n, _)| **n == "hello").unwrap().1;
    for (name, output) in &after {
        assert_eq!(output, baseline, "{name} left something behind");
    }
    for (_, vm) in &vms {
        docker.safe_destroy_vm(vm).await.unwrap();
    }
    assert!(docker.get_vms(&prefix).await.unwrap().is_empty());
}
