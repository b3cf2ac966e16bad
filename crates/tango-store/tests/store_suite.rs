//! The store test suite, run against every store: SQLite always, and a real
//! PostgreSQL (see `support/postgres.rs`) with the `postgres` feature. Each
//! case gets a fresh database and a function that opens it (again).

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use support::job::job;
use tango_core::{JobState, OutboxEntry, ServerRecord, Store};

/// Opens the case's database; each call opens the same one again.
type Open<'a> = &'a (dyn Fn() -> Arc<dyn Store> + Sync);
type Opener = Box<dyn Fn() -> Arc<dyn Store> + Sync>;
type Case = fn(Open);

const SUITE: &[(&str, Case)] = &[
    (
        "ids_never_repeat_across_reopen",
        ids_never_repeat_across_reopen,
    ),
    (
        "ids_are_unique_across_stores_and_threads",
        ids_are_unique_across_stores_and_threads,
    ),
    ("jobs_by_state_and_limit", jobs_by_state_and_limit),
    (
        "finish_with_callback_and_outbox_order",
        finish_with_callback_and_outbox_order,
    ),
    ("outbox_update_replaces", outbox_update_replaces),
    ("files", files),
    ("save_job_time", save_job_time),
    (
        "servers_register_heartbeat_and_remove",
        servers_register_heartbeat_and_remove,
    ),
    (
        "servers_registering_at_once_see_each_other",
        servers_registering_at_once_see_each_other,
    ),
];

/// Runs every case on a fresh database from `fresh(case name)`.
fn run_suite(fresh: &dyn Fn(&str) -> Opener) {
    for (name, case) in SUITE {
        eprintln!("case {name}");
        let open = fresh(name);
        case(&*open);
    }
}

#[test]
fn sqlite_suite() {
    run_suite(&|_| {
        let dir = tempfile::tempdir().unwrap();
        Box::new(move || {
            Arc::new(tango_store::SqliteStore::open(&dir.path().join("t.db"), false).unwrap())
        })
    });
}

fn ids_never_repeat_across_reopen(open: Open) {
    let store = open();
    let a = store.next_job_id().unwrap();
    let b = store.next_job_id().unwrap();
    assert!(b > a);
    drop(store);
    let store = open();
    assert!(store.next_job_id().unwrap() > b);
    assert_eq!(store.next_vm_id().unwrap(), 1);
}

