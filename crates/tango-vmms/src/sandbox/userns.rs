//! Rootless mode: when tangod is not root, every job (and every clean-up of
//! a VM's files) runs in a new user namespace whose uid 0 is tangod's own
//! uid and whose uids 1.. are the user's subordinate range from
//! `/etc/subuid` (gids likewise). Only the setuid helpers `newuidmap` and
//! `newgidmap` (Debian package `uidmap`) may write such a map, so the child
//! stops after creating the namespace and the parent writes the map for it;
//! see [`Handshake`].
//!
//! The grading user is one of the subordinate uids: never tangod's own uid,
//! so a job cannot touch tangod's files, signal tangod or read the VM's
//! control directory.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tango_core::VmmsError;
use tokio::io::AsyncReadExt;

/// The fewest subordinate ids a job's namespace works with: gids up to 5.
const MIN_SUBORDINATE_IDS: u64 = 6;

/// How long newuidmap/newgidmap may take.
const MAP_TIMEOUT: Duration = Duration::from_secs(10);

/// A range of subordinate ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubRange {
    pub start: u64,
    pub count: u64,
}

/// The id maps of rootless jobs.
#[derive(Debug, Clone)]
pub struct IdMap {
    host_uid: u32,
    host_gid: u32,
    subuid: SubRange,
    subgid: SubRange,
    newuidmap: PathBuf,
    newgidmap: PathBuf,
}

/// The first range `/etc/subuid`-style `text` gives the user, named or by
/// number.
pub fn parse_subid(text: &str, user: &str, id: u32) -> Option<SubRange> {
    let id = id.to_string();
    text.lines().find_map(|line| {
        let mut fields = line.trim().split(':');
        let owner = fields.next()?;
        let start = fields.next()?.parse().ok()?;
        let count = fields.next()?.parse().ok()?;
        (!owner.is_empty() && (owner == user || owner == id) && count > 0)
            .then_some(SubRange { start, count })
    })
}

fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: getpwuid_r writes into `pwd` and `buf`, both valid for the
    // sizes given; `result` is checked before `pwd` is read.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(pwd.pw_name)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// Every process of every job counts against tangod's own uid's
/// RLIMIT_NPROC too (the kernel charges a user namespace's processes to its
/// creator in the parent namespace; the pids cgroups bound each VM): give
/// the jobs all of it that tangod may take.
fn raise_nproc_limit() {
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NPROC, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NPROC, &limit);
        }
        if limit.rlim_max != libc::RLIM_INFINITY {
            tracing::info!(
                "rootless sandbox: all jobs together may run at most {} processes \
                 (tangod's RLIMIT_NPROC; raise LimitNPROC= or ulimit -u for more)",
                limit.rlim_max
            );
        }
    }
}

