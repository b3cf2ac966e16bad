//! The grading user, from `--user` and a hand-parsed /etc/passwd (no NSS, so
//! static binaries work in any image and a bare numeric uid needs no entry).

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GradingUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 7 || fields[0].is_empty() || fields[0].starts_with('#') {
                return None;
            }
            Some(PasswdEntry {
                name: fields[0].to_string(),
                uid: fields[2].parse().ok()?,
                gid: fields[3].parse().ok()?,
                home: fields[5].to_string(),
            })
        })
        .collect()
}

fn usable_home(home: &str) -> Option<PathBuf> {
    let path = Path::new(home);
    (path.is_absolute() && path != Path::new("/")).then(|| path.to_path_buf())
}

#[derive(Debug)]
pub enum ResolveError {
    /// A well-formed name that the image does not know.
    Unknown(String),
    /// A malformed or forbidden `--user`.
    Invalid(String),
}

/// Resolves `--user` against the text of /etc/passwd (empty when missing).
pub fn resolve(
    spec: &str,
    passwd: &str,
    home_override: Option<&Path>,
) -> Result<GradingUser, ResolveError> {
    use ResolveError::{Invalid, Unknown};
    let entries = parse_passwd(passwd);
    let numeric = spec.split_once(':').map_or(spec, |(uid, _)| uid);
    let user = if !numeric.is_empty() && numeric.bytes().all(|b| b.is_ascii_digit()) {
        let uid: u32 = numeric
            .parse()
            .map_err(|_| Invalid(format!("invalid uid in --user {spec:?}")))?;
        let explicit_gid = match spec.split_once(':') {
            Some((_, gid)) => Some(
                gid.parse::<u32>()
                    .map_err(|_| Invalid(format!("invalid gid in --user {spec:?}")))?,
            ),
            None => None,
        };
        match entries.iter().find(|e| e.uid == uid) {
            Some(entry) => GradingUser {
                name: entry.name.clone(),
                uid,
                gid: explicit_gid.unwrap_or(entry.gid),
                home: usable_home(&entry.home)
                    .unwrap_or_else(|| PathBuf::from(format!("/home/{}", entry.name))),
            },
            None => GradingUser {
                name: crate::cli::DEFAULT_USER.to_string(),
                uid,
                gid: explicit_gid.unwrap_or(uid),
                home: PathBuf::from(format!("/home/{}", crate::cli::DEFAULT_USER)),
            },
        }
    } else {
        if spec.contains(':') || spec.contains('/') {
            return Err(Invalid(format!(
                "invalid --user {spec:?}: expected NAME or UID[:GID]"
            )));
        }
        let entry = entries
            .iter()
            .find(|e| e.name == spec)
            .ok_or_else(|| Unknown(format!("grading user {spec:?} is not in /etc/passwd")))?;
        GradingUser {
            name: entry.name.clone(),
            uid: entry.uid,
            gid: entry.gid,
            home: usable_home(&entry.home)
                .unwrap_or_else(|| PathBuf::from(format!("/home/{}", entry.name))),
        }
    };
    let mut user = user;
    if let Some(home) = home_override {
        user.home = home.to_path_buf();
    }
    if user.uid == 0 || user.gid == 0 {
        return Err(Invalid(
            "the grading user must not be root (uid 0 or gid 0)".into(),
        ));
    }
    Ok(user)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/bash
# a comment
autograde:x:1001:1002:Grader:/home/autograde:/bin/bash
odd:x:1005:1005::relative:/bin/sh
broken line
";

    #[test]
    fn by_name() {
        let u = resolve("autograde", PASSWD, None).unwrap();
        assert_eq!(
            (u.uid, u.gid, u.home.to_str()),
            (1001, 1002, Some("/home/autograde"))
        );
        let u = resolve("odd", PASSWD, None).unwrap();
        assert_eq!(u.home, PathBuf::from("/home/odd"));
        assert!(resolve("nobody-here", PASSWD, None).is_err());
        assert!(resolve("root", PASSWD, None).is_err());
    }

    #[test]
    fn by_number() {
        let u = resolve("1001", PASSWD, None).unwrap();
        assert_eq!((u.name.as_str(), u.gid), ("autograde", 1002));
        let u = resolve("1001:5", PASSWD, None).unwrap();
        assert_eq!(u.gid, 5);
        let u = resolve("64000", "", None).unwrap();
        assert_eq!(
            (u.uid, u.gid, u.home.to_str()),
            (64000, 64000, Some("/home/autograde"))
        );
        let u = resolve("64000:7", "", Some(Path::new("/x/h"))).unwrap();
        assert_eq!((u.gid, u.home.to_str()), (7, Some("/x/h")));
        assert!(resolve("0", "", None).is_err());
        assert!(resolve("5:0", "", None).is_err());
        assert!(resolve("5:x", "", None).is_err());
        assert!(resolve("99999999999", "", None).is_err());
    }
}
