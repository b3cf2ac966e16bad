//! One Docker engine of the fleet: where it is, how it is reached, and the
//! checks a host's settings must pass before tangod talks to it.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// A Docker engine the backend places containers on (`[[docker.hosts]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerHost {
    /// Short name in logs, job records and `tango hosts` (a-z, 0-9, `-`).
    pub name: String,
    /// `unix:///path/to/docker.sock` or `tcp://host:port`.
    pub url: String,
    /// CA that signed the engine's server certificate (mutual TLS).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// This server's client certificate and key, signed by a CA the engine
    /// trusts (`dockerd --tlsverify --tlscacert`).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Allow `tcp://` without TLS (a test rig on a private network only).
    #[serde(default)]
    pub insecure: bool,
    /// Containers this host is meant to hold; placement fills the host with
    /// the most room first.
    #[serde(default = "default_max_vms")]
    pub max_vms: usize,
    /// Reached as `DOCKER_HOST` (and `DOCKER_TLS_VERIFY`, `DOCKER_CERT_PATH`)
    /// say, as before there were hosts: the host of a config without
    /// `[[docker.hosts]]` ([`DockerHost::local`]).
    #[serde(skip)]
    pub from_environment: bool,
}

fn default_max_vms() -> usize {
    8
}

/// The name of the host tangod uses when the config lists none.
pub const LOCAL_HOST: &str = "local";

impl DockerHost {
    /// The local engine as today: `DOCKER_HOST`, else the default socket.
    pub fn local(max_vms: usize) -> DockerHost {
        DockerHost {
            name: LOCAL_HOST.into(),
            url: std::env::var("DOCKER_HOST")
                .unwrap_or_else(|_| "unix:///var/run/docker.sock".into()),
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            insecure: false,
            max_vms,
            from_environment: true,
        }
    }

    /// The TLS files, when all three are given.
    fn tls(&self) -> Option<(&PathBuf, &PathBuf, &PathBuf)> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Some((ca, cert, key)),
            _ => None,
        }
    }

    /// Whether the settings make sense, saying what to fix when not.
    pub fn check(&self) -> Result<(), String> {
        let name = &self.name;
        let named_well = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-');
        if !named_well {
            return Err(format!(
                "docker host name {name:?} must be 1-63 characters of a-z, 0-9 and '-' \
                 (not starting with '-')"
            ));
        }
        if self.max_vms == 0 {
            return Err(format!("docker host {name}: max_vms must be at least 1"));
        }
        if self.from_environment {
            // Whatever DOCKER_HOST says was accepted before hosts existed.
            return Ok(());
        }
        let tls_given = [&self.tls_ca, &self.tls_cert, &self.tls_key]
            .iter()
            .filter(|f| f.is_some())
            .count();
        if tls_given != 0 && tls_given != 3 {
            return Err(format!(
                "docker host {name}: give all of tls_ca, tls_cert and tls_key, or none"
            ));
        }
        if let Some(path) = self.url.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(format!(
                    "docker host {name}: url {:?} names no socket",
                    self.display_url()
                ));
            }
            if tls_given != 0 {
                return Err(format!(
                    "docker host {name}: TLS files are for tcp:// urls, not a unix socket"
                ));
            }
            return Ok(());
        }
        let Some(address) = self.url.strip_prefix("tcp://") else {
            return Err(format!(
                "docker host {name}: url {:?} must start with unix:// or tcp://",
                self.display_url()
            ));
        };
        if address.is_empty() || address.contains('@') || address.contains('/') {
            return Err(format!(
                "docker host {name}: url {:?} must be tcp://HOST:PORT",
                self.display_url()
            ));
        }
        if tls_given == 0 && !self.insecure {
            return Err(format!(
                "docker host {name}: {} has no TLS; a Docker engine's API is root on its \
                 machine, so give tls_ca, tls_cert and tls_key (dockerd --tlsverify), or set \
                 insecure = true for a test rig on a private network",
                self.display_url()
            ));
        }
        Ok(())
    }

    /// The url as logs and `GET /v2/hosts` show it (it never holds secrets:
    /// [`Self::check`] refuses credentials in it).
    pub fn display_url(&self) -> String {
        match self.url.split_once("://") {
            Some((scheme, rest)) => match rest.rsplit_once('@') {
                Some((_, address)) => format!("{scheme}://{address}"),
                None => self.url.clone(),
            },
            None => self.url.clone(),
        }
    }
}

