//! The ec2 backend against moto's EC2 server (the control plane) and a
//! local sshd standing in for the instances, both on loopback. Nothing
//! here reaches AWS: every client's endpoint is moto.
//!
//! Needs `pip install 'moto[server]'` and `apt-get install openssh-server`,
//! and root (sshd logs in as root, and the autodriver switches users).
//! Without them the tests say why and pass, except under CI (`CI` set),
//! where a missing fixture is a failure.
#![cfg(feature = "ec2")]

use std::path::Path;
use std::time::Duration;
use tango_core::model::{CloudCredentials, InputFile, Machine};
use tango_core::vmms::{RunRequest, RunStatus, Vmms, VmmsError};
use tango_vmms::ec2::testing::{server_credentials, Moto, Sshd};
use tango_vmms::ec2::{Ec2, Ec2Config};

#[path = "support/autodriver.rs"]
mod autodriver_build;
use autodriver_build::autodriver;

/// moto and sshd, or `None` (after saying why) when they cannot run here.
fn fixtures(test: &str) -> Option<(Moto, Sshd)> {
    let started = Moto::start().and_then(|moto| Sshd::start().map(|sshd| (moto, sshd)));
    match started {
        Ok(both) => Some(both),
        Err(reason) if must_run() => {
            panic!("{test}: the ec2 test fixtures must run in CI: {reason}")
        }
        Err(reason) => {
            eprintln!("SKIPPED {test}: {reason}");
            None
        }
    }
}

/// A VM prefix of its own per test: tests share nothing in moto or on disk.
fn prefix(test: &str) -> String {
    format!("e2t{}{test}", std::process::id())
}

/// `uid`: the grading user of this test's jobs. The autodriver kills
/// whatever its grading user left running, host-wide, and every test's
/// "instance" is this host: tests running at once need distinct users.
fn config(moto: &Moto, sshd: &Sshd, work: &Path, uid: u32) -> Ec2Config {
    let mut config = Ec2Config::new(autodriver(), work.join("output"), sshd.client_key.clone());
    config.endpoint_url = Some(moto.endpoint.clone());
    config.credentials = Some(server_credentials());
    config.images = [("host".to_string(), "ami-0123456789abcdef0".to_string())].into();
    config.ssh_host_override = Some("127.0.0.1".into());
    config.ssh_port = sshd.port;
    config.ssh_user = "root".into();
    // Copied in by the backend: nothing is at this path yet.
    config.remote_autodriver = work.join("bin/tango-autodriver").display().to_string();
    config.remote_dir = work.join("remote").display().to_string();
    // A uid nothing else on this host uses.
    config.grading_user = format!("{uid}:{uid}");
    config.grading_home = Some(work.join("home/grader").display().to_string());
    config.api_timeout = Duration::from_secs(10);
    config.poll_interval = Duration::from_millis(100);
    config.terminate_wait = Duration::from_secs(10);
    config
}

fn request(job_id: u64, disable_network: bool) -> RunRequest {
    RunRequest {
        job_id,
        timeout_secs: 60,
        output_cap_bytes: 1 << 20,
        max_procs: 64,
        max_file_bytes: 64 << 20,
        disable_network,
    }
}

fn input(dir: &Path, name: &str, body: &str) -> InputFile {
    let path = dir.join(format!("in-{name}"));
    std::fs::write(&path, body).unwrap();
    InputFile {
        local_file: name.into(),
        dest_file: name.into(),
        path,
        md5: String::new(),
    }
}

const MAKEFILE: &str = "all:\n\t@echo uid=$$(id -u)\n\t@cat greeting.txt\n\t@echo ifaces=$$(tail -n +3 /proc/net/dev | wc -l)\n";

/// (instance id, VM name, state) of every instance of `prefix`.
async fn instances(
    ec2: &Ec2,
    prefix: &str,
    credentials: Option<&CloudCredentials>,
) -> Vec<(String, String, String)> {
    ec2.instances(prefix, credentials).await.unwrap()
}

