//! One function per subcommand: call the server, print a table for people
//! or JSON for scripts.

use crate::callback::CallbackListener;
use crate::client::{JobFile, JobRequest, PollResult, PreallocOptions, TangoClient};
use crate::config::{self, Settings};
use crate::run::{self, JobTemplate, Summary, Wait};
use crate::{
    AddJobArgs, BenchArgs, Cli, Command, HostsAction, JobRunArgs, RunArgs, EXIT_ERROR,
    EXIT_JOB_FAILED,
};
use anyhow::{anyhow, bail, Context, Result};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, ContentArrangement, Table};
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Tango's default image name, used when nothing else names one.
const DEFAULT_IMAGE: &str = "autograding_image";

/// A failure of a command that comes with the server's answer: the message
/// is the command's own, and `--json` puts the answer under `answer` in the
/// one JSON document it prints (see main.rs).
#[derive(Debug)]
pub struct AnsweredError {
    pub message: String,
    pub answer: Value,
}

impl std::fmt::Display for AnsweredError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AnsweredError {}

pub async fn dispatch(cli: Cli) -> Result<u8> {
    let global = cli.global;
    let file = config::load_config(global.config.as_deref())?;
    let ca_cert = global.ca_cert.clone().or_else(|| file.ca_cert.clone());
    match cli.command {
        Command::Health => health(global, file, ca_cert).await,
        command => dispatch_with_key(global, file, ca_cert, command).await,
    }
}

/// The commands that need a key.
async fn dispatch_with_key(
    global: crate::Global,
    file: config::ConfigFile,
    ca_cert: Option<std::path::PathBuf>,
    command: Command,
) -> Result<u8> {
    let image_from_command = match &command {
        Command::Run(args) => args.job.image.clone(),
        Command::Bench(args) => args.run.image.clone(),
        _ => None,
    };
    let urls = given_urls(global.url, matches!(command, Command::Bench(_)))?;
    let settings = config::resolve(urls.first().cloned(), global.key, image_from_command, file)?;
    let new_client = |url: &str| {
        TangoClient::new(
            url,
            &settings.key,
            Duration::from_secs(global.http_timeout.max(1)),
            ca_cert.as_deref(),
        )
    };
    let client = new_client(&settings.url)?;
    let json = global.json;
    match command {
        Command::Open { courselab } => open(&client, &courselab, json).await,
        Command::Upload {
            courselab,
            file,
            name,
        } => upload(&client, &courselab, &file, name, json).await,
        Command::AddJob(args) => add_job(&client, args, json).await,
        Command::Poll {
            courselab,
            output_file,
            wait,
            output,
        } => {
            poll(
                &client,
                &courselab,
                &output_file,
                wait,
                output.as_deref(),
                json,
            )
            .await
        }
        Command::PartialOutput { job_id } => partial_output(&client, job_id, json).await,
        Command::Info => info(&client, json).await,
        Command::Jobs { dead } => jobs(&client, dead, json).await,
        Command::Pool { image } => pool(&client, image.as_deref(), json).await,
        Command::Prealloc {
            image,
            count,
            cores,
            memory,
            vmms,
        } => {
            let options = PreallocOptions {
                vmms,
                cores,
                memory,
            };
            let answer = client
                .prealloc(&image, &count.to_string(), &options)
                .await?;
            print_status(&answer, json);
            Ok(0)
        }
        Command::Build { name, tar } => {
            let body = run::open_file(&tar).await?;
            let answer = client.build(&name, body).await?;
            print_status(&answer, json);
            Ok(0)
        }
        Command::Hosts { action } => hosts(&client, action, json).await,
        Command::Servers => servers(&client, json).await,
        Command::Run(args) => run_dir(&client, &settings, args, json).await,
        Command::Bench(args) => {
            let mut clients = vec![client];
            for url in urls.iter().skip(1) {
                clients.push(new_client(url)?);
            }
            bench(&clients, &settings, args, json).await
        }
        Command::Health => probe(&client, &settings.url, true, json).await,
    }
}

