//! Malformed and malicious v1 requests: each is answered HTTP 200 with
//! statusId -1 and a message saying what was wrong, nothing is written
//! outside the data dir, and the server keeps serving.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

struct Case {
    what: &'static str,
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    expect: &'static str,
}

fn add_job(what: &'static str, body: Value, expect: &'static str) -> Case {
    raw_add_job(what, body.to_string().into_bytes(), expect)
}

fn raw_add_job(what: &'static str, body: Vec<u8>, expect: &'static str) -> Case {
    Case {
        what,
        method: "POST",
        path: format!("/addJob/{KEY}/lab/"),
        headers: vec![],
        body,
        expect,
    }
}

fn with(mut base: Value, field: &str, value: Value) -> Value {
    base[field] = value;
    base
}

fn without(mut base: Value, field: &str) -> Value {
    base.as_object_mut().unwrap().remove(field);
    base
}

fn get(what: &'static str, path: String, expect: &'static str) -> Case {
    Case {
        what,
        method: "GET",
        path,
        headers: vec![],
        body: vec![],
        expect,
    }
}

fn upload(
    what: &'static str,
    filename: Option<String>,
    body: Vec<u8>,
    expect: &'static str,
) -> Case {
    Case {
        what,
        method: "POST",
        path: format!("/upload/{KEY}/lab/"),
        headers: filename.map(|f| vec![("Filename", f)]).unwrap_or_default(),
        body,
        expect,
    }
}

