//! File-system work done as root on paths the job may have touched: every
//! walk goes through directory descriptors with `O_NOFOLLOW` and
//! `AT_SYMLINK_NOFOLLOW`, so a symlink planted by the job never leads the
//! driver outside the tree it means to change. The walks are iterative, so
//! a deeply nested tree cannot overflow the stack.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use crate::sys::{self, Dir};

pub enum Visit<T> {
    Descend(T),
    Skip,
}

/// Called with (parent directory, parent payload, name, lstat of the entry).
pub type Visitor<'a, T> = dyn FnMut(RawFd, &T, &CStr, &libc::stat) -> io::Result<Visit<T>> + 'a;
/// Called with (parent directory, parent payload, name, lstat, own payload).
pub type Leaver<'a, T> = dyn FnMut(RawFd, &T, &CStr, &libc::stat, T) -> io::Result<()> + 'a;

/// A file's identity: (device, inode).
pub type FileId = (libc::dev_t, libc::ino_t);

pub fn file_id(st: &libc::stat) -> FileId {
    (st.st_dev, st.st_ino)
}

struct Frame<T> {
    dir: Dir,
    payload: T,
    name: CString,
    stat: libc::stat,
}

/// Walks the tree under `root`. `visit` sees every entry (with its parent's
/// directory and payload) and decides whether to descend into a directory;
/// `leave` is called for each directory descended into once its contents
/// are done, with the parent still open (post order).
pub fn walk<T>(
    root: OwnedFd,
    root_payload: T,
    visit: &mut Visitor<T>,
    leave: &mut Leaver<T>,
) -> io::Result<()> {
    let root_stat = sys::fstat(root.as_raw_fd())?;
    let mut stack = vec![Frame {
        dir: Dir::from_fd(root)?,
        payload: root_payload,
        name: CString::default(),
        stat: root_stat,
    }];
    while let Some(top) = stack.last_mut() {
        let Some(name) = top.dir.next_name()? else {
            let done = stack.pop().expect("the stack is not empty here");
            if let Some(parent) = stack.last() {
                leave(
                    parent.dir.fd(),
                    &parent.payload,
                    &done.name,
                    &done.stat,
                    done.payload,
                )?;
            }
            continue;
        };
        let parent_fd = top.dir.fd();
        let stat = match sys::lstat_at(parent_fd, &name) {
            Ok(st) => st,
            Err(e) if sys::errno_of(&e) == libc::ENOENT => continue,
            Err(e) => return Err(e),
        };
        if let Visit::Descend(payload) = visit(parent_fd, &top.payload, &name, &stat)? {
            let fd = match sys::open_dir_at(parent_fd, &name) {
                Ok(fd) => fd,
                Err(e) if sys::errno_of(&e) == libc::ENOENT => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot open directory {:?}: {e}", name),
                    ))
                }
            };
            stack.push(Frame {
                dir: Dir::from_fd(fd)?,
                payload,
                name,
                stat,
            });
        }
    }
    Ok(())
}

fn ignore_errnos(result: io::Result<libc::c_int>, errnos: &[i32]) -> io::Result<()> {
    match result {
        Err(e) if errnos.contains(&sys::errno_of(&e)) => Ok(()),
        Err(e) => Err(e),
        Ok(_) => Ok(()),
    }
}

