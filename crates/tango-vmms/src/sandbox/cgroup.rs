//! Per-VM cgroups for the sandbox backend, on cgroup v1 (one hierarchy per
//! controller) or v2 (the unified hierarchy).
//!
//! Every VM cgroup lives below `<own cgroup>/<root name>/`, where `<own
//! cgroup>` is the cgroup tangod itself runs in. Nesting below our own cgroup
//! (instead of at the hierarchy's root) keeps jobs inside whatever limits and
//! accounting the service manager put on tangod, and is what systemd's
//! `Delegate=yes` allows on v2.

use super::mounts::{read_mountinfo, MountEntry};
pub use crate::cgroupfs::CpuPriority;
use crate::cgroupfs::{parse_key, parse_proc_cgroup, ProcCgroup};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tango_core::VmmsError;

/// Which cgroup hierarchy layout the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// Resource limits of one VM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub max_pids: u64,
    /// `None`: no CPU limit.
    pub cores: Option<f64>,
}

/// Counters that tell why a job may have been stopped; compared before and
/// after a run because they accumulate over a reused VM's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub oom_kills: u64,
    pub pids_max_hits: u64,
}

const CPU_PERIOD_US: u64 = 100_000;

/// The parent directories under which VM cgroups are created.
#[derive(Debug, Clone)]
pub struct CgroupTree {
    pub version: CgroupVersion,
    /// v1: the memory hierarchy's base; v2: the single base.
    memory: PathBuf,
    /// v1: the pids hierarchy's base (absent when not mounted); v2: the base.
    pids: Option<PathBuf>,
    /// v1: the cpu hierarchy's base (absent when not mounted); v2: the base
    /// when the cpu controller is available.
    cpu: Option<PathBuf>,
    /// v2: how to (re)create the base, which `remove_empty_bases` may have
    /// removed while another instance shares it.
    v2_setup: Option<V2Setup>,
}

#[derive(Debug, Clone)]
struct V2Setup {
    parent: PathBuf,
    root_name: String,
    with_cpu: bool,
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> VmmsError {
    let context = context.into();
    move |e| VmmsError::io(context, e)
}

fn write_file(path: &Path, value: &str) -> Result<(), VmmsError> {
    fs::write(path, value).map_err(io_err(format!("writing {value:?} to {}", path.display())))
}

/// Writes when the file exists; controllers differ in which knobs they have
/// (memsw needs swap accounting, memory.swap.max needs swap).
fn write_if_present(path: &Path, value: &str) -> Result<(), VmmsError> {
    match fs::write(path, value) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other.map_err(io_err(format!("writing {value:?} to {}", path.display()))),
    }
}

/// The directory of our own cgroup in a mounted hierarchy: the mount point
/// plus our path relative to the mount's root (which differs from `/` in
/// containers that bind a sub-tree).
fn own_dir(mount: &MountEntry, own_path: &str) -> PathBuf {
    let relative = own_path
        .strip_prefix(mount.root.as_str())
        .unwrap_or(own_path)
        .trim_start_matches('/');
    if relative.is_empty() {
        mount.mount_point.clone()
    } else {
        mount.mount_point.join(relative)
    }
}

/// Our service's cgroup on v2. `setup_v2` moves the processes of a cgroup
/// that holds them into its `<root_name>-daemon` leaf, so once it has run
/// (earlier in this process, or in a parent that started us) we find
/// ourselves in that leaf: the service cgroup is its parent. Without this,
/// every `detect` would nest a new tree (and a new leaf) one level deeper and
/// not find the VMs of the previous one.
fn v2_service_path<'a>(own_path: &'a str, root_name: &str) -> &'a str {
    let leaf = format!("{root_name}-daemon");
    match own_path.rsplit_once('/') {
        Some((parent, name)) if name == leaf => {
            if parent.is_empty() {
                "/"
            } else {
                parent
            }
        }
        _ => own_path,
    }
}

