//! The sandbox backend against real namespaces, mounts and cgroups. Needs
//! root; without it every test prints why it is skipped and passes.
//!
//! The autodriver comes from `TANGO_AUTODRIVER` when set; otherwise it is
//! built once (static musl, release) into `<target dir>/sandbox-test-autodriver`.

#![cfg(feature = "sandbox")]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tango_core::{InputFile, Machine, RunOutcome, RunRequest, RunStatus, Vmms};
use tango_vmms::sandbox::{Sandbox, SandboxConfig};
use tempfile::TempDir;

const CGROUP_ROOT: &str = "tango-rs-test";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: the sandbox backend needs root (namespaces, mounts, cgroups)");
            return;
        }
    };
}

// The same static autodriver the docker and ec2 tests use.
#[path = "support/autodriver.rs"]
mod autodriver_build;
use autodriver_build::autodriver;

struct TestEnv {
    /// In /var/lib, not /tmp or /var/tmp: those are replaced inside a sandbox,
    /// so a data dir there would be hidden for the wrong reason.
    dir: TempDir,
    sandbox: Sandbox,
    prefix: String,
}

fn env_with(prefix: &str, tweak: impl FnOnce(&mut SandboxConfig)) -> TestEnv {
    let dir = tempfile::Builder::new()
        .prefix("tango-sandbox-test-")
        .tempdir_in("/var/lib")
        .expect("temp dir");
    let mut config = SandboxConfig {
        data_dir: dir.path().join("data"),
        autodriver: autodriver(),
        cgroup_root_name: CGROUP_ROOT.into(),
        ..SandboxConfig::default()
    };
    tweak(&mut config);
    let sandbox = Sandbox::new(config).expect("Sandbox::new");
    TestEnv {
        dir,
        sandbox,
        prefix: prefix.to_string(),
    }
}

fn env(prefix: &str) -> TestEnv {
    env_with(prefix, |_| {})
}

fn request(timeout_secs: u64) -> RunRequest {
    RunRequest {
        job_id: 1,
        timeout_secs,
        output_cap_bytes: 1 << 20,
        max_procs: 1000,
        max_file_bytes: 64 << 20,
        disable_network: true,
    }
}

impl TestEnv {
    fn machine(&self, id: u64, image: &str) -> Machine {
        Machine::new(&self.prefix, id, image, "sandbox")
    }

    /// Writes the job's files into the test dir and returns them as inputs.
    fn inputs(&self, id: u64, files: &[(&str, &str)]) -> Vec<InputFile> {
        let dir = self.dir.path().join(format!("inputs-{id}"));
        std::fs::create_dir_all(&dir).expect("inputs dir");
        files
            .iter()
            .map(|(name, text)| {
                let path = dir.join(name);
                std::fs::write(&path, text).expect("input file");
                InputFile {
                    local_file: name.to_string(),
                    dest_file: name.to_string(),
                    path,
                    md5: String::new(),
                }
            })
            .collect()
    }

    /// copy_in + run_job + copy_out on an initialised VM.
    async fn run_on(&self, vm: &Machine, makefile: &str, req: &RunRequest) -> (RunOutcome, String) {
        let inputs = self.inputs(vm.id, &[("Makefile", makefile)]);
        self.sandbox.copy_in(vm, &inputs).await.expect("copy_in");
        let outcome = self.sandbox.run_job(vm, req).await.expect("run_job");
        let dest = self.dir.path().join(format!("output-{}", vm.id));
        self.sandbox.copy_out(vm, &dest).await.expect("copy_out");
        let output = std::fs::read_to_string(&dest).expect("output");
        (outcome, output)
    }

    /// A whole job on a fresh VM that is destroyed afterwards.
    async fn job(
        &self,
        id: u64,
        image: &str,
        makefile: &str,
        req: &RunRequest,
    ) -> (RunOutcome, String) {
        let vm = self.machine(id, image);
        self.sandbox
            .initialize_vm(&vm)
            .await
            .expect("initialize_vm");
        self.sandbox
            .wait_vm(&vm, Duration::from_secs(5))
            .await
            .expect("wait_vm");
        let result = self.run_on(&vm, makefile, req).await;
        self.sandbox.destroy_vm(&vm).await.expect("destroy_vm");
        result
    }

