//! tangod on the ec2 backend, end to end: moto's EC2 server is the control
//! plane and a local sshd stands in for the instances, both on loopback
//! (nothing here reaches AWS). Built with `--features ec2`.
//!
//! Needs `pip install 'moto[server]'`, `apt-get install openssh-server` and
//! root; without them the tests say why and pass, except under CI (`CI`
//! set), where a missing fixture is a failure.
#![cfg(feature = "ec2")]

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;
use tango_core::model::{CloudCredentials, Machine};
use tango_core::vmms::Vmms;
use tango_vmms::ec2::testing::{server_credentials, Moto, Sshd};
use tango_vmms::ec2::{Ec2, Ec2Config};

const AMI: &str = "ami-0123456789abcdef0";

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

/// tangod's config: every job on ec2, instances in moto, SSH to the local
/// sshd as root, jobs as `uid` (distinct per test: the autodriver kills
/// whatever its user left running on the host).
fn server_config(moto: &Moto, sshd: &Sshd, work: &Path, uid: u32) -> String {
    format!(
        r#"vmms = "ec2"
[ec2]
region = "us-east-1"
endpoint_url = "{endpoint}"
access_key_id = "testing"
secret_access_key = "testing"
ssh_host_override = "127.0.0.1"
ssh_port = {port}
ssh_user = "root"
ssh_key = "{key}"
remote_autodriver = "{work}/bin/tango-autodriver"
remote_dir = "{work}/remote"
grading_user = "{uid}:{uid}"
grading_home = "{work}/home/grader"
poll_interval_ms = 100
terminate_wait_secs = 10
[ec2.images]
host = "{AMI}"
"#,
        endpoint = moto.endpoint,
        port = sshd.port,
        key = sshd.client_key.display(),
        work = work.display(),
    )
}

/// A backend on the same moto, to look at instances as tangod left them.
async fn observer(moto: &Moto, sshd: &Sshd, work: &Path) -> Ec2 {
    let mut config = Ec2Config::new(autodriver(), work.join("observer"), sshd.client_key.clone());
    config.endpoint_url = Some(moto.endpoint.clone());
    config.credentials = Some(server_credentials());
    config.images = [("host".to_string(), AMI.to_string())].into();
    config.api_timeout = Duration::from_secs(10);
    Ec2::connect(config).await.unwrap()
}

/// State of each instance of `prefix` in an account.
async fn states(ec2: &Ec2, prefix: &str, credentials: Option<&CloudCredentials>) -> Vec<String> {
    ec2.instances(prefix, credentials)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, _, state)| state)
        .collect()
}

const MAKEFILE: &[u8] = b"all:\n\t@echo uid=$$(id -u)\n\t@cat greeting.txt\n";

