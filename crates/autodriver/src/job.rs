//! Running `make` as the grading user and collecting its output.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use crate::capture::OutputCapture;
use crate::sys;

pub const JOB_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long to wait for the output pipe to reach end-of-file once every
/// process of the grading user is gone (only a process of another uid that
/// inherited the pipe, such as a set-uid program that dropped the user's
/// ids, could keep it open).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Write end of the self-pipe the signal handler reports to.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signal: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = signal as u8;
        // Nothing to do on failure: a full pipe already holds a wake-up.
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
}

pub const TERMINATING_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Wakes the event loop on SIGCHLD and on the signals that ask the driver to
/// stop. Returns the read end of the self-pipe.
pub fn install_signal_pipe() -> io::Result<OwnedFd> {
    let (read, write) = pipe(libc::O_CLOEXEC | libc::O_NONBLOCK)?;
    SIGNAL_PIPE.store(write.as_raw_fd(), Ordering::Relaxed);
    // The write end lives as long as the process.
    std::mem::forget(write);
    for signal in [libc::SIGCHLD].iter().chain(TERMINATING_SIGNALS.iter()) {
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_signal as *const () as usize;
        action.sa_flags = libc::SA_RESTART | libc::SA_NOCLDSTOP;
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        sys::check(unsafe { libc::sigaction(*signal, &action, std::ptr::null_mut()) })?;
    }
    Ok(read)
}

pub fn pipe(flags: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    sys::check(unsafe { libc::pipe2(fds.as_mut_ptr(), flags) })?;
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Finds `make` in the job's PATH.
pub fn find_make() -> Option<PathBuf> {
    JOB_PATH
        .split(':')
        .map(|dir| Path::new(dir).join("make"))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .map(|m| {
                    use std::os::unix::fs::PermissionsExt;
                    m.is_file() && m.permissions().mode() & 0o111 != 0
                })
                .unwrap_or(false)
        })
}

pub struct JobSpec<'a> {
    pub make: &'a Path,
    pub workdir: &'a Path,
    pub uid: u32,
    pub gid: u32,
    pub env: Vec<(String, String)>,
    /// (resource, soft, hard)
    pub limits: Vec<(libc::c_int, u64, u64)>,
    pub timeout: Option<Duration>,
    pub output_cap: usize,
    pub stream: Option<RawFd>,
}

#[derive(Debug)]
pub enum Ending {
    /// make was reaped (its wait status is in [`JobRun::wait_status`]).
    Exited,
    TimedOut,
    /// The driver was asked to stop (SIGTERM and the like).
    Interrupted(libc::c_int),
}

pub struct JobRun {
    pub ending: Ending,
    /// make's wait status when it was reaped (also after a timeout).
    pub wait_status: Option<libc::c_int>,
    pub wall: Duration,
    pub capture: OutputCapture,
    pub pid: libc::pid_t,
}

/// Setup steps of the child, reported back through the error pipe.
const STAGES: [&str; 9] = [
    "reset signals",
    "create session",
    "redirect standard streams",
    "enter the job directory",
    "set resource limits",
    "drop supplementary groups",
    "set group id",
    "set user id",
    "execute make",
];
const STAGE_REGAINED_ROOT: u8 = 100;

pub fn describe_child_failure(stage: u8, errno: i32) -> String {
    if stage == STAGE_REGAINED_ROOT {
        return "the job could regain root after dropping privileges".into();
    }
    let what = STAGES
        .get(stage as usize)
        .copied()
        .unwrap_or("set up the job");
    format!("cannot {what}: {}", io::Error::from_raw_os_error(errno))
}

/// In the child after fork: report the failed stage and exit.
unsafe fn child_fail(err_fd: RawFd, stage: u8) -> ! {
    let errno = *libc::__errno_location();
    let mut message = [0u8; 5];
    message[0] = stage;
    message[1..].copy_from_slice(&errno.to_ne_bytes());
    libc::write(err_fd, message.as_ptr().cast(), message.len());
    libc::_exit(127);
}

/// Everything the child needs, prepared before fork so that the child
/// allocates nothing.
struct ChildPlan {
    make: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    workdir: CString,
    limits: Vec<(libc::c_int, libc::rlimit)>,
    uid: u32,
    gid: u32,
}

/// Descriptors the child wires up.
struct ChildFds {
    devnull: RawFd,
    out: RawFd,
    err: RawFd,
}