fn cases() -> Vec<Case> {
    let good = job("ok", "out", None, 10);
    let files = |f: Value| with(good.clone(), "files", f);
    let mk = json!({"localFile": "Makefile", "destFile": "Makefile"});
    vec![
        raw_add_job("not JSON", b"{not json".to_vec(), "not valid JSON"),
        raw_add_job("empty body", vec![], "not valid JSON"),
        add_job("JSON array", json!([1, 2]), "must be a JSON object"),
        add_job(
            "missing image",
            without(good.clone(), "image"),
            "missing field image",
        ),
        add_job(
            "image is a number",
            with(good.clone(), "image", json!(5)),
            "image must be a string",
        ),
        add_job(
            "missing files",
            without(good.clone(), "files"),
            "missing field files",
        ),
        add_job(
            "files is a string",
            files(json!("Makefile")),
            "missing field files",
        ),
        add_job(
            "files entry not an object",
            files(json!(["Makefile"])),
            "files[0] must be an object",
        ),
        add_job(
            "files entry without destFile",
            files(json!([{"localFile": "Makefile"}])),
            "files[0]: missing field destFile",
        ),
        add_job(
            "no Makefile",
            files(json!([{"localFile": "Makefile", "destFile": "x"}])),
            "Makefile",
        ),
        add_job("empty files", files(json!([])), "files is empty"),
        add_job(
            "localFile traversal",
            files(json!([{"localFile": "../../../etc/passwd", "destFile": "Makefile"}])),
            "invalid localFile",
        ),
        add_job(
            "localFile absolute",
            files(json!([{"localFile": "/etc/passwd", "destFile": "Makefile"}])),
            "invalid localFile",
        ),
        add_job(
            "localFile dot-dot",
            files(json!([{"localFile": "..", "destFile": "Makefile"}])),
            "invalid localFile",
        ),
        add_job(
            "destFile traversal",
            files(json!([mk.clone(), {"localFile": "Makefile", "destFile": "../../escape"}])),
            "invalid destFile",
        ),
        add_job(
            "destFile absolute",
            files(json!([mk.clone(), {"localFile": "Makefile", "destFile": "/etc/cron.d/x"}])),
            "invalid destFile",
        ),
        add_job(
            "destFile NUL",
            files(json!([mk.clone(), {"localFile": "Makefile", "destFile": "a\u{0}b"}])),
            "invalid destFile",
        ),
        add_job(
            "destFile twice",
            files(json!([mk.clone(), mk.clone()])),
            "appears twice",
        ),
        add_job(
            "localFile never uploaded",
            files(json!([mk.clone(), {"localFile": "ghost.c", "destFile": "g.c"}])),
            "ghost.c was not uploaded",
        ),
        add_job(
            "output_file traversal",
            with(
                good.clone(),
                "output_file",
                json!("../../../../tmp/tango-pwned"),
            ),
            "invalid output_file",
        ),
        add_job(
            "output_file absolute",
            with(good.clone(), "output_file", json!("/tmp/tango-pwned")),
            "invalid output_file",
        ),
        add_job(
            "output_file empty",
            with(good.clone(), "output_file", json!("")),
            "invalid output_file",
        ),
        add_job(
            "output_file overlong",
            with(good.clone(), "output_file", json!("x".repeat(300))),
            "longer than 255",
        ),
        add_job(
            "missing output_file",
            without(good.clone(), "output_file"),
            "missing field output_file",
        ),
        add_job(
            "timeout not a number",
            with(good.clone(), "timeout", json!("soon")),
            "timeout must be an integer",
        ),
        add_job(
            "timeout an object",
            with(good.clone(), "timeout", json!({})),
            "timeout must be an integer",
        ),
        add_job(
            "max_kb not a number",
            with(good.clone(), "max_kb", json!("lots")),
            "max_kb must be an integer",
        ),
        add_job(
            "disable_network not a bool",
            with(good.clone(), "disable_network", json!("maybe")),
            "disable_network must be true or false",
        ),
        add_job(
            "callback_url file scheme",
            with(good.clone(), "callback_url", json!("file:///etc/passwd")),
            "not an http:// or https:// URL",
        ),
        add_job(
            "callback_url a number",
            with(good.clone(), "callback_url", json!(5)),
            "callback_url must be a string",
        ),
        add_job(
            "image traversal",
            with(good.clone(), "image", json!("../../etc")),
            "Invalid image name",
        ),
        add_job(
            "unknown image",
            with(good.clone(), "image", json!("no-such-image")),
            "Invalid image name",
        ),
        add_job(
            "jobName overlong",
            with(good.clone(), "jobName", json!("n".repeat(5000))),
            "jobName is longer",
        ),
        Case {
            path: "/addJob/wrongkey/lab/".to_string(),
            ..add_job("unknown key", good.clone(), "Key not recognized")
        },
        Case {
            path: format!("/addJob/{KEY}/..%2F..%2Fetc/"),
            ..add_job(
                "courselab traversal",
                good.clone(),
                "invalid courselab name",
            )
        },
        Case {
            path: format!("/addJob/{KEY}/nolab/"),
            ..add_job(
                "courselab never opened",
                good.clone(),
                "Courselab not found",
            )
        },
        // Clients normalise a ".." segment away; what is left matches no route.
        get(
            "open courselab dot-dot",
            format!("/open/{KEY}/%2E%2E/"),
            "no such route",
        ),
        get("unknown route", "/etc/passwd".to_string(), "no such route"),
        get(
            "open courselab with slash",
            format!("/open/{KEY}/a%2Fb/"),
            "invalid courselab name",
        ),
        get(
            "open courselab overlong",
            format!("/open/{KEY}/{}/", "c".repeat(300)),
            "invalid courselab name",
        ),
        // 250 bytes is a fine name, but `testkey-<name>` is 258.
        get(
            "courselab too long with the key",
            format!("/open/{KEY}/{}/", "c".repeat(250)),
            "with this key the name may be at most 247 bytes",
        ),
        get(
            "key traversal",
            "/open/..%2F..%2Fx/lab/".to_string(),
            "Key not recognized",
        ),
        upload(
            "upload traversal",
            Some("../../../tmp/tango-pwned".into()),
            b"x".to_vec(),
            "invalid file name",
        ),
        upload(
            "upload absolute",
            Some("/tmp/tango-pwned".into()),
            b"x".to_vec(),
            "invalid file name",
        ),
        upload(
            "upload backslash",
            Some("a\\b".into()),
            b"x".to_vec(),
            "invalid file name",
        ),
        upload(
            "upload overlong name",
            Some("f".repeat(300)),
            b"x".to_vec(),
            "longer than 255",
        ),
        upload(
            "upload without Filename",
            None,
            b"x".to_vec(),
            "missing header Filename",
        ),
        upload(
            "upload dot",
            Some(".".into()),
            b"x".to_vec(),
            "invalid file name",
        ),
        upload(
            "upload over the size limit",
            Some("big.bin".into()),
            vec![7u8; 3 << 20],
            "larger than the server's limit",
        ),
        get(
            "poll traversal",
            format!("/poll/{KEY}/lab/..%2F..%2F..%2Ftango.db/"),
            "Output file not found",
        ),
        get(
            "poll absolute",
            format!("/poll/{KEY}/lab/%2Fetc%2Fpasswd"),
            "Output file not found",
        ),
        get(
            "partial output of a negative id",
            format!("/getPartialOutput/{KEY}/-1/"),
            "is not a number",
        ),
        get(
            "partial output of a huge id",
            format!("/getPartialOutput/{KEY}/99999999999999999999999/"),
            "is not a number",
        ),
        get(
            "jobs with deadjobs 2",
            format!("/jobs/{KEY}/2/"),
            "deadjobs must be 0",
        ),
        get(
            "prealloc huge",
            format!("/prealloc/{KEY}/host/99999999999/"),
            "Invalid prealloc size",
        ),
        get(
            "prealloc image traversal",
            format!("/prealloc/{KEY}/..%2Fx/1/"),
            "Invalid image name",
        ),
        Case {
            what: "prealloc bad JSON body",
            method: "POST",
            path: format!("/prealloc/{KEY}/host/1/"),
            headers: vec![],
            body: b"{cores".to_vec(),
            expect: "must be a JSON object",
        },
        Case {
            what: "prealloc negative memory",
            method: "POST",
            path: format!("/prealloc/{KEY}/host/1/"),
            headers: vec![],
            body: br#"{"memory": -5}"#.to_vec(),
            expect: "memory must be a positive number",
        },
        Case {
            what: "build image traversal",
            method: "POST",
            path: format!("/build/{KEY}/"),
            headers: vec![("imageName", "../x".into())],
            body: b"x".to_vec(),
            expect: "Invalid image name",
        },
        Case {
            what: "build without imageName",
            method: "POST",
            path: format!("/build/{KEY}/"),
            headers: vec![],
            body: b"x".to_vec(),
            expect: "missing header imageName",
        },
        // Bodies over the limit for JSON bodies (4 MiB) are refused by
        // name, still as a v1 answer.
        raw_add_job(
            "addJob body over the limit",
            vec![b' '; 5 << 20],
            "larger than the server's limit",
        ),
        Case {
            what: "prealloc body over the limit",
            method: "POST",
            path: format!("/prealloc/{KEY}/host/1/"),
            headers: vec![],
            body: vec![b' '; 5 << 20],
            expect: "larger than the server's limit",
        },
        // Unknown paths outside /v2 (the v2 API has HTTP statuses of its
        // own) are answered as v1: a client cannot tell them apart.
        get(
            "unknown dashboard file",
            "/dashboard/nope.js".to_string(),
            "no such route",
        ),
    ]
    .into_iter()
    .chain(wrong_methods())
    .chain(undecodable_paths())
    .collect()
}

