//! autodriver: runs a grading job (`make` in a directory) as an
//! unprivileged user inside the VM or container, Tango-compatible and
//! stricter. See the crate README for the full behaviour.

mod capture;
mod cli;
mod fsops;
mod idle;
mod intar;
mod job;
mod leftovers;
mod procs;
mod summary;
mod sys;
mod users;

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};
use std::time::Duration;

use cli::{Command, JobArgs};

const EXIT_RAN: i32 = 0;
const EXIT_USAGE: i32 = 1;
const EXIT_TIMEOUT: i32 = 2;
pub(crate) const EXIT_OS_ERROR: i32 = 3;

/// Where the job's leftovers are looked for besides the home.
const SCRATCH_DIRS: [&str; 5] = ["/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue", "/run/lock"];

/// Homes that would be disastrous to chown and empty.
const FORBIDDEN_HOMES: [&str; 16] = [
    "/", "/tmp", "/var/tmp", "/dev/shm", "/root", "/home", "/etc", "/usr", "/bin", "/sbin", "/lib",
    "/var", "/dev", "/proc", "/sys", "/boot",
];

enum Failure {
    Usage(String),
    Os(String),
}

fn os<E: std::fmt::Display>(what: impl std::fmt::Display) -> impl FnOnce(E) -> Failure {
    move |e| Failure::Os(format!("{what}: {e}"))
}

fn main() {
    let code = match cli::parse(std::env::args_os().skip(1)) {
        Err(message) => {
            eprintln!("autodriver: {message}\n(autodriver --help shows the usage)");
            EXIT_USAGE
        }
        Ok(Command::Help) => {
            print!("{}", cli::HELP);
            EXIT_RAN
        }
        Ok(Command::Idle {
            purge_writable,
            serve,
            loopback_hosts,
        }) => match idle::run(purge_writable.as_deref(), serve, loopback_hosts) {
            Ok(()) => EXIT_RAN,
            Err(e) => {
                eprintln!("autodriver: idle: {e}");
                EXIT_OS_ERROR
            }
        },
        Ok(Command::Run(args)) => match run(&args) {
            Ok(code) => code,
            Err(Failure::Usage(message)) => {
                eprintln!("autodriver: {message}");
                EXIT_USAGE
            }
            Err(Failure::Os(message)) => {
                eprintln!("autodriver: {message}");
                EXIT_OS_ERROR
            }
        },
    };
    std::process::exit(code);
}

/// The unprivileged caller when installed set-uid root.
#[derive(Clone, Copy)]
struct Invoker {
    uid: u32,
    gid: u32,
}

fn check_privileges() -> Result<Option<Invoker>, Failure> {
    let (uid, euid, gid) = unsafe { (libc::getuid(), libc::geteuid(), libc::getgid()) };
    if euid != 0 {
        return Err(Failure::Os(
            "autodriver must run as root or be installed set-uid root".into(),
        ));
    }
    Ok((uid != 0).then_some(Invoker { uid, gid }))
}

/// Makes every id root (a set-uid binary starts with only the effective
/// uid), and refuses to go on if that does not stick.
fn become_root() -> Result<(), Failure> {
    let fail = || {
        Failure::Os(format!(
            "cannot become root: {}",
            std::io::Error::last_os_error()
        ))
    };
    if unsafe { libc::setresgid(0, 0, 0) } != 0 || unsafe { libc::setresuid(0, 0, 0) } != 0 {
        return Err(fail());
    }
    let (mut r, mut e, mut s) = (1, 1, 1);
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    if (r, e, s) != (0, 0, 0) {
        return Err(Failure::Os("cannot become root: ids did not change".into()));
    }
    Ok(())
}

/// Creates a file only its owner can read or write. A set-uid driver opens
/// it with the caller's file-system identity, so `--summary /etc/x` cannot
/// be used to write where the caller could not.
fn create_private_file(path: &Path, invoker: Option<Invoker>) -> Result<OwnedFd, Failure> {
    if let Some(inv) = invoker {
        unsafe {
            libc::setfsgid(inv.gid);
            libc::setfsuid(inv.uid);
        }
    }
    let opened = sys::open_path(
        path,
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND | libc::O_NOFOLLOW,
        0o600,
    );
    if invoker.is_some() {
        unsafe {
            libc::setfsuid(0);
            libc::setfsgid(0);
        }
    }
    let fd =
        opened.map_err(|e| Failure::Usage(format!("cannot create {}: {e}", path.display())))?;
    sys::check(unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) })
        .map_err(|e| Failure::Usage(format!("cannot make {} private: {e}", path.display())))?;
    Ok(fd)
}

