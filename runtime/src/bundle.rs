//! OCI bundles: `config.json` plus a root filesystem, validated before any
//! VM is started so that bad input leaves nothing behind.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

/// What is wrong with a bundle. Each message names the file or field.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle {0}: not a directory")]
    NotADirectory(PathBuf),
    #[error("{0}: config.json not found")]
    MissingConfig(PathBuf),
    #[error("{path}: cannot read")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid config.json: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error("{path}: field {field}: {msg}")]
    Field { path: PathBuf, field: &'static str, msg: String },
}

pub use crate::annotations::{MEMORY_MIB as MEMORY_MIB_ANNOTATION, MEMORY_MIB_RANGE, VCPUS as VCPUS_ANNOTATION, VCPUS_RANGE};

/// A loaded, validated bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The bundle directory, absolute.
    pub dir: PathBuf,
    /// The parsed config.
    pub spec: Spec,
    /// The root filesystem, absolute and resolved, inside or beside the bundle.
    pub rootfs: PathBuf,
}

impl Bundle {
    /// Loads `dir/config.json` and checks what the runtime relies on.
    pub fn load(dir: &Path) -> Result<Self, BundleError> {
        let dir = std::path::absolute(dir).map_err(|source| BundleError::Read { path: dir.into(), source })?;
        if !dir.is_dir() {
            return Err(BundleError::NotADirectory(dir));
        }
        let config = dir.join("config.json");
        let text = match std::fs::read(&config) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(BundleError::MissingConfig(dir)),
            Err(source) => return Err(BundleError::Read { path: config, source }),
        };
        let spec: Spec = serde_json::from_slice(&text).map_err(|e| {
            // A value of the wrong type or range: say which field it is.
            let at = (e.classify() == serde_json::error::Category::Data).then(|| json_path_at(&text, e.line(), e.column())).flatten();
            let msg = at.map_or_else(|| e.to_string(), |field| format!("{field}: {e}"));
            BundleError::Parse { path: config.clone(), msg }
        })?;
        let rootfs = validate(&config, &dir, &spec)?;
        Ok(Self { dir, spec, rootfs })
    }
}

/// The dotted path (`process.user.uid`, `mounts[1].options`) of the JSON
/// value that ends at `line`:`column` (1-based, as serde_json reports a data
/// error), found by scanning the text up to there. None at the top level.
fn json_path_at(text: &[u8], line: usize, column: usize) -> Option<String> {
    enum Frame {
        Object { key: Option<String>, want_key: bool },
        Array(usize),
    }
    let line_start = if line <= 1 { 0 } else { text.iter().enumerate().filter(|(_, b)| **b == b'\n').nth(line - 2).map(|(i, _)| i + 1)? };
    let end = (line_start + column).min(text.len());
    let mut stack: Vec<Frame> = Vec::new();
    let mut string: Option<Vec<u8>> = None;
    let mut escaped = false;
    for &b in &text[..end] {
        if let Some(buf) = string.as_mut() {
            if escaped {
                escaped = false;
                buf.push(b);
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                let s = String::from_utf8_lossy(buf).into_owned();
                string = None;
                if let Some(Frame::Object { key, want_key: want_key @ true }) = stack.last_mut() {
                    *key = Some(s);
                    *want_key = false;
                }
            } else {
                buf.push(b);
            }
            continue;
        }
        match b {
            b'"' => string = Some(Vec::new()),
            b'{' => stack.push(Frame::Object { key: None, want_key: true }),
            b'[' => stack.push(Frame::Array(0)),
            b'}' | b']' => {
                stack.pop();
            }
            b',' => match stack.last_mut() {
                Some(Frame::Object { key, want_key }) => {
                    *key = None;
                    *want_key = true;
                }
                Some(Frame::Array(i)) => *i += 1,
                None => {}
            },
            _ => {}
        }
    }
    let mut path = String::new();
    for f in &stack {
        match f {
            Frame::Object { key: Some(k), .. } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
            }
            Frame::Object { key: None, .. } => break,
            Frame::Array(i) => path.push_str(&format!("[{i}]")),
        }
    }
    (!path.is_empty()).then_some(path)
}

