//! The fair scheduler through a real tangod on the sandbox backend: one
//! student's 40 resubmissions against 10 students' single jobs (fair and
//! fifo), a restart with a queue of 1,000 jobs from four students, and the
//! per-submitter cap of queued jobs through v1 `addJob`.
//!
//! Start order is read from the job records' `phases.assigned` (the
//! millisecond the dispatcher gave the job a VM). The checks are on order,
//! not on wall time, so a loaded machine slows them down without failing
//! them.

mod common;

use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

const LAB: &str = "lab";

/// Autolab's jobName for version `version` of `student`'s submission: the
/// server derives the submitter from what follows the last `_<digits>_`.
fn job_name(student: &str, version: usize) -> String {
    format!("15213-f26_malloclab_{version}_{student}@andrew.cmu.edu")
}

fn submitter(student: &str) -> String {
    format!("{student}@andrew.cmu.edu")
}

/// What the tests read of a finished job's record.
#[derive(Debug, Clone)]
struct Ran {
    id: u64,
    submitter: String,
    added: i64,
    assigned: i64,
    finished: i64,
    /// Whether a restart re-queued it after it had started.
    requeued: bool,
}

/// Adds version `version` of `student`'s job; every job has its own output
/// file (and so its own body: identical bodies are one job). Its end is
/// called back to `receiver`.
async fn add(c: &Client, receiver: &Receiver, student: &str, version: usize) -> u64 {
    let name = job_name(student, version);
    let out = format!("{student}-{version}.out");
    let body = job(&name, &out, Some(&receiver.url_for(&out)), 60);
    let v = c.add_job(LAB, &body).await;
    assert_eq!(v["statusMsg"], "Job added", "{name}: {v}");
    v["jobId"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no jobId in {v}"))
}

/// Adds `versions` of `student`'s jobs at once, as a burst of resubmissions.
async fn add_burst(
    c: &Client,
    receiver: &Receiver,
    student: &str,
    versions: std::ops::Range<usize>,
) {
    let mut adds = tokio::task::JoinSet::new();
    for version in versions {
        let (c, receiver, student) = (c.clone(), receiver.clone(), student.to_string());
        adds.spawn(async move { add(&c, &receiver, &student, version).await });
    }
    while let Some(added) = adds.join_next().await {
        added.expect("an addJob task panicked");
    }
}

/// The records of the finished jobs, each checked to have succeeded.
async fn finished_jobs(c: &Client) -> Vec<Ran> {
    let v = c.get(&format!("/jobs/{KEY}/1/")).await;
    let jobs = v["jobs"].as_array().expect("jobs");
    jobs.iter()
        .map(|job| {
            assert_eq!(job["state"], "done", "{job}");
            let phase = |name: &str| {
                job["phases"][name]
                    .as_i64()
                    .unwrap_or_else(|| panic!("no phase {name} in {job}"))
            };
            Ran {
                id: job["id"].as_u64().expect("id"),
                submitter: job["submitter"].as_str().expect("submitter").to_string(),
                added: phase("added"),
                assigned: phase("assigned"),
                finished: phase("finished"),
                requeued: job["trace"]
                    .to_string()
                    .contains("Re-queued after a server restart"),
            }
        })
        .collect()
}

/// The 40-job submitter and the 10 single-job ones, `max_vms = 2`: their
/// jobs as run, with the ten's waits printed; None where the sandbox
/// cannot run.
async fn resubmitter_against_ten(test: &str, scheduling: &str) -> Option<Scenario> {
    const HOG_JOBS: usize = 40;
    if !root_or_skip(test) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Tangod::start(
        &dir.path().join("data"),
        &format!("[engine]\nmax_vms = 2\nscheduling = \"{scheduling}\"\n"),
    );
    let c = server.client();
    let receiver = Receiver::start().await;
    c.open(LAB).await;
    c.upload(LAB, "Makefile", b"all:\n\t@sleep 0.5\n").await;
    add_burst(&c, &receiver, "hog", 0..HOG_JOBS).await;
    for i in 0..10 {
        add(&c, &receiver, &format!("s{i}"), 1).await;
    }
    let all_queued = now_ms();
    receiver
        .wait_for(HOG_JOBS + 10, Duration::from_secs(150))
        .await;
    let jobs = finished_jobs(&c).await;
    assert_eq!(jobs.len(), HOG_JOBS + 10, "{jobs:?}");
    let (hog, ten): (Vec<Ran>, Vec<Ran>) = jobs
        .into_iter()
        .partition(|j| j.submitter == submitter("hog"));
    assert_eq!(hog.len(), HOG_JOBS);
    print_waits(scheduling, &hog, &ten);
    Some(Scenario {
        hog,
        ten,
        all_queued,
    })
}

struct Scenario {
    /// The 40-job submitter's jobs.
    hog: Vec<Ran>,
    /// The ten single jobs.
    ten: Vec<Ran>,
    /// When every one of the ten was queued (its addJob answered).
    all_queued: i64,
}

/// Prints the ten's waits (added to finished) in job-lengths: the hog's
/// median run time (assigned to finished), which includes the sandbox's
/// own cost.
fn print_waits(scheduling: &str, hog: &[Ran], ten: &[Ran]) {
    let mut runs: Vec<i64> = hog.iter().map(|j| j.finished - j.assigned).collect();
    runs.sort_unstable();
    let length = runs[runs.len() / 2].max(1) as f64;
    let mut waits: Vec<f64> = ten
        .iter()
        .map(|j| (j.finished - j.added) as f64 / length)
        .collect();
    waits.sort_by(f64::total_cmp);
    let hog_done = hog.iter().map(|j| j.finished).max().unwrap_or(0);
    let hog_first = hog.iter().map(|j| j.added).min().unwrap_or(0);
    eprintln!(
        "{scheduling}: job-length {length} ms; the ten's waits in job-lengths: {}; \
         the 40 took {:.1} job-lengths",
        waits
            .iter()
            .map(|w| format!("{w:.1}"))
            .collect::<Vec<_>>()
            .join(" "),
        (hog_done - hog_first) as f64 / length
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_ten_single_jobs_overtake_one_students_forty() {
    let Some(Scenario {
        hog,
        ten,
        all_queued,
    }) = resubmitter_against_ten("fair_ten_single_jobs_overtake_one_students_forty", "fair").await
    else {
        return;
    };
    // Once the ten are all queued, each has a job of its first round
    // queued, and the hog, whose first jobs started as they came (and
    // still run or have run while more of its jobs were queued), only jobs
    // of later rounds: none of them may start until the last of the ten
    // has.
    let last_started = ten.iter().map(|j| j.assigned).max().unwrap();
    let cut_in: Vec<&Ran> = hog
        .iter()
        .filter(|j| j.assigned > all_queued && j.assigned < last_started)
        .collect();
    assert!(
        cut_in.is_empty(),
        "the hog's jobs {cut_in:?} started while one of the ten waited: {ten:?}"
    );
    // So the ten are done long before the forty: only the hog's jobs that
    // ran before the ten arrived, and the one or two that take the VMs the
    // last of the ten leave, start before the last of the ten ends.
    let last_finished = ten.iter().map(|j| j.finished).max().unwrap();
    let hog_before = hog.iter().filter(|j| j.assigned < last_finished).count();
    eprintln!(
        "fair: {hog_before} of the hog's 40 jobs started before the last of the ten finished"
    );
    assert!(
        hog_before <= 10,
        "{hog_before} of the hog's 40 jobs started before the last of the ten finished"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_ten_single_jobs_wait_for_one_students_forty() {
    let Some(Scenario { hog, ten, .. }) =
        resubmitter_against_ten("fifo_ten_single_jobs_wait_for_one_students_forty", "fifo").await
    else {
        return;
    };
    let hog_last = hog.iter().map(|j| j.assigned).max().unwrap();
    let ten_first = ten.iter().map(|j| j.assigned).min().unwrap();
    assert!(
        ten_first >= hog_last,
        "fifo started one of the ten ({ten_first}) before the hog's last ({hog_last})"
    );
}

/// The order the fair policy starts `queued` (job id, submitter) in, one
/// courselab, all submitters at round 0: the job of the lowest round
/// first, the older job on a tie, each submitter's jobs oldest first.
fn fair_order(queued: &[(u64, String)]) -> Vec<u64> {
    let mut by_submitter: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (id, submitter) in queued {
        by_submitter.entry(submitter).or_default().push(*id);
    }
    let mut heads: Vec<(usize, std::collections::VecDeque<u64>)> = by_submitter
        .into_values()
        .map(|mut ids| {
            ids.sort_unstable();
            (0, ids.into())
        })
        .collect();
    let mut order = Vec::with_capacity(queued.len());
    while let Some((round, jobs)) = heads
        .iter_mut()
        .filter(|(_, jobs)| !jobs.is_empty())
        .min_by_key(|(round, jobs)| (*round, jobs[0]))
    {
        order.extend(jobs.pop_front());
        *round += 1;
    }
    order
}

/// A directory jobs on the host image can see (the sandbox hides /tmp),
/// where the test opens the gate its jobs wait at.
fn gate_dir() -> tempfile::TempDir {
    let gate = tempfile::tempdir_in("/var/lib").unwrap();
    std::fs::set_permissions(
        gate.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    gate
}

/// A Makefile whose job waits until `gate/open` exists.
fn gated_makefile(gate: &Path) -> Vec<u8> {
    format!(
        "all:\n\t@while [ ! -e {}/open ]; do sleep 0.05; done\n",
        gate.display()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_1000_queued_keeps_the_fair_order() {
    if !root_or_skip("restart_with_1000_queued_keeps_the_fair_order") {
        return;
    }
    let bursts = [("a", 400), ("b", 300), ("c", 200), ("d", 100)];
    let total: usize = bursts.iter().map(|(_, n)| n).sum();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Tangod::start(
        &dir.path().join("data"),
        "[engine]\nmax_vms = 2\nshutdown_grace_secs = 1\ndead_jobs_listed = 2000\n",
    );
    let c = server.client();
    let receiver = Receiver::start().await;
    c.open(LAB).await;
    // The first jobs hold both VMs at the gate, so the whole queue is
    // still there at the stop.
    let gate = gate_dir();
    c.upload(LAB, "Makefile", &gated_makefile(gate.path()))
        .await;
    for (student, jobs) in bursts {
        add_burst(&c, &receiver, student, 0..jobs).await;
    }
    let status = server.sigterm();
    assert!(status.success(), "tangod exited with {status}");
    assert_eq!(receiver.count(), 0, "jobs ended before the restart");
    let restarted = now_ms();
    std::fs::write(gate.path().join("open"), "").unwrap();
    server.restart();

    receiver.wait_for(total, Duration::from_secs(170)).await;
    let jobs = finished_jobs(&server.client()).await;
    assert_eq!(jobs.len(), total);
    // The two jobs at the gate were running at the stop.
    let requeued = jobs.iter().filter(|j| j.requeued).count();
    assert_eq!(requeued, 2, "{requeued} jobs were re-queued");
    let ran: HashMap<u64, &Ran> = jobs.iter().map(|j| (j.id, j)).collect();
    let queued: Vec<(u64, String)> = jobs.iter().map(|j| (j.id, j.submitter.clone())).collect();
    // The start order is the fair one where the start times along it never
    // go back (two jobs started in one millisecond may be either way).
    let expected = fair_order(&queued);
    let mut previous: Option<&Ran> = None;
    for (at, id) in expected.iter().enumerate() {
        let job = ran[id];
        assert!(
            job.assigned >= restarted,
            "job {id} started before the restart"
        );
        if let Some(previous) = previous {
            assert!(
                job.assigned >= previous.assigned,
                "start {at} of the fair order, job {id} of {}, started at {} before \
                 the job before it in that order, {} of {} at {}",
                job.submitter,
                job.assigned,
                previous.id,
                previous.submitter,
                previous.assigned
            );
        }
        previous = Some(job);
    }
    // For the log: under fifo the first eight would all be a's.
    let mut started: Vec<&Ran> = jobs.iter().collect();
    started.sort_by_key(|j| (j.assigned, j.id));
    let first: Vec<&str> = started[..8].iter().map(|j| j.submitter.as_str()).collect();
    let span = started.last().unwrap().assigned - started[0].assigned;
    eprintln!(
        "restart: {total} jobs ran in {span} ms after recovery ({:.1} ms a job); first \
         submitters: {first:?}",
        span as f64 / total as f64
    );
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_job_over_the_submitter_cap_is_refused() {
    if !root_or_skip("add_job_over_the_submitter_cap_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Tangod::start(
        &dir.path().join("data"),
        "[engine]\nmax_vms = 1\nmax_queued_per_submitter = 3\n",
    );
    let c = server.client();
    let receiver = Receiver::start().await;
    c.open(LAB).await;
    let gate = gate_dir();
    c.upload(LAB, "Makefile", &gated_makefile(gate.path()))
        .await;
    // The first job takes the one VM and waits at the gate; a running job
    // is not queued, so three more fit under the cap.
    add(&c, &receiver, "ann", 0).await;
    wait_running(&c, 1).await;
    for version in 1..4 {
        add(&c, &receiver, "ann", version).await;
    }
    let name = job_name("ann", 4);
    let over = job(&name, "ann-4.out", Some(&receiver.url_for("ann-4.out")), 60);
    let v = c.add_job(LAB, &over).await;
    assert_eq!(v["statusId"], -1, "{v}");
    let msg = v["statusMsg"].as_str().expect("statusMsg");
    assert!(
        msg.contains("ann@andrew.cmu.edu already has 3 jobs queued")
            && msg.contains("max_queued_per_submitter is 3"),
        "{msg}"
    );
    assert!(v.get("jobId").is_none(), "{v}");
    // Another student is not held back by ann's cap.
    add(&c, &receiver, "bob", 0).await;
    // The refusal is recorded among the dead jobs with its reason.
    let dead = c.get(&format!("/jobs/{KEY}/1/")).await;
    let refused: Vec<&Value> = dead["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["name"] == name.as_str())
        .collect();
    assert_eq!(refused.len(), 1, "{dead}");
    assert!(
        refused[0]["trace"]
            .to_string()
            .contains("max_queued_per_submitter is 3"),
        "{}",
        refused[0]
    );
    // Once a job of ann's starts, ann may queue one more.
    std::fs::write(gate.path().join("open"), "").unwrap();
    receiver.wait_for(1, Duration::from_secs(60)).await;
    wait_queued_below(&c, "ann", 3).await;
    let v = c.add_job(LAB, &over).await;
    assert_eq!(v["statusMsg"], "Job added", "{v}");
    receiver.wait_for(6, Duration::from_secs(60)).await;
}

/// Waits until `n` jobs run.
async fn wait_running(c: &Client, n: usize) {
    wait_live(c, |jobs| {
        jobs.iter().filter(|j| j["state"] == "running").count() >= n
    })
    .await
}

/// Waits until `student` has fewer than `n` jobs queued.
async fn wait_queued_below(c: &Client, student: &str, n: usize) {
    let who = submitter(student);
    wait_live(c, |jobs| {
        jobs.iter()
            .filter(|j| j["state"] == "queued" && j["submitter"] == who.as_str())
            .count()
            < n
    })
    .await
}

/// Waits until the live jobs satisfy `done` (the engine has no event a
/// client can wait on for a start, so this polls).
async fn wait_live(c: &Client, done: impl Fn(&[Value]) -> bool) {
    let start = std::time::Instant::now();
    loop {
        let v = c.get(&format!("/jobs/{KEY}/0/")).await;
        if done(v["jobs"].as_array().expect("jobs")) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the live jobs never got there: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
