//! The docker backend against the real dockerd: skipped (with the reason
//! printed) when there is no Docker socket. Each test has its own prefix.
#![cfg(feature = "docker")]

#[path = "docker_common.rs"]
mod common;

use common::{machine, request, require_docker, BOOKWORM, BUSYBOX, BUSYBOX_MAKE};
use futures_util::TryStreamExt;
use std::time::Duration;
use tango_core::vmms::{RunStatus, Vmms, VmmsError};
use tango_vmms::docker::{container_name, Docker};

const TRIVIAL_MAKEFILE: &str = "all:\n\t@echo hello from $$(id -u) in $$(pwd)\n\t@ls\n";

#[tokio::test]
async fn lifecycle_of_a_trivial_job_with_reuse() {
    require_docker!();
    let work = tempfile::tempdir().unwrap();
    let docker = common::backend(work.path()).await;
    assert_eq!(docker.name(), "docker");
    let prefix = common::prefix("life");
    common::clean(&docker, &prefix).await;
    let vm = machine(&prefix, 1, BOOKWORM);

    let (outcome, output) = common::run_once(
        &docker,
        &vm,
        work.path(),
        &[
            ("Makefile", TRIVIAL_MAKEFILE),
            ("secret.txt", "first job\n"),
        ],
        &request(11, 20),
    )
    .await;
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert_eq!(outcome.exit_code, Some(0));
    assert!(
        output.starts_with("Autodriver: Job exited with status 0\n"),
        "{output}"
    );
    // The test image has no autograde user: the numeric fallback runs it,
    // in <home>/autolab as under Tango.
    assert!(
        output.contains("hello from 1000 in /home/autograde/autolab"),
        "{output}"
    );
    assert!(output.contains("secret.txt"), "{output}");
    let summary = outcome.summary.expect("the autodriver's summary");
    assert_eq!(summary["exit_status"], 0, "{summary}");
    assert!(outcome.notes.is_empty(), "{:?}", outcome.notes);
    let partial = docker.partial_output(&vm, 1 << 20).await.unwrap();
    assert!(
        String::from_utf8_lossy(&partial).contains("hello from"),
        "partial output: {partial:?}"
    );

    // Reuse: the next job sees nothing of the first one.
    docker.reset_vm(&vm).await.unwrap();
    let second =
        "all:\n\t@ls -a; cat /home/autograde/autolab/secret.txt || echo no-leftover\n\t@exit 3\n";
    docker
        .copy_in(&vm, &common::inputs(work.path(), &[("Makefile", second)]))
        .await
        .unwrap();
    // Nothing of the first job's output shows before the second runs.
    assert!(docker
        .partial_output(&vm, 1 << 20)
        .await
        .unwrap()
        .is_empty());
    let outcome = docker.run_job(&vm, &request(12, 20)).await.unwrap();
    let dest = work.path().join("second");
    docker.copy_out(&vm, &dest).await.unwrap();
    let output = std::fs::read_to_string(&dest).unwrap();
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert!(
        output.starts_with("Autodriver: Job exited with status 2\n"),
        "{output}"
    );
    assert!(output.contains("no-leftover"), "{output}");
    let summary = outcome.summary.expect("the second job's summary");
    assert_eq!(summary["exit_status"], 2, "{summary}");
    assert!(!output.contains("first job"), "{output}");

    // run_job needs a fresh copy_in.
    assert!(docker.run_job(&vm, &request(13, 20)).await.is_err());

    docker.safe_destroy_vm(&vm).await.unwrap();
    assert!(!docker.exists_vm(&vm).await.unwrap());
    assert!(docker.get_vms(&prefix).await.unwrap().is_empty());
    // Destroying again is not an error.
    docker.destroy_vm(&vm).await.unwrap();
}

#[tokio::test]
async fn container_is_confined() {
    require_docker!();
    let (_work, docker, prefix) = common::fresh_backend("conf").await;
    let mut vm = machine(&prefix, 1, BOOKWORM);
    vm.cores = Some(1);
    vm.memory_mb = Some(200);
    docker.initialize_vm(&vm).await.unwrap();
    let inspect = docker
        .api()
        .inspect_container(&container_name(&vm), None)
        .await
        .unwrap();
    let host = inspect.host_config.unwrap();
    assert_eq!(host.memory, Some(200 << 20));
    assert_eq!(host.memory_swap, Some(200 << 20));
    assert_eq!(host.nano_cpus, Some(1_000_000_000));
    assert_eq!(host.pids_limit, Some(256));
    assert_eq!(host.network_mode.as_deref(), Some("none"));
    assert_eq!(
        host.cgroupns_mode,
        Some(bollard::models::HostConfigCgroupnsModeEnum::PRIVATE)
    );
    assert_eq!(host.cap_drop, Some(vec!["ALL".to_string()]));
    assert!(host
        .security_opt
        .unwrap_or_default()
        .iter()
        .any(|o| o.starts_with("no-new-privileges")));
    assert!(host.binds.unwrap_or_default().is_empty());
    assert!(host.mounts.unwrap_or_default().is_empty());
    let labels = inspect.config.unwrap().labels.unwrap();
    assert_eq!(labels["tango.prefix"], prefix);
    assert_eq!(labels["tango.vm_id"], "1");
    assert_eq!(labels["tango.image"], BOOKWORM);
    docker.safe_destroy_vm(&vm).await.unwrap();
}

#[tokio::test]
async fn memory_hog_gets_the_oom_note() {
    require_docker!();
    let (work, docker, prefix) = common::fresh_backend("oom").await;
    let mut vm = machine(&prefix, 1, BOOKWORM);
    vm.memory_mb = Some(64);
    let hog = "all:\n\tpython3 -c 'exec(\"a = []\\nwhile True: a.append(bytearray(16 << 20))\")'\n";
    let (outcome, output) = common::run_once(
        &docker,
        &vm,
        work.path(),
        &[("Makefile", hog)],
        &request(21, 60),
    )
    .await;
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert!(
        outcome
            .notes
            .iter()
            .any(|n| n == "The job was killed: it exceeded its memory limit of 64 MiB"),
        "notes {:?}, output {output}",
        outcome.notes
    );
    assert!(!output.contains("status 0\n"), "{output}");
    let killed_by = outcome.summary.as_ref().map(|s| s["killed_by"].clone());
    assert_eq!(killed_by, Some("oom".into()), "{output}");
    // The container survives, and the next job there gets no such note.
    docker.reset_vm(&vm).await.unwrap();
    let files = common::inputs(work.path(), &[("Makefile", TRIVIAL_MAKEFILE)]);
    docker.copy_in(&vm, &files).await.unwrap();
    let next = docker.run_job(&vm, &request(23, 20)).await.unwrap();
    assert_eq!(next.status, RunStatus::Completed);
    assert!(next.notes.is_empty(), "{:?}", next.notes);
    docker.safe_destroy_vm(&vm).await.unwrap();

    // Without the autodriver's summary, Docker's own OOM record is enough.
    let mut config = common::config(work.path());
    config.read_summary = false;
    let docker = Docker::connect(config).await.unwrap();
    let mut vm = machine(&prefix, 2, BOOKWORM);
    vm.memory_mb = Some(64);
    let (outcome, output) = common::run_once(
        &docker,
        &vm,
        work.path(),
        &[("Makefile", hog)],
        &request(22, 60),
    )
    .await;
    assert!(outcome.summary.is_none());
    assert!(
        outcome
            .notes
            .iter()
            .any(|n| n.contains("memory limit of 64 MiB")),
        "notes {:?}, output {output}",
        outcome.notes
    );
    docker.safe_destroy_vm(&vm).await.unwrap();
}