fn v1_mount<'a>(mounts: &'a [MountEntry], controller: &str) -> Option<&'a MountEntry> {
    mounts
        .iter()
        .find(|m| m.fs_type == "cgroup" && m.super_options.split(',').any(|o| o == controller))
}

fn v1_own_path<'a>(cgroups: &'a [ProcCgroup], controller: &str) -> Option<&'a str> {
    cgroups
        .iter()
        .find(|c| c.controllers.iter().any(|x| x == controller))
        .map(|c| c.path.as_str())
}

impl CgroupTree {
    /// Finds the hierarchy, creates `<own>/<root_name>` in it and enables the
    /// controllers there. Prefers v2 when it carries the memory controller.
    pub fn detect(root_name: &str) -> Result<CgroupTree, VmmsError> {
        let mounts = read_mountinfo()?;
        let own =
            fs::read_to_string("/proc/self/cgroup").map_err(io_err("reading /proc/self/cgroup"))?;
        let own = parse_proc_cgroup(&own);

        if let Some(v2) = mounts.iter().find(|m| m.fs_type == "cgroup2") {
            let own_path = own
                .iter()
                .find(|c| c.controllers.is_empty())
                .map(|c| c.path.as_str())
                .unwrap_or("/");
            let own_path = v2_service_path(own_path, root_name);
            let parent = own_dir(v2, own_path);
            let available =
                fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
            let has = |c: &str| available.split_whitespace().any(|x| x == c);
            if has("memory") && has("pids") {
                let setup = V2Setup {
                    parent,
                    root_name: root_name.to_string(),
                    with_cpu: has("cpu"),
                };
                let base = setup.parent.join(root_name);
                let tree = CgroupTree {
                    version: CgroupVersion::V2,
                    memory: base.clone(),
                    pids: Some(base.clone()),
                    cpu: setup.with_cpu.then_some(base),
                    v2_setup: Some(setup),
                };
                tree.ensure_bases()?;
                return Ok(tree);
            }
        }
        if let Some(memory) = v1_mount(&mounts, "memory") {
            let dir_for = |controller: &str| -> Option<PathBuf> {
                let mount = v1_mount(&mounts, controller)?;
                let own_path = v1_own_path(&own, controller).unwrap_or("/");
                Some(own_dir(mount, own_path).join(root_name))
            };
            let memory_dir =
                own_dir(memory, v1_own_path(&own, "memory").unwrap_or("/")).join(root_name);
            let tree = CgroupTree {
                version: CgroupVersion::V1,
                memory: memory_dir,
                pids: dir_for("pids"),
                cpu: dir_for("cpu"),
                v2_setup: None,
            };
            tree.ensure_bases()?;
            return Ok(tree);
        }
        Err(VmmsError::Backend(
            "the sandbox backend needs the memory and pids cgroup controllers: neither a cgroup v2 \
             hierarchy delegating them to tangod's cgroup nor a cgroup v1 memory hierarchy was found \
             (on systemd, run tangod in a unit with Delegate=yes)"
                .into(),
        ))
    }

    /// Creates the base directories (and on v2 enables the controllers).
    fn ensure_bases(&self) -> Result<(), VmmsError> {
        match &self.v2_setup {
            Some(s) => Self::setup_v2(&s.parent, &s.root_name, s.with_cpu),
            None => {
                for dir in self.bases() {
                    fs::create_dir_all(&dir)
                        .map_err(io_err(format!("creating cgroup {}", dir.display())))?;
                }
                Ok(())
            }
        }
    }

    /// Removes the base directories when no VM cgroup is left in them, so
    /// that an exiting tangod leaves its parent cgroup as it found it.
    pub fn remove_empty_bases(&self) {
        for dir in self.bases() {
            // EBUSY while VMs (of another instance) remain: keep it.
            let _ = fs::remove_dir(dir);
        }
    }

