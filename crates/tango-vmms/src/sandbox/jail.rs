//! Starting the autodriver inside fresh namespaces, chrooted (pivot_root)
//! into the VM's image.
//!
//! Process layout, all set up from `pre_exec` (i.e. between fork and exec of
//! the child std spawns, where only async-signal-safe calls are allowed:
//! every path and fd is prepared before the spawn, nothing allocates):
//!
//! - C1 (the child tokio waits for) joins the VM's cgroups, then closes
//!   every inherited fd but 0-2: tangod's listening socket and database
//!   among them, which a setup still running after tangod was killed would
//!   otherwise keep open (the restarted server could not bind), and std's
//!   internal CLOEXEC pipe, so `spawn` returns at once. From then on a
//!   failed step is reported in the output file and ends the child with
//!   [`SETUP_FAILED_EXIT`] (std could no longer report an error). C1 then
//!   unshares the mount, PID, IPC, UTS, cgroup and (usually) network
//!   namespaces, forks, waits for C2 and exits with C2's status (128+signal
//!   when killed).
//! - C2 is PID 1 of the new PID namespace: it asks for SIGKILL when C1 dies,
//!   builds the VM's file tree, pivots into it and returns, so std execs the
//!   autodriver in C2. When C2 exits the kernel kills everything else in its
//!   PID namespace, so a finished or killed job leaves no process behind.

use super::userns::{self, ChildSide};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tango_core::VmmsError;

/// Where things are inside the sandbox.
pub const AUTODRIVER_IN_VM: &str = "/run/tango/autodriver";
pub const CTL_IN_VM: &str = "/run/tango/ctl";

/// Everything needed to start one job.
pub struct JailSpec<'a> {
    /// Canonical host path of the image's root directory.
    pub image_root: &'a Path,
    pub vm_dir: &'a Path,
    pub autodriver: &'a Path,
    /// Host paths to hide under an empty read-only tmpfs when they lie inside
    /// the image (tangod's data directory when the image is the host's /).
    pub hidden: &'a [PathBuf],
    pub hostname: &'a str,
    pub new_net: bool,
    pub cgroup_procs: &'a [PathBuf],
    pub args: &'a [String],
    /// Receives the autodriver's stdout and stderr.
    pub output: File,
    /// The job's memory limit: sizes rootless mode's tmpfs mounts.
    pub memory_mb: u64,
    /// The grading user's home inside the VM.
    pub grader_home: &'a str,
    /// Rootless mode: the child creates a user namespace first and waits
    /// for tangod to map it (see [`super::userns`]).
    pub userns: Option<ChildSide>,
}

fn cstring(path: &Path) -> Result<CString, VmmsError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| VmmsError::Backend(format!("path {} contains NUL", path.display())))
}