/// A v1 route called with a method it does not take.
fn wrong_methods() -> Vec<Case> {
    [
        ("GET", format!("/addJob/{KEY}/lab/")),
        ("GET", format!("/addJob/{KEY}/lab")),
        ("POST", format!("/open/{KEY}/lab/")),
        ("GET", format!("/upload/{KEY}/lab/")),
        ("PUT", format!("/upload/{KEY}/lab/")),
        ("POST", format!("/poll/{KEY}/lab/out/")),
        ("POST", format!("/getPartialOutput/{KEY}/1/")),
        ("POST", format!("/info/{KEY}/")),
        ("DELETE", format!("/jobs/{KEY}/0/")),
        ("POST", format!("/pool/{KEY}/")),
        ("POST", format!("/pool/{KEY}/host/")),
        ("DELETE", format!("/prealloc/{KEY}/host/1/")),
        ("GET", format!("/build/{KEY}/")),
        ("POST", "/".to_string()),
    ]
    .into_iter()
    .map(|(method, path)| Case {
        what: "wrong method",
        method,
        path,
        headers: vec![("Filename", "f".into()), ("imageName", "img".into())],
        body: b"x".to_vec(),
        expect: "is not allowed",
    })
    .collect()
}

/// Path segments that do not decode to UTF-8, in every place of every
/// route.
fn undecodable_paths() -> Vec<Case> {
    const BAD: &str = "%ff%fe";
    [
        ("GET", format!("/open/{BAD}/lab/")),
        ("GET", format!("/open/{KEY}/{BAD}/")),
        ("GET", format!("/open/{KEY}/{BAD}")),
        ("POST", format!("/upload/{KEY}/{BAD}/")),
        ("POST", format!("/addJob/{KEY}/{BAD}/")),
        ("GET", format!("/poll/{KEY}/lab/{BAD}/")),
        ("GET", format!("/poll/{KEY}/{BAD}/out/")),
        ("GET", format!("/getPartialOutput/{KEY}/{BAD}/")),
        ("GET", format!("/info/{BAD}/")),
        ("GET", format!("/jobs/{KEY}/{BAD}/")),
        ("GET", format!("/pool/{BAD}/")),
        ("GET", format!("/pool/{KEY}/{BAD}/")),
        ("GET", format!("/prealloc/{KEY}/{BAD}/1/")),
        ("POST", format!("/prealloc/{KEY}/host/{BAD}/")),
        ("POST", format!("/build/{BAD}/")),
        ("POST", format!("/addJob/{BAD}/lab")),
    ]
    .into_iter()
    .map(|(method, path)| Case {
        what: "undecodable path segment",
        method,
        path,
        headers: vec![("Filename", "f".into()), ("imageName", "img".into())],
        body: b"x".to_vec(),
        expect: "not valid UTF-8",
    })
    .collect()
}