    fn setup_v2(parent: &Path, root_name: &str, with_cpu: bool) -> Result<(), VmmsError> {
        let wanted: &[&str] = if with_cpu {
            &["memory", "pids", "cpu"]
        } else {
            &["memory", "pids"]
        };
        let enable = wanted
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ");
        let enabled = |dir: &Path| {
            let current =
                fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
            wanted
                .iter()
                .all(|c| current.split_whitespace().any(|x| x == *c))
        };
        if !enabled(parent) {
            if let Err(e) = fs::write(parent.join("cgroup.subtree_control"), &enable) {
                // "No internal processes": a non-root cgroup that holds
                // processes cannot hand controllers to children. Move every
                // process of our cgroup (tangod and whatever was started with
                // it) into a leaf beside the VM tree, then retry.
                // Only a non-root cgroup (which has cgroup.type) may be
                // emptied so: the root of the hierarchy has no such rule, and
                // its members are the whole system. The root of a cgroup
                // namespace (a container) is a non-root cgroup.
                let non_root = parent.join("cgroup.type").exists();
                if e.raw_os_error() != Some(libc::EBUSY) || !non_root {
                    return Err(VmmsError::io(
                        format!(
                            "enabling {enable} in {}",
                            parent.join("cgroup.subtree_control").display()
                        ),
                        e,
                    ));
                }
                let leaf = parent.join(format!("{root_name}-daemon"));
                fs::create_dir_all(&leaf)
                    .map_err(io_err(format!("creating cgroup {}", leaf.display())))?;
                let procs = fs::read_to_string(parent.join("cgroup.procs"))
                    .map_err(io_err(format!("reading {}/cgroup.procs", parent.display())))?;
                for pid in procs.split_whitespace() {
                    // A process may exit meanwhile (ESRCH): nothing to move.
                    let _ = fs::write(leaf.join("cgroup.procs"), pid);
                }
                write_file(&parent.join("cgroup.subtree_control"), &enable)?;
            }
        }
        let base = parent.join(root_name);
        fs::create_dir_all(&base).map_err(io_err(format!("creating cgroup {}", base.display())))?;
        if !enabled(&base) {
            write_file(&base.join("cgroup.subtree_control"), &enable)?;
        }
        Ok(())
    }

    /// The distinct base directories (one on v2, one per hierarchy on v1).
    fn bases(&self) -> Vec<PathBuf> {
        let mut all = vec![self.memory.clone()];
        for dir in [&self.pids, &self.cpu].into_iter().flatten() {
            if !all.contains(dir) {
                all.push(dir.clone());
            }
        }
        all
    }

    /// The VM's cgroup directories, one per distinct hierarchy.
    pub fn vm_dirs(&self, vm: &str) -> Vec<PathBuf> {
        self.bases().into_iter().map(|b| b.join(vm)).collect()
    }

    /// Creates the VM's cgroups (again, when they exist) and sets the limits.
    pub fn create(&self, vm: &str, limits: &Limits) -> Result<(), VmmsError> {
        for dir in self.vm_dirs(vm) {
            let mut tries = 0;
            loop {
                match fs::create_dir(&dir) {
                    // The base went away (another instance sharing it was
                    // dropped): make it again.
                    Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 3 => {
                        tries += 1;
                        self.ensure_bases()?;
                    }
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                        return Err(VmmsError::io(
                            format!("creating cgroup {}", dir.display()),
                            e,
                        ))
                    }
                    _ => break,
                }
            }
        }
        let memory = self.memory.join(vm);
        let bytes = limits.memory_bytes.to_string();
        match self.version {
            CgroupVersion::V1 => {
                // memsw (memory + swap) must stay >= the memory limit, so
                // when raising the limit of a re-initialised VM memsw goes
                // first; when lowering, that first write fails (EINVAL) and
                // the second one applies it. Equal values mean no swap.
                let memsw = memory.join("memory.memsw.limit_in_bytes");
                let _ = fs::write(&memsw, &bytes);
                write_file(&memory.join("memory.limit_in_bytes"), &bytes)?;
                write_if_present(&memsw, &bytes)?;
                if let Some(pids) = &self.pids {
                    write_file(
                        &pids.join(vm).join("pids.max"),
                        &limits.max_pids.to_string(),
                    )?;
                }
                if let Some(cpu) = &self.cpu {
                    let dir = cpu.join(vm);
                    write_file(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    let quota = match limits.cores {
                        Some(cores) => cpu_quota_us(cores).to_string(),
                        None => "-1".to_string(),
                    };
                    write_file(&dir.join("cpu.cfs_quota_us"), &quota)?;
                }
            }
            CgroupVersion::V2 => {
                write_file(&memory.join("memory.max"), &bytes)?;
                write_if_present(&memory.join("memory.swap.max"), "0")?;
                write_file(&memory.join("pids.max"), &limits.max_pids.to_string())?;
                if self.cpu.is_some() {
                    let value = match limits.cores {
                        Some(cores) => format!("{} {CPU_PERIOD_US}", cpu_quota_us(cores)),
                        None => format!("max {CPU_PERIOD_US}"),
                    };
                    write_file(&memory.join("cpu.max"), &value)?;
                }
            }
        }
        Ok(())
    }