fn validate_home(home: &Path) -> Result<(), Failure> {
    if !home.is_absolute()
        || home
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(Failure::Usage(format!(
            "the home {} must be an absolute, normalised path",
            home.display()
        )));
    }
    let normalised: std::path::PathBuf = home.components().collect();
    if FORBIDDEN_HOMES.iter().any(|f| normalised == Path::new(f)) {
        return Err(Failure::Usage(format!(
            "refusing {} as the grading user's home",
            home.display()
        )));
    }
    Ok(())
}

fn exit_code_of(status: libc::c_int) -> i32 {
    if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        libc::WEXITSTATUS(status)
    }
}

fn children_usage() -> (u64, u64) {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
    (
        ms(usage.ru_utime) + ms(usage.ru_stime),
        usage.ru_maxrss.max(0) as u64,
    )
}

/// Removes what the grading user left: files in its home (but `keep_in_home`),
/// the scratch directories and `writable_dirs`, and System V IPC objects.
fn purge_user_files(
    home: &Path,
    uid: u32,
    keep_in_home: Option<&std::ffi::CStr>,
    writable_dirs: &[std::path::PathBuf],
) -> Result<(), Failure> {
    fsops::purge_owned(home, uid, keep_in_home, None)
        .map_err(os(format_args!("cannot clean {}", home.display())))?;
    // The home may lie under a scratch directory (tests do that): it stays.
    let home_id = sys::lstat(home).ok().map(|st| fsops::file_id(&st));
    let scratch = SCRATCH_DIRS.iter().map(Path::new);
    for dir in scratch.chain(writable_dirs.iter().map(|d| d.as_path())) {
        if home_id.is_some() && sys::lstat(dir).ok().map(|st| fsops::file_id(&st)) == home_id {
            continue;
        }
        fsops::purge_owned(dir, uid, None, home_id)
            .map_err(os(format_args!("cannot clean {}", dir.display())))?;
    }
    leftovers::remove_ipc_objects(uid).map_err(os("cannot remove the System V IPC objects"))?;
    Ok(())
}

fn raise_own_fd_limit() {
    // Deep trees are walked with one descriptor per level.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0
        && limit.rlim_cur < limit.rlim_max
    {
        limit.rlim_cur = limit.rlim_max;
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    }
}

