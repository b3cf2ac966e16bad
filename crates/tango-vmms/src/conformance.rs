//! The conformance suite: one set of checks that any [`Vmms`] runs against,
//! for the promises the engine relies on (docs/writing-a-vmms.md, "What each
//! method must do and may assume").
//!
//! A backend's test builds a [`Target`] (the backend, an image it can run,
//! a prefix of the test's own) and calls [`run`]. Each check drives the
//! backend through the trait only, with real jobs run by the autodriver, and
//! a violated duty comes back as a [`Failure`] that names the check, the duty
//! and what was seen instead:
//!
//! ```no_run
//! # async fn demo(backend: std::sync::Arc<dyn tango_core::Vmms>) {
//! use tango_vmms::conformance::{run, Target};
//! let target = Target::new(backend, "host", "cf-mybackend");
//! run(&target).await.assert_passed();
//! # }
//! ```
//!
//! Every VM a check makes is named `<prefix>-<id>-<image>` and destroyed by
//! the check, so a prefix used by nothing else leaves nothing behind.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use tango_core::model::{InputFile, Machine};
use tango_core::vmms::{RunOutcome, RunRequest, RunStatus, Vmms, VmmsError};

/// One case of the suite, in the order [`run`] takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Check {
    /// initialize, wait, copy in, run, copy out, destroy; exit statuses.
    Lifecycle,
    /// `get_vms(prefix)` lists exactly this prefix's VMs, and names that
    /// `parse_machine_name` reads back.
    GetVmsPrefix,
    /// `safe_destroy_vm` succeeds on a VM that is gone or never was.
    DestroyIdempotent,
    /// The error variants the engine tells apart.
    Errors,
    /// Many input files and a large binary one arrive intact.
    ManyAndLargeFiles,
    /// Output bytes that are not UTF-8 come back unchanged.
    BinaryOutput,
    /// Output past the cap is cut, keeping the tail.
    OutputCap,
    /// A job past its time limit ends as `TimedOut` in time.
    Timeout,
    /// `partial_output` shows a running job's output.
    PartialOutput,
    /// After `reset_vm` nothing of the previous job is left.
    ResetLeavesNothing,
    /// Jobs on several VMs at once each see only their own files.
    Concurrent,
    /// A damaged VM gives `OsError` (needs [`Target::damage`]).
    OsErrorFromDamagedVm,
    /// A fork bomb or memory hog leaves the VM destroyable and the next VM
    /// healthy.
    HostileJobs,
}

impl Check {
    pub const ALL: [Check; 13] = [
        Check::Lifecycle,
        Check::GetVmsPrefix,
        Check::DestroyIdempotent,
        Check::Errors,
        Check::ManyAndLargeFiles,
        Check::BinaryOutput,
        Check::OutputCap,
        Check::Timeout,
        Check::PartialOutput,
        Check::ResetLeavesNothing,
        Check::Concurrent,
        Check::OsErrorFromDamagedVm,
        Check::HostileJobs,
    ];
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A duty of the backend that a check found broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub check: Check,
    /// The promise, in the guide's words.
    pub duty: String,
    /// What the backend did instead.
    pub seen: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}: {}", self.check, self.duty, self.seen)
    }
}

/// What [`run`] found: the failures, and the checks it skipped and why.
#[derive(Debug, Default)]
pub struct Report {
    pub passed: Vec<Check>,
    pub failures: Vec<Failure>,
    pub skipped: Vec<(Check, String)>,
}

impl Report {
    /// Panics with every failure, one a line, unless all checks passed.
    /// Skipped checks are printed, so a test log says what was not checked.
    pub fn assert_passed(&self) {
        let passed: Vec<String> = self.passed.iter().map(Check::to_string).collect();
        eprintln!("conformance: passed {}", passed.join(", "));
        for (check, why) in &self.skipped {
            eprintln!("conformance: SKIPPED {check}: {why}");
        }
        if !self.failures.is_empty() {
            let lines: Vec<String> = self.failures.iter().map(|f| format!("  {f}")).collect();
            panic!(
                "the backend broke {} duties of the Vmms contract:\n{}",
                self.failures.len(),
                lines.join("\n")
            );
        }
    }

    /// Whether `check` reported at least one failure.
    pub fn failed(&self, check: Check) -> bool {
        self.failures.iter().any(|f| f.check == check)
    }
}

/// Makes a VM unfit to run jobs (for [`Check::OsErrorFromDamagedVm`]), the
/// way a lost disk or a broken image would: e.g. removes its autodriver.
pub type Damage =
    Arc<dyn Fn(Machine) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// The backend under test and how to drive it.