fn unlink_at(dir: RawFd, name: &CStr, is_dir: bool) -> io::Result<()> {
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    sys::check(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(|_| ())
}

/// Deletes everything under `root` owned by `uid` (like
/// `find root -user uid -delete`), without crossing into other file systems.
/// Directories of the user that still hold someone else's files stay, and
/// so do the top-level entry `keep` and the directory `spare` (device,
/// inode) with its contents. A missing `root` is fine.
pub fn purge_owned(
    root: &Path,
    uid: u32,
    keep: Option<&CStr>,
    spare: Option<FileId>,
) -> io::Result<()> {
    let fd = match sys::open_dir(root) {
        Ok(fd) => fd,
        Err(e)
            if matches!(
                sys::errno_of(&e),
                libc::ENOENT | libc::ENOTDIR | libc::ELOOP
            ) =>
        {
            return Ok(())
        }
        Err(e) => return Err(e),
    };
    let device = sys::fstat(fd.as_raw_fd())?.st_dev;
    // The payload tells whether the directory is `root` itself.
    walk(
        fd,
        true,
        &mut |parent, &at_root, name, st| {
            if at_root && keep == Some(name) {
                return Ok(Visit::Skip);
            }
            if sys::is_dir(st) {
                let spared = spare == Some(file_id(st));
                return Ok(if st.st_dev == device && !spared {
                    Visit::Descend(false)
                } else {
                    Visit::Skip
                });
            }
            if st.st_uid == uid {
                ignore_errnos(
                    sys::check(unsafe { libc::unlinkat(parent, name.as_ptr(), 0) }),
                    &[libc::ENOENT],
                )?;
            }
            Ok(Visit::Skip)
        },
        &mut |parent, _, name, st, _| {
            if st.st_uid == uid {
                ignore_errnos(
                    sys::check(unsafe {
                        libc::unlinkat(parent, name.as_ptr(), libc::AT_REMOVEDIR)
                    }),
                    &[libc::ENOENT, libc::ENOTEMPTY, libc::EEXIST, libc::EBUSY],
                )?;
            }
            Ok(())
        },
    )
}

/// Deletes `name` in `parent` whatever it is and whoever owns it.
pub fn remove_all_at(parent: RawFd, name: &CStr) -> io::Result<()> {
    let st = match sys::lstat_at(parent, name) {
        Ok(st) => st,
        Err(e) if sys::errno_of(&e) == libc::ENOENT => return Ok(()),
        Err(e) => return Err(e),
    };
    if !sys::is_dir(&st) {
        return unlink_at(parent, name, false);
    }
    let fd = sys::open_dir_at(parent, name)?;
    walk(
        fd,
        (),
        &mut |dir, _, entry, st| {
            if sys::is_dir(st) {
                Ok(Visit::Descend(()))
            } else {
                ignore_errnos(
                    sys::check(unsafe { libc::unlinkat(dir, entry.as_ptr(), 0) }),
                    &[libc::ENOENT],
                )
                .map(|_| Visit::Skip)
            }
        },
        &mut |dir, _, entry, _, ()| unlink_at(dir, entry, true),
    )?;
    unlink_at(parent, name, true)
}

/// Whose entries [`chown_tree`] gives to the grading user.
#[derive(Clone, Copy, Debug)]
pub enum Handover {
    /// Every entry: the driver was started by root, who vouches for the tree.
    Everything,
    /// Set-uid mode: the caller's entries, and root's directories, symlinks
    /// and regular files with a single link, which is what root copies in
    /// for the caller in Tango's own flow (`cp -r` as root, then the driver
    /// as the caller). A root regular file with more than one link may be
    /// any root file the caller hard-linked in, so it stays root's, and so
    /// do root's devices, fifos and sockets.
    CallerAndRootCopies { caller: u32 },
}

impl Handover {
    fn takes(self, st: &libc::stat) -> bool {
        match self {
            Handover::Everything => true,
            Handover::CallerAndRootCopies { caller } => {
                if st.st_uid == caller {
                    return true;
                }
                if st.st_uid != 0 {
                    return false;
                }
                match st.st_mode & libc::S_IFMT {
                    libc::S_IFDIR | libc::S_IFLNK => true,
                    libc::S_IFREG => st.st_nlink == 1,
                    _ => false,
                }
            }
        }
    }
}

/// Gives the entry `name` in `parent` to `uid`:`gid` if `policy` takes it.
/// The decision and the chown are made on one `O_PATH` descriptor of the
/// entry itself (a symlink is not followed), so swapping the name for
/// another file between the check and the chown changes nothing.
fn hand_over_at(
    parent: RawFd,
    name: &CStr,
    uid: u32,
    gid: u32,
    policy: Handover,
) -> io::Result<()> {
    let fd = match sys::openat(parent, name, libc::O_PATH | libc::O_NOFOLLOW, 0) {
        Ok(fd) => fd,
        Err(e) if sys::errno_of(&e) == libc::ENOENT => return Ok(()),
        Err(e) => return Err(e),
    };
    let st = sys::fstat(fd.as_raw_fd())?;
    if policy.takes(&st) {
        sys::check(unsafe {
            libc::fchownat(fd.as_raw_fd(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH)
        })?;
    }
    Ok(())
}

/// Changes the owner of `root` and of the entries under it that `policy`
/// takes, never following a symlink.
pub fn chown_tree(root: &Path, uid: u32, gid: u32, policy: Handover) -> io::Result<()> {
    let fd = sys::open_dir(root)?;
    let st = sys::fstat(fd.as_raw_fd())?;
    if policy.takes(&st) {
        sys::check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })?;
    }
    walk(
        fd,
        (),
        &mut |parent, _, name, st| {
            hand_over_at(parent, name, uid, gid, policy)?;
            Ok(if sys::is_dir(st) {
                Visit::Descend(())
            } else {
                Visit::Skip
            })
        },
        &mut |_, _, _, _, ()| Ok(()),
    )
}

fn permission_bits(st: &libc::stat) -> libc::mode_t {
    // Set-id bits are not carried over: the copy is made by root.
    st.st_mode & 0o1777
}

