//! Which configuration file (see [`carapace_runtime::config`]) a sandbox's
//! VM is booted with, as containerd tells the shim.
//!
//! containerd passes a runtime's `options` table to the shim as a protobuf
//! `Any`: on `start`'s stdin (1.x) and in every CreateTaskRequest. For a
//! runtime type it does not know (ours), the CRI plugin decodes the table
//! into its generic `runtimeoptions.v1.Options`, whose `ConfigPath` names
//! the runtime's config file (Kata reads it the same way); `ctr run
//! --runtime-config-path` sends the same message. Without it the shim
//! reads `$CARAPACE_CONFIG`, else `/etc/carapace/config.toml`.

use std::path::PathBuf;

use carapace_runtime::config::{self, Config, ConfigError, Origin};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::CodedInputStream;

/// The message containerd's CRI plugin and `ctr` send for runtimes other
/// than runc (`type_url` = 1, `config_path` = 2, `config_body` = 3 in 1.7+).
pub const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";
const CONFIG_PATH_FIELD: u32 = 2;
const WIRE_LEN: u32 = 2;

/// Where the configuration of the service's sandbox comes from when a
/// Create names none: decided once, when the shim starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub origin: Origin,
}

impl ConfigSource {
    /// `$CARAPACE_CONFIG`, else the default path.
    pub fn from_env() -> Self {
        let (path, origin) = config::locate(None);
        Self { path, origin }
    }

    /// The configuration for a Create whose runtime options are `options`:
    /// their `ConfigPath` wins over `self`.
    pub fn load(&self, options: Option<&Any>) -> Result<Config, ConfigError> {
        match options.and_then(config_path) {
            Some(path) => Config::load(&path, Origin::RuntimeOptions),
            None => Config::load(&self.path, self.origin),
        }
    }
}

/// `ConfigPath` of containerd's runtime options, if `options` are those and
/// name one. Other option types (runc's, say, for a misconfigured runtime)
/// carry no config file: they are ignored, as is an undecodable message.
pub fn config_path(options: &Any) -> Option<PathBuf> {
    // containerd 1.x sends the bare message name, newer ones may prefix it.
    let name = options.type_url.rsplit('/').next().unwrap_or_default();
    if name != RUNTIME_OPTIONS {
        if !options.type_url.is_empty() {
            tracing::debug!(type_url = %options.type_url, "runtime options carry no config path");
        }
        return None;
    }
    let mut input = CodedInputStream::from_bytes(&options.value);
    let mut found = None;
    loop {
        let tag = match input.read_raw_tag_or_eof() {
            Ok(Some(tag)) => tag,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable runtime options");
                return None;
            }
        };
        let step = if tag == (CONFIG_PATH_FIELD << 3 | WIRE_LEN) {
            input.read_string().map(|s| found = Some(s))
        } else {
            containerd_shim::protos::protobuf::rt::skip_field_for_tag(tag, &mut input)
        };
        if let Err(e) = step {
            tracing::warn!(error = %e, "undecodable runtime options");
            return None;
        }
    }
    found.filter(|p| !p.is_empty()).map(PathBuf::from)
}

/// Encodes runtimeoptions.v1.Options as containerd does (for tests).
#[cfg(test)]
pub(crate) fn runtime_options(config_path: &str) -> Any {
    let mut value = Vec::new();
    {
        let mut out = containerd_shim::protos::protobuf::CodedOutputStream::vec(&mut value);
        out.write_string(1, "").expect("type_url");
        out.write_string(CONFIG_PATH_FIELD, config_path).expect("config_path");
        out.write_bytes(3, b"ignored = 1").expect("config_body");
        out.flush().expect("flush");
    }
    Any { type_url: RUNTIME_OPTIONS.into(), value, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_path_from_runtime_options_only() {
        assert_eq!(config_path(&runtime_options("/etc/c.toml")), Some(PathBuf::from("/etc/c.toml")));
        let mut prefixed = runtime_options("/etc/c.toml");
        prefixed.type_url = format!("type.googleapis.com/{RUNTIME_OPTIONS}");
        assert_eq!(config_path(&prefixed), Some(PathBuf::from("/etc/c.toml")));
        assert_eq!(config_path(&runtime_options("")), None);
        let mut runc = runtime_options("/etc/c.toml");
        runc.type_url = "containerd.runc.v1.Options".into();
        assert_eq!(config_path(&runc), None);
        let garbage = Any { type_url: RUNTIME_OPTIONS.into(), value: vec![0x12, 0x7f, b'a'], ..Default::default() };
        assert_eq!(config_path(&garbage), None);
    }

    #[test]
    fn runtime_options_win_and_a_named_missing_file_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "default_vcpus = 2\n").expect("write");
        let missing_default = ConfigSource { path: dir.path().join("none.toml"), origin: Origin::Default };
        assert_eq!(missing_default.load(None).expect("defaults"), Config::default());
        let opts = runtime_options(&file.display().to_string());
        assert_eq!(missing_default.load(Some(&opts)).expect("named").default_vcpus, 2);
        let gone = runtime_options(&dir.path().join("gone.toml").display().to_string());
        let e = missing_default.load(Some(&gone)).expect_err("missing").to_string();
        assert!(e.contains("gone.toml") && e.contains("ConfigPath"), "{e}");
    }
}