/// Two stores on one database (two servers) taking ids from 4 threads.
fn ids_are_unique_across_stores_and_threads(open: Open) {
    let stores = [open(), open()];
    let ids: Vec<u64> = std::thread::scope(|s| {
        let takers: Vec<_> = (0..4)
            .map(|t| {
                let store = stores[t % 2].clone();
                s.spawn(move || {
                    (0..50)
                        .map(|_| store.next_job_id().unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        takers.into_iter().flat_map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 200, "{ids:?}");
}

fn jobs_by_state_and_limit(open: Open) {
    let store = open();
    for id in 1..=5 {
        store.save_job(&job(id, JobState::Done)).unwrap();
    }
    store.save_job(&job(6, JobState::Queued)).unwrap();
    let dead = store
        .jobs_in_states(&[JobState::Done, JobState::Failed], Some(3))
        .unwrap();
    assert_eq!(dead.iter().map(|j| j.id).collect::<Vec<_>>(), vec![3, 4, 5]);
    let live = store.jobs_in_states(&[JobState::Queued], None).unwrap();
    assert_eq!(live.len(), 1);
    assert!(store.jobs_in_states(&[], None).unwrap().is_empty());
    let mut j = job(6, JobState::Running);
    j.retries = 2;
    store.save_job(&j).unwrap();
    assert_eq!(store.get_job(6).unwrap().unwrap(), j);
    assert!(store.get_job(99).unwrap().is_none());
    assert!(store
        .jobs_in_states(&[JobState::Queued], None)
        .unwrap()
        .is_empty());
    // Kept, as saved, across a reopen.
    drop(store);
    assert_eq!(open().get_job(6).unwrap().unwrap(), j);
}

fn entry(id: u64, due: i64) -> OutboxEntry {
    OutboxEntry {
        job_id: id,
        url: "http://x/".into(),
        output_file: "o".into(),
        body_path: "/tmp/o".into(),
        attempts: 0,
        next_attempt_ms: due,
        deadline_ms: 1000,
        last_error: None,
    }
}

fn finish_with_callback_and_outbox_order(open: Open) {
    let store = open();
    assert_eq!(store.outbox_next_due().unwrap(), None);
    store
        .finish_job(&job(1, JobState::Done), Some(&entry(1, 50)))
        .unwrap();
    store.finish_job(&job(3, JobState::Failed), None).unwrap();
    store.outbox_update(&entry(2, 10)).unwrap();
    assert_eq!(store.outbox_len().unwrap(), 2);
    assert_eq!(store.outbox_next_due().unwrap(), Some(10));
    let due = store.outbox_due(20, 10).unwrap();
    assert_eq!(due, vec![entry(2, 10)]);
    assert_eq!(store.outbox_due(100, 1).unwrap(), vec![entry(2, 10)]);
    store.outbox_remove(2).unwrap();
    assert_eq!(store.outbox_next_due().unwrap(), Some(50));
    assert_eq!(store.get_job(1).unwrap().unwrap().state, JobState::Done);
    assert_eq!(store.get_job(3).unwrap().unwrap().state, JobState::Failed);
}

fn outbox_update_replaces(open: Open) {
    let store = open();
    store.outbox_update(&entry(7, 10)).unwrap();
    let mut later = entry(7, 500);
    later.attempts = 3;
    later.last_error = Some("connection refused".into());
    store.outbox_update(&later).unwrap();
    assert_eq!(store.outbox_len().unwrap(), 1);
    assert_eq!(store.outbox_due(1000, 10).unwrap(), vec![later]);
}

fn files(open: Open) {
    let store = open();
    store.set_file("k-lab", "Makefile", "abc").unwrap();
    store.set_file("k-lab", "Makefile", "def").unwrap();
    store.set_file("k-lab", "a.c", "1").unwrap();
    store.set_file("k-lab", "_x", "2").unwrap();
    store.set_file("k-other", "x", "1").unwrap();
    assert_eq!(
        store.file_md5("k-lab", "Makefile").unwrap().as_deref(),
        Some("def")
    );
    assert_eq!(store.file_md5("k-lab", "x").unwrap(), None);
    // Byte order, whatever the database's locale.
    assert_eq!(
        store.files("k-lab").unwrap(),
        vec![
            ("Makefile".into(), "def".into()),
            ("_x".into(), "2".into()),
            ("a.c".into(), "1".into())
        ]
    );
}

/// Not a check: one measurement of a save's time, for comparing stores.
fn save_job_time(open: Open) {
    const SAVES: u64 = 300;
    let store = open();
    let started = std::time::Instant::now();
    for id in 1..=SAVES {
        store.save_job(&job(id, JobState::Queued)).unwrap();
    }
    let each = started.elapsed() / SAVES as u32;
    eprintln!("save_job: {each:?} each ({SAVES} saves, one after another)");
    assert_eq!(
        store
            .jobs_in_states(&[JobState::Queued], None)
            .unwrap()
            .len(),
        SAVES as usize
    );
}

fn server(name: &str, heartbeat_ms: i64) -> ServerRecord {
    ServerRecord {
        id: 0,
        name: name.into(),
        address: format!("{name}.example:3000"),
        version: "0.1.0".into(),
        started_ms: heartbeat_ms - 5,
        heartbeat_ms,
        lease_ms: 15_000,
        instance: Some(format!("machine/0/{name}")),
        prefix: format!("p-{name}"),
    }
}

fn servers_register_heartbeat_and_remove(open: Open) {
    let store = open();
    assert!(store.servers().unwrap().is_empty());
    let (a, seen) = store.register_server(&server("a", 1_000)).unwrap();
    assert!(seen.is_empty());
    let (b, seen) = store.register_server(&server("b", 2_000)).unwrap();
    assert_ne!(a, b);
    assert_eq!(
        seen,
        vec![ServerRecord {
            id: a,
            ..server("a", 1_000)
        }],
        "the other server, as recorded"
    );
    assert!(store.heartbeat_server(a, 7_000).unwrap());
    let all = store.servers().unwrap();
    assert_eq!(
        all.iter()
            .map(|s| (s.id, s.heartbeat_ms))
            .collect::<Vec<_>>(),
        vec![(a, 7_000), (b, 2_000)]
    );
    assert_eq!(all[1].address, "b.example:3000");
    store.remove_server(a).unwrap();
    assert!(!store.heartbeat_server(a, 8_000).unwrap(), "no record left");
    // Kept across a reopen; a removed server's id is never given again.
    drop(store);
    let store = open();
    assert_eq!(
        store
            .servers()
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect::<Vec<_>>(),
        vec![b]
    );
    store.remove_server(b).unwrap();
    let unlocked = ServerRecord {
        instance: None,
        ..server("c", 9_000)
    };
    let (c, seen) = store.register_server(&unlocked).unwrap();
    assert!(seen.is_empty());
    assert!(c > b, "{c} after {b}");
    assert_eq!(
        store.servers().unwrap(),
        vec![ServerRecord { id: c, ..unlocked }]
    );
}

/// Eight servers (on two stores) registering at once: each sees every one
/// registered before it, so exactly one saw none (the guard's premise).
fn servers_registering_at_once_see_each_other(open: Open) {
    let stores = [open(), open()];
    let start = std::sync::Barrier::new(8);
    let seen: Vec<(u64, Vec<u64>)> = std::thread::scope(|s| {
        let registering: Vec<_> = (0..8)
            .map(|t| {
                let (store, start) = (stores[t % 2].clone(), &start);
                s.spawn(move || {
                    start.wait();
                    let (id, others) = store
                        .register_server(&server(&format!("s{t}"), 1_000))
                        .unwrap();
                    (id, others.iter().map(|o| o.id).collect::<Vec<_>>())
                })
            })
            .collect();
        registering.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let mut counts: Vec<usize> = seen.iter().map(|(_, others)| others.len()).collect();
    counts.sort();
    assert_eq!(counts, (0..8).collect::<Vec<_>>(), "{seen:?}");
    for (id, others) in &seen {
        assert!(others.iter().all(|o| o < id), "{seen:?}");
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::support::job::job;
    use super::support::postgres::PgServer;
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tango_core::{JobState, Store};
    use tango_store::{PostgresOptions, PostgresStore};

    /// A fresh server with an empty database `t`, and its URL; None to skip.
    fn server_with_db(test: &str) -> Option<(PgServer, String)> {
        let server = PgServer::start(test)?;
        let url = server.create_db("t");
        Some((server, url))
    }

    #[test]
    fn postgres_suite() {
        let Some(server) = PgServer::start("postgres_suite") else {
            return;
        };
        super::run_suite(&|name| {
            let url = server.create_db(name);
            Box::new(move || Arc::new(PostgresStore::open(&url).unwrap()))
        });
    }

    /// Two servers' stores on one database: claiming in turns without
    /// overlap, ownership refusing other servers' writes, a finish recorded
    /// once with its output and callback body, retiring a dead server and
    /// releasing its jobs once, and upload bytes in chunks.
    #[test]
    fn shared_store_claims_fences_and_keeps_the_bytes() {
        use tango_core::SharedOutput;
        let Some((_server, url)) = server_with_db("shared_store_claims_fences_and_keeps_the_bytes")
        else {
            return;
        };
        let (a, b) = (
            PostgresStore::open(&url).unwrap(),
            PostgresStore::open(&url).unwrap(),
        );
        let (sa, _) = a.register_server(&super::server("a", 1_000)).unwrap();
        let (sb, _) = b.register_server(&super::server("b", 1_000)).unwrap();
        let (a_shared, b_shared) = (a.shared().unwrap(), b.shared().unwrap());

        // alice submits four, then bob and carol one each.
        let submitters = ["alice", "alice", "alice", "alice", "bob", "carol"];
        let ids: Vec<u64> = submitters
            .iter()
            .map(|who| {
                let mut j = job(a.next_job_id().unwrap(), JobState::Queued);
                j.submitter = who.to_string();
                a.save_job(&j).unwrap();
                j.id
            })
            .collect();
        let first = a_shared.claim_jobs(sa, 3).unwrap();
        assert_eq!(
            first.iter().map(|j| j.id).collect::<Vec<_>>(),
            vec![ids[0], ids[4], ids[5]],
            "every submitter's first job before alice's second"
        );
        assert!(first.iter().all(|j| j.owner == Some(sa)));
        let rest = b_shared.claim_jobs(sb, 10).unwrap();
        assert_eq!(
            rest.iter().map(|j| j.id).collect::<Vec<_>>(),
            ids[1..4].to_vec()
        );
        assert!(b_shared.claim_jobs(sb, 10).unwrap().is_empty());

        // Claims at once never take one job twice.
        let more: Vec<u64> = (0..20)
            .map(|_| {
                let j = job(a.next_job_id().unwrap(), JobState::Queued);
                a.save_job(&j).unwrap();
                j.id
            })
            .collect();
        let taken: Vec<Vec<u64>> = std::thread::scope(|scope| {
            let (a, b) = (&a, &b);
            let claims: Vec<_> = (0..4)
                .map(|i| {
                    scope.spawn(move || {
                        let (store, me) = if i % 2 == 0 { (a, sa) } else { (b, sb) };
                        let mut got = Vec::new();
                        while let Some(job) =
                            store.shared().unwrap().claim_jobs(me, 1).unwrap().pop()
                        {
                            got.push(job.id);
                        }
                        got
                    })
                })
                .collect();
            claims.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let mut all: Vec<u64> = taken.concat();
        all.sort_unstable();
        assert_eq!(all, more, "each claimed once");

        // Only the owner writes a claimed job.
        let mut mine = first[0].clone();
        mine.owner = Some(sb);
        let e = b.save_job(&mine).unwrap_err();
        assert!(e.0.contains("belongs to another server"), "{e}");
        mine.owner = Some(sa);
        mine.state = JobState::Running;
        a.save_job(&mine).unwrap();

        // Finished once, by its owner, with its output and callback body.
        let output = SharedOutput {
            courselab_dir: mine.courselab_dir.clone(),
            output_file: "out".into(),
            content: b"the output".to_vec(),
        };
        let callback = super::entry(mine.id, 0);
        let mut done = mine.clone();
        done.state = JobState::Done;
        assert!(!b_shared
            .finish_owned(&done, sb, &output, Some(&callback))
            .unwrap());
        assert!(a_shared
            .finish_owned(&done, sa, &output, Some(&callback))
            .unwrap());
        assert!(
            !a_shared
                .finish_owned(&done, sa, &output, Some(&callback))
                .unwrap(),
            "a finished job is not finished again"
        );
        let stored = b.get_job(mine.id).unwrap().unwrap();
        assert_eq!((stored.state, stored.owner), (JobState::Done, None));
        assert_eq!(
            b_shared
                .output(&mine.courselab_dir, "out")
                .unwrap()
                .unwrap(),
            b"the output"
        );
        assert_eq!(
            b_shared.callback_body(mine.id).unwrap().unwrap(),
            b"the output"
        );
        let claimed = a.outbox_claim(1, 90_000, 10).unwrap();
        assert_eq!(claimed.len(), 1);
        assert!(
            b.outbox_claim(1, 90_000, 10).unwrap().is_empty(),
            "claimed once"
        );

        // b dies: retired once, its heartbeats refused, its jobs orphans,
        // each released once.
        assert!(a_shared.retire_server(sb, 50_000).unwrap());
        assert!(!b_shared.retire_server(sb, 50_000).unwrap());
        assert!(!b.heartbeat_server(sb, 51_000).unwrap());
        let orphans = a_shared.orphaned_jobs().unwrap();
        let of_b: Vec<u64> = orphans.iter().map(|j| j.id).collect();
        assert!(of_b.starts_with(&ids[1..4]), "{of_b:?}");
        assert!(orphans.iter().all(|j| j.owner == Some(sb)));
        for job in &orphans {
            let requeued = tango_core::Job {
                state: JobState::Queued,
                ..job.clone()
            };
            assert!(a_shared.release_job(&requeued, sb).unwrap());
            assert!(!b_shared.release_job(&requeued, sb).unwrap());
        }
        assert!(a_shared.orphaned_jobs().unwrap().is_empty());
        assert!(
            b_shared.claim_jobs(sb, 100).unwrap().is_empty(),
            "a retired server claims nothing"
        );
        assert_eq!(a_shared.claim_jobs(sa, 100).unwrap().len(), orphans.len());

        // Upload bytes, in chunks, fetched whole on the other server.
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..(5 << 19) + 7).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("big"), &big).unwrap();
        a_shared
            .put_blob("md5big", &dir.path().join("big"))
            .unwrap();
        a_shared
            .put_blob("md5big", &dir.path().join("big"))
            .unwrap();
        assert!(b_shared
            .fetch_blob("md5big", &dir.path().join("back"))
            .unwrap());
        assert_eq!(std::fs::read(dir.path().join("back")).unwrap(), big);
        assert!(!b_shared
            .fetch_blob("nothing", &dir.path().join("none"))
            .unwrap());
        std::fs::write(dir.path().join("empty"), b"").unwrap();
        a_shared
            .put_blob("md5empty", &dir.path().join("empty"))
            .unwrap();
        assert!(b_shared
            .fetch_blob("md5empty", &dir.path().join("empty-back"))
            .unwrap());
        assert!(std::fs::read(dir.path().join("empty-back"))
            .unwrap()
            .is_empty());

        assert!(a_shared.open_courselab("k-lab").unwrap());
        assert!(!b_shared.open_courselab("k-lab").unwrap());
        assert!(b_shared.courselab_exists("k-lab").unwrap());
        assert!(!b_shared.courselab_exists("k-other").unwrap());
    }

    #[test]
    fn three_servers_opening_a_fresh_database_at_once() {
        let Some(server) = PgServer::start("three_servers_opening_a_fresh_database_at_once") else {
            return;
        };
        let url = server.create_db("shared");
        let start = std::sync::Barrier::new(3);
        let stores: Vec<PostgresStore> = std::thread::scope(|s| {
            let openers: Vec<_> = (0..3)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        PostgresStore::open(&url)
                    })
                })
                .collect();
            openers
                .into_iter()
                .map(|o| o.join().unwrap().unwrap())
                .collect()
        });
        // Each migration applied once.
        assert_eq!(
            server.psql(
                "shared",
                "SELECT count(*) || ' ' || count(DISTINCT version) FROM _sqlx_migrations"
            ),
            format!("{0} {0}", tango_store::postgres::SCHEMA_VERSION)
        );
        let ids: std::collections::HashSet<u64> =
            stores.iter().map(|s| s.next_job_id().unwrap()).collect();
        assert_eq!(ids.len(), 3);
        stores[0].save_job(&job(1, JobState::Queued)).unwrap();
        assert_eq!(
            stores[2].get_job(1).unwrap(),
            Some(job(1, JobState::Queued))
        );
    }

    #[test]
    fn a_database_of_a_newer_schema_is_refused_untouched() {
        let Some((server, url)) =
            server_with_db("a_database_of_a_newer_schema_is_refused_untouched")
        else {
            return;
        };
        let store = PostgresStore::open(&url).unwrap();
        store.save_job(&job(1, JobState::Queued)).unwrap();
        drop(store);
        server.psql(
            "t",
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
             execution_time) VALUES (999, 'future', true, '\\x00', 0)",
        );
        let snapshot = || {
            server.psql(
                "t",
                "SELECT (SELECT string_agg(version::text, ',' ORDER BY version) FROM \
                 _sqlx_migrations) || ' ' || (SELECT string_agg(record, ',') FROM jobs) || ' ' \
                 || (SELECT count(*) FROM pg_tables WHERE schemaname = 'public')",
            )
        };
        let before = snapshot();
        let e = PostgresStore::open(&url).err().expect("refused");
        assert!(
            e.0.contains("schema version 999")
                && e.0.contains(&format!(
                    "versions up to {}",
                    tango_store::postgres::SCHEMA_VERSION
                ))
                && e.0.contains("restore a backup"),
            "{e}"
        );
        assert_eq!(snapshot(), before);
    }

    #[test]
    fn a_finished_job_and_its_callback_are_one_transaction() {
        let Some((server, url)) =
            server_with_db("a_finished_job_and_its_callback_are_one_transaction")
        else {
            return;
        };
        let store = PostgresStore::open(&url).unwrap();
        store.save_job(&job(9, JobState::Running)).unwrap();
        server.psql(
            "t",
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$; \
             CREATE TRIGGER refuse BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION refuse()",
        );
        let e = store
            .finish_job(&job(9, JobState::Done), Some(&super::entry(9, 10)))
            .expect_err("the callback cannot be written");
        assert!(e.0.contains("refused by the test"), "{e}");
        // The job's state was not written without its callback.
        assert_eq!(store.get_job(9).unwrap(), Some(job(9, JobState::Running)));
        assert_eq!(store.outbox_len().unwrap(), 0);
    }

    #[test]
    fn a_restarted_or_stopped_postgres_gives_errors_then_service() {
        let Some((server, url)) = server_with_db("a_restarted_or_stopped_postgres") else {
            return;
        };
        let options = PostgresOptions {
            call_timeout: Duration::from_secs(3),
            ..PostgresOptions::default()
        };
        let store = PostgresStore::open_with(&url, options).unwrap();
        store.save_job(&job(1, JobState::Queued)).unwrap();
        // Restarted between two calls: the pool's connections are dead,
        // and the next call makes a new one.
        server.restart();
        store.save_job(&job(2, JobState::Queued)).unwrap();
        assert_eq!(store.get_job(1).unwrap(), Some(job(1, JobState::Queued)));

        // Stopped: calls fail within the time limit, saying what to check.
        server.stop();
        let started = Instant::now();
        let e = store
            .save_job(&job(3, JobState::Queued))
            .expect_err("no database");
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{:?}",
            started.elapsed()
        );
        assert!(
            e.0.contains(&format!("127.0.0.1:{}/t", server.port))
                && e.0.contains("saving a job")
                && e.0.contains("is PostgreSQL running"),
            "{e}"
        );
        server.start_again();
        store.save_job(&job(3, JobState::Queued)).unwrap();
        let ids: Vec<u64> = store
            .jobs_in_states(&[JobState::Queued], None)
            .unwrap()
            .iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(ids, vec![1, 2, 3]);
    }

    #[test]
    fn opening_errors_say_what_to_do() {
        let Some(server) = PgServer::start("opening_errors_say_what_to_do") else {
            return;
        };
        let quick = PostgresOptions {
            call_timeout: Duration::from_secs(1),
            open_timeout: Duration::from_secs(2),
            ..PostgresOptions::default()
        };
        let e = PostgresStore::open_with(&server.url("missing"), quick.clone())
            .err()
            .expect("no such database");
        assert!(e.0.contains("createdb") && e.0.contains("/missing"), "{e}");
        let e = PostgresStore::open_with(
            &format!("postgres://nobody@127.0.0.1:{}/postgres", server.port),
            quick.clone(),
        )
        .err()
        .expect("no such role");
        assert!(e.0.contains("does the role exist"), "{e}");
        drop(server);
        let e = PostgresStore::open_with("postgres://postgres@127.0.0.1:1/t", quick)
            .err()
            .expect("nothing listens");
        assert!(
            e.0.contains("127.0.0.1:1/t") && e.0.contains("is PostgreSQL running"),
            "{e}"
        );
        let e = PostgresStore::open("mysql://x")
            .err()
            .expect("not postgres");
        assert!(e.0.contains("postgres://USER"), "{e}");
    }
}
