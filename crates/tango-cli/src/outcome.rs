//! Reading a finished output file: did the job run, and how did make end?

use serde_json::Value;

/// What a client can tell from an output file.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The server's outcome line without its `Autograder [...]: ` prefix,
    /// e.g. `Success: Autodriver returned normally`.
    pub line: Option<String>,
    /// make's exit status, from `Autodriver: Job exited with status <n>`.
    pub exit_status: Option<i32>,
    /// The job hit its time limit.
    pub timed_out: bool,
    /// The last line parsed as JSON (Autolab's score object), if it is one.
    pub score: Option<Value>,
}

impl Outcome {
    pub fn parse(output: &[u8]) -> Outcome {
        let text = String::from_utf8_lossy(output);
        let mut line = None;
        let mut exit_status = None;
        let mut timed_out = false;
        let mut in_body = false;
        for raw in text.lines() {
            if !in_body {
                if raw == "---" {
                    in_body = true;
                    continue;
                }
                if let Some(rest) = raw.strip_prefix("Autograder [") {
                    let message = rest.split_once("]: ").map(|(_, m)| m).unwrap_or(rest);
                    if line.is_none()
                        && !message.starts_with("Received job")
                        && !message.starts_with("Here is the output")
                    {
                        line = Some(message.to_string());
                    }
                    if message.starts_with("Error: Job timed out") {
                        timed_out = true;
                    }
                }
            } else if exit_status.is_none() && !timed_out {
                // The autodriver's own first line.
                if let Some(n) = raw.strip_prefix("Autodriver: Job exited with status ") {
                    exit_status = n.trim().parse().ok();
                } else if raw.starts_with("Autodriver: Job timed out") {
                    timed_out = true;
                }
            }
        }
        let score = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .and_then(|l| serde_json::from_str::<Value>(l.trim()).ok())
            .filter(Value::is_object);
        Outcome {
            line,
            exit_status,
            timed_out,
            score,
        }
    }

    /// The job ran and make succeeded.
    pub fn ok(&self) -> bool {
        let ran = self
            .line
            .as_deref()
            .is_some_and(|l| l.starts_with("Success"));
        ran && !self.timed_out && self.exit_status.unwrap_or(0) == 0
    }

    /// A short reason for a failed job, for summaries.
    pub fn failure_reason(&self) -> Option<String> {
        if self.ok() {
            return None;
        }
        if self.timed_out {
            return Some(
                self.line
                    .clone()
                    .unwrap_or_else(|| "job timed out".to_string()),
            );
        }
        match (&self.line, self.exit_status) {
            (Some(line), Some(status)) if line.starts_with("Success") => {
                Some(format!("make exited with status {status}"))
            }
            (Some(line), _) => Some(line.clone()),
            (None, _) => Some("output has no outcome line (not a Tango output file?)".to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "Autograder [Fri Nov 27 17:24:44 2026]: Received job lab_1:7\n\
Autograder [Fri Nov 27 17:24:45 2026]: Success: Autodriver returned normally\n\
Autograder [Fri Nov 27 17:24:45 2026]: Here is the output from the autograder:\n\
---\n\
Autodriver: Job exited with status 0\n\
Hello, tango!\n\
{\"scores\": {\"hello\": 100}}\n";

    #[test]
    fn success() {
        let o = Outcome::parse(OK.as_bytes());
        assert_eq!(
            o.line.as_deref(),
            Some("Success: Autodriver returned normally")
        );
        assert_eq!(o.exit_status, Some(0));
        assert!(o.ok());
        assert_eq!(o.score, Some(serde_json::json!({"scores": {"hello": 100}})));
        assert_eq!(o.failure_reason(), None);
    }

    #[test]
    fn make_failure() {
        let text = OK.replace("status 0", "status 2");
        let o = Outcome::parse(text.as_bytes());
        assert!(!o.ok());
        assert_eq!(
            o.failure_reason().as_deref(),
            Some("make exited with status 2")
        );
    }

    #[test]
    fn timeout_and_internal_error() {
        let text = "Autograder [x]: Received job a:1\n\
Autograder [x]: Error: Job timed out after 5 seconds\n\
Autograder [x]: Here is the output from the autograder:\n---\n\
Autodriver: Job timed out after 5 seconds\nlooping\n";
        let o = Outcome::parse(text.as_bytes());
        assert!(o.timed_out);
        assert!(!o.ok());
        assert_eq!(
            o.failure_reason().as_deref(),
            Some("Error: Job timed out after 5 seconds")
        );
        let text = "Autograder [x]: Received job a:1\n\
Autograder [x]: Internal error: Unable to complete job after 3 tries. Please resubmit\n\
Autograder [x]: Job status: waitVM=0 copyIn=0\n";
        let o = Outcome::parse(text.as_bytes());
        assert!(!o.ok());
        assert!(o.failure_reason().unwrap().starts_with("Internal error"));
    }

    #[test]
    fn job_output_cannot_fake_the_header() {
        // Lines the job prints after `---` are not the server's outcome.
        let text = OK.replace(
            "Hello, tango!",
            "Autograder [y]: Error: Job timed out after 1 seconds",
        );
        let o = Outcome::parse(text.as_bytes());
        assert!(o.ok());
    }
}
