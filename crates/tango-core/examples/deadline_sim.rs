//! Deadline simulator: the last 30 minutes before a deadline, run through
//! the real engine on tokio's paused clock.
//!
//! What it models: three courselabs share one grading server of 32 VMs
//! (600, 200 and 50 students; jobs of about 5 s, 30 s and 120 s, ±50 %).
//! 5,000 submissions arrive in the 30 minutes before the deadline at a rate
//! that rises exponentially towards it (e^4 ≈ 55 times as many per minute at
//! the deadline as 30 minutes before). Every student submits at least once;
//! the resubmissions go to students in proportion to a Pareto weight
//! (α = 2), so most submit a few times and a few 30 times or more (60 at
//! most). Jobs are named as Autolab names them
//! (`<course>_<assessment>_<version>_<email>`), so each student is a
//! submitter of their own.
//! The offered work is about 1.5 times what 32 VMs can do in 30 minutes, so
//! a queue builds up, as it does at a real deadline.
//!
//! Why: under FIFO a student who resubmits 40 times, or a 600-student
//! course, makes everyone behind them wait; a fair policy should give every
//! student a first result soon without costing throughput. The simulator
//! measures what a student feels, the wait for their *first* result (from
//! their first submission to the delivery of its callback), for everyone
//! and for the small course, plus the makespan and the VM utilisation.
//!
//! It runs `Engine` itself (dispatch, VM pools and reuse, workers, callback
//! outbox) with an in-memory store and a backend whose jobs only sleep for
//! their run time. The clock is tokio's paused clock: when every task waits,
//! time jumps to the next timer, so an hour of load takes seconds and the
//! numbers depend only on the seed. VMs boot instantly here, so the numbers
//! are of queueing alone.
//!
//! `cargo run --release -p tango-core --example deadline_sim -- [--policy fair|fifo|both] [--seed N]`

use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tango_core::files::DataDir;
use tango_core::testing::MemoryStore;
use tango_core::{
    parse_machine_name, CallbackSender, Engine, EngineConfig, InputFile, JobState, Machine, NewJob,
    RunOutcome, RunRequest, RunStatus, Scheduling as Policy, Vmms, VmmsError,
};
use tokio::time::Instant;

type Error = Box<dyn std::error::Error>;

const IMAGE: &str = "autograding_image";

/// The engine settings of one run: the one place the policy is chosen.
fn engine_config(policy: Policy) -> EngineConfig {
    EngineConfig {
        scheduling: policy,
        default_vmms: "sim".into(),
        max_vms: 32,
        reuse_vms: true,
        ..EngineConfig::default()
    }
}

struct Course {
    name: &'static str,
    students: usize,
    /// Mean run time of its jobs.
    run: Duration,
}

struct Scenario {
    courses: Vec<Course>,
    submissions: usize,
    /// Submissions arrive in the `window` before the deadline.
    window: Duration,
    vms: usize,
    seed: u64,
}

impl Scenario {
    fn deadline(seed: u64, run_secs: [u64; 3]) -> Scenario {
        let course = |name, students, secs| Course {
            name,
            students,
            run: Duration::from_secs(secs),
        };
        Scenario {
            courses: vec![
                course("15213-f26", 600, run_secs[0]),
                course("15122-f26", 200, run_secs[1]),
                course("98317-f26", 50, run_secs[2]),
            ],
            submissions: 5000,
            window: Duration::from_secs(30 * 60),
            vms: 32,
            seed,
        }
    }
}

/// SplitMix64: a few lines, and the same numbers on every platform.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Student {
    course: usize,
    email: String,
}

struct Submission {
    /// Since the start of the window.
    at: Duration,
    student: usize,
    /// The student's submission count (1 for their first).
    version: usize,
    run: Duration,
}

struct Plan {
    students: Vec<Student>,
    /// In order of arrival.
    submissions: Vec<Submission>,
}