/// Network interfaces a job sees, as the job prints them.
const NET_PROBE: &str = "all:\n\t@python3 -c 'import socket; print(\"IFACES\", sorted(n for _, n in socket.if_nameindex()))'\n";

#[tokio::test]
async fn no_network_unless_allowed() {
    require_docker!();
    let (work, docker, prefix) = common::fresh_backend("net").await;
    let mut req = request(31, 20);
    req.disable_network = false;
    let vm = machine(&prefix, 1, BOOKWORM);
    let (outcome, output) =
        common::run_once(&docker, &vm, work.path(), &[("Makefile", NET_PROBE)], &req).await;
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert!(output.contains("IFACES ['lo']"), "{output}");
    docker.safe_destroy_vm(&vm).await.unwrap();

    // With networking allowed, a job gets the bridge unless it disables it.
    let mut config = common::config(work.path());
    config.allow_network = true;
    let networked = Docker::connect(config).await.unwrap();
    let vm = machine(&prefix, 2, BOOKWORM);
    let (_, output) = common::run_once(
        &networked,
        &vm,
        work.path(),
        &[("Makefile", NET_PROBE)],
        &req,
    )
    .await;
    assert!(output.contains("'eth0'"), "{output}");
    req.disable_network = true;
    networked
        .copy_in(
            &vm,
            &common::inputs(work.path(), &[("Makefile", NET_PROBE)]),
        )
        .await
        .unwrap();
    networked.run_job(&vm, &req).await.unwrap();
    let dest = work.path().join("disabled");
    networked.copy_out(&vm, &dest).await.unwrap();
    let output = std::fs::read_to_string(&dest).unwrap();
    assert!(output.contains("IFACES ['lo']"), "{output}");
    // And the next job that wants it gets it back.
    req.disable_network = false;
    networked
        .copy_in(
            &vm,
            &common::inputs(work.path(), &[("Makefile", NET_PROBE)]),
        )
        .await
        .unwrap();
    networked.run_job(&vm, &req).await.unwrap();
    networked.copy_out(&vm, &dest).await.unwrap();
    let output = std::fs::read_to_string(&dest).unwrap();
    assert!(output.contains("IFACES ['eth"), "{output}");
    networked.safe_destroy_vm(&vm).await.unwrap();
}

#[tokio::test]
async fn minimal_image_without_make_or_users() {
    require_docker!();
    let (work, docker, prefix) = common::fresh_backend("bbox").await;
    let vm = machine(&prefix, 1, BUSYBOX);
    let (outcome, output) = common::run_once(
        &docker,
        &vm,
        work.path(),
        &[("Makefile", TRIVIAL_MAKEFILE)],
        &request(41, 20),
    )
    .await;
    // The job cannot run, and says why; the container is otherwise fine.
    assert_eq!(outcome.status, RunStatus::OsError, "{output}");
    assert!(output.contains("make not found"), "{output}");
    docker.reset_vm(&vm).await.unwrap();
    docker.safe_destroy_vm(&vm).await.unwrap();
}

/// A real job in a minimal image through the backend: busybox and the
/// stand-in make, no users. It prints, floods past the output cap, starts a
/// detached daemon and leaves files in /tmp and the home; the next job in
/// the reused container must find none of them.
#[tokio::test]
async fn busybox_image_runs_a_job_and_the_next_sees_nothing_of_it() {
    require_docker!();
    let (work, docker, prefix) = common::fresh_backend("bbjob").await;
    let image = busybox_with_make(&docker).await;
    let vm = machine(&prefix, 1, &image);
    let first = "all:\n\
        \t@echo hello from $$(id -u) in $$(pwd)\n\
        \t@setsid sh -c 'echo up > /tmp/daemon-up; exec sleep 1000' > /dev/null 2>&1 &\n\
        \t@while [ ! -e /tmp/daemon-up ]; do sleep 0.05; done\n\
        \t@echo litter > /tmp/litter; echo litter > $$HOME/litter\n\
        \t@yes flood | head -c 1200000\n\
        \t@echo done\n";
    let (outcome, output) = common::run_once(
        &docker,
        &vm,
        work.path(),
        &[("Makefile", first)],
        &request(43, 30),
    )
    .await;
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert_eq!(outcome.exit_code, Some(0));
    let head =
        "Autodriver: Job exited with status 0\nhello from 1000 in /home/autograde/autolab\nflood\n";
    assert!(
        output.starts_with(head),
        "{}",
        &output[..output.len().min(300)]
    );
    assert!(
        output.ends_with("flood\nflood\ndone\n"),
        "{}",
        &output[output.len().saturating_sub(300)..]
    );
    assert_eq!(output.matches("\n...[excess bytes elided]...\n").count(), 1);
    let summary = outcome.summary.expect("the autodriver's summary");
    assert_eq!(summary["exit_status"], 0, "{summary}");
    let printed = "hello from 1000 in /home/autograde/autolab\n".len() + 1_200_000 + "done\n".len();
    assert_eq!(summary["output_bytes_total"], printed as u64, "{summary}");
    assert_eq!(summary["output_bytes_kept"], 512 * 1024, "{summary}");
    // The daemon is gone once the job is over, not only when the next starts.
    let top = docker
        .api()
        .top_processes(&container_name(&vm), None)
        .await
        .unwrap();
    let commands: Vec<String> = top
        .processes
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.join(" "))
        .collect();
    assert!(
        !commands.iter().any(|c| c.contains("sleep 1000")),
        "{commands:?}"
    );

    docker.reset_vm(&vm).await.unwrap();
    let second = "all:\n\
        \t@ls -A /tmp $$HOME\n\
        \t@if ps -o args | grep -q '^sleep 100[0]'; then echo daemon-alive; else echo no-daemon; fi\n";
    docker
        .copy_in(&vm, &common::inputs(work.path(), &[("Makefile", second)]))
        .await
        .unwrap();
    let outcome = docker.run_job(&vm, &request(44, 30)).await.unwrap();
    let dest = work.path().join("second");
    docker.copy_out(&vm, &dest).await.unwrap();
    let output = std::fs::read_to_string(&dest).unwrap();
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert_eq!(
        output,
        "Autodriver: Job exited with status 0\n/home/autograde:\nautolab\n\n/tmp:\nno-daemon\n"
    );
    docker.safe_destroy_vm(&vm).await.unwrap();
}