/// Copies the tree under `src` into the existing directory `dst`: regular
/// files, directories and symlinks (as symlinks); other kinds are skipped,
/// and so are regular files `policy` would not hand over (the copies are
/// root's files with one link, which [`chown_tree`] then hands over: a
/// hard link to a root file must not become a copy the grader owns).
fn copy_tree(src: OwnedFd, dst: OwnedFd, policy: Handover) -> io::Result<()> {
    walk(
        src,
        dst,
        &mut |src_parent, dst_parent, name, st| {
            let dst_parent = dst_parent.as_raw_fd();
            match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => {
                    sys::check(unsafe {
                        libc::mkdirat(dst_parent, name.as_ptr(), permission_bits(st) | 0o700)
                    })?;
                    Ok(Visit::Descend(sys::open_dir_at(dst_parent, name)?))
                }
                libc::S_IFREG => {
                    let from = sys::openat(src_parent, name, libc::O_RDONLY | libc::O_NOFOLLOW, 0)?;
                    // Decided on the file opened, not on the name looked at.
                    let opened = sys::fstat(from.as_raw_fd())?;
                    if opened.st_mode & libc::S_IFMT != libc::S_IFREG || !policy.takes(&opened) {
                        return Ok(Visit::Skip);
                    }
                    let to = sys::openat(
                        dst_parent,
                        name,
                        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                        permission_bits(&opened),
                    )?;
                    io::copy(&mut File::from(from), &mut File::from(to))?;
                    Ok(Visit::Skip)
                }
                libc::S_IFLNK => {
                    let mut buf = vec![0u8; 4096];
                    let n = unsafe {
                        libc::readlinkat(
                            src_parent,
                            name.as_ptr(),
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                        )
                    };
                    if n < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    buf.truncate(n as usize);
                    let target = CString::new(buf).map_err(|_| {
                        io::Error::new(io::ErrorKind::InvalidData, "symlink target with NUL")
                    })?;
                    sys::check(unsafe {
                        libc::symlinkat(target.as_ptr(), dst_parent, name.as_ptr())
                    })?;
                    Ok(Visit::Skip)
                }
                _ => Ok(Visit::Skip),
            }
        },
        &mut |_, _, _, st, dir: OwnedFd| {
            sys::check(unsafe { libc::fchmod(dir.as_raw_fd(), permission_bits(st)) }).map(|_| ())
        },
    )
}

fn split_parent(path: &Path) -> io::Result<(&Path, CString)> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no file name", path.display()),
        )
    })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok((parent, sys::cstring(Path::new(name))?))
}

