//! `--idle`: a container's PID 1. Sleeps, reaps every child that exits
//! (orphans of `docker exec` sessions end up here), exits 0 on SIGTERM or
//! SIGINT. With `--purge-writable LIST` it first lists the root file
//! system's writable directories, so that no job waits for that scan.
//!
//! With `--serve` it also runs the jobs asked for on its stdin (a Docker
//! attach stream), which spares each job a `docker exec` (tens of ms of
//! daemon and runc work). A request is the line
//! `run NONCE ARGS_LEN INPUT_LEN\n`, then ARGS_LEN bytes of arguments, each
//! ended by a NUL, then INPUT_LEN bytes given to the job as its stdin (for
//! `--input-tar -`); NONCE is 16 to 64 ASCII letters and digits. The job is
//! `autodriver ARGS`, a child whose stdout and stderr are PID 1's stdout; when it
//! has ended PID 1 writes `\0autodriver-done NONCE CODE\n` to stdout, CODE
//! being its exit code, or 128+N after signal N. The output before that
//! passes through the child autodriver (never straight from the student's
//! processes), and the nonce is in no file or argument they can read: they
//! cannot forge the end.

use std::ffi::OsString;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Condvar, Mutex};

/// The served job's process, and its wait status once reaped.
struct ServedJob {
    pid: libc::pid_t,
    status: Option<libc::c_int>,
}

static SERVED_JOB: Mutex<ServedJob> = Mutex::new(ServedJob {
    pid: 0,
    status: None,
});
static SERVED_JOB_ENDED: Condvar = Condvar::new();

/// Longest argument list a request may carry.
const MAX_ARGS_LEN: usize = 1 << 20;

/// What Docker writes into /etc/hosts for a container with network mode
/// `none`; one created with networking disabled gets an empty file (Docker's
/// init layer hides the image's), yet `localhost` must resolve.
const LOOPBACK_HOSTS: &str = "127.0.0.1\tlocalhost\n\
                              ::1\tlocalhost ip6-localhost ip6-loopback\n\
                              fe00::0\tip6-localnet\n\
                              ff00::0\tip6-mcastprefix\n\
                              ff02::1\tip6-allnodes\n\
                              ff02::2\tip6-allrouters\n";

pub fn run(purge_writable: Option<&Path>, serve: bool, loopback_hosts: bool) -> io::Result<()> {
    if loopback_hosts {
        write_loopback_hosts(Path::new("/etc/hosts"))?;
    }
    if let Some(list) = purge_writable {
        scan_in_background(list);
    }
    // Blocked signals stay pending even for PID 1 (which the kernel
    // otherwise spares from signals it has no handler for), and
    // sigwaitinfo takes them synchronously.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, signal);
        }
    }
    crate::sys::check(unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) })?;
    // Started after the mask is set, so that the signals stay this
    // thread's to take.
    if serve {
        std::thread::spawn(serve_requests);
    }
    loop {
        reap_all();
        let signal = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if signal < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if signal == libc::SIGTERM || signal == libc::SIGINT {
            reap_all();
            return Ok(());
        }
    }
}

/// Fills `hosts` with [`LOOPBACK_HOSTS`] when it is empty or missing; a
/// hosts file with entries is left as it is.
fn write_loopback_hosts(hosts: &Path) -> io::Result<()> {
    let has_entries = match std::fs::metadata(hosts) {
        Ok(meta) => Ok(meta.len() > 0),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    };
    match has_entries {
        Ok(true) => Ok(()),
        Ok(false) => std::fs::write(hosts, LOOPBACK_HOSTS),
        Err(e) => Err(e),
    }
    .map_err(|e| io::Error::new(e.kind(), format!("cannot write {}: {e}", hosts.display())))
}

fn reap_all() {
    loop {
        let mut status = 0;
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        let mut job = SERVED_JOB.lock().unwrap_or_else(|e| e.into_inner());
        if job.pid == pid {
            job.status = Some(status);
            SERVED_JOB_ENDED.notify_all();
        }
    }
}

/// A request's header line: `run NONCE ARGS_LEN INPUT_LEN`.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    nonce: String,
    args_len: usize,
    input_len: u64,
}

fn parse_request(line: &[u8]) -> Option<Request> {
    let line = std::str::from_utf8(line).ok()?.strip_suffix('\n')?;
    let mut words = line.split(' ');
    let (Some("run"), Some(nonce), Some(args_len), Some(input_len), None) = (
        words.next(),
        words.next(),
        words.next(),
        words.next(),
        words.next(),
    ) else {
        return None;
    };
    let nonce_ok =
        (16..=64).contains(&nonce.len()) && nonce.bytes().all(|b| b.is_ascii_alphanumeric());
    let args_len: usize = args_len.parse().ok()?;
    let input_len: u64 = input_len.parse().ok()?;
    (nonce_ok && args_len <= MAX_ARGS_LEN).then(|| Request {
        nonce: nonce.to_string(),
        args_len,
        input_len,
    })
}