fn find_helper(name: &str) -> Option<PathBuf> {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

impl IdMap {
    /// The maps for the user tangod runs as; says what to install or
    /// configure when something is missing.
    pub fn for_current_user() -> Result<IdMap, VmmsError> {
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let name = user_name(uid).ok_or_else(|| {
            VmmsError::Backend(format!(
                "rootless sandbox: uid {uid} has no user name (no passwd entry); newuidmap \
                 needs one. Run tangod as a named user, or as root"
            ))
        })?;
        let missing_helper = || {
            VmmsError::Backend(
                "rootless sandbox: newuidmap/newgidmap not found. Install them (Debian, Ubuntu: \
                 apt-get install uidmap; Fedora: shadow-utils), or run tangod as root"
                    .into(),
            )
        };
        let newuidmap = find_helper("newuidmap").ok_or_else(missing_helper)?;
        let newgidmap = find_helper("newgidmap").ok_or_else(missing_helper)?;
        let range = |file: &str, id: u32| -> Result<SubRange, VmmsError> {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            let range = parse_subid(&text, &name, id).ok_or_else(|| {
                VmmsError::Backend(format!(
                    "rootless sandbox: {file} gives user {name} no subordinate ids; the job's \
                     grading user is one of them. Add a range as root, e.g. \
                     `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {name}`"
                ))
            })?;
            // The job's /dev/pts is mounted with gid 5 (tty), which must be
            // mapped.
            if range.count < MIN_SUBORDINATE_IDS {
                return Err(VmmsError::Backend(format!(
                    "rootless sandbox: {file} gives user {name} only {} ids; give at least \
                     {MIN_SUBORDINATE_IDS} (65536 is usual)",
                    range.count
                )));
            }
            Ok(range)
        };
        raise_nproc_limit();
        Ok(IdMap {
            host_uid: uid,
            host_gid: gid,
            subuid: range("/etc/subuid", uid)?,
            subgid: range("/etc/subgid", gid)?,
            newuidmap,
            newgidmap,
        })
    }

    /// The grading uid and gid inside VM `vm_id`'s namespace: distinct per VM
    /// (within the range), never 0.
    pub fn grading_id(&self, vm_id: u64) -> u64 {
        // Ids above 65535 would not fit a gid like `nogroup`'s; a range that
        // large is not needed.
        let span = self.subuid.count.min(self.subgid.count).min(65_536);
        1 + vm_id % (span - 1).max(1)
    }

    /// Writes the maps of the user namespace that process `pid` created.
    async fn apply(&self, pid: u32) -> Result<(), VmmsError> {
        let uid_map = map_args(self.host_uid, self.subuid);
        let gid_map = map_args(self.host_gid, self.subgid);
        for (helper, map) in [(&self.newuidmap, uid_map), (&self.newgidmap, gid_map)] {
            let run = tokio::process::Command::new(helper)
                .arg(pid.to_string())
                .args(&map)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output();
            let output = tokio::time::timeout(MAP_TIMEOUT, run)
                .await
                .map_err(|_| {
                    VmmsError::Backend(format!(
                        "{} did not finish in {MAP_TIMEOUT:?}",
                        helper.display()
                    ))
                })?
                .map_err(|e| VmmsError::io(format!("running {}", helper.display()), e))?;
            if !output.status.success() {
                return Err(VmmsError::Backend(format!(
                    "{} {pid} {} failed ({}): {}; check /etc/subuid and /etc/subgid",
                    helper.display(),
                    map.join(" "),
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                )));
            }
        }
        Ok(())
    }
}

/// `0 HOST 1 1 START COUNT`: root of the namespace is tangod's own id.
fn map_args(host: u32, sub: SubRange) -> Vec<String> {
    [0, u64::from(host), 1, 1, sub.start, sub.count]
        .iter()
        .map(u64::to_string)
        .collect()
}

/// The child's side of the handshake: it writes a byte to `ready` once it
/// has created its user namespace, then waits on `go` for the parent to
/// have written the maps (end of file: the parent gave up).
pub struct ChildSide {
    pub ready: OwnedFd,
    pub go: OwnedFd,
}

/// The parent's side.
pub struct Handshake {
    ready: tokio::net::unix::pipe::Receiver,
    go: OwnedFd,
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds on success, which are then owned here.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
    }
}

/// Two pipes for one child's handshake.
pub fn handshake_pipes() -> Result<(ChildSide, Handshake), VmmsError> {
    let err = |e| VmmsError::io("creating the user-namespace handshake pipes", e);
    let (ready_r, ready_w) = pipe().map_err(err)?;
    let (go_r, go_w) = pipe().map_err(err)?;
    let ready = tokio::net::unix::pipe::Receiver::from_owned_fd(ready_r).map_err(err)?;
    Ok((
        ChildSide {
            ready: ready_w,
            go: go_r,
        },
        Handshake { ready, go: go_w },
    ))
}