#[tokio::test]
async fn get_vms_finds_exactly_the_prefix() {
    require_docker!();
    let work = tempfile::tempdir().unwrap();
    let docker = common::backend(work.path()).await;
    let prefix = common::prefix("list");
    let longer = format!("{prefix}-x");
    common::clean(&docker, &prefix).await;
    common::clean(&docker, &longer).await;
    let mut a = machine(&prefix, 3, BOOKWORM);
    a.memory_mb = Some(256);
    a.cores = Some(1);
    // An image name Docker would not accept as a container name as is.
    let b = machine(&prefix, 4, &format!("{BUSYBOX}:latest"));
    let other = machine(&longer, 3, BOOKWORM);
    for vm in [&a, &b, &other] {
        docker.initialize_vm(vm).await.unwrap();
    }
    assert!(container_name(&b).ends_with("tango-test-busybox_latest"));
    let found = docker.get_vms(&prefix).await.unwrap();
    assert_eq!(found, vec![a.clone(), b.clone()]);
    assert_eq!(docker.get_vms(&longer).await.unwrap(), vec![other.clone()]);
    assert!(docker.exists_vm(&b).await.unwrap());
    // Creating a VM that exists starts it afresh: a new, running container.
    let id_of = |inspect: bollard::models::ContainerInspectResponse| inspect.id.unwrap();
    let api = docker.api();
    let before = id_of(
        api.inspect_container(&container_name(&a), None)
            .await
            .unwrap(),
    );
    docker.initialize_vm(&a).await.unwrap();
    let after = id_of(
        api.inspect_container(&container_name(&a), None)
            .await
            .unwrap(),
    );
    assert_ne!(before, after);
    docker.wait_vm(&a, Duration::from_secs(10)).await.unwrap();
    assert_eq!(docker.get_vms(&prefix).await.unwrap().len(), 2);
    for vm in [&a, &b, &other] {
        docker.safe_destroy_vm(vm).await.unwrap();
    }
    assert!(docker.get_vms(&prefix).await.unwrap().is_empty());
    assert!(docker.get_vms(&longer).await.unwrap().is_empty());
}

#[tokio::test]
async fn unknown_image_and_vm_errors() {
    require_docker!();
    let work = tempfile::tempdir().unwrap();
    let docker = common::backend(work.path()).await;
    let prefix = common::prefix("err");
    let vm = machine(&prefix, 1, "tango-no-such-image");
    match docker.initialize_vm(&vm).await {
        Err(VmmsError::NoSuchImage(image)) => assert_eq!(image, "tango-no-such-image"),
        other => panic!("expected NoSuchImage, got {other:?}"),
    }
    assert!(!docker.exists_vm(&vm).await.unwrap());
    let ghost = machine(&prefix, 2, BOOKWORM);
    match docker.copy_in(&ghost, &[]).await {
        Err(VmmsError::NoSuchVm(_)) => {}
        other => panic!("expected NoSuchVm, got {other:?}"),
    }
    match docker.partial_output(&ghost, 100).await {
        Err(VmmsError::NoSuchVm(_)) => {}
        other => panic!("expected NoSuchVm, got {other:?}"),
    }
    assert!(docker.get_vms(&prefix).await.unwrap().is_empty());
}

/// A variant of the busybox image with one more file: a new image ID.
async fn busybox_variant(docker: &Docker, marker: &str) -> String {
    busybox_with(docker, &[("marker", marker, 0o644)], None).await
}

/// The busybox image with `files` (path, contents, mode) added, committed
/// as (repository, tag) if given; returns the new image's ID.
async fn busybox_with(
    docker: &Docker,
    files: &[(&str, &str, u32)],
    name: Option<(&str, &str)>,
) -> String {
    let api = docker.api();
    let body = bollard::models::ContainerCreateBody {
        image: Some(format!("{BUSYBOX}:latest")),
        cmd: Some(vec!["true".into()]),
        ..Default::default()
    };
    let scratch = api
        .create_container(
            None::<bollard::query_parameters::CreateContainerOptions>,
            body,
        )
        .await
        .unwrap()
        .id;
    let mut tar = tar::Builder::new(Vec::new());
    for (path, contents, mode) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(contents.len() as u64);
        header.set_mode(*mode);
        tar.append_data(&mut header, path, contents.as_bytes())
            .unwrap();
    }
    let options = bollard::query_parameters::UploadToContainerOptionsBuilder::default()
        .path("/")
        .build();
    api.upload_to_container(
        &scratch,
        Some(options),
        bollard::body_full(tar.into_inner().unwrap().into()),
    )
    .await
    .unwrap();
    let mut options =
        bollard::query_parameters::CommitContainerOptionsBuilder::default().container(&scratch);
    if let Some((repo, tag)) = name {
        options = options.repo(repo).tag(tag);
    }
    let image = api
        .commit_container(options.build(), bollard::models::ContainerConfig::default())
        .await
        .unwrap()
        .id;
    api.remove_container(
        &scratch,
        None::<bollard::query_parameters::RemoveContainerOptions>,
    )
    .await
    .unwrap();
    image
}

/// The busybox image with [`BUSYBOX_MAKE`] as `/bin/make`, made once per
/// version of the script (tagged with its FNV-1a hash, so reruns neither
/// commit new images nor make the backend derive new ones).
async fn busybox_with_make(docker: &Docker) -> String {
    const REPO: &str = "tango-test-busybox-make";
    let hash = BUSYBOX_MAKE
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let tag = format!("{hash:016x}");
    let name = format!("{REPO}:{tag}");
    if docker.api().inspect_image(&name).await.is_err() {
        busybox_with(
            docker,
            &[("bin/make", BUSYBOX_MAKE, 0o755)],
            Some((REPO, &tag)),
        )
        .await;
    }
    name
}

/// `docker save` of `image`, through the API, into `path`.
async fn save(docker: &Docker, image: &str, path: &std::path::Path) {
    let saved: Vec<u8> = docker
        .api()
        .export_image(image)
        .try_fold(Vec::new(), |mut all, chunk| async move {
            all.extend_from_slice(&chunk);
            Ok(all)
        })
        .await
        .unwrap();
    std::fs::write(path, saved).unwrap();
}

