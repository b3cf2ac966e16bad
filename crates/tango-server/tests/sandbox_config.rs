//! The `[sandbox]` settings of tangod's config reach the backend.

mod common;

use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_paths_are_hidden_from_jobs_on_the_host_image() {
    if !root_or_skip("hidden_paths_are_hidden_from_jobs_on_the_host_image") {
        return;
    }
    // Not under /tmp: the sandbox replaces it, which would hide it anyway.
    let secrets = tempfile::tempdir_in("/var/lib").unwrap();
    std::fs::write(secrets.path().join("key"), "HOST-SECRET").unwrap();
    std::fs::set_permissions(
        secrets.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let visible = tempfile::tempdir_in("/var/lib").unwrap();
    std::fs::write(visible.path().join("key"), "VISIBLE").unwrap();
    std::fs::set_permissions(
        visible.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for dir in [secrets.path(), visible.path()] {
        std::fs::set_permissions(
            dir.join("key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let server = Tangod::start(
        &dir.path().join("data"),
        &format!(
            "[sandbox]\nhidden_paths = [{:?}, \"/no/such/path\"]\n",
            secrets.path()
        ),
    );
    let c = server.client();
    c.open("lab").await;
    let makefile = format!(
        "all:\n\t@cat {}/key || echo secret-hidden\n\t@cat {}/key\n",
        secrets.path().display(),
        visible.path().display()
    );
    c.upload("lab", "Makefile", makefile.as_bytes()).await;
    let v = c
        .add_job("lab", &job("hidden", "hidden.out", None, 20))
        .await;
    assert_eq!(v["statusMsg"], "Job added", "{v}");
    let out = c
        .wait_output("lab", "hidden.out", Duration::from_secs(30))
        .await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("secret-hidden"), "{out}");
    assert!(!out.contains("HOST-SECRET"), "{out}");
    assert!(out.contains("VISIBLE"), "{out}");
}

/// The `--config` file holds the keys: jobs on the host image never see it,
/// even when it is world-readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_file_is_hidden_from_jobs_on_the_host_image() {
    if !root_or_skip("the_config_file_is_hidden_from_jobs_on_the_host_image") {
        return;
    }
    // Not under /tmp: the sandbox replaces it, which would hide it anyway.
    let dir = tempfile::tempdir_in("/var/lib").unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let server = Tangod::start(&dir.path().join("data"), "# CONFIG-FILE-MARKER\n");
    let config = server.config.clone().expect("a config file");
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let c = server.client();
    c.open("lab").await;
    let makefile = format!(
        "all:\n\t@echo reading; cat {} 2>&1 || true\n\t@echo done\n",
        config.display()
    );
    c.upload("lab", "Makefile", makefile.as_bytes()).await;
    let v = c
        .add_job("lab", &job("config", "config.out", None, 20))
        .await;
    assert_eq!(v["statusMsg"], "Job added", "{v}");
    let out = c
        .wait_output("lab", "config.out", Duration::from_secs(30))
        .await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("done"), "{out}");
    assert!(!out.contains("CONFIG-FILE-MARKER"), "{out}");
    assert!(!out.contains("prefix ="), "{out}");
}
