//! `--input-tar`: the job's input files as a tar on stdin or in a file,
//! written into the job directory before it is moved into the home. Lets a
//! backend hand the files over with the command that runs the job (the
//! Docker backend sends them through the exec's stdin) instead of one more
//! copy call.
//!
//! Only what a job's inputs are is accepted: regular files with a one
//! component name (ustar or GNU headers, names under 100 bytes, no prefix),
//! and an optional leading `./` directory entry. Anything else (links,
//! directories, devices, long-name or pax extensions, bad checksums, a
//! truncated stream) is refused. The reader stops at the end-of-archive
//! blocks, so the sender need not close the stream.

use crate::sys;
use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

const BLOCK: usize = 512;

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// An octal field (NUL or space terminated), or GNU's base-256 form.
fn parse_number(field: &[u8], what: &str) -> io::Result<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // Base-256: the first byte's high bit marks it; big-endian.
        let mut value: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            value = value
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(b)))
                .ok_or_else(|| invalid(format!("the {what} field overflows")))?;
        }
        return Ok(value);
    }
    let text: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ')
        .collect();
    if text.is_empty() {
        return Ok(0);
    }
    let text = std::str::from_utf8(&text).map_err(|_| invalid(format!("bad {what} field")))?;
    u64::from_str_radix(text, 8).map_err(|_| invalid(format!("bad {what} field {text:?}")))
}

/// The field up to its first NUL.
fn field_str(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

fn checksum_ok(header: &[u8; BLOCK]) -> io::Result<bool> {
    let recorded = parse_number(&header[148..156], "checksum")?;
    let sum: u64 = header
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(b)
            }
        })
        .sum();
    Ok(sum == recorded)
}

/// Fills `buf` completely; `Ok(false)` on end of stream before any byte.
fn read_block(input: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(invalid("the tar stream ends inside a block".into())),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// What one header describes.
enum Entry {
    /// A regular file: its name and permission bits and size.
    File { name: CString, mode: u32, size: u64 },
    /// `./`, the archive's own top directory: nothing to do.
    TopDir,
}

fn parse_header(header: &[u8; BLOCK]) -> io::Result<Entry> {
    if !checksum_ok(header)? {
        return Err(invalid("a tar header has a bad checksum".into()));
    }
    let name = field_str(&header[0..100]);
    let magic = &header[257..263];
    let prefix = if magic == b"ustar\0" {
        field_str(&header[345..500])
    } else {
        &[][..] // GNU ("ustar  ") or v7: no prefix field
    };
    let shown = String::from_utf8_lossy(name).into_owned();
    let size = parse_number(&header[124..136], "size")?;
    let kind = header[156];
    if (kind == b'5') && (name == b"./" || name == b".") && prefix.is_empty() {
        return Ok(Entry::TopDir);
    }
    if kind != b'0' && kind != 0 {
        return Err(invalid(format!(
            "{shown:?} is not a regular file (type {:?})",
            char::from(kind)
        )));
    }
    let name = name.strip_prefix(b"./").unwrap_or(name);
    if !prefix.is_empty()
        || name.is_empty()
        || name == b"."
        || name == b".."
        || name.contains(&b'/')
    {
        return Err(invalid(format!("{shown:?} is not a plain file name")));
    }
    let mode = parse_number(&header[100..108], "mode")? as u32;
    let name = CString::new(name).map_err(|_| invalid(format!("bad name {shown:?}")))?;
    Ok(Entry::File {
        name,
        mode: 0o644 | (mode & 0o111),
        size,
    })
}

/// Copies exactly `size` bytes of `input` into `fd`, then skips the padding.
fn copy_contents(input: &mut impl Read, fd: i32, size: u64) -> io::Result<()> {
    let mut left = size;
    let mut buf = vec![0u8; 64 << 10];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = match input.read(&mut buf[..want]) {
            Ok(0) => return Err(invalid("the tar stream ends inside a file".into())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        sys::write_all(fd, &buf[..n])?;
        left -= n as u64;
    }
    let padding = (BLOCK - (size % BLOCK as u64) as usize) % BLOCK;
    if padding > 0 && !read_block(input, &mut buf[..padding])? {
        return Err(invalid("the tar stream ends inside a file".into()));
    }
    Ok(())
}

/// Writes the files of the tar read from `input` into `dir` (created with
/// mode 0755 if missing, parents too), owned by root. Returns how many.
pub fn unpack(input: &mut impl Read, dir: &Path) -> io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let dir_fd = sys::open_dir(dir)?;
    let mut header = [0u8; BLOCK];
    let mut files = 0;
    loop {
        if !read_block(input, &mut header)? {
            // A stream without the end-of-archive blocks: tolerated only
            // when empty, as a truncated archive would otherwise pass.
            if files == 0 {
                return Ok(0);
            }
            return Err(invalid(
                "the tar stream has no end-of-archive marker".into(),
            ));
        }
        if header.iter().all(|&b| b == 0) {
            // The end: one zero block, normally two. The second is not
            // waited for, so a sender keeping the stream open is fine.
            return Ok(files);
        }
        match parse_header(&header)? {
            Entry::TopDir => {}
            Entry::File { name, mode, size } => {
                let fd = sys::openat(
                    dir_fd.as_raw_fd(),
                    &name,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW,
                    mode as libc::mode_t,
                )?;
                // The umask must not strip the execute bits.
                sys::check(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) })?;
                copy_contents(input, fd.as_raw_fd(), size)?;
                files += 1;
            }
        }
    }
}