/// The server URLs given (`--url` repeated or comma-separated, or
/// `TANGO_URL`), blanks dropped; several only where `several` allows.
fn given_urls(urls: Vec<String>, several: bool) -> Result<Vec<String>> {
    let urls: Vec<String> = urls
        .into_iter()
        .map(|url| url.trim().to_string())
        .filter(|url| !url.is_empty())
        .collect();
    if urls.len() > 1 && !several {
        bail!(
            "{} server URLs given ({}), but only `tango bench` spreads its requests over \
             several servers; give this command one --url (or TANGO_URL)",
            urls.len(),
            urls.join(", ")
        );
    }
    Ok(urls)
}

fn new_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_style(UTF8_FULL_CONDENSED)
        .set_header(header.iter().map(|h| Cell::new(*h)));
    // Wrap to the terminal's width, but not to a width too small to read
    // (a pty that reports 0 columns would squeeze every cell to a letter).
    if table.width().is_some_and(|w| w >= 60) {
        table.set_content_arrangement(ContentArrangement::Dynamic);
    }
    table
}

fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("error: cannot encode JSON: {e}"),
    }
}

fn status_msg(answer: &Value) -> &str {
    answer
        .get("statusMsg")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// For routes whose answer is just a status.
fn print_status(answer: &Value, json: bool) {
    if json {
        print_json(answer);
    } else {
        println!("{}", status_msg(answer));
    }
}

/// A JSON value as table text: strings without quotes.
fn cell_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

async fn open(client: &TangoClient, courselab: &str, json: bool) -> Result<u8> {
    let answer = client.open(courselab).await?;
    if json {
        print_json(&answer);
        return Ok(0);
    }
    println!("{}: {courselab}", status_msg(&answer));
    let files = answer.get("files").and_then(Value::as_object);
    match files {
        Some(files) if !files.is_empty() => {
            let mut table = new_table(&["file", "md5"]);
            for (name, md5) in files {
                table.add_row(vec![name.clone(), cell_text(md5)]);
            }
            println!("{table}");
        }
        _ => println!("(no files)"),
    }
    Ok(0)
}

async fn upload(
    client: &TangoClient,
    courselab: &str,
    path: &Path,
    name: Option<String>,
    json: bool,
) -> Result<u8> {
    let name = match name {
        Some(name) => name,
        None => path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{} has no usable file name; give --name", path.display()))?,
    };
    let body = run::open_file(path).await?;
    let len = body.len;
    let answer = client.upload(courselab, &name, body).await?;
    if json {
        print_json(&answer);
    } else {
        println!(
            "{}: {name} ({len} bytes) in {courselab}",
            status_msg(&answer)
        );
    }
    Ok(0)
}

/// `LOCAL[:DEST]`.
fn parse_file_arg(arg: &str) -> Result<JobFile> {
    let (local, dest) = match arg.split_once(':') {
        Some((local, dest)) => (local, dest),
        None => (arg, arg),
    };
    if local.is_empty() || dest.is_empty() {
        bail!(
            "--file {arg:?}: expected LOCAL or LOCAL:DEST, e.g. --file autograde-Makefile:Makefile"
        );
    }
    Ok(JobFile {
        local_file: local.to_string(),
        dest_file: dest.to_string(),
    })
}

async fn add_job(client: &TangoClient, args: AddJobArgs, json: bool) -> Result<u8> {
    let answer = if let Some(path) = args.job_json {
        let body = if path.as_os_str() == "-" {
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut body)
                .context("cannot read the job body from standard input")?;
            body
        } else {
            std::fs::read(&path)
                .with_context(|| format!("cannot read job body {}", path.display()))?
        };
        client.add_job_raw(&args.courselab, body).await?
    } else {
        let files = args
            .files
            .iter()
            .map(|f| parse_file_arg(f))
            .collect::<Result<Vec<_>>>()?;
        let makefiles = files.iter().filter(|f| f.dest_file == "Makefile").count();
        if makefiles != 1 {
            bail!(
                "exactly one --file must have the destination Makefile (found {makefiles}) — e.g. --file autograde-Makefile:Makefile"
            );
        }
        let output_file = args.output_file.unwrap_or_default();
        let job = JobRequest {
            image: args.image.unwrap_or_default(),
            files,
            job_name: args.name.unwrap_or_else(|| output_file.clone()),
            output_file,
            timeout: args.timeout,
            max_kb: args.max_kb,
            callback_url: args.callback_url,
            disable_network: args.disable_network,
        };
        client.add_job(&args.courselab, &job).await?
    };
    if json {
        print_json(&answer);
    } else {
        let id = run::job_id_of(&answer)?;
        println!(
            "{}: job {id} in courselab {}",
            status_msg(&answer),
            args.courselab
        );
    }
    Ok(0)
}