unsafe fn child_main(
    plan: &ChildPlan,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    fds: ChildFds,
) -> ! {
    let ChildFds {
        devnull,
        out,
        err: err_fd,
    } = fds;
    let (uid, gid) = (plan.uid, plan.gid);
    let mut stage = 0u8;
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    // Rust ignores SIGPIPE and the driver catches others: give the job the
    // defaults (an ignored disposition would survive exec).
    for signal in [
        libc::SIGPIPE,
        libc::SIGCHLD,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGXFSZ,
        libc::SIGXCPU,
    ] {
        libc::signal(signal, libc::SIG_DFL);
    }
    if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
        child_fail(err_fd, stage);
    }
    stage += 1;
    if libc::setsid() < 0 {
        child_fail(err_fd, stage);
    }
    stage += 1;
    if libc::dup2(devnull, 0) < 0 || libc::dup2(out, 1) < 0 || libc::dup2(out, 2) < 0 {
        child_fail(err_fd, stage);
    }
    stage += 1;
    if libc::chdir(plan.workdir.as_ptr()) != 0 {
        child_fail(err_fd, stage);
    }
    stage += 1;
    for (resource, limit) in &plan.limits {
        // The resource type differs between the gnu and musl bindings.
        #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
        if libc::setrlimit(*resource as _, limit) != 0 {
            child_fail(err_fd, stage);
        }
    }
    stage += 1;
    if libc::setgroups(0, std::ptr::null()) != 0 {
        child_fail(err_fd, stage);
    }
    stage += 1;
    if libc::setresgid(gid, gid, gid) != 0 {
        child_fail(err_fd, stage);
    }
    stage += 1;
    if libc::setresuid(uid, uid, uid) != 0 {
        child_fail(err_fd, stage);
    }
    // Make sure there is no way back (e.g. a kept capability).
    let (mut r, mut e, mut s) = (0, 0, 0);
    libc::getresuid(&mut r, &mut e, &mut s);
    let (mut gr, mut ge, mut gs) = (0, 0, 0);
    libc::getresgid(&mut gr, &mut ge, &mut gs);
    if libc::setresuid(0, 0, 0) == 0
        || libc::setresgid(0, 0, 0) == 0
        || (r, e, s) != (uid, uid, uid)
        || (gr, ge, gs) != (gid, gid, gid)
        || libc::getgroups(0, std::ptr::null_mut()) != 0
    {
        child_fail(err_fd, STAGE_REGAINED_ROOT);
    }
    stage += 1;
    libc::execve(plan.make.as_ptr(), argv.as_ptr(), envp.as_ptr());
    child_fail(err_fd, stage);
}

