//! Tar streams for the Engine API's archive endpoints: files go into and come
//! out of containers this way, so no host directory is shared with them.

use bytes::Bytes;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_size(size);
    header.set_mtime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    header
}

fn append_dir<W: Write>(builder: &mut tar::Builder<W>, path: &str, mode: u32) -> io::Result<()> {
    let mut h = header(tar::EntryType::Directory, mode, 0);
    builder.append_data(&mut h, path, io::empty())
}

/// A tar, to be extracted at `/`, holding the private directory `dir` (mode
/// 0700: the grading user must not see the driver's files) with the
/// autodriver binary as `dir/name`.
pub fn autodriver_tar(dir: &str, name: &str, binary: &[u8]) -> io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    append_dir(&mut builder, &format!("{dir}/"), 0o700)?;
    let mut h = header(tar::EntryType::Regular, 0o755, binary.len() as u64);
    builder.append_data(&mut h, format!("{dir}/{name}"), binary)?;
    builder.into_inner()
}

/// Whether `name` may be a file name in the job directory: one plain path
/// component.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Writes to `out` a tar holding directory `dir` (relative, mode 0755) with
/// each `(name, host path)` file in it, owned by root; the autodriver hands
/// them to the grading user. Regular files only; execute bits of the host
/// file are kept. Each of `emptied` (relative paths) becomes an empty
/// root-only file. Names are checked before anything is written.
pub fn write_inputs_tar<'a, W: Write>(
    out: W,
    dir: &str,
    files: impl IntoIterator<Item = (&'a str, &'a Path)> + Clone,
    emptied: &[&str],
) -> io::Result<W> {
    if let Some((name, _)) = files
        .clone()
        .into_iter()
        .find(|(name, _)| !is_plain_file_name(name))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    let mut builder = tar::Builder::new(out);
    for path in emptied {
        let mut h = header(tar::EntryType::Regular, 0o600, 0);
        builder.append_data(&mut h, path, io::empty())?;
    }
    append_dir(&mut builder, &format!("{dir}/"), 0o755)?;
    for (name, path) in files {
        let file = std::fs::File::open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            ));
        }
        let mode = 0o644 | (meta.permissions().mode() & 0o111);
        let mut h = header(tar::EntryType::Regular, mode, meta.len());
        // take(): a file that grew since stat must not make the entry lie
        // about its size.
        builder.append_data(&mut h, format!("{dir}/{name}"), file.take(meta.len()))?;
    }
    builder.into_inner()
}

/// A tar of the `(name, host path)` files with nothing but their plain
/// names, for the autodriver's `--input-tar` (which writes them into the
/// job directory itself). Names are checked first; regular files only;
/// execute bits kept. Fails when the files hold more than `max_bytes`
/// (they may have grown since the caller looked).
pub fn stdin_inputs_tar<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a Path)> + Clone,
    max_bytes: u64,
) -> io::Result<Vec<u8>> {
    if let Some((name, _)) = files
        .clone()
        .into_iter()
        .find(|(name, _)| !is_plain_file_name(name))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    let mut builder = tar::Builder::new(Vec::new());
    let mut total: u64 = 0;
    for (name, path) in files {
        let file = std::fs::File::open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            ));
        }
        total = total.saturating_add(meta.len());
        if total > max_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the input files are too large to keep in memory",
            ));
        }
        let mode = 0o644 | (meta.permissions().mode() & 0o111);
        let mut h = header(tar::EntryType::Regular, mode, meta.len());
        builder.append_data(&mut h, name, file.take(meta.len()))?;
    }
    builder.into_inner()
}

/// [`write_inputs_tar`] into memory.
#[cfg(test)]
pub fn inputs_tar<'a>(
    dir: &str,
    files: impl IntoIterator<Item = (&'a str, &'a Path)> + Clone,
    emptied: &[&str],
) -> io::Result<Vec<u8>> {
    write_inputs_tar(Vec::new(), dir, files, emptied)
}