async fn poll(
    client: &TangoClient,
    courselab: &str,
    output_file: &str,
    wait: Option<u64>,
    to_file: Option<&Path>,
    json: bool,
) -> Result<u8> {
    let output = match wait {
        Some(secs) => tokio::time::timeout(
            Duration::from_secs(secs),
            run::poll_until_ready(client, courselab, output_file),
        )
        .await
        .map_err(|_| {
            anyhow!("{output_file} did not appear in {courselab} within {secs} s — check `tango jobs` and `tango jobs --dead`")
        })??,
        None => match client.poll(courselab, output_file).await? {
            PollResult::Ready(bytes) => bytes,
            PollResult::NotFound(answer) => {
                return Err(AnsweredError {
                    message: format!(
                        "{output_file} not found in {courselab}: the job has not finished yet or the name is wrong — check `tango jobs`, or add --wait SECS"
                    ),
                    answer,
                }
                .into());
            }
        },
    };
    let outcome = crate::outcome::Outcome::parse(&output);
    if let Some(path) = to_file {
        std::fs::write(path, &output)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if json {
        print_json(&serde_json::json!({
            "statusId": 0,
            "outputFile": output_file,
            "ok": outcome.ok(),
            "outcome": outcome.line,
            "exitStatus": outcome.exit_status,
            "score": outcome.score,
            "output": String::from_utf8_lossy(&output),
        }));
    } else if to_file.is_none() {
        std::io::stdout()
            .write_all(&output)
            .context("cannot write the output")?;
    }
    // Like `run`: the output is there, but the job failed.
    if outcome.ok() {
        return Ok(0);
    }
    eprintln!(
        "error: the job that wrote {output_file} failed: {}",
        outcome.failure_reason().as_deref().unwrap_or("unknown")
    );
    Ok(EXIT_JOB_FAILED)
}

async fn partial_output(client: &TangoClient, job_id: u64, json: bool) -> Result<u8> {
    let answer = client.partial_output(job_id).await?;
    if json {
        print_json(&answer);
    } else {
        print!(
            "{}",
            cell_text(answer.get("output").unwrap_or(&Value::Null))
        );
    }
    Ok(0)
}

async fn info(client: &TangoClient, json: bool) -> Result<u8> {
    let answer = client.info().await?;
    if json {
        print_json(&answer);
        return Ok(0);
    }
    let mut table = new_table(&["statistic", "value"]);
    if let Some(info) = answer.get("info").and_then(Value::as_object) {
        for (name, value) in info {
            table.add_row(vec![name.clone(), cell_text(value)]);
        }
    }
    println!("{table}");
    Ok(0)
}

/// `tango health`: the server answers `/info` with the key, or `/` when no
/// key is at hand. Runs before the usual settings, which require a key:
/// inside tangod's container the key is only in RESTFUL_KEY, tangod's own
/// variable.
async fn health(
    global: crate::Global,
    file: config::ConfigFile,
    ca_cert: Option<std::path::PathBuf>,
) -> Result<u8> {
    let url = given_urls(global.url, false)?
        .pop()
        .or(file.url)
        .unwrap_or_else(|| config::DEFAULT_URL.to_string());
    let key = global
        .key
        .or(file.key)
        .or_else(|| std::env::var("RESTFUL_KEY").ok())
        .filter(|k| !k.is_empty());
    let client = TangoClient::new(
        &url,
        key.as_deref().unwrap_or_default(),
        Duration::from_secs(global.http_timeout.max(1)),
        ca_cert.as_deref(),
    )?;
    probe(&client, &url, key.is_some(), global.json).await
}

async fn probe(client: &TangoClient, url: &str, with_key: bool, json: bool) -> Result<u8> {
    let checked = if with_key {
        client.info().await?;
        "/info"
    } else {
        client.hello().await?;
        "/"
    };
    if json {
        print_json(&serde_json::json!({ "healthy": true, "url": url, "route": checked }));
    } else {
        println!("healthy: {url} answers {checked}");
    }
    Ok(0)
}

/// The state of a job as Autolab reads it from its trace.
fn job_state(job: &Value, dead: bool) -> &'static str {
    let last = job
        .get("trace")
        .and_then(Value::as_array)
        .and_then(|t| t.last())
        .and_then(Value::as_str)
        .unwrap_or("");
    if dead {
        if last.contains("Error") {
            "failed"
        } else if last.contains("Autodriver returned normally") {
            "done"
        } else {
            "ended"
        }
    } else if job.get("assigned").and_then(Value::as_bool) == Some(true) {
        "running"
    } else {
        "waiting"
    }
}

