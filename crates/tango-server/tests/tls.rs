//! HTTPS: tangod with --tls-cert/--tls-key (a CA and certificates made here
//! with rcgen), a job end to end over HTTPS with its callback to an HTTPS
//! receiver of a private CA, a renewed certificate served without a
//! restart, and the `tango` client's --ca-cert.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const HELLO_MAKEFILE: &[u8] =
    b"all:\n\t@echo 'Hello, TLS!'\n\t@echo '{\"scores\": {\"tls\": 100}}'\n";

struct Ca {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn new_ca(name: &str) -> Ca {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: rcgen::Issuer::new(params, key),
    }
}

/// A server certificate for 127.0.0.1 and localhost with a fresh key.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

fn new_leaf(ca: &Ca) -> Leaf {
    let mut params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    params
        .extended_key_usages
        .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

/// Replaces a file the way certbot and editors do: a new file renamed over
/// the old.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Files {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn write_leaf(dir: &Path, name: &str, ca: &Ca, leaf: &Leaf) -> Files {
    let files = Files {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&files.ca, &ca.pem).unwrap();
    replace(&files.cert, &leaf.cert_pem);
    replace(&files.key, &leaf.key_pem);
    files
}

/// The certificate a new HTTPS connection to `url` is shown (DER).
async fn served_cert(url: &str, ca: &Path) -> Vec<u8> {
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap())
        .tls_info(true)
        .build()
        .unwrap();
    let answer = http.get(format!("{url}/")).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    answer
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .expect("a TLS connection shows its certificate")
        .to_vec()
}