    fn leftover_mounts(&self) -> Vec<String> {
        let needle = self.dir.path().to_string_lossy().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .expect("mountinfo")
            .lines()
            .filter(|l| l.contains(&needle))
            .map(str::to_string)
            .collect()
    }

    /// VM cgroups of this test's prefix, in any mounted hierarchy.
    fn leftover_cgroups(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![PathBuf::from("/sys/fs/cgroup")];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    continue;
                }
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().to_string();
                if name.starts_with(&format!("{}-", self.prefix))
                    && path.parent().is_some_and(|p| p.ends_with(CGROUP_ROOT))
                {
                    found.push(path.clone());
                }
                stack.push(path);
            }
        }
        found
    }
}

fn assert_clean(env: &TestEnv) {
    assert_eq!(env.leftover_mounts(), Vec::<String>::new(), "mounts left");
    assert_eq!(
        env.leftover_cgroups(),
        Vec::<PathBuf>::new(),
        "cgroups left"
    );
}

#[tokio::test]
async fn lifecycle_with_the_host_image() {
    require_root!();
    let env = env("t-life");
    let images = env.sandbox.get_images().await.expect("images");
    assert!(images.contains(&"host".to_string()), "{images:?}");
    let vm = env.machine(7, "host");
    assert!(!env.sandbox.exists_vm(&vm).await.expect("exists"));
    env.sandbox.initialize_vm(&vm).await.expect("init");
    assert!(env.sandbox.exists_vm(&vm).await.expect("exists"));
    // Initialising an existing VM again starts it afresh.
    let stale = env.inputs(7, &[("stale.txt", "old")]);
    env.sandbox.copy_in(&vm, &stale).await.expect("copy_in");
    env.sandbox.initialize_vm(&vm).await.expect("re-init");
    let listed = env.sandbox.get_vms("t-life").await.expect("get_vms");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, vm.name);
    assert_eq!(listed[0].image, "host");
    assert!(env
        .sandbox
        .get_vms("other")
        .await
        .expect("get_vms")
        .is_empty());

    let makefile = "all:\n\t@echo hello from $$(id -u) on $$(hostname)\n\
                    \t@echo job files: $$(ls)\n\
                    \t@python3 -c 'import pty, os; m, s = pty.openpty(); print(\"pty\", os.ttyname(s))'\n\
                    \t@echo '{\"scores\": {\"q1\": 10}}'\n";
    let (outcome, output) = env.run_on(&vm, makefile, &request(20)).await;
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert_eq!(outcome.exit_code, Some(0));
    assert!(output.contains("job files: Makefile\n"), "{output}");
    assert!(outcome.notes.is_empty(), "{:?}", outcome.notes);
    assert!(
        output.contains("Autodriver: Job exited with status 0"),
        "{output}"
    );
    assert!(
        output.contains(&format!("hello from 200007 on {}", vm.name)),
        "{output}"
    );
    assert!(output.contains("pty /dev/pts/0"), "{output}");
    assert!(
        output.trim_end().ends_with("{\"scores\": {\"q1\": 10}}"),
        "{output}"
    );
    let summary = outcome.summary.expect("summary.json");
    assert!(summary.is_object(), "{summary}");

    // Reuse: reset, then a second job sees none of the first one's files.
    env.sandbox.reset_vm(&vm).await.expect("reset");
    let (outcome, output) = env
        .run_on(
            &vm,
            "all:\n\t@ls /home /tmp; ls /home/autograde/hello 2>&1 || true\n",
            &request(20),
        )
        .await;
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");

    env.sandbox.safe_destroy_vm(&vm).await.expect("destroy");
    assert!(!env.sandbox.exists_vm(&vm).await.expect("exists"));
    assert!(env
        .sandbox
        .get_vms("t-life")
        .await
        .expect("get_vms")
        .is_empty());
    assert_clean(&env);
}