/// The message part of a `<ctime>|<message>` trace line.
fn trace_message(line: &str) -> &str {
    line.split_once('|').map(|(_, m)| m).unwrap_or(line)
}

async fn jobs(client: &TangoClient, dead: bool, json: bool) -> Result<u8> {
    let answer = client.jobs(dead).await?;
    if json {
        print_json(&answer);
        return Ok(0);
    }
    let list = answer
        .get("jobs")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if list.is_empty() {
        println!("no {} jobs", if dead { "finished" } else { "live" });
        return Ok(0);
    }
    let mut table = new_table(&[
        "id",
        "name",
        "state",
        "image",
        "vm",
        "retries",
        "last trace",
    ]);
    for job in &list {
        let vm = job.get("vm").cloned().unwrap_or(Value::Null);
        let last = job
            .get("trace")
            .and_then(Value::as_array)
            .and_then(|t| t.last())
            .and_then(Value::as_str)
            .map(trace_message)
            .unwrap_or("");
        table.add_row(vec![
            cell_text(job.get("id").unwrap_or(&Value::Null)),
            cell_text(job.get("name").unwrap_or(&Value::Null)),
            job_state(job, dead).to_string(),
            cell_text(vm.get("image").unwrap_or(&Value::Null)),
            cell_text(vm.get("name").unwrap_or(&Value::Null)),
            cell_text(job.get("retries").unwrap_or(&Value::Null)),
            last.to_string(),
        ]);
    }
    println!("{table}");
    Ok(0)
}

async fn pool(client: &TangoClient, image: Option<&str>, json: bool) -> Result<u8> {
    let answer = client.pool(image).await?;
    if json {
        print_json(&answer);
        return Ok(0);
    }
    let pools = answer
        .get("pools")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if pools.is_empty() {
        println!("no pools");
        return Ok(0);
    }
    let ids = |v: Option<&Value>| -> (usize, String) {
        let list = v.and_then(Value::as_array).cloned().unwrap_or_default();
        let text = list.iter().map(cell_text).collect::<Vec<_>>().join(" ");
        (list.len(), text)
    };
    let mut table = new_table(&["image", "total", "free", "VM ids (free)"]);
    for (image, pool) in &pools {
        let (total, total_ids) = ids(pool.get("total"));
        let (free, free_ids) = ids(pool.get("free"));
        table.add_row(vec![
            image.clone(),
            total.to_string(),
            free.to_string(),
            format!("{total_ids} ({free_ids})"),
        ]);
    }
    println!("{table}");
    Ok(0)
}

