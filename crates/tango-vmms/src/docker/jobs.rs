//! A job in a container: its input files (through the job's stdin or an
//! archive upload), its run (through the serving PID 1, see `served.rs`, or
//! a `docker exec`), its output on the host, and its partial output.

use super::{
    api_error, archive, container_name, served, vm_error, Docker, VmmsError, AUTODRIVER_PATH,
    DRIVER_DIR_REL, JOB_DIR_NAME, STREAM_PATH, SUMMARY_PATH, WRITABLE_DIRS_PATH,
};
use crate::cgroupfs::CpuPriority;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::query_parameters::{AttachContainerOptionsBuilder, UploadToContainerOptionsBuilder};
use bytes::Bytes;
use futures_util::StreamExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tango_core::model::{InputFile, Machine};
use tango_core::vmms::{RunOutcome, RunRequest, RunStatus};
use tokio::io::AsyncWriteExt;

/// How long past the job's own time limit the backend waits for the
/// autodriver to report (it kills the job at the limit, then cleans up).
const RUN_GRACE: Duration = Duration::from_secs(60);
/// Bytes of autodriver output kept on the host beyond the job's output cap
/// (its header line and its own error messages).
const OUTPUT_SLACK: u64 = 1 << 20;
/// Input files up to this size (as a tar) are kept in memory at copy-in and
/// sent through the stdin of the job's exec (`--input-tar -`): no archive
/// upload, for which dockerd runs a helper process (~50 ms). Larger inputs
/// are uploaded, streamed from their files.
const STDIN_INPUT_MAX_BYTES: u64 = 8 << 20;
/// Tar header name field: longer names would need an extension header,
/// which the autodriver's tar reader refuses.
const STDIN_INPUT_MAX_NAME: usize = 99;

/// Appends to the job's output file what fits below `cap` bytes in all.
async fn write_capped(
    output: &mut tokio::fs::File,
    bytes: &[u8],
    cap: u64,
    written: &mut u64,
) -> Result<(), VmmsError> {
    let room = cap.saturating_sub(*written).min(bytes.len() as u64) as usize;
    if room > 0 {
        output
            .write_all(&bytes[..room])
            .await
            .map_err(|e| VmmsError::io("cannot write the job's output", e))?;
        *written += room as u64;
    }
    Ok(())
}

