//! `carapace check --boot`: boot a microVM and ask its agent who it is.

use std::time::{Duration, Instant};

use anyhow::Context;
use carapace_protocol::health::VersionRequest;
use carapace_protocol::health_ttrpc::HealthClient;

use crate::assets::GuestAssets;
use crate::vm::{Vm, VmOptions};

/// Boots a VM in a temporary directory, checks Health and Version, shuts the
/// guest down and waits for the VMM to exit; returns a one-line report.
pub fn boot_and_ping() -> anyhow::Result<String> {
    let config = crate::config::load(None)?;
    let assets = GuestAssets::locate_with(&config)?;
    let dir = tempfile_dir()?;
    let result = (|| {
        let start = Instant::now();
        let opts = VmOptions { extra_cmdline: config.kernel_params.clone(), ..VmOptions::default() };
        let mut vm = Vm::start(&assets, &dir, &opts)?;
        let client = vm.wait_for_agent(config.boot_timeout())?;
        let booted = start.elapsed();
        let health = HealthClient::new(client.clone());
        let version = health.version(crate::agent::ctx(), &VersionRequest::new()).context("Health.Version")?;
        crate::agent::shutdown(&client).context("Agent.Shutdown")?;
        let status = vm.wait_timeout(Duration::from_secs(60))?.context("the VMM did not exit after Shutdown")?;
        anyhow::ensure!(status.success(), "the VMM exited with {status} after Shutdown");
        Ok(format!(
            "agent {} (API {}) answered {:.1} s after start; VM shut down cleanly",
            version.agent_version,
            version.api_version,
            booted.as_secs_f64()
        ))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let base = std::env::temp_dir().join(format!("carapace-check-{}", std::process::id()));
    std::fs::create_dir_all(&base).with_context(|| format!("create {}", base.display()))?;
    Ok(base)
}