#[tokio::test]
async fn a_job_runs_on_an_instance_over_ssh() {
    let Some((moto, sshd)) = fixtures("a_job_runs_on_an_instance_over_ssh") else {
        return;
    };
    let work = sshd.scratch("work");
    let ec2 = Ec2::connect(config(&moto, &sshd, &work, 64102))
        .await
        .unwrap();
    ec2.check().await.unwrap();
    assert_eq!(ec2.get_images().await.unwrap(), ["host"]);
    let prefix = prefix("job");
    let vm = Machine::new(&prefix, 1, "host", "ec2");

    let started = std::time::Instant::now();
    ec2.initialize_vm(&vm).await.unwrap();
    let launched = started.elapsed();
    let listed = ec2.get_vms(&prefix).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, vm.name);
    assert_eq!((listed[0].id, listed[0].image.as_str()), (1, "host"));
    assert!(ec2.exists_vm(&vm).await.unwrap());

    let started = std::time::Instant::now();
    ec2.wait_vm(&vm, Duration::from_secs(30)).await.unwrap();
    eprintln!(
        "initialize_vm {launched:?}, wait_vm (running, SSH, probe, autodriver copied) {:?}",
        started.elapsed()
    );
    assert!(
        work.join("bin/tango-autodriver").is_file(),
        "the autodriver was copied to the instance"
    );

    // Two jobs on the same instance: the second sees nothing of the first.
    for (job, greeting) in [(1, "hello from the first job"), (2, "second job here")] {
        let mut files = vec![
            input(&work, "Makefile", &format!("{MAKEFILE}\t@ls\n")),
            input(&work, "greeting.txt", &format!("{greeting}\n")),
        ];
        // A name too long for the autodriver's tar reader: this copy-in
        // goes through `tar -x` on the instance instead of the run's stdin.
        let long_name = "n".repeat(120);
        if job == 2 {
            files.push(input(&work, &long_name, "long\n"));
        }
        let started = std::time::Instant::now();
        ec2.copy_in(&vm, &files).await.unwrap();
        let copied = started.elapsed();
        let outcome = ec2.run_job(&vm, &request(job, true)).await.unwrap();
        assert_eq!(outcome.status, RunStatus::Completed, "{outcome:?}");
        let dest = work.join(format!("out{job}"));
        ec2.copy_out(&vm, &dest).await.unwrap();
        eprintln!(
            "job {job}: copy_in {copied:?}, copy_in + run_job + copy_out {:?}",
            started.elapsed()
        );
        let output = std::fs::read_to_string(&dest).unwrap();
        assert!(output.contains("uid=64102"), "{output}");
        assert!(output.contains(greeting), "{output}");
        if job == 2 {
            assert!(!output.contains("first job"), "{output}");
            assert!(output.contains(&long_name), "{output}");
        }
        // disable_network: a namespace of its own, with loopback only.
        assert!(output.contains("ifaces=1"), "{output}");
        let partial = ec2.partial_output(&vm, 1 << 20).await.unwrap();
        assert!(
            String::from_utf8_lossy(&partial).contains(greeting),
            "{}",
            String::from_utf8_lossy(&partial)
        );
        ec2.reset_vm(&vm).await.unwrap();
    }

    // With the network allowed the job sees the host's interfaces.
    let host_ifaces = std::fs::read_to_string("/proc/net/dev")
        .unwrap()
        .lines()
        .count()
        - 2;
    ec2.copy_in(
        &vm,
        &[
            input(&work, "Makefile", MAKEFILE),
            input(&work, "greeting.txt", "net\n"),
        ],
    )
    .await
    .unwrap();
    let outcome = ec2.run_job(&vm, &request(3, false)).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Completed);
    let dest = work.join("out3");
    ec2.copy_out(&vm, &dest).await.unwrap();
    let output = std::fs::read_to_string(&dest).unwrap();
    assert!(
        output.contains(&format!("ifaces={host_ifaces}\n")),
        "{output}"
    );

    ec2.safe_destroy_vm(&vm).await.unwrap();
    let all = instances(&ec2, &prefix, None).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].2, "terminated");
    assert!(ec2.get_vms(&prefix).await.unwrap().is_empty());
    assert!(!ec2.exists_vm(&vm).await.unwrap());
    // Destroying again is fine.
    ec2.safe_destroy_vm(&vm).await.unwrap();
}

