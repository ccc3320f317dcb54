//! The operator's configuration file (TOML), shared by the containerd shim
//! and the `carapace` CLI: where the guest assets and the VMM are, how big
//! a VM is when nothing asks otherwise, the share's cache mode, the boot
//! timeout and the shim's log level.
//!
//! Which file: the path containerd's runtime options give the shim
//! (`ConfigPath`), else `$CARAPACE_CONFIG`, else [`DEFAULT_PATH`]. Only the
//! default may be missing (built-in defaults then): a path someone named
//! and did not create is a mistake worth failing for. Unknown keys, wrong
//! types and out-of-range values fail too, naming the file and the key, so
//! that a typo never silently boots a VM with defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// How long a guest may take to boot to its agent unless configured (kvm_pvm
/// hosts emulate the guest kernel: tens of seconds).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Where VM templates live unless configured.
pub const TEMPLATE_DIR: &str = "/var/lib/carapace/templates";
/// vCPUs and memory of a VM that asks for nothing, unless configured.
pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEMORY_MIB: u32 = 256;

/// How much the guest may cache of the share: the operator's word, which
/// the runtime turns into the VMM's own setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Nothing cached: for shares the host changes behind the guest's back.
    None,
    /// Close-to-open consistency.
    #[default]
    Auto,
    /// Cached for long: only this guest changes the share.
    Always,
}

/// Read when nothing names another file.
pub const DEFAULT_PATH: &str = "/etc/carapace/config.toml";
/// Names the config file (containerd passes its environment to shims).
pub const ENV: &str = "CARAPACE_CONFIG";

/// Bounds of the values (a VM the VMM would refuse, or a typo like
/// `default_memory_mib = 2560000`, is caught when the file is read).
pub const MAX_VCPUS: u8 = 64;
pub const MIN_MEMORY_MIB: u32 = 64;
pub const MAX_MEMORY_MIB: u32 = 256 * 1024;
pub const MAX_OVERHEAD_MIB: u32 = 16 * 1024;
pub const MAX_BOOT_TIMEOUT_SECS: u64 = 3600;

/// Who named the file: decides whether a missing file is an error, and is
/// said in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// [`DEFAULT_PATH`]: may be missing.
    Default,
    /// `$CARAPACE_CONFIG`.
    Env,
    /// containerd's runtime options (`ConfigPath`).
    RuntimeOptions,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Default => "the default path",
            Self::Env => ENV,
            Self::RuntimeOptions => "the runtime options' ConfigPath",
        })
    }
}

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} (named by {origin}) does not exist")]
    Missing { path: PathBuf, origin: Origin },
    #[error("config file {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {location}{message}")]
    Parse { path: PathBuf, location: String, message: String },
    #[error("config file {path}: key `{key}`: {message}")]
    Invalid { path: PathBuf, key: &'static str, message: String },
}

/// The settings. Every key is optional; see `config/config.toml` for the
/// documented defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Guest kernel (uncompressed vmlinux). `CARAPACE_KERNEL` wins.
    pub kernel: Option<PathBuf>,
    /// Guest initramfs (uncompressed cpio). `CARAPACE_INITRAMFS` wins.
    pub initramfs: Option<PathBuf>,
    /// The `carapace-vmm` binary. `CARAPACE_BIN_DIR` wins; unset, it is
    /// looked for beside the running binary, then on PATH.
    pub vmm: Option<PathBuf>,
    /// vCPUs of a VM whose spec asks for no CPU, and the least any VM gets
    /// from its spec's CPU quota.
    pub default_vcpus: u8,
    /// Memory of a VM whose spec asks for none, and the least any VM gets
    /// from its memory limit.
    pub default_memory_mib: u32,
    /// Added to a container's (or pod's) memory limit for the guest kernel
    /// and agent.
    pub memory_overhead_mib: u32,
    /// Cache mode of the virtio-fs share that holds the containers' root
    /// file systems and volumes.
    pub shared_fs_cache: CacheMode,
    /// Appended to the guest kernel's command line.
    pub kernel_params: String,
    /// How long a VM may take until its agent answers.
    pub boot_timeout_secs: u64,
    /// Start sandboxes from a snapshot of a booted VM of the same shape
    /// (made on first use) instead of booting a kernel each time.
    pub vm_templates: bool,
    /// Where the templates live (one directory per VM shape).
    pub template_dir: PathBuf,
    /// The shim's log filter (`tracing` syntax: `info`, `debug`,
    /// `carapace_shim=debug`...). `CARAPACE_SHIM_LOG` wins; unset, `info`
    /// (`debug` when containerd runs the shim with `-debug`).
    pub log_level: Option<String>,
    /// The file these settings came from (none: built-in defaults).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            kernel: None,
            initramfs: None,
            vmm: None,
            default_vcpus: DEFAULT_VCPUS,
            default_memory_mib: DEFAULT_MEMORY_MIB,
            memory_overhead_mib: 128,
            shared_fs_cache: CacheMode::Auto,
            kernel_params: String::new(),
            boot_timeout_secs: BOOT_TIMEOUT.as_secs(),
            vm_templates: true,
            template_dir: PathBuf::from(TEMPLATE_DIR),
            log_level: None,
            source: None,
        }
    }
}

