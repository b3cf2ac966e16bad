//! `tango`: a command-line client for Tango v1 servers (tangod or Tango).

mod callback;
mod client;
mod commands;
mod config;
mod outcome;
mod run;

use clap::{Args, Parser, Subcommand};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit status when the command could not be done (network, HTTP, a
/// refusal with statusId < 0, bad input).
pub const EXIT_ERROR: u8 = 1;
/// Exit status when the job(s) ran but failed (timeout, make failed,
/// internal error): `run`, `bench`, and `poll` of such a job's output.
pub const EXIT_JOB_FAILED: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "tango",
    version,
    about = "Client for Tango v1 autograding servers (tangod)",
    long_about = "Client for Tango v1 autograding servers (tangod).\n\n\
        The server and key come from --url/--key, else TANGO_URL/TANGO_KEY, else the \
        config file (~/.config/tango/config.toml or --config) with `url = \"...\"`, \
        `key = \"...\"` and optionally `image = \"...\"`.\n\n\
        Exit status: 0 success, 1 error (unreachable server, HTTP error, statusId < 0), \
        2 usage error, 3 a job ran but failed (run, bench, and poll of a finished job \
        that failed)."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug)]
pub struct Global {
    /// Server address, e.g. http://127.0.0.1:3000. `bench` takes several
    /// servers that share one store (repeat --url, or a comma-separated
    /// list) and adds its jobs to them in turn
    #[arg(long, env = "TANGO_URL", global = true, value_delimiter = ',')]
    pub url: Vec<String>,
    /// Access key (the first path segment of every route)
    #[arg(long, env = "TANGO_KEY", global = true, hide_env_values = true)]
    pub key: Option<String>,
    /// Config file [default: ~/.config/tango/config.toml]
    #[arg(long, env = "TANGO_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// A PEM CA certificate (or bundle) trusted for https:// servers besides
    /// the public roots, e.g. the private CA that signed tangod's certificate
    #[arg(long, env = "TANGO_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Print JSON for scripts instead of tables
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds to wait for any single HTTP answer
    #[arg(long, global = true, default_value_t = 120)]
    pub http_timeout: u64,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a courselab (if missing) and list its files with their md5
    Open { courselab: String },
    /// Upload a file into a courselab
    Upload {
        courselab: String,
        file: PathBuf,
        /// Name to store it under [default: the file's name]
        #[arg(long)]
        name: Option<String>,
    },
    /// Add a job whose files were uploaded before
    AddJob(AddJobArgs),
    /// Fetch a finished job's output file
    Poll {
        courselab: String,
        output_file: String,
        /// Keep polling up to this many seconds until the file exists
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
        /// Write the output here instead of standard output
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
    },
    /// Show the output a running job has produced so far
    PartialOutput { job_id: u64 },
    /// Show server statistics
    Info,
    /// List live jobs, or finished ones with --dead
    Jobs {
        #[arg(long)]
        dead: bool,
    },
    /// List VM pools, all or one image's
    Pool { image: Option<String> },
    /// Set the number of VMs kept ready for an image
    Prealloc {
        image: String,
        count: u64,
        #[arg(long)]
        cores: Option<u32>,
        /// Memory in MiB
        #[arg(long)]
        memory: Option<u64>,
        /// Backend (e.g. sandbox, docker)
        #[arg(long)]
        vmms: Option<String>,
    },
    /// Load a `docker save` tar into the server's Docker as NAME:latest
    Build { name: String, tar: PathBuf },
    /// Upload a job directory, run it and print its output
    Run(RunArgs),
    /// Run many jobs of an example and report latency and throughput
    Bench(BenchArgs),
    /// List the hosts the docker backend spreads containers over, or drain
    /// or undrain one (over /v2/ with the key as a bearer token)
    Hosts {
        #[command(subcommand)]
        action: Option<HostsAction>,
    },
    /// List the tangod servers registered in the server's store, alive or
    /// dead, with how old their heartbeat is (over /v2/ with the key as a
    /// bearer token)
    Servers,
    /// Check that tangod answers: `/info` with a key (--key, TANGO_KEY, the
    /// config file, else RESTFUL_KEY), `/` without one. Exit 0 or 1; for
    /// container healthchecks (`tango --http-timeout 5 health`).
    Health,
}

#[derive(Subcommand, Debug)]
pub enum HostsAction {
    /// Place no new containers on NAME and remove its idle ones; its
    /// running jobs finish
    Drain { name: String },
    /// Let NAME take new containers again
    Undrain { name: String },
}

