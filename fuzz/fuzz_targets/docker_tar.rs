//! The docker backend's reading of archives the Engine API returns, on
//! arbitrary bytes: it never panics and never returns more than its cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tango_vmms::docker::first_file;

fuzz_target!(|input: (u16, &[u8])| {
    let (cap, tar) = input;
    let cap = usize::from(cap);
    if let Ok(Some(data)) = first_file(tar, cap) {
        assert!(
            data.len() <= cap,
            "{} bytes returned, cap {cap}",
            data.len()
        );
    }
    // The real caps are 1 MiB and 4 MiB: never more than the input holds.
    if let Ok(Some(data)) = first_file(tar, 4 << 20) {
        assert!(
            data.len() <= tar.len(),
            "{} bytes out of {}",
            data.len(),
            tar.len()
        );
    }
});
