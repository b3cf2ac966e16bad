//! The data directory: courselab files, their immutable snapshots (blobs),
//! output files, and frozen copies of outputs waiting for callback delivery.
//!
//! Layout (Tango's courselab shape, which Autolab relies on to hide keys):
//! ```text
//! DATA_DIR/courselabs/<key>-<courselab>/<file>          uploaded files
//! DATA_DIR/courselabs/<key>-<courselab>/output/<file>   job outputs
//! DATA_DIR/blobs/<md5>       bytes of every uploaded version (hard links)
//! DATA_DIR/outbox/<job id>   output frozen for its callback
//! DATA_DIR/tmp/              partial uploads and outputs, same filesystem
//! ```
//! Every file that a client can read is written to `tmp/` first and renamed
//! into place, so no reader ever sees half of one.

use crate::names::{check_component, InvalidName};
use crate::store::{Store, StoreError};
use md5::{Digest, Md5};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    #[error("Courselab not found")]
    NoCourselab,
    #[error("file {0} was not uploaded to this courselab")]
    NoSuchFile(String),
    #[error("upload is larger than the server's limit of {0} bytes")]
    TooLarge(u64),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> FilesError {
    let context = context.into();
    move |source| FilesError::Io { context, source }
}

pub struct DataDir {
    root: PathBuf,
    temp_counter: AtomicU64,
    /// Serialises publishing uploads, so a file and its recorded md5 always
    /// agree when two uploads of one name race.
    publish: tokio::sync::Mutex<()>,
}

/// The result of an upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub md5: String,
    /// A file of that name with the same bytes was already there.
    pub existed: bool,
}

