//! Where the server address and key come from: `--url`/`--key`, then the
//! environment (`TANGO_URL`/`TANGO_KEY`), then a config file.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Used when nothing names a server: Tango's usual port on this host.
pub const DEFAULT_URL: &str = "http://127.0.0.1:3000";

/// Contents of `config.toml`; every field is optional.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub url: Option<String>,
    pub key: Option<String>,
    /// Image used by `run` and `bench` when `--image` is not given.
    pub image: Option<String>,
    /// A CA certificate trusted for https:// servers (`--ca-cert`).
    pub ca_cert: Option<PathBuf>,
}

/// The settings a command runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub url: String,
    pub key: String,
    pub image: Option<String>,
}

/// `~/.config/tango/config.toml` (or under `$XDG_CONFIG_HOME`).
pub fn default_config_path() -> Option<PathBuf> {
    dirs::config_dir().map(|dir| dir.join("tango").join("config.toml"))
}

/// Reads a config file. A missing default file is no error; a missing file
/// named with `--config` is.
pub fn load_config(explicit: Option<&Path>) -> Result<ConfigFile> {
    let (path, required) = match explicit {
        Some(path) => (path.to_path_buf(), true),
        None => match default_config_path() {
            Some(path) => (path, false),
            None => return Ok(ConfigFile::default()),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            return Ok(ConfigFile::default())
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read config file {}", path.display()))
        }
    };
    toml::from_str(&text).with_context(|| {
        format!(
            "config file {} is not valid (expected e.g. url = \"http://127.0.0.1:3000\" and key = \"...\")",
            path.display()
        )
    })
}

/// Merges command-line/environment values (clap already prefers a flag to
/// its environment variable) over the config file.
pub fn resolve(
    url: Option<String>,
    key: Option<String>,
    image: Option<String>,
    file: ConfigFile,
) -> Result<Settings> {
    let url = url
        .filter(|u| !u.is_empty())
        .or(file.url)
        .unwrap_or_else(|| DEFAULT_URL.to_string());
    let Some(key) = key.filter(|k| !k.is_empty()).or(file.key) else {
        bail!(
            "no key given — set --key, TANGO_KEY, or key = \"...\" in {}",
            default_config_path()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "the config file (--config)".into())
        );
    };
    Ok(Settings {
        url,
        key,
        image: image.filter(|i| !i.is_empty()).or(file.image),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(url: &str, key: &str) -> ConfigFile {
        ConfigFile {
            url: Some(url.into()),
            key: Some(key.into()),
            image: Some("from-file".into()),
            ca_cert: None,
        }
    }

    #[test]
    fn flags_and_env_win_over_the_file() {
        let s = resolve(
            Some("http://flag:1".into()),
            Some("flagkey".into()),
            None,
            file("http://file:2", "filekey"),
        )
        .unwrap();
        assert_eq!(s.url, "http://flag:1");
        assert_eq!(s.key, "flagkey");
        assert_eq!(s.image.as_deref(), Some("from-file"));
    }

    #[test]
    fn the_file_fills_gaps() {
        let s = resolve(None, None, None, file("http://file:2", "filekey")).unwrap();
        assert_eq!(s.url, "http://file:2");
        assert_eq!(s.key, "filekey");
    }

    #[test]
    fn no_key_is_an_error_that_says_where_to_put_one() {
        let err = resolve(None, None, None, ConfigFile::default()).unwrap_err();
        assert!(err.to_string().contains("TANGO_KEY"), "{err}");
        let s = resolve(None, Some("k".into()), None, ConfigFile::default()).unwrap();
        assert_eq!(s.url, DEFAULT_URL);
    }

    #[test]
    fn config_files_parse_and_reject_typos() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "url = \"http://h:9\"\nkey = \"abc\"\n").unwrap();
        let parsed = load_config(Some(&path)).unwrap();
        assert_eq!(parsed.url.as_deref(), Some("http://h:9"));
        assert_eq!(parsed.key.as_deref(), Some("abc"));
        std::fs::write(&path, "ulr = \"http://h:9\"\n").unwrap();
        assert!(load_config(Some(&path)).is_err());
        assert!(load_config(Some(&dir.path().join("missing.toml"))).is_err());
    }
}