fn plan(s: &Scenario) -> Plan {
    let mut rng = Rng(s.seed);
    let mut students = Vec::new();
    for (c, course) in s.courses.iter().enumerate() {
        for i in 0..course.students {
            students.push(Student {
                course: c,
                email: format!("s{c}x{i:03}@andrew.cmu.edu"),
            });
        }
    }
    // Everyone once, then the rest by Pareto weight (inverse CDF, α = 2),
    // up to one submission every 30 s: beyond that it is a script.
    const MAX_PER_STUDENT: usize = 60;
    let mut counts = vec![1usize; students.len()];
    let mut cumulative = Vec::with_capacity(students.len());
    let mut total = 0.0;
    for _ in &students {
        total += (1.0 - rng.unit()).powf(-0.5);
        cumulative.push(total);
    }
    let mut planned = students.len();
    while planned < s.submissions.min(students.len() * MAX_PER_STUDENT) {
        let x = rng.unit() * total;
        let i = cumulative
            .partition_point(|&c| c <= x)
            .min(students.len() - 1);
        if counts[i] < MAX_PER_STUDENT {
            counts[i] += 1;
            planned += 1;
        }
    }
    // Arrival times with density ∝ e^(t/τ), τ = window/4 (inverse CDF).
    let window = s.window.as_secs_f64();
    let tau = window / 4.0;
    let mut submissions = Vec::with_capacity(s.submissions);
    for (student, &n) in counts.iter().enumerate() {
        let mut times: Vec<f64> = (0..n)
            .map(|_| tau * (1.0 + rng.unit() * ((window / tau).exp() - 1.0)).ln())
            .collect();
        times.sort_by(f64::total_cmp);
        let base = s.courses[students[student].course].run;
        for (k, t) in times.into_iter().enumerate() {
            submissions.push(Submission {
                at: Duration::from_secs_f64(t),
                student,
                version: k + 1,
                run: base.mul_f64(0.5 + rng.unit()),
            });
        }
    }
    submissions.sort_by_key(|sub| sub.at);
    Plan {
        students,
        submissions,
    }
}

/// A backend whose VMs exist only in memory and whose jobs sleep (on the
/// paused clock) for the run time the simulation gave them.
#[derive(Default)]
struct SimVmms {
    vms: Mutex<BTreeMap<String, Machine>>,
    /// Run time of each job, by job id, set as the job is added.
    run_times: Mutex<HashMap<u64, Duration>>,
    /// Sum of the run times of the jobs run.
    busy: Mutex<Duration>,
    /// When each job started running, by job id.
    started: Mutex<HashMap<u64, Instant>>,
}

#[async_trait]
impl Vmms for SimVmms {
    fn name(&self) -> &'static str {
        "sim"
    }
    async fn initialize_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.vms.lock().unwrap().insert(vm.name.clone(), vm.clone());
        Ok(())
    }
    async fn wait_vm(&self, _vm: &Machine, _max: Duration) -> Result<(), VmmsError> {
        Ok(())
    }
    async fn copy_in(&self, _vm: &Machine, _files: &[InputFile]) -> Result<(), VmmsError> {
        Ok(())
    }
    async fn run_job(&self, _vm: &Machine, req: &RunRequest) -> Result<RunOutcome, VmmsError> {
        let run = self.run_times.lock().unwrap().get(&req.job_id).copied();
        let run =
            run.ok_or_else(|| VmmsError::Backend(format!("job {} has no run time", req.job_id)))?;
        self.started
            .lock()
            .unwrap()
            .insert(req.job_id, Instant::now());
        tokio::time::sleep(run).await;
        *self.busy.lock().unwrap() += run;
        Ok(RunOutcome {
            status: RunStatus::Completed,
            exit_code: Some(0),
            summary: None,
            notes: vec![],
        })
    }
    async fn copy_out(&self, _vm: &Machine, dest: &Path) -> Result<(), VmmsError> {
        tokio::fs::write(dest, "Autodriver: Job exited with status 0\n")
            .await
            .map_err(|e| VmmsError::io("write output", e))
    }
    async fn destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.vms.lock().unwrap().remove(&vm.name);
        Ok(())
    }
    async fn safe_destroy_vm(&self, vm: &Machine) -> Result<(), VmmsError> {
        self.destroy_vm(vm).await
    }
    async fn get_vms(&self, prefix: &str) -> Result<Vec<Machine>, VmmsError> {
        let vms = self.vms.lock().unwrap();
        let ours = vms
            .values()
            .filter(|vm| parse_machine_name(prefix, &vm.name).is_some());
        Ok(ours.cloned().collect())
    }
    async fn exists_vm(&self, vm: &Machine) -> Result<bool, VmmsError> {
        Ok(self.vms.lock().unwrap().contains_key(&vm.name))
    }
    async fn get_images(&self) -> Result<Vec<String>, VmmsError> {
        Ok(vec![IMAGE.into()])
    }
    async fn partial_output(&self, _vm: &Machine, _max: usize) -> Result<Vec<u8>, VmmsError> {
        Ok(Vec::new())
    }
}

