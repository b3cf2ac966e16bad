//! The tar of a job's input files, streamed to the instance's `tar -x`.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;

/// Whether `name` may be a file name in the job directory: one plain path
/// component.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Writes a tar of the `(name, host path)` files, each at the top level
/// under its name, owned by root (the autodriver hands them to the grading
/// user). Regular files only; execute bits kept. Names are checked first.
pub fn write_inputs_tar<W: Write>(out: W, files: &[(String, std::path::PathBuf)]) -> io::Result<W> {
    if let Some((name, _)) = files.iter().find(|(name, _)| !is_plain_file_name(name)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut builder = tar::Builder::new(out);
    for (name, path) in files {
        let file = std::fs::File::open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            ));
        }
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644 | (meta.permissions().mode() & 0o111));
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(meta.len());
        header.set_mtime(now);
        // take(): a file that grew since stat must not make the entry lie
        // about its size.
        builder.append_data(&mut header, name, file.take(meta.len()))?;
    }
    builder.into_inner()
}

/// A `Write` that hands fixed-size chunks to an async consumer; used from
/// a blocking thread. A closed consumer is a broken pipe.
pub struct ChunkSender {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

const CHUNK: usize = 64 << 10;

impl ChunkSender {
    pub fn new(tx: tokio::sync::mpsc::Sender<Vec<u8>>) -> Self {
        ChunkSender {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

impl Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Packs `files` on a blocking thread; the tar comes out of the returned
/// receiver in chunks, and the handle says whether packing succeeded.
pub fn pack(
    files: Vec<(String, std::path::PathBuf)>,
) -> (
    tokio::sync::mpsc::Receiver<Vec<u8>>,
    tokio::task::JoinHandle<io::Result<()>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let packer = tokio::task::spawn_blocking(move || {
        let mut out = write_inputs_tar(ChunkSender::new(tx), &files)?;
        out.flush()
    });
    (rx, packer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_holds_the_files_under_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"all: ; echo hi\n").unwrap();
        let tar = write_inputs_tar(Vec::new(), &[("Makefile".into(), a.clone())]).unwrap();
        let mut archive = tar::Archive::new(&tar[..]);
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["Makefile"]);
        let bad = write_inputs_tar(Vec::new(), &[("../x".into(), a)]);
        assert_eq!(bad.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
