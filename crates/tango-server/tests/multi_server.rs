//! Several tangod servers on one PostgreSQL (issue 21), end to end: three
//! real tangod processes on the sandbox backend share one real PostgreSQL,
//! each with its own data dir, VM prefix and name, and a short lease. Jobs
//! are uploaded on one server, added on another and polled on a third; a
//! server is killed, frozen past its lease, and PostgreSQL is restarted
//! under a batch. Every job must end with its own output and exactly one
//! callback, whichever servers ran and delivered it.
//!
//! The tests run one at a time (three servers each on a small machine):
//! a server starved of CPU by a neighbouring test would miss its
//! heartbeats and lose its lease for no reason the test can see.

mod common;
#[path = "../../tango-store/tests/support/postgres.rs"]
mod postgres;

use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Short, so that takeovers happen within a test's time.
const LEASE_SECS: u64 = 3;
const LEASE: Duration = Duration::from_secs(LEASE_SECS);
const SERVERS: usize = 3;
/// Requests a test makes at once while submitting a batch.
const SUBMITTERS: usize = 8;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Three tangod servers on one PostgreSQL database, and a callback
/// receiver. Fields drop in order: the servers stop before PostgreSQL.
struct Cluster {
    servers: Vec<Tangod>,
    clients: Vec<Client>,
    receiver: Receiver,
    pg: postgres::PgServer,
    _dir: tempfile::TempDir,
}

/// One submitted job.
struct Submitted {
    i: usize,
    lab: String,
    id: u64,
}

impl Submitted {
    fn tag(&self) -> String {
        format!("{}-{}", self.lab, self.i)
    }
    fn output(&self) -> String {
        format!("out{}", self.i)
    }
    fn name(&self) -> String {
        format!("{}-job{}", self.lab, self.i)
    }
}

/// The line job `i` of `lab` prints: its own, so outputs cannot be mixed up.
fn unique_line(lab: &str, i: usize) -> String {
    format!("{lab} job {i} was here\n")
}

/// A job as the store keeps it: its JSON record in table `jobs`, and the
/// id of the server that holds it (none while queued and once finished).
#[derive(Debug)]
struct DbJob {
    owner: Option<u64>,
    state: String,
    vm: Option<String>,
    trace: Vec<String>,
    retries: u64,
}

impl DbJob {
    fn on(&self, prefix: &str) -> bool {
        self.vm
            .as_deref()
            .is_some_and(|vm| vm.starts_with(&format!("{prefix}-")))
    }
    fn finished(&self) -> bool {
        self.state == "done" || self.state == "failed"
    }
    /// Finished, or held by a server other than `lost` and not on a VM
    /// of `prefix` (the lost server's).
    fn taken_from(&self, lost: u64, prefix: &str) -> bool {
        self.finished() || (self.owner.is_some_and(|o| o != lost) && !self.on(prefix))
    }
}