fn field(path: &Path, field: &'static str, msg: impl Into<String>) -> BundleError {
    BundleError::Field { path: path.to_path_buf(), field, msg: msg.into() }
}

/// Checks the fields the runtime and the agent depend on; returns the rootfs.
fn validate(config: &Path, dir: &Path, spec: &Spec) -> Result<PathBuf, BundleError> {
    let root = spec.root().as_ref().ok_or_else(|| field(config, "root", "missing"))?;
    let root_path = root.path();
    if root_path.as_os_str().is_empty() {
        return Err(field(config, "root.path", "empty"));
    }
    let joined = if root_path.is_absolute() { root_path.clone() } else { dir.join(root_path) };
    let rootfs = std::fs::canonicalize(&joined).map_err(|e| field(config, "root.path", format!("{}: {e}", joined.display())))?;
    if !rootfs.is_dir() {
        return Err(field(config, "root.path", format!("{} is not a directory", rootfs.display())));
    }
    // A relative root that is a symlink leading out of the bundle would let a
    // bundle author share any host directory into the guest.
    if !root_path.is_absolute() {
        let real_dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        if !rootfs.starts_with(&real_dir) {
            return Err(field(
                config,
                "root.path",
                format!("{} resolves to {}, outside the bundle", root_path.display(), rootfs.display()),
            ));
        }
    }
    if let Some(name) = spec.hostname() {
        // The kernel's limit (HOST_NAME_MAX).
        if name.len() > 64 {
            return Err(field(config, "hostname", format!("{} bytes; at most 64", name.len())));
        }
    }
    validate_hooks(config, spec)?;
    validate_vm_size(config, spec)?;
    // Optional in the schema, but create has nothing to run without it
    // (runc refuses it too).
    let process = spec.process().as_ref().ok_or_else(|| field(config, "process", "missing: create needs the process to run"))?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(field(config, "process.args", "must name at least the program to run"));
    }
    if !process.cwd().is_absolute() {
        return Err(field(config, "process.cwd", format!("{:?} is not an absolute path", process.cwd())));
    }
    validate_guest_support(config, spec)?;
    Ok(rootfs)
}

/// Features the guest kernel has not (no LSM, no resctrl): asked for, they
/// would fail in the guest after a boot, or be dropped silently; runc
/// refuses them on a host without them too.
fn validate_guest_support(config: &Path, spec: &Spec) -> Result<(), BundleError> {
    let shown = |v: &str| format!("{:?}", v.chars().take(64).collect::<String>());
    if let Some(process) = spec.process() {
        if let Some(profile) = process.apparmor_profile().as_deref().filter(|p| !p.is_empty()) {
            return Err(field(config, "process.apparmorProfile", format!("{}: AppArmor is not available in the guest", shown(profile))));
        }
        if let Some(label) = process.selinux_label().as_deref().filter(|l| !l.is_empty()) {
            return Err(field(config, "process.selinuxLabel", format!("{}: SELinux is not available in the guest", shown(label))));
        }
    }
    if spec.linux().as_ref().is_some_and(|l| l.intel_rdt().is_some()) {
        return Err(field(config, "linux.intelRdt", "Intel RDT (resctrl) is not available in the guest"));
    }
    Ok(())
}

/// The VM size annotations: a value that is not a number in range is
/// refused, not ignored (the VM would boot with a size nobody asked for).
fn validate_vm_size(config: &Path, spec: &Spec) -> Result<(), BundleError> {
    let Some(annotations) = spec.annotations() else { return Ok(()) };
    let checks = [
        ("annotations.io.carapace.vcpus", VCPUS_ANNOTATION, VCPUS_RANGE, "vCPUs"),
        ("annotations.io.carapace.memory_mib", MEMORY_MIB_ANNOTATION, MEMORY_MIB_RANGE, "MiB"),
    ];
    for (name, key, range, unit) in checks {
        let Some(value) = annotations.get(key) else { continue };
        if !value.parse::<u32>().is_ok_and(|n| range.contains(&n)) {
            let shown: String = value.chars().take(32).collect();
            return Err(field(config, name, format!("{shown:?} is not a number of {unit} from {} to {}", range.start(), range.end())));
        }
    }
    Ok(())
}