#[tokio::test]
async fn a_failing_make_still_completes() {
    require_root!();
    let env = env("t-fail");
    let (outcome, output) = env
        .job(
            1,
            "host",
            "all:\n\t@echo about to fail\n\t@false\n",
            &request(20),
        )
        .await;
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert!(output.contains("about to fail"), "{output}");
    assert!(!output.contains("Job exited with status 0"), "{output}");
    assert_clean(&env);
}

#[tokio::test]
async fn jobs_see_only_their_image_and_their_own_files() {
    require_root!();
    let env = env("t-iso");
    let data = env.dir.path().join("data");
    let secret = data.join("secret.txt");
    std::fs::write(&secret, "TOPSECRET-DATA").expect("secret");
    let outside = env.dir.path().join("courselab-secret.txt");
    std::fs::write(&outside, "TOPSECRET-OTHER").expect("secret");

    // Another VM with a file in its home.
    let other = env.machine(2, "host");
    env.sandbox.initialize_vm(&other).await.expect("init");
    let other_inputs = env.inputs(2, &[("private.txt", "TOPSECRET-VM")]);
    env.sandbox
        .copy_in(&other, &other_inputs)
        .await
        .expect("copy_in");
    let other_home = data
        .join("sandbox")
        .join(&other.name)
        .join("home/job/private.txt");
    assert!(other_home.is_file());

    let makefile = format!(
        "all:\n\
         \t@cat {secret} 2>&1 || echo no-data-dir\n\
         \t@cat {other} 2>&1 || echo no-other-vm\n\
         \t@ls {data} 2>&1 || echo no-listing\n\
         \t@touch /usr/pwned 2>&1 || echo usr-not-writable\n\
         \t@awk '$$5 == \"/\" {{print \"root-mount\", $$6}}' /proc/self/mountinfo\n\
         \t@ls /sys | wc -l | sed 's/^/sys-entries /'\n\
         \t@ps -e -o pid= | wc -l | sed 's/^/processes /'\n",
        secret = secret.display(),
        other = other_home.display(),
        data = data.display(),
    );
    let (outcome, output) = env.job(3, "host", &makefile, &request(20)).await;
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert!(!output.contains("TOPSECRET"), "{output}");
    assert!(output.contains("no-data-dir"), "{output}");
    assert!(output.contains("no-other-vm"), "{output}");
    assert!(output.contains("usr-not-writable"), "{output}");
    assert!(!Path::new("/usr/pwned").exists());
    let root_line = output
        .lines()
        .find(|l| l.starts_with("root-mount "))
        .expect(&output);
    assert!(
        root_line
            .split(' ')
            .nth(1)
            .is_some_and(|o| o.split(',').any(|x| x == "ro")),
        "{root_line}"
    );
    // The host's /sys is not mounted: an empty directory of the image.
    assert!(output.contains("sys-entries 0"), "{output}");
    // Only the job's own processes: the autodriver, make, the shell, ps.
    let processes: usize = output
        .lines()
        .find_map(|l| l.strip_prefix("processes "))
        .and_then(|n| n.trim().parse().ok())
        .expect(&output);
    assert!(processes < 10, "{output}");
    // Host paths outside data_dir (a courselab directory, a single file)
    // are visible in the host image unless configured as hidden.
    let labs = env.dir.path().join("courselabs");
    std::fs::create_dir_all(&labs).expect("labs");
    std::fs::write(labs.join("lab.txt"), "TOPSECRET-LAB").expect("lab");
    let makefile = format!(
        "all:\n\t@cat {} {} 2>&1; echo end-of-probe\n",
        outside.display(),
        labs.join("lab.txt").display()
    );
    let (_, output) = env.job(4, "host", &makefile, &request(20)).await;
    assert!(
        output.contains("TOPSECRET-OTHER") && output.contains("TOPSECRET-LAB"),
        "the control job should see unhidden host files: {output}"
    );
    let env2 = env_with("t-iso2", |c| {
        c.hidden_paths = vec![outside.clone(), labs.clone()]
    });
    let (_, output) = env2.job(4, "host", &makefile, &request(20)).await;
    assert!(
        output.contains("end-of-probe") && !output.contains("TOPSECRET"),
        "{output}"
    );

    env.sandbox.destroy_vm(&other).await.expect("destroy");
    assert_clean(&env);
    assert_clean(&env2);
}

