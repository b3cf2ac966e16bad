//! Tango's own command-line client, `clients/tango-cli.py` in autolab/Tango,
//! against a real tangod (sandbox backend): for every verb, the request that
//! client sends, built as it builds it (python-requests' headers, the path
//! with its trailing slash, the `Filename` header, the body `json.dumps`
//! makes with the client's defaults), and the answer it would print
//! (`print(response.text)`) checked field by field.
//!
//! The client itself is not run: it needs Python's `requests`, and its code is
//! not ours to vendor. Each helper below names the function of tango-cli.py
//! it stands for.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// One tango-cli.py invocation's server, as `-s 127.0.0.1 -P <port> -k KEY`.
struct TangoCli {
    http: reqwest::Client,
    url: String,
}

/// What python-requests puts on every request (`requests.utils.default_headers`);
/// for a `str` body (`data=json.dumps(...)`, `data=f.read()`) it adds only
/// Content-Length, no Content-Type.
const REQUESTS_HEADERS: [(&str, &str); 4] = [
    ("User-Agent", "python-requests/2.31.0"),
    ("Accept-Encoding", "gzip, deflate"),
    ("Accept", "*/*"),
    ("Connection", "keep-alive"),
];

/// `urllib.parse.quote(s)`: everything but letters, digits, `_.-~` and `/`
/// percent-encoded.
fn quote(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// tango-cli.py's arguments that shape requests, with its defaults.
#[derive(Clone)]
struct Args {
    courselab: String,
    image: String,
    infiles: Vec<(String, String)>,
    maxsize: i64,
    timeout: i64,
    output_file: String,
    jobname: String,
    notify_url: Option<String>,
    dead_jobs: i64,
    num: i64,
    vmms: String,
    cores: i64,
    memory: i64,
}

impl Default for Args {
    fn default() -> Args {
        Args {
            courselab: "lab".into(),
            image: String::new(),
            infiles: Vec::new(),
            maxsize: 0,
            timeout: 0,
            output_file: "result.out".into(),
            jobname: "test_job".into(),
            notify_url: None,
            dead_jobs: 0,
            num: 2,
            vmms: "localDocker".into(),
            cores: 1,
            memory: 512,
        }
    }
}

/// A JSON string as Python's `json.dumps` writes it (ASCII only, as here).
fn py_str(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

impl TangoCli {
    async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> String {
        let url = format!("{}{}", self.url, path);
        let mut req = match method {
            "GET" => self.http.get(&url),
            _ => self.http.post(&url).body(body.to_string()),
        };
        for (k, v) in REQUESTS_HEADERS.iter().chain(headers) {
            req = req.header(*k, *v);
        }
        let r = req.send().await.unwrap();
        // The client prints the text whatever the status, but only a 200
        // carries an answer it can act on.
        assert_eq!(r.status(), 200, "{method} {path}");
        r.text().await.unwrap()
    }

    async fn send_json(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Value {
        let text = self.send(method, path, headers, body).await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
    }

    /// The reachability check before every verb: `GET /`, raise_for_status.
    async fn reachable(&self) -> String {
        self.send("GET", "/", &[], "").await
    }

    /// tango_open: `GET /open/<key>/<courselab>/`.
    async fn open(&self, a: &Args) -> Value {
        let path = format!("/open/{KEY}/{}/", a.courselab);
        self.send_json("GET", &path, &[], "").await
    }

    /// tango_upload: `POST /upload/<key>/<courselab>/`, header `Filename`
    /// (the last component of --filename), body the file's text.
    async fn upload(&self, a: &Args, filename: &str, contents: &str) -> Value {
        let name = filename.rsplit('/').next().unwrap_or(filename);
        let path = format!("/upload/{KEY}/{}/", a.courselab);
        self.send_json("POST", &path, &[("Filename", name)], contents)
            .await
    }

    /// The body tango_addJob sends: `json.dumps(requestObj)` in its insertion
    /// order (image, files, timeout, max_kb, output_file, jobName,
    /// [notifyURL], accessKeyId, accessKey).
    fn add_job_body(a: &Args) -> String {
        let files: Vec<String> = a
            .infiles
            .iter()
            .map(|(local, dest)| {
                format!(
                    "{{\"localFile\": {}, \"destFile\": {}}}",
                    py_str(local),
                    py_str(dest)
                )
            })
            .collect();
        let notify = a
            .notify_url
            .as_deref()
            .map(|u| format!(", \"notifyURL\": {}", py_str(u)))
            .unwrap_or_default();
        format!(
            "{{\"image\": {}, \"files\": [{}], \"timeout\": {}, \"max_kb\": {}, \
             \"output_file\": {}, \"jobName\": {}{notify}, \"accessKeyId\": \"\", \
             \"accessKey\": \"\"}}",
            py_str(&a.image),
            files.join(", "),
            a.timeout,
            a.maxsize,
            py_str(&a.output_file),
            py_str(&a.jobname),
        )
    }

    /// tango_addJob: `POST /addJob/<key>/<courselab>/`.
    async fn add_job(&self, a: &Args) -> Value {
        let path = format!("/addJob/{KEY}/{}/", a.courselab);
        self.send_json("POST", &path, &[], &Self::add_job_body(a))
            .await
    }

    /// tango_poll: `GET /poll/<key>/<courselab>/<quote(outputFile)>/`; the
    /// answer is the output file's text or a JSON failure.
    async fn poll(&self, a: &Args) -> String {
        let path = format!("/poll/{KEY}/{}/{}/", a.courselab, quote(&a.output_file));
        self.send("GET", &path, &[], "").await
    }

    /// tango_info: `GET /info/<key>/`.
    async fn info(&self) -> Value {
        self.send_json("GET", &format!("/info/{KEY}/"), &[], "")
            .await
    }

    /// tango_jobs: `GET /jobs/<key>/<deadJobs>/`.
    async fn jobs(&self, a: &Args) -> Value {
        let path = format!("/jobs/{KEY}/{}/", a.dead_jobs);
        self.send_json("GET", &path, &[], "").await
    }

    /// tango_pool: `GET /pool/<key>/<image>/`, so `/pool/<key>//` without
    /// --image.
    async fn pool(&self, a: &Args) -> Value {
        let path = format!("/pool/{KEY}/{}/", a.image);
        self.send_json("GET", &path, &[], "").await
    }

    /// tango_prealloc: `POST /prealloc/<key>/<image>/<num>/` with
    /// `json.dumps({"vmms", "cores", "memory"})`.
    async fn prealloc(&self, a: &Args) -> Value {
        let path = format!("/prealloc/{KEY}/{}/{}/", a.image, a.num);
        let body = format!(
            "{{\"vmms\": {}, \"cores\": {}, \"memory\": {}}}",
            py_str(&a.vmms),
            a.cores,
            a.memory
        );
        self.send_json("POST", &path, &[], &body).await
    }

    /// tango_runJob for --numJobs 1: open, upload every file of the
    /// directory, then addJob with each file's destFile as file_to_dict
    /// makes it, job name and output file suffixed `-1`.
    async fn run_job(&self, a: &Args, files: &[(&str, &str)]) -> (Value, Vec<Value>, Value) {
        let opened = self.open(a).await;
        let mut uploads = Vec::new();
        for (name, contents) in files {
            uploads.push(self.upload(a, &format!("jobdir/{name}"), contents).await);
        }
        let mut a = a.clone();
        a.infiles = files
            .iter()
            .map(|(name, _)| {
                let dest = if name.contains("Makefile") {
                    "Makefile"
                } else if name.contains("handin.tgz") {
                    "handin.tgz"
                } else {
                    name
                };
                (name.to_string(), dest.to_string())
            })
            .collect();
        a.jobname = format!("{}-1", a.jobname);
        a.output_file = format!("{}-1", a.output_file);
        (opened, uploads, self.add_job(&a).await)
    }
}

fn status(v: &Value) -> (i64, String) {
    (
        v["statusId"].as_i64().unwrap_or(i64::MIN),
        v["statusMsg"].as_str().unwrap_or_default().to_string(),
    )
}

fn ok(msg: &str) -> (i64, String) {
    (0, msg.to_string())
}

const MAKEFILE: &str = "all:\n\t@echo 'from tango-cli'\n\t@cat data.txt\n";

/// Polls as tango-cli.py --poll does until the output file is there.
async fn poll_until_output(cli: &TangoCli, a: &Args) -> String {
    let start = Instant::now();
    loop {
        let text = cli.poll(a).await;
        if !text.starts_with('{') {
            return text;
        }
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(status(&v), (-1, "Output file not found".into()), "{text}");
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no output {} after 60 s",
            a.output_file
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tango_cli_verb_gets_the_answer_tango_gives() {
    if !root_or_skip("every_tango_cli_verb_gets_the_answer_tango_gives") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Tangod::start(&dir.path().join("data"), "");
    let cli = TangoCli {
        http: reqwest::Client::new(),
        url: server.url.clone(),
    };
    let base = Args::default();

    assert_eq!(cli.reachable().await, "Hello, world! RESTful Tango here!\n");

    // --open
    let v = cli.open(&base).await;
    assert_eq!(status(&v), ok("Created directory"), "{v}");
    assert_eq!(v["files"], json!({}));
    assert_eq!(status(&cli.open(&base).await), ok("Found directory"));

    // --upload --filename <path>: the header carries the last component.
    let v = cli.upload(&base, "some/dir/Makefile", MAKEFILE).await;
    assert_eq!(status(&v), ok("Uploaded file"), "{v}");
    let v = cli.upload(&base, "some/dir/Makefile", MAKEFILE).await;
    assert_eq!(status(&v), ok("File exists"), "{v}");
    let v = cli.upload(&base, "data.txt", "the data\n").await;
    assert_eq!(status(&v), ok("Uploaded file"), "{v}");
    let elsewhere = Args {
        courselab: "never-opened".into(),
        ..base.clone()
    };
    let v = cli.upload(&elsewhere, "data.txt", "x").await;
    assert_eq!(status(&v), (-1, "Courselab not found".into()), "{v}");

    // --poll before the job: Tango's JSON failure.
    let polled = Args {
        output_file: "result out".into(),
        ..base.clone()
    };
    let v: Value = serde_json::from_str(&cli.poll(&polled).await).unwrap();
    assert_eq!(status(&v), (-1, "Output file not found".into()), "{v}");

    // --addJob --infiles ... with the client's defaults otherwise: --image
    // "" names no image, which Tango refuses too (statusId -1).
    let mut add = Args {
        infiles: vec![
            ("Makefile".into(), "Makefile".into()),
            ("data.txt".into(), "data.txt".into()),
        ],
        ..polled.clone()
    };
    let v = cli.add_job(&add).await;
    assert_eq!(v["statusId"], -1, "{v}");
    add.image = "host".into();
    let v = cli.add_job(&add).await;
    assert_eq!(status(&v), ok("Job added"), "{v}");
    let id = v["jobId"].as_str().expect("jobId").to_string();
    assert!(id.parse::<u64>().is_ok(), "{v}");

    // --poll --outputFile "result out": quoted in the path, unquoted by
    // the server; the client prints the file.
    let text = poll_until_output(&cli, &polled).await;
    assert!(
        text.contains(&format!("Received job test_job:{id}")),
        "{text}"
    );
    assert!(
        text.contains("Success: Autodriver returned normally"),
        "{text}"
    );
    assert!(text.ends_with("from tango-cli\nthe data\n"), "{text}");

    // --info
    let v = cli.info().await;
    assert_eq!(status(&v), ok("Found info successfully"), "{v}");
    assert!(v["info"]["job_requests"].as_u64().unwrap_or(0) >= 1, "{v}");

    // --jobs (--deadJobs 0, the default) and --jobs --deadJobs 1.
    let v = cli.jobs(&base).await;
    assert_eq!(status(&v), ok("Found list of jobs"), "{v}");
    assert!(v["jobs"].is_array(), "{v}");
    let dead = Args {
        dead_jobs: 1,
        ..base.clone()
    };
    let v = cli.jobs(&dead).await;
    assert_eq!(status(&v), ok("Found list of jobs"), "{v}");
    let job = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"].as_u64().map(|n| n.to_string()) == Some(id.clone()))
        .unwrap_or_else(|| panic!("job {id} not among the dead jobs: {v}"));
    assert_eq!(job["name"], "test_job");
    assert_eq!(job["vm"]["image"], "host");

    // --prealloc --image host with the client's defaults: --num 2 and the
    // body {"vmms": "localDocker", "cores": 1, "memory": 512}. Tango never
    // reads that vmms (every VM is on its one configured VMMS), so neither
    // may tangod refuse it.
    let host = Args {
        image: "host".into(),
        ..base.clone()
    };
    let v = cli.prealloc(&host).await;
    assert_eq!(status(&v), ok("VMs preallocated"), "{v}");
    let start = Instant::now();
    loop {
        // --pool --image host
        let v = cli.pool(&host).await;
        assert_eq!(status(&v), ok("Found pool"), "{v}");
        if v["pools"]["host"]["free"].as_array().map_or(0, Vec::len) == 2 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // --pool without --image asks for /pool/<key>//: every pool.
    let v = cli.pool(&base).await;
    assert_eq!(status(&v), ok("Found all pools"), "{v}");
    assert_eq!(
        v["pools"]["host"]["total"].as_array().map(Vec::len),
        Some(2)
    );
    let nosuch = Args {
        image: "nosuch".into(),
        ..base.clone()
    };
    let v = cli.pool(&nosuch).await;
    assert_eq!(status(&v), (-1, "Pool not found".into()), "{v}");

    // --prealloc without --image asks for /prealloc/<key>//2/: no image.
    let v = cli.prealloc(&base).await;
    assert_eq!(status(&v), (-1, "Invalid image name".into()), "{v}");

    // --runJob <dir> --image host: open, the directory's uploads, addJob.
    let run = Args {
        courselab: "runlab".into(),
        image: "host".into(),
        ..base.clone()
    };
    let (opened, uploads, added) = cli
        .run_job(&run, &[("Makefile", MAKEFILE), ("data.txt", "run data\n")])
        .await;
    assert_eq!(status(&opened), ok("Created directory"), "{opened}");
    for v in &uploads {
        assert_eq!(status(v), ok("Uploaded file"), "{v}");
    }
    assert_eq!(status(&added), ok("Job added"), "{added}");
    let run_out = Args {
        output_file: "result.out-1".into(),
        ..run.clone()
    };
    let text = poll_until_output(&cli, &run_out).await;
    assert!(text.contains("Received job test_job-1:"), "{text}");
    assert!(text.ends_with("from tango-cli\nrun data\n"), "{text}");

    // A wrong key on every verb: Tango's "Key not recognized".
    for path in [
        "/open/wrong/lab/",
        "/poll/wrong/lab/result.out/",
        "/info/wrong/",
        "/jobs/wrong/0/",
        "/pool/wrong//",
        "/pool/wrong/host/",
    ] {
        let v = cli.send_json("GET", path, &[], "").await;
        assert_eq!(status(&v), (-1, "Key not recognized".into()), "{path}");
    }
    for path in [
        "/upload/wrong/lab/",
        "/addJob/wrong/lab/",
        "/prealloc/wrong/host/2/",
    ] {
        let v = cli
            .send_json("POST", path, &[("Filename", "f")], "{}")
            .await;
        assert_eq!(status(&v), (-1, "Key not recognized".into()), "{path}");
    }
}