fn cstr(s: &str) -> CString {
    // Only called with literals and validated names, which hold no NUL.
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

/// Rootless mode's tmpfs mounts (see [`mount_scratch`]).
struct Scratch {
    grader_home: CString,
    home_options: CString,
    tmp_options: CString,
}

/// A device node to create in the sandbox's /dev.
struct DevNode {
    path: CString,
    major: u32,
    minor: u32,
}

/// Paths and fds prepared in the parent for the child's setup.
struct Plan {
    cgroup_procs: Vec<OwnedFd>,
    userns: Option<ChildSide>,
    /// MS_BIND, plus MS_REC for the host's / in a user namespace: there the
    /// kernel refuses a non-recursive bind that would uncover what the
    /// host's mounts cover.
    image_bind_flags: libc::c_ulong,
    /// Flags a user namespace may not clear on a bind's remount (the
    /// source mount's read-only, nosuid, nodev, noexec), per bind source.
    image_locked: libc::c_ulong,
    home_locked: libc::c_ulong,
    autodriver_locked: libc::c_ulong,
    /// Rootless with the host's / (bound recursively): every mount below it,
    /// to be made read-only too, with its locked flags.
    submounts: Vec<(CString, libc::c_ulong)>,
    /// Rootless mode cannot mknod: device nodes are binds of the host's.
    dev_binds: Vec<(CString, CString)>,
    scratch: Option<Scratch>,
    unshare_flags: libc::c_int,
    new_net: bool,
    slash: CString,
    image_root: CString,
    root: CString,
    masks: Vec<CString>,
    home_src: CString,
    home_dst: CString,
    tmp_src: CString,
    tmp_dst: CString,
    var_tmp_src: CString,
    var_tmp_dst: CString,
    /// Files to hide: /dev/null is bound over them.
    file_masks: Vec<CString>,
    dev_null: CString,
    proc_dst: CString,
    proc_sys: CString,
    dev_dst: CString,
    dev_nodes: Vec<DevNode>,
    dev_shm: CString,
    dev_pts: CString,
    devpts: CString,
    pts_options: CString,
    dev_links: Vec<(CString, CString)>,
    run_dst: CString,
    run_tango: CString,
    autodriver_src: CString,
    autodriver_dst: CString,
    /// The autodriver's path once the VM's root is `/`.
    autodriver_in_vm: CString,
    ctl_src: CString,
    ctl_dst: CString,
    hostname: Vec<u8>,
    dot: CString,
    tmpfs: CString,
    proc_fs: CString,
    lo: [libc::c_char; libc::IFNAMSIZ],
    dev_options: CString,
    shm_options: CString,
    run_options: CString,
    mask_options: CString,
}

impl Plan {
    fn new(spec: &mut JailSpec<'_>) -> Result<Plan, VmmsError> {
        let root = spec.vm_dir.join("root");
        let inside = |p: &str| root.join(p.trim_start_matches('/'));
        let mut cgroup_procs = Vec::new();
        for path in spec.cgroup_procs {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| VmmsError::io(format!("opening {}", path.display()), e))?;
            cgroup_procs.push(OwnedFd::from(file));
        }
        let mut masks = Vec::new();
        let mut file_masks = Vec::new();
        for hidden in spec.hidden {
            if let Ok(relative) = hidden.strip_prefix(spec.image_root) {
                if !relative.as_os_str().is_empty() {
                    let target = cstring(&root.join(relative))?;
                    if hidden.is_dir() {
                        masks.push(target);
                    } else {
                        file_masks.push(target);
                    }
                }
            }
        }
        let mut unshare_flags = libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWCGROUP;
        if spec.new_net {
            unshare_flags |= libc::CLONE_NEWNET;
        }
        let mut lo = [0 as libc::c_char; libc::IFNAMSIZ];
        for (slot, byte) in lo.iter_mut().zip(b"lo") {
            *slot = *byte as libc::c_char;
        }
        let dev_nodes = [
            ("null", 1, 3),
            ("zero", 1, 5),
            ("full", 1, 7),
            ("random", 1, 8),
            ("urandom", 1, 9),
            ("tty", 5, 0),
        ]
        .iter()
        .map(|(name, major, minor)| {
            Ok(DevNode {
                path: cstring(&inside("dev").join(name))?,
                major: *major,
                minor: *minor,
            })
        })
        .collect::<Result<Vec<_>, VmmsError>>()?;
        let dev_links = [
            ("/proc/self/fd", "fd"),
            ("/proc/self/fd/0", "stdin"),
            ("/proc/self/fd/1", "stdout"),
            ("/proc/self/fd/2", "stderr"),
            ("pts/ptmx", "ptmx"),
        ]
        .iter()
        .map(|(target, name)| Ok((cstr(target), cstring(&inside("dev").join(name))?)))
        .collect::<Result<Vec<_>, VmmsError>>()?;
        let rootless = spec.userns.is_some();
        let locked = |path: &Path| if rootless { locked_flags(path) } else { Ok(0) };
        let image_locked = locked(spec.image_root)?;
        let home_locked = locked(spec.vm_dir)?;
        let autodriver_locked = locked(spec.autodriver)?;
        let mut image_bind_flags = libc::MS_BIND;
        if rootless && spec.image_root == Path::new("/") {
            image_bind_flags |= libc::MS_REC;
        }
        let mut submounts = Vec::new();
        if image_bind_flags & libc::MS_REC != 0 {
            for entry in super::mounts::read_mountinfo()? {
                if entry.mount_point == Path::new("/") {
                    continue;
                }
                let inside_root = root.join(
                    entry
                        .mount_point
                        .strip_prefix("/")
                        .unwrap_or(&entry.mount_point),
                );
                submounts.push((cstring(&inside_root)?, option_flags(&entry.mount_options)));
            }
        }
        let dev_binds = if rootless {
            dev_nodes
                .iter()
                .map(|node| {
                    let name = node.path.as_bytes().rsplit(|b| *b == b'/').next();
                    let host = format!("/dev/{}", String::from_utf8_lossy(name.unwrap_or(b"")));
                    (cstr(&host), node.path.clone())
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(Plan {
            cgroup_procs,
            userns: spec.userns.take(),
            image_bind_flags,
            image_locked,
            home_locked,
            autodriver_locked,
            dev_binds,
            submounts,
            scratch: match rootless {
                // As the Docker backend's: half the memory for the home, an
                // eighth for each temporary directory, so that a disk filler
                // meets ENOSPC before its memory cgroup thrashes over tmpfs
                // pages it cannot reclaim.
                true => Some(Scratch {
                    grader_home: cstring(&inside(spec.grader_home))?,
                    home_options: cstr(&format!("mode=755,size={}m", (spec.memory_mb / 2).max(1))),
                    tmp_options: cstr(&format!("mode=1777,size={}m", (spec.memory_mb / 8).max(1))),
                }),
                false => None,
            },
            unshare_flags,
            new_net: spec.new_net,
            slash: cstr("/"),
            image_root: cstring(spec.image_root)?,
            root: cstring(&root)?,
            masks,
            home_src: cstring(&spec.vm_dir.join("home"))?,
            home_dst: cstring(&inside("home"))?,
            tmp_src: cstring(&spec.vm_dir.join("tmp"))?,
            tmp_dst: cstring(&inside("tmp"))?,
            var_tmp_src: cstring(&spec.vm_dir.join("vartmp"))?,
            var_tmp_dst: cstring(&inside("var/tmp"))?,
            file_masks,
            dev_null: cstr("/dev/null"),
            proc_dst: cstring(&inside("proc"))?,
            proc_sys: cstring(&inside("proc/sys"))?,
            dev_dst: cstring(&inside("dev"))?,
            dev_nodes,
            dev_shm: cstring(&inside("dev/shm"))?,
            dev_pts: cstring(&inside("dev/pts"))?,
            devpts: cstr("devpts"),
            // A private instance: the job sees none of the host's terminals.
            pts_options: cstr("newinstance,ptmxmode=0666,mode=0620,gid=5"),
            dev_links,
            run_dst: cstring(&inside("run"))?,
            run_tango: cstring(&inside("run/tango"))?,
            autodriver_src: cstring(spec.autodriver)?,
            autodriver_dst: cstring(&inside(AUTODRIVER_IN_VM))?,
            autodriver_in_vm: cstr(AUTODRIVER_IN_VM),
            ctl_src: cstring(&spec.vm_dir.join("ctl"))?,
            ctl_dst: cstring(&inside(CTL_IN_VM))?,
            hostname: spec.hostname.as_bytes().iter().copied().take(64).collect(),
            dot: cstr("."),
            tmpfs: cstr("tmpfs"),
            proc_fs: cstr("proc"),
            lo,
            dev_options: cstr("mode=755,size=64k"),
            shm_options: cstr("mode=1777,size=64m"),
            run_options: cstr("mode=755,size=1m"),
            mask_options: cstr("mode=000,size=4k"),
        })
    }
}

/// Starts the autodriver in a new sandbox. The returned child is C1; killing
/// it kills the whole job (C2 has PR_SET_PDEATHSIG, and everything else is
/// in C2's PID namespace).
pub fn spawn(mut spec: JailSpec<'_>) -> Result<tokio::process::Child, VmmsError> {
    let plan = Plan::new(&mut spec)?;
    let stderr = spec
        .output
        .try_clone()
        .map_err(|e| VmmsError::io("duplicating the output file", e))?;
    let mut command = tokio::process::Command::new(AUTODRIVER_IN_VM);
    command
        .args(spec.args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::from(spec.output))
        .stderr(Stdio::from(stderr))
        .kill_on_drop(true);
    // SAFETY: the closure only makes async-signal-safe system calls on data
    // prepared above (no allocation, no locks); see `in_child`.
    unsafe {
        command.pre_exec(move || in_child(&plan));
    }
    command
        .spawn()
        .map_err(|e| VmmsError::io("starting the sandboxed autodriver", e))
}

/// Writes a static message to the child's stderr (the VM's output file) so
/// the parent can say which setup step failed.
fn report(step: &[u8]) {
    let prefix: &[u8] = b"tango sandbox: setup failed at: ";
    // SAFETY: write(2) on valid buffers.
    unsafe {
        libc::write(2, prefix.as_ptr().cast(), prefix.len());
        libc::write(2, step.as_ptr().cast(), step.len());
        libc::write(2, b"\n".as_ptr().cast(), 1);
    }
}

/// Turns a -1 return into an error naming the step.
fn check(rc: libc::c_long, step: &[u8]) -> io::Result<()> {
    if rc == -1 {
        let error = io::Error::last_os_error();
        report(step);
        Err(error)
    } else {
        Ok(())
    }
}

const NO_DATA: *const libc::c_void = std::ptr::null();

unsafe fn mount(
    source: *const libc::c_char,
    target: &CString,
    fs: *const libc::c_char,
    flags: libc::c_ulong,
    data: *const libc::c_void,
) -> libc::c_long {
    libc::mount(source, target.as_ptr(), fs, flags, data) as libc::c_long
}

/// Bind-mounts `source` on `target`, then remounts the bind with `flags`
/// (a bind mount ignores flags other than MS_REC on creation).
unsafe fn bind(
    source: &CString,
    target: &CString,
    flags: libc::c_ulong,
    step: &[u8],
) -> io::Result<()> {
    check(
        mount(
            source.as_ptr(),
            target,
            std::ptr::null(),
            libc::MS_BIND,
            NO_DATA,
        ),
        step,
    )?;
    check(
        mount(
            std::ptr::null(),
            target,
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_BIND | flags,
            NO_DATA,
        ),
        step,
    )
}

/// How C1 exits when a setup step failed after it closed std's error pipe
/// (the step is named in the output file; see [`setup_failure`]).
pub const SETUP_FAILED_EXIT: i32 = 125;

/// C1: runs in the child std forked; never returns on the C1 side, and in
/// C2 returns only when the VM is ready for the exec.
fn in_child(plan: &Plan) -> io::Result<()> {
    // SAFETY: async-signal-safe system calls on prepared data.
    unsafe {
        for fd in &plan.cgroup_procs {
            // "0" is the writing process.
            check(
                libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) as libc::c_long,
                b"joining the VM's cgroup",
            )?;
        }
        match &plan.userns {
            Some(side) => {
                close_inherited_fds_except(&[side.ready.as_raw_fd(), side.go.as_raw_fd()]);
                if let Err(step) = userns::enter_in_child(side) {
                    report(step);
                    libc::_exit(SETUP_FAILED_EXIT);
                }
            }
            None => close_inherited_fds_except(&[]),
        }
        if check(
            libc::unshare(plan.unshare_flags) as libc::c_long,
            b"unshare (creating namespaces)",
        )
        .is_err()
        {
            libc::_exit(SETUP_FAILED_EXIT);
        }
        let pid = libc::fork();
        if pid == -1 {
            report(b"fork");
            libc::_exit(SETUP_FAILED_EXIT);
        }
        if pid > 0 {
            supervise(pid);
        }
        if set_up_c2(plan).is_err() {
            libc::_exit(SETUP_FAILED_EXIT);
        }
        Ok(())
    }
}

/// Closes every fd but stdin, stdout, stderr and `keep` (at most a few).
/// Async-signal-safe.
pub(super) unsafe fn close_inherited_fds_except(keep: &[RawFd]) {
    let mut sorted = [RawFd::MAX; 4];
    for (slot, fd) in sorted.iter_mut().zip(keep) {
        *slot = *fd;
    }
    sorted.sort_unstable();
    let mut first: RawFd = 3;
    for fd in sorted {
        let last = if fd == RawFd::MAX { RawFd::MAX } else { fd - 1 };
        if last >= first {
            close_range(first, last);
        }
        if fd == RawFd::MAX {
            break;
        }
        first = first.max(fd + 1);
    }
}

unsafe fn close_range(first: RawFd, last: RawFd) {
    if libc::syscall(libc::SYS_close_range, first as u32, last as u32, 0u32) != 0 {
        // Kernels before 5.9.
        let max = libc::sysconf(libc::_SC_OPEN_MAX).clamp(256, 65536) as RawFd;
        for fd in first..=last.min(max) {
            libc::close(fd);
        }
    }
}

/// The flags in a mountinfo options field that a user namespace cannot
/// clear on a remount.
fn option_flags(options: &str) -> libc::c_ulong {
    options
        .split(',')
        .map(|o| match o {
            "ro" => libc::MS_RDONLY,
            "nosuid" => libc::MS_NOSUID,
            "nodev" => libc::MS_NODEV,
            "noexec" => libc::MS_NOEXEC,
            _ => 0,
        })
        .fold(0, |all, flag| all | flag)
}

/// The flags of the mount holding `path` that a user namespace cannot clear
/// on a remount (MS_* and ST_* share these values).
fn locked_flags(path: &Path) -> Result<libc::c_ulong, VmmsError> {
    let c = cstring(path)?;
    // SAFETY: statvfs fills the zeroed struct from a valid path.
    let flags = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return Err(VmmsError::io(
                format!("statvfs {}", path.display()),
                io::Error::last_os_error(),
            ));
        }
        st.f_flag
    };
    Ok(flags & (libc::ST_RDONLY | libc::ST_NOSUID | libc::ST_NODEV | libc::ST_NOEXEC))
}

