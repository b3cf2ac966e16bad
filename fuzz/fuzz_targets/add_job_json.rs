//! `parse_job` on arbitrary bytes: it never panics, and the names of a job
//! it accepts are either refused by the checks the engine applies to them
//! later, or are single harmless path components.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tango_core::names::{check_component, check_image};

/// What the engine's `validate` does with a name before it touches a path.
fn assert_safe_if_accepted(what: &'static str, name: &str, accepted: bool) {
    if accepted {
        assert!(!name.contains('/'), "{what} {name:?} accepted with '/'");
        assert!(!name.contains('\0'), "{what} {name:?} accepted with NUL");
        assert!(name != "." && name != "..", "{what} {name:?} accepted");
        assert!(!name.is_empty(), "empty {what} accepted");
    }
}

fuzz_target!(|body: &[u8]| {
    let Ok(job) = tango_server::v1::parse_job(body, "key-lab", "lab") else {
        return;
    };
    assert_eq!(job.courselab_dir, "key-lab");
    assert_eq!(job.courselab, "lab");
    assert_safe_if_accepted("image", &job.image, check_image(&job.image).is_ok());
    let output_ok = check_component("output_file", &job.output_file).is_ok();
    assert_safe_if_accepted("output_file", &job.output_file, output_ok);
    for (local, dest) in &job.files {
        let local_ok = check_component("localFile", local).is_ok();
        assert_safe_if_accepted("localFile", local, local_ok);
        let dest_ok = check_component("destFile", dest).is_ok();
        assert_safe_if_accepted("destFile", dest, dest_ok);
    }
});