/// `tango hosts`: the table of hosts; `tango hosts drain|undrain NAME`: the
/// change, then that host's row.
async fn hosts(client: &TangoClient, action: Option<HostsAction>, json: bool) -> Result<u8> {
    let (list, done) = match action {
        None => {
            let answer = client.hosts().await?;
            if json {
                print_json(&answer);
                return Ok(0);
            }
            let list = answer
                .get("hosts")
                .and_then(Value::as_array)
                .cloned()
                .ok_or_else(|| anyhow!("tangod's /v2/hosts answer has no hosts list: {answer}"))?;
            (list, None)
        }
        Some(action) => {
            let (name, drain) = match action {
                HostsAction::Drain { name } => (name, true),
                HostsAction::Undrain { name } => (name, false),
            };
            if name.is_empty() {
                bail!("the host name is empty: `tango hosts` lists the hosts");
            }
            let status = client.set_host_draining(&name, drain).await?;
            if json {
                print_json(&status);
                return Ok(0);
            }
            let done = if drain {
                format!(
                    "{name} drained: it takes no new containers, its idle ones are removed, \
                     its running jobs finish"
                )
            } else {
                format!("{name} undrained: it takes new containers again")
            };
            (vec![status], Some(done))
        }
    };
    if let Some(done) = done {
        println!("{done}");
    }
    if list.is_empty() {
        println!(
            "no hosts: this server's backends do not spread containers over several \
             machines (see [[docker.hosts]] in the README)"
        );
        return Ok(0);
    }
    println!("{}", hosts_table(&list));
    Ok(0)
}

fn hosts_table(list: &[Value]) -> Table {
    let mut table = new_table(&[
        "name", "vmms", "state", "draining", "vms/max", "running", "starts", "failures", "url",
    ]);
    let field = |host: &Value, name: &str| cell_text(host.get(name).unwrap_or(&Value::Null));
    let flag = |host: &Value, name: &str| host.get(name).and_then(Value::as_bool);
    for host in list {
        table.add_row(vec![
            field(host, "name"),
            field(host, "vmms"),
            match flag(host, "up") {
                Some(true) => "up",
                Some(false) => "down",
                None => "?",
            }
            .to_string(),
            match flag(host, "draining") {
                Some(true) => "draining",
                _ => "",
            }
            .to_string(),
            format!("{}/{}", field(host, "vms"), field(host, "max_vms")),
            field(host, "running_jobs"),
            field(host, "vm_starts"),
            field(host, "vm_start_failures"),
            field(host, "url"),
        ]);
    }
    table
}

/// `tango servers`: the servers registry, the answering server marked.
async fn servers(client: &TangoClient, json: bool) -> Result<u8> {
    let answer = client.servers().await?;
    if json {
        print_json(&answer);
        return Ok(0);
    }
    let list = answer
        .get("servers")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("tangod's /v2/servers answer has no servers list: {answer}"))?;
    println!("{}", servers_table(list));
    Ok(0)
}

fn servers_table(list: &[Value]) -> Table {
    let mut table = new_table(&[
        "id",
        "name",
        "state",
        "heartbeat",
        "lease",
        "address",
        "version",
    ]);
    let field = |server: &Value, name: &str| cell_text(server.get(name).unwrap_or(&Value::Null));
    let ms = |server: &Value, name: &str| server.get(name).and_then(Value::as_i64);
    let secs = |ms: Option<i64>| match ms {
        Some(ms) => format!("{:.1} s", ms as f64 / 1000.0),
        None => "?".to_string(),
    };
    for server in list {
        let mut name = field(server, "name");
        if server.get("answering").and_then(Value::as_bool) == Some(true) {
            name.push_str(" (this)");
        }
        table.add_row(vec![
            field(server, "id"),
            name,
            match server.get("alive").and_then(Value::as_bool) {
                Some(true) => "alive",
                Some(false) => "dead",
                None => "?",
            }
            .to_string(),
            format!("{} ago", secs(ms(server, "heartbeat_age_ms"))),
            secs(ms(server, "lease_ms")),
            field(server, "address"),
            field(server, "version"),
        ]);
    }
    table
}