/// Runs a Python probe of the host's listener on 127.0.0.1:`port` and of the
/// sandbox's own loopback; returns the job's output.
async fn network_probe(env: &TestEnv, id: u64, port: u16, req: &RunRequest) -> String {
    let script = format!(
        "import socket\n\
         try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=3); print('host-reached')\n\
         except OSError as e:\n    print('host-unreachable', e)\n\
         s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); p = s.getsockname()[1]\n\
         c = socket.create_connection(('127.0.0.1', p), timeout=3); print('own-loopback-ok')\n\
         ifaces = sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:])\n\
         print('interfaces', ','.join(ifaces))\n"
    );
    let vm = env.machine(id, "host");
    env.sandbox.initialize_vm(&vm).await.expect("init");
    let inputs = env.inputs(
        id,
        &[
            ("Makefile", "all:\n\t@python3 probe.py\n"),
            ("probe.py", &script),
        ],
    );
    env.sandbox.copy_in(&vm, &inputs).await.expect("copy_in");
    let outcome = env.sandbox.run_job(&vm, req).await.expect("run");
    let dest = env.dir.path().join(format!("out-{id}"));
    env.sandbox.copy_out(&vm, &dest).await.expect("copy_out");
    let output = std::fs::read_to_string(&dest).expect("output");
    env.sandbox.destroy_vm(&vm).await.expect("destroy");
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    output
}

#[tokio::test]
async fn no_network_but_a_private_loopback() {
    require_root!();
    // Every probe stays on loopback addresses.
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();

    let env = env("t-net");
    let output = network_probe(&env, 1, port, &request(20)).await;
    assert!(output.contains("host-unreachable"), "{output}");
    assert!(output.contains("own-loopback-ok"), "{output}");
    // Only loopback: nothing could reach beyond the machine.
    assert!(output.contains("interfaces lo\n"), "{output}");
    assert!(listener.accept().is_err(), "nothing may have connected");
    // allow_network=false wins over a job that does not ask for isolation.
    let mut open_request = request(20);
    open_request.disable_network = false;
    let output = network_probe(&env, 2, port, &open_request).await;
    assert!(output.contains("host-unreachable"), "{output}");
    assert_clean(&env);

    // Control: with the host's network allowed, the same probe gets through
    // (so the checks above can fail), unless the job disables the network.
    let open = env_with("t-net-open", |c| c.allow_network = true);
    let output = network_probe(&open, 3, port, &open_request).await;
    assert!(output.contains("host-reached"), "{output}");
    assert!(listener.accept().is_ok(), "the probe should have connected");
    let output = network_probe(&open, 4, port, &request(20)).await;
    assert!(output.contains("host-unreachable"), "{output}");
    assert_clean(&open);
}

fn host_process_count() -> usize {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .count()
}

#[tokio::test]
async fn a_fork_bomb_is_contained() {
    require_root!();
    let env = env("t-bomb");
    let before = host_process_count();
    // Each shell starts more shells, forever, also when a fork fails.
    let makefile = "all:\n\t@echo bomb; printf 'while :; do sh $$0 & done\\n' > /tmp/b.sh; sh /tmp/b.sh 2>/dev/null\n";
    // RLIMIT_NPROC (1000 here) is above the pids cgroup's 256: the cgroup bites.
    // 15 s: under emulation (scripts/cgroup-v2-vm.sh) the bomb needs long to
    // reach the limit; here dash gives up at the first failed fork.
    let (outcome, output) = env.job(1, "host", makefile, &request(15)).await;
    let after = host_process_count();
    // dash gives up when a fork fails, so the bomb may end before the timeout.
    assert!(
        matches!(outcome.status, RunStatus::TimedOut | RunStatus::Completed),
        "{outcome:?} {output}"
    );
    assert!(
        outcome
            .notes
            .iter()
            .any(|n| n == "The job hit its limit of 256 processes"),
        "{:?}",
        outcome.notes
    );
    assert!(after <= before + 20, "host processes {before} -> {after}");
    assert_clean(&env);
}

