//! The SSH side of an instance: waiting until it runs and SSH answers,
//! its connection (made again when it drops, same host key), preparing it
//! once (the autodriver in place, the grading user, `unshare`), and short
//! commands as root.

use super::{api, ssh, ssh_error, Ec2, Prepared};
use std::sync::Arc;
use std::time::Duration;
use tango_core::model::Machine;
use tango_core::vmms::VmmsError;
use tokio::time::Instant;

/// `user` is a `UID[:GID]`, not a name to look up.
fn is_numeric_user(user: &str) -> bool {
    user.split(':')
        .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
}

/// The grading uid must not be the SSH user's: after every job the
/// autodriver kills every process of the grading uid, the backend's own
/// session included, and deletes its files (e.g. `authorized_keys`). On an
/// AMI without an `autograde` user the fallback `1000:1000` is often the
/// SSH user (`ubuntu`, `admin`, `ec2-user`).
fn check_grading_uid(
    grader_uid: Option<u32>,
    ssh_uid: Option<u32>,
    grading_user: &str,
    ssh_user: &str,
) -> Result<(), VmmsError> {
    match (grader_uid, ssh_uid) {
        (Some(grader), Some(ssh)) if grader == ssh => Err(VmmsError::Backend(format!(
            "ec2: the grading user {grading_user} (uid {grader}) is the SSH user {ssh_user}: \
             jobs would kill the backend's session and delete its files; give the AMI an \
             `autograde` user or set [ec2] fallback_user to an unused uid"
        ))),
        _ => Ok(()),
    }
}

impl Ec2 {
    /// `script` as the remote command, run by `sh` as root.
    pub(super) fn remote(&self, script: &str) -> String {
        let sh = format!("sh -c {}", ssh::quote(script));
        if self.config.ssh_user == "root" {
            sh
        } else {
            format!("sudo -n {sh}")
        }
    }

    fn target(&self, host: String) -> ssh::Target {
        ssh::Target {
            host,
            port: self.config.ssh_port,
            user: self.config.ssh_user.clone(),
            key: self.ssh_key.clone(),
        }
    }

