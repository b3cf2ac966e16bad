//! Unit tests of the image helpers.

use super::*;

#[test]
fn passwd_lookup() {
    let passwd = "root:x:0:0::/root:/bin/sh\nautograde:x:1001:1001::/home/autograde:/bin/sh\n";
    assert!(passwd_has_user(passwd, "autograde"));
    assert!(!passwd_has_user(passwd, "auto"));
    assert!(!passwd_has_user("", "autograde"));
}

#[test]
fn load_messages() {
    assert_eq!(
        loaded_image("Loaded image: foo:latest\n"),
        Some("foo:latest")
    );
    assert_eq!(
        loaded_image("Loaded image ID: sha256:ab\n"),
        Some("sha256:ab")
    );
    assert_eq!(loaded_image("Loading layer 1/2"), None);
}

#[test]
fn image_names_follow_tango() {
    let tags = [
        "tango-test-bookworm:latest".to_string(),
        "course/img:v2".to_string(),
        "<none>:<none>".to_string(),
        "localhost:5000/x:latest".to_string(),
    ];
    assert_eq!(
        image_names(&tags),
        ["course/img:v2", "localhost:5000/x", "tango-test-bookworm"]
    );
}

#[test]
fn derived_images_are_hidden() {
    let tags = [
        format!("{DERIVED_REPO}:0123456789abcdef-0011223344556677"),
        "course/img:latest".to_string(),
    ];
    assert_eq!(image_names(&tags), ["course/img"]);
}

#[test]
fn autodriver_fingerprint_is_fnv1a_64() {
    // The published FNV-1a 64 test vectors: tags made by older servers
    // must keep matching.
    assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
}