/// Removes `path` and everything under it, whoever owns it.
pub fn remove_all(path: &Path) -> io::Result<()> {
    let (parent, name) = split_parent(path)?;
    let parent_fd = sys::open_path(parent, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    remove_all_at(parent_fd.as_raw_fd(), &name)
}

/// Moves the directory `src` to `dst` (which must not exist): a rename, or
/// across file systems a copy (leaving out the regular files `policy` would
/// not hand over) followed by deleting the source.
pub fn move_dir(src: &Path, dst: &Path, policy: Handover) -> io::Result<()> {
    let src_c = sys::cstring(src)?;
    let dst_c = sys::cstring(dst)?;
    match sys::check(unsafe { libc::rename(src_c.as_ptr(), dst_c.as_ptr()) }) {
        Ok(_) => return Ok(()),
        Err(e) if sys::errno_of(&e) == libc::EXDEV => {}
        Err(e) => return Err(e),
    }
    let src_fd = sys::open_dir(src)?;
    let st = sys::fstat(src_fd.as_raw_fd())?;
    sys::check(unsafe { libc::mkdir(dst_c.as_ptr(), 0o700) })?;
    let dst_fd = sys::open_dir(dst)?;
    sys::check(unsafe { libc::fchmod(dst_fd.as_raw_fd(), permission_bits(&st)) })?;
    copy_tree(src_fd, dst_fd, policy)?;
    remove_all(src)
}

/// Makes sure `home` is a real directory owned by the user, creating it
/// (and missing parents, owned by root) if needed.
pub fn ensure_home(home: &Path, uid: u32, gid: u32) -> io::Result<()> {
    match sys::lstat(home) {
        Ok(st) if sys::is_dir(&st) => {}
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a directory", home.display()),
            ))
        }
        Err(e) if sys::errno_of(&e) == libc::ENOENT => {
            if let Some(parent) = home.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let c = sys::cstring(home)?;
            sys::check(unsafe { libc::mkdir(c.as_ptr(), 0o700) })?;
        }
        Err(e) => return Err(e),
    }
    let fd = sys::open_dir(home)?;
    let st = sys::fstat(fd.as_raw_fd())?;
    if st.st_uid != uid || st.st_gid != gid {
        sys::check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })?;
    }
    if st.st_mode & 0o700 != 0o700 {
        sys::check(unsafe { libc::fchmod(fd.as_raw_fd(), (st.st_mode & 0o7777) | 0o700) })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("autodriver-fsops-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn copy_then_remove_keeps_symlinks_as_links() {
        let base = scratch("copy");
        let src = base.join("src");
        std::fs::create_dir_all(src.join("a/b/c")).unwrap();
        std::fs::write(src.join("a/b/c/file"), b"hello").unwrap();
        symlink("/etc/passwd", src.join("a/link")).unwrap();
        let dst = base.join("dst");
        let src_fd = sys::open_dir(&src).unwrap();
        std::fs::create_dir(&dst).unwrap();
        copy_tree(src_fd, sys::open_dir(&dst).unwrap(), Handover::Everything).unwrap();
        assert_eq!(std::fs::read(dst.join("a/b/c/file")).unwrap(), b"hello");
        assert_eq!(
            std::fs::read_link(dst.join("a/link")).unwrap(),
            Path::new("/etc/passwd")
        );
        remove_all(&src).unwrap();
        assert!(!src.exists());
        remove_all(&base).unwrap();
        assert!(!base.exists());
    }

    fn owner(path: &Path) -> u32 {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(path).unwrap().uid()
    }

    /// A tree as a set-uid caller may hand in: its own file, root's copies
    /// (a file, a directory holding a file, a symlink, a fifo), a root file
    /// with a second link, and another user's file. `None` unless root.
    fn mixed_tree(name: &str, caller: u32) -> Option<std::path::PathBuf> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED {name}: needs root (files of several owners)");
            return None;
        }
        let base = scratch(name);
        let src = base.join("src");
        std::fs::create_dir_all(src.join("rootdir")).unwrap();
        std::os::unix::fs::chown(&src, Some(caller), Some(caller)).unwrap();
        std::fs::write(src.join("mine"), b"m").unwrap();
        std::os::unix::fs::chown(src.join("mine"), Some(caller), Some(caller)).unwrap();
        std::fs::write(src.join("rootfile"), b"r").unwrap();
        std::fs::write(src.join("rootdir/inner"), b"i").unwrap();
        symlink("/etc/passwd", src.join("rootlink")).unwrap();
        let fifo = CString::new(src.join("rootfifo").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        std::fs::write(base.join("secret"), b"s").unwrap();
        std::fs::hard_link(base.join("secret"), src.join("linked")).unwrap();
        std::fs::write(src.join("foreign"), b"f").unwrap();
        std::os::unix::fs::chown(src.join("foreign"), Some(caller + 1), None).unwrap();
        Some(base)
    }

    #[test]
    fn set_uid_handover_takes_root_copies_but_not_linked_or_foreign_files() {
        let (caller, grader) = (64030, 64031);
        let Some(base) = mixed_tree("handover", caller) else {
            return;
        };
        let src = base.join("src");
        chown_tree(
            &src,
            grader,
            grader,
            Handover::CallerAndRootCopies { caller },
        )
        .unwrap();
        for taken in [
            "",
            "mine",
            "rootfile",
            "rootdir",
            "rootdir/inner",
            "rootlink",
        ] {
            assert_eq!(owner(&src.join(taken)), grader, "{taken}");
        }
        for kept in ["linked", "rootfifo"] {
            assert_eq!(owner(&src.join(kept)), 0, "{kept}");
        }
        assert_eq!(owner(&src.join("foreign")), caller + 1);
        assert_eq!(owner(&base.join("secret")), 0);
        assert_eq!(owner(Path::new("/etc/passwd")), 0);
        remove_all(&base).unwrap();
    }

    #[test]
    fn set_uid_copy_leaves_out_files_it_would_not_hand_over() {
        let caller = 64032;
        let Some(base) = mixed_tree("copy-policy", caller) else {
            return;
        };
        let dst = base.join("dst");
        std::fs::create_dir(&dst).unwrap();
        copy_tree(
            sys::open_dir(&base.join("src")).unwrap(),
            sys::open_dir(&dst).unwrap(),
            Handover::CallerAndRootCopies { caller },
        )
        .unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dst)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["mine", "rootdir", "rootfile", "rootlink"]);
        assert_eq!(std::fs::read(dst.join("rootdir/inner")).unwrap(), b"i");
        remove_all(&base).unwrap();
    }

    #[test]
    fn deep_tree_is_removed_without_recursion() {
        let base = scratch("deep");
        let mut path = base.clone();
        for _ in 0..300 {
            path.push("d");
        }
        std::fs::create_dir_all(&path).unwrap();
        remove_all(&base).unwrap();
        assert!(!base.exists());
    }

    #[test]
    fn purge_of_a_missing_dir_is_fine() {
        purge_owned(Path::new("/nonexistent/autodriver-test"), 12345, None, None).unwrap();
    }
}
