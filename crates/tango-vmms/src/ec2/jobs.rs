//! A job on an instance: its input files (with the run, through the
//! autodriver's stdin, or unpacked by `tar` at copy-in), its run over SSH
//! (in a network namespace of its own when asked), its output on the host,
//! and its partial output.

use super::{archive, path_safe, ssh, ssh_error, Ec2};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tango_core::model::{InputFile, Machine};
use tango_core::vmms::{RunOutcome, RunRequest, RunStatus, VmmsError};

/// How long past the job's own time limit the backend waits for the
/// autodriver to report (it kills the job at the limit, then cleans up).
const RUN_GRACE: Duration = Duration::from_secs(60);
/// Bytes of autodriver output kept on the host beyond the job's output cap
/// (its header line and its own error messages).
const OUTPUT_SLACK: u64 = 1 << 20;
/// Input files up to this size (in all) go to the instance with the run
/// itself, through the stdin of the autodriver (`--input-tar -`): each
/// SSH exec costs a round trip and sshd's session setup (~130 ms on
/// loopback here). Larger inputs are unpacked by `tar` at copy-in, so
/// their transfer does not count against the job's run time.
const STDIN_INPUT_MAX_BYTES: u64 = 8 << 20;
/// The autodriver's tar reader takes names under 100 bytes only.
const STDIN_INPUT_MAX_NAME: usize = 99;

impl Ec2 {
    pub(super) async fn copy_inputs(
        &self,
        vm: &Machine,
        files: &[InputFile],
    ) -> Result<(), VmmsError> {
        let pairs: Vec<(String, PathBuf)> = files
            .iter()
            .map(|f| (f.dest_file.clone(), f.path.clone()))
            .collect();
        if let Some((bad, _)) = pairs
            .iter()
            .find(|(name, _)| !archive::is_plain_file_name(name))
        {
            return Err(VmmsError::Backend(format!(
                "input file name {bad:?} is not a plain file name"
            )));
        }
        self.with_state(&vm.name, |s| {
            s.pending_job_dir = None;
            s.pending_input = None;
            s.run_started = false;
        });
        let job = format!("{}/job", self.vm_dir(vm));
        let dir = format!("{job}/autolab");
        let mut total: u64 = 0;
        for (_, path) in &pairs {
            let meta = tokio::fs::metadata(path)
                .await
                .map_err(|e| VmmsError::io(format!("cannot read {}", path.display()), e))?;
            if !meta.is_file() {
                return Err(VmmsError::Backend(format!(
                    "input file {} is not a regular file",
                    path.display()
                )));
            }
            total = total.saturating_add(meta.len());
        }
        let short_names = pairs
            .iter()
            .all(|(name, _)| name.len() <= STDIN_INPUT_MAX_NAME);
        if short_names && total <= STDIN_INPUT_MAX_BYTES {
            self.with_state(&vm.name, |s| {
                s.pending_job_dir = Some(dir);
                s.pending_input = Some(pairs);
            });
            return Ok(());
        }
        let (session, _) = self.session(vm).await?;
        // Every copy-in starts from an empty directory: nothing of an
        // earlier job can leak into this one.
        let script = format!(
            "set -e; rm -rf {job}; mkdir -p -m 0700 {job}; mkdir -m 0755 {dir}; tar -x -f - -C {dir}",
            job = ssh::quote(&job),
            dir = ssh::quote(&dir),
        );
        let (chunks, packer) = archive::pack(pairs);
        let limit = self.config.ssh_command_timeout;
        let command = self.remote(&script);
        let sent = tokio::time::timeout(
            limit,
            session.exec(&command, Some(chunks), &mut tokio::io::sink(), false, 0),
        )
        .await;
        let packed = packer
            .await
            .map_err(|e| VmmsError::Backend(format!("packing the input files failed: {e}")))?;
        let exit = match sent {
            Err(_) => {
                return Err(VmmsError::Backend(format!(
                    "ec2: copying the input files into {} took longer than {limit:?}",
                    vm.name
                )))
            }
            Ok(Err(e)) => return Err(ssh_error(&vm.name, "cannot copy the input files into", e)),
            Ok(Ok(exit)) => exit,
        };
        match packed {
            Ok(()) => {}
            // The remote side stopped reading: its error says why.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe && !exit.success() => {}
            Err(e) => return Err(VmmsError::io("cannot pack the input files", e)),
        }
        if !exit.success() {
            return Err(VmmsError::Backend(format!(
                "ec2: unpacking the input files on {} failed ({})",
                vm.name,
                exit.describe()
            )));
        }
        self.with_state(&vm.name, |s| s.pending_job_dir = Some(dir));
        Ok(())
    }