    /// Waits until the instance runs and SSH answers, then prepares it.
    async fn wait_ready(
        &self,
        vm: &Machine,
        deadline: Instant,
        max: Duration,
    ) -> Result<(), VmmsError> {
        let ids = self.instance_ids(vm, &api::LIVE_STATES).await?;
        let id = ids
            .first()
            .cloned()
            .ok_or_else(|| VmmsError::NoSuchVm(vm.name.clone()))?;
        let address = loop {
            if let Some(address) = self.running_address(vm, &id).await? {
                break address;
            }
            if Instant::now() + self.config.poll_interval >= deadline {
                return Err(VmmsError::Backend(format!(
                    "ec2: instance {id} of {} was not running within {max:?}",
                    vm.name
                )));
            }
            // EC2 has no push notification of state changes to wait on.
            tokio::time::sleep(self.config.poll_interval).await;
        };
        self.with_state(&vm.name, |s| {
            s.instance_id = Some(id.clone());
            s.address = Some(address.clone());
        });
        let target = self.target(address);
        let session = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt =
                ssh::connect(&target, None, left.min(self.config.ssh_connect_timeout)).await;
            match attempt {
                Ok(session) => break session,
                Err(e) => {
                    // sshd starts late in a boot, and cloud-init installs
                    // the key even later: every failure may pass.
                    if Instant::now() + self.config.poll_interval >= deadline {
                        return Err(VmmsError::Backend(format!(
                            "ec2: SSH on instance {id} of {} did not answer within {max:?} (last: {e}); check the security group allows port {} from this host, ssh_user and the key pair",
                            vm.name, self.config.ssh_port
                        )));
                    }
                    tokio::time::sleep(self.config.poll_interval).await;
                }
            }
        };
        let session = Arc::new(session);
        self.with_state(&vm.name, |s| {
            s.host_key = Some(session.host_key.clone());
            s.session = Some(session.clone());
        });
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, self.prepare(vm, &session))
            .await
            .map_err(|_| {
                VmmsError::Backend(format!(
                    "ec2: preparing instance {id} of {} took longer than {max:?}",
                    vm.name
                ))
            })??;
        Ok(())
    }

    pub(super) async fn wait_or_terminate(
        &self,
        vm: &Machine,
        max: Duration,
    ) -> Result<(), VmmsError> {
        // The engine bounds this call by `max` as well: keep time to
        // terminate the instance within it, so a failed VM costs nothing.
        let reserve = (max / 5).min(Duration::from_secs(20));
        let deadline = Instant::now() + max.saturating_sub(reserve);
        let waited =
            match tokio::time::timeout_at(deadline, self.wait_ready(vm, deadline, max)).await {
                Ok(result) => result,
                Err(_) => Err(VmmsError::Backend(format!(
                    "ec2: {} was not ready within {max:?}",
                    vm.name
                ))),
            };
        let Err(error) = waited else {
            return Ok(());
        };
        let terminated =
            tokio::time::timeout(reserve.max(Duration::from_secs(1)), self.terminate(vm)).await;
        let outcome = match terminated {
            Ok(Ok(ids)) if ids.is_empty() => "no instance to terminate".to_string(),
            Ok(Ok(ids)) => format!("terminated {}", ids.join(", ")),
            Ok(Err(e)) => format!("terminating it failed too: {e}"),
            Err(_) => "terminating it timed out (the orphan sweep retries)".to_string(),
        };
        tracing::warn!(vm = %vm.name, "{error}; {outcome}");
        Err(match error {
            VmmsError::Unavailable(message) => {
                VmmsError::Unavailable(format!("{message}; {outcome}"))
            }
            VmmsError::NoSuchVm(name) => VmmsError::NoSuchVm(name),
            other => VmmsError::Backend(format!("{other}; {outcome}")),
        })
    }

    /// Probes the instance (autodriver, grading user, unshare) and copies
    /// the autodriver in when it lacks it. Once per VM.
    async fn prepare(&self, vm: &Machine, session: &ssh::Session) -> Result<Prepared, VmmsError> {
        if let Some(prepared) = self.with_state(&vm.name, |s| s.prepared.clone()) {
            return Ok(prepared);
        }
        let autodriver = ssh::quote(&self.config.remote_autodriver);
        let user = &self.config.grading_user;
        let user_check = if is_numeric_user(user) {
            "echo user=given".to_string()
        } else {
            format!(
                "if id -u {} >/dev/null 2>&1; then echo user=yes; else echo user=no; fi",
                ssh::quote(user)
            )
        };
        let grader_uid = if is_numeric_user(user) {
            String::new()
        } else {
            format!(
                "echo grader_uid=$(id -u {} 2>/dev/null)\n",
                ssh::quote(user)
            )
        };
        let script = format!(
            "umask 077; mkdir -p {dir} || exit 1\n\
             if [ -x {autodriver} ]; then echo autodriver=yes; else echo autodriver=no; fi\n\
             {user_check}\n{grader_uid}\
             echo ssh_uid=${{SUDO_UID:-$(id -u)}}\n\
             if command -v unshare >/dev/null 2>&1; then echo unshare=yes; else echo unshare=no; fi\n",
            dir = ssh::quote(&self.vm_dir(vm)),
        );
        let (stdout, exit) = self.command(vm, session, &script, None, 4096).await?;
        if !exit.success() {
            return Err(VmmsError::Backend(format!(
                "ec2: cannot prepare {} ({}); as {}, commands run {}",
                vm.name,
                exit.describe(),
                self.config.ssh_user,
                if self.config.ssh_user == "root" {
                    "directly"
                } else {
                    "with sudo -n, which must not ask for a password"
                }
            )));
        }
        let probe = String::from_utf8_lossy(&stdout);
        let has = |line: &str| probe.lines().any(|l| l.trim() == line);
        if has("autodriver=no") {
            let script = format!(
                "set -e; umask 022; mkdir -p \"$(dirname {autodriver})\"; \
                 tmp={autodriver}.upload.$$; cat > \"$tmp\"; chmod 0755 \"$tmp\"; mv -f \"$tmp\" {autodriver}"
            );
            let (_, exit) = self
                .command(vm, session, &script, Some(self.autodriver.to_vec()), 0)
                .await?;
            if !exit.success() {
                return Err(VmmsError::Backend(format!(
                    "ec2: cannot copy the autodriver to {} on {} ({})",
                    self.config.remote_autodriver,
                    vm.name,
                    exit.describe()
                )));
            }
        }
        let user = if has("user=no") {
            self.config.fallback_user.clone()
        } else {
            self.config.grading_user.clone()
        };
        let value = |key: &str| {
            probe
                .lines()
                .find_map(|l| l.trim().strip_prefix(key))
                .and_then(|v| v.parse::<u32>().ok())
        };
        let grader_uid = if is_numeric_user(&user) {
            user.split(':').next().and_then(|uid| uid.parse().ok())
        } else {
            value("grader_uid=")
        };
        check_grading_uid(grader_uid, value("ssh_uid="), &user, &self.config.ssh_user)?;
        let prepared = Prepared {
            user,
            has_unshare: has("unshare=yes"),
        };
        self.with_state(&vm.name, |s| s.prepared = Some(prepared.clone()));
        Ok(prepared)
    }

    /// A short command as root, bounded by `ssh_command_timeout`.
    pub(super) async fn command(
        &self,
        vm: &Machine,
        session: &ssh::Session,
        script: &str,
        input: Option<Vec<u8>>,
        cap: u64,
    ) -> Result<(Vec<u8>, ssh::Exit), VmmsError> {
        let limit = self.config.ssh_command_timeout;
        tokio::time::timeout(limit, session.run(&self.remote(script), input, cap))
            .await
            .map_err(|_| {
                VmmsError::Backend(format!(
                    "ec2: a command on {} did not finish within {limit:?}",
                    vm.name
                ))
            })?
            .map_err(|e| ssh_error(&vm.name, "command on", e))
    }

    /// The VM's SSH connection, made again if it dropped, and the VM
    /// prepared.
    pub(super) async fn session(
        &self,
        vm: &Machine,
    ) -> Result<(Arc<ssh::Session>, Prepared), VmmsError> {
        let (cached, address, host_key) = self.with_state(&vm.name, |s| {
            (s.session.clone(), s.address.clone(), s.host_key.clone())
        });
        let session = match cached.filter(|s| !s.is_closed()) {
            Some(session) => session,
            None => {
                let address = match address {
                    Some(address) => address,
                    None => {
                        let ids = self.instance_ids(vm, &api::LIVE_STATES).await?;
                        let id = ids
                            .first()
                            .ok_or_else(|| VmmsError::NoSuchVm(vm.name.clone()))?;
                        self.running_address(vm, id).await?.ok_or_else(|| {
                            VmmsError::Backend(format!(
                                "ec2: instance {id} of {} is not running yet",
                                vm.name
                            ))
                        })?
                    }
                };
                let session = ssh::connect(
                    &self.target(address.clone()),
                    host_key,
                    self.config.ssh_connect_timeout,
                )
                .await
                .map_err(|e| ssh_error(&vm.name, "cannot reach", e))?;
                let session = Arc::new(session);
                self.with_state(&vm.name, |s| {
                    s.address = Some(address);
                    s.host_key = Some(session.host_key.clone());
                    s.session = Some(session.clone());
                });
                session
            }
        };
        let prepared = self.prepare(vm, &session).await?;
        Ok((session, prepared))
    }

    /// The autodriver cleaned up after the job and every copy-in starts
    /// afresh; what is left to check is that the instance still answers
    /// (a spot instance may have been reclaimed). A VM launched with a
    /// job's credentials is refused: it serves that job only, and the
    /// engine destroys a VM it cannot reset.
    pub(super) async fn check_reusable(&self, vm: &Machine) -> Result<(), VmmsError> {
        if vm.credentials.is_some() {
            return Err(VmmsError::Backend(format!(
                "{} runs in a job's own AWS account: it is not reused",
                vm.name
            )));
        }
        // The next job may be asked for partial output before its copy-in:
        // the stream file still holds this job's until its run starts.
        self.with_state(&vm.name, |s| s.run_started = false);
        self.session(vm).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_users() {
        assert!(is_numeric_user("1000:1000"));
        assert!(is_numeric_user("64123"));
        assert!(!is_numeric_user("autograde"));
        assert!(!is_numeric_user("1000:"));
    }

    #[test]
    fn the_grading_uid_must_not_be_the_ssh_users() {
        assert!(check_grading_uid(Some(1000), Some(1000), "1000:1000", "ubuntu").is_err());
        assert!(check_grading_uid(Some(1001), Some(1000), "autograde", "ubuntu").is_ok());
        // Unknown on either side: nothing to compare.
        assert!(check_grading_uid(None, Some(1000), "autograde", "ubuntu").is_ok());
        assert!(check_grading_uid(Some(1000), None, "1000:1000", "root").is_ok());
    }
}