async fn run_job(
    c: &Client,
    name: &str,
    greeting: &str,
    credentials: Option<&CloudCredentials>,
) -> String {
    c.upload(
        "lab",
        &format!("{name}.txt"),
        format!("{greeting}\n").as_bytes(),
    )
    .await;
    let mut body = job(name, &format!("{name}.out"), None, 60);
    body["files"] = serde_json::json!([
        {"localFile": "Makefile", "destFile": "Makefile"},
        {"localFile": format!("{name}.txt"), "destFile": "greeting.txt"},
    ]);
    if let Some(keys) = credentials {
        body["accessKeyId"] = keys.access_key_id.clone().into();
        body["accessKey"] = keys.secret_access_key.clone().into();
    }
    let added = c.add_job("lab", &body).await;
    assert_eq!(added["statusMsg"], "Job added", "{added}");
    let output = c
        .wait_output("lab", &format!("{name}.out"), Duration::from_secs(90))
        .await;
    String::from_utf8_lossy(&output).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_on_ec2_instances_and_none_outlives_the_server() {
    let test = "jobs_run_on_ec2_instances_and_none_outlives_the_server";
    let Some((moto, sshd)) = fixtures(test) else {
        return;
    };
    let work = sshd.scratch("work");
    let dir = tempfile::tempdir().unwrap();
    let mut server = Tangod::start(
        &dir.path().join("data"),
        &server_config(&moto, &sshd, &work, 64201),
    );
    let c = server.client();
    c.open("lab").await;
    c.upload("lab", "Makefile", MAKEFILE).await;

    let output = run_job(&c, "first", "hello from ec2", None).await;
    assert!(output.contains("uid=64201"), "{output}");
    assert!(output.contains("hello from ec2"), "{output}");
    assert!(output.contains("Autodriver returned normally"), "{output}");
    // The instance is kept for the next job (reuse), and serves it.
    let output = run_job(&c, "second", "again", None).await;
    assert!(output.contains("again"), "{output}");
    assert!(!output.contains("hello from ec2"), "{output}");

    let ec2 = observer(&moto, &sshd, &work).await;
    let prefix = server.prefix.clone();
    assert_eq!(
        states(&ec2, &prefix, None).await,
        ["running"],
        "one instance, reused"
    );
    let status = server.sigterm();
    assert!(status.success(), "{status}: {}", server.log());
    assert_eq!(
        states(&ec2, &prefix, None).await,
        ["terminated"],
        "{}",
        server.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_instances_are_terminated_at_start() {
    let Some((moto, sshd)) = fixtures("orphan_instances_are_terminated_at_start") else {
        return;
    };
    let work = sshd.scratch("work");
    let dir = tempfile::tempdir().unwrap();
    let mut server = Tangod::start(
        &dir.path().join("data"),
        &server_config(&moto, &sshd, &work, 64202),
    );
    // A crash leaves instances of the server's prefix behind, and one of
    // another server.
    server.kill9();
    let ec2 = observer(&moto, &sshd, &work).await;
    let orphans = [
        Machine::new(&server.prefix, 9001, "host", "ec2"),
        Machine::new(&server.prefix, 9002, "host", "ec2"),
    ];
    let stranger_prefix = format!("{}z", server.prefix);
    let stranger = Machine::new(&stranger_prefix, 1, "host", "ec2");
    for vm in orphans.iter().chain([&stranger]) {
        ec2.initialize_vm(vm).await.unwrap();
    }
    assert_eq!(ec2.get_vms(&server.prefix).await.unwrap().len(), 2);

    server.restart();
    // The sweep runs before the server answers.
    assert!(
        ec2.get_vms(&server.prefix).await.unwrap().is_empty(),
        "{}",
        server.log()
    );
    assert_eq!(
        states(&ec2, &server.prefix, None).await,
        ["terminated", "terminated"]
    );
    assert_eq!(
        states(&ec2, &stranger_prefix, None).await,
        ["running"],
        "another server's instance is not touched"
    );
    ec2.safe_destroy_vm(&stranger).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_with_credentials_runs_on_its_own_instance_in_that_account() {
    let test = "a_job_with_credentials_runs_on_its_own_instance_in_that_account";
    let Some((moto, sshd)) = fixtures(test) else {
        return;
    };
    let work = sshd.scratch("work");
    let dir = tempfile::tempdir().unwrap();
    let server = Tangod::start(
        &dir.path().join("data"),
        &server_config(&moto, &sshd, &work, 64203),
    );
    let c = server.client();
    c.open("lab").await;
    c.upload("lab", "Makefile", MAKEFILE).await;
    let keys = moto.account_credentials("222222222222").unwrap();

    let output = run_job(&c, "paid", "in the course's account", Some(&keys)).await;
    assert!(output.contains("in the course's account"), "{output}");
    let ec2 = observer(&moto, &sshd, &work).await;
    // Launched in that account, and terminated after the job (the
    // backend refuses to reset such a VM, so the engine destroys it).
    let mut theirs = states(&ec2, &server.prefix, Some(&keys)).await;
    for _ in 0..50 {
        if theirs == ["terminated"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        theirs = states(&ec2, &server.prefix, Some(&keys)).await;
    }
    assert_eq!(theirs, ["terminated"], "{}", server.log());
    assert!(
        states(&ec2, &server.prefix, None).await.is_empty(),
        "nothing in the server's account"
    );
}

/// Warm pool VMs are the server's account's: a job with its own
/// credentials never runs on one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_with_credentials_never_takes_a_warm_instance() {
    let test = "a_job_with_credentials_never_takes_a_warm_instance";
    let Some((moto, sshd)) = fixtures(test) else {
        return;
    };
    let work = sshd.scratch("work");
    let dir = tempfile::tempdir().unwrap();
    let server = Tangod::start(
        &dir.path().join("data"),
        &server_config(&moto, &sshd, &work, 64204),
    );
    let c = server.client();
    c.open("lab").await;
    c.upload("lab", "Makefile", MAKEFILE).await;
    // A warm instance of the server's account waits in the pool.
    run_job(&c, "plain", "server account", None).await;
    let ec2 = observer(&moto, &sshd, &work).await;
    assert_eq!(states(&ec2, &server.prefix, None).await, ["running"]);

    let keys = moto.account_credentials("333333333333").unwrap();
    let output = run_job(&c, "paid", "own account", Some(&keys)).await;
    assert!(output.contains("own account"), "{output}");
    assert_eq!(
        states(&ec2, &server.prefix, Some(&keys)).await.len(),
        1,
        "the job ran on an instance of its own account"
    );
}

/// In CI (`CI` or `TANGO_TEST_EC2=1`, which scripts/test.sh runs these
/// tests with) a missing moto or sshd is a failure, not a skip.
fn must_run() -> bool {
    std::env::var_os("CI").is_some() || std::env::var("TANGO_TEST_EC2").as_deref() == Ok("1")
}
