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

/// A job's claim on contended CPU time, as a cgroup's CPU weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuPriority {
    /// A job's first moments: ten times the default weight.
    Fresh,
    Normal,
    /// A tenth of the default weight.
    Background,
}

impl CpuPriority {
    /// The value for v1's `cpu.shares` (default 1024).
    pub fn v1_shares(self) -> &'static str {
        match self {
            CpuPriority::Fresh => "10240",
            CpuPriority::Normal => "1024",
            CpuPriority::Background => "102",
        }
    }

    /// The value for v2's `cpu.weight` (default 100).
    pub fn v2_weight(self) -> &'static str {
        match self {
            CpuPriority::Fresh => "1000",
            CpuPriority::Normal => "100",
            CpuPriority::Background => "10",
        }
    }
}

/// The cgroup files of another process's cgroups (a Docker container's)
/// that tangod reads or writes.
#[cfg(feature = "docker")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignCgroup {
    /// Counts the OOM kills in the memory cgroup: v1 `memory.oom_control`,
    /// v2 `memory.events`.
    pub oom_counter: PathBuf,
    /// The CPU weight: v1 `cpu.shares` or v2 `cpu.weight`; `None` without
    /// the cpu controller.
    pub cpu_weight: Option<PathBuf>,
}

#[cfg(feature = "docker")]
impl ForeignCgroup {
    /// The cgroups of the process whose /proc/<pid>/cgroup reads
    /// `proc_cgroup`, under the usual mount point `cgroup_root`
    /// (/sys/fs/cgroup). Only cgroups whose path contains `must_contain`
    /// count: a process seen through another pid namespace, or through a
    /// cgroup namespace, is not taken for the one meant.
    pub fn find(proc_cgroup: &str, cgroup_root: &Path, must_contain: &str) -> Option<Self> {
        if must_contain.is_empty() {
            return None;
        }
        let cgroups = parse_proc_cgroup(proc_cgroup);
        let ours = |c: &&ProcCgroup| c.path.contains(must_contain);
        // On a hybrid host the v1 controllers win over the unified line.
        let v1_file = |controller: &str, file: &str| {
            let cgroup = cgroups
                .iter()
                .filter(ours)
                .find(|c| c.controllers.iter().any(|c| c == controller))?;
            let relative = cgroup.path.trim_start_matches('/');
            // Mounted under the controller's name, or the names of all the
            // controllers bound with it ("cpu,cpuacct").
            [controller.to_string(), cgroup.controllers.join(",")]
                .iter()
                .map(|mount| cgroup_root.join(mount).join(relative).join(file))
                .find(|path| path.exists())
        };
        let v2_file = |file: &str| {
            let cgroup = cgroups
                .iter()
                .filter(ours)
                .find(|c| c.controllers.is_empty())?;
            let path = cgroup_root
                .join(cgroup.path.trim_start_matches('/'))
                .join(file);
            path.exists().then_some(path)
        };
        let oom_counter = v1_file("memory", "memory.oom_control")
            .or_else(|| v2_file("memory.events"))
            .filter(|path| read_oom_kills(path).is_some())?;
        let cpu_weight = v1_file("cpu", "cpu.shares").or_else(|| v2_file("cpu.weight"));
        Some(ForeignCgroup {
            oom_counter,
            cpu_weight,
        })
    }

    /// Sets the CPU weight; a no-op without the cpu controller.
    pub fn set_cpu_priority(&self, priority: CpuPriority) -> std::io::Result<()> {
        let Some(path) = &self.cpu_weight else {
            return Ok(());
        };
        let value = if path.ends_with("cpu.shares") {
            priority.v1_shares()
        } else {
            priority.v2_weight()
        };
        std::fs::write(path, value)
    }
}

/// The `oom_kill` counter in a `memory.oom_control` or `memory.events`
/// file; `None` once the cgroup is gone.
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
    fn finds_the_v1_cgroups_of_a_container() {
        let root = fake_root(&[
            (
                "memory/docker/abc123/memory.oom_control",
                "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
            ),
            ("cpu,cpuacct/docker/abc123/cpu.shares", "1024\n"),
        ]);
        let proc = "12:pids:/docker/abc123\n5:cpu,cpuacct:/docker/abc123\n4:memory:/docker/abc123\n0::/docker/abc123\n";
        let found = ForeignCgroup::find(proc, root.path(), "abc123").unwrap();
        assert_eq!(read_oom_kills(&found.oom_counter), Some(2));
        let shares = root.path().join("cpu,cpuacct/docker/abc123/cpu.shares");
        assert_eq!(found.cpu_weight.as_ref(), Some(&shares));
        found.set_cpu_priority(CpuPriority::Background).unwrap();
        assert_eq!(std::fs::read_to_string(&shares).unwrap(), "102");
    }

    #[test]
    fn finds_the_v2_cgroup_of_a_container() {
        let root = fake_root(&[
            (
                "system.slice/docker-abc123.scope/memory.events",
                "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
            ),
            ("system.slice/docker-abc123.scope/cpu.weight", "100\n"),
        ]);
        let proc = "0::/system.slice/docker-abc123.scope\n";
        let found = ForeignCgroup::find(proc, root.path(), "abc123").unwrap();
        assert_eq!(read_oom_kills(&found.oom_counter), Some(1));
        found.set_cpu_priority(CpuPriority::Fresh).unwrap();
        let weight = root
            .path()
            .join("system.slice/docker-abc123.scope/cpu.weight");
        assert_eq!(std::fs::read_to_string(weight).unwrap(), "1000");
    }

    #[test]
    fn another_cgroup_or_a_missing_file_is_not_taken() {
        let root = fake_root(&[("memory/memory.oom_control", "oom_kill 9\n")]);
        // Seen through a cgroup namespace: the path is "/".
        assert_eq!(
            ForeignCgroup::find("4:memory:/\n", root.path(), "abc123"),
            None
        );
        assert_eq!(ForeignCgroup::find("4:memory:/\n", root.path(), ""), None);
        // The right name, but no such cgroup here (another host's daemon).
        assert_eq!(
            ForeignCgroup::find("4:memory:/docker/abc123\n", root.path(), "abc123"),
            None
        );
    }
}
