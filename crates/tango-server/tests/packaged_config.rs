//! The Debian package's /etc/tango-rs/tangod.toml (deploy/debian/tangod.toml)
//! against the real `tangod --print-config`: it loads, it names every
//! setting, and each commented-out setting shows its real default. Also the
//! key file (`key_file`, `--key-file`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn packaged_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/debian/tangod.toml")
}

fn tangod(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tangod"))
        .args(args)
        .env_remove("RESTFUL_KEY")
        .env_remove("TANGO_AUTODRIVER")
        .output()
        .expect("run tangod")
}

/// `tangod --print-config` with these arguments, parsed.
fn print_config(args: &[&std::ffi::OsStr]) -> toml::Table {
    let mut all = args.to_vec();
    all.push("--print-config".as_ref());
    let out = tangod(&all);
    assert!(
        out.status.success(),
        "tangod {args:?} --print-config failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    toml::from_str(&String::from_utf8_lossy(&out.stdout)).expect("--print-config prints TOML")
}

/// Every leaf setting as (dotted path, value); arrays of tables count as one.
fn leaves(table: &toml::Table, prefix: &str, out: &mut Vec<(String, toml::Value)>) {
    for (key, value) in table {
        let path = format!("{prefix}{key}");
        match value {
            toml::Value::Table(t) if !t.is_empty() => leaves(t, &format!("{path}."), out),
            _ => out.push((path, value.clone())),
        }
    }
}

fn lookup<'a>(table: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    let mut parts = path.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

/// The packaged file with its commented-out settings (`#name = value`,
/// `#[[table]]`; explanations are `# text`) switched on.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest) if !rest.is_empty() && !rest.starts_with([' ', '#']) => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn packaged_config_names_every_setting_with_its_default() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "packaged-test-key\n").unwrap();
    let text = std::fs::read_to_string(packaged_config()).unwrap();
    let all_on = dir.path().join("all-on.toml");
    std::fs::write(&all_on, uncommented(&text)).unwrap();

    // As shipped: the package's own settings, the key from the key file.
    let shipped = print_config(&[
        "--config".as_ref(),
        packaged_config().as_os_str(),
        "--key-file".as_ref(),
        key.as_os_str(),
    ]);
    assert_eq!(shipped["data_dir"].as_str(), Some("/var/lib/tango-rs"));
    assert_eq!(
        shipped["autodriver"].as_str(),
        Some("/usr/lib/tango-rs/autodriver")
    );
    assert_eq!(
        shipped["keys"].as_array().unwrap(),
        &vec![toml::Value::from("packaged-test-key")]
    );

    // Every commented-out setting is a real one (tangod refuses unknown
    // settings), and shows the default that tangod prints.
    let defaults = print_config(&[]);
    let on = print_config(&[
        "--config".as_ref(),
        all_on.as_os_str(),
        "--key-file".as_ref(),
        key.as_os_str(),
    ]);
    let mut settings = Vec::new();
    leaves(&defaults, "", &mut settings);
    assert!(
        settings.len() >= 50,
        "only {} settings printed",
        settings.len()
    );
    // The package's own values, and what the file's examples set.
    let package_values = [
        "data_dir",
        "keys",
        "pools",
        "courselabs",
        "ec2.images",
        "docker.hosts",
    ];
    let mut wrong = Vec::new();
    for (path, default) in &settings {
        match lookup(&on, path) {
            None => wrong.push(format!("{path}: missing")),
            Some(value) if value != default && !package_values.contains(&path.as_str()) => {
                wrong.push(format!("{path}: {value} in the file, default {default}"))
            }
            Some(_) => {}
        }
        let name = path.rsplit('.').next().unwrap();
        let named = |l: &str| {
            let l = l.strip_prefix('#').unwrap_or(l);
            l.starts_with(&format!("{name} = "))
                || l == format!("[{path}]")
                || l == format!("[[{path}]]")
        };
        if !text.lines().any(named) {
            wrong.push(format!("{path}: no line sets it"));
        }
    }
    assert!(
        wrong.is_empty(),
        "deploy/debian/tangod.toml against `tangod --print-config`:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn key_file_is_read_trimmed_and_refused_when_empty_or_missing() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "  from-file\n\n").unwrap();
    let config = dir.path().join("tangod.toml");
    std::fs::write(&config, format!("key_file = {:?}\n", key)).unwrap();
    let printed = print_config(&["--config".as_ref(), config.as_os_str()]);
    assert_eq!(
        printed["keys"].as_array().unwrap(),
        &vec![toml::Value::from("from-file")]
    );

    std::fs::write(&key, "\n").unwrap();
    let out = tangod(&[
        "--key-file".as_ref(),
        key.as_os_str(),
        "--print-config".as_ref(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is empty"), "{err}");
    assert!(err.contains(&*key.to_string_lossy()), "{err}");

    let missing = dir.path().join("no-such-key");
    let out = tangod(&[
        "--key-file".as_ref(),
        missing.as_os_str(),
        "--print-config".as_ref(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cannot read the key file"), "{err}");
    assert!(err.contains(&*missing.to_string_lossy()), "{err}");
}

/// Tango's DOCKER_DEPLOYMENT names the VM prefix, lowercased as Tango does;
/// a value Docker would refuse in a container name stops tangod at start,
/// naming the variable.
#[test]
fn docker_deployment_sets_the_prefix_and_a_bad_one_is_refused() {
    let run = |value: &str| {
        Command::new(env!("CARGO_BIN_EXE_tangod"))
            .args(["--print-config", "--key", "k"])
            .env("DOCKER_DEPLOYMENT", value)
            .output()
            .expect("run tangod")
    };
    let out = run("Prod-2");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: toml::Table = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(
        lookup(&printed, "engine.prefix").and_then(|v| v.as_str()),
        Some("prod-2")
    );
    for bad in ["my course", "-x", "a:b"] {
        let out = run(bad);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "DOCKER_DEPLOYMENT={bad:?} was taken");
        assert!(
            stderr.contains("DOCKER_DEPLOYMENT") && stderr.contains("cannot prefix VM names"),
            "DOCKER_DEPLOYMENT={bad:?}: {stderr}"
        );
    }
}

/// The scheduling settings (issue 20) as `--print-config` shows them, and
/// the mistakes tangod refuses at start, each with what to do instead.
#[test]
fn scheduling_settings_are_printed_and_mistakes_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tangod.toml");
    let with = |text: &str| {
        std::fs::write(&config, text).unwrap();
        tangod(&[
            "--config".as_ref(),
            config.as_os_str(),
            "--print-config".as_ref(),
        ])
    };
    let out = with(
        "[engine]\nscheduling = \"fifo\"\nmax_queued_per_submitter = 20\n\n\
         [[courselabs]]\nname = \"15213-f26-*\"\nweight = 3\nmax_running = 8\n\n\
         [[courselabs]]\nname = \"15122-?26-lab\"\n",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let printed: toml::Table = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(
        lookup(&printed, "engine.scheduling").and_then(|v| v.as_str()),
        Some("fifo")
    );
    assert_eq!(
        lookup(&printed, "engine.max_queued_per_submitter").and_then(|v| v.as_integer()),
        Some(20)
    );
    let courselabs = printed["courselabs"].as_array().unwrap();
    assert_eq!(courselabs.len(), 2);
    assert_eq!(courselabs[0]["name"].as_str(), Some("15213-f26-*"));
    assert_eq!(courselabs[0]["weight"].as_integer(), Some(3));
    assert_eq!(courselabs[0]["max_running"].as_integer(), Some(8));
    // Defaults: weight 1, no cap.
    assert_eq!(courselabs[1]["weight"].as_integer(), Some(1));
    assert!(courselabs[1].get("max_running").is_none());
    let defaults = print_config(&[]);
    assert_eq!(
        lookup(&defaults, "engine.scheduling").and_then(|v| v.as_str()),
        Some("fair")
    );
    assert!(lookup(&defaults, "engine.max_queued_per_submitter").is_none());

    for (text, words) in [
        (
            "[[courselabs]]\nname = \"a-*\"\nweight = 0\n",
            &["\"a-*\"", "weight = 0", "from 1"][..],
        ),
        (
            "[[courselabs]]\nname = \"a\"\nmax_running = 0\n",
            &["max_running = 0", "leave max_running out"][..],
        ),
        (
            "[[courselabs]]\nname = \"lab[12]\"\n",
            &["\"lab[12]\"", "only `*` and `?` are wildcards"][..],
        ),
        (
            "[[courselabs]]\nname = \"a\"\n\n[[courselabs]]\nname = \"a\"\n",
            &["listed twice"][..],
        ),
        (
            "[engine]\nmax_queued_per_submitter = 0\n",
            &["max_queued_per_submitter = 0", "1 or more"][..],
        ),
        (
            "[engine]\nscheduling = \"lottery\"\n",
            &["lottery", "fair", "fifo"][..],
        ),
        (
            "[[courselabs]]\nname = \"a\"\nwieght = 2\n",
            &["wieght"][..],
        ),
    ] {
        let out = with(text);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text:?} was taken");
        for word in words {
            assert!(stderr.contains(word), "{text:?}: {word:?} not in {stderr}");
        }
    }
}