impl DataDir {
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        for sub in ["courselabs", "blobs", "outbox", "tmp"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        // Leftovers of writes interrupted by a crash.
        if let Ok(entries) = std::fs::read_dir(root.join("tmp")) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(DataDir {
            root,
            temp_counter: AtomicU64::new(0),
            publish: tokio::sync::Mutex::new(()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<key>-<courselab>`, after checking both are single path components.
    pub fn courselab_dir_name(key: &str, courselab: &str) -> Result<String, InvalidName> {
        check_component("key", key)?;
        check_component("courselab name", courselab)?;
        let name = format!("{key}-{courselab}");
        check_component("courselab name", &name)?;
        Ok(name)
    }

    pub fn courselab_path(&self, dir: &str) -> PathBuf {
        self.root.join("courselabs").join(dir)
    }

    pub fn courselab_exists(&self, dir: &str) -> bool {
        self.courselab_path(dir).is_dir()
    }

    /// Makes the courselab directory if missing; true when it was created.
    pub async fn open_courselab(&self, dir: &str) -> Result<bool, FilesError> {
        let path = self.courselab_path(dir);
        let existed = path.is_dir();
        tokio::fs::create_dir_all(path.join("output"))
            .await
            .map_err(io_err(format!("cannot create courselab directory {dir}")))?;
        Ok(!existed)
    }

    /// Relative path shown in job records: `courselabs/<dir>/<name>`.
    pub fn display_path(dir: &str, name: &str) -> String {
        format!("courselabs/{dir}/{name}")
    }

    pub fn output_path(&self, dir: &str, output_file: &str) -> PathBuf {
        self.courselab_path(dir).join("output").join(output_file)
    }

    pub fn outbox_path(&self, job_id: u64) -> PathBuf {
        self.root.join("outbox").join(job_id.to_string())
    }

    pub fn blob_path(&self, md5: &str) -> PathBuf {
        self.root.join("blobs").join(md5)
    }

    /// Removes the blobs of file versions that were replaced: a blob no
    /// courselab file shares any more (link count 1), not named in `keep`
    /// (the inputs of jobs still to run), and older than `min_age` (so a
    /// job being added, which takes its snapshot before it is stored, keeps
    /// its bytes). Returns how many were removed.
    pub async fn remove_unused_blobs(
        &self,
        keep: std::collections::HashSet<String>,
        min_age: std::time::Duration,
    ) -> io::Result<usize> {
        use std::os::unix::fs::MetadataExt;
        let dir = self.root.join("blobs");
        tokio::task::spawn_blocking(move || {
            let now = std::time::SystemTime::now();
            let mut removed = 0;
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if keep.contains(&name) {
                    continue;
                }
                let Ok(meta) = entry.metadata() else {
                    continue;
                };
                // The ctime moves when the last courselab file sharing the
                // blob goes (its link count changes), not when it was written.
                let changed = std::time::UNIX_EPOCH
                    + std::time::Duration::from_secs(meta.ctime().max(0) as u64);
                let old_enough = now.duration_since(changed).is_ok_and(|age| age >= min_age);
                if meta.is_file() && meta.nlink() == 1 && old_enough {
                    match std::fs::remove_file(entry.path()) {
                        Ok(()) => removed += 1,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok(removed)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// A fresh path in `tmp/` (same filesystem as everything else).
    pub fn temp_path(&self, tag: &str) -> PathBuf {
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{tag}-{}-{n}", std::process::id()))
    }

    /// Starts a streamed upload of `name` into courselab `dir`.
    pub async fn begin_upload(
        &self,
        dir: &str,
        name: &str,
        max_bytes: u64,
    ) -> Result<Upload, FilesError> {
        check_component("file name", name)?;
        if !self.courselab_exists(dir) {
            return Err(FilesError::NoCourselab);
        }
        let temp = self.temp_path("upload");
        let file = tokio::fs::File::create(&temp)
            .await
            .map_err(io_err("cannot create a temporary upload file"))?;
        Ok(Upload {
            dir: dir.to_string(),
            name: name.to_string(),
            temp,
            file: Some(file),
            hasher: Md5::new(),
            size: 0,
            max_bytes,
        })
    }

    /// The md5 and immutable snapshot of courselab file `name`, as it is now.
    /// Files put into the courselab directory by hand (not uploaded) are
    /// hashed and snapshotted here.
    pub async fn snapshot(
        &self,
        store: &dyn Store,
        dir: &str,
        name: &str,
    ) -> Result<(PathBuf, String), FilesError> {
        check_component("file name", name)?;
        if let Some(md5) = store.file_md5(dir, name)? {
            let blob = self.blob_path(&md5);
            // A shared store has the bytes of every file it records: the
            // server that runs the job fetches them if it lacks them.
            if blob.is_file() || store.shared().is_some() {
                return Ok((blob, md5));
            }
        }
        let source = self.courselab_path(dir).join(name);
        let meta = match tokio::fs::symlink_metadata(&source).await {
            Ok(meta) if meta.is_file() => meta,
            _ => return Err(FilesError::NoSuchFile(name.to_string())),
        };
        let _ = meta;
        let temp = self.temp_path("snapshot");
        tokio::fs::copy(&source, &temp)
            .await
            .map_err(io_err(format!("cannot read courselab file {name}")))?;
        let md5 = md5_file(&temp).await?;
        let blob = self.blob_path(&md5);
        tokio::fs::rename(&temp, &blob)
            .await
            .map_err(io_err("cannot store a file snapshot"))?;
        if let Some(shared) = store.shared() {
            shared.put_blob(&md5, &blob)?;
        }
        store.set_file(dir, name, &md5)?;
        Ok((blob, md5))
    }

    /// Writes `content` to `dest` atomically (temp file, then rename).
    /// When `freeze_to` is given, the same bytes are also linked there
    /// before the rename, so a later job writing `dest` cannot change them.
    pub async fn write_atomically(
        &self,
        dest: &Path,
        content: &[u8],
        freeze_to: Option<&Path>,
    ) -> Result<(), FilesError> {
        let temp = self.temp_path("output");
        let result = async {
            let mut file = tokio::fs::File::create(&temp)
                .await
                .map_err(io_err("cannot create a temporary output file"))?;
            file.write_all(content)
                .await
                .map_err(io_err("cannot write an output file"))?;
            file.sync_data()
                .await
                .map_err(io_err("cannot write an output file"))?;
            drop(file);
            if let Some(frozen) = freeze_to {
                let _ = tokio::fs::remove_file(frozen).await;
                tokio::fs::hard_link(&temp, frozen)
                    .await
                    .map_err(io_err("cannot keep the output for its callback"))?;
            }
            if let Some(parent) = dest.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(io_err("cannot create the output directory"))?;
            }
            tokio::fs::rename(&temp, dest).await.map_err(io_err(format!(
                "cannot write output file {}",
                dest.display()
            )))
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&temp).await;
        }
        result
    }
}

pub struct Upload {
    dir: String,
    name: String,
    temp: PathBuf,
    file: Option<tokio::fs::File>,
    hasher: Md5,
    size: u64,
    max_bytes: u64,
}

impl Upload {
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), FilesError> {
        self.size += chunk.len() as u64;
        if self.size > self.max_bytes {
            return Err(FilesError::TooLarge(self.max_bytes));
        }
        self.hasher.update(chunk);
        let file = self.file.as_mut().ok_or_else(|| FilesError::Io {
            context: "upload already finished".into(),
            source: io::Error::other("closed"),
        })?;
        file.write_all(chunk)
            .await
            .map_err(io_err("cannot write the uploaded file"))
    }

    /// Publishes the upload: a blob of its bytes plus the courselab file.
    pub async fn finish(
        mut self,
        data: &DataDir,
        store: &dyn Store,
    ) -> Result<Uploaded, FilesError> {
        let md5 = hex::encode(std::mem::take(&mut self.hasher).finalize());
        if let Some(mut file) = self.file.take() {
            file.flush()
                .await
                .map_err(io_err("cannot write the uploaded file"))?;
        }
        let dest = data.courselab_path(&self.dir).join(&self.name);
        let _publishing = data.publish.lock().await;
        let existed = store.file_md5(&self.dir, &self.name)?.as_deref() == Some(md5.as_str())
            && dest.is_file()
            && data.blob_path(&md5).is_file();
        if existed {
            return Ok(Uploaded { md5, existed });
        }
        let blob = data.blob_path(&md5);
        if !blob.is_file() {
            // The blob shares the inode of the published file; neither is
            // ever written in place, so the blob keeps these bytes forever.
            match tokio::fs::hard_link(&self.temp, &blob).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("cannot store the uploaded file")(e)),
            }
        }
        tokio::fs::rename(&self.temp, &dest)
            .await
            .map_err(io_err(format!("cannot store uploaded file {}", self.name)))?;
        // The bytes first: a server that sees the file's record can then
        // always fetch them.
        if let Some(shared) = store.shared() {
            shared.put_blob(&md5, &blob)?;
        }
        store.set_file(&self.dir, &self.name, &md5)?;
        Ok(Uploaded { md5, existed })
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Unfinished or already-published uploads leave no temp file behind.
        let _ = std::fs::remove_file(&self.temp);
    }
}

pub async fn md5_file(path: &Path) -> Result<String, FilesError> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(io_err(format!("cannot read {}", path.display())))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .await
            .map_err(io_err(format!("cannot read {}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