/// The file to read: `explicit` (containerd's `ConfigPath`), else
/// `$CARAPACE_CONFIG`, else [`DEFAULT_PATH`].
pub fn locate(explicit: Option<&Path>) -> (PathBuf, Origin) {
    if let Some(p) = explicit.filter(|p| !p.as_os_str().is_empty()) {
        return (p.to_path_buf(), Origin::RuntimeOptions);
    }
    match std::env::var_os(ENV).filter(|v| !v.is_empty()) {
        Some(p) => (PathBuf::from(p), Origin::Env),
        None => (PathBuf::from(DEFAULT_PATH), Origin::Default),
    }
}

/// Reads the config `explicit` or the environment names, or the default
/// file (see [`locate`]).
pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
    let (path, origin) = locate(explicit);
    Config::load(&path, origin)
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path, origin: Origin) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return match origin {
                    Origin::Default => Ok(Self::default()),
                    _ => Err(ConfigError::Missing { path: path.to_path_buf(), origin }),
                };
            }
            Err(source) => return Err(ConfigError::Read { path: path.to_path_buf(), source }),
        };
        let mut config = Self::parse(path, &text)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and checks the text of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            location: e.span().map(|s| locate_span(text, s.start)).unwrap_or_default(),
            message: e.message().trim_end().to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid { path: path.to_path_buf(), key, message };
        let template_dir = Some(self.template_dir.clone());
        for (key, value) in [("kernel", &self.kernel), ("initramfs", &self.initramfs), ("vmm", &self.vmm), ("template_dir", &template_dir)]
        {
            // Relative to what? The shim's cwd is a container's bundle.
            if let Some(p) = value.as_ref().filter(|p| !p.is_absolute()) {
                return Err(invalid(key, format!("{} is not an absolute path", p.display())));
            }
        }
        if !(1..=MAX_VCPUS).contains(&self.default_vcpus) {
            return Err(invalid("default_vcpus", format!("{} is out of range 1..={MAX_VCPUS}", self.default_vcpus)));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.default_memory_mib) {
            return Err(invalid(
                "default_memory_mib",
                format!("{} is out of range {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}", self.default_memory_mib),
            ));
        }
        if self.memory_overhead_mib > MAX_OVERHEAD_MIB {
            return Err(invalid("memory_overhead_mib", format!("{} is out of range 0..={MAX_OVERHEAD_MIB}", self.memory_overhead_mib)));
        }
        if let Some(b) = self.kernel_params.bytes().find(|b| b.is_ascii_control()) {
            return Err(invalid("kernel_params", format!("contains a control character ({b:#04x}); it is one line")));
        }
        if !(1..=MAX_BOOT_TIMEOUT_SECS).contains(&self.boot_timeout_secs) {
            return Err(invalid("boot_timeout_secs", format!("{} is out of range 1..={MAX_BOOT_TIMEOUT_SECS}", self.boot_timeout_secs)));
        }
        if let Some(level) = &self.log_level {
            if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(level) {
                return Err(invalid("log_level", format!("{level:?} is not a log filter: {e}")));
            }
        }
        Ok(())
    }

    /// How long a VM may take until its agent answers.
    pub fn boot_timeout(&self) -> Duration {
        Duration::from_secs(self.boot_timeout_secs)
    }
}

