//! A container of the sandbox: its bundle, its rootfs binds, its init
//! process and exec'd processes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use carapace_runtime::share::HostBind;
use containerd_shim::protos::types::mount::Mount;
use oci_spec::runtime::{Hooks, Spec};

use crate::error::ShimError;
use crate::process::Process;

#[derive(Debug)]
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    /// containerd's rootfs mounts, as the Create request gave them.
    pub rootfs: Vec<Mount>,
    /// `<bundle>/rootfs` when the shim mounted it (undone at Delete).
    pub mounted_rootfs: Option<PathBuf>,
    /// What is bound into the sandbox's share for this container.
    pub binds: Vec<HostBind>,
    pub init: Arc<Process>,
    /// The spec's OCI hooks; those that run on the host run in the shim.
    pub hooks: Hooks,
    /// The spec's annotations, for the hooks' state.
    pub annotations: HashMap<String, String>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    paused: AtomicBool,
}

impl Container {
    pub fn new(
        id: &str,
        bundle: PathBuf,
        rootfs: Vec<Mount>,
        mounted_rootfs: Option<PathBuf>,
        binds: Vec<HostBind>,
        init: Arc<Process>,
    ) -> Self {
        Self {
            id: id.to_string(),
            bundle,
            rootfs,
            mounted_rootfs,
            binds,
            init,
            hooks: Hooks::default(),
            annotations: HashMap::new(),
            execs: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
        }
    }

    /// With the spec's hooks and annotations.
    pub fn with_spec(mut self, spec: &Spec) -> Self {
        self.hooks = spec.hooks().clone().unwrap_or_default();
        self.annotations = spec.annotations().clone().unwrap_or_default();
        self
    }

    /// The OCI state its host hooks read; `pid` is the VMM's (the
    /// container's processes live in the guest).
    pub fn hook_state(&self, status: &str, pid: u32) -> serde_json::Value {
        carapace_runtime::hooks::OciState::new(&self.id, status, pid, &self.bundle, &self.annotations).json()
    }

    fn execs(&self) -> MutexGuard<'_, HashMap<String, Arc<Process>>> {
        self.execs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The init process for "", else the exec'd process `exec_id`.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>, ShimError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ShimError::NotFound(format!("process {exec_id} of container {} not found", self.id)))
    }

    pub fn add_exec(&self, p: Arc<Process>) -> Result<(), ShimError> {
        let mut execs = self.execs();
        if execs.contains_key(&p.exec_id) {
            return Err(ShimError::AlreadyExists(format!("process {} of container {} already exists", p.exec_id, self.id)));
        }
        execs.insert(p.exec_id.clone(), p);
        Ok(())
    }

    pub fn remove_exec(&self, exec_id: &str) -> Option<Arc<Process>> {
        self.execs().remove(exec_id)
    }

    pub fn all_execs(&self) -> Vec<Arc<Process>> {
        self.execs().values().cloned().collect()
    }

    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }
}
