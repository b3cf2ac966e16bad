//! `--idle`: a container's PID 1. Sleeps, reaps every child that exits
//! (orphans of `docker exec` sessions end up here), exits 0 on SIGTERM or
//! SIGINT. With `--purge-writable LIST` it first lists the root file
//! system's writable directories, so that no job waits for that scan.

use std::io;
use std::path::Path;

pub fn run(purge_writable: Option<&Path>) -> io::Result<()> {
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

fn reap_all() {
    loop {
        let mut status = 0;
        if unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } <= 0 {
            return;
        }
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