/// Host hooks must name an existing absolute program: found now, before a
/// VM is booted, rather than halfway through `create`. Guest hooks
/// (createContainer, startContainer) are resolved in the guest; they must
/// be absolute.
fn validate_hooks(config: &Path, spec: &Spec) -> Result<(), BundleError> {
    let Some(hooks) = spec.hooks() else { return Ok(()) };
    let host = [
        ("hooks.prestart", hooks.prestart()),
        ("hooks.createRuntime", hooks.create_runtime()),
        ("hooks.poststart", hooks.poststart()),
        ("hooks.poststop", hooks.poststop()),
    ];
    let guest = [("hooks.createContainer", hooks.create_container()), ("hooks.startContainer", hooks.start_container())];
    let all = host.iter().map(|&(n, l)| (n, l, true)).chain(guest.iter().map(|&(n, l)| (n, l, false)));
    for (name, list, on_host) in all {
        for hook in list.iter().flatten() {
            let path = hook.path();
            if !path.is_absolute() {
                return Err(field(config, name, format!("path {} is not absolute", path.display())));
            }
            if on_host && !path.is_file() {
                return Err(field(config, name, format!("path {} does not exist", path.display())));
            }
            if hook.timeout().is_some_and(|t| t <= 0) {
                return Err(field(config, name, format!("timeout {} is not positive", hook.timeout().unwrap_or(0))));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("rootfs")).expect("rootfs");
        std::fs::write(dir.path().join("config.json"), config).expect("config");
        dir
    }

    const GOOD: &str = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
        "process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"}}"#;

    const PROCESS: &str = r#""process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"}"#;

    fn err(config: &str) -> String {
        let dir = bundle(config);
        Bundle::load(dir.path()).expect_err("must fail").to_string()
    }

    #[test]
    fn loads_a_good_bundle() {
        let dir = bundle(GOOD);
        let b = Bundle::load(dir.path()).expect("load");
        assert!(b.rootfs.ends_with("rootfs"));
    }

    #[test]
    fn names_each_problem() {
        assert!(err("{not json").contains("invalid config.json"));
        assert!(err(r#"{"ociVersion":"1","root":{"path":"nope"},"process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"}}"#)
            .contains("root.path"));
        assert!(err(r#"{"ociVersion":"1","root":{"path":"rootfs"},"process":{"user":{"uid":0,"gid":0},"args":[],"cwd":"/"}}"#)
            .contains("process.args"));
        assert!(err(r#"{"ociVersion":"1","root":{"path":"rootfs"},"process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"tmp"}}"#)
            .contains("process.cwd"));
        assert!(err(r#"{"ociVersion":"1","process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"}}"#).contains("root"));
        let hook = |h: &str| format!(r#"{{"ociVersion":"1","root":{{"path":"rootfs"}},{PROCESS},"hooks":{h}}}"#);
        assert!(
            err(&hook(r#"{"poststop":[{"path":"/nonexistent/hook"}]}"#)).contains("hooks.poststop: path /nonexistent/hook does not exist")
        );
        assert!(err(&hook(r#"{"createRuntime":[{"path":"hook"}]}"#)).contains("hooks.createRuntime: path hook is not absolute"));
        assert!(err(&hook(r#"{"prestart":[{"path":"/bin/sh","timeout":0}]}"#)).contains("timeout 0"));
        let sized =
            |k: &str, v: &str| format!(r#"{{"ociVersion":"1","root":{{"path":"rootfs"}},{PROCESS},"annotations":{{"{k}":"{v}"}}}}"#);
        assert!(err(&sized(VCPUS_ANNOTATION, "100000"))
            .contains("annotations.io.carapace.vcpus: \"100000\" is not a number of vCPUs from 1 to 64"));
        assert!(err(&sized(VCPUS_ANNOTATION, "0")).contains("vCPUs from 1"));
        assert!(err(&sized(MEMORY_MIB_ANNOTATION, "1000000000000")).contains("annotations.io.carapace.memory_mib"));
        assert!(err(&sized(MEMORY_MIB_ANNOTATION, "lots")).contains("\"lots\" is not a number of MiB"));
        let dir = bundle(&sized(MEMORY_MIB_ANNOTATION, "300"));
        assert!(Bundle::load(dir.path()).is_ok(), "an in-range size is fine");
        let long = format!(r#"{{"ociVersion":"1","root":{{"path":"rootfs"}},{PROCESS},"hostname":"{}"}}"#, "h".repeat(65));
        assert!(err(&long).contains("hostname: 65 bytes"));
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(Bundle::load(empty.path()).expect_err("no config").to_string().contains("config.json not found"));
    }

    #[test]
    fn refuses_no_process_and_what_the_guest_cannot_do() {
        let e = err(r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"}}"#);
        assert!(e.contains("config.json: field process: missing"), "{e}");
        let with = |process_extra: &str, linux: &str| {
            err(&format!(
                r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},"linux":{linux},
                "process":{{"user":{{"uid":0,"gid":0}},"args":["sh"],"cwd":"/"{process_extra}}}}}"#
            ))
        };
        let e = with(r#","apparmorProfile":"cri-containerd.apparmor.d""#, "{}");
        assert!(e.contains(r#"field process.apparmorProfile: "cri-containerd.apparmor.d": AppArmor is not available"#), "{e}");
        let e = with(r#","selinuxLabel":"system_u:system_r:container_t:s0""#, "{}");
        assert!(e.contains(r#"field process.selinuxLabel: "system_u:system_r:container_t:s0""#), "{e}");
        let e = with("", r#"{"intelRdt":{"closID":"c1"}}"#);
        assert!(e.contains("field linux.intelRdt"), "{e}");
        // Empty values ask for nothing.
        let dir = bundle(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
            "process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/","apparmorProfile":"","selinuxLabel":""}}"#,
        );
        assert!(Bundle::load(dir.path()).is_ok());
    }

    #[test]
    fn a_value_of_the_wrong_type_is_named_by_its_field() {
        let wrong = |process: &str, linux: &str| {
            err(&format!("{{\"ociVersion\":\"1\",\"root\":{{\"path\":\"rootfs\"}},\n\"process\":{process},\n\"linux\":{linux}}}"))
        };
        let good_process = r#"{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"}"#;
        let e = wrong(r#"{"user":{"uid":0,"gid":0},"args":"sh","cwd":"/"}"#, "{}");
        assert!(e.contains("invalid config.json: process.args: invalid type: string \"sh\""), "{e}");
        let e = wrong(r#"{"user":{"uid":1099511627776,"gid":0},"args":["sh"],"cwd":"/"}"#, "{}");
        assert!(e.contains("process.user.uid: invalid value: integer `1099511627776`"), "{e}");
        let e = wrong(good_process, r#"{"resources":{"memory":{"limit":"lots"}}}"#);
        assert!(e.contains("linux.resources.memory.limit: invalid type: string \"lots\""), "{e}");
        let e = wrong(good_process, r#"{"uidMappings":[{"containerID":0,"hostID":0,"size":1},{"containerID":"x"}]}"#);
        assert!(e.contains("linux.uidMappings[1].containerID: invalid type"), "{e}");
        // Keys with escapes and commas inside strings do not confuse it.
        let text = br#"{"a\"b,":{"c":[1,"x,y",{"d":5"#;
        assert_eq!(json_path_at(text, 1, text.len()).as_deref(), Some(r#"a"b,.c[2].d"#));
        // Syntax errors are not data errors: no field.
        assert!(err("{\"ociVersion\": ").contains("invalid config.json: EOF"));
    }

    #[test]
    fn refuses_a_rootfs_symlinked_out_of_the_bundle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("outside");
        std::os::unix::fs::symlink(outside.path(), dir.path().join("rootfs")).expect("symlink");
        std::fs::write(dir.path().join("config.json"), GOOD).expect("config");
        let e = Bundle::load(dir.path()).expect_err("must fail").to_string();
        assert!(e.contains("outside the bundle"), "{e}");
    }
}
