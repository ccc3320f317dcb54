//! Host side of Carapace, and the sandbox core both front ends share.
//!
//! Layers, each importing only from those above it:
//! 1. pure data: [`error`], [`annotations`], [`id`], [`state`], [`bundle`], [`hooks`],
//!    [`spec`], [`proc`];
//! 2. host resources: [`config`], [`assets`], [`host`], [`vm`], [`network`],
//!    [`share`], [`relay`] (the one stdio relay both front ends use),
//!    [`stdio`] (the CLI's host ends of it), [`template`] (VM templates:
//!    snapshots per VM shape);
//! 3. the VM and its agent behind seams: [`guest`], [`launcher`] (restores
//!    from a template, or boots cold), [`pod`];
//! 4. the sandbox core: [`sandbox`] (its container verbs in
//!    [`sandbox::ContainerHandle`]), and [`control`] (the CLI monitor's
//!    socket, which relays those verbs' agent calls);
//! 5. the CLI's lifecycle over it: [`container`], [`monitor`] (the shim is
//!    the other front end, in its own crate).

pub mod agent;
pub mod annotations;
pub mod assets;
pub mod bundle;
pub mod config;
pub mod container;
pub mod control;
pub mod error;
pub mod guest;
pub mod hooks;
pub mod host;
pub mod id;
pub mod launcher;
pub mod monitor;
pub mod network;
pub mod pod;
pub mod proc;
pub mod relay;
pub mod sandbox;
pub mod share;
pub mod smoke;
pub mod spec;
pub mod state;
pub mod stdio;
pub mod template;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod vm;