#[tokio::test]
async fn wait_vm_timeout_terminates_the_instance() {
    let Some((moto, mut sshd)) = fixtures("wait_vm_timeout_terminates_the_instance") else {
        return;
    };
    let work = sshd.scratch("work");
    let mut config = config(&moto, &sshd, &work, 64104);
    // Nothing answers SSH there any more.
    sshd.stop();
    config.ssh_connect_timeout = Duration::from_secs(1);
    let ec2 = Ec2::connect(config).await.unwrap();
    let prefix = prefix("waitvm");
    let vm = Machine::new(&prefix, 1, "host", "ec2");
    ec2.initialize_vm(&vm).await.unwrap();
    let max = Duration::from_secs(4);
    let started = std::time::Instant::now();
    let error = ec2.wait_vm(&vm, max).await.unwrap_err();
    assert!(
        started.elapsed() <= max,
        "within the engine's bound on the call"
    );
    let message = error.to_string();
    assert!(message.contains("SSH"), "{message}");
    assert!(message.contains("terminated i-"), "{message}");
    let all = instances(&ec2, &prefix, None).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert!(
        matches!(all[0].2.as_str(), "terminated" | "shutting-down"),
        "{all:?}"
    );
    assert!(ec2.get_vms(&prefix).await.unwrap().is_empty());
}

#[tokio::test]
async fn instances_are_listed_and_destroyed_by_prefix() {
    let Some((moto, sshd)) = fixtures("instances_are_listed_and_destroyed_by_prefix") else {
        return;
    };
    let work = sshd.scratch("work");
    let ec2 = Ec2::connect(config(&moto, &sshd, &work, 64105))
        .await
        .unwrap();
    let ours = prefix("orphans");
    let theirs = format!("{ours}x");
    let a = Machine::new(&ours, 4, "host", "ec2");
    let b = Machine::new(&ours, 9, "host", "ec2");
    let other = Machine::new(&theirs, 4, "host", "ec2");
    for vm in [&a, &b, &other] {
        ec2.initialize_vm(vm).await.unwrap();
    }
    // Another backend instance (a restarted server) knows only the tags.
    let fresh = Ec2::connect(config(&moto, &sshd, &work, 64106))
        .await
        .unwrap();
    let listed = fresh.get_vms(&ours).await.unwrap();
    let names: Vec<&str> = listed.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, [a.name.as_str(), b.name.as_str()]);
    for vm in &listed {
        fresh.safe_destroy_vm(vm).await.unwrap();
    }
    assert!(fresh.get_vms(&ours).await.unwrap().is_empty());
    let states: Vec<String> = instances(&fresh, &ours, None)
        .await
        .into_iter()
        .map(|(_, _, state)| state)
        .collect();
    assert_eq!(states, ["terminated", "terminated"]);
    // The other prefix's instance is untouched.
    assert_eq!(fresh.get_vms(&theirs).await.unwrap().len(), 1);
    fresh.safe_destroy_vm(&other).await.unwrap();
}

#[tokio::test]
async fn a_vm_with_credentials_lives_in_that_account() {
    let Some((moto, sshd)) = fixtures("a_vm_with_credentials_lives_in_that_account") else {
        return;
    };
    let work = sshd.scratch("work");
    let ec2 = Ec2::connect(config(&moto, &sshd, &work, 64107))
        .await
        .unwrap();
    let keys = moto.account_credentials("111111111111").unwrap();
    let prefix = prefix("creds");
    let mut vm = Machine::new(&prefix, 1, "host", "ec2");
    vm.credentials = Some(keys.clone());

    ec2.initialize_vm(&vm).await.unwrap();
    let theirs = instances(&ec2, &prefix, Some(&keys)).await;
    assert_eq!(theirs.len(), 1, "{theirs:?}");
    assert!(
        instances(&ec2, &prefix, None).await.is_empty(),
        "nothing in the server's account"
    );
    assert!(ec2.exists_vm(&vm).await.unwrap());
    ec2.wait_vm(&vm, Duration::from_secs(30)).await.unwrap();
    ec2.copy_in(
        &vm,
        &[
            input(&work, "Makefile", MAKEFILE),
            input(&work, "greeting.txt", "paid by the course\n"),
        ],
    )
    .await
    .unwrap();
    let outcome = ec2.run_job(&vm, &request(1, true)).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Completed);
    let dest = work.join("out");
    ec2.copy_out(&vm, &dest).await.unwrap();
    assert!(std::fs::read_to_string(&dest)
        .unwrap()
        .contains("paid by the course"));
    // Never back into a pool: the engine destroys what it cannot reset.
    assert!(ec2.reset_vm(&vm).await.is_err());
    ec2.safe_destroy_vm(&vm).await.unwrap();
    let theirs = instances(&ec2, &prefix, Some(&keys)).await;
    assert_eq!(theirs[0].2, "terminated", "{theirs:?}");
}

