//! Command-line parsing, by hand to keep the static binary small.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

pub const DEFAULT_USER: &str = "autograde";
pub const DEFAULT_TIMEOUT_S: u64 = 3600;
pub const DEFAULT_OUTPUT_CAP: u64 = 512 * 1024;
pub const DEFAULT_NPROC: u64 = 0;
pub const DEFAULT_FSIZE: u64 = 0;

pub const HELP: &str = "\
autodriver: run a grading job (`make` in DIR) as an unprivileged user

usage:
  autodriver [-u NPROC] [-f FSIZE_BYTES] [-t TIMEOUT_S] [-o OUTPUT_CAP_BYTES]
             [--user NAME|UID[:GID]] [--home DIR] [--cpu-seconds N]
             [--mem-bytes N] [--nofile N] [--stack-bytes N]
             [--summary FILE] [--stream FILE] [--input-tar FILE|-]
             [--purge-writable LIST] DIR
  autodriver --idle [--serve] [--loopback-hosts] [--purge-writable LIST]
  autodriver --help

options (a value may also be given as --opt=VALUE):
  -u, --nproc N        RLIMIT_NPROC of the grading user (0: no limit; default 0)
  -f, --fsize N        RLIMIT_FSIZE in bytes (0: no limit; default 0)
  -t, --timeout N      seconds before the job is killed (0: never; default 3600)
  -o, --osize N        output cap in bytes: beyond it the first and last N/2
                       bytes are kept (0 or absent: 524288)
      --user U         NAME (from /etc/passwd) or UID[:GID] (default autograde)
      --home DIR       the grading user's home (default: passwd home, else
                       /home/NAME, /home/autograde for a bare uid)
      --cpu-seconds N  RLIMIT_CPU (SIGXCPU at N s, SIGKILL at N+1 s)
      --mem-bytes N    RLIMIT_AS in bytes
      --nofile N       RLIMIT_NOFILE
      --stack-bytes N  RLIMIT_STACK in bytes
      --summary FILE   write a JSON verdict to FILE
      --stream FILE    append the kept head of the output to FILE as it comes
      --input-tar F    first write the files of the tar F (`-`: stdin) into
                       DIR, creating it (regular files with plain names only)
      --purge-writable LIST
                       after the job also remove the grading user's files from
                       every directory of the root file system others may
                       write to (e.g. /run/lock), and its System V IPC
                       objects; the directories are found by one scan, kept
                       in LIST (with --idle: scan at once)
      --idle           be a container's PID 1: reap children, exit 0 on SIGTERM
      --serve          with --idle: also run the jobs asked for on stdin, one
                       at a time, each as `autodriver ARGS` with its output on
                       stdout, followed by a line with the request's nonce and
                       the exit code (the request format is in src/idle.rs)
      --loopback-hosts with --idle: first write localhost entries into an
                       empty /etc/hosts (a Docker container without network
                       gets an empty one)

exit codes: 0 the job ran (whatever make returned), 1 usage error,
            2 timeout, 3 OS error (the machine should be replaced)
";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobArgs {
    pub nproc: u64,
    pub fsize: u64,
    /// `None`: no timeout.
    pub timeout_s: Option<u64>,
    pub output_cap: u64,
    pub user: String,
    pub home: Option<PathBuf>,
    pub cpu_seconds: Option<u64>,
    pub mem_bytes: Option<u64>,
    pub nofile: Option<u64>,
    pub stack_bytes: Option<u64>,
    pub summary: Option<PathBuf>,
    pub stream: Option<PathBuf>,
    /// A tar of input files (`-`: stdin) to write into `dir` first.
    pub input_tar: Option<PathBuf>,
    /// Where the list of writable directories to clean is kept.
    pub purge_writable: Option<PathBuf>,
    pub dir: PathBuf,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Box<JobArgs>),
    /// `--idle`, scanning for writable directories into the list file first.
    Idle {
        purge_writable: Option<PathBuf>,
        serve: bool,
        loopback_hosts: bool,
    },
    Help,
}

fn parse_number(option: &str, value: &OsString) -> Result<u64, String> {
    let text = value
        .to_str()
        .ok_or_else(|| format!("the value of {option} is not valid UTF-8"))?;
    text.parse::<u64>()
        .map_err(|_| format!("the value of {option} must be a nonnegative integer, not {text:?}"))
}

