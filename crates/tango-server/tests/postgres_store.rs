//! tangod on the PostgreSQL store (`store = "postgres://…"`), against a real
//! PostgreSQL and the sandbox backend: jobs run, tangod is killed with jobs
//! queued and running, and the next start finds them all in the database.

mod common;
#[path = "../../tango-store/tests/support/postgres.rs"]
mod postgres;

use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_on_postgres_survive_a_crash_of_tangod() {
    const JOBS: usize = 6;
    if !root_or_skip("jobs_on_postgres_survive_a_crash_of_tangod") {
        return;
    }
    let Some(pg) = postgres::PgServer::start("jobs_on_postgres_survive_a_crash_of_tangod") else {
        return;
    };
    let url = pg.create_db("tango");
    let dir = tempfile::tempdir().unwrap();
    let mut server = Tangod::start(
        &dir.path().join("data"),
        &format!("store = \"{url}\"\n[engine]\nmax_vms = 2\n"),
    );
    let c = server.client();
    let receiver = Receiver::start().await;
    c.open("lab").await;
    c.upload("lab", "Makefile", b"all:\n\t@sleep 1\n\t@echo finished\n")
        .await;
    let mut ids = Vec::new();
    for i in 0..JOBS {
        let v = c
            .add_job(
                "lab",
                &job(
                    &format!("p{i}"),
                    &format!("p{i}"),
                    Some(&receiver.url_for(&format!("p{i}"))),
                    30,
                ),
            )
            .await;
        assert_eq!(v["statusMsg"], "Job added", "{v}");
        ids.push(v["jobId"].as_str().unwrap().parse::<u64>().unwrap());
    }
    // Killed with jobs done, running and queued (two run at a time).
    receiver.wait_for(2, Duration::from_secs(60)).await;
    server.kill9();
    assert!(receiver.count() < JOBS, "every job ended before the crash");
    assert!(
        !server.data_dir.join("tango.db").exists(),
        "the SQLite store was made beside PostgreSQL"
    );
    let in_db: usize = pg
        .psql("tango", "SELECT count(*) FROM jobs")
        .parse()
        .unwrap();
    assert_eq!(in_db, JOBS);

    server.restart();
    receiver.wait_for(JOBS, Duration::from_secs(60)).await;
    for i in 0..JOBS {
        let got = receiver.get(&format!("p{i}"));
        let body = String::from_utf8_lossy(&got.last().expect("called back").body).into_owned();
        assert!(body.contains("finished"), "job {i}: {body}");
    }
    let v = c.get(&format!("/jobs/{KEY}/1/")).await;
    let mut dead: Vec<u64> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    dead.sort();
    assert_eq!(dead, ids, "{v}");
    assert_eq!(
        pg.psql("tango", "SELECT count(*) FROM jobs WHERE state = 'done'"),
        JOBS.to_string()
    );
    // Ids go on from the database's sequence.
    let v = c.add_job("lab", &job("after", "after", None, 30)).await;
    let after: u64 = v["jobId"].as_str().unwrap().parse().unwrap();
    assert!(after > *ids.iter().max().unwrap(), "{after} after {ids:?}");
}

#[test]
fn a_store_that_is_not_sqlite_or_postgres_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(tangod_bin())
        .args([
            "--key",
            "k",
            "--store",
            "mysql://u:secret@h/db",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("neither \"sqlite\" nor a PostgreSQL URL") && !err.contains("secret"),
        "{err}"
    );
}

#[test]
fn print_config_hides_the_store_password() {
    let out = std::process::Command::new(tangod_bin())
        .args([
            "--key",
            "k",
            "--store",
            "postgres://tango:secret@db.example.edu:5433/tango",
            "--print-config",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("store = \"postgres://tango:REDACTED@db.example.edu:5433/tango\""),
        "{text}"
    );
}
