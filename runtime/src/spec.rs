//! JSON documents the CLI prints or writes: the default `config.json` of
//! `carapace spec` (runc's, with our hostname), the OCI features document,
//! and runc's `events --stats` record.

use carapace_protocol::agent::StatsContainerResponse;
use serde_json::{json, Value};

/// The OCI runtime-spec version we implement.
pub const OCI_VERSION: &str = "1.2.0";

const DEFAULT_CAPS: [&str; 3] = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];

/// The config.json `carapace spec` writes: a read-only `rootfs`, `sh` on a
/// terminal, the mounts, namespaces and masked paths runc's default has.
pub fn default_spec() -> Value {
    json!({
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": true,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": DEFAULT_CAPS,
                "effective": DEFAULT_CAPS,
                "permitted": DEFAULT_CAPS
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "carapace",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

/// The OCI features document (`carapace features`).
pub fn features() -> Value {
    let caps: Vec<String> = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ]
    .iter()
    .map(|c| format!("CAP_{c}"))
    .collect();
    json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": OCI_VERSION,
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": [
            "async", "atime", "bind", "defaults", "dev", "diratime", "dirsync", "exec", "mand",
            "noatime", "nodev", "nodiratime", "noexec", "nomand", "norelatime", "nostrictatime",
            "nosuid", "private", "rbind", "relatime", "remount", "ro", "rprivate", "rshared",
            "rslave", "rw", "shared", "slave", "strictatime", "suid", "sync"
        ],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "capabilities": caps,
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {
                "enabled": true,
                "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS",
                            "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG", "SCMP_ACT_TRAP", "SCMP_ACT_TRACE"],
                "operators": ["SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE", "SCMP_CMP_LT",
                              "SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE"],
                "archs": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {
            "io.carapace.version": env!("CARGO_PKG_VERSION"),
            "io.carapace.isolation": "kvm-microvm"
        }
    })
}

/// runc's `events --stats` record for one container (limits of
/// u64::MAX mean none, as in runc's output).
pub fn stats_event(id: &str, s: &StatsContainerResponse) -> Value {
    let c = s.cgroup.as_ref().cloned().unwrap_or_default();
    let cpu = c.cpu.as_ref().cloned().unwrap_or_default();
    let mem = c.memory.as_ref().cloned().unwrap_or_default();
    let pids = c.pids.as_ref().cloned().unwrap_or_default();
    let io = c.io.as_ref().cloned().unwrap_or_default();
    let entries = |f: &dyn Fn(&carapace_protocol::agent::IoDeviceStats) -> (u64, &'static str)| -> Vec<Value> {
        io.devices
            .iter()
            .map(|d| {
                let (value, op) = f(d);
                json!({"major": d.major, "minor": d.minor, "op": op, "value": value})
            })
            .collect()
    };
    let mut bytes = entries(&|d| (d.rbytes, "Read"));
    bytes.extend(entries(&|d| (d.wbytes, "Write")));
    let mut ios = entries(&|d| (d.rios, "Read"));
    ios.extend(entries(&|d| (d.wios, "Write")));
    json!({
        "type": "stats",
        "id": id,
        "data": {
            "cpu": {
                "usage": {
                    "total": cpu.usage_usec * 1000,
                    "kernel": cpu.system_usec * 1000,
                    "user": cpu.user_usec * 1000
                },
                "throttling": {
                    "periods": cpu.nr_periods,
                    "throttledPeriods": cpu.nr_throttled,
                    "throttledTime": cpu.throttled_usec * 1000
                }
            },
            "memory": {
                "usage": {"usage": mem.current, "max": mem.peak, "limit": mem.limit, "failcnt": mem.oom},
                "swap": {"usage": mem.swap_current, "limit": mem.swap_limit},
                "raw": mem.stat
            },
            "pids": {"current": pids.current, "limit": pids.limit},
            "blkio": {"ioServiceBytesRecursive": bytes, "ioServicedRecursive": ios},
            "oom_kill": mem.oom_kill
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_spec_is_a_valid_oci_spec() {
        let spec: oci_spec::runtime::Spec = serde_json::from_value(default_spec()).expect("parses");
        assert_eq!(spec.process().as_ref().and_then(|p| p.args().clone()), Some(vec!["sh".to_string()]));
        assert_eq!(spec.root().as_ref().map(|r| r.path().clone()), Some("rootfs".into()));
    }

    #[test]
    fn features_name_hooks_and_cgroup_v2() {
        let f = features();
        assert_eq!(f["linux"]["cgroup"]["v2"], true);
        assert_eq!(f["hooks"].as_array().map(Vec::len), Some(6));
    }
}