/// Notes when each submission's result reaches "Autolab": the callback URL
/// carries the submission's index.
struct Results(tokio::sync::mpsc::UnboundedSender<(usize, Instant)>);

#[async_trait]
impl CallbackSender for Results {
    async fn send(&self, url: &str, _output_file: &str, _body: Vec<u8>) -> Result<(), String> {
        let index = url.rsplit('=').next().and_then(|i| i.parse().ok());
        let index = index.ok_or_else(|| format!("not a simulator callback URL: {url}"))?;
        let _ = self.0.send((index, Instant::now()));
        Ok(())
    }
}

/// A data directory in memory where there is one: the engine syncs each
/// output file, and on a disk those syncs, not the simulation, would take
/// most of the wall time (30 s against 4 s a run here).
fn data_tempdir() -> std::io::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    match tempfile::tempdir_in(shm) {
        Ok(dir) if shm.is_dir() => Ok(dir),
        _ => tempfile::tempdir(),
    }
}

/// What one run measured, in simulated time.
struct Outcome {
    /// Per submission: from its arrival to its result.
    waits: Vec<Duration>,
    /// Per submission: from its arrival to the start of its run (the part
    /// of the wait a policy can change; the rest is the job's own run).
    queued: Vec<Duration>,
    /// First arrival to last result.
    makespan: Duration,
    busy: Duration,
    /// Jobs that ended in a state other than Done.
    not_done: usize,
    wall: std::time::Duration,
}

/// Runs the plan through a fresh engine on a fresh paused-clock runtime.
fn simulate(s: &Scenario, plan: &Plan, policy: Policy) -> Result<Outcome, Error> {
    let wall = std::time::Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()?;
    let mut outcome = runtime.block_on(run(s, plan, policy))?;
    outcome.wall = wall.elapsed();
    Ok(outcome)
}