pub struct Target {
    pub vmms: Arc<dyn Vmms>,
    /// An image in `get_images()` with a POSIX shell and make, cat, cut,
    /// grep, head, ls, md5sum, sleep, tr, wc and yes (Debian, busybox or the
    /// host).
    pub image: String,
    /// A prefix no other VM of this backend uses; a rerun first removes
    /// what a failed run left under it.
    pub prefix: String,
    /// The `max` given to `wait_vm`.
    pub wait: Duration,
    /// Limits of every job; checks change `timeout_secs` and the cap.
    pub request: RunRequest,
    /// Host directory for inputs and outputs; a temporary one when `None`.
    pub scratch: Option<PathBuf>,
    /// Checks this backend cannot take, each with the reason (printed).
    pub skip: BTreeMap<Check, String>,
    pub damage: Option<Damage>,
}

impl Target {
    pub fn new(vmms: Arc<dyn Vmms>, image: &str, prefix: &str) -> Self {
        Target {
            vmms,
            image: image.to_string(),
            prefix: prefix.to_string(),
            wait: Duration::from_secs(60),
            request: RunRequest {
                job_id: 1,
                timeout_secs: 60,
                output_cap_bytes: 1 << 20,
                max_procs: 64,
                max_file_bytes: 64 << 20,
                disable_network: true,
            },
            scratch: None,
            skip: BTreeMap::new(),
            damage: None,
        }
    }

    /// Leaves `check` out, saying why.
    pub fn skip(mut self, check: Check, why: &str) -> Self {
        self.skip.insert(check, why.to_string());
        self
    }

    pub fn with_damage(mut self, damage: Damage) -> Self {
        self.damage = Some(damage);
        self
    }
}

/// Runs every check not skipped, one after another (hostile jobs must not
/// disturb the others), and reports all failures, not only the first.
pub async fn run(target: &Target) -> Report {
    run_checks(target, &Check::ALL).await
}

/// Runs the given checks only.
pub async fn run_checks(target: &Target, checks: &[Check]) -> Report {
    let mut report = Report::default();
    let scratch_guard;
    let scratch = match &target.scratch {
        Some(dir) => dir.clone(),
        None => match tempfile::Builder::new()
            .prefix("tango-conformance-")
            .tempdir()
        {
            Ok(dir) => {
                scratch_guard = dir;
                scratch_guard.path().to_path_buf()
            }
            Err(e) => {
                report.failures.push(Failure {
                    check: checks.first().copied().unwrap_or(Check::Lifecycle),
                    duty: "(suite setup) a scratch directory on the host".into(),
                    seen: e.to_string(),
                });
                return report;
            }
        },
    };
    let ctx = Ctx {
        t: target,
        scratch,
        next_id: AtomicU64::new(1),
    };
    ctx.sweep().await;
    for &check in checks {
        if let Some(why) = target.skip.get(&check) {
            report.skipped.push((check, why.clone()));
            continue;
        }
        let started = Instant::now();
        let result = match check {
            Check::Lifecycle => lifecycle(&ctx).await,
            Check::GetVmsPrefix => get_vms_prefix(&ctx).await,
            Check::DestroyIdempotent => destroy_idempotent(&ctx).await,
            Check::Errors => errors(&ctx).await,
            Check::ManyAndLargeFiles => many_and_large_files(&ctx).await,
            Check::BinaryOutput => binary_output(&ctx).await,
            Check::OutputCap => output_cap(&ctx).await,
            Check::Timeout => timeout(&ctx).await,
            Check::PartialOutput => partial_output(&ctx).await,
            Check::ResetLeavesNothing => reset_leaves_nothing(&ctx).await,
            Check::Concurrent => concurrent(&ctx).await,
            Check::OsErrorFromDamagedVm => match &target.damage {
                Some(damage) => os_error(&ctx, damage).await,
                None => {
                    report.skipped.push((
                        check,
                        "the test gave no way to damage a VM (Target::damage)".into(),
                    ));
                    continue;
                }
            },
            Check::HostileJobs => hostile_jobs(&ctx).await,
        };
        // Per check, so a slow backend step shows in the test log.
        eprintln!(
            "conformance: {check} {} in {:.1?}",
            if result.is_ok() { "passed" } else { "FAILED" },
            started.elapsed()
        );
        match result {
            Ok(()) => report.passed.push(check),
            Err(seen) => report.failures.push(Failure {
                check,
                duty: seen.duty.to_string(),
                seen: seen.seen,
            }),
        }
        // A failed check may leave VMs; the next check starts clean.
        ctx.sweep().await;
    }
    report
}

/// A broken duty, before it is tagged with its check.
struct Broken {
    duty: &'static str,
    seen: String,
}

type CheckResult = Result<(), Broken>;

fn broken(duty: &'static str, seen: impl Into<String>) -> Broken {
    Broken {
        duty,
        seen: seen.into(),
    }
}

