//! Pods: the CRI annotations that group containers into one sandbox (one
//! shim, one VM), and the size of that VM.

use crate::config::Config;
use crate::vm::VmOptions;
use oci_spec::runtime::Spec;

pub use crate::annotations::{CONTAINER_TYPE, MEMORY_MIB, SANDBOX_CPU_PERIOD, SANDBOX_CPU_QUOTA, SANDBOX_ID, SANDBOX_MEMORY, VCPUS};
use crate::annotations::{MEMORY_MIB_RANGE, VCPUS_RANGE};

fn annotation<'a>(spec: Option<&'a Spec>, key: &str) -> Option<&'a str> {
    spec?.annotations().as_ref()?.get(key).map(String::as_str)
}

/// The sandbox a container belongs to: its CRI sandbox id, or itself.
/// Containers of one sandbox share one shim (containerd asks `start` for
/// the shim's address and gets the running one's) and one VM.
pub fn sandbox_id(container_id: &str, spec: Option<&Spec>) -> String {
    match annotation(spec, SANDBOX_ID) {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => container_id.to_string(),
    }
}

/// True for a pod's sandbox (pause) container.
pub fn is_sandbox(spec: Option<&Spec>) -> bool {
    annotation(spec, CONTAINER_TYPE) == Some("sandbox")
}

/// The size of the VM the first container of a sandbox boots: the config's
/// `default_vcpus` and `default_memory_mib` (1 vCPU and 256 MiB unless
/// configured) unless the spec asks for more. In order of precedence:
/// `io.carapace.vcpus` / `io.carapace.memory_mib`; the pod's resources
/// (`io.kubernetes.cri.sandbox-cpu-quota`/`-period`, `-memory`, plus the
/// config's `memory_overhead_mib`); the spec's own CPU quota and memory
/// limit. The config's kernel parameters come along.
pub fn vm_options(spec: &Spec, config: &Config) -> VmOptions {
    let mut opts = container_size(spec, config);
    let get = |k| annotation(Some(spec), k);
    if get(VCPUS).is_none() {
        let quota = get(SANDBOX_CPU_QUOTA).and_then(|v| v.parse::<i64>().ok());
        let period = get(SANDBOX_CPU_PERIOD).and_then(|v| v.parse::<u64>().ok());
        if let (Some(quota), Some(period)) = (quota, period) {
            if quota > 0 && period > 0 {
                let n = u64::try_from(quota).unwrap_or(0).div_ceil(period).clamp(1, 16);
                opts.vcpus = u8::try_from(n).unwrap_or(1).max(config.default_vcpus);
            }
        }
    }
    if get(MEMORY_MIB).is_none() {
        if let Some(bytes) = get(SANDBOX_MEMORY).and_then(|v| v.parse::<u64>().ok()).filter(|b| *b > 0) {
            let mib = (bytes / (1024 * 1024) + u64::from(config.memory_overhead_mib)).min(16 * 1024);
            opts.mem_mib = u32::try_from(mib).unwrap_or(16 * 1024).max(config.default_memory_mib);
        }
    }
    opts
}