#[tokio::test]
async fn a_memory_hog_is_killed_and_told() {
    require_root!();
    let env = env("t-mem");
    let vm = Machine {
        memory_mb: Some(64),
        ..env.machine(1, "host")
    };
    env.sandbox.initialize_vm(&vm).await.expect("init");
    let makefile = "all:\n\t@echo hogging\n\t@python3 -c 'x = bytearray(128 * 1024 * 1024); x[::4096] = b\"x\" * len(x[::4096]); print(\"survived\")'\n";
    let (outcome, output) = env.run_on(&vm, makefile, &request(30)).await;
    env.sandbox.destroy_vm(&vm).await.expect("destroy");
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert!(!output.contains("survived"), "{output}");
    assert!(
        outcome
            .notes
            .iter()
            .any(|n| n == "The job was killed: it exceeded its memory limit of 64 MiB"),
        "{:?} {output}",
        outcome.notes
    );
    assert_clean(&env);
}

#[tokio::test]
async fn a_disk_filler_is_bounded_by_the_vm_tmpfs() {
    require_root!();
    let env = env("t-disk");
    let vm = Machine {
        memory_mb: Some(64),
        ..env.machine(1, "host")
    };
    env.sandbox.initialize_vm(&vm).await.expect("init");
    let makefile = "all:\n\t@dd if=/dev/zero of=big bs=1M count=200 2>&1 | grep -v records; \
                    ls -s --block-size=1M big | sed 's/^/size /'\n";
    let (outcome, output) = env.run_on(&vm, makefile, &request(30)).await;
    env.sandbox.destroy_vm(&vm).await.expect("destroy");
    eprintln!("disk filler: {:?} {output}", outcome.notes);
    let stopped = output.contains("No space left on device") || !outcome.notes.is_empty();
    assert!(stopped, "{outcome:?} {output}");
    if let Some(size) = output.lines().find_map(|l| l.strip_prefix("size ")) {
        let megabytes: u64 = size
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .expect(&output);
        assert!(megabytes <= 64, "{output}");
    }
    assert_clean(&env);
}

#[tokio::test]
async fn dropping_run_job_kills_the_job() {
    require_root!();
    let env = env("t-drop");
    let vm = env.machine(1, "host");
    env.sandbox.initialize_vm(&vm).await.expect("init");
    let inputs = env.inputs(1, &[("Makefile", "all:\n\t@sleep 300\n")]);
    env.sandbox.copy_in(&vm, &inputs).await.expect("copy_in");
    let timed_out = tokio::time::timeout(
        Duration::from_millis(500),
        env.sandbox.run_job(&vm, &request(600)),
    )
    .await;
    assert!(timed_out.is_err(), "the job should still have been running");
    let started = std::time::Instant::now();
    env.sandbox.safe_destroy_vm(&vm).await.expect("destroy");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_clean(&env);
}

#[tokio::test]
async fn hundred_cycles_leave_nothing_behind() {
    require_root!();
    let env = env("t-cycles");
    for id in 0..100 {
        let (outcome, output) = env
            .job(id, "host", "all:\n\t@echo cycle\n", &request(20))
            .await;
        assert_eq!(outcome.status, RunStatus::Completed, "{output}");
        assert!(output.contains("cycle"), "{output}");
    }
    assert!(env
        .sandbox
        .get_vms("t-cycles")
        .await
        .expect("get_vms")
        .is_empty());
    assert_clean(&env);
}

#[tokio::test]
async fn cleanup_leftovers_removes_what_a_previous_run_left() {
    require_root!();
    let env = env("t-left");
    let vm = env.machine(5, "host");
    env.sandbox.initialize_vm(&vm).await.expect("init");
    let keep = Machine::new("t-keep", 6, "host", "sandbox");
    env.sandbox.initialize_vm(&keep).await.expect("init");
    // A new instance over the same data dir, as after a restart.
    let config = SandboxConfig {
        data_dir: env.dir.path().join("data"),
        autodriver: autodriver(),
        cgroup_root_name: CGROUP_ROOT.into(),
        ..SandboxConfig::default()
    };
    let restarted = Sandbox::new(config).expect("new");
    assert_eq!(restarted.get_vms("t-left").await.expect("get_vms").len(), 1);
    assert_eq!(
        restarted
            .cleanup_leftovers("t-left")
            .await
            .expect("cleanup"),
        1
    );
    assert!(restarted
        .get_vms("t-left")
        .await
        .expect("get_vms")
        .is_empty());
    assert!(!restarted.exists_vm(&vm).await.expect("exists"));
    assert!(restarted.exists_vm(&keep).await.expect("exists"));
    restarted.destroy_vm(&keep).await.expect("destroy");
    assert_clean(&env);
}

