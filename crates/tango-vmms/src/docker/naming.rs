//! Container names and labels: how a Tango machine maps onto a container and
//! back.

use std::collections::HashMap;
use tango_core::model::{machine_name, Machine};

pub const LABEL_PREFIX: &str = "tango.prefix";
pub const LABEL_VM_ID: &str = "tango.vm_id";
pub const LABEL_IMAGE: &str = "tango.image";
pub const LABEL_JOB_ID: &str = "tango.job_id";
pub const LABEL_NAME: &str = "tango.name";
pub const LABEL_CORES: &str = "tango.cores";
pub const LABEL_MEMORY_MB: &str = "tango.memory_mb";
/// On the scratch containers (and so the images) made to add the
/// autodriver to a job image.
pub const LABEL_DERIVED: &str = "tango.autodriver";

/// The container name of a machine: its Tango name with every character
/// Docker refuses (`[a-zA-Z0-9][a-zA-Z0-9_.-]*` is allowed) mapped to `_`.
/// Names stay unique because the prefix and the id, which identify a
/// machine, are kept as they are (they are validated names and numbers).
pub fn container_name(machine: &Machine) -> String {
    let mut name: String = machine
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        name.insert(0, 't');
    }
    name
}

/// The prefix part of `<prefix>-<id>-<image>`.
pub fn machine_prefix(machine: &Machine) -> Option<&str> {
    machine
        .name
        .strip_suffix(&format!("-{}-{}", machine.id, machine.image))
        .filter(|prefix| !prefix.is_empty())
}

/// Labels that let [`machine_from_labels`] rebuild the machine.
pub fn labels(machine: &Machine, prefix: &str) -> HashMap<String, String> {
    let mut labels = HashMap::from([
        (LABEL_PREFIX.to_string(), prefix.to_string()),
        (LABEL_VM_ID.to_string(), machine.id.to_string()),
        (LABEL_IMAGE.to_string(), machine.image.clone()),
        (LABEL_NAME.to_string(), machine.name.clone()),
        // Pool containers are made before any job exists; the job a
        // container serves is tracked in memory, not in its labels (which
        // Docker cannot change after creation).
        (LABEL_JOB_ID.to_string(), String::new()),
    ]);
    if let Some(cores) = machine.cores {
        labels.insert(LABEL_CORES.to_string(), cores.to_string());
    }
    if let Some(memory_mb) = machine.memory_mb {
        labels.insert(LABEL_MEMORY_MB.to_string(), memory_mb.to_string());
    }
    labels
}

/// The machine a container of this backend stands for, from its labels.
pub fn machine_from_labels(labels: &HashMap<String, String>) -> Option<Machine> {
    let prefix = labels.get(LABEL_PREFIX)?;
    let id: u64 = labels.get(LABEL_VM_ID)?.parse().ok()?;
    let image = labels.get(LABEL_IMAGE)?;
    let mut machine = Machine::new(prefix, id, image, "docker");
    // The name is derived, but keep the recorded one if it says otherwise.
    if let Some(name) = labels.get(LABEL_NAME) {
        if *name != machine_name(prefix, id, image) {
            return None;
        }
    }
    machine.cores = labels.get(LABEL_CORES).and_then(|v| v.parse().ok());
    machine.memory_mb = labels.get(LABEL_MEMORY_MB).and_then(|v| v.parse().ok());
    Some(machine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitised_and_unique_per_id() {
        let m = Machine::new("prod", 7, "ghcr.io/course/img:v1", "docker");
        assert_eq!(container_name(&m), "prod-7-ghcr.io_course_img_v1");
        let other = Machine::new("prod", 8, "ghcr.io/course/img:v1", "docker");
        assert_ne!(container_name(&m), container_name(&other));
        let odd = Machine::new("_x", 1, "a", "docker");
        assert!(container_name(&odd).starts_with('t'));
    }

    #[test]
    fn labels_round_trip() {
        let mut m = Machine::new("tango-ci", 42, "my-image:1", "docker");
        m.cores = Some(2);
        m.memory_mb = Some(512);
        assert_eq!(machine_prefix(&m), Some("tango-ci"));
        let back = machine_from_labels(&labels(&m, "tango-ci"));
        assert_eq!(back, Some(m));
    }

    #[test]
    fn foreign_labels_are_ignored() {
        assert_eq!(machine_from_labels(&HashMap::new()), None);
        let mut l = labels(&Machine::new("p", 1, "i", "docker"), "p");
        l.insert(LABEL_VM_ID.into(), "x".into());
        assert_eq!(machine_from_labels(&l), None);
    }

    #[test]
    fn prefix_needs_the_naming_rule() {
        let mut m = Machine::new("p", 1, "img", "docker");
        m.name = "something-else".into();
        assert_eq!(machine_prefix(&m), None);
    }
}