/// What `run` and `bench` share: find the image, prepare the courselab and
/// files, start the callback listener.
struct Prepared {
    template: Arc<JobTemplate>,
    wait: Arc<Wait>,
    report: run::UploadReport,
}

async fn prepare_run(
    client: &TangoClient,
    settings: &Settings,
    dir: &Path,
    args: &JobRunArgs,
) -> Result<Prepared> {
    let files = run::job_dir_files(dir)?;
    let dir_name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().and_then(|n| n.to_str()).map(str::to_string))
        .unwrap_or_else(|| "job".to_string());
    let courselab = args
        .courselab
        .clone()
        .unwrap_or_else(|| format!("tango-cli-{dir_name}"));
    let image = settings
        .image
        .clone()
        .unwrap_or_else(|| DEFAULT_IMAGE.to_string());
    let (job_files, report) = run::prepare(client, &courselab, &files).await?;
    let wait = if args.poll {
        Wait::Poll
    } else {
        Wait::Callback(Arc::new(
            CallbackListener::start(args.callback_listen, args.callback_base.clone()).await?,
        ))
    };
    let mut template = JobTemplate::new(
        &courselab,
        &image,
        job_files,
        &format!("tango-cli_{dir_name}"),
    );
    template.timeout = args.timeout;
    template.max_kb = args.max_kb;
    template.disable_network = args.disable_network;
    template.wait_limit = Duration::from_secs(args.wait_timeout.max(1));
    Ok(Prepared {
        template: Arc::new(template),
        wait: Arc::new(wait),
        report,
    })
}