/// `Err(e)` of a backend call as a broken duty.
trait Duty<T> {
    fn duty(self, duty: &'static str) -> Result<T, Broken>;
}

impl<T> Duty<T> for Result<T, VmmsError> {
    fn duty(self, duty: &'static str) -> Result<T, Broken> {
        self.map_err(|e| broken(duty, format!("returned Err({e:?})")))
    }
}

fn require(ok: bool, duty: &'static str, seen: impl FnOnce() -> String) -> CheckResult {
    if ok {
        Ok(())
    } else {
        Err(broken(duty, seen()))
    }
}

struct Ctx<'a> {
    t: &'a Target,
    scratch: PathBuf,
    next_id: AtomicU64,
}

/// A job's inputs: (destFile, bytes).
type Files<'a> = &'a [(&'a str, &'a [u8])];

impl Ctx<'_> {
    fn vmms(&self) -> &dyn Vmms {
        self.t.vmms.as_ref()
    }

    fn machine(&self) -> Machine {
        self.machine_in(&self.t.prefix)
    }

    fn machine_in(&self, prefix: &str) -> Machine {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Machine::new(prefix, id, &self.t.image, self.t.vmms.name())
    }

    fn request(&self, timeout_secs: u64) -> RunRequest {
        RunRequest {
            job_id: self.next_id.load(Ordering::Relaxed),
            timeout_secs,
            ..self.t.request.clone()
        }
    }

    /// Removes every VM of the prefix (and of the check's longer prefix).
    async fn sweep(&self) {
        for prefix in [self.t.prefix.clone(), self.longer_prefix()] {
            if let Ok(vms) = self.vmms().get_vms(&prefix).await {
                for vm in vms {
                    let _ = self.vmms().safe_destroy_vm(&vm).await;
                }
            }
        }
    }

    /// A prefix that starts with the target's but is another server's.
    fn longer_prefix(&self) -> String {
        format!("{}2", self.t.prefix)
    }

    async fn new_vm(&self) -> Result<Machine, Broken> {
        let vm = self.machine();
        self.start(&vm).await?;
        Ok(vm)
    }

    async fn start(&self, vm: &Machine) -> CheckResult {
        self.vmms()
            .initialize_vm(vm)
            .await
            .duty("initialize_vm makes a VM of an image get_images lists")?;
        self.vmms()
            .wait_vm(vm, self.t.wait)
            .await
            .duty("wait_vm returns once a new VM can take a job")
    }

    fn inputs(&self, vm: &Machine, files: Files<'_>) -> Result<Vec<InputFile>, Broken> {
        let dir = self
            .scratch
            .join(format!("in-{}", vm.name.replace(':', "_")));
        std::fs::create_dir_all(&dir)
            .map_err(|e| broken("(suite setup) writing input files", e.to_string()))?;
        files
            .iter()
            .map(|(name, bytes)| {
                let path = dir.join(name);
                std::fs::write(&path, bytes)
                    .map_err(|e| broken("(suite setup) writing input files", e.to_string()))?;
                Ok(InputFile {
                    local_file: name.to_string(),
                    dest_file: name.to_string(),
                    md5: hex_md5(bytes),
                    path,
                })
            })
            .collect()
    }

    /// copy_in, run_job, copy_out on a VM that is up; (outcome, output).
    async fn job(
        &self,
        vm: &Machine,
        files: Files<'_>,
        req: &RunRequest,
    ) -> Result<(RunOutcome, Vec<u8>), Broken> {
        let inputs = self.inputs(vm, files)?;
        self.vmms()
            .copy_in(vm, &inputs)
            .await
            .duty("copy_in puts each file into the job directory")?;
        let outcome = self
            .vmms()
            .run_job(vm, req)
            .await
            .duty("run_job returns Ok whenever the autodriver ran and exited")?;
        let output = self.copy_out(vm, &outcome).await?;
        Ok((outcome, output))
    }

    async fn copy_out(&self, vm: &Machine, outcome: &RunOutcome) -> Result<Vec<u8>, Broken> {
        if !matches!(outcome.status, RunStatus::Completed | RunStatus::TimedOut) {
            return Err(broken(
                "a job the autodriver ran ends Completed or TimedOut",
                format!("{outcome:?}"),
            ));
        }
        let dest = self.scratch.join(format!(
            "out-{}-{}",
            vm.name.replace(':', "_"),
            self.next_id.fetch_add(1, Ordering::Relaxed)
        ));
        self.vmms()
            .copy_out(vm, &dest)
            .await
            .duty("copy_out writes the last run's output to dest")?;
        std::fs::read(&dest).map_err(|e| {
            broken(
                "copy_out writes the last run's output to dest",
                format!("{} unreadable: {e}", dest.display()),
            )
        })
    }

    /// A whole job on a fresh VM, destroyed afterwards.
    async fn job_on_fresh_vm(
        &self,
        files: Files<'_>,
        req: &RunRequest,
    ) -> Result<(RunOutcome, Vec<u8>), Broken> {
        let vm = self.new_vm().await?;
        let result = self.job(&vm, files, req).await;
        self.destroy(&vm).await?;
        result
    }

    async fn destroy(&self, vm: &Machine) -> CheckResult {
        self.vmms()
            .safe_destroy_vm(vm)
            .await
            .duty("safe_destroy_vm removes a VM")?;
        let left = self
            .vmms()
            .exists_vm(vm)
            .await
            .duty("exists_vm answers for any VM")?;
        require(!left, "safe_destroy_vm makes sure the VM is gone", || {
            format!("exists_vm({}) is still true", vm.name)
        })
    }

    async fn listed(&self, prefix: &str) -> Result<Vec<String>, Broken> {
        let mut names: Vec<String> = self
            .vmms()
            .get_vms(prefix)
            .await
            .duty("get_vms lists the VMs of a prefix")?
            .into_iter()
            .map(|vm| vm.name)
            .collect();
        names.sort();
        Ok(names)
    }
}