/// `--input-tar` `-` (stdin) or a file path.
pub fn unpack_from(source: &Path, dir: &Path) -> io::Result<usize> {
    if source == Path::new("-") {
        // Unbuffered on purpose: nothing past the archive is consumed.
        // SAFETY: fd 0 stays open for the whole run; ManuallyDrop keeps it so.
        let mut stdin = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(0) });
        unpack(&mut *stdin, dir)
    } else {
        let mut file = std::fs::File::open(source)?;
        unpack(&mut file, dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &[u8], kind: u8, mode: u32, size: u64) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name);
        h[100..108].copy_from_slice(format!("{mode:07o}\0").as_bytes());
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        let sum: u32 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(b)
                }
            })
            .sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    fn archive(entries: &[(&[u8], u8, u32, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, kind, mode, data) in entries {
            out.extend_from_slice(&header(name, *kind, *mode, data.len() as u64));
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
        }
        out.extend_from_slice(&[0u8; 2 * BLOCK]);
        out
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("autodriver-intar-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn files_are_written_with_their_execute_bits() {
        let dir = scratch("ok").join("job");
        let tar = archive(&[
            (b"./", b'5', 0o755, b""),
            (b"Makefile", b'0', 0o600, b"all:\n\ttrue\n"),
            (b"./run.sh", b'0', 0o755, &[b'x'; 1000]),
            (b"empty", 0, 0o644, b""),
        ]);
        assert_eq!(unpack(&mut tar.as_slice(), &dir).unwrap(), 3);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::read(dir.join("Makefile")).unwrap(),
            b"all:\n\ttrue\n"
        );
        let mode = |n: &str| std::fs::metadata(dir.join(n)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("Makefile"), 0o644);
        assert_eq!(mode("run.sh"), 0o755);
        assert_eq!(std::fs::read(dir.join("run.sh")).unwrap().len(), 1000);
        assert_eq!(std::fs::read(dir.join("empty")).unwrap().len(), 0);
        std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }

    #[test]
    fn bytes_after_the_end_marker_are_not_read() {
        let dir = scratch("end");
        let mut tar = archive(&[(b"a", b'0', 0o644, b"x")]);
        tar.truncate(tar.len() - BLOCK); // one zero block only
        tar.extend_from_slice(b"trailing");
        let mut input = tar.as_slice();
        assert_eq!(unpack(&mut input, &dir).unwrap(), 1);
        assert_eq!(input, b"trailing");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn anything_but_plain_files_is_refused() {
        let dir = scratch("bad");
        type Entries<'a> = &'a [(&'a [u8], u8, u32, &'a [u8])];
        let bad: [Entries; 6] = [
            &[(b"a/b", b'0', 0o644, b"x")],
            &[(b"..", b'0', 0o644, b"x")],
            &[(b"link", b'2', 0o777, b"")],
            &[(b"hard", b'1', 0o644, b"")],
            &[(b"sub/", b'5', 0o755, b"")],
            &[(b"././@LongLink", b'L', 0o644, b"long")],
        ];
        for entries in bad {
            assert!(unpack(&mut archive(entries).as_slice(), &dir).is_err());
        }
        let mut corrupt = archive(&[(b"a", b'0', 0o644, b"x")]);
        corrupt[0] = b'b'; // checksum no longer matches
        assert!(unpack(&mut corrupt.as_slice(), &dir).is_err());
        let truncated = &archive(&[(b"a", b'0', 0o644, &[b'x'; 600])])[..BLOCK + 100];
        assert!(unpack(&mut &truncated[..], &dir).is_err());
        let unterminated = &archive(&[(b"a", b'0', 0o644, b"x")])[..2 * BLOCK];
        assert!(unpack(&mut &unterminated[..], &dir).is_err());
        assert_eq!(unpack(&mut &b""[..], &dir).unwrap(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn base256_sizes_parse() {
        let mut field = [0u8; 12];
        field[0] = 0x80;
        field[10] = 0x01;
        field[11] = 0x02;
        assert_eq!(parse_number(&field, "size").unwrap(), 0x0102);
        assert_eq!(parse_number(b"0000644 \0", "mode").unwrap(), 0o644);
    }
}
