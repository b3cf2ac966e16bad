//! The docker backend over several real Docker engines (issue 19): the
//! machine's default engine plus extra dockerds in network namespaces of
//! their own (tests/support/engines.rs), one of them reached over TCP with
//! mutual TLS. Jobs spread over the hosts; a host whose dockerd is killed
//! goes down (its calls answer `Unavailable`, so the engine reruns the job
//! elsewhere) and rejoins swept of this server's containers; a drained host
//! takes no new containers; an image one host lacks is streamed to it.
//!
//! The tests share the machine's two cores, so they run one at a time.
#![cfg(feature = "docker")]

#[path = "docker_common.rs"]
mod common;
#[path = "support/engines.rs"]
mod engines;
#[path = "support/registry.rs"]
mod registry;

use common::{require_docker, BOOKWORM, BUSYBOX, BUSYBOX_MAKE};
use engines::{Engine, EngineOptions};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tango_core::model::Machine;
use tango_core::vmms::{RunStatus, Vmms, VmmsError};
use tango_vmms::docker::{DockerFleet, DockerHost, FleetConfig};

/// One test at a time: each starts dockerds and runs containers.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const JOB_MAKEFILE: &str = "all:\n\t@echo job $$(cat id.txt) done\n";

/// A small image only the default engine has at first: busybox with
/// [`BUSYBOX_MAKE`].
const STREAMED: &str = "tango-test-fleet-stream";

/// Makes [`STREAMED`] on the engine of `api` unless it has it.
async fn make_streamed_image(api: &bollard::Docker) {
    use bollard::models::{ContainerConfig, ContainerCreateBody};
    use bollard::query_parameters::{
        CommitContainerOptionsBuilder, CreateContainerOptions, RemoveContainerOptionsBuilder,
        UploadToContainerOptionsBuilder,
    };
    if api.inspect_image(STREAMED).await.is_ok() {
        return;
    }
    let body = ContainerCreateBody {
        image: Some(format!("{BUSYBOX}:latest")),
        cmd: Some(vec!["true".into()]),
        ..Default::default()
    };
    let id = api
        .create_container(None::<CreateContainerOptions>, body)
        .await
        .unwrap()
        .id;
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_path("bin/make").unwrap();
    header.set_mode(0o755);
    header.set_size(BUSYBOX_MAKE.len() as u64);
    header.set_cksum();
    tar.append(&header, BUSYBOX_MAKE.as_bytes()).unwrap();
    let tar = tar.into_inner().unwrap();
    let upload = UploadToContainerOptionsBuilder::default().path("/").build();
    api.upload_to_container(&id, Some(upload), bollard::body_full(tar.into()))
        .await
        .unwrap();
    let commit = CommitContainerOptionsBuilder::default()
        .container(&id)
        .repo(STREAMED)
        .tag("latest")
        .build();
    api.commit_container(commit, ContainerConfig::default())
        .await
        .unwrap();
    let remove = RemoveContainerOptionsBuilder::default().force(true).build();
    api.remove_container(&id, Some(remove)).await.unwrap();
}

async fn start_engine(name: &str, tls: bool, images: &'static [&'static str]) -> Engine {
    let name = name.to_string();
    tokio::task::spawn_blocking(move || {
        let engine = Engine::start(EngineOptions {
            name: name.clone(),
            tls,
        })
        .unwrap_or_else(|e| panic!("engine {name} starts: {e}"));
        engine
            .ensure_images(images)
            .unwrap_or_else(|e| panic!("engine {name} gets {images:?}: {e}"));
        engine
    })
    .await
    .expect("join")
}

fn local_host(max_vms: usize) -> DockerHost {
    DockerHost {
        name: "local".into(),
        url: "unix:///var/run/docker.sock".into(),
        tls_ca: None,
        tls_cert: None,
        tls_key: None,
        insecure: false,
        max_vms,
        from_environment: false,
    }
}

fn host_of(engine: &Engine, max_vms: usize) -> DockerHost {
    DockerHost {
        name: engine.name.clone(),
        url: engine.url.clone(),
        tls_ca: engine.tls.as_ref().map(|t| t.ca.clone()),
        tls_cert: engine.tls.as_ref().map(|t| t.cert.clone()),
        tls_key: engine.tls.as_ref().map(|t| t.key.clone()),
        insecure: false,
        max_vms,
        from_environment: false,
    }
}