async fn run(s: &Scenario, plan: &Plan, policy: Policy) -> Result<Outcome, Error> {
    let dir = data_tempdir()?;
    let data = Arc::new(DataDir::open(dir.path())?);
    let store = Arc::new(MemoryStore::default());
    let vmms = Arc::new(SimVmms::default());
    for course in &s.courses {
        let lab = format!("key-{}", course.name);
        data.open_courselab(&lab).await?;
        let mut upload = data.begin_upload(&lab, "Makefile", 1 << 20).await?;
        upload.write(b"autograde:\n\ttrue\n").await?;
        upload.finish(&data, store.as_ref()).await?;
    }
    let (results, mut delivered) = tokio::sync::mpsc::unbounded_channel();
    let config = EngineConfig {
        max_vms: s.vms,
        ..engine_config(policy)
    };
    let engine = Engine::start(
        config,
        store,
        data,
        vec![vmms.clone() as Arc<dyn Vmms>],
        Arc::new(Results(results)),
    )
    .await?;

    let start = Instant::now();
    let mut arrived = Vec::with_capacity(plan.submissions.len());
    let mut ids = Vec::with_capacity(plan.submissions.len());
    for (i, sub) in plan.submissions.iter().enumerate() {
        tokio::time::sleep_until(start + sub.at).await;
        let student = &plan.students[sub.student];
        let course = s.courses[student.course].name;
        arrived.push(Instant::now());
        let id = engine
            .add_job(NewJob {
                name: format!("{course}_lab3_{}_{}", sub.version, student.email),
                courselab_dir: format!("key-{course}"),
                courselab: course.into(),
                image: IMAGE.into(),
                files: vec![("Makefile".into(), "Makefile".into())],
                output_file: format!("sub{i}.out"),
                timeout_secs: Some(600),
                callback_url: Some(format!("http://autolab.invalid/result?sub={i}")),
                ..NewJob::default()
            })
            .await?;
        // No await since add_job returned: the job cannot have reached
        // run_job yet on this single-threaded runtime.
        vmms.run_times.lock().unwrap().insert(id, sub.run);
        ids.push(id);
    }

    let mut done_at: Vec<Option<Instant>> = vec![None; arrived.len()];
    let all_delivered = async {
        for _ in 0..arrived.len() {
            let Some((i, at)) = delivered.recv().await else {
                break;
            };
            done_at[i] = Some(at);
        }
    };
    // Simulated time: a lost result ends the run instead of hanging it.
    let _ = tokio::time::timeout(Duration::from_secs(48 * 3600), all_delivered).await;
    let mut not_done = 0;
    for &id in &ids {
        let state = engine.get_job(id)?.map(|job| job.state);
        not_done += usize::from(state != Some(JobState::Done));
    }
    engine.shutdown().await;

    let mut waits = Vec::with_capacity(arrived.len());
    let mut queued = Vec::with_capacity(arrived.len());
    let mut last = start;
    let started = vmms.started.lock().unwrap().clone();
    for (i, at) in done_at.into_iter().enumerate() {
        let at = at.ok_or_else(|| format!("submission {i} got no result in 48 hours"))?;
        waits.push(at - arrived[i]);
        let ran = started.get(&ids[i]).copied().unwrap_or(at);
        queued.push(ran - arrived[i]);
        last = last.max(at);
    }
    let first = arrived.first().copied().unwrap_or(start);
    let busy = *vmms.busy.lock().unwrap();
    Ok(Outcome {
        waits,
        queued,
        makespan: last - first,
        busy,
        not_done,
        wall: std::time::Duration::ZERO,
    })
}

/// Wait for a first result: p50, p95, max.
struct Spread([Duration; 3]);

impl Spread {
    /// Over the students `course` (all when None) selects.
    fn of(plan: &Plan, per_submission: &[Duration], course: Option<usize>) -> Spread {
        let mut first: Vec<Option<Duration>> = vec![None; plan.students.len()];
        for (sub, wait) in plan.submissions.iter().zip(per_submission) {
            if sub.version == 1 {
                first[sub.student] = Some(*wait);
            }
        }
        let mut waits: Vec<Duration> = (first.iter().zip(&plan.students))
            .filter(|(_, st)| course.is_none_or(|c| st.course == c))
            .filter_map(|(w, _)| *w)
            .collect();
        waits.sort();
        let rank = |p: f64| {
            let i = ((p * waits.len() as f64).ceil() as usize).max(1) - 1;
            waits.get(i).copied().unwrap_or_default()
        };
        Spread([rank(0.50), rank(0.95), rank(1.0)])
    }

    fn show(&self) -> String {
        let [p50, p95, max] = self.0.map(mmss);
        format!("p50 {p50}  p95 {p95}  max {max}")
    }
}

fn mmss(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    format!("{}m{:02}s", s / 60, s % 60)
}

