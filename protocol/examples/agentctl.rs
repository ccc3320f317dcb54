//! A tiny host-side client for poking an agent by hand.
//!
//! ```text
//! cargo run -p carapace-protocol --example agentctl -- unix:///tmp/agent.sock check
//! cargo run -p carapace-protocol --example agentctl -- hvsock:///tmp/vm.sock version shutdown
//! ```
//!
//! `unix://PATH`: an agent run with `--listen unix://PATH`; `hvsock://PATH`:
//! the VMM's hybrid vsock socket (waits up to 120 s for the guest's agent).
//! Commands, run in order: check, version, shutdown, unimplemented.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use carapace_protocol::{agent, client, health, rpc_code, AgentClient, HealthClient};

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(30_000_000_000)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((address, commands)) = args.split_first() else {
        eprintln!("usage: agentctl unix://PATH|hvsock://PATH [check|version|shutdown|unimplemented]...");
        return ExitCode::from(2);
    };
    let start = Instant::now();
    let conn = if let Some(path) = address.strip_prefix("unix://") {
        client::connect_unix(path)
    } else if let Some(path) = address.strip_prefix("hvsock://") {
        client::wait_for_agent(path, Duration::from_secs(120))
    } else {
        eprintln!("agentctl: unknown address {address:?}");
        return ExitCode::from(2);
    };
    let conn = match conn {
        Ok(conn) => conn,
        Err(e) => {
            eprintln!("agentctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("connected after {:.3}s", start.elapsed().as_secs_f64());
    let health = HealthClient::new(conn.clone());
    let agent = AgentClient::new(conn);
    for command in commands {
        let t = Instant::now();
        let result = match command.as_str() {
            "check" => health.check(ctx(), &health::CheckRequest::new()).map(|r| format!("{:?}", r.status)),
            "version" => {
                health.version(ctx(), &health::VersionRequest::new()).map(|r| format!("agent {} api {}", r.agent_version, r.api_version))
            }
            "shutdown" => agent.shutdown(ctx(), &agent::ShutdownRequest::new()).map(|_| "ok".to_string()),
            "unimplemented" => match agent.start_container(ctx(), &agent::StartContainerRequest::new()) {
                Err(e) => Ok(format!("{:?}: {e}", rpc_code(&e))),
                Ok(_) => Ok("unexpectedly implemented".to_string()),
            },
            other => {
                eprintln!("agentctl: unknown command {other:?}");
                return ExitCode::from(2);
            }
        };
        match result {
            Ok(text) => println!("{command}: {text} ({:.3}s)", t.elapsed().as_secs_f64()),
            Err(e) => {
                eprintln!("{command}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
