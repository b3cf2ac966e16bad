//! Upgrades. A data dir that the release before schema versions (commit
//! 0c57581) wrote, with a finished, a running and two queued jobs, opens with
//! this build and every job goes on; a data dir of a newer schema is refused
//! with a message saying what to do, and left as it was.
//!
//! tests/fixtures/data-0c57581 was made by scripts/make-upgrade-fixture.sh
//! with tangod built at 0c57581: that tangod ran `finished` to its end and
//! was killed with -9 while `running` ran and `queued3` and `queued4`
//! waited. It holds the database as SQL (`sqlite3 .dump`, the data dir's
//! path replaced by @DATA_DIR@), the uploaded files, their blobs and the
//! finished job's output.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tango_store::SCHEMA_VERSION;

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The old release's data dir, made again at `data`.
fn old_data_dir(data: &Path) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data-0c57581");
    copy_tree(&fixture.join("courselabs"), &data.join("courselabs"));
    copy_tree(&fixture.join("blobs"), &data.join("blobs"));
    let sql = std::fs::read_to_string(fixture.join("tango.sql"))
        .unwrap()
        .replace("@DATA_DIR@", data.to_str().unwrap());
    let conn = rusqlite::Connection::open(data.join("tango.db")).unwrap();
    // As the old tangod left it: WAL mode, no version.
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.execute_batch(&sql).unwrap();
    let version: u32 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .unwrap();
    assert_eq!(version, 0);
}

fn user_version(db: &Path) -> u32 {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap()
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_release_data_dir_opens_and_every_job_goes_on() {
    if !root_or_skip("the_previous_release_data_dir_opens_and_every_job_goes_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    old_data_dir(&data);
    let server = Tangod::start(&data, "");
    let c = server.client();
    assert_eq!(user_version(&data.join("tango.db")), SCHEMA_VERSION);

    // The finished job: its output and its record as they were.
    let out1 = String::from_utf8(c.poll("lab", "out1").await.expect("out1")).unwrap();
    assert!(out1.contains("Received job finished:1"), "{out1}");
    assert!(out1.ends_with("job 1 ran"), "{out1}");
    let dead = c.get(&format!("/jobs/{KEY}/1/")).await;
    let finished = dead["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == 1)
        .unwrap_or_else(|| panic!("job 1 is not among the dead jobs: {dead}"));
    assert_eq!(finished["name"], "finished");
    // Stored before jobs had a submitter: the one its name shows.
    assert_eq!(finished["submitter"], "finished", "{finished}");
    let last = finished["trace"].as_array().unwrap().last().unwrap();
    assert!(
        last.as_str()
            .unwrap()
            .contains("Autodriver returned normally"),
        "{finished}"
    );

    // The running one is run again, the queued ones run.
    for (id, name) in [(2, "running"), (3, "queued3"), (4, "queued4")] {
        let out = c
            .wait_output("lab", &format!("out{id}"), Duration::from_secs(60))
            .await;
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains(&format!("Received job {name}:{id}")), "{out}");
        assert!(
            out.contains("Success: Autodriver returned normally"),
            "{out}"
        );
        assert!(out.ends_with(&format!("job {id} ran")), "{out}");
    }
    let live = c.get(&format!("/jobs/{KEY}/0/")).await;
    assert_eq!(live["jobs"], serde_json::json!([]), "{live}");

    // Job ids go on from the old sequence, and the old uploads are known.
    let v = c.open("lab").await;
    assert_eq!(
        v["files"]["id4.txt"], "7937fc3e3cbb4ec482df169467aab076",
        "{v}"
    );
    let mut body = job("after", "out5", None, 20);
    body["files"] = serde_json::json!([
        {"localFile": "fast.mk", "destFile": "Makefile"},
        {"localFile": "id1.txt", "destFile": "id.txt"},
    ]);
    let v = c.add_job("lab", &body).await;
    assert_eq!(v["jobId"], "5", "{v}");
    let out = c.wait_output("lab", "out5", Duration::from_secs(30)).await;
    assert!(out.ends_with(b"job 1 ran"));
}

/// Every file of `dir` with its bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

/// tangod on `data` until it exits (at most a minute: a tangod that took
/// the data dir would serve for ever): its status and standard error.
fn run_tangod(data: &Path) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tangod"))
        .arg("--data-dir")
        .arg(data)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--key")
        .arg(KEY)
        // Its own VM prefix: the refusal must not hinge on another tangod
        // of this host holding the default one.
        .env(
            "DOCKER_DEPLOYMENT",
            format!("upgrade-{}", std::process::id()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "tangod still ran after 60 s on a data dir it should refuse: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_data_dir_of_a_newer_schema_is_refused_and_left_as_it_was() {
    let newer = SCHEMA_VERSION + 1;
    let dir = tempfile::tempdir().unwrap();
    // A newer tangod stopped cleanly (the version in the database file's
    // header), and one killed before its WAL was checkpointed (the version
    // only in the WAL).
    for crashed in [false, true] {
        let staging = dir.path().join(format!("staging-{crashed}"));
        old_data_dir(&staging);
        let data = dir.path().join(format!("data-{crashed}"));
        std::fs::create_dir_all(&data).unwrap();
        let conn = rusqlite::Connection::open(staging.join("tango.db")).unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        conn.pragma_update(None, "user_version", newer).unwrap();
        if crashed {
            for file in ["tango.db", "tango.db-wal"] {
                std::fs::copy(staging.join(file), data.join(file)).unwrap();
            }
        } else {
            drop(conn);
            std::fs::copy(staging.join("tango.db"), data.join("tango.db")).unwrap();
        }
        let before = snapshot(&data);
        let (status, stderr) = run_tangod(&data);
        assert!(!status.success(), "tangod started on a newer database");
        assert!(
            stderr.contains(&format!("has schema version {newer}"))
                && stderr.contains(&format!("knows versions up to {SCHEMA_VERSION}"))
                && stderr.contains("Run that newer tangod")
                && stderr.contains("restore a backup"),
            "{stderr}"
        );
        // The database (and its WAL) are byte for byte as they were;
        // SQLite's shared-memory index, made to read the WAL, holds no data.
        let after: Vec<_> = snapshot(&data)
            .into_iter()
            .filter(|(name, _)| name != "tango.db-shm")
            .collect();
        assert_eq!(after, before, "crashed: {crashed}");
        assert_eq!(
            std::fs::read_dir(&data).unwrap().count(),
            before.len() + usize::from(crashed),
            "nothing else was made in the data dir"
        );
    }
}