#[tokio::test]
async fn spot_instances_when_asked() {
    let Some((moto, sshd)) = fixtures("spot_instances_when_asked") else {
        return;
    };
    let work = sshd.scratch("work");
    let mut config = config(&moto, &sshd, &work, 64108);
    config.spot = true;
    let ec2 = Ec2::connect(config).await.unwrap();
    let prefix = prefix("spot");
    let vm = Machine::new(&prefix, 1, "host", "ec2");
    ec2.initialize_vm(&vm).await.unwrap();
    let body = moto
        .call(
            "ec2",
            "testing",
            &[
                ("Action", "DescribeInstances"),
                ("Version", "2016-11-15"),
                ("Filter.1.Name", "tag:tango:vm"),
                ("Filter.1.Value.1", &vm.name),
            ],
        )
        .unwrap();
    assert!(
        body.contains("<instanceLifecycle>spot</instanceLifecycle>"),
        "{body}"
    );
    ec2.safe_destroy_vm(&vm).await.unwrap();
}

#[tokio::test]
async fn unknown_images_and_unreachable_endpoints() {
    let Some((moto, sshd)) = fixtures("unknown_images_and_unreachable_endpoints") else {
        return;
    };
    let work = sshd.scratch("work");
    let ec2 = Ec2::connect(config(&moto, &sshd, &work, 64109))
        .await
        .unwrap();
    let vm = Machine::new(&prefix("noimage"), 1, "no-such-image", "ec2");
    assert!(matches!(
        ec2.initialize_vm(&vm).await,
        Err(VmmsError::NoSuchImage(_))
    ));

    // Nothing listens on moto's port once it is gone.
    let mut config = config(&moto, &sshd, &work, 64110);
    drop(moto);
    config.api_timeout = Duration::from_secs(3);
    let down = Ec2::connect(config).await.unwrap();
    let error = down.get_vms("any").await.unwrap_err();
    assert!(matches!(error, VmmsError::Unavailable(_)), "{error}");
    assert!(error.to_string().contains("endpoint_url"), "{error}");
    let vm = Machine::new(&prefix("down"), 1, "host", "ec2");
    let error = down.initialize_vm(&vm).await.unwrap_err();
    assert!(matches!(error, VmmsError::Unavailable(_)), "{error}");
}

/// The generic conformance suite (`tango_vmms::conformance`), minus what
/// cannot hold when every "instance" is this one host.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ec2_backend_conforms() {
    use tango_vmms::conformance::{run, Check, Damage, Target};
    let Some((moto, sshd)) = fixtures("the_ec2_backend_conforms") else {
        return;
    };
    let work = sshd.scratch("work");
    let config = config(&moto, &sshd, &work, 64111);
    let remote_autodriver = std::path::PathBuf::from(&config.remote_autodriver);
    let ec2 = Ec2::connect(config).await.unwrap();
    // An instance that lost its autodriver (a damaged disk or AMI).
    let damage: Damage = std::sync::Arc::new(move |_vm| {
        let path = remote_autodriver.clone();
        Box::pin(async move { std::fs::remove_file(&path).map_err(|e| e.to_string()) })
    });
    let shared = "every instance of these tests is this host, with one grading uid, \
                  and the autodriver kills all of that uid's processes after each job";
    let target = Target::new(std::sync::Arc::new(ec2), "host", &prefix("conform"))
        .skip(Check::Concurrent, shared)
        .skip(
            Check::HostileJobs,
            "every instance of these tests is this host: a memory hog there has no \
             limit but the host's memory",
        )
        .with_damage(damage);
    run(&target).await.assert_passed();
}

/// In CI (`CI` or `TANGO_TEST_EC2=1`, which scripts/test.sh runs these
/// tests with) a missing moto or sshd is a failure, not a skip.
fn must_run() -> bool {
    std::env::var_os("CI").is_some() || std::env::var("TANGO_TEST_EC2").as_deref() == Ok("1")
}
