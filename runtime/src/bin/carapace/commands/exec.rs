//! `carapace exec`: run a process in a running container, in the
//! foreground (relaying its stdio, exiting with its status) or detached.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use carapace_runtime::container::{write_pid_file, ExecOverrides, Runtime};
use carapace_runtime::monitor::{self, ExecRequest};

use super::code;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The process as an OCI `process` JSON file.
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// Give the process a terminal.
    #[arg(short, long)]
    pub tty: bool,
    #[arg(short, long)]
    pub detach: bool,
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Extra environment variables (KEY=VALUE).
    #[arg(short, long)]
    pub env: Vec<String>,
    /// Working directory in the container.
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    /// UID[:GID] to run as.
    #[arg(short, long)]
    pub user: Option<String>,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    pub id: String,
    /// The command and its arguments (without --process).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(rt: &Runtime, a: Args) -> anyhow::Result<ExitCode> {
    let Args { process, tty, detach, pid_file, env, cwd, user, console_socket, preserve_fds: _, id, args } = a;
    if process.is_none() && args.is_empty() {
        anyhow::bail!("exec: give the command to run, or --process FILE");
    }
    let user = user.as_deref().map(parse_user).transpose()?;
    let overrides = ExecOverrides { args, tty, cwd, env, user };
    let p = rt.exec_process(&id, process.as_deref(), &overrides)?;
    if detach {
        let pid = monitor::spawn_detached_exec(rt, &id, &p, console_socket.as_deref())?;
        if let Some(f) = pid_file {
            write_pid_file(&f, pid)?;
        }
        Ok(ExitCode::SUCCESS)
    } else {
        let req = ExecRequest { id: &id, process: p, console_socket: console_socket.as_deref() };
        Ok(code(monitor::exec(rt, req, None)?))
    }
}

/// `--user UID[:GID]`.
fn parse_user(s: &str) -> anyhow::Result<(u32, Option<u32>)> {
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let uid = u.parse().with_context(|| format!("--user {s:?}: the uid must be a number"))?;
    let gid = g.map(|g| g.parse()).transpose().with_context(|| format!("--user {s:?}: the gid must be a number"))?;
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_is_a_uid_and_an_optional_gid() {
        assert_eq!(parse_user("1000").ok(), Some((1000, None)));
        assert_eq!(parse_user("0:10").ok(), Some((0, Some(10))));
        let e = format!("{:#}", parse_user("root").expect_err("name"));
        assert!(e.starts_with("--user \"root\": the uid must be a number"), "{e}");
        let e = format!("{:#}", parse_user("1:wheel").expect_err("group name"));
        assert!(e.starts_with("--user \"1:wheel\": the gid must be a number"), "{e}");
    }
}
