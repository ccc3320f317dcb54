//! `carapace list`: the containers under --root.

use std::process::ExitCode;

use carapace_runtime::container::Runtime;
use carapace_runtime::state::{ContainerRecord, Status};

use super::{print_json, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn run(rt: &Runtime, a: &Args) -> anyhow::Result<ExitCode> {
    let all = rt.list();
    if a.quiet {
        for r in &all {
            println!("{}", r.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    match a.format {
        Format::Json => print_json(&serde_json::Value::Array(all.iter().map(|r| r.oci_state()).collect()))?,
        Format::Table => {
            for line in table(&all) {
                println!("{line}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// runc's table: a header and a row per container, columns padded to their
/// widest cell, three spaces apart.
fn table(all: &[ContainerRecord]) -> Vec<String> {
    let rows: Vec<[String; 6]> = all
        .iter()
        .map(|r| {
            let pid = if r.status == Status::Stopped { 0 } else { r.pid };
            [r.id.clone(), pid.to_string(), r.status.to_string(), r.bundle.display().to_string(), r.created.clone(), r.owner.clone()]
        })
        .collect();
    let head = ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"].map(String::from);
    let mut widths = head.clone().map(|h| h.len());
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    std::iter::once(&head)
        .chain(&rows)
        .map(|row| {
            let line: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
            line.join("   ").trim_end().to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, status: &str, pid: u32) -> ContainerRecord {
        let v = serde_json::json!({
            "id": id, "bundle": "/b", "rootfs": "/b/rootfs", "status": status, "pid": pid, "guest_pid": 1,
            "created": "2026-01-01T00:00:00Z", "owner": "root", "annotations": {}, "exit_code": null, "stop_reason": null,
        });
        serde_json::from_value(v).expect("record")
    }

    #[test]
    fn table_pads_columns_and_shows_no_pid_once_stopped() {
        let lines = table(&[record("a-long-id", "running", 42), record("b", "stopped", 43)]);
        assert_eq!(
            lines,
            [
                "ID          PID   STATUS    BUNDLE   CREATED                OWNER",
                "a-long-id   42    running   /b       2026-01-01T00:00:00Z   root",
                "b           0     stopped   /b       2026-01-01T00:00:00Z   root",
            ]
        );
    }
}