fn nonempty_path(option: &str, value: OsString) -> Result<PathBuf, String> {
    if value.is_empty() {
        return Err(format!("the value of {option} is empty"));
    }
    Ok(PathBuf::from(value))
}

pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut nproc = DEFAULT_NPROC;
    let mut fsize = DEFAULT_FSIZE;
    let mut timeout_s = Some(DEFAULT_TIMEOUT_S);
    let mut output_cap = DEFAULT_OUTPUT_CAP;
    let mut user = DEFAULT_USER.to_string();
    let mut home = None;
    let mut cpu_seconds = None;
    let mut mem_bytes = None;
    let mut nofile = None;
    let mut stack_bytes = None;
    let mut summary = None;
    let mut stream = None;
    let mut input_tar = None;
    let mut purge_writable = None;
    let mut dir: Option<PathBuf> = None;
    let mut idle = false;
    let mut serve = false;
    let mut loopback_hosts = false;
    let mut options_done = false;

    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let bytes = arg.as_bytes();
        if options_done || !bytes.starts_with(b"-") || bytes == b"-" {
            if dir.is_some() {
                return Err("too many arguments: exactly one DIR is expected".into());
            }
            dir = Some(nonempty_path("DIR", arg)?);
            continue;
        }
        if bytes == b"--" {
            options_done = true;
            continue;
        }
        // Split `--opt=value` and `-uVALUE` forms.
        let (name, inline_value): (String, Option<OsString>) = if bytes.starts_with(b"--") {
            match bytes.iter().position(|&b| b == b'=') {
                Some(eq) => (
                    String::from_utf8_lossy(&bytes[..eq]).into_owned(),
                    Some(std::ffi::OsStr::from_bytes(&bytes[eq + 1..]).to_owned()),
                ),
                None => (String::from_utf8_lossy(bytes).into_owned(), None),
            }
        } else if bytes.len() > 2 {
            (
                String::from_utf8_lossy(&bytes[..2]).into_owned(),
                Some(std::ffi::OsStr::from_bytes(&bytes[2..]).to_owned()),
            )
        } else {
            (String::from_utf8_lossy(bytes).into_owned(), None)
        };

        match name.as_str() {
            "--idle" | "--serve" | "--loopback-hosts" | "--help" | "-h" => {
                if inline_value.is_some() {
                    return Err(format!("{name} takes no value"));
                }
                match name.as_str() {
                    "--idle" => idle = true,
                    "--serve" => serve = true,
                    "--loopback-hosts" => loopback_hosts = true,
                    _ => return Ok(Command::Help),
                }
                continue;
            }
            _ => {}
        }
        let mut value = || -> Result<OsString, String> {
            match inline_value.clone() {
                Some(v) => Ok(v),
                None => args.next().ok_or_else(|| format!("{name} needs a value")),
            }
        };
        match name.as_str() {
            "-u" | "--nproc" => nproc = parse_number(&name, &value()?)?,
            "-f" | "--fsize" => fsize = parse_number(&name, &value()?)?,
            "-t" | "--timeout" => {
                let seconds = parse_number(&name, &value()?)?;
                timeout_s = (seconds > 0).then_some(seconds);
            }
            "-o" | "--osize" => {
                let cap = parse_number(&name, &value()?)?;
                output_cap = if cap == 0 { DEFAULT_OUTPUT_CAP } else { cap };
            }
            "--user" => {
                let v = value()?;
                user = v
                    .to_str()
                    .filter(|s| !s.is_empty())
                    .ok_or("--user needs a non-empty UTF-8 value")?
                    .to_string();
            }
            "--home" => home = Some(nonempty_path(&name, value()?)?),
            "--cpu-seconds" => cpu_seconds = Some(parse_number(&name, &value()?)?),
            "--mem-bytes" => mem_bytes = Some(parse_number(&name, &value()?)?),
            "--nofile" => nofile = Some(parse_number(&name, &value()?)?),
            "--stack-bytes" => stack_bytes = Some(parse_number(&name, &value()?)?),
            "--summary" => summary = Some(nonempty_path(&name, value()?)?),
            "--stream" => stream = Some(nonempty_path(&name, value()?)?),
            "--input-tar" => input_tar = Some(nonempty_path(&name, value()?)?),
            "--purge-writable" => purge_writable = Some(nonempty_path(&name, value()?)?),
            _ => return Err(format!("unknown option {name}")),
        }
    }

    if idle {
        if dir.is_some() {
            return Err("--idle takes no DIR".into());
        }
        return Ok(Command::Idle {
            purge_writable,
            serve,
            loopback_hosts,
        });
    }
    if serve || loopback_hosts {
        return Err("--serve and --loopback-hosts go with --idle".into());
    }
    let dir = dir.ok_or("missing DIR")?;
    if output_cap > usize::MAX as u64 / 4 {
        return Err("the output cap is too large".into());
    }
    Ok(Command::Run(Box::new(JobArgs {
        nproc,
        fsize,
        timeout_s,
        output_cap,
        user,
        home,
        cpu_seconds,
        mem_bytes,
        nofile,
        stack_bytes,
        summary,
        stream,
        input_tar,
        purge_writable,
        dir,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(OsString::from))
    }

    fn job(args: &[&str]) -> JobArgs {
        match run(args) {
            Ok(Command::Run(job)) => *job,
            other => panic!("expected a job, got {other:?}"),
        }
    }

    #[test]
    fn tango_style_arguments() {
        let j = job(&[
            "-u",
            "100",
            "-f",
            "104857600",
            "-t",
            "20",
            "-o",
            "1024000",
            "autolab",
        ]);
        assert_eq!(j.nproc, 100);
        assert_eq!(j.fsize, 104857600);
        assert_eq!(j.timeout_s, Some(20));
        assert_eq!(j.output_cap, 1024000);
        assert_eq!(j.user, "autograde");
        assert_eq!(j.dir, PathBuf::from("autolab"));
    }

    #[test]
    fn defaults_and_zero_values() {
        let j = job(&["d"]);
        assert_eq!(j.timeout_s, Some(DEFAULT_TIMEOUT_S));
        assert_eq!(j.output_cap, DEFAULT_OUTPUT_CAP);
        let j = job(&["-t", "0", "-o", "0", "d"]);
        assert_eq!(j.timeout_s, None);
        assert_eq!(j.output_cap, DEFAULT_OUTPUT_CAP);
    }

    #[test]
    fn long_options_and_inline_values() {
        let j = job(&[
            "--user=64001:64001",
            "--home",
            "/h",
            "--cpu-seconds=5",
            "--mem-bytes",
            "1000",
            "--nofile=64",
            "--stack-bytes=8192",
            "--summary",
            "/s.json",
            "--stream=/p",
            "--input-tar",
            "-",
            "-t5",
            "d",
        ]);
        assert_eq!(j.user, "64001:64001");
        assert_eq!(j.home, Some(PathBuf::from("/h")));
        assert_eq!(j.cpu_seconds, Some(5));
        assert_eq!(j.mem_bytes, Some(1000));
        assert_eq!(j.nofile, Some(64));
        assert_eq!(j.stack_bytes, Some(8192));
        assert_eq!(j.summary, Some(PathBuf::from("/s.json")));
        assert_eq!(j.stream, Some(PathBuf::from("/p")));
        assert_eq!(j.input_tar, Some(PathBuf::from("-")));
        assert_eq!(j.timeout_s, Some(5));
    }

    #[test]
    fn usage_errors() {
        assert!(run(&[]).is_err());
        assert!(run(&["a", "b"]).is_err());
        assert!(run(&["-u", "x", "d"]).is_err());
        assert!(run(&["-u", "-1", "d"]).is_err());
        assert!(run(&["-t"]).is_err());
        assert!(run(&["--bogus", "d"]).is_err());
        assert!(run(&["--idle", "d"]).is_err());
        assert!(run(&["--user=", "d"]).is_err());
        assert!(run(&["--input-tar=", "d"]).is_err());
    }

    #[test]
    fn idle_and_help() {
        assert_eq!(
            run(&["--idle"]),
            Ok(Command::Idle {
                purge_writable: None,
                serve: false,
                loopback_hosts: false,
            })
        );
        assert_eq!(
            run(&["--idle", "--serve", "--loopback-hosts"]),
            Ok(Command::Idle {
                purge_writable: None,
                serve: true,
                loopback_hosts: true,
            })
        );
        assert!(run(&["--serve", "/home/x"]).is_err());
        assert!(run(&["--loopback-hosts", "/home/x"]).is_err());
        assert_eq!(
            run(&["--idle", "--purge-writable", "/.tango/writable"]),
            Ok(Command::Idle {
                purge_writable: Some(PathBuf::from("/.tango/writable")),
                serve: false,
                loopback_hosts: false,
            })
        );
        assert_eq!(run(&["--help"]), Ok(Command::Help));
    }
}