#[tokio::test]
async fn build_image_from_docker_save() {
    require_docker!();
    let work = tempfile::tempdir().unwrap();
    let docker = common::backend(work.path()).await;
    let name = "tango-test-loaded";
    let prefix = common::prefix("built");
    common::clean(&docker, &prefix).await;
    let first = busybox_variant(&docker, "first").await;
    let second = busybox_variant(&docker, "second").await;
    let first_tar = work.path().join("first.tar");
    let second_tar = work.path().join("second.tar");
    save(&docker, &first, &first_tar).await;
    save(&docker, &second, &second_tar).await;
    let id_of = |id: &str| {
        id.trim_start_matches("sha256:")
            .chars()
            .take(16)
            .collect::<String>()
    };

    docker.build_image(name, &first_tar).await.unwrap();
    let images = docker.get_images().await.unwrap();
    assert!(images.contains(&name.to_string()), "{images:?}");
    assert!(images.contains(&BOOKWORM.to_string()), "{images:?}");
    assert!(
        !images.iter().any(|i| i.starts_with("tango-autodriver")),
        "{images:?}"
    );

    // The loaded image runs VMs (through an image with the autodriver added).
    let vm = machine(&prefix, 1, name);
    let run = |vm: tango_core::model::Machine| {
        let docker = &docker;
        async move {
            docker.initialize_vm(&vm).await.unwrap();
            docker.wait_vm(&vm, Duration::from_secs(10)).await.unwrap();
            docker.safe_destroy_vm(&vm).await.unwrap();
        }
    };
    run(vm.clone()).await;
    let derived = |api: bollard::Docker, id: String| async move {
        let images = api
            .list_images(None::<bollard::query_parameters::ListImagesOptions>)
            .await
            .unwrap();
        images
            .into_iter()
            .flat_map(|i| i.repo_tags)
            .filter(|t| t.starts_with(&format!("tango-autodriver:{id}-")))
            .count()
    };
    assert_eq!(derived(docker.api().clone(), id_of(&first)).await, 1);

    // Rebuilding the name replaces it, and the old image's derived image
    // goes (nothing uses it).
    docker.build_image(name, &second_tar).await.unwrap();
    run(vm.clone()).await;
    assert_eq!(derived(docker.api().clone(), id_of(&first)).await, 0);
    assert_eq!(derived(docker.api().clone(), id_of(&second)).await, 1);
    // Rebuilding with the same image keeps its derived image.
    docker.build_image(name, &second_tar).await.unwrap();
    assert_eq!(derived(docker.api().clone(), id_of(&second)).await, 1);

    // Garbage is refused.
    let junk = work.path().join("junk.tar");
    std::fs::write(&junk, b"not a tar").unwrap();
    assert!(docker.build_image("tango-test-junk", &junk).await.is_err());

    let api = docker.api();
    for image in [format!("tango-autodriver:{}-", id_of(&second))] {
        let tags: Vec<String> = api
            .list_images(None::<bollard::query_parameters::ListImagesOptions>)
            .await
            .unwrap()
            .into_iter()
            .flat_map(|i| i.repo_tags)
            .filter(|t| t.starts_with(&image))
            .collect();
        for tag in tags {
            let _ = api
                .remove_image(
                    &tag,
                    None::<bollard::query_parameters::RemoveImageOptions>,
                    None,
                )
                .await;
        }
    }
    for image in [format!("{name}:latest"), first, second] {
        let _ = api
            .remove_image(
                &image,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await;
    }
}

/// Timings of the backend's steps (not a pass/fail test): run with
/// `cargo test -p tango-vmms --test docker -- --ignored --nocapture timings`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn timings() {
    require_docker!();
    let work = tempfile::tempdir().unwrap();
    common::ensure_test_images();
    let mut config = common::config(work.path());
    // As tangod runs it; TIMING_SUMMARY=1 reads the autodriver's summary.
    config.read_summary = std::env::var_os("TIMING_SUMMARY").is_some();
    let docker = Docker::connect(config).await.unwrap();
    let prefix = common::prefix("timing");
    common::clean(&docker, &prefix).await;
    let runs: u64 = std::env::var("TIMING_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let files = common::inputs(work.path(), &[("Makefile", "all:\n\t@true\n")]);
    let (mut create, mut job, mut destroy) = (Vec::new(), Vec::new(), Vec::new());
    let (mut copy_in, mut run) = (Vec::new(), Vec::new());
    for id in 1..=runs {
        let vm = machine(&prefix, id, BOOKWORM);
        let t = std::time::Instant::now();
        docker.initialize_vm(&vm).await.unwrap();
        docker.wait_vm(&vm, Duration::from_secs(10)).await.unwrap();
        create.push(t.elapsed());
        // Two jobs per container: the second is the reuse case.
        for _ in 0..2 {
            let t = std::time::Instant::now();
            docker.copy_in(&vm, &files).await.unwrap();
            copy_in.push(t.elapsed());
            let t_run = std::time::Instant::now();
            let outcome = docker.run_job(&vm, &request(id, 20)).await.unwrap();
            run.push(t_run.elapsed());
            docker
                .copy_out(&vm, &work.path().join("out"))
                .await
                .unwrap();
            docker.reset_vm(&vm).await.unwrap();
            job.push(t.elapsed());
            assert_eq!(outcome.status, RunStatus::Completed);
        }
        let t = std::time::Instant::now();
        docker.destroy_vm(&vm).await.unwrap();
        destroy.push(t.elapsed());
    }
    let p50 = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    println!(
        "docker backend, {runs} containers: p50 initialize+wait {:?}, p50 job (copy_in+run_job+copy_out+reset) {:?} (copy_in {:?}, run_job {:?}), p50 destroy {:?}",
        p50(&mut create),
        p50(&mut job),
        p50(&mut copy_in),
        p50(&mut run),
        p50(&mut destroy)
    );

    // Throughput at concurrency 8: reused containers (the job path only),
    // then a fresh container per job (create, job, remove).
    let docker = std::sync::Arc::new(docker);
    let files = std::sync::Arc::new(files);
    for reuse in [true, false] {
        let jobs_per_worker = runs.div_ceil(8).max(2);
        let started = std::time::Instant::now();
        let mut workers = Vec::new();
        for worker in 0..8u64 {
            let (docker, files, prefix) = (docker.clone(), files.clone(), prefix.clone());
            workers.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let base = 1000 + worker * 1000;
                let warm = machine(&prefix, base, BOOKWORM);
                if reuse {
                    docker.initialize_vm(&warm).await.unwrap();
                }
                for n in 0..jobs_per_worker {
                    let vm = if reuse {
                        warm.clone()
                    } else {
                        machine(&prefix, base + 1 + n, BOOKWORM)
                    };
                    let t = std::time::Instant::now();
                    if !reuse {
                        docker.initialize_vm(&vm).await.unwrap();
                    }
                    docker.copy_in(&vm, &files).await.unwrap();
                    let outcome = docker.run_job(&vm, &request(n, 20)).await.unwrap();
                    assert_eq!(outcome.status, RunStatus::Completed);
                    if reuse {
                        docker.reset_vm(&vm).await.unwrap();
                    } else {
                        docker.destroy_vm(&vm).await.unwrap();
                    }
                    latencies.push(t.elapsed());
                }
                if reuse {
                    docker.destroy_vm(&warm).await.unwrap();
                }
                latencies
            }));
        }
        let mut latencies = Vec::new();
        for worker in workers {
            latencies.extend(worker.await.unwrap());
        }
        let elapsed = started.elapsed();
        println!(
            "concurrency 8, {}: {} jobs, p50 {:?}, throughput {:.2} jobs/s",
            if reuse {
                "reused containers"
            } else {
                "fresh container per job"
            },
            latencies.len(),
            p50(&mut latencies),
            latencies.len() as f64 / elapsed.as_secs_f64()
        );
    }
    assert!(docker.get_vms(&prefix).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_and_bad_inputs() {
    require_docker!();
    let (work, docker, prefix) = common::fresh_backend("inputs").await;
    let vm = machine(&prefix, 1, BOOKWORM);
    docker.initialize_vm(&vm).await.unwrap();

    // A missing input file or a name with a slash fails copy_in cleanly.
    let mut missing = common::inputs(work.path(), &[("Makefile", "all:\n")]);
    missing[0].path = work.path().join("does-not-exist");
    assert!(docker.copy_in(&vm, &missing).await.is_err());
    let mut slash = common::inputs(work.path(), &[("Makefile", "all:\n")]);
    slash[0].dest_file = "../Makefile".into();
    assert!(docker.copy_in(&vm, &slash).await.is_err());

    // 40 MiB goes in streamed, intact, with the execute bit kept.
    let big = work.path().join("big.bin");
    let pattern: Vec<u8> = (0..=255u8).cycle().take(40 << 20).collect();
    std::fs::write(&big, &pattern).unwrap();
    let script = work.path().join("run.sh");
    std::fs::write(&script, "#!/bin/sh\necho script ran\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut files = common::inputs(
        work.path(),
        &[("Makefile", "all:\n\t@md5sum big.bin\n\t@./run.sh\n")],
    );
    for (name, path) in [("big.bin", &big), ("run.sh", &script)] {
        files.push(tango_core::model::InputFile {
            local_file: name.into(),
            dest_file: name.into(),
            path: path.clone(),
            md5: String::new(),
        });
    }
    docker.copy_in(&vm, &files).await.unwrap();
    let outcome = docker.run_job(&vm, &request(61, 60)).await.unwrap();
    let dest = work.path().join("out");
    docker.copy_out(&vm, &dest).await.unwrap();
    let output = std::fs::read_to_string(&dest).unwrap();
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    let md5 = std::process::Command::new("md5sum")
        .arg(&big)
        .output()
        .unwrap();
    let expected = String::from_utf8_lossy(&md5.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert!(output.contains(&format!("{expected}  big.bin")), "{output}");
    assert!(output.contains("script ran"), "{output}");

    // Below the in-memory bound the files go through the exec's stdin
    // (--input-tar): 7 MiB intact, execute bit kept; a name too long for a
    // plain tar header is uploaded instead; both reach the same directory.
    docker.reset_vm(&vm).await.unwrap();
    let medium = work.path().join("medium.bin");
    std::fs::write(&medium, &pattern[..7 << 20]).unwrap();
    let long_name = "n".repeat(120);
    let long = work.path().join("long");
    std::fs::write(&long, "long name\n").unwrap();
    for (names, marker) in [
        (vec!["medium.bin", "run.sh"], "medium"),
        (vec!["medium.bin", "run.sh", long_name.as_str()], "long"),
    ] {
        let makefile =
            format!("all:\n\t@md5sum medium.bin\n\t@./run.sh\n\t@echo {marker}; cat n* || true\n");
        let mut files = common::inputs(work.path(), &[("Makefile", makefile.as_str())]);
        for name in names {
            let path = match name {
                "medium.bin" => medium.clone(),
                "run.sh" => script.clone(),
                _ => long.clone(),
            };
            files.push(tango_core::model::InputFile {
                local_file: name.into(),
                dest_file: name.into(),
                path,
                md5: String::new(),
            });
        }
        docker.copy_in(&vm, &files).await.unwrap();
        let outcome = docker.run_job(&vm, &request(62, 60)).await.unwrap();
        docker.copy_out(&vm, &dest).await.unwrap();
        let output = std::fs::read_to_string(&dest).unwrap();
        assert_eq!(outcome.status, RunStatus::Completed, "{output}");
        let md5 = std::process::Command::new("md5sum")
            .arg(&medium)
            .output()
            .unwrap();
        let expected = String::from_utf8_lossy(&md5.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        assert!(
            output.contains(&format!("{expected}  medium.bin")),
            "{output}"
        );
        assert!(output.contains("script ran"), "{output}");
        assert!(output.contains(marker), "{output}");
        assert_eq!(output.contains("long name"), marker == "long", "{output}");
        docker.reset_vm(&vm).await.unwrap();
    }
    docker.safe_destroy_vm(&vm).await.unwrap();
}

#[tokio::test]
async fn tango_style_image_runs_jobs_as_autograde() {
    require_docker!();
    let (work, docker, prefix) = common::fresh_backend("tango").await;
    let vm = machine(&prefix, 1, common::AUTOGRADE);
    let (outcome, output) = common::run_once(
        &docker,
        &vm,
        work.path(),
        &[(
            "Makefile",
            "all:\n\t@echo $$(id -un) $$(id -u) in $$(pwd)\n",
        )],
        &request(71, 20),
    )
    .await;
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert!(
        output.contains("autograde 1001 in /home/autograde/autolab"),
        "{output}"
    );
    docker.safe_destroy_vm(&vm).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_note_is_per_container() {
    require_docker!();
    let work = tempfile::tempdir().unwrap();
    let docker = std::sync::Arc::new(common::backend(work.path()).await);
    // The hog's container name starts with the quiet one's name.
    let quiet_prefix = common::prefix("oomq");
    let quiet = machine(&quiet_prefix, 1, BOOKWORM);
    let hog_prefix = container_name(&quiet);
    common::clean(&docker, &quiet_prefix).await;
    common::clean(&docker, &hog_prefix).await;
    let mut hog = machine(&hog_prefix, 2, BOOKWORM);
    hog.memory_mb = Some(64);
    assert!(container_name(&hog).starts_with(&container_name(&quiet)));
    for vm in [&quiet, &hog] {
        docker.initialize_vm(vm).await.unwrap();
    }
    let quiet_files = common::inputs(work.path(), &[("Makefile", "all:\n\t@sleep 3\n")]);
    docker.copy_in(&quiet, &quiet_files).await.unwrap();
    let quiet_run = {
        let (docker, quiet) = (docker.clone(), quiet.clone());
        tokio::spawn(async move { docker.run_job(&quiet, &request(81, 20)).await })
    };
    let hog_dir = work.path().join("hog");
    std::fs::create_dir(&hog_dir).unwrap();
    let hog_make =
        "all:\n\tpython3 -c 'exec(\"a = []\\nwhile True: a.append(bytearray(16 << 20))\")'\n";
    docker
        .copy_in(&hog, &common::inputs(&hog_dir, &[("Makefile", hog_make)]))
        .await
        .unwrap();
    let hog_outcome = docker.run_job(&hog, &request(82, 20)).await.unwrap();
    assert!(!hog_outcome.notes.is_empty());
    let quiet_outcome = quiet_run.await.unwrap().unwrap();
    assert_eq!(quiet_outcome.status, RunStatus::Completed);
    assert!(quiet_outcome.notes.is_empty(), "{:?}", quiet_outcome.notes);
    // The autodriver, too, sees only its own container's OOM kills.
    let summary = quiet_outcome.summary.expect("summary");
    assert_eq!(summary["killed_by"], serde_json::Value::Null, "{summary}");
    for vm in [&quiet, &hog] {
        docker.safe_destroy_vm(vm).await.unwrap();
    }
}

#[tokio::test]
async fn stale_derived_images_are_removed() {
    require_docker!();
    let (_work, docker, prefix) = common::fresh_backend("stale").await;
    // A derived image of this autodriver, in use by a VM.
    let vm = machine(&prefix, 1, BUSYBOX);
    docker.initialize_vm(&vm).await.unwrap();
    // One "made by another autodriver build": a tag on the busybox image.
    let api = docker.api();
    let stale_tag = "0000000000000000-ffffffffffffffff";
    let options = bollard::query_parameters::TagImageOptionsBuilder::default()
        .repo(tango_vmms::docker::DERIVED_REPO)
        .tag(stale_tag)
        .build();
    api.tag_image(&format!("{BUSYBOX}:latest"), Some(options))
        .await
        .unwrap();
    let stale = format!("{}:{stale_tag}", tango_vmms::docker::DERIVED_REPO);
    assert!(api.inspect_image(&stale).await.is_ok());
    assert!(docker.remove_stale_derived_images().await.unwrap() >= 1);
    assert!(api.inspect_image(&stale).await.is_err());
    // The current one stays, and VMs keep working.
    let image = api
        .inspect_container(&container_name(&vm), None)
        .await
        .unwrap()
        .config
        .unwrap()
        .image
        .unwrap();
    assert!(api.inspect_image(&image).await.is_ok(), "{image}");
    docker.safe_destroy_vm(&vm).await.unwrap();
    docker.initialize_vm(&vm).await.unwrap();
    docker.wait_vm(&vm, Duration::from_secs(10)).await.unwrap();
    docker.safe_destroy_vm(&vm).await.unwrap();
}

/// Every container's grading user has the same host uid, so a per-uid
/// process limit would let one job's processes stop another container's
/// job from forking. Each container is bounded by its own pids cgroup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_containers_processes_do_not_count_against_another() {
    require_docker!();
    let (work, docker, prefix) = common::fresh_backend("nproc").await;
    let docker = std::sync::Arc::new(docker);
    let busy = machine(&prefix, 1, BOOKWORM);
    let forker = machine(&prefix, 2, BOOKWORM);
    for vm in [&busy, &forker] {
        docker.initialize_vm(vm).await.unwrap();
    }
    let busy_dir = work.path().join("busy");
    let forker_dir = work.path().join("forker");
    std::fs::create_dir(&busy_dir).unwrap();
    std::fs::create_dir(&forker_dir).unwrap();
    // 40 sleepers stay alive while the other job runs; they are announced
    // on a file the test waits for.
    let busy_make = "all:\n\t@for i in $$(seq 40); do sleep 8 & done; wait\n";
    docker
        .copy_in(
            &busy,
            &common::inputs(&busy_dir, &[("Makefile", busy_make)]),
        )
        .await
        .unwrap();
    let busy_run = {
        let (docker, busy) = (docker.clone(), busy.clone());
        tokio::spawn(async move { docker.run_job(&busy, &request(91, 30)).await })
    };
    // Wait until the sleepers run (the busy job's partial output is empty,
    // so look at the container's processes instead).
    let started = std::time::Instant::now();
    loop {
        let ps = std::process::Command::new("docker")
            .args([
                "exec",
                &container_name(&busy),
                "sh",
                "-c",
                "ps -e | grep -c sleep",
            ])
            .output()
            .unwrap();
        let count: u32 = String::from_utf8_lossy(&ps.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        if count >= 40 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "sleepers never started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let forker_make = "all:\n\t@for i in $$(seq 10); do sleep 1 & done; wait; echo forked all\n";
    docker
        .copy_in(
            &forker,
            &common::inputs(&forker_dir, &[("Makefile", forker_make)]),
        )
        .await
        .unwrap();
    let mut req = request(92, 30);
    req.max_procs = 30;
    let outcome = docker.run_job(&forker, &req).await.unwrap();
    let dest = forker_dir.join("output");
    docker.copy_out(&forker, &dest).await.unwrap();
    let output = std::fs::read_to_string(&dest).unwrap();
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert!(output.contains("forked all"), "{output}");
    assert_eq!(
        busy_run.await.unwrap().unwrap().status,
        RunStatus::Completed
    );
    for vm in [&busy, &forker] {
        docker.safe_destroy_vm(vm).await.unwrap();
    }
}

/// A reused container hands the next job nothing of the last one: not its
/// files in world-writable directories of the image (`/run/lock`) or in
/// `/dev/mqueue`, nor its System V IPC objects.
#[tokio::test]
async fn a_reused_container_keeps_no_lock_files_or_ipc_objects() {
    require_docker!();
    let (work, docker, prefix) = common::fresh_backend("leftover").await;
    let vm = machine(&prefix, 1, BOOKWORM);
    let plant = "all:\n\
                 \t@touch /run/lock/planted && mkdir /run/lock/dir && touch /run/lock/dir/inner\n\
                 \t@ipcmk -M 4096 && ipcmk -Q && ipcmk -S 1\n\
                 \t@python3 -c 'import os; os.open(\"/dev/mqueue/q\", os.O_CREAT | os.O_WRONLY, 0o600)' 2>&1 || true\n\
                 \t@ls -A /run/lock; echo planted-mq: $$(ls -A /dev/mqueue)\n";
    let (outcome, output) = common::run_once(
        &docker,
        &vm,
        work.path(),
        &[("Makefile", plant)],
        &request(21, 20),
    )
    .await;
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert!(output.contains("planted"), "{output}");
    assert!(output.contains("Shared memory id"), "{output}");
    assert!(output.contains("planted-mq: q\n"), "{output}");

    docker.reset_vm(&vm).await.unwrap();
    let look = "all:\n\
                \t@echo lock: $$(ls -A /run/lock)\n\
                \t@echo mqueue: $$(ls -A /dev/mqueue)\n\
                \t@echo ipc: $$(ipcs | grep -c 0x)\n";
    docker
        .copy_in(&vm, &common::inputs(work.path(), &[("Makefile", look)]))
        .await
        .unwrap();
    let outcome = docker.run_job(&vm, &request(22, 20)).await.unwrap();
    let dest = work.path().join("second");
    docker.copy_out(&vm, &dest).await.unwrap();
    let output = std::fs::read_to_string(&dest).unwrap();
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert!(output.contains("lock:\n"), "{output}");
    assert!(output.contains("mqueue:\n"), "{output}");
    assert!(output.contains("ipc: 0\n"), "{output}");
    docker.safe_destroy_vm(&vm).await.unwrap();
}

/// A job that has run longer than a second gets a tenth of the default CPU
/// shares (so short jobs beside it keep their latency, as in the sandbox);
/// the container's next job starts at the default again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_job_gets_lower_cpu_shares_and_the_next_job_starts_normal() {
    require_docker!();
    // Through the Engine API, as for a daemon whose cgroups are not visible
    // here (see the next test for the cgroups).
    let (work, _, prefix) = common::fresh_backend("cpuw").await;
    let mut config = common::config(work.path());
    config.host_cgroups = false;
    // And by `docker exec`, as without `serve_jobs`.
    config.serve_jobs = false;
    let docker = std::sync::Arc::new(Docker::connect(config).await.unwrap());
    let vm = machine(&prefix, 1, BOOKWORM);
    docker.initialize_vm(&vm).await.unwrap();
    docker.wait_vm(&vm, Duration::from_secs(10)).await.unwrap();
    // The job reads its own container's weight (cgroup v1, then v2).
    let weight =
        "$$(cat /sys/fs/cgroup/cpu/cpu.shares 2>/dev/null || cat /sys/fs/cgroup/cpu.weight)";
    let long = format!("all:\n\t@echo start {weight}\n\t@sleep 3\n\t@echo end {weight}\n");
    docker
        .copy_in(&vm, &common::inputs(work.path(), &[("Makefile", &long)]))
        .await
        .unwrap();
    let running = {
        let (docker, vm) = (docker.clone(), vm.clone());
        tokio::spawn(async move { docker.run_job(&vm, &request(61, 20)).await })
    };
    let name = container_name(&vm);
    let mut shares_seen = Vec::new();
    let watched = std::time::Instant::now();
    while !running.is_finished() && watched.elapsed() < Duration::from_secs(10) {
        let inspect = docker.api().inspect_container(&name, None).await.unwrap();
        shares_seen.push(inspect.host_config.and_then(|h| h.cpu_shares));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outcome = running.await.unwrap().unwrap();
    let dest = work.path().join("long");
    docker.copy_out(&vm, &dest).await.unwrap();
    let output = std::fs::read_to_string(&dest).unwrap();
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert!(
        shares_seen.contains(&Some(102)),
        "CpuShares seen while the job ran: {shares_seen:?}"
    );
    let value = |output: &str, key: &str| -> String {
        output
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key:?} line in {output:?}"))
            .trim()
            .to_string()
    };
    let (normal, lowered) = (value(&output, "start "), value(&output, "end "));
    assert_ne!(normal, lowered, "{output}");

    docker.reset_vm(&vm).await.unwrap();
    let short = format!("all:\n\t@echo start {weight}\n");
    docker
        .copy_in(&vm, &common::inputs(work.path(), &[("Makefile", &short)]))
        .await
        .unwrap();
    let outcome = docker.run_job(&vm, &request(62, 20)).await.unwrap();
    let dest = work.path().join("short");
    docker.copy_out(&vm, &dest).await.unwrap();
    let output = std::fs::read_to_string(&dest).unwrap();
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    let next = value(&output, "start ");
    assert_ne!(next, lowered, "the next job started at the lowered weight");
    if std::path::Path::new("/sys/fs/cgroup/cpu/cpu.shares").exists() {
        // cgroup v1: the default is exactly restored.
        assert_eq!(next, normal, "{output}");
    }
    docker.safe_destroy_vm(&vm).await.unwrap();
}

/// A served job whose `run_job` is cut short (the engine gave up on it)
/// does not leak its output, final or partial, into the next job of the
/// container.
#[tokio::test]
async fn a_served_job_cut_short_leaves_nothing_to_the_next() {
    require_docker!();
    let (work, docker, prefix) = common::fresh_backend("cutshort").await;
    let vm = machine(&prefix, 1, BOOKWORM);
    docker.initialize_vm(&vm).await.unwrap();
    docker.wait_vm(&vm, Duration::from_secs(10)).await.unwrap();
    let slow = "all:\n\t@echo first-begins\n\t@sleep 1\n\t@echo first-ends\n";
    docker
        .copy_in(&vm, &common::inputs(work.path(), &[("Makefile", slow)]))
        .await
        .unwrap();
    let cut = tokio::time::timeout(
        Duration::from_millis(300),
        docker.run_job(&vm, &request(65, 20)),
    )
    .await;
    assert!(cut.is_err(), "the first job was not cut short");
    docker.reset_vm(&vm).await.unwrap();
    docker
        .copy_in(
            &vm,
            &common::inputs(
                work.path(),
                &[("Makefile", "all:\n\t@echo second\n\t@sleep 0.5\n")],
            ),
        )
        .await
        .unwrap();
    // While the first job still runs (about 0.7 s more), the second one's
    // partial output must not show the first one's.
    let second = request(66, 20);
    let run = docker.run_job(&vm, &second);
    tokio::pin!(run);
    let mut partials = Vec::new();
    let outcome = loop {
        tokio::select! {
            outcome = &mut run => break outcome.unwrap(),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                let partial = docker.partial_output(&vm, 4096).await.unwrap();
                partials.push(String::from_utf8_lossy(&partial).into_owned());
            }
        }
    };
    assert!(
        !partials.iter().any(|p| p.contains("first")),
        "the second job's partial output showed the first job's: {partials:?}"
    );
    assert!(
        partials.iter().any(|p| p.contains("second")),
        "the second job's partial output never showed its own: {partials:?}"
    );
    let dest = work.path().join("second");
    docker.copy_out(&vm, &dest).await.unwrap();
    let output = std::fs::read_to_string(&dest).unwrap();
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert_eq!(
        output, "Autodriver: Job exited with status 0\nsecond\n",
        "{output:?}"
    );
    docker.safe_destroy_vm(&vm).await.unwrap();
}

/// With the containers' cgroups visible here, a job's CPU weight is set
/// there, without the daemon: ten times the default at first, the default
/// after 50 ms, a tenth of it after a second, and the default again for
/// whatever runs between jobs.
#[tokio::test]
async fn with_host_cgroups_a_jobs_cpu_weight_falls_with_its_age() {
    require_docker!();
    let (work, docker, prefix) = common::fresh_backend("cpuage").await;
    let vm = machine(&prefix, 1, BOOKWORM);
    // The job reads its own container's weight (cgroup v1, then v2).
    let (v1, v2) = ("/sys/fs/cgroup/cpu/cpu.shares", "/sys/fs/cgroup/cpu.weight");
    let weight = format!("$$(cat {v1} 2>/dev/null || cat {v2})");
    let long = format!(
        "all:\n\t@echo start {weight}\n\t@sleep 0.4\n\t@echo middle {weight}\n\t@sleep 1.2\n\t@echo end {weight}\n"
    );
    let (outcome, output) = common::run_once(
        &docker,
        &vm,
        work.path(),
        &[("Makefile", &long)],
        &request(63, 20),
    )
    .await;
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    let value = |key: &str| -> u64 {
        output
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key:?} number in {output:?}"))
    };
    let (start, middle, end) = (value("start "), value("middle "), value("end "));
    // (v1 cpu.shares / v2 cpu.weight.) The start may be read after the
    // first 50 ms on a busy machine, so it is fresh or normal.
    let (fresh, normal, background) = if std::path::Path::new(v1).exists() {
        (10240, 1024, 102)
    } else {
        (1000, 100, 10)
    };
    assert!(start == fresh || start == normal, "{output}");
    assert_eq!((middle, end), (normal, background), "{output}");
    // Docker was not asked: its record keeps the default.
    let name = container_name(&vm);
    let inspect = docker.api().inspect_container(&name, None).await.unwrap();
    let shares = inspect.host_config.and_then(|h| h.cpu_shares);
    assert!(matches!(shares, None | Some(0)), "{shares:?}");
    // Between jobs (a reset, the next copy-in) the weight is the default.
    let between = std::process::Command::new("docker")
        .args(["exec", &name, "sh", "-c"])
        .arg(format!("cat {v1} 2>/dev/null || cat {v2}"))
        .output()
        .unwrap();
    let between = String::from_utf8_lossy(&between.stdout);
    assert_eq!(between.trim(), normal.to_string());
    docker.safe_destroy_vm(&vm).await.unwrap();
}

/// With `single_use` (the engine's `reuse_vms = false`) a container makes
/// no list of the image's writable directories (its start walks no file
/// system), its job runs as usual, and a second job in it is refused.
#[tokio::test]
async fn single_use_containers_skip_the_writable_dirs_scan_and_run_one_job() {
    require_docker!();
    let work = tempfile::tempdir().unwrap();
    common::ensure_test_images();
    let mut config = common::config(work.path());
    config.single_use = true;
    let docker = Docker::connect(config).await.unwrap();
    let prefix = common::prefix("single");
    common::clean(&docker, &prefix).await;
    let vm = machine(&prefix, 1, BOOKWORM);
    let (outcome, output) = common::run_once(
        &docker,
        &vm,
        work.path(),
        &[("Makefile", TRIVIAL_MAKEFILE)],
        &request(71, 20),
    )
    .await;
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert!(output.contains("hello from 1000"), "{output}");
    let name = container_name(&vm);
    let inspect = docker.api().inspect_container(&name, None).await.unwrap();
    let entrypoint = inspect.config.unwrap().entrypoint.unwrap();
    assert!(
        !entrypoint.iter().any(|a| a == "--purge-writable"),
        "{entrypoint:?}"
    );
    let list = docker
        .api()
        .download_from_container(
            &name,
            Some(
                bollard::query_parameters::DownloadFromContainerOptionsBuilder::default()
                    .path("/.tango/writable-dirs")
                    .build(),
            ),
        )
        .try_collect::<Vec<_>>()
        .await;
    assert!(list.is_err(), "a writable-dirs list was made");

    docker
        .copy_in(
            &vm,
            &common::inputs(work.path(), &[("Makefile", TRIVIAL_MAKEFILE)]),
        )
        .await
        .unwrap();
    let second = docker.run_job(&vm, &request(72, 20)).await;
    assert!(
        matches!(&second, Err(VmmsError::Backend(m)) if m.contains("single_use")),
        "{second:?}"
    );
    docker.safe_destroy_vm(&vm).await.unwrap();
}

/// With `max_concurrent_starts = 1`, each container is created only once
/// the one before it has started (Docker's own timestamps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_starts_beyond_the_bound_wait_their_turn() {
    require_docker!();
    common::ensure_test_images();
    let work = tempfile::tempdir().unwrap();
    let mut config = common::config(work.path());
    config.max_concurrent_starts = 1;
    let docker = Docker::connect(config).await.unwrap();
    let prefix = common::prefix("starts");
    common::clean(&docker, &prefix).await;
    let vms: Vec<_> = (1..=3).map(|id| machine(&prefix, id, BOOKWORM)).collect();
    futures_util::future::try_join_all(vms.iter().map(|vm| docker.initialize_vm(vm)))
        .await
        .unwrap();
    let time = |t: Option<String>| chrono::DateTime::parse_from_rfc3339(&t.unwrap()).unwrap();
    let mut created_started = Vec::new();
    for vm in &vms {
        let inspect = docker
            .api()
            .inspect_container(&container_name(vm), None)
            .await
            .unwrap();
        let started = inspect.state.and_then(|s| s.started_at);
        created_started.push((time(inspect.created), time(started)));
    }
    common::clean(&docker, &prefix).await;
    created_started.sort();
    for pair in created_started.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "a container was created before the one before it had started: {created_started:?}"
        );
    }
}

/// A container without network has no network sandbox from Docker
/// (`NetworkDisabled`, which saves two runs of the dockerd binary per
/// container), yet its jobs keep a working loopback and `localhost`.
#[tokio::test]
async fn without_network_localhost_still_works() {
    require_docker!();
    let (work, docker, prefix) = common::fresh_backend("lo").await;
    let vm = machine(&prefix, 1, BOOKWORM);
    let probe = "all:\n\t@python3 -c 'import socket; s = socket.socket(); \
                 s.bind((\"localhost\", 0)); s.listen(); \
                 c = socket.create_connection(s.getsockname()); print(\"loopback\", len(socket.if_nameindex()))'\n";
    let (outcome, output) = common::run_once(
        &docker,
        &vm,
        work.path(),
        &[("Makefile", probe)],
        &request(81, 20),
    )
    .await;
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert!(output.contains("loopback 1\n"), "{output}");
    let inspect = docker
        .api()
        .inspect_container(&container_name(&vm), None)
        .await
        .unwrap();
    assert_eq!(inspect.config.unwrap().network_disabled, Some(true));
    docker.safe_destroy_vm(&vm).await.unwrap();
}