/// Chunks handed from a blocking tar writer to an async request body.
const CHUNK_BYTES: usize = 256 << 10;

/// An [`io::Write`] for blocking threads that passes what is written, in
/// chunks, to an async receiver (the body of an upload), so large inputs
/// are streamed rather than held in memory.
pub struct ChunkSender {
    tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChunkSender {
    pub fn new(tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>) -> Self {
        ChunkSender {
            tx,
            buf: Vec::with_capacity(CHUNK_BYTES),
        }
    }

    fn send_buffered(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(CHUNK_BYTES),
        ));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload ended early"))
    }

    /// Makes the receiving body fail with `error` (the upload is aborted).
    pub fn abort(&self, error: &io::Error) {
        let _ = self
            .tx
            .blocking_send(Err(io::Error::new(error.kind(), error.to_string())));
    }
}

impl Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK_BYTES {
            self.send_buffered()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffered()
    }
}

/// The contents of the first regular file in a tar (what the archive
/// endpoint returns for a single file), at most `max` bytes of it.
pub fn first_file(tar_bytes: &[u8], max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut archive = tar::Archive::new(tar_bytes);
    for entry in archive.entries()? {
        let entry = entry?;
        if entry.header().entry_type().is_file() {
            let mut data = Vec::new();
            entry.take(max as u64).read_to_end(&mut data)?;
            return Ok(Some(data));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_round_trip() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let a = dir.path().join("a");
        std::fs::write(&a, b"all:\n\techo hi\n")?;
        let tar = inputs_tar("x/job", [("Makefile", a.as_path())], &["x/s"])?;
        let mut archive = tar::Archive::new(tar.as_slice());
        let names: Vec<String> = archive
            .entries()?
            .map(|e| e.and_then(|e| Ok(e.path()?.display().to_string())))
            .collect::<io::Result<_>>()?;
        assert_eq!(names, ["x/s", "x/job/", "x/job/Makefile"]);
        assert_eq!(first_file(&tar, 1 << 20)?.as_deref(), Some(&b""[..]));
        let plain = inputs_tar("x/job", [("Makefile", a.as_path())], &[])?;
        assert_eq!(
            first_file(&plain, 1 << 20)?.as_deref(),
            Some(&b"all:\n\techo hi\n"[..])
        );
        assert_eq!(first_file(&plain, 3)?.as_deref(), Some(&b"all"[..]));
        Ok(())
    }

    #[test]
    fn stdin_tar_holds_plain_names_only() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let a = dir.path().join("a");
        std::fs::write(&a, b"hello")?;
        let tar = stdin_inputs_tar([("Makefile", a.as_path()), ("x.c", a.as_path())], 10)?;
        let mut archive = tar::Archive::new(tar.as_slice());
        let names: Vec<String> = archive
            .entries()?
            .map(|e| e.and_then(|e| Ok(e.path()?.display().to_string())))
            .collect::<io::Result<_>>()?;
        assert_eq!(names, ["Makefile", "x.c"]);
        assert!(stdin_inputs_tar([("a", a.as_path()), ("b", a.as_path())], 9).is_err());
        assert!(stdin_inputs_tar([("../a", a.as_path())], 10).is_err());
        Ok(())
    }

    #[test]
    fn unsafe_names_are_refused() {
        let path = Path::new("/dev/null");
        for bad in ["", "..", "a/b", "../x", "."] {
            assert!(inputs_tar("d", [(bad, path)], &[]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn autodriver_tar_is_private() -> io::Result<()> {
        let tar = autodriver_tar(".tango", "autodriver", b"\x7fELF")?;
        let mut archive = tar::Archive::new(tar.as_slice());
        let modes: Vec<u32> = archive
            .entries()?
            .map(|e| e.and_then(|e| e.header().mode()))
            .collect::<io::Result<_>>()?;
        assert_eq!(modes, [0o700, 0o755]);
        Ok(())
    }
}