    /// Sets the VM's share of contended CPU time: `Normal` (the default
    /// weight) or `Background` (a tenth of it). Weights only matter while
    /// the CPU is contended; a background job alone still gets it all.
    /// Without a cpu controller this does nothing.
    pub fn set_cpu_priority(&self, vm: &str, priority: CpuPriority) -> Result<(), VmmsError> {
        let Some(cpu) = &self.cpu else {
            return Ok(());
        };
        let dir = cpu.join(vm);
        match self.version {
            CgroupVersion::V1 => write_file(&dir.join("cpu.shares"), priority.v1_shares()),
            CgroupVersion::V2 => write_file(&dir.join("cpu.weight"), priority.v2_weight()),
        }
    }

    /// `cgroup.procs` of each of the VM's cgroups, for a child to join them.
    pub fn procs_files(&self, vm: &str) -> Vec<PathBuf> {
        self.vm_dirs(vm)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    pub fn exists(&self, vm: &str) -> bool {
        self.vm_dirs(vm).iter().any(|d| d.is_dir())
    }

    pub fn counters(&self, vm: &str) -> Counters {
        let memory = self.memory.join(vm);
        let oom_kills = match self.version {
            CgroupVersion::V1 => read_key(&memory.join("memory.oom_control"), "oom_kill"),
            CgroupVersion::V2 => read_key(&memory.join("memory.events"), "oom_kill"),
        };
        let pids_max_hits = self
            .pids
            .as_ref()
            .map(|p| read_key(&p.join(vm).join("pids.events"), "max"))
            .unwrap_or(0);
        Counters {
            oom_kills,
            pids_max_hits,
        }
    }

    /// One pass: SIGKILL every process now in the VM's cgroups (v2: also
    /// `cgroup.kill`). Returns whether any process was found. Synchronous,
    /// so a drop guard can call it.
    pub fn kill_once(&self, vm: &str) -> Result<bool, VmmsError> {
        let mut any = false;
        for (index, dir) in self.vm_dirs(vm).iter().enumerate() {
            if index == 0 && self.version == CgroupVersion::V2 {
                // Since Linux 5.14; older kernels rely on the loop below.
                let _ = fs::write(dir.join("cgroup.kill"), "1");
            }
            let procs = match fs::read_to_string(dir.join("cgroup.procs")) {
                Ok(p) => p,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(VmmsError::io(
                        format!("reading {}/cgroup.procs", dir.display()),
                        e,
                    ))
                }
            };
            for pid in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<libc::pid_t>().ok())
            {
                any = true;
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        Ok(any)
    }

    /// Kills every process in the VM's cgroups and waits until they are gone.
    pub async fn kill_all(&self, vm: &str) -> Result<(), VmmsError> {
        // v1 has no "cgroup became empty" event short of a release agent, and
        // SIGKILLed processes need a moment to exit, so this re-reads the
        // member list with a short, growing pause. Normally the list is
        // already empty here: the job's PID namespace died with its init.
        let mut pause = Duration::from_micros(200);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.kill_once(vm)? {
            if tokio::time::Instant::now() > deadline {
                return Err(VmmsError::Backend(format!(
                    "processes of VM {vm} survived SIGKILL for 10 s"
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Kills the VM's processes and removes its cgroups.
    pub async fn remove(&self, vm: &str) -> Result<(), VmmsError> {
        self.kill_all(vm).await?;
        for dir in self.vm_dirs(vm) {
            let mut pause = Duration::from_micros(200);
            let mut tries = 0;
            loop {
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    // A killed process may still be on its way out.
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                        tries += 1;
                        self.kill_all(vm).await?;
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(50));
                    }
                    Err(e) => {
                        return Err(VmmsError::io(
                            format!("removing cgroup {}", dir.display()),
                            e,
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// Names of VM cgroups starting with `prefix`, in any hierarchy.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        let mut names = Vec::new();
        for base in self.bases() {
            let Ok(entries) = fs::read_dir(&base) else {
                continue;
            };
            for entry in entries.flatten() {
                let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
                if let (true, Some(name)) = (is_dir, entry.file_name().to_str()) {
                    if name.starts_with(prefix) && !names.iter().any(|n| n == name) {
                        names.push(name.to_string());
                    }
                }
            }
        }
        names
    }
}

fn cpu_quota_us(cores: f64) -> u64 {
    // The kernel's minimum quota is 1 ms.
    ((cores * CPU_PERIOD_US as f64) as u64).max(1000)
}

/// Reads `key N` from a flat-keyed cgroup file; 0 when absent.
fn read_key(path: &Path, key: &str) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|text| parse_key(&text, key))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_cgroup_v1_and_v2() {
        let text = "4:memory:/process_api/abc\n2:cpu,cpuacct:/\n0::/system.slice/tangod.service\n";
        let parsed = parse_proc_cgroup(text);
        assert_eq!(v1_own_path(&parsed, "memory"), Some("/process_api/abc"));
        assert_eq!(v1_own_path(&parsed, "cpuacct"), Some("/"));
        assert_eq!(
            parsed
                .iter()
                .find(|c| c.controllers.is_empty())
                .map(|c| c.path.as_str()),
            Some("/system.slice/tangod.service")
        );
    }

    #[test]
    fn own_dir_strips_the_mount_root() {
        let mount = MountEntry {
            root: "/docker/abc".into(),
            mount_point: PathBuf::from("/sys/fs/cgroup/memory"),
            mount_options: "rw,nosuid".into(),
            fs_type: "cgroup".into(),
            super_options: "rw,memory".into(),
        };
        assert_eq!(
            own_dir(&mount, "/docker/abc/x"),
            PathBuf::from("/sys/fs/cgroup/memory/x")
        );
        assert_eq!(
            own_dir(&mount, "/docker/abc"),
            PathBuf::from("/sys/fs/cgroup/memory")
        );
    }

    #[test]
    fn the_daemon_leaf_belongs_to_its_service() {
        assert_eq!(
            v2_service_path("/system.slice/tangod.service/tango-rs-daemon", "tango-rs"),
            "/system.slice/tangod.service"
        );
        assert_eq!(v2_service_path("/tango-rs-daemon", "tango-rs"), "/");
        assert_eq!(
            v2_service_path("/system.slice/tangod.service", "tango-rs"),
            "/system.slice/tangod.service"
        );
        assert_eq!(
            v2_service_path("/other-daemon", "tango-rs"),
            "/other-daemon"
        );
        assert_eq!(v2_service_path("/", "tango-rs"), "/");
    }

    #[test]
    fn parses_event_keys() {
        let text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(parse_key(text, "oom_kill"), Some(3));
        assert_eq!(parse_key("max 12\n", "max"), Some(12));
        assert_eq!(parse_key("low 1\n", "max"), None);
    }

    #[test]
    fn cpu_quota() {
        assert_eq!(cpu_quota_us(1.0), 100_000);
        assert_eq!(cpu_quota_us(0.5), 50_000);
        assert_eq!(cpu_quota_us(0.0), 1000);
    }
}