    pub(super) async fn run(
        &self,
        vm: &Machine,
        req: &RunRequest,
    ) -> Result<RunOutcome, VmmsError> {
        let (job_dir, input) = self.with_state(&vm.name, |s| {
            (s.pending_job_dir.take(), s.pending_input.take())
        });
        let job_dir = job_dir.ok_or_else(|| {
            VmmsError::Backend(format!("run_job on {} without copy_in before it", vm.name))
        })?;
        let (session, prepared) = self.session(vm).await?;
        let vm_dir = self.vm_dir(vm);
        let summary_path = format!("{vm_dir}/summary.json");
        let stream_path = format!("{vm_dir}/stream");
        let mut args = req.autodriver_args(&prepared.user, &summary_path, &job_dir);
        let dir_arg = args.pop().unwrap_or_else(|| job_dir.clone());
        args.extend(["--stream".to_string(), stream_path]);
        if let Some(home) = &self.config.grading_home {
            args.extend(["--home".to_string(), home.clone()]);
        }
        if input.is_some() {
            args.extend(["--input-tar".to_string(), "-".to_string()]);
        }
        args.push(dir_arg);
        let mut words = vec![ssh::quote(&self.config.remote_autodriver)];
        words.extend(args.iter().map(|a| ssh::quote(a)));
        let autodriver = words.join(" ");
        // With the files on stdin the autodriver makes the job directory;
        // nothing of an earlier job may be in it.
        let clear = match input {
            Some(_) => {
                let job = job_dir.strip_suffix("/autolab").unwrap_or(&job_dir);
                format!("rm -rf {} || exit 3; ", ssh::quote(job))
            }
            None => String::new(),
        };
        let script = if req.disable_network && self.config.isolate_network {
            if !prepared.has_unshare {
                return Err(VmmsError::Backend(format!(
                    "ec2: the job needs its network disabled, but {} has no `unshare` (util-linux); install it in the AMI or set isolate_network = false",
                    vm.name
                )));
            }
            // A new network namespace has only a loopback device, down.
            let inner = format!("ip link set lo up 2>/dev/null; exec {autodriver}");
            format!("{clear}exec unshare --net -- sh -c {}", ssh::quote(&inner))
        } else {
            format!("{clear}exec {autodriver}")
        };

        let output_path = self
            .config
            .work_dir
            .join(format!("{}.out", path_safe(&vm.name)));
        let mut output = tokio::fs::File::create(&output_path)
            .await
            .map_err(|e| VmmsError::io(format!("cannot create {}", output_path.display()), e))?;
        self.with_state(&vm.name, |s| {
            s.output = Some(output_path.clone());
            s.run_started = true;
        });
        let cap = req.output_cap_bytes.saturating_add(OUTPUT_SLACK);
        let command = self.remote(&script);
        let (chunks, packer) = match input {
            Some(files) => {
                let (chunks, packer) = archive::pack(files);
                (Some(chunks), Some(packer))
            }
            None => (None, None),
        };
        let run = session.exec(&command, chunks, &mut output, true, cap);
        let exit = match (req.timeout_secs > 0)
            .then(|| Duration::from_secs(req.timeout_secs) + RUN_GRACE)
        {
            Some(bound) => tokio::time::timeout(bound, run).await.map_err(|_| {
                VmmsError::Backend(format!(
                    "ec2: the autodriver on {} did not finish within {bound:?}",
                    vm.name
                ))
            })?,
            None => run.await,
        }
        .map_err(|e| ssh_error(&vm.name, "the job's connection to", e))?;
        if let Some(packer) = packer {
            match packer.await {
                Ok(Ok(())) => {}
                // The autodriver stopped reading (it reports why).
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                Ok(Err(e)) => return Err(VmmsError::io("cannot pack the input files", e)),
                Err(e) => {
                    return Err(VmmsError::Backend(format!(
                        "packing the input files failed: {e}"
                    )))
                }
            }
        }
        let exit_code = exit.status.and_then(|code| i32::try_from(code).ok());
        let status = RunStatus::from_exit_code(exit_code);
        // The autodriver writes the summary when it ran the job (exit 0 or
        // 2); otherwise the file may be an earlier job's.
        let ran = matches!(status, RunStatus::Completed | RunStatus::TimedOut);
        let summary = if self.config.read_summary && ran {
            let script = format!("cat {}", ssh::quote(&summary_path));
            match self.command(vm, &session, &script, None, 1 << 20).await {
                Ok((bytes, exit)) if exit.success() => serde_json::from_slice(&bytes).ok(),
                _ => None,
            }
        } else {
            None
        };
        let mut notes = Vec::new();
        if let Some(signal) = exit.signal {
            notes.push(format!(
                "The autodriver was killed on the instance ({signal})"
            ));
        }
        Ok(RunOutcome {
            status,
            exit_code,
            summary,
            notes,
        })
    }

    pub(super) async fn copy_output(&self, vm: &Machine, dest: &Path) -> Result<(), VmmsError> {
        let output = self.with_state(&vm.name, |s| s.output.clone());
        crate::output_file::copy_last_output(output, &vm.name, dest).await
    }

    pub(super) async fn read_partial_output(
        &self,
        vm: &Machine,
        max_bytes: usize,
    ) -> Result<Vec<u8>, VmmsError> {
        // Until the job's autodriver runs (and empties it) the stream file
        // may hold an earlier job's output.
        if !self.with_state(&vm.name, |s| s.run_started) {
            return Ok(Vec::new());
        }
        let (session, _) = self.session(vm).await?;
        let stream = format!("{}/stream", self.vm_dir(vm));
        let script = format!(
            "head -c {max_bytes} {} 2>/dev/null || true",
            ssh::quote(&stream)
        );
        let (bytes, _) = self
            .command(vm, &session, &script, None, max_bytes as u64)
            .await?;
        Ok(bytes)
    }
}
