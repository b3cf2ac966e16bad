//! Reading the kernel's cgroup files, shared by the backends that run jobs
//! on this host (the sandbox's own cgroups, the cgroups of local Docker
//! containers).

#[cfg(feature = "docker")]
use std::path::{Path, PathBuf};

/// One line of /proc/<pid>/cgroup: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcCgroup {
    pub controllers: Vec<String>,
    pub path: String,
}

pub fn parse_proc_cgroup(text: &str) -> Vec<ProcCgroup> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            Some(ProcCgroup {
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect(),
                path: path.to_string(),
            })
        })
        .collect()
}

/// `N` of the line `key N` in a flat-keyed cgroup file's text.
pub fn parse_key(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The file whose `oom_kill` counter counts the OOM kills in the memory
/// cgroup of the process whose /proc/<pid>/cgroup reads `proc_cgroup`
/// (v1: `memory.oom_control`, v2: `memory.events`), under the usual mount
/// point `cgroup_root` (/sys/fs/cgroup). Only a cgroup whose path contains
/// `must_contain` counts: a process seen through another pid namespace, or
/// through a cgroup namespace, is not taken for the one meant.
#[cfg(feature = "docker")]
pub fn oom_counter_file(
    proc_cgroup: &str,
    cgroup_root: &Path,
    must_contain: &str,
) -> Option<PathBuf> {
    let cgroups = parse_proc_cgroup(proc_cgroup);
    let v1 = cgroups
        .iter()
        .find(|c| c.controllers.iter().any(|c| c == "memory"))
        .map(|c| (c, cgroup_root.join("memory"), "memory.oom_control"));
    let v2 = cgroups
        .iter()
        .find(|c| c.controllers.is_empty())
        .map(|c| (c, cgroup_root.to_path_buf(), "memory.events"));
    // On a hybrid host the memory controller is on v1: its line wins.
    v1.into_iter().chain(v2).find_map(|(cgroup, base, file)| {
        if must_contain.is_empty() || !cgroup.path.contains(must_contain) {
            return None;
        }
        let relative = cgroup.path.trim_start_matches('/');
        let path = base.join(relative).join(file);
        let text = std::fs::read_to_string(&path).ok()?;
        parse_key(&text, "oom_kill").map(|_| path)
    })
}

/// The `oom_kill` counter in `file` (see [`oom_counter_file`]); `None` once
/// the cgroup is gone.
#[cfg(feature = "docker")]
pub fn read_oom_kills(file: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    parse_key(&text, "oom_kill")
}

#[cfg(all(test, feature = "docker"))]
mod tests {
    use super::*;

    fn fake_root(files: &[(&str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let path = root.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        root
    }

    #[test]
    fn finds_the_v1_memory_cgroup_of_a_container() {
        let root = fake_root(&[(
            "memory/docker/abc123/memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )]);
        let proc = "12:pids:/docker/abc123\n4:memory:/docker/abc123\n0::/docker/abc123\n";
        let file = oom_counter_file(proc, root.path(), "abc123").unwrap();
        assert_eq!(read_oom_kills(&file), Some(2));
    }

    #[test]
    fn finds_the_v2_cgroup_of_a_container() {
        let root = fake_root(&[(
            "system.slice/docker-abc123.scope/memory.events",
            "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
        )]);
        let proc = "0::/system.slice/docker-abc123.scope\n";
        let file = oom_counter_file(proc, root.path(), "abc123").unwrap();
        assert_eq!(read_oom_kills(&file), Some(1));
    }

    #[test]
    fn another_cgroup_or_a_missing_file_is_not_taken() {
        let root = fake_root(&[("memory/memory.oom_control", "oom_kill 9\n")]);
        // Seen through a cgroup namespace: the path is "/".
        assert_eq!(
            oom_counter_file("4:memory:/\n", root.path(), "abc123"),
            None
        );
        assert_eq!(oom_counter_file("4:memory:/\n", root.path(), ""), None);
        // The right name, but no such cgroup here (another host's daemon).
        assert_eq!(
            oom_counter_file("4:memory:/docker/abc123\n", root.path(), "abc123"),
            None
        );
    }
}
