//! The VM's typed configuration and its validation: in
//! `carapace-vmm-config`, which the runtime builds it with without linking
//! the VMM.

pub use carapace_vmm_config::*;
