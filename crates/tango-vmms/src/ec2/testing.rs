//! Test fixtures for the ec2 backend, shared by this crate's and tangod's
//! tests: moto's EC2 server and a local sshd standing in for instances,
//! both on loopback. Not part of the API.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tango_core::model::CloudCredentials;

/// The keys the tests give the server; moto takes any.
pub fn server_credentials() -> CloudCredentials {
    CloudCredentials {
        access_key_id: "testing".into(),
        secret_access_key: "testing".into(),
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn wait_for_port(port: u16, child: &mut Child, what: &str, log: &Path) -> Result<(), String> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "{what} exited with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{what} did not listen on port {port} within 30 s"))
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Result<Scratch, String> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tango-ec2-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// moto's server (`pip install 'moto[server]'`) on a loopback port.
pub struct Moto {
    child: Child,
    pub endpoint: String,
    _dir: Scratch,
}

impl Moto {
    /// Starts `moto_server` (or `python3 -m moto.server`); an error says
    /// why it could not.
    pub fn start() -> Result<Moto, String> {
        let dir = Scratch::new("moto")?;
        let port = free_port()?;
        let log = dir.0.join("moto.log");
        let mut last = String::new();
        for program in [
            vec!["moto_server".to_string()],
            vec!["python3".into(), "-m".into(), "moto.server".into()],
        ] {
            let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
            let spawned = Command::new(&program[0])
                .args(&program[1..])
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                // moto must never look for real AWS settings.
                .env("AWS_EC2_METADATA_DISABLED", "true")
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log_file))
                .spawn();
            let mut child = match spawned {
                Ok(child) => child,
                Err(e) => {
                    last = format!("{}: {e}", program.join(" "));
                    continue;
                }
            };
            match wait_for_port(port, &mut child, "moto", &log) {
                Ok(()) => {
                    return Ok(Moto {
                        child,
                        endpoint: format!("http://127.0.0.1:{port}"),
                        _dir: dir,
                    })
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = e;
                }
            }
        }
        Err(format!(
            "cannot start moto ({last}); install it with `pip install 'moto[server]'`"
        ))
    }

    /// A raw API call to moto signed "by" `access_key_id` (moto reads the
    /// key from the Authorization header to pick the account; it checks no
    /// signature). Returns the response body.
    pub fn call(
        &self,
        service: &str,
        access_key_id: &str,
        form: &[(&str, &str)],
    ) -> Result<String, String> {
        let body: String = form
            .iter()
            .map(|(k, v)| format!("{}={}", url_encode(k), url_encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let host = self.endpoint.trim_start_matches("http://");
        let request = format!(
            "POST / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
             X-Amz-Date: 20250101T000000Z\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential={access_key_id}/20250101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=00\r\n\r\n{body}",
            body.len()
        );
        let mut stream = TcpStream::connect(host).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(request.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .map_err(|e| e.to_string())?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            return Err(format!("moto answered {head}: {body}"));
        }
        Ok(body.to_string())
    }

    /// Credentials of another account (`account`, 12 digits): moto keeps
    /// a separate EC2 state for keys that STS handed out for a role there.
    pub fn account_credentials(&self, account: &str) -> Result<CloudCredentials, String> {
        let role = format!("arn:aws:iam::{account}:role/tango-test");
        let body = self.call(
            "sts",
            "testing",
            &[
                ("Action", "AssumeRole"),
                ("Version", "2011-06-15"),
                ("RoleArn", &role),
                ("RoleSessionName", "tango-test"),
            ],
        )?;
        let field = |name: &str| {
            let open = format!("<{name}>");
            let close = format!("</{name}>");
            body.split_once(&open)
                .and_then(|(_, rest)| rest.split_once(&close))
                .map(|(value, _)| value.to_string())
                .ok_or_else(|| format!("no {name} in moto's AssumeRole answer: {body}"))
        };
        Ok(CloudCredentials {
            access_key_id: field("AccessKeyId")?,
            secret_access_key: field("SecretAccessKey")?,
        })
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An sshd on a loopback port accepting a generated key for root: this
/// host standing in for the instances.
pub struct Sshd {
    child: Option<Child>,
    pub port: u16,
    /// The private key sshd accepts.
    pub client_key: PathBuf,
    dir: Scratch,
}

impl Sshd {
    /// Starts `/usr/sbin/sshd` (`apt-get install openssh-server`) as root;
    /// an error says why it could not.
    pub fn start() -> Result<Sshd, String> {
        let sshd = Path::new("/usr/sbin/sshd");
        if !sshd.is_file() {
            return Err(
                "no /usr/sbin/sshd; install it with `apt-get install openssh-server`".into(),
            );
        }
        if unsafe { libc::geteuid() } != 0 {
            return Err("sshd standing in for instances must run as root".into());
        }
        let dir = Scratch::new("sshd")?;
        for key in ["host_key", "client_key"] {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "tango-test", "-f"])
                .arg(dir.0.join(key))
                .stdin(Stdio::null())
                .status()
                .map_err(|e| format!("cannot run ssh-keygen: {e}"))?;
            if !status.success() {
                return Err(format!("ssh-keygen failed: {status}"));
            }
        }
        std::fs::copy(dir.0.join("client_key.pub"), dir.0.join("authorized_keys"))
            .map_err(|e| e.to_string())?;
        // sshd's privilege separation directory (made by its init script,
        // which does not run here).
        std::fs::create_dir_all("/run/sshd")
            .map_err(|e| format!("cannot create /run/sshd: {e}"))?;
        let port = free_port()?;
        let config = dir.0.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
                 PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 UsePAM no\nStrictModes no\nMaxStartups 100:30:200\nMaxSessions 100\nLogLevel ERROR\n",
                d = dir.0.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let log = dir.0.join("sshd.log");
        let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let mut child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .map_err(|e| format!("cannot start sshd: {e}"))?;
        if let Err(e) = wait_for_port(port, &mut child, "sshd", &log) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(Sshd {
            child: Some(child),
            port,
            client_key: dir.0.join("client_key"),
            dir,
        })
    }

    /// A scratch directory of this fixture (removed with it).
    pub fn scratch(&self, name: &str) -> PathBuf {
        let path = self.dir.0.join(name);
        let _ = std::fs::create_dir_all(&path);
        path
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}
