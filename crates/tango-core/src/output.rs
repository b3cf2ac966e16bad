//! The output file format of the contract, and the output cap.

use crate::model::{ctime, now_ms};

/// Marker placed where the middle of an over-long output was cut (the
/// autodriver's marker, so both layers cut alike).
pub const ELISION_MARKER: &[u8] = b"\n...[excess bytes elided]...\n";

/// Keeps at most `cap` bytes of `output`: the first and last halves with the
/// elision marker between, so the last line (Autolab's score) survives.
pub fn cap_output(output: &[u8], cap: usize) -> Vec<u8> {
    if output.len() <= cap {
        return output.to_vec();
    }
    let head = cap / 2;
    let tail = cap - head;
    let mut kept = Vec::with_capacity(cap + ELISION_MARKER.len());
    kept.extend_from_slice(&output[..head]);
    kept.extend_from_slice(ELISION_MARKER);
    kept.extend_from_slice(&output[output.len() - tail..]);
    kept
}

/// Builds the output file:
/// ```text
/// Autograder [<ctime>]: Received job <jobName>:<id>
/// Autograder [<ctime>]: <outcome line>
/// Autograder [<ctime>]: <each extra line>
/// Autograder [<ctime>]: Here is the output from the autograder:
/// ---
/// <autodriver output>
/// ```
/// Without autodriver output (the job never ran), the file ends after the
/// outcome and extra lines.
pub fn compose_output(
    job_name: &str,
    job_id: u64,
    received_ms: i64,
    outcome: &str,
    extra_lines: &[String],
    autodriver_output: Option<&[u8]>,
) -> Vec<u8> {
    let now = ctime(now_ms());
    let mut out = Vec::new();
    out.extend_from_slice(
        format!(
            "Autograder [{}]: Received job {}:{}\n",
            ctime(received_ms),
            job_name,
            job_id
        )
        .as_bytes(),
    );
    out.extend_from_slice(format!("Autograder [{now}]: {outcome}\n").as_bytes());
    for line in extra_lines {
        out.extend_from_slice(format!("Autograder [{now}]: {line}\n").as_bytes());
    }
    if let Some(body) = autodriver_output {
        out.extend_from_slice(
            format!("Autograder [{now}]: Here is the output from the autograder:\n---\n")
                .as_bytes(),
        );
        out.extend_from_slice(body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_keeps_head_and_tail() {
        let data: Vec<u8> = (0..100u8).collect();
        let kept = cap_output(&data, 10);
        assert_eq!(&kept[..5], &data[..5]);
        assert_eq!(&kept[kept.len() - 5..], &data[95..]);
        assert_eq!(kept.len(), 10 + ELISION_MARKER.len());
        assert_eq!(cap_output(&data, 100), data);
    }

    #[test]
    fn layout() {
        let out = compose_output(
            "lab_1_x",
            7,
            0,
            "Success: Autodriver returned normally",
            &[],
            Some(b"hi\n{\"scores\":{}}\n"),
        );
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("Autograder ["));
        assert!(lines[0].ends_with("]: Received job lab_1_x:7"));
        assert!(lines[1].ends_with("]: Success: Autodriver returned normally"));
        assert!(lines[2].ends_with("]: Here is the output from the autograder:"));
        assert_eq!(lines[3], "---");
        assert_eq!(lines[5], "{\"scores\":{}}");
        assert_eq!(lines.len(), 6);
    }
}