/// C1 after the fork: wait for C2, exit with its status.
unsafe fn supervise(pid: libc::pid_t) -> ! {
    let mut status = 0;
    loop {
        let rc = libc::waitpid(pid, &mut status, 0);
        if rc == pid {
            break;
        }
        if rc == -1 && *libc::__errno_location() != libc::EINTR {
            libc::_exit(3);
        }
    }
    if libc::WIFEXITED(status) {
        libc::_exit(libc::WEXITSTATUS(status));
    }
    if libc::WIFSIGNALED(status) {
        libc::_exit(128 + libc::WTERMSIG(status));
    }
    libc::_exit(3)
}

/// C2 (PID 1 of the new namespace): builds the file tree and pivots into it.
unsafe fn set_up_c2(p: &Plan) -> io::Result<()> {
    let null = std::ptr::null::<libc::c_char>();
    check(
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) as libc::c_long,
        b"prctl(PR_SET_PDEATHSIG)",
    )?;
    // Nothing done below may propagate back to the host's mount namespace.
    check(
        mount(
            null,
            &p.slash,
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            NO_DATA,
        ),
        b"making / private",
    )?;

    // The image, read-only. Not recursive: for the host's / this leaves out
    // /proc, /sys, /dev and every other mount, including any holding
    // tangod's data.
    check(
        mount(
            p.image_root.as_ptr(),
            &p.root,
            null,
            p.image_bind_flags,
            NO_DATA,
        ),
        b"binding the image",
    )?;
    let mask_flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for mask in &p.masks {
        let rc = mount(
            p.tmpfs.as_ptr(),
            mask,
            p.tmpfs.as_ptr(),
            mask_flags,
            p.mask_options.as_ptr().cast(),
        );
        if rc == -1 {
            let errno = *libc::__errno_location();
            // Not visible in the image anyway.
            if errno != libc::ENOENT && errno != libc::ENOTDIR {
                check(rc, b"hiding tangod's data directory")?;
            }
        }
    }
    for mask in &p.file_masks {
        let rc = mount(p.dev_null.as_ptr(), mask, null, libc::MS_BIND, NO_DATA);
        if rc == -1 {
            let errno = *libc::__errno_location();
            if errno != libc::ENOENT && errno != libc::ENOTDIR {
                check(rc, b"hiding a file")?;
            }
        }
    }
    let read_only = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    check(
        mount(
            null,
            &p.root,
            null,
            libc::MS_REMOUNT | libc::MS_BIND | read_only | p.image_locked,
            NO_DATA,
        ),
        b"making the image read-only",
    )?;
    let tree_read_only = !p.submounts.is_empty() && make_tree_read_only(&p.root);
    for (mount_point, locked) in p.submounts.iter().filter(|_| !tree_read_only) {
        let rc = mount(
            null,
            mount_point,
            null,
            libc::MS_REMOUNT | libc::MS_BIND | read_only | locked,
            NO_DATA,
        );
        // ENOENT, EINVAL: under a mask, or not there any more. EACCES: below
        // a directory the namespace's root may not enter, nor may the job.
        if rc == -1 {
            let errno = *libc::__errno_location();
            if ![libc::ENOENT, libc::EINVAL, libc::EACCES].contains(&errno) {
                check(rc, b"making a mount of the host read-only")?;
            }
        }
    }

    let writable = libc::MS_NOSUID | libc::MS_NODEV | p.home_locked;
    bind(
        &p.home_src,
        &p.home_dst,
        writable,
        b"mounting /home (does the image have /home?)",
    )?;
    bind(
        &p.tmp_src,
        &p.tmp_dst,
        writable,
        b"mounting /tmp (does the image have /tmp?)",
    )?;
    // /var/tmp is optional in an image, but programs (and the autodriver's
    // cleanup) expect it writable when it is there.
    let has_var_tmp = mount(
        p.var_tmp_src.as_ptr(),
        &p.var_tmp_dst,
        null,
        libc::MS_BIND,
        NO_DATA,
    ) == 0;
    if has_var_tmp {
        check(
            mount(
                null,
                &p.var_tmp_dst,
                null,
                libc::MS_REMOUNT | libc::MS_BIND | writable,
                NO_DATA,
            ),
            b"mounting /var/tmp",
        )?;
    } else if *libc::__errno_location() != libc::ENOENT {
        check(-1, b"mounting /var/tmp")?;
    }
    if let Some(scratch) = &p.scratch {
        mount_scratch(p, scratch, has_var_tmp)?;
    }

    check(
        mount(
            p.proc_fs.as_ptr(),
            &p.proc_dst,
            p.proc_fs.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            NO_DATA,
        ),
        b"mounting /proc (does the image have /proc?)",
    )?;
    bind(
        &p.proc_sys,
        &p.proc_sys,
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        b"making /proc/sys read-only",
    )?;

    check(
        mount(
            p.tmpfs.as_ptr(),
            &p.dev_dst,
            p.tmpfs.as_ptr(),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            p.dev_options.as_ptr().cast(),
        ),
        b"mounting /dev (does the image have /dev?)",
    )?;
    let old_umask = libc::umask(0);
    if p.dev_binds.is_empty() {
        for node in &p.dev_nodes {
            let dev = libc::makedev(node.major, node.minor);
            check(
                libc::mknod(node.path.as_ptr(), libc::S_IFCHR | 0o666, dev) as libc::c_long,
                b"creating a device node",
            )?;
        }
    }
    for (host, node) in &p.dev_binds {
        let fd = libc::open(
            node.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
            0o666,
        );
        check(fd as libc::c_long, b"creating a device mount point")?;
        libc::close(fd);
        check(
            mount(host.as_ptr(), node, null, libc::MS_BIND, NO_DATA),
            b"binding a host device node",
        )?;
    }
    check(
        libc::mkdir(p.dev_shm.as_ptr(), 0o1777) as libc::c_long,
        b"creating /dev/shm",
    )?;
    check(
        libc::mkdir(p.dev_pts.as_ptr(), 0o755) as libc::c_long,
        b"creating /dev/pts",
    )?;
    libc::umask(old_umask);
    check(
        mount(
            p.devpts.as_ptr(),
            &p.dev_pts,
            p.devpts.as_ptr(),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            p.pts_options.as_ptr().cast(),
        ),
        b"mounting /dev/pts",
    )?;
    check(
        mount(
            p.tmpfs.as_ptr(),
            &p.dev_shm,
            p.tmpfs.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            p.shm_options.as_ptr().cast(),
        ),
        b"mounting /dev/shm",
    )?;
    for (target, link) in &p.dev_links {
        check(
            libc::symlink(target.as_ptr(), link.as_ptr()) as libc::c_long,
            b"creating a /dev symlink",
        )?;
    }

    check(
        mount(
            p.tmpfs.as_ptr(),
            &p.run_dst,
            p.tmpfs.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            p.run_options.as_ptr().cast(),
        ),
        b"mounting /run (does the image have /run?)",
    )?;
    check(
        libc::mkdir(p.run_tango.as_ptr(), 0o755) as libc::c_long,
        b"creating /run/tango",
    )?;
    let fd = libc::open(
        p.autodriver_dst.as_ptr(),
        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
        0o755,
    );
    check(fd as libc::c_long, b"creating the autodriver mount point")?;
    libc::close(fd);
    bind(
        &p.autodriver_src,
        &p.autodriver_dst,
        read_only | p.autodriver_locked,
        b"mounting the autodriver",
    )?;
    check(
        libc::mkdir(p.ctl_dst.as_ptr(), 0o700) as libc::c_long,
        b"creating /run/tango/ctl",
    )?;
    bind(
        &p.ctl_src,
        &p.ctl_dst,
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | p.home_locked,
        b"mounting /run/tango/ctl",
    )?;

    // pivot_root(".", ".") stacks the old root on top of the new one; the
    // lazy unmount then drops it, and with it every host path.
    check(
        libc::chdir(p.root.as_ptr()) as libc::c_long,
        b"entering the new root",
    )?;
    check(
        libc::syscall(libc::SYS_pivot_root, p.dot.as_ptr(), p.dot.as_ptr()),
        b"pivot_root",
    )?;
    check(
        libc::umount2(p.dot.as_ptr(), libc::MNT_DETACH) as libc::c_long,
        b"detaching the host's root",
    )?;
    check(libc::chdir(p.slash.as_ptr()) as libc::c_long, b"chdir /")?;

    check(
        libc::sethostname(p.hostname.as_ptr().cast(), p.hostname.len()) as libc::c_long,
        b"sethostname",
    )?;
    if p.new_net {
        bring_loopback_up(&p.lo)?;
    }
    // std can no longer report a failed exec (its pipe is closed); the
    // likely cause is caught here, where it can be named.
    check(
        libc::access(p.autodriver_in_vm.as_ptr(), libc::X_OK) as libc::c_long,
        b"finding the autodriver in the VM",
    )?;
    Ok(())
}

