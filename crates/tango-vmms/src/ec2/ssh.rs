//! SSH to an instance (russh): one connection per VM, one exec channel per
//! command, stdin streamed in, stdout (and stderr) streamed out.

use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{ChannelMsg, Disconnect};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{addr} refused the key for user {user}; check ssh_user, ssh_key and the instance's key pair")]
    AuthRejected { addr: String, user: String },
    #[error("the host key of {addr} changed (was {expected}, now {seen})")]
    HostKeyChanged {
        addr: String,
        expected: String,
        seen: String,
    },
    #[error("ssh to {1}: {0}")]
    Protocol(russh::Error, String),
    #[error("ssh to {addr}: no answer within {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("cannot write the command's output: {0}")]
    Sink(std::io::Error),
}

/// Accepts the first host key a VM shows and only that one afterwards:
/// fresh instances have unknown keys (EC2 prints them only in the console
/// output), but a VM must not change hosts between commands.
struct HostKeyCheck {
    expected: Option<String>,
    seen: Arc<Mutex<Option<String>>>,
}

impl client::Handler for HostKeyCheck {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let fingerprint = key.public_key().fingerprint(HashAlg::Sha256).to_string();
        let accepted = self.expected.as_ref().is_none_or(|e| *e == fingerprint);
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(fingerprint);
        Ok(accepted)
    }
}

/// Where and as whom to log in.
#[derive(Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub key: Arc<PrivateKey>,
}

impl Target {
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

pub struct Session {
    handle: Handle<HostKeyCheck>,
    addr: String,
    /// SHA-256 fingerprint of the host key.
    pub host_key: String,
}

/// How a remote command ended.
#[derive(Debug, Default)]
pub struct Exit {
    /// `None` when the command was killed by a signal (see `signal`) or
    /// the channel closed without a status.
    pub status: Option<u32>,
    pub signal: Option<String>,
    /// The command's stderr (when not merged into the output), at most
    /// [`STDERR_KEEP`] bytes.
    pub stderr: Vec<u8>,
    /// Bytes of output received (written or not: see the cap).
    pub output_bytes: u64,
}

impl Exit {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// The command's stderr, or how it ended, for an error message.
    pub fn describe(&self) -> String {
        let stderr = String::from_utf8_lossy(&self.stderr).trim().to_string();
        let how = match (&self.status, &self.signal) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) => format!("killed by {signal}"),
            (None, None) => "no exit status".to_string(),
        };
        if stderr.is_empty() {
            how
        } else {
            format!("{how}: {stderr}")
        }
    }
}

pub const STDERR_KEEP: usize = 16 << 10;

/// Connects and logs in; `expected_host_key`, when known, must match.
pub async fn connect(
    target: &Target,
    expected_host_key: Option<String>,
    timeout: Duration,
) -> Result<Session, SshError> {
    let addr = target.addr();
    let seen = Arc::new(Mutex::new(None));
    let check = HostKeyCheck {
        expected: expected_host_key.clone(),
        seen: seen.clone(),
    };
    let config = Arc::new(client::Config {
        // A dead instance must not hold a connection forever.
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_max: 4,
        nodelay: true,
        ..Default::default()
    });
    let login = async {
        let mut handle = client::connect(config, (target.host.as_str(), target.port), check)
            .await
            .map_err(|e| {
                let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
                match (&expected_host_key, seen) {
                    (Some(expected), Some(seen)) if *expected != seen => SshError::HostKeyChanged {
                        addr: addr.clone(),
                        expected: expected.clone(),
                        seen,
                    },
                    _ => SshError::Connect {
                        addr: addr.clone(),
                        reason: e.to_string(),
                    },
                }
            })?;
        let hash = if target.key.algorithm().is_rsa() {
            handle
                .best_supported_rsa_hash()
                .await
                .map_err(|e| SshError::Protocol(e, addr.clone()))?
                .flatten()
        } else {
            None
        };
        let auth = handle
            .authenticate_publickey(
                target.user.clone(),
                PrivateKeyWithHashAlg::new(target.key.clone(), hash),
            )
            .await
            .map_err(|e| SshError::Protocol(e, addr.clone()))?;
        if !auth.success() {
            return Err(SshError::AuthRejected {
                addr: addr.clone(),
                user: target.user.clone(),
            });
        }
        let host_key = seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default();
        Ok(Session {
            handle,
            addr: addr.clone(),
            host_key,
        })
    };
    tokio::time::timeout(timeout, login)
        .await
        .map_err(|_| SshError::Timeout {
            addr: addr.clone(),
            after: timeout,
        })?
}