impl Docker {
    /// Puts the job's input files into a fresh directory of the container
    /// (Tango's copyIn): kept in memory for the job's stdin when small,
    /// else uploaded.
    pub(super) async fn copy_inputs(
        &self,
        vm: &Machine,
        files: &[InputFile],
    ) -> Result<(), VmmsError> {
        let name = container_name(vm);
        let (number, created_here) = self.with_state(&name, |state| {
            state.copy_ins += 1;
            (state.copy_ins, state.created_here)
        });
        let dir = format!("{DRIVER_DIR_REL}/jobs/{number}/{JOB_DIR_NAME}");
        let pairs: Vec<(String, PathBuf)> = files
            .iter()
            .map(|f| (f.dest_file.clone(), f.path.clone()))
            .collect();
        if let Some(bad) = pairs
            .iter()
            .find(|(name, _)| !archive::is_plain_file_name(name))
        {
            return Err(VmmsError::Backend(format!(
                "input file name {:?} is not a plain file name",
                bad.0
            )));
        }
        self.with_state(&name, |state| {
            state.pending_job_dir = None;
            state.pending_input = None;
            state.stream = None;
        });
        // Small inputs wait in memory for the exec (see STDIN_INPUT_MAX_BYTES).
        let mut total: u64 = 0;
        for (_, path) in &pairs {
            let meta = tokio::fs::metadata(path)
                .await
                .map_err(|e| VmmsError::io(format!("cannot read {}", path.display()), e))?;
            total = total.saturating_add(meta.len());
        }
        let short_names = pairs
            .iter()
            .all(|(name, _)| name.len() <= STDIN_INPUT_MAX_NAME);
        if created_here && short_names && total <= STDIN_INPUT_MAX_BYTES {
            let files = pairs.clone();
            let packed = tokio::task::spawn_blocking(move || {
                let files = files
                    .iter()
                    .map(|(name, path)| (name.as_str(), path.as_path()));
                archive::stdin_inputs_tar(files, STDIN_INPUT_MAX_BYTES)
            })
            .await
            .map_err(|e| VmmsError::Backend(format!("packing the input files failed: {e}")))?;
            match packed {
                Ok(tar) => {
                    self.with_state(&name, |state| {
                        state.pending_job_dir = Some(format!("/{dir}"));
                        state.pending_input = Some(Bytes::from(tar));
                    });
                    return Ok(());
                }
                // Grew past the bound since they were measured: upload.
                // (or are not regular files: the upload says so).
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {}
                Err(e) => return Err(VmmsError::io("cannot pack the input files", e)),
            }
        }
        // The tar is written by a blocking thread while it is uploaded.
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let tar_dir = dir.clone();
        let packer = tokio::task::spawn_blocking(move || {
            let mut sender = archive::ChunkSender::new(tx);
            let files = pairs
                .iter()
                .map(|(name, path)| (name.as_str(), path.as_path()));
            let emptied = [&SUMMARY_PATH[1..], &STREAM_PATH[1..]];
            let written = archive::write_inputs_tar(&mut sender, &tar_dir, files, &emptied)
                .and_then(std::io::Write::flush);
            if let Err(e) = &written {
                sender.abort(e);
            }
            written
        });
        let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let options = UploadToContainerOptionsBuilder::default().path("/").build();
        let uploaded = self
            .api
            .upload_to_container(&name, Some(options), bollard::body_try_stream(body))
            .await;
        let packed = packer
            .await
            .map_err(|e| VmmsError::Backend(format!("packing the input files failed: {e}")))?;
        match (packed, uploaded) {
            (Ok(()), Ok(())) => {}
            // The upload failing first stops the packer with a broken pipe:
            // the upload's error is the one that says what happened.
            (Err(e), Err(upload)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                return Err(vm_error(&name, "cannot copy the input files into", upload))
            }
            (Err(e), _) => return Err(VmmsError::io("cannot pack the input files", e)),
            (Ok(()), Err(upload)) => {
                return Err(vm_error(&name, "cannot copy the input files into", upload))
            }
        }
        self.with_state(&name, |state| {
            state.pending_job_dir = Some(format!("/{dir}"))
        });
        Ok(())
    }