struct Report {
    all: Spread,
    small: Spread,
    all_queued: Spread,
    small_queued: Spread,
    makespan: Duration,
    utilisation: f64,
}

fn report(s: &Scenario, plan: &Plan, policy: Policy, out: &Outcome) -> Report {
    let small = s.courses.len() - 1;
    let r = Report {
        all: Spread::of(plan, &out.waits, None),
        small: Spread::of(plan, &out.waits, Some(small)),
        all_queued: Spread::of(plan, &out.queued, None),
        small_queued: Spread::of(plan, &out.queued, Some(small)),
        makespan: out.makespan,
        utilisation: out.busy.as_secs_f64()
            / (s.vms as f64 * out.makespan.as_secs_f64()).max(f64::MIN_POSITIVE),
    };
    println!("## {policy:?}");
    println!("first result, all students:    {}", r.all.show());
    let name = s.courses[small].name;
    let n = s.courses[small].students;
    println!("first result, {name} ({n}): {}", r.small.show());
    println!("first start, all students:     {}", r.all_queued.show());
    println!("first start, {name} ({n}):  {}", r.small_queued.show());
    println!(
        "makespan {}, VM utilisation {:.1} %",
        mmss(r.makespan),
        100.0 * r.utilisation
    );
    if out.not_done > 0 {
        println!("jobs not done: {}", out.not_done);
    }
    println!("wall time {:.2} s\n", out.wall.as_secs_f64());
    r
}

fn describe(s: &Scenario, plan: &Plan) {
    let mut per_student = vec![0usize; plan.students.len()];
    for sub in &plan.submissions {
        per_student[sub.student] += 1;
    }
    per_student.sort_unstable();
    let heavy = per_student.iter().filter(|&&n| n >= 30).count();
    let work: Duration = plan.submissions.iter().map(|sub| sub.run).sum();
    let capacity = s.window.as_secs_f64() * s.vms as f64;
    let course = |c: &Course| format!("{} ({}, ~{} s)", c.name, c.students, c.run.as_secs());
    let courses: Vec<String> = s.courses.iter().map(course).collect();
    println!("# Deadline simulation, seed {}", s.seed);
    println!("courselabs: {}", courses.join(", "));
    println!(
        "{} submissions in {} before the deadline, {} VMs; per student: median {}, max {}, {heavy} students with 30+",
        plan.submissions.len(),
        mmss(s.window),
        s.vms,
        per_student[per_student.len() / 2],
        per_student.last().unwrap_or(&0),
    );
    println!(
        "work {:.0} VM-s = {:.2} x what the VMs can do in the window\n",
        work.as_secs_f64(),
        work.as_secs_f64() / capacity
    );
}

fn compare(s: &Scenario, fair: &Report, fifo: &Report) {
    let small = s.courses[s.courses.len() - 1].name;
    let secs = |d: Duration| d.as_secs_f64().max(1e-9);
    println!("Small course: {small}.\n");
    println!("| | fair | fifo | fifo / fair |\n|---|---|---|---|");
    let rows = [
        (
            "first result p95, all students",
            fair.all.0[1],
            fifo.all.0[1],
        ),
        (
            "first result p95, small course",
            fair.small.0[1],
            fifo.small.0[1],
        ),
        (
            "wait to start (first job) p95, all",
            fair.all_queued.0[1],
            fifo.all_queued.0[1],
        ),
        (
            "wait to start (first job) p95, small",
            fair.small_queued.0[1],
            fifo.small_queued.0[1],
        ),
    ];
    for (what, a, b) in rows {
        let (ma, mb, x) = (mmss(a), mmss(b), secs(b) / secs(a));
        println!("| {what} | {ma} | {mb} | {x:.1}x |");
    }
    let change = |a: f64, b: f64| format!("{:+.1} % (fair vs fifo)", 100.0 * (a - b) / b);
    let (a, b) = (fair.makespan, fifo.makespan);
    let (ma, mb, d) = (mmss(a), mmss(b), change(secs(a), secs(b)));
    println!("| makespan | {ma} | {mb} | {d} |");
    let (a, b) = (100.0 * fair.utilisation, 100.0 * fifo.utilisation);
    println!(
        "| VM utilisation | {a:.1} % | {b:.1} % | {} |",
        change(a, b)
    );
}

