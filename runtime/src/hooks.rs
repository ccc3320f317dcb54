//! OCI hooks that run on the host, in the runtime's namespaces (prestart,
//! createRuntime, poststart, poststop): each gets the container's state JSON
//! on stdin and is killed when its `timeout` passes.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::Hook;

/// A hook that failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{kind} hook {path}: cannot run: {err}")]
    Spawn { kind: &'static str, path: PathBuf, err: std::io::Error },
    #[error("{kind} hook {path}: {status}{output}")]
    Failed { kind: &'static str, path: PathBuf, status: String, output: String },
    #[error("{kind} hook {path}: timed out after {secs} s")]
    Timeout { kind: &'static str, path: PathBuf, secs: i64 },
}

/// The OCI state of a container (what `state` prints and hooks read): the
/// one builder of it for the CLI and the shim.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OciState<'a> {
    #[serde(rename = "ociVersion")]
    pub oci_version: &'static str,
    pub id: &'a str,
    pub status: &'a str,
    /// The host process that stands for the container (0 once stopped).
    pub pid: u32,
    pub bundle: &'a Path,
    pub annotations: &'a HashMap<String, String>,
    /// runc's extras beyond the spec's fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<&'a str>,
    /// Ours: why a container stopped when it did not simply exit.
    #[serde(rename = "stopReason", skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<&'a str>,
}

impl<'a> OciState<'a> {
    /// The OCI runtime spec version Carapace reports.
    pub const VERSION: &'static str = "1.2.0";

    pub fn new(id: &'a str, status: &'a str, pid: u32, bundle: &'a Path, annotations: &'a HashMap<String, String>) -> Self {
        let pid = if status == "stopped" { 0 } else { pid };
        Self {
            oci_version: Self::VERSION,
            id,
            status,
            pid,
            bundle,
            annotations,
            rootfs: None,
            created: None,
            owner: None,
            stop_reason: None,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Runs `hooks` in order; stops at the first failure.
#[tracing::instrument(skip(hooks, state), fields(count = hooks.len()))]
pub fn run(kind: &'static str, hooks: &[Hook], state: &serde_json::Value) -> Result<(), HookError> {
    let input = serde_json::to_vec(state).unwrap_or_default();
    for hook in hooks {
        run_one(kind, hook, &input)?;
    }
    Ok(())
}

/// Runs `hooks`, logging failures instead of stopping (poststart and
/// poststop: the spec says a failure there is only a warning).
pub fn run_warn(kind: &'static str, hooks: &[Hook], state: &serde_json::Value) {
    let input = serde_json::to_vec(state).unwrap_or_default();
    for hook in hooks {
        if let Err(e) = run_one(kind, hook, &input) {
            tracing::warn!("{e}");
            eprintln!("carapace: warning: {e}");
        }
    }
}

fn run_one(kind: &'static str, hook: &Hook, input: &[u8]) -> Result<(), HookError> {
    let path = hook.path().clone();
    let mut cmd = Command::new(&path);
    if let Some(args) = hook.args() {
        if let Some((argv0, rest)) = args.split_first() {
            std::os::unix::process::CommandExt::arg0(&mut cmd, argv0);
            cmd.args(rest);
        }
    }
    cmd.env_clear();
    for kv in hook.env().iter().flatten() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| HookError::Spawn { kind, path: path.clone(), err: source })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its state must not fail the write.
        let _ = stdin.write_all(input);
    }
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut text);
        }
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut text);
        }
        text
    });
    let timeout = hook.timeout().map(|s| Duration::from_secs(u64::try_from(s.max(1)).unwrap_or(1)));
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => {}
            Err(source) => return Err(HookError::Spawn { kind, path, err: source }),
        }
        if timeout.is_some_and(|t| start.elapsed() >= t) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HookError::Timeout { kind, path, secs: hook.timeout().unwrap_or(0) });
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let output = reader.join().unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&output).trim().to_string();
    let output = if text.is_empty() { String::new() } else { format!(": {text}") };
    Err(HookError::Failed { kind, path, status: status.to_string(), output })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(json: serde_json::Value) -> Hook {
        serde_json::from_value(json).expect("hook")
    }

    #[test]
    fn gets_state_on_stdin_and_reports_failure_and_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("state");
        let state = serde_json::json!({"id": "c", "status": "creating"});
        let ok = hook(serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}", out.display())]}));
        run("prestart", &[ok], &state).expect("hook runs");
        let got: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).expect("state")).expect("json");
        assert_eq!(got, state);

        let bad = hook(serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", "echo nope >&2; exit 3"]}));
        let e = run("createRuntime", &[bad], &state).expect_err("fails").to_string();
        assert!(e.contains("createRuntime hook /bin/sh") && e.contains("nope"), "{e}");

        let slow = hook(serde_json::json!({"path": "/bin/sleep", "args": ["sleep", "30"], "timeout": 1}));
        let e = run("poststart", &[slow], &state).expect_err("times out").to_string();
        assert!(e.contains("timed out"), "{e}");

        let missing = hook(serde_json::json!({"path": "/nonexistent/hook"}));
        let e = run("prestart", &[missing], &state).expect_err("missing").to_string();
        assert!(e.contains("/nonexistent/hook"), "{e}");
    }
}
