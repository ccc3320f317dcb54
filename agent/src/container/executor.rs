//! The last step in the container's init process before the user's
//! program: an `execv` of the program found, after undoing what the
//! agent's own process state would otherwise leak into the container.
//!
//! The agent blocks SIGCHLD, SIGTERM and SIGINT in every thread (they are
//! read from a signalfd) and the Rust runtime ignores SIGPIPE; a cloned
//! process inherits both and `execve` keeps them. Without this reset a
//! container's process could not be stopped with SIGTERM.
//!
//! The program is looked up as runc does, not as libcontainer's default
//! validation does (which refuses any process without PATH in its
//! environment, even `/pause`): an `args[0]` with a '/' is used as it is
//! (relative to `process.cwd`); a bare name is searched in the process's
//! PATH and, without one, refused with a message naming it. The path
//! found is the one executed (runc does the same), so the search is not
//! made twice.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};

/// libcontainer's default executor, with signals reset first and runc's
/// program lookup (once: the path found is the one executed).
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentExecutor;

/// Empties the signal mask and restores SIGPIPE's default action.
pub fn reset_signals_for_exec() {
    // SAFETY: sigemptyset initialises the set we own; sigprocmask and
    // signal only change this (single-threaded, about to exec) process's
    // signal state.
    unsafe {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigprocmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Where `name` (a process's `args[0]`) is found, given the process's
/// environment; `is_file` says whether a path is an executable file (the
/// real check, or a test's).
pub fn find_program(name: &str, env: &[String], is_file: impl Fn(&Path) -> bool) -> Result<PathBuf, String> {
    program_candidates(name, env)?.into_iter().find(|candidate| is_file(candidate)).ok_or_else(|| {
        match env.iter().find_map(|e| e.strip_prefix("PATH=")).filter(|_| !name.contains('/')) {
            Some(path_var) => format!("process.args[0] {name:?}: not found in PATH {path_var:?}"),
            None => format!("process.args[0] {name:?}: no such executable file in the container"),
        }
    })
}

/// The paths [`find_program`] tries for `name`, in order: `name` itself if
/// it has a '/', else each PATH entry joined with it; refused (with the
/// message) when `name` is empty or bare without a PATH.
pub fn program_candidates(name: &str, env: &[String]) -> Result<Vec<PathBuf>, String> {
    if name.is_empty() {
        return Err("process.args[0]: empty".into());
    }
    if name.contains('/') {
        return Ok(vec![PathBuf::from(name)]);
    }
    let Some(path_var) = env.iter().find_map(|e| e.strip_prefix("PATH=")) else {
        return Err(format!(
            "process.args[0] {name:?}: not found: the process's environment has no PATH \
             (give a path with a '/', or set PATH in process.env)"
        ));
    };
    Ok(path_var
        .split(':')
        // An empty entry is the working directory, as for execvp.
        .map(|dir| if dir.is_empty() { Path::new(".") } else { Path::new(dir) })
        .map(|dir| dir.join(name))
        .collect())
}

/// A regular file (after symlinks) with an execute bit.
fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The program the spec's process runs, looked up as [`find_program`] does
/// with the process's own environment.
fn lookup(spec: &Spec) -> Result<PathBuf, String> {
    let process = spec.process().as_ref().ok_or("process: missing")?;
    let name = process.args().as_ref().and_then(|a| a.first()).ok_or("process.args: empty")?;
    find_program(name, process.env().as_deref().unwrap_or_default(), is_executable_file)
}

/// The program `validate` found, for `exec` in the same (init or exec'd)
/// process: looking it up again through PATH would cost the failed
/// `execve`s execvp makes (each a new mm in the kernel, expensive where the
/// guest kernel is emulated).
static FOUND: Mutex<Option<PathBuf>> = Mutex::new(None);

impl Executor for AgentExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        reset_signals_for_exec();
        let process = spec.process().as_ref().ok_or(ExecutorError::InvalidArg)?;
        let args = process.args().as_ref().filter(|a| !a.is_empty()).ok_or(ExecutorError::InvalidArg)?;
        let found = FOUND.lock().unwrap_or_else(|e| e.into_inner()).take();
        let program = match found {
            Some(program) => program,
            None => lookup(spec).map_err(ExecutorError::Other)?,
        };
        let to_c = |s: &[u8]| {
            CString::new(s)
                .map_err(|_| ExecutorError::Other(format!("process.args: {s:?} contains a NUL byte", s = String::from_utf8_lossy(s))))
        };
        let path = to_c(program.as_os_str().as_bytes())?;
        let argv = args.iter().map(|a| to_c(a.as_bytes())).collect::<Result<Vec<_>, _>>()?;
        // execv keeps the environment libcontainer set, as execvp would.
        let err = match nix::unistd::execv(&path, &argv) {
            Ok(never) => match never {},
            Err(err) => err,
        };
        Err(ExecutorError::Other(format!("executing {program:?} (process.args[0] {:?}): {err}", args[0])))
    }

    /// Runs in the container (after pivot_root and chdir to process.cwd),
    /// as runc's lookup does.
    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        let program = lookup(spec).map_err(ExecutorValidationError::ArgValidationError)?;
        *FOUND.lock().unwrap_or_else(|e| e.into_inner()) = Some(program);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &'static [&'static str]) -> impl Fn(&Path) -> bool {
        move |p: &Path| list.iter().any(|f| Path::new(f) == p)
    }

    #[test]
    fn a_path_with_a_slash_needs_no_path_variable() {
        let env = vec!["HOME=/".to_string()];
        assert_eq!(find_program("/pause", &env, files(&["/pause"])), Ok(PathBuf::from("/pause")));
        assert_eq!(find_program("./run", &env, files(&["./run"])), Ok(PathBuf::from("./run")));
        let err = find_program("/nope", &env, files(&["/pause"])).expect_err("missing");
        assert!(err.contains("\"/nope\"") && err.contains("no such executable"), "{err}");
    }

    #[test]
    fn a_bare_name_without_path_is_refused_by_name() {
        let err = find_program("pause", &["HOME=/".into()], files(&["/pause"])).expect_err("no PATH");
        assert!(err.starts_with("process.args[0] \"pause\": not found"), "{err}");
        assert!(err.contains("no PATH"), "{err}");
    }

    #[test]
    fn a_bare_name_is_searched_in_path_in_order() {
        let env = vec!["PATH=/usr/bin:/bin".to_string()];
        assert_eq!(find_program("sh", &env, files(&["/bin/sh", "/usr/bin/sh"])), Ok(PathBuf::from("/usr/bin/sh")));
        assert_eq!(find_program("sh", &env, files(&["/bin/sh"])), Ok(PathBuf::from("/bin/sh")));
        let err = find_program("zsh", &env, files(&["/bin/sh"])).expect_err("absent");
        assert_eq!(err, "process.args[0] \"zsh\": not found in PATH \"/usr/bin:/bin\"");
    }

    #[test]
    fn executable_files_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "x").expect("write");
        assert!(!is_executable_file(&plain));
        assert!(!is_executable_file(dir.path()));
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert!(is_executable_file(&plain));
    }
}
