//! Validation of names that arrive from the network and end up in paths.

use std::fmt;

/// Why a name from a request was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidName {
    pub what: &'static str,
    pub reason: &'static str,
}

impl fmt::Display for InvalidName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.what, self.reason)
    }
}

impl std::error::Error for InvalidName {}

/// Longest name accepted for any single path component.
pub const MAX_NAME_BYTES: usize = 255;

/// Checks that `name` is a single, harmless path component: not empty, at
/// most 255 bytes, no `/`, no NUL, not `.` or `..`.
pub fn check_component(what: &'static str, name: &str) -> Result<(), InvalidName> {
    let fail = |reason| Err(InvalidName { what, reason });
    if name.is_empty() {
        return fail("it is empty");
    }
    if name.len() > MAX_NAME_BYTES {
        return fail("it is longer than 255 bytes");
    }
    if name == "." || name == ".." {
        return fail("it may not be '.' or '..'");
    }
    if name.contains('/') {
        return fail("it may not contain '/'");
    }
    if name.contains('\\') {
        return fail("it may not contain '\\'");
    }
    if name.bytes().any(|b| b == 0 || b.is_ascii_control()) {
        return fail("it may not contain NUL or control characters");
    }
    Ok(())
}

/// Whether `name` is made of what Docker takes in a container name,
/// `[A-Za-z0-9._-]` (and `extra`), starting with a letter or digit.
fn docker_safe(name: &str, extra: &[char]) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || extra.contains(&c)
        })
}

/// Image names are stricter than file names: they become container names,
/// directory names and Docker references, so only `[A-Za-z0-9._-]` (and a
/// `:tag` suffix) are accepted, starting with an alphanumeric.
pub fn check_image(name: &str) -> Result<(), InvalidName> {
    check_component("image name", name)?;
    if !docker_safe(name, &[':']) || name.len() > 128 {
        return Err(InvalidName {
            what: "image name",
            reason: "use at most 128 characters of letters, digits, '.', '_', '-' and ':', starting with a letter or digit",
        });
    }
    Ok(())
}

/// A VM prefix as Docker takes it at the head of a container name: only
/// `[A-Za-z0-9._-]`, starting with an alphanumeric.
pub fn check_docker_prefix(name: &str) -> Result<(), InvalidName> {
    check_component("VM prefix", name)?;
    if !docker_safe(name, &[]) {
        return Err(InvalidName {
            what: "VM prefix",
            reason: "use letters, digits, '_', '.' and '-', starting with a letter or digit",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_prefixes_are_what_a_container_name_takes() {
        for good in ["tango", "prod-2", "a.b_c"] {
            assert!(check_docker_prefix(good).is_ok(), "{good:?}");
        }
        for bad in ["", "my course", "-x", ".x", "a:b", "a/b", "caf\u{e9}"] {
            assert!(check_docker_prefix(bad).is_err(), "{bad:?}");
        }
        // An image may carry a tag; a prefix may not.
        assert!(check_image("a:b").is_ok());
    }

    #[test]
    fn rejects_traversal_and_junk() {
        for bad in ["", ".", "..", "a/b", "/etc", "../x", "a\0b", "a\\b", "a\nb"] {
            assert!(check_component("file name", bad).is_err(), "{bad:?}");
        }
        assert!(check_component("file name", &"x".repeat(256)).is_err());
        assert!(check_component("file name", &"x".repeat(255)).is_ok());
        for good in ["Makefile", "autograde.tar", "hand-in.c", "..hidden", "a b"] {
            assert!(check_component("file name", good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn images() {
        assert!(check_image("autograding_image").is_ok());
        assert!(check_image("host").is_ok());
        assert!(check_image("ubuntu:22.04").is_ok());
        assert!(check_image("-rm").is_err());
        assert!(check_image("a b").is_err());
        assert!(check_image("../x").is_err());
    }
}