/// Runs the job and reads its output until it ends (or times out).
/// `signals` is the read end of the self-pipe. On return make may still be
/// unreaped after a timeout or interruption; the caller sweeps, then calls
/// [`finish`].
pub fn start_and_watch(spec: &JobSpec, signals: &OwnedFd) -> Result<(JobRun, OwnedFd), String> {
    let os = |what: &str, e: io::Error| format!("{what}: {e}");
    let cstr = |s: &str| CString::new(s).map_err(|_| format!("NUL byte in {s:?}"));
    let plan = ChildPlan {
        make: sys::cstring(spec.make).map_err(|e| os("make path", e))?,
        argv: vec![cstr("make")?],
        envp: spec
            .env
            .iter()
            .map(|(k, v)| cstr(&format!("{k}={v}")))
            .collect::<Result<_, _>>()?,
        workdir: sys::cstring(spec.workdir).map_err(|e| os("job directory", e))?,
        limits: spec
            .limits
            .iter()
            .map(|&(resource, soft, hard)| {
                (
                    resource,
                    libc::rlimit {
                        rlim_cur: soft as libc::rlim_t,
                        rlim_max: hard as libc::rlim_t,
                    },
                )
            })
            .collect(),
        uid: spec.uid,
        gid: spec.gid,
    };
    let argv: Vec<*const libc::c_char> = plan
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let envp: Vec<*const libc::c_char> = plan
        .envp
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let devnull = sys::open_path(Path::new("/dev/null"), libc::O_RDONLY, 0)
        .map_err(|e| os("cannot open /dev/null", e))?;
    let (out_read, out_write) =
        pipe(libc::O_CLOEXEC).map_err(|e| os("cannot create the output pipe", e))?;
    let (err_read, err_write) = pipe(libc::O_CLOEXEC).map_err(|e| os("cannot create a pipe", e))?;

    let started = Instant::now();
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os("cannot fork", io::Error::last_os_error()));
    }
    if pid == 0 {
        unsafe {
            child_main(
                &plan,
                &argv,
                &envp,
                ChildFds {
                    devnull: devnull.as_raw_fd(),
                    out: out_write.as_raw_fd(),
                    err: err_write.as_raw_fd(),
                },
            )
        }
    }
    drop(out_write);
    drop(err_write);
    drop(devnull);

    // The error pipe closes on a successful exec; five bytes mean failure.
    let mut message = [0u8; 5];
    let mut got = 0;
    while got < message.len() {
        let n = unsafe {
            libc::read(
                err_read.as_raw_fd(),
                message[got..].as_mut_ptr().cast(),
                message.len() - got,
            )
        };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    let mut run = JobRun {
        ending: Ending::TimedOut,
        wait_status: None,
        wall: Duration::ZERO,
        capture: OutputCapture::new(spec.output_cap),
        pid,
    };
    if got == message.len() {
        let errno = i32::from_ne_bytes([message[1], message[2], message[3], message[4]]);
        let mut status = 0;
        let _ = sys::retry(|| unsafe { libc::waitpid(pid, &mut status, 0) });
        return Err(describe_child_failure(message[0], errno));
    }

    // A timeout too large for the clock is no timeout.
    let deadline = spec.timeout.and_then(|t| started.checked_add(t));
    let mut out_open = true;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let wait_ms: libc::c_int = match deadline {
            None => -1,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    run.ending = Ending::TimedOut;
                    break;
                }
                // Round up so the loop does not spin just before the deadline.
                left.as_millis().saturating_add(1).min(i32::MAX as u128) as libc::c_int
            }
        };
        let mut fds = [
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if out_open { out_read.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if ready < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(os("poll", err));
        }
        if fds[1].revents != 0 {
            let n = unsafe {
                libc::read(
                    out_read.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                )
            };
            if n > 0 {
                let head_part = run.capture.push(&buffer[..n as usize]);
                if let (Some(fd), false) = (spec.stream, head_part.is_empty()) {
                    // Live output is best effort: a failing stream must not
                    // stop the job.
                    let _ = sys::write_all(fd, head_part);
                }
            } else if n == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                // End of file, or a read error that would repeat forever.
                out_open = false;
            }
        }
        if fds[0].revents != 0 {
            let mut stop = None;
            for signal in drain_signal_pipe(signals) {
                if TERMINATING_SIGNALS.contains(&signal) {
                    stop = Some(signal);
                }
            }
            reap_children(pid, &mut run.wait_status);
            if run.wait_status.is_some() {
                run.ending = Ending::Exited;
                break;
            }
            if let Some(signal) = stop {
                run.ending = Ending::Interrupted(signal);
                break;
            }
        }
    }
    run.wall = started.elapsed();
    Ok((run, out_read))
}

/// Signal numbers reported since the last call.
pub fn drain_signal_pipe(signals: &OwnedFd) -> Vec<libc::c_int> {
    let mut seen = Vec::new();
    let mut bytes = [0u8; 64];
    loop {
        let n = unsafe { libc::read(signals.as_raw_fd(), bytes.as_mut_ptr().cast(), bytes.len()) };
        if n <= 0 {
            return seen;
        }
        seen.extend(bytes[..n as usize].iter().map(|&b| b as libc::c_int));
    }
}

/// Reaps every exited child (the driver is a subreaper, so orphans of the
/// job end up here); records make's wait status when it is among them.
pub fn reap_children(make_pid: libc::pid_t, make_status: &mut Option<libc::c_int>) {
    loop {
        let mut status = 0;
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        if pid == make_pid {
            *make_status = Some(status);
        }
    }
}

/// After the sweep: reaps make if still needed and reads what is left in the
/// pipe, waiting at most [`DRAIN_GRACE`] for end-of-file.
pub fn finish(run: &mut JobRun, out_read: OwnedFd, stream: Option<RawFd>) {
    if run.wait_status.is_none() {
        let mut status = 0;
        // make is dead after the sweep, so this returns promptly.
        if sys::retry(|| unsafe { libc::waitpid(run.pid, &mut status, 0) }).is_ok() {
            run.wait_status = Some(status);
        }
    }
    let deadline = Instant::now() + DRAIN_GRACE;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let mut fds = [libc::pollfd {
            fd: out_read.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let ready =
            unsafe { libc::poll(fds.as_mut_ptr(), 1, left.as_millis().max(1) as libc::c_int) };
        if ready < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if ready <= 0 {
            return;
        }
        let n = unsafe {
            libc::read(
                out_read.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
            )
        };
        if n <= 0 {
            return;
        }
        let head_part = run.capture.push(&buffer[..n as usize]);
        if let (Some(fd), false) = (stream, head_part.is_empty()) {
            let _ = sys::write_all(fd, head_part);
        }
    }
}