/// tangod serving HTTPS with `server`'s files, trusting `callback_ca` for
/// callbacks.
fn start_tangod(data: &Path, server: &Files, callback_ca: &Path) -> Tangod {
    let config = format!(
        "tls_cert = {:?}\ntls_key = {:?}\ncallback_ca_cert = {:?}\n",
        server.cert, server.key, callback_ca
    );
    Tangod::start_https(data, &config, &server.ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_https_with_an_https_callback_and_a_renewal() {
    if !root_or_skip("a_job_over_https_with_an_https_callback_and_a_renewal") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // tangod's certificate and Autolab's come from two private CAs: each
    // side trusts only the one it is given.
    let server_ca = new_ca("tangod test CA");
    let first = new_leaf(&server_ca);
    let server = write_leaf(dir.path(), "server", &server_ca, &first);
    let autolab_ca = new_ca("autolab test CA");
    let autolab = write_leaf(dir.path(), "autolab", &autolab_ca, &new_leaf(&autolab_ca));
    let receiver = Receiver::start_https(&autolab.cert, &autolab.key).await;

    let mut t = start_tangod(&dir.path().join("data"), &server, &autolab.ca);
    assert!(t.url.starts_with("https://"), "{}", t.url);
    let c = t.client();
    assert_eq!(c.open("tlslab").await["statusId"], 0);
    assert_eq!(
        c.upload("tlslab", "Makefile", HELLO_MAKEFILE).await["statusId"],
        0
    );
    let callback = receiver.url_for("tlscb");
    assert!(callback.starts_with("https://"), "{callback}");
    let v = c
        .add_job("tlslab", &job("tlsjob", "tls.out", Some(&callback), 30))
        .await;
    assert_eq!(v["statusId"], 0, "{v}");
    receiver.wait_for(1, Duration::from_secs(60)).await;
    let got = receiver.get("tlscb");
    assert_eq!(got.len(), 1, "{got:?}");
    let body = String::from_utf8_lossy(&got[0].body);
    assert!(body.contains("Hello, TLS!"), "callback body: {body}");
    assert_eq!(got[0].filename_header, "tls.out");
    let polled = c
        .wait_output("tlslab", "tls.out", Duration::from_secs(10))
        .await;
    assert_eq!(polled, got[0].body);

    // A client that connects and says nothing holds up no one (nor, below,
    // the shutdown).
    let idle = std::net::TcpStream::connect(t.url.trim_start_matches("https://")).unwrap();
    assert_eq!(served_cert(&t.url, &server.ca).await, first.der);
    // Plain HTTP to the HTTPS port fails its handshake; the server goes on.
    let plain = t.url.replacen("https://", "http://", 1);
    let answer = reqwest::get(format!("{plain}/")).await;
    assert!(
        answer.as_ref().map_or(true, |a| !a.status().is_success()),
        "plain HTTP was answered: {answer:?}"
    );
    assert_eq!(served_cert(&t.url, &server.ca).await, first.der);

    // A renewal: a new key and certificate renamed over the files.
    let renewed = new_leaf(&server_ca);
    assert_ne!(renewed.der, first.der);
    replace(&server.key, &renewed.key_pem);
    replace(&server.cert, &renewed.cert_pem);
    assert_eq!(
        served_cert(&t.url, &server.ca).await,
        renewed.der,
        "the renewed certificate is not served; log:\n{}",
        t.log()
    );
    assert!(t.log().contains("TLS certificate reloaded"), "{}", t.log());

    // A broken file (a renewal half written) keeps the last good one.
    replace(&server.cert, "-----BEGIN CERTIFICATE-----\nnot base64\n");
    assert_eq!(served_cert(&t.url, &server.ca).await, renewed.der);
    // A certificate whose key is not the one in the key file, too.
    replace(&server.cert, &new_leaf(&server_ca).cert_pem);
    assert_eq!(served_cert(&t.url, &server.ca).await, renewed.der);
    assert!(
        t.log().contains("keeping the previous TLS certificate"),
        "{}",
        t.log()
    );
    // Once the pair is whole again, it is served.
    let third = new_leaf(&server_ca);
    replace(&server.key, &third.key_pem);
    replace(&server.cert, &third.cert_pem);
    assert_eq!(served_cert(&t.url, &server.ca).await, third.der);

    // The server never restarted: the job's records are still there.
    let info = c.get(&format!("/info/{KEY}/")).await;
    assert_eq!(info["statusId"], 0, "{info}");
    assert!(
        t.log().matches("tangod serving").count() == 1,
        "{}",
        t.log()
    );

    // SIGTERM stops an HTTPS server as it does a plain one.
    let status = t.sigterm();
    assert!(status.success(), "{status}: {}", t.log());
    assert!(t.log().contains("stopping: no new jobs"), "{}", t.log());
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_to_an_untrusted_certificate_is_not_delivered() {
    if !root_or_skip("a_callback_to_an_untrusted_certificate_is_not_delivered") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server_ca = new_ca("tangod test CA");
    let server = write_leaf(dir.path(), "server", &server_ca, &new_leaf(&server_ca));
    let autolab_ca = new_ca("autolab test CA");
    let autolab = write_leaf(dir.path(), "autolab", &autolab_ca, &new_leaf(&autolab_ca));
    let receiver = Receiver::start_https(&autolab.cert, &autolab.key).await;
    // tangod is told to trust its own CA for callbacks, not Autolab's.
    let t = start_tangod(&dir.path().join("data"), &server, &server.ca);
    let c = t.client();
    c.open("tlslab").await;
    c.upload("tlslab", "Makefile", HELLO_MAKEFILE).await;
    let callback = receiver.url_for("untrusted");
    let v = c
        .add_job("tlslab", &job("tlsjob", "tls.out", Some(&callback), 30))
        .await;
    assert_eq!(v["statusId"], 0, "{v}");
    c.wait_output("tlslab", "tls.out", Duration::from_secs(60))
        .await;
    // The engine logs each failed attempt (tango_core=debug), saying why.
    let start = std::time::Instant::now();
    while !t.log().contains("callback failed") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no failed callback attempt in the log:\n{}",
            t.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = t.log();
    let line = log
        .lines()
        .find(|l| l.contains("callback failed"))
        .unwrap_or_default();
    assert!(line.contains("invalid peer certificate"), "{line}");
    assert!(line.contains("callback_ca_cert"), "{line}");
    assert_eq!(receiver.count(), 0);
}

/// The `tango` client: $TANGO_BIN, else built into the target directory
/// tangod is in.
fn tango_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("TANGO_BIN") {
        return PathBuf::from(bin);
    }
    let tangod = PathBuf::from(env!("CARGO_BIN_EXE_tangod"));
    let profile_dir = tangod.parent().unwrap();
    let target = profile_dir.parent().unwrap();
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", "-p", "tango-cli", "--bin", "tango"])
        .env("CARGO_TARGET_DIR", target);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    assert!(build.status().unwrap().success(), "building tango failed");
    profile_dir.join("tango")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tango_client_verifies_the_certificate() {
    if !root_or_skip("the_tango_client_verifies_the_certificate") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("tangod test CA");
    let server = write_leaf(dir.path(), "server", &ca, &new_leaf(&ca));
    let t = start_tangod(&dir.path().join("data"), &server, &server.ca);
    let tango = tango_bin();
    let run = |extra: &[&str], env_ca: Option<&Path>| {
        let mut cmd = Command::new(&tango);
        cmd.args(["--url", &t.url, "--key", KEY, "--json"])
            .args(extra)
            .arg("info")
            .env_remove("TANGO_CA_CERT")
            .env_remove("SSL_CERT_FILE")
            .env("HOME", dir.path());
        if let Some(ca) = env_ca {
            cmd.env("TANGO_CA_CERT", ca);
        }
        cmd.output().unwrap()
    };
    let ca_arg = server.ca.to_str().unwrap();
    let out = run(&["--ca-cert", ca_arg], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("\"statusId\": 0") || stdout.contains("\"statusId\":0"),
        "{stdout}"
    );
    let out = run(&[], Some(&server.ca));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Without the CA the certificate is refused, and the message says what
    // to do.
    let out = run(&[], None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--ca-cert"), "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");
    assert!(!stderr.contains(KEY), "the key leaked: {stderr}");
    // A CA in the host's trust store (here the bundle in SSL_CERT_FILE, as
    // the container image sets it) is trusted without --ca-cert.
    let out = Command::new(&tango)
        .args(["--url", &t.url, "--key", KEY, "info"])
        .env_remove("TANGO_CA_CERT")
        .env("SSL_CERT_FILE", &server.ca)
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "a CA in SSL_CERT_FILE was not trusted: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nor does another CA do.
    let other = new_ca("another CA");
    let other_file = dir.path().join("other-ca.pem");
    std::fs::write(&other_file, &other.pem).unwrap();
    let out = run(&["--ca-cert", other_file.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    // A file that is no certificate is a clear error.
    let out = run(&["--ca-cert", server.key.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no PEM certificate"), "{stderr}");
}

/// tangod refuses half a TLS setup or a bad certificate at start, saying
/// what to fix.
#[test]
fn bad_tls_settings_stop_tangod_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("tangod test CA");
    let server = write_leaf(dir.path(), "server", &ca, &new_leaf(&ca));
    // A prefix of its own: the prefix lock is host-wide.
    let engine = format!("[engine]\nprefix = \"tlsbad{}\"\n", std::process::id());
    let tangod = |args: &[&str], toml: &str| {
        let config = dir.path().join("tangod.toml");
        std::fs::write(&config, format!("{toml}\n{engine}")).unwrap();
        let out = Command::new(tangod_bin())
            .args(["--listen", "127.0.0.1:0", "--key", KEY, "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("RESTFUL_KEY")
            .env("XDG_RUNTIME_DIR", dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let cert = server.cert.to_str().unwrap();
    let key = server.key.to_str().unwrap();
    let err = tangod(&["--tls-cert", cert], "");
    assert!(err.contains("--tls-key"), "{err}");
    let err = tangod(&[], &format!("tls_key = {key:?}"));
    assert!(err.contains("tls_cert and tls_key go together"), "{err}");
    let err = tangod(&["--tls-cert", key, "--tls-key", key], "");
    assert!(err.contains("no PEM certificate"), "{err}");
    let err = tangod(&["--tls-cert", cert, "--tls-key", cert], "");
    assert!(err.contains("no PEM private key"), "{err}");
    let other = new_leaf(&ca);
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, &other.key_pem).unwrap();
    let err = tangod(
        &["--tls-cert", cert, "--tls-key", other_key.to_str().unwrap()],
        "",
    );
    assert!(err.contains("does not go with the certificate"), "{err}");
}

/// With the `host` image a job sees the host's files, but not tangod's TLS
/// key, even one anyone may read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_cannot_read_the_tls_key() {
    if !root_or_skip("jobs_cannot_read_the_tls_key") {
        return;
    }
    // Not under /tmp: the sandbox replaces it, which would hide it anyway.
    let files = tempfile::tempdir_in("/var/lib").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(files.path(), PermissionsExt::from_mode(0o755)).unwrap();
    let ca = new_ca("tangod test CA");
    let server = write_leaf(files.path(), "server", &ca, &new_leaf(&ca));
    for file in [&server.cert, &server.key] {
        std::fs::set_permissions(file, PermissionsExt::from_mode(0o644)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let t = start_tangod(&dir.path().join("data"), &server, &server.ca);
    let c = t.client();
    c.open("keylab").await;
    let makefile = format!(
        "all:\n\t@cat {} || true\n\t@cat {}\n",
        server.key.display(),
        server.cert.display()
    );
    c.upload("keylab", "Makefile", makefile.as_bytes()).await;
    let v = c
        .add_job("keylab", &job("keyjob", "key.out", None, 20))
        .await;
    assert_eq!(v["statusId"], 0, "{v}");
    let out = c
        .wait_output("keylab", "key.out", Duration::from_secs(30))
        .await;
    let out = String::from_utf8_lossy(&out);
    // A hidden file reads as empty (or not at all).
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    // The directory itself is visible: the certificate beside the key is.
    assert!(out.contains("BEGIN CERTIFICATE"), "{out}");
}
