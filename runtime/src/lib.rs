//! Host side of Carapace: guest assets, host checks, sandbox VMs and the
//! agent client. The CLI (`carapace`) and the containerd shim build on it.

pub mod assets;
pub mod host;