fn progress_bar(count: usize, json: bool) -> indicatif::ProgressBar {
    if json {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(count as u64);
    let style = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} jobs  {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

async fn run_dir(
    client: &TangoClient,
    settings: &Settings,
    args: RunArgs,
    json: bool,
) -> Result<u8> {
    if args.jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let prepared = prepare_run(client, settings, &args.dir, &args.job).await?;
    if !json {
        eprintln!(
            "courselab {}: uploaded {}, unchanged {}",
            prepared.template.courselab,
            list_or_none(&prepared.report.uploaded),
            list_or_none(&prepared.report.unchanged)
        );
    }
    if args.jobs == 1 {
        let result = run::run_job(client, &prepared.template, &prepared.wait, 0).await?;
        if json {
            let mut value = serde_json::to_value(&result)?;
            if let Some(object) = value.as_object_mut() {
                object.insert(
                    "output".into(),
                    Value::String(String::from_utf8_lossy(&result.output).into_owned()),
                );
                object.insert(
                    "uploaded".into(),
                    serde_json::to_value(&prepared.report.uploaded)?,
                );
            }
            print_json(&value);
        } else {
            std::io::stdout()
                .write_all(&result.output)
                .context("cannot write the output")?;
            eprintln!(
                "job {} {} in {:.0} ms",
                result.job_id,
                if result.ok { "succeeded" } else { "FAILED" },
                result.latency_ms
            );
        }
        if result.ok {
            return Ok(0);
        }
        eprintln!(
            "error: job {} failed: {}",
            result.job_id,
            result.failure.as_deref().unwrap_or("unknown")
        );
        return Ok(EXIT_JOB_FAILED);
    }
    let label = args.dir.display().to_string();
    let summary = batch(
        std::slice::from_ref(client),
        prepared,
        &label,
        args.jobs,
        args.concurrency,
        json,
    )
    .await;
    report_summary(&summary, json);
    Ok(if summary.failures == 0 {
        0
    } else {
        EXIT_JOB_FAILED
    })
}

async fn batch(
    clients: &[TangoClient],
    prepared: Prepared,
    label: &str,
    count: usize,
    concurrency: usize,
    json: bool,
) -> Summary {
    let bar = progress_bar(count, json);
    let (results, wall) = run::run_batch(
        clients,
        prepared.template.clone(),
        prepared.wait.clone(),
        count,
        concurrency,
        &bar,
    )
    .await;
    bar.finish_and_clear();
    let facts = run::BatchFacts {
        job: label,
        image: &prepared.template.image,
        servers: clients.len(),
        concurrency,
        wall,
    };
    run::summarize(&facts, &results, &prepared.wait)
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

fn report_summary(summary: &Summary, json: bool) {
    if json {
        print_json(summary);
        return;
    }
    let mut table = new_table(&["measure", "value"]);
    let ms = |v: f64| format!("{v:.1} ms");
    table.add_row(vec!["job".to_string(), summary.job.clone()]);
    table.add_row(vec!["image".to_string(), summary.image.clone()]);
    table.add_row(vec![
        "jobs (concurrency)".to_string(),
        format!(
            "{} ({}), results by {}",
            summary.jobs, summary.concurrency, summary.wait
        ),
    ]);
    table.add_row(vec!["ok".to_string(), summary.ok.to_string()]);
    table.add_row(vec!["failures".to_string(), summary.failures.to_string()]);
    if let Some(l) = &summary.latency {
        table.add_row(vec!["latency p50".to_string(), ms(l.p50_ms)]);
        table.add_row(vec!["latency p95".to_string(), ms(l.p95_ms)]);
        table.add_row(vec!["latency p99".to_string(), ms(l.p99_ms)]);
        table.add_row(vec![
            "latency min / mean / max".to_string(),
            format!("{} / {} / {}", ms(l.min_ms), ms(l.mean_ms), ms(l.max_ms)),
        ]);
    }
    add_latency_rows(&mut table, summary.add_latency.as_ref());
    table.add_row(vec![
        "throughput".to_string(),
        format!("{:.2} jobs/s", summary.throughput_jobs_per_sec),
    ]);
    table.add_row(vec![
        "wall time".to_string(),
        format!("{:.2} s", summary.wall_secs),
    ]);
    println!("{table}");
    print_failure_reasons(&summary.failure_reasons);
}

/// How long addJob took to answer.
fn add_latency_rows(table: &mut Table, latency: Option<&run::Latencies>) {
    if let Some(l) = latency {
        table.add_row(vec![
            "addJob answer p50 / p95 / max".to_string(),
            format!("{:.1} / {:.1} / {:.1} ms", l.p50_ms, l.p95_ms, l.max_ms),
        ]);
    }
}

fn print_failure_reasons(reasons: &std::collections::BTreeMap<String, usize>) {
    if reasons.is_empty() {
        return;
    }
    let mut table = new_table(&["failure", "count"]);
    for (reason, count) in reasons {
        table.add_row(vec![reason.clone(), count.to_string()]);
    }
    println!("{table}");
}

fn report_adds(summary: &run::AddSummary, json: bool) {
    if json {
        print_json(summary);
        return;
    }
    let mut table = new_table(&["measure", "value"]);
    table.add_row(vec!["job".to_string(), summary.job.clone()]);
    table.add_row(vec!["image".to_string(), summary.image.clone()]);
    table.add_row(vec![
        "addJobs (at once), servers".to_string(),
        format!(
            "{} ({}), {}",
            summary.jobs, summary.concurrency, summary.servers
        ),
    ]);
    table.add_row(vec!["added".to_string(), summary.added.to_string()]);
    table.add_row(vec!["failures".to_string(), summary.failures.to_string()]);
    add_latency_rows(&mut table, summary.add_latency.as_ref());
    table.add_row(vec![
        "addJob rate".to_string(),
        format!("{:.1} addJobs/s", summary.addjob_per_sec),
    ]);
    table.add_row(vec![
        "wall time".to_string(),
        format!("{:.2} s", summary.wall_secs),
    ]);
    println!("{table}");
    print_failure_reasons(&summary.failure_reasons);
}

async fn bench(
    clients: &[TangoClient],
    settings: &Settings,
    mut args: BenchArgs,
    json: bool,
) -> Result<u8> {
    if args.count == 0 {
        bail!("-n must be at least 1");
    }
    if args.concurrency == 0 {
        bail!("-c/--concurrency must be at least 1");
    }
    let Some(first) = clients.first() else {
        bail!("no server to bench: give --url");
    };
    // Nobody waits for the results of --add-only, so no callback listener.
    args.run.poll |= args.add_only;
    let dir = run::find_example_job(&args.job)?;
    // The files go to the first server only: servers that share a store
    // share the courselab's files, as behind a load balancer.
    let prepared = prepare_run(first, settings, &dir, &args.run).await?;
    if args.add_only {
        let bar = progress_bar(args.count, json);
        let (results, wall) = run::add_batch(
            clients,
            prepared.template.clone(),
            args.count,
            args.concurrency,
            &bar,
        )
        .await;
        bar.finish_and_clear();
        let facts = run::BatchFacts {
            job: &args.job,
            image: &prepared.template.image,
            servers: clients.len(),
            concurrency: args.concurrency,
            wall,
        };
        let summary = run::summarize_adds(&facts, &results);
        report_adds(&summary, json);
        return Ok(if summary.failures == 0 { 0 } else { EXIT_ERROR });
    }
    let summary = batch(
        clients,
        prepared,
        &args.job,
        args.count,
        args.concurrency,
        json,
    )
    .await;
    report_summary(&summary, json);
    Ok(if summary.failures == 0 {
        0
    } else {
        EXIT_JOB_FAILED
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_table_marks_the_answering_server_and_the_dead() {
        let list = [
            serde_json::json!({"id": 1, "name": "a", "alive": false, "heartbeat_age_ms": 42_300,
                "lease_ms": 2000, "address": "127.0.0.1:1", "version": "0.1.0", "answering": false}),
            serde_json::json!({"id": 2, "name": "b", "alive": true, "heartbeat_age_ms": 300,
                "lease_ms": 2000, "address": "127.0.0.1:2", "version": "0.1.0", "answering": true}),
        ];
        let text = servers_table(&list).to_string();
        let rows: Vec<&str> = text.lines().collect();
        let a = rows.iter().find(|r| r.contains("127.0.0.1:1")).unwrap();
        assert!(
            a.contains("dead") && a.contains("42.3 s ago") && !a.contains("(this)"),
            "{text}"
        );
        let b = rows.iter().find(|r| r.contains("127.0.0.1:2")).unwrap();
        assert!(
            b.contains("alive") && b.contains("b (this)") && b.contains("0.3 s ago"),
            "{text}"
        );
    }

    #[test]
    fn file_args() {
        let f = parse_file_arg("autograde-Makefile:Makefile").unwrap();
        assert_eq!(f.local_file, "autograde-Makefile");
        assert_eq!(f.dest_file, "Makefile");
        let f = parse_file_arg("hello.py").unwrap();
        assert_eq!(f.dest_file, "hello.py");
        assert!(parse_file_arg(":x").is_err());
        assert!(parse_file_arg("x:").is_err());
    }

    #[test]
    fn job_states_follow_autolab() {
        let dead_ok = serde_json::json!({"trace": ["t|Added job", "t|Success: Autodriver returned normally"]});
        assert_eq!(job_state(&dead_ok, true), "done");
        let dead_bad = serde_json::json!({"trace": ["t|Error: Job timed out after 5 seconds"]});
        assert_eq!(job_state(&dead_bad, true), "failed");
        let live = serde_json::json!({"assigned": false, "trace": ["t|Added job"]});
        assert_eq!(job_state(&live, false), "waiting");
        assert_eq!(
            trace_message("Fri Nov 27 17:24:44 2026|Added job"),
            "Added job"
        );
    }
}
