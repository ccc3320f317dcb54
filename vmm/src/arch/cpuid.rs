//! Per-vCPU CPUID: what KVM supports, with the APIC ID and a flat topology
//! (one thread per core, all cores in one package) filled in, and on
//! `kvm_pvm` hosts without the KVM paravirt features that need hypercalls.

use kvm_bindings::kvm_cpuid_entry2;

/// KVM's paravirt feature leaf (EAX holds the feature bits).
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// KVM_FEATURE_PV_UNHALT: pv spinlocks, kicked with KVM_HC_KICK_CPU.
pub const KVM_FEATURE_PV_UNHALT: u32 = 7;
/// KVM_FEATURE_PV_SEND_IPI: IPIs through KVM_HC_SEND_IPI.
pub const KVM_FEATURE_PV_SEND_IPI: u32 = 11;
/// KVM_FEATURE_PV_SCHED_YIELD: KVM_HC_SCHED_YIELD.
pub const KVM_FEATURE_PV_SCHED_YIELD: u32 = 13;
/// KVM_FEATURE_HC_MAP_GPA_RANGE: KVM_HC_MAP_GPA_RANGE.
pub const KVM_FEATURE_HC_MAP_GPA_RANGE: u32 = 16;
/// The KVM features whose use involves a VMCALL/VMMCALL hypercall. On a
/// `kvm_pvm` host a non-PVM guest's hypercall never completes (the vCPU
/// stays on the VMCALL): the first PV IPI hangs SMP bring-up.
pub const HYPERCALL_FEATURES: u32 =
    (1 << KVM_FEATURE_PV_UNHALT) | (1 << KVM_FEATURE_PV_SEND_IPI) | (1 << KVM_FEATURE_PV_SCHED_YIELD) | (1 << KVM_FEATURE_HC_MAP_GPA_RANGE);

/// Level type "SMT" in leaf 0xb/0x1f ECX[15:8].
const LEVEL_TYPE_SMT: u32 = 1;
/// Level type "core".
const LEVEL_TYPE_CORE: u32 = 2;
/// CPUID.1:EDX.HTT.
const EDX_HTT: u32 = 1 << 28;

/// Number of APIC-ID bits needed for `n` logical CPUs.
fn id_bits(n: u8) -> u32 {
    if n <= 1 {
        0
    } else {
        u32::BITS - u32::from(n - 1).leading_zeros()
    }
}

/// Adapts KVM's supported CPUID for vCPU `apic_id` of `nr_vcpus`;
/// `no_hypercalls` hides [`HYPERCALL_FEATURES`].
pub fn patch_entries(entries: &mut [kvm_cpuid_entry2], apic_id: u8, nr_vcpus: u8, no_hypercalls: bool) {
    let apic = u32::from(apic_id);
    for e in entries.iter_mut() {
        match e.function {
            KVM_CPUID_FEATURES if no_hypercalls => e.eax &= !HYPERCALL_FEATURES,
            0x8000_0008 => {
                // AMD: ECX[15:12] APIC-ID bits for cores, ECX[7:0] cores - 1.
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(nr_vcpus) << 12) | u32::from(nr_vcpus - 1);
            }
            0x8000_001e => {
                // AMD: extended APIC ID, compute unit = APIC ID (one thread
                // each), one node.
                e.eax = apic;
                e.ebx = apic;
                e.ecx = 0;
            }
            1 => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical CPUs per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (apic << 24) | (u32::from(nr_vcpus) << 16);
                if nr_vcpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            0xb | 0x1f => {
                // Extended topology: level 0 = SMT (1 thread/core), level 1 =
                // core (all vCPUs), then the end marker. EDX = x2APIC ID.
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = id_bits(nr_vcpus);
                        e.ebx = u32::from(nr_vcpus);
                        e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
                e.edx = apic;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ebx: 0x0a0b_0c0d, ecx: 0x1111, edx: 0x2222, eax: 0x3333, ..Default::default() }
    }

    #[test]
    fn apic_id_in_leaf_1_and_0xb() {
        let mut e = vec![entry(0, 0), entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)];
        patch_entries(&mut e, 3, 4, false);
        assert_eq!(e[0], entry(0, 0), "other leaves untouched");
        assert_eq!(e[1].ebx, 0x0304_0c0d);
        assert_ne!(e[1].edx & EDX_HTT, 0);
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx, e[2].edx), (0, 1, 0x100, 3));
        assert_eq!((e[3].eax, e[3].ebx, e[3].ecx, e[3].edx), (2, 4, 0x201, 3));
        assert_eq!((e[4].eax, e[4].ebx, e[4].ecx, e[4].edx), (0, 0, 2, 3));
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut e = vec![entry(1, 0)];
        e[0].edx |= EDX_HTT;
        patch_entries(&mut e, 0, 1, false);
        assert_eq!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[0].ebx >> 24, 0);
    }

    #[test]
    fn hypercall_features_hidden_only_when_asked() {
        let pv = entry(KVM_CPUID_FEATURES, 0);
        let mut e = vec![kvm_cpuid_entry2 { eax: 0x01ff_ffff, ..pv }];
        patch_entries(&mut e, 0, 2, false);
        assert_eq!(e[0].eax, 0x01ff_ffff);
        patch_entries(&mut e, 0, 2, true);
        assert_eq!(e[0].eax, 0x01ff_ffff & !((1 << 7) | (1 << 11) | (1 << 13) | (1 << 16)));
        assert_ne!(e[0].eax & 1, 0, "kvmclock stays");
    }

    #[test]
    fn amd_topology_leaves() {
        let mut e = vec![entry(0x8000_0008, 0), entry(0x8000_001e, 0)];
        e[0].ecx = 0x0001_f00f;
        patch_entries(&mut e, 2, 3, false);
        assert_eq!(e[0].ecx, 0x0001_2002);
        assert_eq!((e[1].eax, e[1].ebx, e[1].ecx), (2, 2, 0));
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1u8, 2, 3, 4, 5, 8, 9, 254].map(id_bits), [0, 1, 2, 2, 3, 3, 4, 8]);
    }
}