/// Rootless: the places the grading user can write become tmpfs mounts of
/// the job's own mount namespace, so its files are charged to its memory
/// cgroup and bounded in size (tangod cannot mount a tmpfs for the whole VM
/// on the host), and vanish with the job.
unsafe fn mount_scratch(p: &Plan, s: &Scratch, has_var_tmp: bool) -> io::Result<()> {
    if libc::mkdir(s.grader_home.as_ptr(), 0o755) == -1 && *libc::__errno_location() != libc::EEXIST
    {
        check(-1, b"creating the grading user's home")?;
    }
    let flags = libc::MS_NOSUID | libc::MS_NODEV;
    check(
        mount(
            p.tmpfs.as_ptr(),
            &s.grader_home,
            p.tmpfs.as_ptr(),
            flags,
            s.home_options.as_ptr().cast(),
        ),
        b"mounting a tmpfs on the grading user's home",
    )?;
    let tmp_dirs = [Some(&p.tmp_dst), has_var_tmp.then_some(&p.var_tmp_dst)];
    for dir in tmp_dirs.into_iter().flatten() {
        check(
            mount(
                p.tmpfs.as_ptr(),
                dir,
                p.tmpfs.as_ptr(),
                flags,
                s.tmp_options.as_ptr().cast(),
            ),
            b"mounting a tmpfs on /tmp or /var/tmp",
        )?;
    }
    Ok(())
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Makes every mount at and below `root` read-only, nosuid and nodev in
/// one call (Linux 5.12 and later): also a host mount made after the plan
/// listed them, which the remount loop would miss. False when the kernel
/// refuses; the caller then remounts the listed mounts one by one.
unsafe fn make_tree_read_only(root: &CString) -> bool {
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOSUID: u64 = 0x2;
    const MOUNT_ATTR_NODEV: u64 = 0x4;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    libc::syscall(
        libc::SYS_mount_setattr,
        libc::AT_FDCWD,
        root.as_ptr(),
        libc::AT_RECURSIVE as libc::c_uint,
        &attr as *const MountAttr,
        std::mem::size_of::<MountAttr>(),
    ) == 0
}

/// `struct ifreq` with the flags member of its union.
#[repr(C)]
struct IfreqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}

/// A new network namespace has `lo`, but down.
unsafe fn bring_loopback_up(lo: &[libc::c_char; libc::IFNAMSIZ]) -> io::Result<()> {
    let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
    check(sock as libc::c_long, b"socket for configuring lo")?;
    let mut req = IfreqFlags {
        name: *lo,
        flags: 0,
        _rest: [0; 22],
    };
    // The request's type is the libc's (glibc: unsigned long, musl: int).
    let result = check(
        libc::ioctl(sock, libc::SIOCGIFFLAGS as libc::Ioctl, &mut req) as libc::c_long,
        b"reading lo's flags",
    )
    .and_then(|()| {
        req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        check(
            libc::ioctl(sock, libc::SIOCSIFFLAGS as libc::Ioctl, &req) as libc::c_long,
            b"bringing lo up",
        )
    });
    libc::close(sock);
    result
}

/// The failure message a child wrote into the output file, if any.
pub fn setup_failure(output: &Path) -> Option<String> {
    let text = std::fs::read_to_string(output).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("tango sandbox: setup failed at: "))
        .map(str::to_string)
}
