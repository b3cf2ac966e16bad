//! The static (musl) binary in a minimal busybox root, installed set-uid
//! root and started by an unprivileged user, as Tango's images use it.
//! busybox has no make, so the root gets a two-line `make` script that runs
//! the job's `job.sh`: what is tested is the driver, not make.
//! /proc is deliberately not mounted in the root: the driver must still
//! kill the job's daemons (checked from outside through the host's /proc).

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const GRADER: u32 = 64020;
const CALLER: u32 = 64021;

fn target_dir() -> PathBuf {
    // .../<target>/debug/autodriver
    Path::new(BIN)
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf()
}

/// Builds the musl binary into its own target directory (the outer cargo
/// holds the lock of ours). `AUTODRIVER_MUSL_BIN` skips the build.
fn musl_binary() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("AUTODRIVER_MUSL_BIN") {
        return Some(PathBuf::from(path));
    }
    let build_dir = target_dir().join("musl-for-tests");
    let output = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "-p",
            "autodriver",
            "--target",
            "x86_64-unknown-linux-musl",
        ])
        .env("CARGO_TARGET_DIR", &build_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    if !output.status.success() {
        skip(&format!(
            "static_chroot: cannot build the musl binary:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
        return None;
    }
    Some(build_dir.join("x86_64-unknown-linux-musl/release/autodriver"))
}

fn mkdir(path: &Path, mode: u32, owner: u32) {
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    std::os::unix::fs::chown(path, Some(owner), Some(owner)).unwrap();
}

fn write(path: &Path, text: &str, mode: u32, owner: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    std::os::unix::fs::chown(path, Some(owner), Some(owner)).unwrap();
}

fn build_root(root: &Path, driver: &Path, grader: u32, caller: u32) {
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "dev", "home", "var",
    ] {
        mkdir(&root.join(dir), 0o755, 0);
    }
    for dir in ["tmp", "var/tmp", "dev/shm"] {
        mkdir(&root.join(dir), 0o1777, 0);
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    // A child forked meanwhile by the other test's thread can hold the
    // copy's write descriptor until it execs (ETXTBSY): try again then.
    let mut attempts = 0;
    loop {
        let out = Command::new("chroot")
            .arg(root)
            .args(["/bin/busybox", "--install", "-s"])
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        attempts += 1;
        assert!(
            stderr.contains("Text file busy") && attempts < 20,
            "busybox --install failed: {stderr}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let null = std::ffi::CString::new(root.join("dev/null").to_str().unwrap()).unwrap();
    let made = unsafe { libc::mknod(null.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    assert_eq!(
        made,
        0,
        "mknod /dev/null: {}",
        std::io::Error::last_os_error()
    );
    // mknod's mode went through the umask.
    std::fs::set_permissions(
        root.join("dev/null"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    write(
        &root.join("etc/passwd"),
        &format!(
            "root:x:0:0:root:/root:/bin/sh\nautograde:x:{grader}:{grader}::/home/autograde:/bin/sh\n\
             caller:x:{caller}:{caller}::/home/caller:/bin/sh\n"
        ),
        0o644,
        0,
    );
    write(
        &root.join("usr/bin/make"),
        "#!/bin/sh\nexec /bin/sh ./job.sh\n",
        0o755,
        0,
    );
    std::fs::copy(driver, root.join("autodriver")).unwrap();
    std::os::unix::fs::chown(root.join("autodriver"), Some(0), Some(0)).unwrap();
    std::fs::set_permissions(
        root.join("autodriver"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    mkdir(&root.join("home/caller"), 0o755, caller);
}

fn as_caller(root: &Path, args: &[&str]) -> Outcome {
    as_user(root, CALLER, args)
}

fn as_user(root: &Path, caller: u32, args: &[&str]) -> Outcome {
    let output = Command::new("chroot")
        .arg(format!("--userspec={caller}:{caller}"))
        .arg(root)
        .arg("/autodriver")
        .args(args)
        .output()
        .unwrap();
    Outcome {
        code: output.status.code().unwrap_or(-1),
        stdout: output.stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        elapsed: Default::default(),
    }
}

fn on_nosuid_mount(path: &Path) -> bool {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statvfs(c.as_ptr(), &mut stats) == 0 && stats.f_flag & libc::ST_NOSUID != 0 }
}

/// A busybox root with the set-uid static driver (kept while the returned
/// directory lives), or `None` after saying why the test is skipped.
fn busybox_root(test: &str, grader: u32, caller: u32) -> Option<tempfile::TempDir> {
    if !root_or_skip(test) {
        return None;
    }
    if !Path::new("/bin/busybox").exists() {
        skip(&format!("{test}: /bin/busybox is missing"));
        return None;
    }
    let driver = musl_binary()?;
    let size = std::fs::metadata(&driver).unwrap().len();
    assert!(size < 2 * 1024 * 1024, "the static binary is {size} bytes");

    let roots = target_dir().join("musl-for-tests");
    std::fs::create_dir_all(&roots).unwrap();
    let holder = tempfile::Builder::new()
        .prefix("root-")
        .tempdir_in(&roots)
        .unwrap();
    if on_nosuid_mount(holder.path()) {
        skip(&format!("{test}: {} is nosuid", roots.display()));
        return None;
    }
    std::fs::set_permissions(holder.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    build_root(holder.path(), &driver, grader, caller);
    Some(holder)
}

#[test]
fn setuid_static_binary_in_a_busybox_root() {
    let Some(holder) = busybox_root("setuid_static_binary_in_a_busybox_root", GRADER, CALLER)
    else {
        return;
    };
    let root = holder.path();

    let job = root.join("home/caller/job");
    mkdir(&job, 0o755, CALLER);
    write(
        &job.join("Makefile"),
        "all:\n\t@echo unused\n",
        0o644,
        CALLER,
    );
    write(
        &job.join("job.sh"),
        "echo \"ids $(id -u) $(id -g) [$(id -G)]\"\n\
         echo \"home=$HOME pwd=$(pwd) user=$USER\"\n\
         setsid sh -c 'touch /tmp/daemon-up; exec sleep 1000' > /dev/null 2>&1 &\n\
         while [ ! -e /tmp/daemon-up ]; do sleep 0.05; done\n\
         echo litter > /tmp/litter\n\
         echo done\n",
        0o644,
        CALLER,
    );
    let out = as_caller(root, &["-t", "20", "-u", "50", "/home/caller/job"]);
    assert_eq!(
        out.text(),
        format!(
            "Autodriver: Job exited with status 0\nids {GRADER} {GRADER} [{GRADER}]\n\
             home=/home/autograde pwd=/home/autograde/job user=autograde\ndone\n"
        ),
        "stderr: {}",
        out.stderr
    );
    assert_eq!(out.code, 0);
    assert!(
        out.stderr.contains("/proc is not mounted"),
        "{}",
        out.stderr
    );
    assert_eq!(processes_of(GRADER), Vec::<String>::new());
    assert!(!root.join("tmp/litter").exists());
    assert!(!root.join("tmp/daemon-up").exists());
    assert!(!job.exists());
    let home = std::fs::metadata(root.join("home/autograde")).unwrap();
    assert_eq!((home.uid(), home.mode() & 0o777), (GRADER, 0o700));
    assert_eq!(
        std::fs::read_dir(root.join("home/autograde"))
            .unwrap()
            .count(),
        0
    );

    // What a set-uid driver refuses: a home of the caller's choosing, a
    // directory the caller does not own, and writing files as root.
    mkdir(&job, 0o755, CALLER);
    let out = as_caller(root, &["--home", "/home/elsewhere", "/home/caller/job"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    mkdir(&root.join("home/rootjob"), 0o755, 0);
    let out = as_caller(root, &["/home/rootjob"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(root.join("home/rootjob").exists());
    let out = as_caller(
        root,
        &["--summary", "/etc/summary.json", "/home/caller/job"],
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(!root.join("etc/summary.json").exists());
    let out = as_caller(root, &["--user", &CALLER.to_string(), "/home/caller/job"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
}

/// Tango's own Docker flow: root copies the job's files into the caller's
/// directory (`cp -r mount/* autolab/`), then the caller runs the set-uid
/// driver. Root's copies must become the grader's, as Tango's `chown -R`
/// made them, or the job cannot append to its handin or `chmod` a script.
/// A regular file with a second hard link stays root's (the caller could
/// have linked any root file in), and a root symlink's target is untouched.
#[test]
fn root_copied_input_files_go_to_the_grader() {
    const GRADER: u32 = 64025;
    const CALLER: u32 = 64026;
    let Some(holder) = busybox_root("root_copied_input_files_go_to_the_grader", GRADER, CALLER)
    else {
        return;
    };
    let root = holder.path();
    let job = root.join("home/caller/job");
    mkdir(&job, 0o755, CALLER);
    write(&job.join("Makefile"), "all:\n\t@echo unused\n", 0o644, 0);
    write(
        &job.join("job.sh"),
        "stat -c '%u %n' handin.txt src src/main.c rootlink linked\n\
         echo more >> handin.txt && echo appended\n\
         chmod +x job.sh && echo chmodded\n\
         echo new > src/new.txt && echo edit >> src/main.c && echo subdir-writable\n\
         if { echo x >> linked; } 2>/dev/null; then echo linked-writable; else echo linked-kept; fi\n",
        0o644,
        0,
    );
    write(&job.join("handin.txt"), "handin\n", 0o644, 0);
    mkdir(&job.join("src"), 0o755, 0);
    write(&job.join("src/main.c"), "int main;\n", 0o644, 0);
    let secret = root.join("etc/secret");
    write(&secret, "secret\n", 0o644, 0);
    std::fs::hard_link(&secret, job.join("linked")).unwrap();
    std::os::unix::fs::symlink("/etc/secret", job.join("rootlink")).unwrap();

    let out = as_user(root, CALLER, &["-t", "20", "/home/caller/job"]);
    assert_eq!(
        out.text(),
        format!(
            "Autodriver: Job exited with status 0\n\
             {GRADER} handin.txt\n{GRADER} src\n{GRADER} src/main.c\n{GRADER} rootlink\n0 linked\n\
             appended\nchmodded\nsubdir-writable\nlinked-kept\n"
        ),
        "stderr: {}",
        out.stderr
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let kept = std::fs::symlink_metadata(&secret).unwrap();
    assert_eq!((kept.uid(), kept.mode() & 0o7777), (0, 0o644));
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "secret\n");
    // Only root's linked file is left of the job once the grader's are gone.
    let left: Vec<String> = std::fs::read_dir(root.join("home/autograde/job"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["linked"]);
    assert_eq!(processes_of(GRADER), Vec::<String>::new());
}
