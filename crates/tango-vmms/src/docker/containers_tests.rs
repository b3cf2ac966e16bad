//! Unit tests of the container helpers.

use super::*;

#[test]
fn event_times_are_unix_seconds_with_nanoseconds() {
    let at = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
    assert_eq!(unix_seconds(at), "1700000000.000000005");
    // Before the epoch (a clock set back): the epoch, not a panic.
    let before = UNIX_EPOCH - Duration::from_secs(1);
    assert_eq!(unix_seconds(before), "0.000000000");
}