    /// Runs the job copied in last (Tango's runJob), served or by exec.
    pub(super) async fn run(
        &self,
        vm: &Machine,
        req: &RunRequest,
    ) -> Result<RunOutcome, VmmsError> {
        let name = container_name(vm);
        let (job_dir, input, ran_before) = self.with_state(&name, |state| {
            state.running_after_job = false;
            let ran_before = std::mem::replace(&mut state.ran_a_job, true);
            (
                state.pending_job_dir.take(),
                state.pending_input.take(),
                ran_before,
            )
        });
        if self.config.single_use && ran_before {
            // Nothing of the last job was purged for a next one.
            return Err(VmmsError::Backend(format!(
                "{name} has run a job; with single_use a container runs one only"
            )));
        }
        let job_dir = job_dir.ok_or_else(|| {
            VmmsError::Backend(format!("run_job on {name} without copy_in before it"))
        })?;
        let user = self.grading_user(&name, &vm.image).await?;
        self.apply_network(&name, req.disable_network).await?;
        let host_cgroup = self.start_job_in_cgroup(&name);
        let _cpu_priority = match &host_cgroup {
            Some(cgroup) => self.cpu_priority_by_age(&name, cgroup),
            None => self.lower_cpu_shares_by_api(&name).await?,
        };

        let summary_path = SUMMARY_PATH.to_string();
        // A served job's stream file is its own (the serving PID 1 removes
        // the one before): it does not exist until the job's autodriver
        // makes it, even while an earlier job cut short still runs, so
        // `partial_output` may read it from now on.
        let stream_path = if self.config.serve_jobs {
            self.with_state(&name, |state| {
                state.served_jobs += 1;
                let path = format!("{STREAM_PATH}.{}", state.served_jobs);
                state.stream = Some(path.clone());
                path
            })
        } else {
            STREAM_PATH.to_string()
        };
        // RLIMIT_NPROC counts the processes of a uid across the whole host,
        // and every container's grading user has the same uid: with it, a fork
        // bomb in one container would stop `make` forking in all the others.
        // The container's pids cgroup (`default_max_pids`) bounds each job.
        let without_nproc = RunRequest {
            max_procs: 0,
            ..req.clone()
        };
        let mut args = without_nproc.autodriver_args(&user, &summary_path, &job_dir);
        let dir_arg = args.pop().unwrap_or_else(|| job_dir.clone());
        args.extend(["--stream".to_string(), stream_path.clone()]);
        // A reused container must not carry one job's files in /run/lock
        // or its IPC objects over to the next job.
        if !self.config.single_use {
            args.extend([
                "--purge-writable".to_string(),
                WRITABLE_DIRS_PATH.to_string(),
            ]);
        }
        if input.is_some() {
            args.extend(["--input-tar".to_string(), "-".to_string()]);
        }
        args.push(dir_arg);
        let output_path = self.config.work_dir.join(format!("{name}.out"));
        let mut output = tokio::fs::File::create(&output_path)
            .await
            .map_err(|e| VmmsError::io(format!("cannot create {}", output_path.display()), e))?;
        self.with_state(&name, |state| {
            state.output = Some(output_path.clone());
        });

        let (exit_code, oom_killed) = if self.config.serve_jobs {
            let started_at = SystemTime::now();
            let exit_code = self.run_served(&name, &args, input, &mut output, req).await;
            // The end line came from PID 1, so the container runs: with its
            // cgroup's counter known, no inspect (a round trip through a
            // daemon that a burst of container starts keeps busy).
            let by_counter = exit_code
                .as_ref()
                .ok()
                .and_then(|_| self.oom_counter_rose(&name));
            let oom_killed = match by_counter {
                Some(killed) => {
                    self.with_state(&name, |state| state.running_after_job = true);
                    killed
                }
                None => self.oom_killed(&name, started_at).await,
            };
            (exit_code, oom_killed)
        } else {
            let mut cmd = vec![AUTODRIVER_PATH.to_string()];
            cmd.extend(args);
            self.run_by_exec(&name, cmd, input, &mut output, req)
                .await?
        };
        if let Some(cgroup) = &host_cgroup {
            // The resets and copy-ins before the next job run at the
            // default weight.
            drop(_cpu_priority);
            if let Err(e) = cgroup.set_cpu_priority(CpuPriority::Normal) {
                tracing::debug!("docker: cannot set the CPU weight of {name}: {e}");
            }
        }
        let exit_code = exit_code?;
        let status = RunStatus::from_exit_code(exit_code);

        // The autodriver writes the summary when it ran the job (exit 0 or
        // 2); otherwise the file may be an earlier job's.
        let ran = matches!(status, RunStatus::Completed | RunStatus::TimedOut);
        let summary = if self.config.read_summary && ran {
            match self.read_file(&name, &summary_path, 1 << 20).await {
                Ok(Some(bytes)) => serde_json::from_slice::<serde_json::Value>(&bytes).ok(),
                _ => None,
            }
        } else {
            None
        };
        let mut notes = Vec::new();
        if oom_killed {
            notes.push(format!(
                "The job was killed: it exceeded its memory limit of {} MiB",
                self.memory_mb(vm)
            ));
        }
        Ok(RunOutcome {
            status,
            exit_code,
            summary,
            notes,
        })
    }