impl Cluster {
    /// PostgreSQL and three servers with `max_vms` each; None (saying why)
    /// where the test cannot run.
    async fn start(test: &str, max_vms: usize) -> Option<Cluster> {
        if !root_or_skip(test) {
            return None;
        }
        let pg = postgres::PgServer::start(test)?;
        let url = pg.create_db("tango");
        let dir = tempfile::tempdir().unwrap();
        let servers: Vec<Tangod> = (0..SERVERS)
            .map(|n| {
                Tangod::start(
                    &dir.path().join(format!("s{n}")),
                    &format!(
                        "store = \"{url}\"\n[server]\nname = \"s{n}\"\nlease_secs = {LEASE_SECS}\n\
                         [engine]\nmax_vms = {max_vms}\n"
                    ),
                )
            })
            .collect();
        let clients = servers.iter().map(Tangod::client).collect();
        let cluster = Cluster {
            servers,
            clients,
            receiver: Receiver::start().await,
            pg,
            _dir: dir,
        };
        // Each server counts the others at its next heartbeat.
        for c in &cluster.clients {
            let start = Instant::now();
            loop {
                let info = c.get(&format!("/info/{KEY}/")).await;
                if info["info"]["servers_alive"] == SERVERS {
                    break;
                }
                assert!(start.elapsed() < LEASE, "{info}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Some(cluster)
    }

    fn prefix(&self, n: usize) -> &str {
        &self.servers[n].prefix
    }

    /// Server `n`'s id in the registry (`/v2/servers`).
    async fn server_id(&self, n: usize) -> u64 {
        let list = self.clients[0].v2_list("/v2/servers", "servers").await;
        let me = list
            .iter()
            .find(|s| s["name"] == format!("s{n}") && s["alive"] == true)
            .unwrap_or_else(|| panic!("s{n} is not alive: {list:?}"));
        me["id"].as_u64().expect("server id")
    }

    fn pid(&self, n: usize) -> i32 {
        self.servers[n].child.as_ref().expect("running").id() as i32
    }

    fn logs(&self) -> String {
        self.servers
            .iter()
            .enumerate()
            .map(|(n, s)| format!("==== s{n} ({}) ====\n{}", s.prefix, tail(&s.log(), 150)))
            .collect()
    }

    /// Opens `lab` on every server and uploads, on the first, a Makefile
    /// that sleeps `sleep` seconds and prints the job's own input.
    async fn lab(&self, lab: &str, sleep: &str) {
        for c in &self.clients {
            c.open(lab).await;
        }
        let makefile = format!("all:\n\t@sleep {sleep}\n\t@cat id.txt\n");
        let v = self.clients[0]
            .upload(lab, "Makefile", makefile.as_bytes())
            .await;
        assert_eq!(v["statusId"], 0, "{v}");
    }

    /// Submits jobs `range` of `lab`, SUBMITTERS at a time: job i's input
    /// is opened and uploaded on server `upload_on(i)` and the job added
    /// on `add_on(i)` (servers that are up).
    async fn submit(
        &self,
        lab: &str,
        range: std::ops::Range<usize>,
        upload_on: impl Fn(usize) -> usize,
        add_on: impl Fn(usize) -> usize,
    ) -> Vec<Submitted> {
        let turns = Arc::new(tokio::sync::Semaphore::new(SUBMITTERS));
        let mut tasks = tokio::task::JoinSet::new();
        for i in range {
            let (up, add) = (
                self.clients[upload_on(i)].clone(),
                self.clients[add_on(i)].clone(),
            );
            let (lab, callback) = (
                lab.to_string(),
                self.receiver.url_for(&format!("{lab}-{i}")),
            );
            let turn = turns.clone().acquire_owned().await.unwrap();
            tasks.spawn(async move {
                let input = format!("id{i}.txt");
                up.open(&lab).await;
                let v = up
                    .upload(&lab, &input, unique_line(&lab, i).as_bytes())
                    .await;
                assert_eq!(v["statusId"], 0, "upload of job {i}: {v}");
                let mut body = job(
                    &format!("{lab}-job{i}"),
                    &format!("out{i}"),
                    Some(&callback),
                    30,
                );
                body["files"] = json!([
                    {"localFile": "Makefile", "destFile": "Makefile"},
                    {"localFile": input, "destFile": "id.txt"},
                ]);
                let v = add.add_job(&lab, &body).await;
                assert_eq!(v["statusMsg"], "Job added", "job {i}: {v}");
                drop(turn);
                let id = v["jobId"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("job {i}: no job id in {v}"));
                Submitted { i, lab, id }
            });
        }
        let mut jobs = Vec::new();
        while let Some(done) = tasks.join_next().await {
            jobs.push(done.unwrap());
        }
        jobs.sort_by_key(|j| j.i);
        let mut ids: Vec<u64> = jobs.iter().map(|j| j.id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), jobs.len(), "two jobs got one id");
        jobs
    }

    /// Every job of the store by id, read with psql.
    fn db_jobs(&self) -> HashMap<u64, DbJob> {
        let out =
            tokio::task::block_in_place(|| self.pg.psql("tango", "SELECT owner, record FROM jobs"));
        out.lines()
            .map(|line| {
                let (owner, record) = line.split_once('|').expect("owner|record");
                let v: Value = serde_json::from_str(record)
                    .unwrap_or_else(|e| panic!("a job record that is not JSON ({e}): {line}"));
                let job = DbJob {
                    owner: owner.parse().ok(),
                    state: v["state"].as_str().unwrap_or_default().to_lowercase(),
                    vm: v["vm"]["name"].as_str().map(str::to_string),
                    trace: v["trace"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|t| t["message"].as_str().map(str::to_string))
                        .collect(),
                    retries: v["retries"].as_u64().unwrap_or_default(),
                };
                (v["id"].as_u64().expect("job id"), job)
            })
            .collect()
    }

    /// Waits until `until` holds of the store's jobs (checked every 100 ms:
    /// nothing tells the test when another process changes a row).
    async fn wait_db(
        &self,
        what: &str,
        limit: Duration,
        mut until: impl FnMut(&HashMap<u64, DbJob>) -> bool,
    ) -> HashMap<u64, DbJob> {
        let start = Instant::now();
        loop {
            let jobs = self.db_jobs();
            if until(&jobs) {
                return jobs;
            }
            assert!(
                start.elapsed() < limit,
                "{what}: not after {limit:?}\n{jobs:#?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for every job's callback, lets late duplicates arrive for
    /// `settle`, then checks that each job was called back exactly once
    /// with its own output, and that polling server `poll_on(i)` gives the
    /// same bytes.
    async fn expect_each_once(
        &self,
        jobs: &[Submitted],
        limit: Duration,
        settle: Duration,
        poll_on: impl Fn(usize) -> usize,
    ) {
        let start = Instant::now();
        let arrived = || {
            jobs.iter()
                .filter(|j| !self.receiver.get(&j.tag()).is_empty())
                .count()
        };
        while arrived() < jobs.len() && start.elapsed() < limit {
            let _ =
                tokio::time::timeout(Duration::from_millis(500), self.receiver.notify.notified())
                    .await;
        }
        tokio::time::sleep(settle).await;
        let mut missing = Vec::new();
        let mut repeated = Vec::new();
        for j in jobs {
            let got = self.receiver.get(&j.tag());
            match got.len() {
                0 => missing.push(j.id),
                1 => {}
                n => repeated.push((j.id, n)),
            }
        }
        if !(missing.is_empty() && repeated.is_empty()) {
            let db = self.db_jobs();
            let servers = tokio::task::block_in_place(|| {
                self.pg
                    .psql("tango", "SELECT id, name, prefix, retired_ms FROM servers")
            });
            panic!(
                "after {:?}: no callback for jobs {missing:?}; more than one for (job, \
                 callbacks) {repeated:?}\n{:#?}\nservers:\n{servers}\n{}",
                start.elapsed(),
                missing.iter().map(|id| (id, &db[id])).collect::<Vec<_>>(),
                self.logs()
            );
        }
        for j in jobs {
            let got = self.receiver.get(&j.tag());
            let body = String::from_utf8_lossy(&got[0].body).into_owned();
            assert!(
                body.contains(&format!("Received job {}:{}", j.name(), j.id)),
                "job {}: {body}",
                j.id
            );
            assert!(
                body.contains("Success: Autodriver returned normally"),
                "job {}: {body}",
                j.id
            );
            assert!(
                body.ends_with(&unique_line(&j.lab, j.i)),
                "job {}: {body}",
                j.id
            );
            let polled = self.clients[poll_on(j.i)]
                .wait_output(&j.lab, &j.output(), Duration::from_secs(10))
                .await;
            assert_eq!(
                String::from_utf8_lossy(&polled),
                body,
                "job {}: the output polled on s{} is not the one called back",
                j.id,
                poll_on(j.i)
            );
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n") + "\n"
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill has no memory preconditions; pid is our own child.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

/// Whether a trace line tells that the job was taken back from server
/// `name` (registry id `id`) because its lease lapsed. The server that
/// retires it names it; one that re-queues the job later has only its id.
fn requeued_from(trace: &[String], name: &str, id: u64) -> bool {
    let named = format!("Re-queued: server \"{name}\" (id {id}),");
    let by_id = format!("Re-queued: server {id},");
    trace
        .iter()
        .any(|t| (t.starts_with(&named) || t.starts_with(&by_id)) && t.contains("lease"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_uploaded_added_and_polled_on_three_servers() {
    const JOBS: usize = 300;
    let _one = ONE_AT_A_TIME.lock().await;
    let test = "jobs_uploaded_added_and_polled_on_three_servers";
    let Some(cluster) = Cluster::start(test, 8).await else {
        return;
    };
    cluster.lab("rr", "0").await;
    let start = Instant::now();
    let jobs = cluster
        .submit("rr", 0..JOBS, |i| i % SERVERS, |i| (i + 1) % SERVERS)
        .await;
    let submitted = start.elapsed();
    cluster
        .expect_each_once(
            &jobs,
            Duration::from_secs(120),
            Duration::from_secs(1),
            |i| (i + 2) % SERVERS,
        )
        .await;
    // Every server ran some: the work is shared, not taken by one.
    let db = cluster.db_jobs();
    for n in 0..SERVERS {
        let ran = jobs
            .iter()
            .filter(|j| db[&j.id].on(cluster.prefix(n)))
            .count();
        eprintln!("s{n} ran {ran} jobs");
        assert!(ran > 0, "s{n} ran none of the {JOBS} jobs");
    }
    for j in &jobs {
        assert_eq!(db[&j.id].state, "done", "job {}: {:?}", j.id, db[&j.id]);
    }
    // Any server tells of any job: each one's record on every server.
    for j in jobs.iter().step_by(25) {
        for c in &cluster.clients {
            let v = c.v2_get(&format!("/v2/jobs/{}", j.id)).await;
            assert_eq!(v["state"], "done", "job {} on {}: {v}", j.id, c.url);
            assert_eq!(
                v["vm"].as_str(),
                db[&j.id].vm.as_deref(),
                "job {} on {}: {v}",
                j.id,
                c.url
            );
        }
    }
    eprintln!(
        "{JOBS} jobs: submitted in {submitted:?}, all called back in {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_servers_jobs_are_taken_over_within_its_lease() {
    const JOBS: usize = 100;
    const VICTIM: usize = 1;
    let _one = ONE_AT_A_TIME.lock().await;
    let test = "a_killed_servers_jobs_are_taken_over_within_its_lease";
    let Some(mut cluster) = Cluster::start(test, 12).await else {
        return;
    };
    cluster.lab("kill", "2").await;
    let jobs = cluster
        .submit("kill", 0..JOBS, |i| i % SERVERS, |i| (i + 1) % SERVERS)
        .await;
    let victim = cluster.prefix(VICTIM).to_string();
    let victim_id = cluster.server_id(VICTIM).await;
    // Killed while it runs several jobs.
    cluster
        .wait_db(
            "the victim holds 4 running jobs",
            Duration::from_secs(30),
            |db| {
                db.values()
                    .filter(|j| j.state == "running" && j.owner == Some(victim_id))
                    .count()
                    >= 4
            },
        )
        .await;
    cluster.servers[VICTIM].kill9();
    let killed = Instant::now();
    let db = cluster.db_jobs();
    let lost: Vec<u64> = jobs
        .iter()
        .map(|j| j.id)
        .filter(|id| db[id].owner == Some(victim_id))
        .collect();
    assert!(!lost.is_empty(), "the victim held no job when killed");
    let finished_at_kill = db.values().filter(|j| j.finished()).count();

    // The survivors take every job the dead server held: each is finished
    // or held by a survivor (off the dead one's VMs).
    let limit = LEASE + Duration::from_secs(10);
    cluster
        .wait_db("the survivors took the killed server's jobs", limit, |db| {
            lost.iter().all(|id| db[id].taken_from(victim_id, &victim))
        })
        .await;
    let taken = killed.elapsed();
    eprintln!(
        "killed s{VICTIM} holding {} jobs ({finished_at_kill} of {JOBS} finished); \
         the survivors had them all in {taken:?} (limit {limit:?})",
        lost.len()
    );

    let survivor = |i: usize| {
        if i % SERVERS == VICTIM {
            (i + 1) % SERVERS
        } else {
            i % SERVERS
        }
    };
    cluster
        .expect_each_once(
            &jobs,
            Duration::from_secs(90),
            LEASE + Duration::from_secs(1),
            survivor,
        )
        .await;
    let db = cluster.db_jobs();
    for id in &lost {
        let j = &db[id];
        assert!(!j.on(&victim), "job {id} ended on the killed server: {j:?}");
        assert!(
            requeued_from(&j.trace, &format!("s{VICTIM}"), victim_id),
            "job {id}: {j:?}"
        );
        // A takeover is no fault of the job's: no retry spent.
        assert_eq!(j.retries, 0, "job {id}: {j:?}");
    }
    let list = cluster.clients[0].v2_list("/v2/servers", "servers").await;
    assert!(
        list.iter()
            .all(|s| s["name"] != format!("s{VICTIM}") || s["alive"] == false),
        "{list:?}"
    );
    // Its next start sweeps the sandboxes it left and joins again.
    cluster.servers[VICTIM].restart();
    let info = cluster.clients[VICTIM].get(&format!("/info/{KEY}/")).await;
    assert_eq!(info["info"]["servers_alive"], SERVERS, "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_frozen_past_its_lease_reports_none_of_its_lost_jobs() {
    const JOBS: usize = 12;
    const FROZEN: usize = 2;
    let _one = ONE_AT_A_TIME.lock().await;
    let test = "a_server_frozen_past_its_lease_reports_none_of_its_lost_jobs";
    // Room for four jobs a server: each holds some of the twelve.
    let Some(cluster) = Cluster::start(test, 4).await else {
        return;
    };
    cluster.lab("stop", "2").await;
    let jobs = cluster
        .submit("stop", 0..JOBS, |i| i % SERVERS, |i| (i + 1) % SERVERS)
        .await;
    let frozen = cluster.prefix(FROZEN).to_string();
    let frozen_id = cluster.server_id(FROZEN).await;
    cluster
        .wait_db(
            "the server to freeze holds 2 running jobs",
            Duration::from_secs(30),
            |db| {
                db.values()
                    .filter(|j| j.state == "running" && j.owner == Some(frozen_id))
                    .count()
                    >= 2
            },
        )
        .await;
    signal(cluster.pid(FROZEN), libc::SIGSTOP);
    let stopped = Instant::now();
    let db = cluster.db_jobs();
    let lost: Vec<u64> = jobs
        .iter()
        .map(|j| j.id)
        .filter(|id| db[id].owner == Some(frozen_id))
        .collect();
    assert!(!lost.is_empty(), "the frozen server held no job");
    // Frozen until the survivors took its jobs; meanwhile the jobs' own
    // processes ran to their end in its sandboxes, unreported.
    let took = cluster
        .wait_db(
            "the survivors took the frozen server's jobs",
            LEASE + Duration::from_secs(10),
            |db| lost.iter().all(|id| db[id].taken_from(frozen_id, &frozen)),
        )
        .await;
    let ran_elsewhere: Vec<(u64, Option<String>)> =
        lost.iter().map(|id| (*id, took[id].vm.clone())).collect();
    eprintln!(
        "froze s{FROZEN} with jobs {lost:?}; after {:?} they ran on {ran_elsewhere:?}",
        stopped.elapsed()
    );
    signal(cluster.pid(FROZEN), libc::SIGCONT);

    // Long enough after the thaw for it to report what it should not.
    cluster
        .expect_each_once(
            &jobs,
            Duration::from_secs(60),
            LEASE + Duration::from_secs(2),
            |i| (i + 2) % SERVERS,
        )
        .await;
    let db = cluster.db_jobs();
    for id in &lost {
        let j = &db[id];
        eprintln!("job {id} (frozen on s{FROZEN}, {frozen}): {j:?}");
        assert!(
            !j.on(&frozen),
            "job {id}'s result is the frozen server's: {j:?}"
        );
        assert!(
            requeued_from(&j.trace, &format!("s{FROZEN}"), frozen_id),
            "job {id}: {j:?}"
        );
    }

    // It registered again and takes work: with four jobs a server at most,
    // twelve jobs cannot all run on the other two.
    let list = cluster.clients[FROZEN]
        .v2_list("/v2/servers", "servers")
        .await;
    let alive: Vec<&Value> = list.iter().filter(|s| s["alive"] == true).collect();
    assert_eq!(alive.len(), SERVERS, "{list:?}");
    let more = cluster
        .submit("stop", JOBS..2 * JOBS, |_| FROZEN, |_| FROZEN)
        .await;
    cluster
        .expect_each_once(
            &more,
            Duration::from_secs(60),
            Duration::from_secs(1),
            |_| FROZEN,
        )
        .await;
    let db = cluster.db_jobs();
    let ran = more.iter().filter(|j| db[&j.id].on(&frozen)).count();
    assert!(
        ran > 0,
        "the thawed server ran none of {} new jobs",
        more.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_under_a_batch_loses_nothing() {
    const JOBS: usize = 50;
    let _one = ONE_AT_A_TIME.lock().await;
    let test = "a_postgres_restart_under_a_batch_loses_nothing";
    let Some(cluster) = Cluster::start(test, 4).await else {
        return;
    };
    cluster.lab("pg", "1").await;
    let jobs = cluster
        .submit("pg", 0..JOBS, |i| i % SERVERS, |i| (i + 1) % SERVERS)
        .await;
    let before = cluster.clients[0].v2_list("/v2/servers", "servers").await;
    cluster.receiver.wait_for(8, Duration::from_secs(60)).await;
    // Down for longer than the lease: every heartbeat is stale when it
    // comes back, and no server may take that for the others' death.
    cluster.pg.stop();
    let down = Instant::now();
    let called_back = cluster.receiver.count();
    tokio::time::sleep(LEASE + Duration::from_secs(2)).await;
    cluster.pg.start_again();
    eprintln!(
        "PostgreSQL down {:?} with {called_back} of {JOBS} jobs called back",
        down.elapsed()
    );
    assert!(called_back < JOBS, "the batch ended before the restart");

    cluster
        .expect_each_once(
            &jobs,
            Duration::from_secs(90),
            Duration::from_secs(2),
            |i| (i + 2) % SERVERS,
        )
        .await;
    let db = cluster.db_jobs();
    for j in &jobs {
        let job = &db[&j.id];
        assert_eq!(job.state, "done", "job {}: {job:?}", j.id);
        assert!(
            !job.trace.iter().any(|t| t.contains("Re-queued")),
            "job {} was taken over: {job:?}\n{}",
            j.id,
            cluster.logs()
        );
    }
    // The same three servers, alive: none was taken for dead.
    let after = cluster.clients[0].v2_list("/v2/servers", "servers").await;
    let ids = |list: &[Value]| {
        let mut ids: Vec<String> = list
            .iter()
            .filter(|s| s["alive"] == true)
            .map(|s| format!("{}#{}", s["name"], s["id"]))
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&after), ids(&before), "{after:?}");
    assert_eq!(ids(&after).len(), SERVERS, "{after:?}");
}
