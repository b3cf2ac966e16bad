//! What a job can leave for the next job on a reused machine besides its
//! home and the scratch directories: files in other directories anyone may
//! write to (`/run/lock` and whatever the image adds), and System V IPC
//! objects.
//!
//! The writable directories of the root file system are found by one walk
//! of it, done once per machine and kept in a list file: by `--idle` when the
//! container starts (off any job's path), else by the first job that needs
//! it. The walk happens before any job has run or as root over directories
//! a job cannot create outside those already listed, so the list only names
//! directories of the image.

use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::fsops::{self, Visit};
use crate::sys;

/// Directories of the root file system (not crossing into other mounts)
/// that a user other than root may write to: world-writable, owned by a
/// non-root user, or group-writable by a non-root group. Their subtrees are
/// not listed again.
pub fn scan_writable_dirs(root: &Path) -> io::Result<Vec<PathBuf>> {
    let fd = sys::open_dir(root)?;
    let device = sys::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd))?.st_dev;
    let mut found = Vec::new();
    fsops::walk(
        fd,
        root.to_path_buf(),
        &mut |_, parent: &PathBuf, name, st| {
            if !sys::is_dir(st) || st.st_dev != device {
                return Ok(Visit::Skip);
            }
            let path = parent.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
            let others_write = st.st_mode & 0o002 != 0;
            let user_owned = st.st_uid != 0;
            let group_write = st.st_mode & 0o020 != 0 && st.st_gid != 0;
            if others_write || user_owned || group_write {
                found.push(path);
                return Ok(Visit::Skip);
            }
            Ok(Visit::Descend(path))
        },
        &mut |_, _, _, _, _| Ok(()),
    )?;
    Ok(found)
}