#[tokio::test]
async fn missing_images_are_rejected() {
    require_root!();
    let env = env("t-img");
    for bad in ["nope", "../etc", "a/b"] {
        let vm = env.machine(1, bad);
        assert!(env.sandbox.initialize_vm(&vm).await.is_err(), "{bad}");
    }
    // A directory that is not a usable rootfs: a clear error naming the gaps.
    std::fs::create_dir_all(env.dir.path().join("data/images/empty/usr")).expect("image dir");
    let err = env
        .sandbox
        .initialize_vm(&env.machine(2, "empty"))
        .await
        .expect_err("empty image");
    assert!(err.to_string().contains("/home"), "{err}");
    assert_clean(&env);
}

const BOOKWORM: &str = "/var/cache/tango-rs/rootfs-bookworm";

#[tokio::test]
async fn a_debootstrap_image() {
    require_root!();
    if !Path::new(BOOKWORM).join(".complete").exists() {
        eprintln!(
            "skipped: no bookworm rootfs at {BOOKWORM} (scripts/build-test-rootfs.sh makes it)"
        );
        return;
    }
    let env = env("t-deb");
    let images = env.dir.path().join("data/images");
    std::os::unix::fs::symlink(BOOKWORM, images.join("bookworm")).expect("symlink image");
    assert!(env
        .sandbox
        .get_images()
        .await
        .expect("images")
        .contains(&"bookworm".to_string()));
    let makefile = "all:\n\t@cat /etc/debian_version\n\t@python3 -c 'print(6*7)'\n\t@ls /work >/dev/null 2>&1 || echo no-host-work\n";
    let (outcome, output) = env.job(1, "bookworm", makefile, &request(30)).await;
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert!(output.contains("\n42\n"), "{output}");
    assert!(output.contains("no-host-work"), "{output}");
    let version =
        std::fs::read_to_string(Path::new(BOOKWORM).join("etc/debian_version")).expect("version");
    assert!(output.contains(version.trim()), "{output}");
    assert_clean(&env);
}