    /// Runs the job's autodriver by a `docker exec` (without `serve_jobs`):
    /// its exit code, and whether the memory limit killed something.
    async fn run_by_exec(
        &self,
        name: &str,
        cmd: Vec<String>,
        input: Option<Bytes>,
        output: &mut tokio::fs::File,
        req: &RunRequest,
    ) -> Result<(Result<Option<i32>, VmmsError>, bool), VmmsError> {
        let exec = self
            .api
            .create_exec(
                name,
                CreateExecOptions {
                    attach_stdin: Some(input.is_some()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(cmd),
                    user: Some("0:0".to_string()),
                    working_dir: Some("/".to_string()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| vm_error(name, "cannot create the job's exec in", e))?;
        let started_at = SystemTime::now();
        let attached = self
            .api
            .start_exec(&exec.id, None)
            .await
            .map_err(|e| vm_error(name, "cannot start the job in", e))?;
        let StartExecResults::Attached {
            output: mut stream,
            input: mut stdin,
        } = attached
        else {
            return Err(VmmsError::Backend("docker: the exec did not attach".into()));
        };
        self.with_state(name, |state| state.stream = Some(STREAM_PATH.to_string()));
        // The input files go in while the output is read. A failed write
        // needs no handling here: the autodriver then reports a bad archive.
        let feed = async {
            if let Some(tar) = input {
                if stdin.write_all(&tar).await.is_ok() {
                    let _ = stdin.shutdown().await;
                }
            }
        };

        // The autodriver caps the job's output itself; the host file is
        // capped too in case something else floods the stream.
        let cap = req.output_cap_bytes.saturating_add(OUTPUT_SLACK);
        let copy = async {
            let mut written: u64 = 0;
            while let Some(chunk) = stream.next().await {
                let chunk =
                    chunk.map_err(|e| api_error(format_args!("job output of {name}"), e))?;
                let bytes = match chunk {
                    LogOutput::StdOut { message } | LogOutput::StdErr { message } => message,
                    _ => continue,
                };
                write_capped(output, &bytes, cap, &mut written).await?;
            }
            output
                .flush()
                .await
                .map_err(|e| VmmsError::io("cannot write the job's output", e))
        };
        let copy = async { futures_util::join!(feed, copy).1 };
        let bound =
            (req.timeout_secs > 0).then(|| Duration::from_secs(req.timeout_secs) + RUN_GRACE);
        match bound {
            Some(bound) => tokio::time::timeout(bound, copy).await.map_err(|_| {
                VmmsError::Backend(format!(
                    "the autodriver in {name} did not finish within {bound:?}"
                ))
            })??,
            None => copy.await?,
        }

        // The stream ends when the process exits; its exit code can lag
        // behind by a moment.
        let exit_code = async {
            let mut exit_code = None;
            for _ in 0..100 {
                let inspect = self.api.inspect_exec(&exec.id).await.map_err(|e| {
                    api_error(format_args!("cannot inspect the job's exec in {name}"), e)
                })?;
                if inspect.running != Some(true) {
                    exit_code = inspect.exit_code.and_then(|c| i32::try_from(c).ok());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, VmmsError>(exit_code)
        };
        // The OOM check does not depend on the exit code: both at once.
        let (exit_code, oom_killed) =
            futures_util::join!(exit_code, self.oom_killed(name, started_at));
        Ok((exit_code, oom_killed))
    }

    /// Runs the job through the container's serving PID 1 (`serve_jobs`):
    /// its exit code. The attach connection is kept for the next job only
    /// when this one's end was read.
    async fn run_served(
        &self,
        name: &str,
        args: &[String],
        input: Option<Bytes>,
        output: &mut tokio::fs::File,
        req: &RunRequest,
    ) -> Result<Option<i32>, VmmsError> {
        let (attached, unfinished) = self.with_state(name, |state| {
            (state.attached.take(), state.unfinished_nonce.take())
        });
        let mut attached = match attached {
            Some(attached) => attached,
            None => self.attach(name).await?,
        };
        let nonce = served::nonce().map_err(|e| VmmsError::io("cannot make a nonce", e))?;
        let input = input.unwrap_or_default();
        let request = served::request(&nonce, args, input.len());
        self.with_state(name, |state| {
            // Until the end is read; a job cut short leaves it for the next.
            state.unfinished_nonce = Some(nonce.clone());
        });
        let served::Attached {
            output: stream,
            input: stdin,
        } = &mut attached;
        let feed = async {
            stdin.write_all(&request).await?;
            stdin.write_all(&input).await?;
            stdin.flush().await
        };
        // The autodriver caps the job's output itself; the host file is
        // capped too in case something else floods the stream.
        let cap = req.output_cap_bytes.saturating_add(OUTPUT_SLACK);
        let copy = async {
            let mut skip = unfinished.map(|n| served::EndScanner::new(&n));
            let mut scanner = served::EndScanner::new(&nonce);
            let mut written: u64 = 0;
            while let Some(chunk) = stream.next().await {
                let chunk =
                    chunk.map_err(|e| api_error(format_args!("job output of {name}"), e))?;
                let mut bytes = match chunk {
                    LogOutput::StdOut { message } | LogOutput::StdErr { message } => {
                        message.to_vec()
                    }
                    _ => continue,
                };
                if let Some(previous) = &mut skip {
                    // The rest of an earlier job's output.
                    match previous.feed(&bytes) {
                        served::Scanned::Output(_) => continue,
                        served::Scanned::End(_, _, rest) => {
                            skip = None;
                            bytes = rest;
                        }
                    }
                }
                let (kept, end) = match scanner.feed(&bytes) {
                    served::Scanned::Output(kept) => (kept, None),
                    served::Scanned::End(kept, code, _) => (kept, Some(code)),
                };
                write_capped(output, &kept, cap, &mut written).await?;
                if let Some(code) = end {
                    output
                        .flush()
                        .await
                        .map_err(|e| VmmsError::io("cannot write the job's output", e))?;
                    return Ok(code);
                }
            }
            Err(VmmsError::Backend(format!(
                "the autodriver serving {name} stopped before the job ended (did the container stop?)"
            )))
        };
        let both = async {
            let (fed, copied) = futures_util::join!(feed, copy);
            match (fed, copied) {
                (_, Ok(code)) => Ok(code),
                (Err(e), Err(_)) => Err(VmmsError::io(format!("cannot send the job to {name}"), e)),
                (Ok(()), Err(e)) => Err(e),
            }
        };
        let bound =
            (req.timeout_secs > 0).then(|| Duration::from_secs(req.timeout_secs) + RUN_GRACE);
        let code = match bound {
            Some(bound) => tokio::time::timeout(bound, both).await.map_err(|_| {
                VmmsError::Backend(format!(
                    "the autodriver in {name} did not finish within {bound:?}"
                ))
            })??,
            None => both.await?,
        };
        self.with_state(name, |state| {
            state.unfinished_nonce = None;
            state.attached = Some(attached);
        });
        Ok(code)
    }

    async fn attach(&self, name: &str) -> Result<served::Attached, VmmsError> {
        let options = AttachContainerOptionsBuilder::default()
            .stream(true)
            .stdin(true)
            .stdout(true)
            .stderr(true)
            .logs(false)
            .build();
        let attached = tokio::time::timeout(
            self.config.api_timeout,
            self.api.attach_container(name, Some(options)),
        )
        .await
        .map_err(|_| VmmsError::Backend(format!("docker: attaching to {name} timed out")))?
        .map_err(|e| vm_error(name, "cannot attach to", e))?;
        Ok(served::Attached {
            output: attached.output,
            input: attached.input,
        })
    }

    /// Copies the last job's output file to `dest` (Tango's copyOut).
    pub(super) async fn copy_output(&self, vm: &Machine, dest: &Path) -> Result<(), VmmsError> {
        let name = container_name(vm);
        let output = self.with_state(&name, |state| state.output.clone());
        crate::output_file::copy_last_output(output, &name, dest).await
    }

    /// What the running job has written so far, at most `max_bytes`.
    pub(super) async fn read_partial_output(
        &self,
        vm: &Machine,
        max_bytes: usize,
    ) -> Result<Vec<u8>, VmmsError> {
        let name = container_name(vm);
        // Until the job's autodriver runs (and empties it) the exec path's
        // file may hold an earlier job's output.
        let (stream, created_here) =
            self.with_state(&name, |state| (state.stream.clone(), state.created_here));
        let Some(stream) = stream else {
            if !created_here && !self.container_exists(vm).await? {
                return Err(VmmsError::NoSuchVm(name));
            }
            return Ok(Vec::new());
        };
        Ok(self
            .read_file(&name, &stream, max_bytes)
            .await?
            .unwrap_or_default())
    }
}

#[cfg(test)]
#[path = "jobs_tests.rs"]
mod tests;
