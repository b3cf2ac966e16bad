//! A job record for store tests (included by the SQLite store's unit tests
//! too).

use tango_core::{Job, JobState, Phases, TraceEntry};

pub fn job(id: u64, state: JobState) -> Job {
    Job {
        id,
        name: format!("job{id}"),
        courselab_dir: "k-lab".into(),
        courselab: "lab".into(),
        submitter: format!("student{id}@x.edu"),
        image: "host".into(),
        vmms: "sandbox".into(),
        inputs: vec![],
        output_file: "out".into(),
        timeout_secs: 10,
        max_output_bytes: 1024,
        callback_url: None,
        disable_network: true,
        cores: None,
        memory_mb: None,
        credentials: None,
        state,
        retries: 0,
        vm: None,
        trace: vec![TraceEntry {
            at_ms: 1,
            message: "Added job".into(),
        }],
        phases: Phases::default(),
        outcome: None,
        backend_wait_ms: 0,
        owner: None,
    }
}