#[derive(Args, Debug)]
pub struct AddJobArgs {
    pub courselab: String,
    /// Image the job runs in
    #[arg(long, required_unless_present = "job_json")]
    pub image: Option<String>,
    /// An uploaded file and its name in the VM (default: the same); one
    /// must end up as Makefile. Repeat for each file.
    #[arg(
        long = "file",
        value_name = "LOCAL[:DEST]",
        required_unless_present = "job_json"
    )]
    pub files: Vec<String>,
    /// Output file name in the courselab's output/
    #[arg(long, required_unless_present = "job_json")]
    pub output_file: Option<String>,
    /// Run time limit in seconds [default: the server's]
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Output cap in KiB [default: the server's]
    #[arg(long)]
    pub max_kb: Option<u64>,
    /// Where the server POSTs the result
    #[arg(long)]
    pub callback_url: Option<String>,
    /// Run the job without network
    #[arg(long)]
    pub disable_network: bool,
    /// Job name [default: the output file's name]
    #[arg(long)]
    pub name: Option<String>,
    /// Send this file as the raw addJob body instead ("-" for stdin); the
    /// other job options are then not allowed. (Named --job-json because
    /// --json selects JSON output on every command.)
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = ["image", "files", "output_file", "timeout", "max_kb", "callback_url", "disable_network", "name"]
    )]
    pub job_json: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct JobRunArgs {
    /// Image to run in [default: TANGO_IMAGE, `image` in the config file,
    /// else autograding_image]
    #[arg(long, env = "TANGO_IMAGE")]
    pub image: Option<String>,
    /// Courselab to use [default: tango-cli-<directory name>]
    #[arg(long)]
    pub courselab: Option<String>,
    /// Run time limit per job in seconds [default: the server's]
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Output cap in KiB [default: the server's]
    #[arg(long)]
    pub max_kb: Option<u64>,
    /// Run without network
    #[arg(long)]
    pub disable_network: bool,
    /// Poll for results instead of listening for callbacks
    #[arg(long)]
    pub poll: bool,
    /// Address the callback listener binds
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    pub callback_listen: SocketAddr,
    /// URL tangod should call back, when it cannot reach the listen address
    /// directly (e.g. http://myhost:4000); the per-job path is appended
    #[arg(long, value_name = "URL")]
    pub callback_base: Option<String>,
    /// Give up on a job's result after this many seconds
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub wait_timeout: u64,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Job directory: an autograde-Makefile (or Makefile) and its files
    pub dir: PathBuf,
    #[command(flatten)]
    pub job: JobRunArgs,
    /// Run the job this many times (prints a summary instead of the output)
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// How many of those jobs run at once
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A job of examples/jobs/ by name (e.g. hello) or a directory
    pub job: String,
    #[command(flatten)]
    pub run: JobRunArgs,
    /// Number of jobs
    #[arg(short = 'n', long = "count", default_value_t = 20)]
    pub count: usize,
    /// Jobs in flight at once (with --add-only: addJob requests at once)
    #[arg(short = 'c', long, default_value_t = 4)]
    pub concurrency: usize,
    /// Only add the jobs, C requests at a time, without waiting for their
    /// results: measures the addJob rate alone (the jobs stay on the
    /// server, queued or running)
    #[arg(long)]
    pub add_only: bool,
}

/// Exit status of a usage error (clap's own).
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(err),
    };
    let json = cli.global.json;
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            let err = anyhow::anyhow!("cannot start the async runtime: {e}");
            report_error(&err, json);
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(commands::dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            report_error(&err, json);
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// The error on standard error, and with `--json` also as the one JSON
/// document on standard output, with the server's answer when there was
/// one (commands print nothing on stdout before they fail).
fn report_error(err: &anyhow::Error, json: bool) {
    if json {
        let answer = err.chain().find_map(|cause| {
            if let Some(e) = cause.downcast_ref::<client::ClientError>() {
                e.answer().cloned()
            } else {
                cause
                    .downcast_ref::<commands::AnsweredError>()
                    .map(|e| e.answer.clone())
            }
        });
        let report = serde_json::json!({
            "error": format!("{err:#}"),
            "answer": answer,
        });
        println!("{report}");
    }
    eprintln!("error: {err:#}");
}

/// A command line clap refused. `--help` and `--version` are printed as
/// clap prints them (exit 0); a usage error with `--json` among the
/// arguments also gives the JSON error document on standard output, so a
/// script always has one to read.
fn usage_error(err: clap::Error) -> ExitCode {
    let code = err.exit_code();
    let wants_json = std::env::args_os().skip(1).any(|arg| arg == "--json");
    if code != 0 && wants_json {
        let text = err.render().to_string();
        let first_line = text.lines().next().unwrap_or_default();
        let message = first_line.strip_prefix("error: ").unwrap_or(first_line);
        println!(
            "{}",
            serde_json::json!({ "error": message, "answer": Value::Null })
        );
    }
    let _ = err.print();
    ExitCode::from(u8::try_from(code).unwrap_or(EXIT_USAGE))
}
