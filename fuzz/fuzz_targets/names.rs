//! The name checks on arbitrary strings: whatever they accept is one path
//! component (no '/', no NUL, not '.' or '..', at most 255 bytes); an
//! accepted image name is also an accepted component of at most 128 bytes
//! of `[A-Za-z0-9._:-]`; a courselab directory name built from accepted
//! parts is itself one component.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tango_core::files::DataDir;
use tango_core::names::{check_component, check_image, MAX_NAME_BYTES};

fn assert_one_component(what: &str, name: &str) {
    assert!(!name.is_empty(), "{what}: empty name accepted");
    assert!(name.len() <= MAX_NAME_BYTES, "{what}: {name:?} is too long");
    assert!(!name.contains('/'), "{what}: {name:?} has '/'");
    assert!(!name.contains('\0'), "{what}: {name:?} has NUL");
    assert!(name != "." && name != "..", "{what}: {name:?} accepted");
    assert!(
        std::path::Path::new(name).components().count() == 1,
        "{what}: {name:?} is not one path component"
    );
}

fuzz_target!(|input: (&str, &str)| {
    let (a, b) = input;
    for name in [a, b] {
        if check_component("file name", name).is_ok() {
            assert_one_component("check_component", name);
        }
        if check_image(name).is_ok() {
            assert_one_component("check_image", name);
            assert!(check_component("image", name).is_ok());
            assert!(name.len() <= 128, "image {name:?} is too long");
            assert!(name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._-:".contains(&c)));
            assert!(name.as_bytes()[0].is_ascii_alphanumeric());
        }
    }
    if let Ok(dir) = DataDir::courselab_dir_name(a, b) {
        assert_one_component("courselab_dir_name", &dir);
        assert_eq!(dir, format!("{a}-{b}"));
    }
});