fn hex_md5(bytes: &[u8]) -> String {
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn text(bytes: &[u8]) -> String {
    const SHOWN: usize = 2000;
    let s = String::from_utf8_lossy(bytes);
    if s.len() <= SHOWN {
        return s.into_owned();
    }
    let cut = s.char_indices().nth(SHOWN).map_or(s.len(), |(i, _)| i);
    format!("{}...({} bytes in all)", &s[..cut], bytes.len())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn makefile(recipe: &[&str]) -> Vec<u8> {
    let mut make = String::from("all:\n");
    for line in recipe {
        make.push_str("\t@");
        make.push_str(line);
        make.push('\n');
    }
    make.into_bytes()
}

async fn lifecycle(ctx: &Ctx<'_>) -> CheckResult {
    let images = ctx
        .vmms()
        .get_images()
        .await
        .duty("get_images lists the images jobs may use")?;
    require(
        images.contains(&ctx.t.image),
        "get_images lists the images jobs may use",
        || format!("{:?} lacks {}", images, ctx.t.image),
    )?;
    let vm = ctx.machine();
    let before = ctx
        .vmms()
        .exists_vm(&vm)
        .await
        .duty("exists_vm answers for any VM")?;
    require(!before, "exists_vm is false for a VM not made", || {
        format!("exists_vm({}) is true", vm.name)
    })?;
    ctx.start(&vm).await?;
    let exists = ctx
        .vmms()
        .exists_vm(&vm)
        .await
        .duty("exists_vm answers for any VM")?;
    require(exists, "exists_vm is true for a VM made", || {
        format!("exists_vm({}) is false after initialize_vm", vm.name)
    })?;
    let listed = ctx.listed(&ctx.t.prefix).await?;
    require(
        listed == vec![vm.name.clone()],
        "get_vms(prefix) lists the VM made",
        || format!("{listed:?}"),
    )?;

    let make = makefile(&["cat greeting.txt", "echo made-by-make"]);
    let files: Files = &[
        ("Makefile", &make),
        ("greeting.txt", b"hello, conformance\n"),
    ];
    let (outcome, output) = ctx.job(&vm, files, &ctx.request(60)).await?;
    require(
        outcome.status == RunStatus::Completed && outcome.exit_code == Some(0),
        "run_job of a job that ran is Completed with exit code 0",
        || format!("{outcome:?}"),
    )?;
    require(
        contains(&output, b"hello, conformance\nmade-by-make\n"),
        "copy_out returns what the job printed, in order",
        || text(&output),
    )?;
    require(
        contains(&output, b"Autodriver: Job exited with status 0"),
        "copy_out returns the autodriver's output, status line included",
        || text(&output),
    )?;

    // A failing make is still a completed run: the student sees why.
    ctx.vmms()
        .reset_vm(&vm)
        .await
        .duty("reset_vm accepts a VM after a healthy run")?;
    let make = makefile(&["echo about-to-fail", "exit 3"]);
    let (outcome, output) = ctx
        .job(&vm, &[("Makefile", &make)], &ctx.request(60))
        .await?;
    require(
        outcome.status == RunStatus::Completed && outcome.exit_code == Some(0),
        "a failing make is still Completed (the autodriver exited 0)",
        || format!("{outcome:?}"),
    )?;
    require(
        contains(&output, b"about-to-fail")
            && contains(&output, b"Autodriver: Job exited with status 2"),
        "copy_out returns the failing job's output and make's status",
        || text(&output),
    )?;

    ctx.destroy(&vm).await?;
    let listed = ctx.listed(&ctx.t.prefix).await?;
    require(
        listed.is_empty(),
        "get_vms no longer lists a destroyed VM",
        || format!("{listed:?}"),
    )
}

async fn get_vms_prefix(ctx: &Ctx<'_>) -> CheckResult {
    let longer = ctx.longer_prefix();
    let ours = [ctx.machine(), ctx.machine()];
    let theirs = ctx.machine_in(&longer);
    for vm in ours.iter().chain([&theirs]) {
        ctx.vmms()
            .initialize_vm(vm)
            .await
            .duty("initialize_vm makes a VM of an image get_images lists")?;
    }
    let listed = ctx
        .vmms()
        .get_vms(&ctx.t.prefix)
        .await
        .duty("get_vms lists the VMs of a prefix")?;
    let mut names: Vec<&str> = listed.iter().map(|vm| vm.name.as_str()).collect();
    names.sort();
    let mut expected: Vec<&str> = ours.iter().map(|vm| vm.name.as_str()).collect();
    expected.sort();
    require(
        names == expected,
        "get_vms(prefix) lists exactly the VMs whose name carries the prefix, \
         not those of a longer prefix (another server's)",
        || {
            format!(
                "get_vms({}) = {names:?}, expected {expected:?}",
                ctx.t.prefix
            )
        },
    )?;
    for vm in &listed {
        let parsed = tango_core::model::parse_machine_name(&ctx.t.prefix, &vm.name);
        require(
            parsed == Some((vm.id, vm.image.clone())),
            "get_vms returns Machines whose name, id and image agree",
            || format!("{vm:?} (name parses as {parsed:?})"),
        )?;
    }
    let other = ctx.listed(&longer).await?;
    require(
        other == vec![theirs.name.clone()],
        "get_vms(prefix) lists exactly the VMs whose name carries the prefix",
        || format!("get_vms({longer}) = {other:?}"),
    )?;
    // What get_vms returned is what the orphan sweep destroys with.
    for vm in listed {
        ctx.destroy(&vm).await?;
    }
    ctx.destroy(&theirs).await?;
    let left = ctx.listed(&ctx.t.prefix).await?;
    require(
        left.is_empty(),
        "get_vms no longer lists a destroyed VM",
        || format!("{left:?}"),
    )
}

async fn destroy_idempotent(ctx: &Ctx<'_>) -> CheckResult {
    let never = ctx.machine();
    ctx.vmms()
        .safe_destroy_vm(&never)
        .await
        .duty("safe_destroy_vm of a VM that was never made is Ok")?;
    let vm = ctx.new_vm().await?;
    ctx.destroy(&vm).await?;
    ctx.vmms()
        .safe_destroy_vm(&vm)
        .await
        .duty("safe_destroy_vm of a VM already destroyed is Ok")?;
    // A VM whose initialize_vm was cut short (the engine drops the future
    // at its timeout) must be destroyable too.
    let half = ctx.machine();
    // Only Ok is asked of it: a daemon may finish a creation the dropped
    // call had sent after this destroy, and the orphan sweep is what
    // removes such a VM (as `sweep` does after each check).
    let _ = tokio::time::timeout(Duration::from_millis(1), ctx.vmms().initialize_vm(&half)).await;
    ctx.vmms()
        .safe_destroy_vm(&half)
        .await
        .duty("safe_destroy_vm of a VM whose initialize_vm was cut short is Ok")
}

async fn errors(ctx: &Ctx<'_>) -> CheckResult {
    let image = "tango-conformance-no-such-image";
    let vm = Machine::new(
        &ctx.t.prefix,
        ctx.next_id.fetch_add(1, Ordering::Relaxed),
        image,
        ctx.t.vmms.name(),
    );
    match ctx.vmms().initialize_vm(&vm).await {
        Err(VmmsError::NoSuchImage(_)) => {}
        other => {
            return Err(broken(
                "initialize_vm of an image the backend lacks is NoSuchImage",
                format!("{other:?}"),
            ))
        }
    }
    ctx.destroy(&vm).await?;

    let ghost = ctx.machine();
    let make = makefile(&["true"]);
    let inputs = ctx.inputs(&ghost, &[("Makefile", &make)])?;
    // A backend may hold small inputs until the run (docker and ec2 send
    // them with the command): then run_job is where the VM is found missing.
    let missing = match ctx.vmms().copy_in(&ghost, &inputs).await {
        Ok(()) => ctx.vmms().run_job(&ghost, &ctx.request(10)).await.err(),
        Err(e) => Some(e),
    };
    require(
        matches!(missing, Some(VmmsError::NoSuchVm(_))),
        "copy_in (or, when it defers the copy, run_job) on a VM that does not exist is NoSuchVm",
        || format!("{missing:?}"),
    )?;

    // An input that vanished from the host: an error, not a job without it.
    let vm = ctx.new_vm().await?;
    let mut inputs = ctx.inputs(&vm, &[("Makefile", &make)])?;
    inputs.push(InputFile {
        local_file: "gone.txt".into(),
        dest_file: "gone.txt".into(),
        path: ctx.scratch.join("no-such-input-file"),
        md5: String::new(),
    });
    let copied = ctx.vmms().copy_in(&vm, &inputs).await;
    require(
        copied.is_err(),
        "copy_in of an input file missing on the host is an error",
        || format!("{copied:?}"),
    )?;
    ctx.destroy(&vm).await
}

/// Bytes that are not text: every byte value, then a pseudo-random run.
fn binary_bytes(len: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..=255u8).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while bytes.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

async fn many_and_large_files(ctx: &Ctx<'_>) -> CheckResult {
    const MANY: usize = 40;
    let names: Vec<String> = (0..MANY).map(|i| format!("f{i:02}.txt")).collect();
    let bodies: Vec<Vec<u8>> = (0..MANY)
        .map(|i| format!("file {i}\n").into_bytes())
        .collect();
    let big = binary_bytes(16 << 20);
    let make = makefile(&[
        "echo count=$$(ls f*.txt | wc -l)",
        "echo many=$$(cat f*.txt | md5sum | cut -c1-32)",
        "echo big=$$(md5sum < big.bin | cut -c1-32)",
    ]);
    let mut files: Vec<(&str, &[u8])> = vec![("Makefile", &make), ("big.bin", &big)];
    files.extend(
        names
            .iter()
            .map(String::as_str)
            .zip(bodies.iter().map(Vec::as_slice)),
    );
    let (_, output) = ctx.job_on_fresh_vm(&files, &ctx.request(120)).await?;
    let expected = format!(
        "count={MANY}\nmany={}\nbig={}\n",
        hex_md5(&bodies.concat()),
        hex_md5(&big)
    );
    require(
        contains(&output, expected.as_bytes()),
        "copy_in puts every file into the job directory, byte for byte",
        || format!("expected {expected:?} in {}", text(&output)),
    )
}

async fn binary_output(ctx: &Ctx<'_>) -> CheckResult {
    let bytes = binary_bytes(64 << 10);
    let make = makefile(&["cat data.bin"]);
    let (_, output) = ctx
        .job_on_fresh_vm(
            &[("Makefile", &make), ("data.bin", &bytes)],
            &ctx.request(60),
        )
        .await?;
    require(
        contains(&output, &bytes),
        "copy_out returns the job's output byte for byte, not as text",
        || {
            format!(
                "{} bytes of output do not hold the {} bytes printed",
                output.len(),
                bytes.len()
            )
        },
    )
}

async fn output_cap(ctx: &Ctx<'_>) -> CheckResult {
    const CAP: u64 = 8192;
    let make = makefile(&[
        "yes 0123456789abcdef | head -c 2000000",
        "echo last-line-survives",
    ]);
    let req = RunRequest {
        output_cap_bytes: CAP,
        ..ctx.request(60)
    };
    let (outcome, output) = ctx.job_on_fresh_vm(&[("Makefile", &make)], &req).await?;
    require(
        outcome.status == RunStatus::Completed,
        "a job that floods its output is Completed",
        || format!("{outcome:?}"),
    )?;
    // The autodriver's own lines come on top of the cap.
    require(
        (output.len() as u64) <= CAP + 512,
        "the output is capped at output_cap_bytes",
        || format!("{} bytes for a cap of {CAP}", output.len()),
    )?;
    require(
        contains(&output, b"last-line-survives"),
        "a capped output keeps its tail (where the score is)",
        || text(&output),
    )
}

async fn timeout(ctx: &Ctx<'_>) -> CheckResult {
    let vm = ctx.new_vm().await?;
    let make = makefile(&["echo before-the-limit", "sleep 120"]);
    let started = Instant::now();
    let (outcome, output) = ctx
        .job(&vm, &[("Makefile", &make)], &ctx.request(2))
        .await?;
    let took = started.elapsed();
    require(
        outcome.status == RunStatus::TimedOut && outcome.exit_code == Some(2),
        "run_job of a job past its time limit is TimedOut with exit code 2",
        || format!("{outcome:?}"),
    )?;
    require(
        took < Duration::from_secs(32),
        "run_job returns soon after the time limit",
        || format!("took {took:?} for a limit of 2 s"),
    )?;
    require(
        contains(&output, b"Autodriver: Job timed out after 2 seconds")
            && contains(&output, b"before-the-limit"),
        "copy_out after a timeout returns what the job printed",
        || text(&output),
    )?;
    // A timed-out run is healthy: the engine reuses the VM.
    ctx.vmms()
        .reset_vm(&vm)
        .await
        .duty("reset_vm accepts a VM after a timed-out run")?;
    let make = makefile(&["echo after-timeout"]);
    let (_, output) = ctx
        .job(&vm, &[("Makefile", &make)], &ctx.request(60))
        .await?;
    require(
        contains(&output, b"after-timeout"),
        "a VM runs the next job after a timed-out one",
        || text(&output),
    )?;
    ctx.destroy(&vm).await
}

async fn partial_output(ctx: &Ctx<'_>) -> CheckResult {
    let vm = ctx.new_vm().await?;
    let ghost_read = ctx.vmms().partial_output(&vm, 1 << 20).await;
    require(
        ghost_read.is_ok(),
        "partial_output before a run is Ok (empty is fine)",
        || format!("{ghost_read:?}"),
    )?;
    let make = makefile(&["echo partial-marker", "sleep 30"]);
    let inputs = ctx.inputs(&vm, &[("Makefile", &make)])?;
    ctx.vmms()
        .copy_in(&vm, &inputs)
        .await
        .duty("copy_in puts each file into the job directory")?;
    let vmms = ctx.t.vmms.clone();
    let run = {
        let (vm, req) = (vm.clone(), ctx.request(6));
        tokio::spawn(async move { vmms.run_job(&vm, &req).await })
    };
    // No event says a job has printed: ask as a client would, a few times
    // a second, until the marker shows or the run ends.
    let mut seen = Vec::new();
    let mut last_error = None;
    while !run.is_finished() {
        match ctx.vmms().partial_output(&vm, 1 << 20).await {
            Ok(bytes) if contains(&bytes, b"partial-marker") => {
                seen = bytes;
                break;
            }
            Ok(bytes) => seen = bytes,
            Err(e) => last_error = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let finished_first = run.is_finished();
    let small = ctx.vmms().partial_output(&vm, 4).await;
    let outcome = run
        .await
        .map_err(|e| broken("run_job does not panic", e.to_string()))?
        .duty("run_job returns Ok whenever the autodriver ran and exited")?;
    ctx.copy_out(&vm, &outcome).await?;
    ctx.destroy(&vm).await?;
    require(
        !finished_first && contains(&seen, b"partial-marker"),
        "partial_output shows what the running job printed so far",
        || match last_error {
            Some(e) => format!("partial_output failed: {e:?}"),
            None => format!("saw only {:?} while the job ran", text(&seen)),
        },
    )?;
    require(
        matches!(&small, Ok(b) if b.len() <= 4),
        "partial_output returns at most max_bytes",
        || format!("{small:?} for max_bytes 4"),
    )
}

async fn reset_leaves_nothing(ctx: &Ctx<'_>) -> CheckResult {
    let vm = ctx.new_vm().await?;
    // The markers carry the VM's name: on a backend whose VMs share the
    // host's /tmp and process table (the example `local` backend), another
    // run of this check at the same time must not look like a leftover.
    // The daemon is spelled "[t]ango..." in the probe below, so the probe's
    // own command line does not match itself.
    let left = format!("tango-conformance-left-{}", vm.name);
    let daemon = format!("tango-conformance-daemon-{}", vm.name);
    let first = makefile(&[
        "echo first-job-output",
        "touch made-by-job-one",
        &format!("echo left >> /tmp/{left}"),
        &format!("echo left >> $$HOME/{left}"),
        &format!("sh -c 'sleep 300; echo {daemon}' >/dev/null 2>&1 &"),
    ]);
    let files: Files = &[("Makefile", &first), ("only-job-one.txt", b"one\n")];
    let (outcome, _) = ctx.job(&vm, files, &ctx.request(60)).await?;
    require(
        outcome.status == RunStatus::Completed,
        "run_job of a job that ran is Completed",
        || format!("{outcome:?}"),
    )?;
    ctx.vmms()
        .reset_vm(&vm)
        .await
        .duty("reset_vm accepts a VM after a healthy run")?;
    let partial = ctx
        .vmms()
        .partial_output(&vm, 1 << 20)
        .await
        .duty("partial_output on a reused VM is Ok")?;
    require(
        !contains(&partial, b"first-job-output"),
        "partial_output never shows an earlier job's output",
        || text(&partial),
    )?;
    let second = makefile(&[
        "ls -a",
        &format!("test ! -e /tmp/{left} || echo LEFT-IN-TMP"),
        &format!("test ! -e $$HOME/{left} || echo LEFT-IN-HOME"),
        &format!("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\000' ' ' | grep -q '[t]{}' && echo LEFT-PROCESS || true", &daemon[1..]),
        "echo second-job-done",
    ]);
    let (_, output) = ctx
        .job(&vm, &[("Makefile", &second)], &ctx.request(60))
        .await?;
    ctx.destroy(&vm).await?;
    require(
        contains(&output, b"second-job-done"),
        "a reused VM runs the next job",
        || text(&output),
    )?;
    for (what, duty) in [
        (
            &b"only-job-one.txt"[..],
            "reset leaves no input file of the previous job",
        ),
        (
            b"made-by-job-one",
            "reset leaves no file the previous job made in its directory",
        ),
        (
            b"LEFT-IN-TMP",
            "reset leaves no file the previous job left in /tmp",
        ),
        (
            b"LEFT-IN-HOME",
            "reset leaves no file the previous job left in its home",
        ),
        (
            b"LEFT-PROCESS",
            "reset leaves no process of the previous job running",
        ),
        (
            b"first-job-output",
            "the next job's output holds nothing of the previous one",
        ),
    ] {
        require(!contains(&output, what), duty, || text(&output))?;
    }
    Ok(())
}

async fn concurrent(ctx: &Ctx<'_>) -> CheckResult {
    const VMS: usize = 3;
    let vms: Vec<Machine> = (0..VMS).map(|_| ctx.machine()).collect();
    let mut jobs = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        let inputs = ctx.inputs(
            vm,
            &[
                ("Makefile", &makefile(&["sleep 1", "cat mine.txt"])),
                ("mine.txt", format!("vm-number-{i}\n").as_bytes()),
            ],
        )?;
        let vmms = ctx.t.vmms.clone();
        let (vm, req, wait) = (vm.clone(), ctx.request(60), ctx.t.wait);
        let dest = ctx.scratch.join(format!("concurrent-{i}"));
        jobs.push(tokio::spawn(async move {
            vmms.initialize_vm(&vm).await?;
            vmms.wait_vm(&vm, wait).await?;
            vmms.copy_in(&vm, &inputs).await?;
            let outcome = vmms.run_job(&vm, &req).await?;
            vmms.copy_out(&vm, &dest).await?;
            Ok::<_, VmmsError>((outcome, dest))
        }));
    }
    let mut results = Vec::new();
    for job in jobs {
        results.push(job.await);
    }
    for vm in &vms {
        ctx.destroy(vm).await?;
    }
    for (i, result) in results.into_iter().enumerate() {
        let (outcome, dest) = result
            .map_err(|e| broken("backend calls do not panic", e.to_string()))?
            .duty("every call may run concurrently for different VMs")?;
        let output = std::fs::read(&dest).unwrap_or_default();
        let others = (0..VMS)
            .filter(|&j| j != i)
            .any(|j| contains(&output, format!("vm-number-{j}").as_bytes()));
        require(
            outcome.status == RunStatus::Completed
                && contains(&output, format!("vm-number-{i}\n").as_bytes())
                && !others,
            "jobs on different VMs at once each run with their own files",
            || format!("VM {i}: {outcome:?}, output {}", text(&output)),
        )?;
    }
    Ok(())
}

async fn os_error(ctx: &Ctx<'_>, damage: &Damage) -> CheckResult {
    let vm = ctx.new_vm().await?;
    let make = makefile(&["echo should-not-run"]);
    let inputs = ctx.inputs(&vm, &[("Makefile", &make)])?;
    ctx.vmms()
        .copy_in(&vm, &inputs)
        .await
        .duty("copy_in puts each file into the job directory")?;
    damage(vm.clone())
        .await
        .map_err(|e| broken("(test setup) damaging the VM", e))?;
    let started = Instant::now();
    // A short limit: a backend that notices the damage only by waiting
    // for the run then waits less.
    let run = ctx.vmms().run_job(&vm, &ctx.request(5)).await;
    eprintln!(
        "conformance: run_job on a damaged VM: {run:?} after {:.1?}",
        started.elapsed()
    );
    ctx.destroy(&vm).await?;
    require(
        match &run {
            Ok(outcome) => outcome.status == RunStatus::OsError,
            Err(_) => true,
        },
        "run_job on a damaged VM is OsError (or Err), never a completed run",
        || format!("{run:?}"),
    )
}

async fn hostile_jobs(ctx: &Ctx<'_>) -> CheckResult {
    let hostile: [(&str, Vec<u8>); 2] = [
        ("fork bomb", makefile(&["f() { f | f & }; f; sleep 30"])),
        (
            "memory hog",
            makefile(&["x=0123456789abcdef; while :; do x=$$x$$x; done"]),
        ),
    ];
    for (what, make) in hostile {
        let vm = ctx.new_vm().await?;
        let inputs = ctx.inputs(&vm, &[("Makefile", &make)])?;
        ctx.vmms()
            .copy_in(&vm, &inputs)
            .await
            .duty("copy_in puts each file into the job directory")?;
        // Whatever the run says, it must end and leave the VM removable.
        let limit = ctx.request(5);
        let bound = Duration::from_secs(limit.timeout_secs + 60);
        let run = tokio::time::timeout(bound, ctx.vmms().run_job(&vm, &limit)).await;
        ctx.destroy(&vm).await.map_err(|b| Broken {
            duty: "a VM that ran a hostile job can be destroyed",
            seen: format!("after a {what}: {}: {}", b.duty, b.seen),
        })?;
        require(
            run.is_ok(),
            "run_job of a hostile job returns within its time limit",
            || format!("a {what} ran past {bound:?}"),
        )?;
        let make = makefile(&["echo healthy-after"]);
        let (_, output) = ctx
            .job_on_fresh_vm(&[("Makefile", &make)], &ctx.request(60))
            .await?;
        require(
            contains(&output, b"healthy-after"),
            "the next VM after a hostile job is healthy",
            || format!("after a {what}: {}", text(&output)),
        )?;
    }
    Ok(())
}
