//! `containerd-shim-carapace-v2`: containerd's runtime `io.containerd.carapace.v2`.
//! See the `carapace_shim` crate (and `bootstrap` for the actions).

use anyhow::Context;
use carapace_shim::bootstrap;

fn main() {
    if let Err(e) = run() {
        eprintln!("containerd-shim-carapace-v2: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let flags = containerd_shim::parse(&args).context("bad arguments")?;
    if flags.version {
        println!("containerd-shim-carapace-v2 {} ({})", env!("CARGO_PKG_VERSION"), carapace_shim::RUNTIME_TYPE);
        return Ok(());
    }
    if flags.info {
        return bootstrap::info().context("info");
    }
    if flags.namespace.is_empty() {
        anyhow::bail!("-namespace is required");
    }
    match flags.action.as_str() {
        "start" => bootstrap::start(&flags).context("start"),
        "delete" => bootstrap::delete(&flags).context("delete"),
        "" if !flags.socket.is_empty() => bootstrap::serve(&flags).context("serve"),
        "" => anyhow::bail!("no action and no -socket"),
        other => anyhow::bail!("unknown action {other:?}"),
    }
}