/// A fleet over `hosts`, pinged every second, with whatever an earlier run
/// left under `prefix` removed.
async fn fleet(work: &Path, prefix: &str, hosts: Vec<DockerHost>) -> DockerFleet {
    connect(fleet_config(work, prefix, hosts)).await
}

fn fleet_config(work: &Path, prefix: &str, hosts: Vec<DockerHost>) -> FleetConfig {
    let mut config = FleetConfig::new(common::config(work), prefix);
    config.hosts = hosts;
    config.health_period = Duration::from_secs(1);
    config.health_timeout = Duration::from_secs(10);
    config
}

/// Connects a fleet and removes whatever an earlier run left under its
/// prefix.
async fn connect(config: FleetConfig) -> DockerFleet {
    let prefix = config.prefix.clone();
    let fleet = DockerFleet::connect(config)
        .await
        .expect("the fleet connects");
    for vm in fleet.get_vms(&prefix).await.expect("get_vms") {
        fleet.safe_destroy_vm(&vm).await.expect("cleanup");
    }
    fleet
}

/// Makes a VM and returns the host it went to.
async fn make_vm(fleet: &DockerFleet, vm: &Machine) -> String {
    fleet.initialize_vm(vm).await.expect("initialize_vm");
    fleet
        .wait_vm(vm, Duration::from_secs(30))
        .await
        .expect("wait_vm");
    fleet.host_of(vm).expect("a placed VM has a host")
}

/// Runs job `vm.id` on a ready VM and checks its output.
async fn run_job(fleet: &DockerFleet, vm: &Machine, work: &Path) {
    let dir = work.join(format!("job-{}", vm.id));
    std::fs::create_dir_all(&dir).unwrap();
    let id = vm.id.to_string();
    let files = common::inputs(&dir, &[("Makefile", JOB_MAKEFILE), ("id.txt", &id)]);
    fleet.copy_in(vm, &files).await.expect("copy_in");
    let outcome = fleet
        .run_job(vm, &common::request(vm.id, 60))
        .await
        .expect("run_job");
    let dest = dir.join("output");
    fleet.copy_out(vm, &dest).await.expect("copy_out");
    let output = std::fs::read_to_string(&dest).unwrap();
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert!(output.contains(&format!("job {id} done")), "{output}");
}

/// A job that prints `started` and then sleeps for a minute.
const LONG_JOB: &str = "all:\n\t@echo started\n\t@sleep 60\n";

