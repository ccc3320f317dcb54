//! Host side of Carapace: guest assets, host checks, OCI bundles and ids,
//! sandbox VMs and the agent client. The CLI (`carapace`) and the containerd
//! shim build on it.

pub mod agent;
pub mod assets;
pub mod bundle;
pub mod config;
pub mod container;
pub mod hooks;
pub mod host;
pub mod id;
pub mod monitor;
pub mod network;
pub mod proc;
pub mod sandbox;
pub mod smoke;
pub mod spec;
pub mod state;
pub mod stdio;
pub mod vm;