/// The list kept in `list_file`, scanning `/` and writing it first when it
/// does not exist yet.
pub fn writable_dirs(list_file: &Path) -> io::Result<Vec<PathBuf>> {
    match std::fs::read(list_file) {
        Ok(bytes) => Ok(bytes
            .split(|&b| b == b'\n')
            .filter(|line| line.starts_with(b"/"))
            .map(|line| PathBuf::from(std::ffi::OsStr::from_bytes(line)))
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => make_list(list_file),
        Err(e) => Err(e),
    }
}

/// Scans `/` for the writable directories and keeps them in `list_file`.
pub fn make_list(list_file: &Path) -> io::Result<Vec<PathBuf>> {
    let dirs = scan_writable_dirs(Path::new("/"))?;
    write_list(list_file, &dirs)?;
    Ok(dirs)
}

/// Writes the list atomically (a temporary file renamed into place), so a
/// job never reads half of it.
pub fn write_list(list_file: &Path, dirs: &[PathBuf]) -> io::Result<()> {
    let mut text = Vec::new();
    for dir in dirs {
        let bytes = dir.as_os_str().as_bytes();
        // A name with a newline cannot be listed; such a directory is not
        // cleaned (an image would have to ship it).
        if !bytes.contains(&b'\n') {
            text.extend_from_slice(bytes);
            text.push(b'\n');
        }
    }
    let mut temporary = list_file.as_os_str().to_owned();
    temporary.push(format!(".{}", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(&text)?;
    file.sync_all()?;
    std::fs::rename(&temporary, list_file)
}

/// Removes the System V shared memory segments, semaphore sets and message
/// queues that `uid` created or owns in this IPC namespace. Removal is done
/// as `uid` (an owner may remove its objects), since a container's root
/// lacks CAP_IPC_OWNER.
pub fn remove_ipc_objects(uid: u32) -> io::Result<()> {
    let switched = unsafe { libc::geteuid() } == 0 && unsafe { libc::seteuid(uid) } == 0;
    let removed = remove_ipc_objects_as_is(uid);
    if switched && unsafe { libc::seteuid(0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    removed
}

fn remove_ipc_objects_as_is(uid: u32) -> io::Result<()> {
    for (table, remove) in [
        ("shm", remove_shm as fn(libc::c_int) -> libc::c_int),
        ("sem", remove_sem),
        ("msg", remove_msg),
    ] {
        let text = match std::fs::read_to_string(format!("/proc/sysvipc/{table}")) {
            Ok(text) => text,
            // No /proc or no System V IPC in this kernel: nothing to remove.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for id in owned_ids(&text, uid) {
            if remove(id) != 0 {
                let error = io::Error::last_os_error();
                // Gone meanwhile.
                if !matches!(sys::errno_of(&error), libc::EINVAL | libc::EIDRM) {
                    return Err(error);
                }
            }
        }
    }
    Ok(())
}

fn remove_shm(id: libc::c_int) -> libc::c_int {
    unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) }
}

fn remove_sem(id: libc::c_int) -> libc::c_int {
    unsafe { libc::semctl(id, 0, libc::IPC_RMID) }
}

fn remove_msg(id: libc::c_int) -> libc::c_int {
    unsafe { libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()) }
}

/// The ids in a /proc/sysvipc table whose owner or creator is `uid`. The
/// header names the columns; their order differs between tables.
fn owned_ids(table: &str, uid: u32) -> Vec<libc::c_int> {
    let mut lines = table.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let columns: Vec<&str> = header.split_whitespace().collect();
    let column = |name: &str| columns.iter().position(|c| *c == name);
    let id_at = ["shmid", "semid", "msqid"].into_iter().find_map(column);
    let (Some(id_at), Some(uid_at), Some(cuid_at)) = (id_at, column("uid"), column("cuid")) else {
        return Vec::new();
    };
    lines
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let owner: u32 = fields.get(uid_at)?.parse().ok()?;
            let creator: u32 = fields.get(cuid_at)?.parse().ok()?;
            (owner == uid || creator == uid)
                .then(|| fields.get(id_at)?.parse().ok())
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_from_the_named_columns() {
        let shm = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap\n\
                   0  32768   600                  1024   100   100      0  1000  1000  1000  1000          0          0 1700000000                     0                     0\n\
                   0  32769   600                  1024   100   100      0     0     0     0     0          0          0 1700000000                     0                     0\n";
        assert_eq!(owned_ids(shm, 1000), vec![32768]);
        let msg = "       key      msqid perms      cbytes       qnum lspid lrpid   uid   gid  cuid  cgid      stime      rtime      ctime\n\
                   0      5   600           0          0     0     0     0     0  1000  1000          0          0 1700000000\n";
        assert_eq!(owned_ids(msg, 1000), vec![5]);
        let sem = "       key      semid perms      nsems   uid   gid  cuid  cgid      otime      ctime\n\
                   0      7   600          1  1000  1000  1000  1000          0 1700000000\n";
        assert_eq!(owned_ids(sem, 1000), vec![7]);
        assert!(owned_ids("", 1000).is_empty());
        assert!(owned_ids("garbage\n1 2 3\n", 1000).is_empty());
    }

    #[test]
    fn the_scan_lists_writable_dirs_once_and_not_their_subtrees() {
        let base = std::env::temp_dir().join(format!("autodriver-scan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let set_mode = |p: &Path, mode: u32| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        std::fs::create_dir_all(base.join("closed/lock/inner")).unwrap();
        std::fs::create_dir_all(base.join("open/inner")).unwrap();
        set_mode(&base, 0o755);
        set_mode(&base.join("closed"), 0o755);
        set_mode(&base.join("closed/lock"), 0o1777);
        set_mode(&base.join("open"), 0o777);
        let mut dirs = scan_writable_dirs(&base).unwrap();
        dirs.sort();
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(dirs, vec![base.join("closed/lock"), base.join("open")]);
        }
        let list = base.join("list");
        write_list(&list, &dirs).unwrap();
        assert_eq!(writable_dirs(&list).unwrap(), dirs);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