/// Copies [`LONG_JOB`] in and runs it on `vm` in a task of its own;
/// returns once its output shows it started.
async fn start_long_job(
    fleet: &Arc<DockerFleet>,
    vm: &Machine,
    work: &Path,
) -> tokio::task::JoinHandle<Result<tango_core::vmms::RunOutcome, VmmsError>> {
    let files = common::inputs(work, &[("Makefile", LONG_JOB)]);
    fleet.copy_in(vm, &files).await.expect("copy_in");
    let running = {
        let fleet = fleet.clone();
        let vm = vm.clone();
        tokio::spawn(async move { fleet.run_job(&vm, &common::request(1, 120)).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fleet
        .partial_output(vm, 1024)
        .await
        .is_ok_and(|o| String::from_utf8_lossy(&o).contains("started"))
    {
        assert!(Instant::now() < deadline, "the job did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running
}

/// `docker save` of `reference` on the engine of `api`.
async fn save_image(api: &bollard::Docker, reference: &str) -> Vec<u8> {
    futures_util::TryStreamExt::try_fold(
        api.export_image(reference),
        Vec::new(),
        |mut all, chunk| async move {
            all.extend_from_slice(&chunk);
            Ok(all)
        },
    )
    .await
    .expect("docker save")
}

/// Waits until `engine`'s host is up again, and checks that it holds no
/// container of `prefix` then.
async fn rejoins_swept(fleet: &DockerFleet, engine: &Engine, prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !status(fleet, &engine.name).up {
        assert!(Instant::now() < deadline, "the host did not rejoin");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let left = ours(engine, prefix);
    assert!(left.is_empty(), "{left:?}");
}

fn status(fleet: &DockerFleet, host: &str) -> tango_core::vmms::HostStatus {
    fleet
        .hosts()
        .into_iter()
        .find(|h| h.name == host)
        .unwrap_or_else(|| panic!("host {host} is listed"))
}

fn ours(engine: &Engine, prefix: &str) -> Vec<String> {
    engine
        .container_names()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_spread_over_three_engines_and_a_drained_one_takes_none() {
    require_docker!();
    common::ensure_test_images();
    let _serial = SERIAL.lock().await;
    let plain = start_engine("tango-f1", false, &[BOOKWORM]).await;
    let tls = start_engine("tango-f2", true, &[BOOKWORM]).await;
    let work = tempfile::tempdir().unwrap();
    let prefix = "tdf-spread";
    let fleet = Arc::new(
        fleet(
            work.path(),
            prefix,
            vec![local_host(4), host_of(&plain, 4), host_of(&tls, 4)],
        )
        .await,
    );
    assert!(status(&fleet, "tango-f2")
        .url
        .starts_with("tcp://127.0.0.1:"));

    // Twelve VMs made at once: the reservations spread them 4, 4, 4.
    let vms: Vec<Machine> = (1..=12)
        .map(|id| common::machine(prefix, id, BOOKWORM))
        .collect();
    let made = futures_util::future::join_all(vms.iter().map(|vm| make_vm(&fleet, vm))).await;
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    for host in &made {
        *per_host.entry(host.clone()).or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = ["local", "tango-f1", "tango-f2"]
        .iter()
        .map(|h| (h.to_string(), 4))
        .collect();
    assert_eq!(per_host, expected);
    for host in ["local", "tango-f1", "tango-f2"] {
        let s = status(&fleet, host);
        assert!(s.up && !s.draining, "{s:?}");
        assert_eq!(
            (s.vms, s.vm_starts, s.vm_start_failures),
            (4, 4, 0),
            "{s:?}"
        );
    }
    // Each engine holds the containers the fleet says it does.
    assert_eq!(ours(&plain, prefix).len(), 4);
    assert_eq!(ours(&tls, prefix).len(), 4);
    let listed = fleet.get_vms(prefix).await.unwrap();
    assert_eq!(listed.len(), 12);
    assert!(listed.iter().all(|vm| vm.host.is_some()));

    futures_util::future::join_all(vms.iter().map(|vm| run_job(&fleet, vm, work.path()))).await;
    for vm in &vms {
        fleet.reset_vm(vm).await.expect("reset_vm");
    }

    // Drained: no new containers, and its VMs are not reused.
    fleet.set_host_draining("tango-f1", true).await.unwrap();
    assert!(status(&fleet, "tango-f1").draining);
    let on_f1 = vms
        .iter()
        .zip(&made)
        .find(|(_, host)| *host == "tango-f1")
        .map(|(vm, _)| vm.clone())
        .unwrap();
    assert!(fleet.reset_vm(&on_f1).await.is_err());
    let more: Vec<Machine> = (13..=18)
        .map(|id| common::machine(prefix, id, BOOKWORM))
        .collect();
    let placed = futures_util::future::join_all(more.iter().map(|vm| make_vm(&fleet, vm))).await;
    assert!(placed.iter().all(|h| h != "tango-f1"), "{placed:?}");
    assert!(matches!(
        fleet.set_host_draining("nope", true).await,
        Err(VmmsError::NoSuchHost(_))
    ));
    fleet.set_host_draining("tango-f1", false).await.unwrap();

    for vm in vms.iter().chain(&more) {
        fleet.destroy_vm(vm).await.expect("destroy_vm");
    }
    assert!(ours(&plain, prefix).is_empty());
    assert!(ours(&tls, prefix).is_empty());
    assert!(fleet.get_vms(prefix).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_engine_goes_down_and_rejoins_swept() {
    require_docker!();
    common::ensure_test_images();
    let _serial = SERIAL.lock().await;
    let mut engine = start_engine("tango-f3", false, &[BOOKWORM]).await;
    let work = tempfile::tempdir().unwrap();
    let prefix = "tdf-kill";
    // The dying host is the roomiest: the first VMs go there.
    let fleet = Arc::new(
        fleet(
            work.path(),
            prefix,
            vec![local_host(2), host_of(&engine, 10)],
        )
        .await,
    );
    let doomed = common::machine(prefix, 1, BOOKWORM);
    let idle = common::machine(prefix, 2, BOOKWORM);
    assert_eq!(make_vm(&fleet, &doomed).await, "tango-f3");
    assert_eq!(make_vm(&fleet, &idle).await, "tango-f3");
    assert_eq!(ours(&engine, prefix).len(), 2);

    let running = start_long_job(&fleet, &doomed, work.path()).await;
    let files = common::inputs(work.path(), &[("Makefile", LONG_JOB)]);
    assert_eq!(status(&fleet, "tango-f3").running_jobs, 1);
    let killed_at = Instant::now();
    tokio::task::block_in_place(|| engine.kill9());

    // The running job's call fails as Unavailable, at once, not at the
    // job's time limit.
    let ran = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("run_job returns when its host dies")
        .expect("join");
    assert!(matches!(ran, Err(VmmsError::Unavailable(_))), "{ran:?}");
    eprintln!(
        "run_job answered Unavailable {:?} after the kill",
        killed_at.elapsed()
    );
    let down = status(&fleet, "tango-f3");
    assert!(!down.up, "{down:?}");
    assert_eq!(down.vms, 0, "its VMs are forgotten: {down:?}");
    assert_eq!(down.running_jobs, 0, "{down:?}");
    // Every call for its VMs answers Unavailable; removing them is a no-op.
    assert!(matches!(
        fleet.copy_in(&idle, &files).await,
        Err(VmmsError::Unavailable(_))
    ));
    fleet
        .destroy_vm(&idle)
        .await
        .expect("a lost VM is gone already");
    // New VMs go to the host that is up.
    let next = common::machine(prefix, 3, BOOKWORM);
    assert_eq!(make_vm(&fleet, &next).await, "local");
    run_job(&fleet, &next, work.path()).await;

    // Back: the old containers are removed before it takes new ones.
    tokio::task::block_in_place(|| engine.restart()).expect("dockerd restarts");
    rejoins_swept(&fleet, &engine, prefix).await;
    fleet.destroy_vm(&doomed).await.unwrap();
    let again = common::machine(prefix, 4, BOOKWORM);
    assert_eq!(make_vm(&fleet, &again).await, "tango-f3");
    run_job(&fleet, &again, work.path()).await;
    for vm in [&next, &again] {
        fleet.destroy_vm(vm).await.unwrap();
    }
    assert!(ours(&engine, prefix).is_empty());
    assert!(fleet.get_vms(prefix).await.unwrap().is_empty());
}

/// A host cut off without a reset (here: dockerd SIGSTOPped) answers
/// nothing, so a call waiting on it would wait out the job's time limit.
/// The health check finds it down and the waiting calls give up at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_engine_goes_down_and_its_waiting_calls_give_up() {
    require_docker!();
    common::ensure_test_images();
    let _serial = SERIAL.lock().await;
    let engine = start_engine("tango-f3", false, &[BOOKWORM]).await;
    let work = tempfile::tempdir().unwrap();
    let prefix = "tdf-freeze";
    let health_timeout = Duration::from_secs(3);
    let fleet = {
        let mut config = fleet_config(
            work.path(),
            prefix,
            vec![local_host(2), host_of(&engine, 10)],
        );
        config.health_timeout = health_timeout;
        Arc::new(connect(config).await)
    };
    let stuck = common::machine(prefix, 1, BOOKWORM);
    assert_eq!(make_vm(&fleet, &stuck).await, "tango-f3");
    let running = start_long_job(&fleet, &stuck, work.path()).await;
    let frozen_at = Instant::now();
    engine.freeze();

    // Not at the job's 60 s: within a health period and a ping timeout
    // (and the ping of the failed call's settling).
    let ran = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("run_job gives up when its host is found down")
        .expect("join");
    let gave_up_after = frozen_at.elapsed();
    assert!(matches!(ran, Err(VmmsError::Unavailable(_))), "{ran:?}");
    eprintln!("run_job answered Unavailable {gave_up_after:?} after the freeze");
    assert!(
        gave_up_after < Duration::from_secs(1) + 3 * health_timeout,
        "{gave_up_after:?}"
    );
    let down = status(&fleet, "tango-f3");
    assert!(
        !down.up && down.vms == 0 && down.running_jobs == 0,
        "{down:?}"
    );
    // The rest of the fleet works meanwhile.
    let next = common::machine(prefix, 2, BOOKWORM);
    assert_eq!(make_vm(&fleet, &next).await, "local");
    run_job(&fleet, &next, work.path()).await;
    fleet.destroy_vm(&next).await.unwrap();

    // Thawed, it rejoins without the stuck job's container.
    engine.thaw();
    rejoins_swept(&fleet, &engine, prefix).await;
    fleet.destroy_vm(&stuck).await.unwrap();
    assert!(fleet.get_vms(prefix).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_on_one_host_is_streamed_to_another() {
    require_docker!();
    common::ensure_test_images();
    let _serial = SERIAL.lock().await;
    let mut fresh = start_engine("tango-f4", false, &[]).await;
    let work = tempfile::tempdir().unwrap();
    let prefix = "tdf-stream";
    let fleet = fleet(work.path(), prefix, vec![local_host(4), host_of(&fresh, 4)]).await;
    // The fresh engine keeps its data root between runs: make it lack the
    // image again (its autodriver images first, they are its children).
    let api = fleet.host_backend("tango-f4").expect("up").api().clone();
    let images = api
        .list_images(None::<bollard::query_parameters::ListImagesOptions>)
        .await
        .unwrap();
    let remove = Some(
        bollard::query_parameters::RemoveImageOptionsBuilder::default()
            .force(true)
            .build(),
    );
    for tag in images.iter().flat_map(|i| i.repo_tags.iter()) {
        if tag.starts_with("tango-autodriver:") {
            api.remove_image(tag, remove.clone(), None).await.unwrap();
        }
    }
    let _ = api
        .remove_image(&format!("{STREAMED}:latest"), remove.clone(), None)
        .await;
    assert!(api.inspect_image(STREAMED).await.is_err());
    make_streamed_image(fleet.host_backend("local").expect("up").api()).await;
    assert!(fleet
        .get_images()
        .await
        .unwrap()
        .contains(&STREAMED.to_string()));

    // Only the fresh host takes containers: the image must go there.
    fleet.set_host_draining("local", true).await.unwrap();
    let vms: Vec<Machine> = (1..=3)
        .map(|id| common::machine(prefix, id, STREAMED))
        .collect();
    let started = Instant::now();
    let placed = futures_util::future::join_all(vms.iter().map(|vm| make_vm(&fleet, vm))).await;
    eprintln!(
        "3 VMs on a host without the image, streamed once, in {:?}",
        started.elapsed()
    );
    assert!(placed.iter().all(|h| h == "tango-f4"), "{placed:?}");
    assert!(api.inspect_image(STREAMED).await.is_ok());
    for vm in &vms {
        run_job(&fleet, vm, work.path()).await;
        fleet.destroy_vm(vm).await.unwrap();
    }
    assert!(ours(&fresh, prefix).is_empty());

    // A transfer outlives a caller that gives up (the engine's initialize
    // timeout): the 257 MB image takes seconds to stream, the caller waits
    // 300 ms, and the image still arrives.
    let _ = api
        .remove_image(&format!("{BOOKWORM}:latest"), remove.clone(), None)
        .await;
    let big = common::machine(prefix, 5, BOOKWORM);
    let gave_up = tokio::time::timeout(Duration::from_millis(300), fleet.initialize_vm(&big)).await;
    assert!(
        gave_up.is_err(),
        "the stream should take longer: {gave_up:?}"
    );
    fleet.safe_destroy_vm(&big).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while api.inspect_image(BOOKWORM).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the abandoned stream did not finish"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(make_vm(&fleet, &big).await, "tango-f4");
    run_job(&fleet, &big, work.path()).await;
    fleet.destroy_vm(&big).await.unwrap();

    // `/build` loads the image onto every host that is up.
    let local = fleet.host_backend("local").expect("up").api().clone();
    let tar = work.path().join("streamed.tar");
    let saved = save_image(&local, &format!("{STREAMED}:latest")).await;
    std::fs::write(&tar, saved).unwrap();
    let built = "tango-test-fleet-built";
    let built_ref = format!("{built}:latest");
    fleet.build_image(built, &tar).await.expect("build_image");
    let id_on = |api: bollard::Docker| {
        let built_ref = built_ref.clone();
        async move { api.inspect_image(&built_ref).await.ok().and_then(|i| i.id) }
    };
    let first = id_on(local.clone()).await;
    assert!(first.is_some());
    assert_eq!(id_on(api.clone()).await, first);

    // A host down during a `/build` keeps the older image of that name:
    // before a VM of it is made there, the new one is streamed over (the
    // new one is plain busybox, without make: only its id is checked).
    tokio::task::block_in_place(|| fresh.kill9());
    fleet.check_now().await;
    assert!(!status(&fleet, "tango-f4").up);
    let other_tar = work.path().join("other.tar");
    let saved = save_image(&local, &format!("{BUSYBOX}:latest")).await;
    std::fs::write(&other_tar, saved).unwrap();
    fleet
        .build_image(built, &other_tar)
        .await
        .expect("build_image with a host down");
    let second = id_on(local.clone()).await;
    assert!(second.is_some() && second != first);
    tokio::task::block_in_place(|| fresh.restart()).expect("dockerd restarts");
    rejoins_swept(&fleet, &fresh, prefix).await;
    assert_eq!(id_on(api.clone()).await, first, "it missed the build");
    let vm = common::machine(prefix, 4, built);
    assert_eq!(make_vm(&fleet, &vm).await, "tango-f4");
    assert_eq!(id_on(api.clone()).await, second, "streamed before use");
    fleet.destroy_vm(&vm).await.unwrap();
    assert!(ours(&fresh, prefix).is_empty());
    for api in [&local, &api] {
        api.remove_image(&built_ref, remove.clone(), None)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_join_and_leave_by_a_new_host_list() {
    require_docker!();
    common::ensure_test_images();
    let _serial = SERIAL.lock().await;
    let engine = start_engine("tango-f1", false, &[BOOKWORM]).await;
    let work = tempfile::tempdir().unwrap();
    let prefix = "tdf-sethosts";
    let fleet = fleet(work.path(), prefix, vec![local_host(2)]).await;
    for vm in engine.container_names() {
        assert!(!vm.starts_with(prefix), "left from an earlier run: {vm}");
    }

    // Added: it joins at the next check and, roomier, takes the next VM.
    fleet
        .set_hosts(vec![local_host(2), host_of(&engine, 10)])
        .unwrap();
    fleet.check_now().await;
    assert!(status(&fleet, "tango-f1").up);
    let vm = common::machine(prefix, 1, BOOKWORM);
    assert_eq!(make_vm(&fleet, &vm).await, "tango-f1");

    // Left out: it drains, its running VM keeps working, and it goes once
    // that VM is gone.
    fleet.set_hosts(vec![local_host(2)]).unwrap();
    assert!(status(&fleet, "tango-f1").draining);
    let undrained = fleet.set_host_draining("tango-f1", false).await;
    assert!(
        matches!(undrained, Err(VmmsError::HostLeaving(_))),
        "{undrained:?}"
    );
    let next = common::machine(prefix, 2, BOOKWORM);
    assert_eq!(make_vm(&fleet, &next).await, "local");
    run_job(&fleet, &vm, work.path()).await;
    assert!(
        fleet.reset_vm(&vm).await.is_err(),
        "not reused on a leaving host"
    );
    fleet.check_now().await;
    assert!(fleet.hosts().iter().any(|h| h.name == "tango-f1"));
    fleet.destroy_vm(&vm).await.unwrap();
    fleet.check_now().await;
    let names: Vec<String> = fleet.hosts().into_iter().map(|h| h.name).collect();
    assert_eq!(names, ["local"]);
    fleet.destroy_vm(&next).await.unwrap();
    assert!(ours(&engine, prefix).is_empty());
    // Refused lists change nothing.
    let mut twice = vec![local_host(2), local_host(3)];
    assert!(fleet.set_hosts(std::mem::take(&mut twice)).is_err());
    assert_eq!(status(&fleet, "local").max_vms, 2);
}

/// An image no host has is pulled from the registry by the host chosen for
/// the VM, once for the VMs made at once, and named as jobs name it; an
/// image the registry lacks is `NoSuchImage`, a registry that is down
/// `Unavailable` saying what was tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_no_host_has_is_pulled_from_the_registry() {
    require_docker!();
    if let Some(reason) = registry::skip_reason() {
        eprintln!("skipping: {reason}");
        return;
    }
    common::ensure_test_images();
    let _serial = SERIAL.lock().await;
    let work = tempfile::tempdir().unwrap();
    let prefix = "tdf-pull";
    let pulled = "tango-test-fleet-pulled";
    let pulled_ref = format!("{pulled}:latest");
    let local = fleet(work.path(), prefix, vec![local_host(4)]).await;
    let api = local.host_backend("local").expect("up").api().clone();
    make_streamed_image(&api).await;
    let mut registry = tokio::task::block_in_place(|| {
        let registry = registry::Registry::start().expect("the registry starts");
        registry
            .push(&format!("{STREAMED}:latest"), &pulled_ref)
            .expect("the image is pushed");
        registry
    });
    let remove = Some(
        bollard::query_parameters::RemoveImageOptionsBuilder::default()
            .force(true)
            .build(),
    );
    // Left by an earlier run, or by the push.
    let _ = api.remove_image(&pulled_ref, remove.clone(), None).await;
    let without_registry = local
        .initialize_vm(&common::machine(prefix, 1, pulled))
        .await;
    assert!(
        matches!(without_registry, Err(VmmsError::NoSuchImage(_))),
        "no host has it: {without_registry:?}"
    );
    drop(local);

    let mut config = fleet_config(work.path(), prefix, vec![local_host(4)]);
    config.registry = Some(registry.address.clone());
    let fleet = connect(config).await;
    let vms: Vec<Machine> = (2..=4)
        .map(|id| common::machine(prefix, id, pulled))
        .collect();
    let started = Instant::now();
    let placed = futures_util::future::join_all(vms.iter().map(|vm| make_vm(&fleet, vm))).await;
    eprintln!("3 VMs of an image pulled once in {:?}", started.elapsed());
    assert!(placed.iter().all(|h| h == "local"), "{placed:?}");
    assert!(api.inspect_image(&pulled_ref).await.is_ok());
    let remote_ref = format!("{}/{pulled_ref}", registry.address);
    assert!(
        api.inspect_image(&remote_ref).await.is_err(),
        "the registry's name of the image is dropped"
    );
    assert!(fleet
        .get_images()
        .await
        .unwrap()
        .contains(&pulled.to_string()));
    for vm in &vms {
        run_job(&fleet, vm, work.path()).await;
        fleet.destroy_vm(vm).await.unwrap();
    }

    // Not in the registry either.
    let nowhere = fleet
        .initialize_vm(&common::machine(prefix, 5, "tango-test-fleet-nowhere"))
        .await;
    assert!(
        matches!(nowhere, Err(VmmsError::NoSuchImage(ref i)) if i == "tango-test-fleet-nowhere"),
        "{nowhere:?}"
    );
    // The registry is down: the job may wait for it.
    api.remove_image(&pulled_ref, remove.clone(), None)
        .await
        .unwrap();
    tokio::task::block_in_place(|| registry.stop());
    let down = fleet
        .initialize_vm(&common::machine(prefix, 6, pulled))
        .await;
    match &down {
        Err(VmmsError::Unavailable(message)) => assert!(
            message.contains(&format!("from registry {}", registry.address)),
            "{message}"
        ),
        other => panic!("a registry that is down is Unavailable: {other:?}"),
    }
    assert!(fleet.get_vms(prefix).await.unwrap().is_empty());
}