/// Sends `case` and checks the answer: HTTP 200, JSON, statusId -1 and a
/// message with the expected words.
async fn check(c: &Client, case: &Case) -> Result<(), String> {
    let url = format!("{}{}", c.url, case.path);
    let mut req = match case.method {
        "GET" => c.http.get(&url),
        method => c
            .http
            .request(method.parse().unwrap(), &url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(case.body.clone()),
    };
    for (k, v) in &case.headers {
        req = req.header(*k, v.as_str());
    }
    let r = req.send().await.map_err(|e| e.to_string())?;
    let status = r.status();
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_string();
    let body = r.text().await.map_err(|e| e.to_string())?;
    if status != 200 || !content_type.starts_with("application/json") {
        return Err(format!("HTTP {status}, {content_type}: {body:?}"));
    }
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body:?}"))?;
    let msg = v["statusMsg"].as_str().unwrap_or_default();
    if v["statusId"] != -1 || !msg.contains(case.expect) {
        return Err(format!("expected -1 and {:?}, got {v}", case.expect));
    }
    Ok(())
}

fn files_outside(root: &Path, data: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p != data && p.extension().is_none_or(|e| e != "toml" && e != "log"))
        .map(|p| p.display().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_malicious_requests() {
    if !root_or_skip("malformed_and_malicious_requests") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let server = Tangod::start(&data, "max_upload_bytes = 2097152\n");
    let c = server.client();
    c.open("lab").await;
    c.upload("lab", "Makefile", b"all:\n\t@echo fine\n").await;
    let _ = std::fs::remove_file("/tmp/tango-pwned");

    let cases = cases();
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let mut wrong = Vec::new();
    for case in &cases {
        if let Err(e) = check(&c, case).await {
            wrong.push(format!(
                "{} ({} {}): {e}",
                case.what, case.method, case.path
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} cases wrong:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );

    // Concurrent uploads of one name: every one answered, and the stored
    // file's md5 is the one `open` reports.
    let mut uploads = Vec::new();
    for i in 0..12 {
        let c = c.clone();
        uploads.push(tokio::spawn(async move {
            c.upload(
                "lab",
                "race.txt",
                format!("version {i}\n").repeat(1000 + i).as_bytes(),
            )
            .await
        }));
    }
    for u in uploads {
        assert_eq!(u.await.unwrap()["statusId"], 0);
    }
    let listed = c.open("lab").await["files"]["race.txt"]
        .as_str()
        .unwrap()
        .to_string();
    let stored = std::fs::read(data.join(format!("courselabs/{KEY}-lab/race.txt"))).unwrap();
    let out = std::process::Command::new("md5sum")
        .arg(data.join(format!("courselabs/{KEY}-lab/race.txt")))
        .output()
        .unwrap();
    assert_eq!(
        &String::from_utf8_lossy(&out.stdout)[..32],
        listed,
        "{} bytes",
        stored.len()
    );

    // Nothing was written outside the data dir.
    assert!(!Path::new("/tmp/tango-pwned").exists());
    assert!(
        files_outside(root.path(), &data).is_empty(),
        "{:?}",
        files_outside(root.path(), &data)
    );

    // Huge and negative numbers are clamped or defaulted, not errors.
    let mut body = job("clamped", "clamped", None, 10);
    body["timeout"] = json!(-5);
    body["max_kb"] = json!(1_000_000_000_000i64);
    let v = c.add_job("lab", &body).await;
    assert_eq!(v["statusMsg"], "Job added");
    let out = c
        .wait_output("lab", "clamped", Duration::from_secs(30))
        .await;
    assert!(String::from_utf8_lossy(&out).contains("fine"));
    // Still serving, and every rejected addJob is listed dead with its reason.
    let v = c.get(&format!("/jobs/{KEY}/1/")).await;
    let rejected = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| {
            j["trace"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t.as_str().unwrap().contains("job rejected"))
        })
        .count();
    assert!(rejected >= 30, "{rejected} rejected jobs recorded");
}