fn run(args: &JobArgs) -> Result<i32, Failure> {
    let invoker = check_privileges()?;
    let summary_file = args
        .summary
        .as_deref()
        .map(|p| create_private_file(p, invoker))
        .transpose()?;
    let stream_file = args
        .stream
        .as_deref()
        .map(|p| create_private_file(p, invoker))
        .transpose()?;
    if invoker.is_some() {
        become_root()?;
    }

    let passwd = match std::fs::read_to_string("/etc/passwd") {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Failure::Os(format!("cannot read /etc/passwd: {e}"))),
    };
    if invoker.is_some() && args.home.is_some() {
        return Err(Failure::Usage(
            "--home is only accepted when autodriver is started as root".into(),
        ));
    }
    let user = users::resolve(&args.user, &passwd, args.home.as_deref()).map_err(|e| match e {
        users::ResolveError::Unknown(m) => Failure::Os(m),
        users::ResolveError::Invalid(m) => Failure::Usage(m),
    })?;
    if invoker.is_some_and(|inv| inv.uid == user.uid) {
        return Err(Failure::Usage(
            "autodriver must not be run as the grading user".into(),
        ));
    }
    validate_home(&user.home)?;
    let writable_dirs = match &args.purge_writable {
        // The list is written as root where the caller says.
        Some(_) if invoker.is_some() => {
            return Err(Failure::Usage(
                "--purge-writable is only accepted when autodriver is started as root".into(),
            ))
        }
        Some(list) => leftovers::writable_dirs(list).map_err(os(format_args!(
            "cannot list the writable directories in {}",
            list.display()
        )))?,
        None => Vec::new(),
    };

    if let Some(source) = &args.input_tar {
        if invoker.is_some() {
            // DIR would be root's, and the caller could name any target.
            return Err(Failure::Usage(
                "--input-tar is only accepted when autodriver is started as root".into(),
            ));
        }
        intar::unpack_from(source, &args.dir).map_err(os(format_args!(
            "cannot write the input files into {}",
            args.dir.display()
        )))?;
    }

    let dir_stat =
        sys::lstat(&args.dir).map_err(os(format_args!("cannot use {}", args.dir.display())))?;
    if !sys::is_dir(&dir_stat) {
        return Err(Failure::Os(format!(
            "{} is not a directory",
            args.dir.display()
        )));
    }
    if invoker.is_some_and(|inv| inv.uid != dir_stat.st_uid) {
        return Err(Failure::Usage(format!(
            "{} does not belong to the caller",
            args.dir.display()
        )));
    }
    let job_name = args
        .dir
        .file_name()
        .ok_or_else(|| Failure::Usage(format!("{} has no usable name", args.dir.display())))?;
    let job_name_c =
        CString::new(job_name.as_bytes()).map_err(|_| Failure::Usage("NUL byte in DIR".into()))?;
    let workdir = user.home.join(job_name);
    let make = job::find_make()
        .ok_or_else(|| Failure::Os(format!("make not found in {}", job::JOB_PATH)))?;

    let signals = job::install_signal_pipe().map_err(os("cannot install signal handlers"))?;
    // Orphans of the job (double-forked daemons) become our children, so
    // they can be reaped and their CPU time counted.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    sys::cloexec_inherited_fds();
    raise_own_fd_limit();

    // Start from a clean slate: nothing of the user may be running.
    procs::sweep(user.uid, user.gid, &mut || {})
        .map_err(os("cannot stop the grading user's processes"))?;
    fsops::ensure_home(&user.home, user.uid, user.gid)
        .map_err(os(format_args!("cannot set up {}", user.home.display())))?;
    let handover = match invoker {
        Some(inv) => fsops::Handover::CallerAndRootCopies { caller: inv.uid },
        None => fsops::Handover::Everything,
    };
    let source = std::fs::canonicalize(&args.dir)
        .map_err(os(format_args!("cannot resolve {}", args.dir.display())))?;
    let target = std::fs::canonicalize(&user.home)
        .map_err(os("cannot resolve the home"))?
        .join(job_name);
    if source != target {
        if source.starts_with(&target) || target.starts_with(&source) {
            return Err(Failure::Usage(format!(
                "{} overlaps {}",
                args.dir.display(),
                workdir.display()
            )));
        }
        fsops::remove_all(&target)
            .map_err(os(format_args!("cannot clear {}", target.display())))?;
        fsops::move_dir(&source, &target, handover).map_err(os(format_args!(
            "cannot move {} to {}",
            source.display(),
            target.display()
        )))?;
    }
    purge_user_files(&user.home, user.uid, Some(&job_name_c), &writable_dirs)?;
    fsops::chown_tree(&target, user.uid, user.gid, handover).map_err(os(format_args!(
        "cannot give {} to the grading user",
        target.display()
    )))?;

    let mut limits: Vec<(libc::c_int, u64, u64)> = Vec::new();
    // The resource constants have different types in the gnu and musl bindings.
    #[allow(clippy::unnecessary_cast)]
    {
        if args.nproc > 0 {
            limits.push((libc::RLIMIT_NPROC as libc::c_int, args.nproc, args.nproc));
        }
        if args.fsize > 0 {
            limits.push((libc::RLIMIT_FSIZE as libc::c_int, args.fsize, args.fsize));
        }
        if let Some(seconds) = args.cpu_seconds.filter(|&s| s > 0) {
            // One second of grace between SIGXCPU and SIGKILL, so the signal
            // tells what happened.
            limits.push((
                libc::RLIMIT_CPU as libc::c_int,
                seconds,
                seconds.saturating_add(1),
            ));
        }
        if let Some(bytes) = args.mem_bytes.filter(|&b| b > 0) {
            limits.push((libc::RLIMIT_AS as libc::c_int, bytes, bytes));
        }
        if let Some(n) = args.nofile.filter(|&n| n > 0) {
            limits.push((libc::RLIMIT_NOFILE as libc::c_int, n, n));
        }
        if let Some(bytes) = args.stack_bytes.filter(|&b| b > 0) {
            limits.push((libc::RLIMIT_STACK as libc::c_int, bytes, bytes));
        }
    }
    let home_text = user.home.to_string_lossy().into_owned();
    let spec = job::JobSpec {
        make: &make,
        workdir: &target,
        uid: user.uid,
        gid: user.gid,
        env: vec![
            ("PATH".into(), job::JOB_PATH.into()),
            ("HOME".into(), home_text),
            ("USER".into(), user.name.clone()),
            ("LOGNAME".into(), user.name.clone()),
            ("LANG".into(), "C.UTF-8".into()),
        ],
        limits,
        timeout: args.timeout_s.map(Duration::from_secs),
        output_cap: args.output_cap as usize,
        stream: stream_file.as_ref().map(|f| f.as_raw_fd()),
    };

    let oom_before = summary::oom_kill_count();
    let started = job::start_and_watch(&spec, &signals);
    let (mut run, out_read) = match started {
        Ok(started) => started,
        Err(message) => {
            // Leave nothing behind even when the job never started.
            let _ = procs::sweep(user.uid, user.gid, &mut || job::reap_children(0, &mut None));
            let _ = purge_user_files(&user.home, user.uid, None, &writable_dirs);
            return Err(Failure::Os(message));
        }
    };
    if !matches!(run.ending, job::Ending::Exited) {
        unsafe { libc::kill(-run.pid, libc::SIGKILL) };
    }
    let make_pid = run.pid;
    let mut make_status = run.wait_status;
    let swept = procs::sweep(user.uid, user.gid, &mut || {
        job::reap_children(make_pid, &mut make_status)
    });
    run.wait_status = make_status;
    job::finish(&mut run, out_read, spec.stream);
    let cleaned = purge_user_files(&user.home, user.uid, None, &writable_dirs);
    let oom_after = summary::oom_kill_count();

    if let job::Ending::Interrupted(signal) = run.ending {
        return Err(Failure::Os(format!(
            "stopped by signal {signal}; the job was killed"
        )));
    }
    let timed_out = matches!(run.ending, job::Ending::TimedOut);
    let header = match (&run.ending, run.wait_status) {
        (job::Ending::TimedOut, _) => format!(
            "Autodriver: Job timed out after {} seconds\n",
            args.timeout_s.unwrap_or_default()
        ),
        (_, Some(status)) => format!(
            "Autodriver: Job exited with status {}\n",
            exit_code_of(status)
        ),
        (_, None) => return Err(Failure::Os("make's exit status was lost".into())),
    };
    let (output, kept) = run.capture.render();
    sys::write_all(1, header.as_bytes())
        .and_then(|()| sys::write_all(1, &output))
        .map_err(os("cannot write the output"))?;

    let (cpu_ms, peak_rss_kb) = children_usage();
    let signal = run
        .wait_status
        .filter(|&s| libc::WIFSIGNALED(s))
        .map(|s| libc::WTERMSIG(s));
    let exit_status = match run.wait_status {
        Some(s) if !timed_out && libc::WIFEXITED(s) => Some(libc::WEXITSTATUS(s)),
        _ => None,
    };
    let killed_by = summary::killed_by(&summary::Evidence {
        timed_out,
        signal: signal.filter(|_| !timed_out),
        cpu_limit_ms: args
            .cpu_seconds
            .filter(|&s| s > 0)
            .map(|s| s.saturating_mul(1000)),
        cpu_ms,
        mem_limited: args.mem_bytes.is_some_and(|b| b > 0),
        oom_kills_rose: oom_before
            .zip(oom_after)
            .map(|(before, after)| after > before),
        output: &output,
    });
    let verdict = summary::Summary {
        exit_status,
        signal,
        timed_out,
        wall_ms: run.wall.as_millis() as u64,
        cpu_ms,
        peak_rss_kb,
        output_bytes_total: run.capture.total(),
        output_bytes_kept: kept,
        killed_by,
    };
    if let Some(file) = &summary_file {
        sys::write_all(file.as_raw_fd(), verdict.to_json().as_bytes())
            .map_err(os("cannot write the summary"))?;
    }

    let sweep_report = swept.map_err(os("cannot stop the grading user's processes"))?;
    if !sweep_report.verified {
        eprintln!(
            "autodriver: warning: /proc is not mounted; processes were killed but not verified"
        );
    }
    cleaned?;
    Ok(if timed_out { EXIT_TIMEOUT } else { EXIT_RAN })
}