impl Handshake {
    /// Waits for child `pid` to create its namespace, maps it and lets it go
    /// on. The caller has dropped its copy of the [`ChildSide`] (so a child
    /// that dies early is an end of file, not a hang).
    pub async fn complete(mut self, pid: u32, map: &IdMap) -> Result<(), VmmsError> {
        let mut byte = [0u8; 1];
        let read = self
            .ready
            .read(&mut byte)
            .await
            .map_err(|e| VmmsError::io("waiting for the job's user namespace", e))?;
        if read == 0 {
            return Err(VmmsError::Backend(
                "the job's process ended before creating its user namespace".into(),
            ));
        }
        map.apply(pid).await?;
        // SAFETY: write(2) of one byte from a valid buffer to an owned fd.
        let rc = unsafe { libc::write(self.go.as_raw_fd(), b"g".as_ptr().cast(), 1) };
        if rc != 1 {
            return Err(VmmsError::io(
                "letting the job go on",
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

/// In the child (after fork, before exec: async-signal-safe calls only):
/// creates the user namespace and waits until the parent has mapped it.
/// Returns the failed step's name.
///
/// # Safety
/// Call only in a single-threaded child between fork and exec.
pub unsafe fn enter_in_child(side: &ChildSide) -> Result<(), &'static [u8]> {
    if libc::unshare(libc::CLONE_NEWUSER) != 0 {
        return Err(b"unshare(CLONE_NEWUSER) (are unprivileged user namespaces enabled?)");
    }
    if libc::write(side.ready.as_raw_fd(), b"u".as_ptr().cast(), 1) != 1 {
        return Err(b"telling tangod the user namespace is there");
    }
    let mut byte = 0u8;
    loop {
        let rc = libc::read(side.go.as_raw_fd(), (&mut byte as *mut u8).cast(), 1);
        if rc == 1 {
            break;
        }
        if rc == -1 && *libc::__errno_location() == libc::EINTR {
            continue;
        }
        return Err(b"waiting for tangod to map the user namespace (newuidmap failed?)");
    }
    libc::close(side.ready.as_raw_fd());
    libc::close(side.go.as_raw_fd());
    Ok(())
}

/// Deletes `paths` (recursively) from inside a user namespace mapped as the
/// jobs' are, where tangod's uid is root and may delete what the jobs'
/// grading users left; tangod itself may not.
pub async fn remove_as_mapped_root(map: &IdMap, paths: &[PathBuf]) -> Result<(), VmmsError> {
    let existing: Vec<&PathBuf> = paths.iter().filter(|p| p.exists()).collect();
    if existing.is_empty() {
        return Ok(());
    }
    let rm =
        find_helper("rm").ok_or_else(|| VmmsError::Backend("no rm found on the host".into()))?;
    let (child_side, handshake) = handshake_pipes()?;
    let keep = [child_side.ready.as_raw_fd(), child_side.go.as_raw_fd()];
    let mut command = tokio::process::Command::new(rm);
    command
        .args(["-rf", "--one-file-system", "--"])
        .args(&existing)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: the closure makes only async-signal-safe calls on fds owned
    // by `child_side`, which outlives the spawn.
    unsafe {
        command.pre_exec(move || {
            // std's error pipe goes too, so that `spawn` returns before
            // the handshake instead of waiting for the exec.
            super::jail::close_inherited_fds_except(&keep);
            if enter_in_child(&child_side).is_err() {
                libc::_exit(super::jail::SETUP_FAILED_EXIT);
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(|e| VmmsError::io("starting rm in a user namespace", e))?;
    drop(command);
    let pid = child.id().unwrap_or(0);
    handshake.complete(pid, map).await?;
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .map_err(|_| VmmsError::Backend("removing a VM's files took over 60 s".into()))?
        .map_err(|e| VmmsError::io("waiting for rm", e))?;
    if !output.status.success() {
        return Err(VmmsError::Backend(format!(
            "removing {} failed: {}",
            existing
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_users_range_by_name_or_uid() {
        let text = "alice:100000:65536\n1001:200000:1000\nbad line\nbob:x:1\n";
        assert_eq!(
            parse_subid(text, "alice", 1000),
            Some(SubRange {
                start: 100000,
                count: 65536
            })
        );
        assert_eq!(
            parse_subid(text, "carol", 1001),
            Some(SubRange {
                start: 200000,
                count: 1000
            })
        );
        assert_eq!(parse_subid(text, "bob", 7), None);
        assert_eq!(parse_subid("", "alice", 1000), None);
    }

    #[test]
    fn grading_ids_are_never_root_and_stay_in_range() {
        let map = IdMap {
            host_uid: 1000,
            host_gid: 1000,
            subuid: SubRange {
                start: 100000,
                count: 10,
            },
            subgid: SubRange {
                start: 100000,
                count: 65536,
            },
            newuidmap: PathBuf::new(),
            newgidmap: PathBuf::new(),
        };
        for id in 0..100 {
            let g = map.grading_id(id);
            assert!((1..10).contains(&g), "{g}");
        }
        assert_ne!(map.grading_id(1), map.grading_id(2));
        assert_eq!(
            map_args(1000, map.subuid),
            ["0", "1000", "1", "1", "100000", "10"]
        );
    }
}