const USAGE: &str =
    "usage: deadline_sim [--policy fair|fifo|both] [--seed N] [--run-secs BIG,MID,SMALL]";

/// Mean job run times of the 600, 200 and 50-student courses (seconds).
const RUN_SECS: [u64; 3] = [5, 30, 120];

/// What the command line asks for.
struct Args {
    policies: Vec<Policy>,
    seed: u64,
    run_secs: [u64; 3],
}

/// The policies to run and the seed; None when help was asked for.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let (mut policies, mut seed) = (vec![Policy::Fair, Policy::Fifo], 1);
    let mut run_secs = RUN_SECS;
    while let Some(arg) = args.next() {
        if arg == "--help" || arg == "-h" {
            return Ok(None);
        }
        let value = args.next();
        match (arg.as_str(), value.as_deref()) {
            ("--policy", Some("fair")) => policies = vec![Policy::Fair],
            ("--policy", Some("fifo")) => policies = vec![Policy::Fifo],
            ("--policy", Some("both")) => policies = vec![Policy::Fair, Policy::Fifo],
            ("--seed", Some(n)) => {
                seed = n
                    .parse()
                    .map_err(|_| format!("--seed {n:?} is not a whole number"))?
            }
            ("--run-secs", Some(list)) => {
                let secs: Vec<u64> = list
                    .split(',')
                    .map(|n| n.trim().parse().ok().filter(|n| *n > 0))
                    .collect::<Option<_>>()
                    .ok_or_else(|| format!("--run-secs {list:?}: give three whole numbers > 0"))?;
                run_secs = secs
                    .try_into()
                    .map_err(|_| format!("--run-secs {list:?}: give three, e.g. 5,30,120"))?;
            }
            _ => return Err(format!("unknown or incomplete argument {arg:?}")),
        }
    }
    Ok(Some(Args {
        policies,
        seed,
        run_secs,
    }))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("deadline_sim: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let scenario = Scenario::deadline(args.seed, args.run_secs);
    let plan = plan(&scenario);
    describe(&scenario, &plan);
    let mut reports = Vec::new();
    for &policy in &args.policies {
        match simulate(&scenario, &plan, policy) {
            Ok(outcome) => reports.push(report(&scenario, &plan, policy, &outcome)),
            Err(e) => {
                eprintln!("deadline_sim: the {policy:?} run failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let [fair, fifo] = &reports[..] {
        compare(&scenario, fair, fifo);
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deadline a tenth the size still gives every job a result, under
    /// both policies, runs each job for exactly its planned time, and gives
    /// the same waits when run again.
    #[test]
    fn scaled_down_deadline_gives_every_job_a_result() {
        let mut scenario = Scenario::deadline(7, RUN_SECS);
        for course in &mut scenario.courses {
            course.students /= 10;
        }
        scenario.submissions = 300;
        scenario.vms = 4;
        let plan = plan(&scenario);
        assert_eq!(plan.submissions.len(), 300);
        let work: Duration = plan.submissions.iter().map(|sub| sub.run).sum();
        for policy in [Policy::Fair, Policy::Fifo] {
            let out = simulate(&scenario, &plan, policy).unwrap();
            assert_eq!(out.waits.len(), 300, "{policy:?}");
            assert_eq!(out.not_done, 0, "{policy:?}");
            assert_eq!(out.busy, work, "{policy:?}");
            let again = simulate(&scenario, &plan, policy).unwrap();
            assert_eq!(out.waits, again.waits, "{policy:?}");
        }
    }
}
