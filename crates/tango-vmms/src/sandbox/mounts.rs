//! Reading /proc/self/mountinfo, mounting a VM's tmpfs and removing mounts
//! under a VM's directory.
//!
//! The only mount a VM has in the host's namespace is its tmpfs; a job's
//! mounts live in its own mount namespace and vanish with it. Unmounting
//! everything under the VM directory before deleting it is also the safety
//! net against deleting through a live bind mount (into the image).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use tango_core::VmmsError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mounted sub-tree of the filesystem (field 4).
    pub root: String,
    pub mount_point: PathBuf,
    /// Per-mount options (field 6: `ro,nosuid,...`).
    pub mount_options: String,
    pub fs_type: String,
    pub super_options: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, etc.).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = (bytes[i + 1] - b'0') as u32 * 64
                + (bytes[i + 2] - b'0') as u32 * 8
                + (bytes[i + 3] - b'0') as u32;
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let after: Vec<&str> = after.split(' ').collect();
            Some(MountEntry {
                root: unescape(fields.get(3)?),
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                mount_options: fields.get(5)?.to_string(),
                fs_type: after.first()?.to_string(),
                super_options: after.get(2).copied().unwrap_or("").to_string(),
            })
        })
        .collect()
}

pub fn read_mountinfo() -> Result<Vec<MountEntry>, VmmsError> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| VmmsError::io("reading /proc/self/mountinfo", e))?;
    Ok(parse_mountinfo(&text))
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>, VmmsError> {
    let mut found: Vec<PathBuf> = read_mountinfo()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// Mounts a private tmpfs of at most `size_mb` MiB on `dir` (mode 0700).
pub fn mount_tmpfs(dir: &Path, size_mb: u64) -> Result<(), VmmsError> {
    let target = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| VmmsError::Backend(format!("path {} contains NUL", dir.display())))?;
    let options = CString::new(format!("mode=0700,size={size_mb}m"))
        .map_err(|_| VmmsError::Backend("tmpfs options contain NUL".into()))?;
    let fs_type = c"tmpfs";
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            fs_type.as_ptr(),
            target.as_ptr(),
            fs_type.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(VmmsError::io(
            format!("mounting a tmpfs on {}", dir.display()),
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Detaches every mount at or below `dir`; fails when one stays.
pub fn unmount_all_under(dir: &Path) -> Result<(), VmmsError> {
    for _round in 0..8 {
        let found = mounts_under(dir)?;
        if found.is_empty() {
            return Ok(());
        }
        for point in found {
            let c = CString::new(point.as_os_str().as_bytes()).map_err(|_| {
                VmmsError::Backend(format!("mount point {} contains NUL", point.display()))
            })?;
            // SAFETY: a valid NUL-terminated path.
            let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                // EINVAL: already gone (stacked mounts go with their parent).
                if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT)
                {
                    return Err(VmmsError::io(format!("unmounting {}", point.display()), e));
                }
            }
        }
    }
    Err(VmmsError::Backend(format!(
        "mounts under {} could not be removed",
        dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_with_escapes_and_optional_fields() {
        let text =
            "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:5 - cgroup cgroup rw,memory\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                    50 27 254:0 /a\\040b /mnt/with\\040space rw - ext4 /dev/vda rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].mount_point, PathBuf::from("/sys/fs/cgroup/memory"));
        assert_eq!(m[0].fs_type, "cgroup");
        assert_eq!(m[0].mount_options, "rw,relatime");
        assert_eq!(m[0].super_options, "rw,memory");
        assert_eq!(m[1].fs_type, "cgroup2");
        assert_eq!(m[2].root, "/a b");
        assert_eq!(m[2].mount_point, PathBuf::from("/mnt/with space"));
    }
}