/// Serves requests until stdin ends or one is malformed (after which the
/// stream cannot be followed).
fn serve_requests() {
    let stdin = io::stdin();
    let mut input = stdin.lock();
    // Kept after its job, for the host to read the finished job's partial
    // output, until the next job is asked for.
    let mut previous_stream: Option<PathBuf> = None;
    loop {
        let mut line = Vec::new();
        match (&mut input).take(256).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let Some(request) = parse_request(&line) else {
            eprintln!(
                "autodriver: serve: a malformed request ({:?}); no more are served",
                String::from_utf8_lossy(&line)
            );
            return;
        };
        let mut args = vec![0; request.args_len];
        if input.read_exact(&mut args).is_err() {
            return;
        }
        let args: Vec<OsString> = args
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| OsString::from_vec(a.to_vec()))
            .collect();
        let stream = stream_file_of(&args);
        if let Some(previous) = previous_stream
            .take()
            .filter(|p| Some(p) != stream.as_ref())
        {
            // Not followed if a link; gone already is fine.
            let _ = std::fs::remove_file(previous);
        }
        previous_stream = stream;
        let code = run_served_job(&args, &mut input, request.input_len);
        let mut stdout = io::stdout().lock();
        let end = format!("\0autodriver-done {} {code}\n", request.nonce);
        if stdout
            .write_all(end.as_bytes())
            .and_then(|_| stdout.flush())
            .is_err()
        {
            return;
        }
    }
}

/// The `--stream` file a served job's arguments name.
fn stream_file_of(args: &[OsString]) -> Option<PathBuf> {
    match crate::cli::parse(args.iter().cloned()) {
        Ok(crate::cli::Command::Run(job)) => job.stream,
        _ => None,
    }
}

/// Runs `autodriver ARGS` with the next `input_len` bytes of `input` as its
/// stdin; its exit code (128+N after signal N, 3 when it cannot start).
fn run_served_job(args: &[OsString], input: &mut impl Read, input_len: u64) -> i32 {
    let mut command = Command::new("/proc/self/exe");
    command
        .args(args)
        .stdin(if input_len > 0 {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::inherit());
    // Its errors go to stdout too: one pipe keeps them before the end line
    // (Docker copies a container's stdout and stderr separately).
    if let Ok(stdout) = io::stdout().as_fd().try_clone_to_owned() {
        command.stderr(Stdio::from(stdout));
    }
    // The job's driver waits for SIGCHLD itself: it must not inherit this
    // process's blocked signals.
    unsafe {
        command.pre_exec(|| {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            crate::sys::check(libc::sigprocmask(
                libc::SIG_SETMASK,
                &empty,
                std::ptr::null_mut(),
            ))
            .map(|_| ())
        });
    }
    let mut input = input.take(input_len);
    // Held across the spawn: the reaper (which may reap the child before
    // spawn returns) then finds its pid.
    let mut job = SERVED_JOB.lock().unwrap_or_else(|e| e.into_inner());
    let child = command.spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            drop(job);
            eprintln!("autodriver: serve: cannot start the job: {e}");
            let _ = io::copy(&mut input, &mut io::sink());
            return crate::EXIT_OS_ERROR;
        }
    };
    *job = ServedJob {
        pid: child.id() as libc::pid_t,
        status: None,
    };
    drop(job);
    if let Some(mut stdin) = child.stdin.take() {
        // A job that stops reading (a bad archive) leaves the rest to be
        // skipped: the next request follows it.
        let _ = io::copy(&mut input, &mut stdin);
    }
    let _ = io::copy(&mut input, &mut io::sink());
    let mut job = SERVED_JOB.lock().unwrap_or_else(|e| e.into_inner());
    let status = loop {
        if let Some(status) = job.status {
            break status;
        }
        job = SERVED_JOB_ENDED
            .wait(job)
            .unwrap_or_else(|e| e.into_inner());
    };
    job.pid = 0;
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }
}

/// Lists the writable directories in a child at the lowest CPU priority, so
/// that a container made while jobs run takes no CPU from them (and one
/// removed before it ran, as without reuse, costs almost nothing). PID 1
/// reaps the child with the others. A job that finds no list makes it
/// itself.
fn scan_in_background(list: &Path) {
    match unsafe { libc::fork() } {
        0 => {
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
            let code = match crate::leftovers::make_list(list) {
                Ok(_) => 0,
                Err(e) => {
                    eprintln!("autodriver: idle: cannot list the writable directories: {e}");
                    1
                }
            };
            unsafe { libc::_exit(code) };
        }
        -1 => eprintln!(
            "autodriver: idle: cannot start listing the writable directories: {}",
            io::Error::last_os_error()
        ),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_empty_or_missing_hosts_file_is_filled() {
        let dir = std::env::temp_dir().join(format!("autodriver-hosts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing");
        write_loopback_hosts(&missing).unwrap();
        assert_eq!(std::fs::read_to_string(&missing).unwrap(), LOOPBACK_HOSTS);
        let empty = dir.join("empty");
        std::fs::write(&empty, "").unwrap();
        write_loopback_hosts(&empty).unwrap();
        assert!(std::fs::read_to_string(&empty)
            .unwrap()
            .starts_with("127.0.0.1\tlocalhost\n::1\t"));
        let kept = dir.join("kept");
        std::fs::write(&kept, "10.0.0.1 grader\n").unwrap();
        write_loopback_hosts(&kept).unwrap();
        assert_eq!(std::fs::read_to_string(&kept).unwrap(), "10.0.0.1 grader\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn requests_are_parsed_strictly() {
        let nonce = "0123456789abcdefABCDEF";
        assert_eq!(
            parse_request(format!("run {nonce} 12 345\n").as_bytes()),
            Some(Request {
                nonce: nonce.into(),
                args_len: 12,
                input_len: 345
            })
        );
        for bad in [
            format!("run {nonce} 12 345"),
            format!("run {nonce} 12 345 6\n"),
            format!("run {nonce} -1 345\n"),
            format!("run {nonce} 12 x\n"),
            format!("run {nonce} {} 0\n", MAX_ARGS_LEN + 1),
            "run short 1 1\n".to_string(),
            format!("run {nonce}/.. 1 1\n"),
            format!("exec {nonce} 1 1\n"),
        ] {
            assert_eq!(parse_request(bad.as_bytes()), None, "{bad:?}");
        }
    }
}