/// "line N, key `k`: " for a byte offset into `text`; the key is named when
/// the line is a `key = value` line (toml's own messages name only the
/// unknown ones).
fn locate_span(text: &str, offset: usize) -> String {
    let before = text.get(..offset).unwrap_or(text);
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(line_start..).and_then(|l| l.lines().next()).unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
    match key {
        Some(k) => format!("line {line_no}, key `{k}`: "),
        None => format!("line {line_no}: "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/carapace/config.toml"), text)
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("must be refused").to_string()
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("").expect("empty"), Config::default());
        assert_eq!(parse("# nothing but comments\n").expect("comments"), Config::default());
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(
            r#"
kernel = "/opt/c/vmlinux"
initramfs = "/opt/c/initramfs.cpio"
vmm = "/opt/c/carapace-vmm"
default_vcpus = 2
default_memory_mib = 512
memory_overhead_mib = 64
shared_fs_cache = "none"
kernel_params = "loglevel=7"
boot_timeout_secs = 600
vm_templates = false
template_dir = "/srv/templates"
log_level = "carapace_shim=debug,info"
"#,
        )
        .expect("valid");
        assert_eq!(c.kernel.as_deref(), Some(Path::new("/opt/c/vmlinux")));
        assert_eq!(c.initramfs.as_deref(), Some(Path::new("/opt/c/initramfs.cpio")));
        assert_eq!(c.vmm.as_deref(), Some(Path::new("/opt/c/carapace-vmm")));
        assert_eq!((c.default_vcpus, c.default_memory_mib, c.memory_overhead_mib), (2, 512, 64));
        assert_eq!(c.shared_fs_cache, CacheMode::None);
        assert!(!c.vm_templates);
        assert_eq!(c.template_dir, Path::new("/srv/templates"));
        assert_eq!(c.kernel_params, "loglevel=7");
        assert_eq!(c.boot_timeout(), Duration::from_secs(600));
        assert_eq!(c.log_level.as_deref(), Some("carapace_shim=debug,info"));
    }

    #[test]
    fn the_shipped_example_is_the_defaults() {
        // config/config.toml documents every key with its default, commented
        // out; uncommented, it must parse to exactly the built-in defaults.
        let example = include_str!("../../config/config.toml");
        let uncommented: String =
            example.lines().filter_map(|l| l.strip_prefix("# ").filter(|l| l.contains(" = "))).map(|l| format!("{l}\n")).collect();
        let keys = uncommented.lines().count();
        assert_eq!(keys, 12, "every key once:\n{uncommented}");
        let mut c = parse(&uncommented).expect("the example parses");
        // Unset paths mean "search"; the example names the default ones.
        assert_eq!(c.kernel.take().as_deref(), Some(Path::new("/usr/local/share/carapace/vmlinux")));
        assert_eq!(c.initramfs.take().as_deref(), Some(Path::new("/usr/local/share/carapace/initramfs.cpio")));
        assert_eq!(c.vmm.take().as_deref(), Some(Path::new("/usr/local/bin/carapace-vmm")));
        assert_eq!(c.log_level.take().as_deref(), Some("info"));
        assert_eq!(c, Config::default());
        assert_eq!(parse(example).expect("commented"), Config::default());
    }

    #[test]
    fn unknown_keys_and_bad_types_name_file_and_key() {
        let e = err("default_vcpus = 1\ndefault_memory = 512\n");
        assert!(e.contains("/etc/carapace/config.toml") && e.contains("line 2") && e.contains("default_memory"), "{e}");
        let e = err("default_vcpus = \"two\"\n");
        assert!(e.contains("key `default_vcpus`") && e.contains("invalid type"), "{e}");
        let e = err("shared_fs_cache = \"sometimes\"\n");
        assert!(e.contains("key `shared_fs_cache`") && e.contains("sometimes"), "{e}");
        let e = err("default_vcpus = 300\n");
        assert!(e.contains("key `default_vcpus`"), "{e}");
        let e = err("[vm]\nvcpus = 1\n");
        assert!(e.contains("line 1") && e.contains("vm"), "{e}");
        let e = err("kernel = \"/a\n");
        assert!(e.contains("/etc/carapace/config.toml") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        for (text, key) in [
            ("default_vcpus = 0", "default_vcpus"),
            ("default_vcpus = 65", "default_vcpus"),
            ("default_memory_mib = 32", "default_memory_mib"),
            ("default_memory_mib = 2560000", "default_memory_mib"),
            ("memory_overhead_mib = 100000", "memory_overhead_mib"),
            ("boot_timeout_secs = 0", "boot_timeout_secs"),
            ("kernel = \"vmlinux\"", "kernel"),
            ("vmm = \"bin/carapace-vmm\"", "vmm"),
            ("kernel_params = \"a\\nb\"", "kernel_params"),
            ("log_level = \"carapace=loud\"", "log_level"),
        ] {
            let e = err(text);
            assert!(e.contains(&format!("key `{key}`")) && e.contains("/etc/carapace/config.toml"), "{text}: {e}");
        }
    }

    #[test]
    fn only_the_default_file_may_be_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.toml");
        assert_eq!(Config::load(&missing, Origin::Default).expect("defaults"), Config::default());
        for origin in [Origin::Env, Origin::RuntimeOptions] {
            let e = Config::load(&missing, origin).expect_err("named and missing").to_string();
            assert!(e.contains("nope.toml") && e.contains("does not exist"), "{e}");
        }
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "default_memory_mib = 384\n").expect("write");
        let c = Config::load(&file, Origin::Env).expect("load");
        assert_eq!((c.default_memory_mib, c.source.as_deref()), (384, Some(file.as_path())));
        // A directory is not a file: an error, not the defaults.
        assert!(Config::load(dir.path(), Origin::Default).is_err());
    }

    #[test]
    fn explicit_path_beats_the_environment() {
        // Only the explicit branch: the environment is the process's, shared
        // with other tests.
        let (p, o) = locate(Some(Path::new("/x/c.toml")));
        assert_eq!((p.as_path(), o), (Path::new("/x/c.toml"), Origin::RuntimeOptions));
    }
}
