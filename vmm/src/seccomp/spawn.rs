//! Device threads are started by one spawner thread per process once the
//! VMM confines itself (see the module docs of [`super`] for why), and
//! directly otherwise (tests, `--no-seccomp`, a library user that does not
//! ask for confinement).

use std::io;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, OnceLock};
use std::thread::{Builder, JoinHandle};

use tracing::error;

use super::{Filters, SeccompError, ThreadKind};

type Job = Box<dyn FnOnce() + Send>;

#[derive(Debug)]
struct Spawner {
    jobs: Sender<Job>,
    filters: Arc<Filters>,
}

/// Process-wide: seccomp filters are a property of threads, and a process
/// runs one VM, so one spawner serves every device.
static SPAWNER: OnceLock<Spawner> = OnceLock::new();

/// Starts the spawner thread, confined to [`ThreadKind::Spawner`]; from now
/// on [`spawn`] confines every thread it starts. Call it from a thread that
/// is not confined yet (its filter would be inherited). A second call keeps
/// the first spawner.
pub(crate) fn install_spawner(filters: Arc<Filters>) -> Result<(), SeccompError> {
    if SPAWNER.get().is_some() {
        return Ok(());
    }
    let (jobs, queue) = mpsc::channel::<Job>();
    let (ready_tx, ready) = mpsc::sync_channel(1);
    let thread_filters = filters.clone();
    let started = Builder::new().name("spawner".into()).spawn(move || {
        let confined = thread_filters.apply(ThreadKind::Spawner);
        let ok = confined.is_ok();
        let _ = ready_tx.send(confined);
        if ok {
            while let Ok(job) = queue.recv() {
                job();
            }
        }
    });
    if let Err(e) = started {
        error!("cannot start the spawner thread: {e}");
        return Err(SeccompError::Spawner(e));
    }
    match ready.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(SeccompError::Spawner(io::Error::other("the spawner thread died"))),
    }
    let _ = SPAWNER.set(Spawner { jobs, filters });
    Ok(())
}

/// Starts a thread named `name` running `f`, confined to `kind` first if
/// the VMM confines itself.
pub fn spawn<T, F>(kind: ThreadKind, name: String, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let Some(spawner) = SPAWNER.get() else {
        return Builder::new().name(name).spawn(f);
    };
    let filters = spawner.filters.clone();
    let body = move || {
        if let Err(e) = filters.apply(kind) {
            // Never run device code unconfined once confinement was asked for.
            error!("{}", crate::error::one_line(&e));
            std::process::abort();
        }
        f()
    };
    let (handle_tx, handle) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = handle_tx.send(Builder::new().name(name).spawn(body));
    });
    let gone = || io::Error::other("the spawner thread is gone");
    spawner.jobs.send(job).map_err(|_| gone())?;
    handle.recv().map_err(|_| gone())?
}