/// Checks every host and that their names are unique.
pub fn check_hosts(hosts: &[DockerHost]) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for host in hosts {
        host.check()?;
        if !seen.insert(host.name.as_str()) {
            return Err(format!(
                "docker host name {:?} is used twice: names must be unique",
                host.name
            ));
        }
    }
    Ok(())
}

/// A client of the engine `host` names (`None`: `DOCKER_HOST` or the local
/// socket, as before there were hosts). Nothing is sent yet.
pub(in crate::docker) fn connect_api(
    host: Option<&DockerHost>,
    timeout: Duration,
) -> Result<bollard::Docker, bollard::errors::Error> {
    let Some(host) = host.filter(|h| !h.from_environment) else {
        return bollard::Docker::connect_with_defaults();
    };
    let secs = timeout.as_secs().max(1);
    let version = bollard::API_DEFAULT_VERSION;
    if host.url.starts_with("unix://") {
        return bollard::Docker::connect_with_unix(&host.url, secs, version);
    }
    match host.tls() {
        Some((ca, cert, key)) => {
            bollard::Docker::connect_with_ssl(&host.url, key, cert, ca, secs, version)
        }
        None => bollard::Docker::connect_with_http(&host.url, secs, version),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, url: &str) -> DockerHost {
        DockerHost {
            name: name.into(),
            url: url.into(),
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            insecure: false,
            max_vms: 4,
            from_environment: false,
        }
    }

    fn with_tls(mut h: DockerHost) -> DockerHost {
        h.tls_ca = Some("/ca.pem".into());
        h.tls_cert = Some("/cert.pem".into());
        h.tls_key = Some("/key.pem".into());
        h
    }

    #[test]
    fn plain_tcp_is_refused_unless_insecure() {
        let plain = host("grader2", "tcp://10.0.0.2:2375");
        let why = plain.check().unwrap_err();
        assert!(why.contains("root on its machine"), "{why}");
        assert!(why.contains("insecure = true"), "{why}");
        let insecure = DockerHost {
            insecure: true,
            ..plain.clone()
        };
        assert_eq!(insecure.check(), Ok(()));
        assert_eq!(with_tls(plain).check(), Ok(()));
    }

    #[test]
    fn tls_files_go_together_and_only_with_tcp() {
        let mut partial = host("g", "tcp://g:2376");
        partial.tls_ca = Some("/ca.pem".into());
        assert!(partial.check().unwrap_err().contains("all of tls_ca"));
        let unix_tls = with_tls(host("g", "unix:///var/run/docker.sock"));
        assert!(unix_tls.check().unwrap_err().contains("tcp://"));
    }

    #[test]
    fn names_and_urls_are_checked() {
        assert_eq!(host("local", "unix:///var/run/docker.sock").check(), Ok(()));
        for bad in ["", "Grader", "a_b", "-a", "a/b", &"x".repeat(64)] {
            assert!(host(bad, "unix:///s").check().is_err(), "{bad:?}");
        }
        for bad in [
            "http://h:1",
            "unix://",
            "tcp://",
            "ssh://h",
            "tcp://u:p@h:1",
        ] {
            let mut h = host("h", bad);
            h.insecure = true;
            assert!(h.check().is_err(), "{bad:?}");
        }
        let mut none = host("h", "unix:///s");
        none.max_vms = 0;
        assert!(none.check().unwrap_err().contains("max_vms"));
    }

    #[test]
    fn the_local_host_takes_docker_host_as_before() {
        // DOCKER_HOST=tcp://... without TLS worked before hosts existed.
        let mut local = DockerHost::local(4);
        local.url = "tcp://127.0.0.1:2375".into();
        assert_eq!(local.check(), Ok(()));
        assert_eq!(local.name, LOCAL_HOST);
    }

    #[test]
    fn names_are_unique() {
        let a = host("a", "unix:///a");
        let b = host("b", "unix:///b");
        assert_eq!(check_hosts(&[a.clone(), b]), Ok(()));
        let why = check_hosts(&[a.clone(), a]).unwrap_err();
        assert!(why.contains("used twice"), "{why}");
    }

    #[test]
    fn display_url_drops_credentials() {
        assert_eq!(
            host("h", "tcp://user:secret@h:2376").display_url(),
            "tcp://h:2376"
        );
        assert_eq!(host("h", "unix:///s").display_url(), "unix:///s");
    }
}