impl Session {
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Runs `command`, feeding it `input` (then EOF) and writing its stdout
    /// to `out` (at most `cap` bytes; the rest is read and dropped). With
    /// `merge_stderr`, stderr goes to `out` too; otherwise its start is
    /// kept in [`Exit::stderr`]. Not bounded in time: callers are.
    pub async fn exec(
        &self,
        command: &str,
        input: Option<tokio::sync::mpsc::Receiver<Vec<u8>>>,
        out: &mut (dyn AsyncWrite + Unpin + Send),
        merge_stderr: bool,
        cap: u64,
    ) -> Result<Exit, SshError> {
        let protocol = |e| SshError::Protocol(e, self.addr.clone());
        let channel = self.handle.channel_open_session().await.map_err(protocol)?;
        channel.exec(true, command).await.map_err(protocol)?;
        let (mut read, write) = channel.split();
        let feed = async {
            // A failed write needs no handling here: the remote command
            // then sees a short input and says so.
            if let Some(mut input) = input {
                while let Some(chunk) = input.recv().await {
                    if write.data(&chunk[..]).await.is_err() {
                        return;
                    }
                }
            }
            let _ = write.eof().await;
        };
        let drain = async {
            let mut exit = Exit::default();
            let mut written: u64 = 0;
            while let Some(message) = read.wait().await {
                let (data, to_out) = match message {
                    ChannelMsg::Data { data } => (data, true),
                    ChannelMsg::ExtendedData { data, .. } => (data, merge_stderr),
                    ChannelMsg::ExitStatus { exit_status } => {
                        exit.status = Some(exit_status);
                        continue;
                    }
                    ChannelMsg::ExitSignal {
                        signal_name,
                        error_message,
                        ..
                    } => {
                        exit.signal = Some(format!("{signal_name:?} {error_message}"));
                        continue;
                    }
                    ChannelMsg::Failure => {
                        return Err(SshError::Connect {
                            addr: self.addr.clone(),
                            reason: "the server refused to run the command".into(),
                        });
                    }
                    ChannelMsg::Close => break,
                    _ => continue,
                };
                if to_out {
                    exit.output_bytes += data.len() as u64;
                    let room = cap.saturating_sub(written).min(data.len() as u64) as usize;
                    if room > 0 {
                        out.write_all(&data[..room]).await.map_err(SshError::Sink)?;
                        written += room as u64;
                    }
                } else {
                    let room = STDERR_KEEP
                        .saturating_sub(exit.stderr.len())
                        .min(data.len());
                    exit.stderr.extend_from_slice(&data[..room]);
                }
            }
            out.flush().await.map_err(SshError::Sink)?;
            Ok(exit)
        };
        let ((), exit) = tokio::join!(feed, drain);
        exit
    }

    /// Runs `command` with `input` as its whole stdin; its stdout, at most
    /// `cap` bytes, and how it ended.
    pub async fn run(
        &self,
        command: &str,
        input: Option<Vec<u8>>,
        cap: u64,
    ) -> Result<(Vec<u8>, Exit), SshError> {
        let input = input.map(|bytes| {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            // Capacity 1: this first send cannot wait.
            let _ = tx.try_send(bytes);
            rx
        });
        let mut stdout = Vec::new();
        let exit = self.exec(command, input, &mut stdout, false, cap).await?;
        Ok((stdout, exit))
    }

    pub async fn close(&self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await;
    }
}

/// `s` as one word for a POSIX shell.
pub fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quoting() {
        assert_eq!(quote("abc/d-e.f"), "abc/d-e.f");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote("$(x)"), "'$(x)'");
    }
}