#[tokio::test]
async fn concurrent_jobs() {
    require_root!();
    let env = std::sync::Arc::new(env("t-conc"));
    let mut tasks = Vec::new();
    for id in 0..16 {
        let env = env.clone();
        tasks.push(tokio::spawn(async move {
            let (outcome, output) = env
                .job(
                    id,
                    "host",
                    &format!("all:\n\t@echo job-{id}\n"),
                    &request(20),
                )
                .await;
            assert_eq!(outcome.status, RunStatus::Completed, "{output}");
            assert!(output.contains(&format!("job-{id}")), "{output}");
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    assert_clean(&env);
}

/// Descriptors tangod holds (its listening socket, its database, files
/// opened without close-on-exec) never reach the processes of a job: a
/// sandbox still being set up or a job still running after tangod died
/// would otherwise keep them open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_descriptors_stay_out_of_the_sandbox() {
    require_root!();
    let env = env("t-fds");
    let marker = env.dir.path().join("server-only");
    std::fs::write(&marker, "tangod's own file").expect("marker");
    let marker_c = std::ffi::CString::new(marker.to_string_lossy().as_bytes()).expect("path");
    // Deliberately without O_CLOEXEC.
    let leaked = unsafe { libc::open(marker_c.as_ptr(), libc::O_RDONLY) };
    assert!(leaked >= 0);
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");

    let vm = env.machine(1, "host");
    env.sandbox.initialize_vm(&vm).await.expect("init");
    let inputs = env.inputs(1, &[("Makefile", "all:\n\t@sleep 3\n")]);
    env.sandbox.copy_in(&vm, &inputs).await.expect("copy_in");
    // The VM's cgroup lists the job's processes: C1, the autodriver, make
    // and sleep once it runs.
    // (v1: one per hierarchy, all listing the same processes; v2: one.)
    let procs_file = env
        .leftover_cgroups()
        .first()
        .expect("the VM's cgroup")
        .join("cgroup.procs");
    let socket_inode = {
        use std::os::unix::fs::MetadataExt;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .expect("socket")
            .ino()
    };
    let watch = async {
        let mut seen = 0;
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(2) {
            let pids = std::fs::read_to_string(&procs_file).unwrap_or_default();
            for pid in pids.lines() {
                let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                    continue;
                };
                for fd in fds.flatten() {
                    let Ok(target) = std::fs::read_link(fd.path()) else {
                        continue;
                    };
                    seen += 1;
                    assert_ne!(target, marker, "pid {pid} holds the server's file");
                    assert_ne!(
                        target.to_string_lossy(),
                        format!("socket:[{socket_inode}]"),
                        "pid {pid} holds the server's socket"
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen
    };
    let req = request(20);
    let (outcome, seen) = tokio::join!(env.sandbox.run_job(&vm, &req), watch);
    assert!(seen > 0, "never saw the job's processes");
    let outcome = outcome.expect("run_job");
    assert_eq!(outcome.status, RunStatus::Completed);
    env.sandbox.destroy_vm(&vm).await.expect("destroy");
    unsafe { libc::close(leaked) };
    drop(listener);
    assert_clean(&env);
}

/// A job starts at ten times the default CPU weight, has the default after
/// 50 ms and a tenth of it after a second (short jobs beside it keep their
/// latency, even beside hostile jobs that are just starting); the VM rests
/// at the default between jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_job_yields_contended_cpu() {
    require_root!();
    let env = env("t-prio");
    let vm = env.machine(1, "host");
    env.sandbox.initialize_vm(&vm).await.expect("init");
    let weight_file = env
        .leftover_cgroups()
        .into_iter()
        .flat_map(|dir| [dir.join("cpu.shares"), dir.join("cpu.weight")])
        .find(|file| file.exists());
    let Some(weight_file) = weight_file else {
        eprintln!("skipping: no cpu controller for the VM");
        return;
    };
    let weight = || {
        std::fs::read_to_string(&weight_file)
            .expect("weight")
            .trim()
            .to_string()
    };
    let default = weight();
    let inputs = env.inputs(1, &[("Makefile", "all:\n\t@sleep 2\n")]);
    env.sandbox.copy_in(&vm, &inputs).await.expect("copy_in");
    let req = request(20);
    let start = std::time::Instant::now();
    let watch = async {
        // The distinct weights seen over the first 300 ms, and when the
        // first was read.
        let mut seen: Vec<String> = Vec::new();
        let mut first_read = None;
        while start.elapsed() < Duration::from_millis(300) {
            let w = weight();
            first_read.get_or_insert(start.elapsed());
            if seen.last() != Some(&w) {
                seen.push(w);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(1300)).await;
        (seen, first_read, weight())
    };
    let (outcome, (early, first_read, during)) =
        tokio::join!(env.sandbox.run_job(&vm, &req), watch);
    assert_eq!(outcome.expect("run_job").status, RunStatus::Completed);
    let fresh = if default == "1024" { "10240" } else { "1000" };
    match first_read {
        // A stalled test thread may first look after the fresh period.
        Some(at) if at < Duration::from_millis(40) => {
            assert_eq!(early, [fresh, &default], "weights over the first 300 ms")
        }
        _ => eprintln!("not checking the fresh weight: first read at {first_read:?}"),
    }
    assert_ne!(during, default, "a long job keeps the default CPU weight");
    assert!(during == "102" || during == "10", "{during}");

    let (outcome, output) = env.run_on(&vm, "all:\n\t@true\n", &req).await;
    assert_eq!(outcome.status, RunStatus::Completed, "{output}");
    assert_eq!(weight(), default, "the next job started demoted");
    env.sandbox.destroy_vm(&vm).await.expect("destroy");
    assert_clean(&env);
}