/// The size a lone container asks for: annotations `io.carapace.vcpus` and `io.carapace.memory_mib`
/// win; otherwise the container's CPU quota (rounded up) and memory limit
/// plus the config's `memory_overhead_mib` for the guest, at least the
/// config's `default_vcpus` and `default_memory_mib` (1 and 256 unless
/// configured), which a spec that asks for nothing gets. Also sets the
/// config's kernel parameters.
fn container_size(spec: &Spec, config: &Config) -> VmOptions {
    let mut opts = VmOptions {
        vcpus: config.default_vcpus,
        mem_mib: config.default_memory_mib,
        extra_cmdline: config.kernel_params.clone(),
        ..VmOptions::default()
    };
    let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
    if let Some(cpu) = resources.as_ref().and_then(|r| r.cpu().clone()) {
        if let (Some(quota), Some(period)) = (cpu.quota(), cpu.period()) {
            if quota > 0 && period > 0 {
                let n = u64::try_from(quota).unwrap_or(0).div_ceil(period);
                opts.vcpus = u8::try_from(n.clamp(1, 16)).unwrap_or(1).max(config.default_vcpus);
            }
        }
    }
    if let Some(limit) = resources.as_ref().and_then(|r| *r.memory()).and_then(|m| m.limit()) {
        if limit > 0 {
            let mib = u32::try_from(limit / (1024 * 1024)).unwrap_or(u32::MAX).saturating_add(config.memory_overhead_mib);
            opts.mem_mib = mib.min(16 * 1024).max(config.default_memory_mib);
        }
    }
    let annotations = spec.annotations().clone().unwrap_or_default();
    // Bundle::load refused values outside these ranges.
    if let Some(n) = annotations.get(VCPUS).and_then(|v| v.parse::<u32>().ok()) {
        let n = n.clamp(*VCPUS_RANGE.start(), *VCPUS_RANGE.end());
        opts.vcpus = u8::try_from(n).unwrap_or(1);
    }
    if let Some(m) = annotations.get(MEMORY_MIB).and_then(|v| v.parse::<u32>().ok()) {
        opts.mem_mib = m.clamp(*MEMORY_MIB_RANGE.start(), *MEMORY_MIB_RANGE.end());
    }
    opts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(annotations: serde_json::Value, resources: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "annotations": annotations,
            "linux": {"resources": resources}
        }))
        .expect("spec")
    }

    #[test]
    fn sandbox_id_comes_from_cri_or_the_container() {
        let pause = spec(serde_json::json!({CONTAINER_TYPE: "sandbox", SANDBOX_ID: "pod1"}), serde_json::json!({}));
        let app = spec(serde_json::json!({CONTAINER_TYPE: "container", SANDBOX_ID: "pod1"}), serde_json::json!({}));
        let plain = spec(serde_json::json!({}), serde_json::json!({}));
        assert_eq!(sandbox_id("pod1", Some(&pause)), "pod1");
        assert_eq!(sandbox_id("app", Some(&app)), "pod1");
        assert_eq!(sandbox_id("solo", Some(&plain)), "solo");
        assert_eq!(sandbox_id("solo", None), "solo");
        assert!(is_sandbox(Some(&pause)));
        assert!(!is_sandbox(Some(&app)));
    }

    #[test]
    fn vm_size_default_pod_resources_and_overrides() {
        let plain = vm_options(&spec(serde_json::json!({}), serde_json::json!({})), &Config::default());
        assert_eq!((plain.vcpus, plain.mem_mib), (1, 256));

        let pod = vm_options(
            &spec(
                serde_json::json!({SANDBOX_CPU_QUOTA: "250000", SANDBOX_CPU_PERIOD: "100000", SANDBOX_MEMORY: "536870912"}),
                serde_json::json!({}),
            ),
            &Config::default(),
        );
        assert_eq!((pod.vcpus, pod.mem_mib), (3, 512 + 128));

        let own = vm_options(
            &spec(
                serde_json::json!({VCPUS: "2", MEMORY_MIB: "300", SANDBOX_CPU_QUOTA: "900000", SANDBOX_CPU_PERIOD: "100000", SANDBOX_MEMORY: "1073741824"}),
                serde_json::json!({}),
            ),
            &Config::default(),
        );
        assert_eq!((own.vcpus, own.mem_mib), (2, 300));

        let limits = vm_options(
            &spec(serde_json::json!({}), serde_json::json!({"cpu": {"quota": 150000, "period": 100000}, "memory": {"limit": 268435456}})),
            &Config::default(),
        );
        assert_eq!((limits.vcpus, limits.mem_mib), (2, 256 + 128));
    }

    #[test]
    fn vm_size_follows_the_config() {
        let config = Config {
            default_vcpus: 2,
            default_memory_mib: 512,
            memory_overhead_mib: 64,
            kernel_params: "loglevel=7".into(),
            ..Config::default()
        };
        let plain = vm_options(&spec(serde_json::json!({}), serde_json::json!({})), &config);
        assert_eq!((plain.vcpus, plain.mem_mib, plain.extra_cmdline.as_str()), (2, 512, "loglevel=7"));
        // Limits below the defaults get the defaults; above, the limit plus
        // the configured overhead.
        let small = vm_options(
            &spec(serde_json::json!({}), serde_json::json!({"cpu": {"quota": 50000, "period": 100000}, "memory": {"limit": 67108864}})),
            &config,
        );
        assert_eq!((small.vcpus, small.mem_mib), (2, 512));
        let pod = vm_options(
            &spec(
                serde_json::json!({SANDBOX_CPU_QUOTA: "300000", SANDBOX_CPU_PERIOD: "100000", SANDBOX_MEMORY: "1073741824"}),
                serde_json::json!({}),
            ),
            &config,
        );
        assert_eq!((pod.vcpus, pod.mem_mib), (3, 1024 + 64));
        // The annotations still win, below the defaults too.
        let own = vm_options(&spec(serde_json::json!({VCPUS: "1", MEMORY_MIB: "128"}), serde_json::json!({})), &config);
        assert_eq!((own.vcpus, own.mem_mib), (1, 128));
    }
}
