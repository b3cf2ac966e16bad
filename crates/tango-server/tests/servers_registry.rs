//! The servers registry (issue 21) with real tangod processes: on one real
//! PostgreSQL a second server refuses to start while the first is alive,
//! starts once the first was killed and its lease lapsed, takes its jobs,
//! and `/v2/servers`, `tango servers`, `/info` and `/metrics` show the
//! first dead and the second alive. With SQLite a restart right after a
//! crash is never refused.

mod common;
#[path = "../../tango-store/tests/support/postgres.rs"]
mod postgres;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LEASE_SECS: u64 = 3;

fn config(store: &str, name: &str) -> String {
    format!("store = \"{store}\"\n[server]\nname = \"{name}\"\nlease_secs = {LEASE_SECS}\n")
}

/// tangod as a plain process that is expected to exit: (exit code, stderr).
fn tangod_that_exits(dir: &Path, store: &str, name: &str) -> (Option<i32>, String) {
    let config_file = dir.join("refused.toml");
    // Its own VM prefix: a refused server must not even contend for the
    // running one's prefix lock.
    std::fs::write(
        &config_file,
        format!(
            "{}[engine]\nprefix = \"refused{}\"\n",
            config(store, name),
            std::process::id()
        ),
    )
    .unwrap();
    let log = dir.join("refused.log");
    let mut child = Command::new(tangod_bin())
        .args(["--listen", "127.0.0.1:0", "--key", KEY, "--data-dir"])
        .arg(dir.join("refused-data"))
        .arg("--config")
        .arg(&config_file)
        .arg("--autodriver")
        .arg(autodriver())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tangod did not exit: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.code(), std::fs::read_to_string(&log).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_postgres_waits_for_the_first_ones_lease() {
    let test = "a_second_server_on_postgres_waits_for_the_first_ones_lease";
    if !root_or_skip(test) {
        return;
    }
    let Some(pg) = postgres::PgServer::start(test) else {
        return;
    };
    let url = pg.create_db("tango");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut first = Tangod::start(&data, &config(&url, "first"));
    let c = first.client();
    let first_address = first.url.trim_start_matches("http://").to_string();

    let info = c.get(&format!("/info/{KEY}/")).await;
    assert_eq!(info["info"]["server_name"], "first", "{info}");
    assert_eq!(info["info"]["servers_alive"], 1, "{info}");

    // Refused while the first is alive, naming it, and leaving no record.
    let (code, stderr) = tangod_that_exits(dir.path(), &url, "second");
    assert_eq!(code, Some(1), "{stderr}");
    for part in [
        "another tangod is alive on this database",
        "\"first\"",
        &format!("at {first_address}"),
        "last heartbeat",
        &format!("lease {LEASE_SECS} s"),
        "not supported yet (issue 21)",
    ] {
        assert!(stderr.contains(part), "{part:?} not in {stderr}");
    }
    assert_eq!(
        pg.psql("tango", "SELECT string_agg(name, ',') FROM servers"),
        "first"
    );
    // The first heartbeats on: it stays alive well past its lease.
    tokio::time::sleep(Duration::from_secs(LEASE_SECS + 1)).await;
    let list = c.v2_list("/v2/servers", "servers").await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["alive"], true, "{list:?}");
    assert_eq!(list[0]["answering"], true, "{list:?}");
    assert!(
        list[0]["heartbeat_age_ms"].as_i64().unwrap() < (LEASE_SECS * 1000) as i64,
        "{list:?}"
    );

    // A job in flight when the first is killed.
    c.open("lab").await;
    c.upload("lab", "Makefile", b"all:\n\t@sleep 2\n\t@echo finished\n")
        .await;
    let v = c.add_job("lab", &job("slow", "slow", None, 30)).await;
    assert_eq!(v["statusMsg"], "Job added", "{v}");
    first.kill9();
    let killed = Instant::now();

    // Until its lease lapses the dead server still counts as alive.
    let (code, stderr) = tangod_that_exits(dir.path(), &url, "second");
    assert_eq!(code, Some(1), "refused within the lease: {stderr}");
    let lapsed = Duration::from_millis(LEASE_SECS * 1000 + 300);
    tokio::time::sleep(lapsed.saturating_sub(killed.elapsed())).await;

    // The second starts on the same data dir and takes the job.
    let second = Tangod::start(&data, &config(&url, "second"));
    let c = second.client();
    let out = c.wait_output("lab", "slow", Duration::from_secs(30)).await;
    assert!(String::from_utf8_lossy(&out).contains("finished"));

    let list = c.v2_list("/v2/servers", "servers").await;
    assert_eq!(list.len(), 2, "{list:?}");
    let (dead, alive) = (by_name(&list, "first"), by_name(&list, "second"));
    assert_eq!(dead["alive"], false, "{list:?}");
    assert_eq!(dead["answering"], false, "{list:?}");
    assert_eq!(dead["address"], first_address.as_str(), "{list:?}");
    assert!(
        dead["heartbeat_age_ms"].as_i64().unwrap() >= (LEASE_SECS * 1000) as i64,
        "{list:?}"
    );
    assert_eq!(alive["alive"], true, "{list:?}");
    assert_eq!(alive["answering"], true, "{list:?}");
    assert_eq!(alive["lease_ms"], LEASE_SECS * 1000, "{list:?}");
    assert_eq!(alive["version"], env!("CARGO_PKG_VERSION"), "{list:?}");

    let (code, table, stderr) = tango(&c.url, KEY, &["servers"]).await;
    assert_eq!(code, 0, "{stderr}");
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("no {name} row in\n{table}"))
            .to_string()
    };
    assert!(row("first").contains("dead"), "{table}");
    assert!(row(&first_address).contains("first"), "{table}");
    assert!(row("second (this)").contains("alive"), "{table}");

    // /info keeps Tango's fields and adds the server's.
    let info = c.get(&format!("/info/{KEY}/")).await;
    assert_eq!(info["statusId"], 0, "{info}");
    for field in [
        "elapsed_secs",
        "job_requests",
        "num_threads",
        "runjob_errors",
    ] {
        assert!(info["info"].get(field).is_some(), "{field} in {info}");
    }
    assert_eq!(info["info"]["server_name"], "second", "{info}");
    assert_eq!(info["info"]["servers_alive"], 1, "{info}");
    let metrics = c.metrics_text().await;
    assert!(metrics.contains("\ntango_servers_alive 1\n"), "{metrics}");
    assert!(
        metrics.contains("\ntango_server_info{server=\"second\"} 1\n"),
        "{metrics}"
    );

    // The dashboard's Servers table, in a real browser.
    match chromium(
        &format!("{}/dashboard#key={KEY}", c.url),
        &["--dump-dom".into()],
    )
    .await
    {
        Some(dom) => {
            let rows = table_body(&dom, "servers");
            assert_eq!(rows.matches("<tr").count(), 2, "{rows}");
            let row = |name: &str| {
                let at = rows
                    .find(name)
                    .unwrap_or_else(|| panic!("no {name} in {rows}"));
                &rows[at..at + rows[at..].find("</tr>").unwrap()]
            };
            assert!(row("first").contains("dead"), "{rows}");
            assert!(row("second (this)").contains("alive"), "{rows}");
        }
        None => eprintln!(
            "SKIPPED the dashboard part of {test}: no `chromium` (apt-get install -y chromium)"
        ),
    }

    // A clean stop removes the record: the next start need not wait.
    let mut second = second;
    assert!(second.sigterm().success());
    assert_eq!(
        pg.psql("tango", "SELECT string_agg(name, ',') FROM servers"),
        "first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sqlite_a_restart_right_after_a_crash_is_not_refused() {
    if !root_or_skip("with_sqlite_a_restart_right_after_a_crash_is_not_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut server = Tangod::start(&dir.path().join("data"), &config("sqlite", "solo"));
    let before = server.client().v2_list("/v2/servers", "servers").await;
    assert_eq!(before.len(), 1, "{before:?}");
    // Within the lease of the killed run: SQLite has one server, so the
    // earlier record is a dead run, dropped.
    server.restart();
    let after = server.client().v2_list("/v2/servers", "servers").await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after[0]["id"], before[0]["id"], "{after:?}");
    assert_eq!(after[0]["alive"], true);
    assert_eq!(after[0]["name"], "solo");
}
