//! The servers registry (issue 21) with real tangod processes: on one real
//! PostgreSQL two servers share the work (a file uploaded on one serves a
//! job added on the other; the output is polled on both); the one running
//! a job is killed and the other takes the job over once the lease lapsed,
//! and `/v2/servers`, `tango servers`, `/info` and `/metrics` show the
//! killed one dead and the other alive. With SQLite a restart right after
//! a crash is never refused.

mod common;
#[path = "../../tango-store/tests/support/postgres.rs"]
mod postgres;

use common::*;
use std::time::{Duration, Instant};

const LEASE_SECS: u64 = 3;

fn config(store: &str, name: &str) -> String {
    format!("store = \"{store}\"\n[server]\nname = \"{name}\"\nlease_secs = {LEASE_SECS}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_the_work_and_the_survivor_takes_over() {
    let test = "two_servers_share_the_work_and_the_survivor_takes_over";
    if !root_or_skip(test) {
        return;
    }
    let Some(pg) = postgres::PgServer::start(test) else {
        return;
    };
    let url = pg.create_db("tango");
    let dir = tempfile::tempdir().unwrap();
    let first = Tangod::start(&dir.path().join("data1"), &config(&url, "first"));
    let second = Tangod::start(&dir.path().join("data2"), &config(&url, "second"));
    let (c1, c2) = (first.client(), second.client());
    let first_address = first.url.trim_start_matches("http://").to_string();

    // Both heartbeat on: well past the lease, both are alive.
    tokio::time::sleep(Duration::from_secs(LEASE_SECS + 1)).await;
    let info = c1.get(&format!("/info/{KEY}/")).await;
    assert_eq!(info["info"]["server_name"], "first", "{info}");
    assert_eq!(info["info"]["servers_alive"], 2, "{info}");
    let list = c2.v2_list("/v2/servers", "servers").await;
    assert_eq!(list.len(), 2, "{list:?}");
    assert!(list.iter().all(|s| s["alive"] == true), "{list:?}");
    assert_eq!(by_name(&list, "second")["answering"], true, "{list:?}");

    // Opened and uploaded on one server, added on the other, the output
    // polled on both.
    c1.open("lab").await;
    c1.upload("lab", "Makefile", b"all:\n\t@echo shared $$(cat in.txt)\n")
        .await;
    c1.upload("lab", "in.txt", b"bytes-from-first").await;
    let files = c2.get(&format!("/open/{KEY}/lab/")).await;
    assert_eq!(files["statusMsg"], "Found directory", "{files}");
    assert!(files["files"].get("in.txt").is_some(), "{files}");
    let mut quick = job("quick", "quick", None, 30);
    quick["files"] = serde_json::json!([
        {"localFile": "Makefile", "destFile": "Makefile"},
        {"localFile": "in.txt", "destFile": "in.txt"}
    ]);
    let v = c2.add_job("lab", &quick).await;
    assert_eq!(v["statusMsg"], "Job added", "{v}");
    for c in [&c1, &c2] {
        let out = c.wait_output("lab", "quick", Duration::from_secs(30)).await;
        assert!(
            String::from_utf8_lossy(&out).contains("shared bytes-from-first"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    // A job in flight when the server running it is killed.
    c1.upload("lab", "Makefile", b"all:\n\t@sleep 3\n\t@echo finished\n")
        .await;
    let v = c1.add_job("lab", &job("slow", "slow", None, 30)).await;
    assert_eq!(v["statusMsg"], "Job added", "{v}");
    let id = v["jobId"].as_str().unwrap().to_string();
    let owner_query = format!(
        "SELECT s.name FROM jobs j JOIN servers s ON s.id = j.owner \
         WHERE j.id = {id} AND j.state = 'running'"
    );
    let started = Instant::now();
    let runner = loop {
        let name = pg.psql("tango", &owner_query);
        if !name.is_empty() {
            break name;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "job {id} never ran"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (mut dead, survivor) = match runner.as_str() {
        "first" => (first, second),
        _ => (second, first),
    };
    // Its output so far, asked of the server that does not run it.
    let partial = survivor
        .client()
        .get(&format!("/getPartialOutput/{KEY}/{id}/"))
        .await;
    assert_eq!(partial["statusMsg"], "Partial output obtained", "{partial}");
    let dead_address = dead.url.trim_start_matches("http://").to_string();
    dead.kill9();
    let killed = Instant::now();
    let c = survivor.client();
    let out = c
        .wait_output("lab", "slow", Duration::from_secs(LEASE_SECS + 30))
        .await;
    assert!(String::from_utf8_lossy(&out).contains("finished"));
    assert!(
        killed.elapsed() < Duration::from_secs(LEASE_SECS + 10 + 3),
        "taken over and run in {:?}",
        killed.elapsed()
    );
    let record = c.v2_get(&format!("/v2/jobs/{id}")).await;
    let trace = record.to_string();
    assert!(
        trace.contains(&format!("Re-queued: server \\\"{runner}\\\"")),
        "{trace}"
    );
    assert_eq!(record["retries"], 0, "a takeover spends no retry: {record}");
    let (first, second) = match runner.as_str() {
        "first" => ("first", "second"),
        _ => ("second", "first"),
    };
    let _ = first_address;
    let first_address = dead_address;

    let list = c.v2_list("/v2/servers", "servers").await;
    assert_eq!(list.len(), 2, "{list:?}");
    let (dead, alive) = (by_name(&list, first), by_name(&list, second));
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
    assert!(row(first).contains("dead"), "{table}");
    assert!(row(&first_address).contains(first), "{table}");
    assert!(
        row(&format!("{second} (this)")).contains("alive"),
        "{table}"
    );

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
    assert_eq!(info["info"]["server_name"], second, "{info}");
    assert_eq!(info["info"]["servers_alive"], 1, "{info}");
    let metrics = c.metrics_text().await;
    assert!(metrics.contains("\ntango_servers_alive 1\n"), "{metrics}");
    assert!(
        metrics.contains(&format!("\ntango_server_info{{server=\"{second}\"}} 1\n")),
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
            assert!(row(first).contains("dead"), "{rows}");
            assert!(row(&format!("{second} (this)")).contains("alive"), "{rows}");
        }
        None => eprintln!(
            "SKIPPED the dashboard part of {test}: no `chromium` (apt-get install -y chromium)"
        ),
    }

    // A clean stop removes the record: the next start need not wait.
    let mut survivor = survivor;
    assert!(survivor.sigterm().success());
    assert_eq!(
        pg.psql("tango", "SELECT string_agg(name, ',') FROM servers"),
        first
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
