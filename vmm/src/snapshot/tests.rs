#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::cell::RefCell;

use kvm_bindings::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::vcpu::{self, VcpuOps, REFUSED_MSRS, RESTORE_ORDER};
use super::*;

fn shape() -> Shape {
    Shape {
        vcpus: 2,
        mem_mib: 256,
        pvm: true,
        devices: vec![DeviceShape { device_type: 19, tag: None }, DeviceShape { device_type: 26, tag: Some("root".into()) }],
    }
}

fn vcpu_state(n: u64) -> VcpuState {
    let mut lapic = kvm_lapic_state::default();
    lapic.regs[0x20] = 7;
    let mut xsave = kvm_xsave::default();
    xsave.region[3] = 0xabcd;
    VcpuState {
        cpuid: vec![kvm_cpuid_entry2 { function: 1, eax: 0x806f8, ..Default::default() }],
        mp_state: kvm_mp_state { mp_state: 0 },
        regs: kvm_regs { rip: 0xffff_ffff_8100_0000 + n, rsp: 0x1000, rflags: 2, ..Default::default() },
        sregs: kvm_sregs { cr3: 0x10_0000, efer: 0xd01, ..Default::default() },
        xsave,
        xcrs: kvm_xcrs { nr_xcrs: 1, ..Default::default() },
        debug_regs: kvm_debugregs { dr7: 0x400, ..Default::default() },
        lapic,
        msrs: vec![
            kvm_msr_entry { index: 0x10, data: 1234, ..Default::default() },
            kvm_msr_entry { index: 0xc000_0082, data: 0xffff_ffff_8180_0000, ..Default::default() },
        ],
        vcpu_events: kvm_vcpu_events::default(),
    }
}

fn vm_state() -> VmState {
    let mut ioapic = kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() };
    ioapic.chip.ioapic.base_address = 0xfec0_0000;
    VmState {
        shape: shape(),
        vcpus: vec![vcpu_state(0), vcpu_state(1)],
        kvm: KvmVmState {
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data { clock: 123_456_789, ..Default::default() },
            pic_master: kvm_irqchip { chip_id: KVM_IRQCHIP_PIC_MASTER, ..Default::default() },
            pic_slave: kvm_irqchip { chip_id: KVM_IRQCHIP_PIC_SLAVE, ..Default::default() },
            ioapic,
        },
        serial: SerialSnapshot {
            baud_divisor_low: 12,
            baud_divisor_high: 0,
            interrupt_enable: 0x2,
            interrupt_identification: 1,
            line_control: 3,
            line_status: 0x60,
            modem_control: 8,
            modem_status: 0xb0,
            scratch: 0,
            in_buffer: vec![b'x'],
        },
        devices: vec![TransportState {
            device_type: 19,
            status: 0xf,
            device_features_sel: 1,
            driver_features_sel: 1,
            driver_features: 1 << 32,
            queue_sel: 2,
            shm_sel: 0,
            config_generation: 0,
            interrupt_status: 1,
            activated: true,
            queues: vec![QueueSnapshot {
                max_size: 256,
                size: 128,
                ready: true,
                desc_table: 0x1000,
                avail_ring: 0x2000,
                used_ring: 0x3000,
                next_avail: 7,
                next_used: 6,
                event_idx: true,
            }],
        }],
    }
}

#[test]
fn state_file_round_trips() {
    let d = tempfile::tempdir().unwrap();
    let state = vm_state();
    write_state(d.path(), &state).unwrap();
    let back = read_state(d.path()).unwrap();
    // kvm-bindings types are not all PartialEq: compare the encodings, and
    // a few fields by hand so the test does not only compare a codec with itself.
    assert_eq!(encode_state(&back).unwrap(), encode_state(&state).unwrap());
    assert_eq!(back.shape, shape());
    assert_eq!(back.vcpus[1].regs.rip, 0xffff_ffff_8100_0001);
    assert_eq!(back.vcpus[0].xsave.region[3], 0xabcd);
    assert_eq!(back.vcpus[0].lapic.regs[0x20], 7);
    assert_eq!(back.vcpus[0].msrs[1].data, 0xffff_ffff_8180_0000);
    assert_eq!(back.kvm.clock.clock, 123_456_789);
    // SAFETY: reading the union member written above.
    assert_eq!(unsafe { back.kvm.ioapic.chip.ioapic.base_address }, 0xfec0_0000);
    assert_eq!(back.serial, state.serial);
    assert_eq!(back.devices, state.devices);
}

#[test]
fn truncated_state_is_refused() {
    let bytes = encode_state(&vm_state()).unwrap();
    let p = Path::new("/snap/state");
    for cut in [0, 5, 20, bytes.len() / 2, bytes.len() - 1] {
        let e = decode_state(&bytes[..cut], p).unwrap_err();
        assert!(matches!(e, SnapshotError::Truncated { .. }), "cut at {cut}: {e}");
        assert!(e.to_string().contains("/snap/state") && e.to_string().contains("truncated"), "{e}");
    }
    let mut long = bytes.clone();
    long.push(0);
    let e = decode_state(&long, p).unwrap_err();
    assert!(matches!(e, SnapshotError::TrailingBytes { extra: 1, .. }), "{e}");
}

#[test]
fn corrupted_state_is_refused_by_its_checksum() {
    let bytes = encode_state(&vm_state()).unwrap();
    // Every byte of the payload and the checksum itself is covered.
    for pos in [HEADER_LEN, HEADER_LEN + 100, bytes.len() - 5, bytes.len() - 1] {
        let mut bad = bytes.clone();
        bad[pos] ^= 0x40;
        let e = decode_state(&bad, Path::new("s")).unwrap_err();
        assert!(matches!(e, SnapshotError::Checksum { .. }), "flip at {pos}: {e}");
        assert!(e.to_string().contains("corrupted"), "{e}");
    }
    let mut bad = bytes;
    bad[0] = b'X';
    let e = decode_state(&bad, Path::new("s")).unwrap_err();
    assert!(matches!(e, SnapshotError::NotASnapshot { .. }), "{e}");
}

#[test]
fn wrong_version_is_refused_naming_both() {
    let mut bytes = encode_state(&vm_state()).unwrap();
    bytes[8..12].copy_from_slice(&(STATE_VERSION + 1).to_le_bytes());
    let e = decode_state(&bytes, Path::new("/t/state")).unwrap_err();
    assert!(matches!(e, SnapshotError::WrongVersion { found, expected, .. } if found == STATE_VERSION + 1 && expected == STATE_VERSION));
    let msg = e.to_string();
    assert!(msg.contains(&format!("version {}", STATE_VERSION + 1)) && msg.contains("/t/state"), "{msg}");
}

#[test]
fn a_payload_that_does_not_decode_is_refused() {
    // A valid frame around bytes that are no VmState.
    let payload = [0xffu8; 16];
    let mut bytes = STATE_MAGIC.to_vec();
    bytes.extend_from_slice(&STATE_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&payload);
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let e = decode_state(&bytes, Path::new("s")).unwrap_err();
    assert!(matches!(e, SnapshotError::Decode { .. }), "{e}");
}

#[test]
fn wrong_shape_is_refused_naming_the_difference() {
    check_shape(&shape(), &shape()).unwrap();
    type Change = Box<dyn Fn(&mut Shape)>;
    let cases: Vec<(Change, &str)> = vec![
        (Box::new(|s| s.vcpus = 1), "vcpus: the snapshot has 2, the config 1"),
        (Box::new(|s| s.mem_mib = 512), "mem_mib: the snapshot has 256, the config 512"),
        (Box::new(|s| s.pvm = false), "host kind"),
        (Box::new(|s| s.devices.pop().map(|_| ()).unwrap()), "virtio devices: the snapshot has [vsock, fs \"root\"], the config [vsock]"),
        (Box::new(|s| s.devices[1].tag = Some("other".into())), "fs \"other\""),
        (Box::new(|s| s.devices.swap(0, 1)), "[fs \"root\", vsock]"),
        (Box::new(|s| s.devices.push(DeviceShape { device_type: 1, tag: None })), "net"),
    ];
    for (change, want) in cases {
        let mut config = shape();
        change(&mut config);
        let e = check_shape(&shape(), &config).unwrap_err();
        assert!(matches!(e, SnapshotError::ShapeMismatch { .. }));
        assert!(e.to_string().contains(want), "{e} (wanted {want:?})");
    }
}

#[test]
fn memory_file_is_sparse_and_maps_back_private() {
    let d = tempfile::tempdir().unwrap();
    let ranges = [(GuestAddress(0), 4 << 20), (GuestAddress(0x1_0000_0000), 2 << 20)];
    let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
    mem.write_obj(0xdead_beef_u32, GuestAddress(0x1234)).unwrap();
    mem.write_obj(0x55_u8, GuestAddress((4 << 20) - 1)).unwrap();
    mem.write_obj(0x77_u8, GuestAddress(0x1_0000_0000 + 4096 * 3)).unwrap();
    let path = d.path().join(MEMORY_FILE);
    let written = write_memory(&mem, &path).unwrap();
    assert_eq!(written, 3 * 4096, "only the three touched pages are written");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 6 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 <= 64 * 1024, "{} bytes allocated", meta.blocks() * 512);

    let back = map_memory(&path, &ranges, 6).unwrap();
    assert_eq!(back.read_obj::<u32>(GuestAddress(0x1234)).unwrap(), 0xdead_beef);
    assert_eq!(back.read_obj::<u8>(GuestAddress((4 << 20) - 1)).unwrap(), 0x55);
    assert_eq!(back.read_obj::<u8>(GuestAddress(0x1_0000_0000 + 4096 * 3)).unwrap(), 0x77);
    // Copy-on-write: the guest's writes never reach the file.
    back.write_obj(0x1111_u32, GuestAddress(0x1234)).unwrap();
    back.write_obj(0x22_u8, GuestAddress(0x1_0000_0000)).unwrap();
    drop(back);
    let again = map_memory(&path, &ranges, 6).unwrap();
    assert_eq!(again.read_obj::<u32>(GuestAddress(0x1234)).unwrap(), 0xdead_beef);
    assert_eq!(again.read_obj::<u8>(GuestAddress(0x1_0000_0000)).unwrap(), 0);
    assert_eq!(std::fs::metadata(&path).unwrap().blocks(), meta.blocks());
}

#[test]
fn memory_file_of_the_wrong_size_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join(MEMORY_FILE);
    std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
    let e = map_memory(&path, &[(GuestAddress(0), 2 << 20)], 2).unwrap_err();
    assert!(matches!(e, SnapshotError::MemorySize { len, expected, .. } if len == 1 << 20 && expected == 2 << 20));
    assert!(e.to_string().contains("memory"), "{e}");
    let e = map_memory(&d.path().join("absent"), &[(GuestAddress(0), 2 << 20)], 2).unwrap_err();
    assert!(e.to_string().contains("absent"), "{e}");
}

/// A vCPU that records the ioctls made on it, and refuses the MSRs in `refuse`.
#[derive(Default)]
struct FakeVcpu {
    calls: RefCell<Vec<&'static str>>,
    refuse: Vec<u32>,
    set_msrs: RefCell<Vec<u32>>,
}

impl FakeVcpu {
    fn rec(&self, name: &'static str) {
        self.calls.borrow_mut().push(name);
    }
    fn accepted(&self, entries: &[kvm_msr_entry]) -> usize {
        entries.iter().position(|e| self.refuse.contains(&e.index)).unwrap_or(entries.len())
    }
}

type R<T> = Result<T, kvm_ioctls::Error>;

impl VcpuOps for FakeVcpu {
    fn get_cpuid(&self) -> R<Vec<kvm_cpuid_entry2>> {
        self.rec("KVM_GET_CPUID2");
        Ok(vec![])
    }
    fn set_cpuid(&self, _: &[kvm_cpuid_entry2]) -> R<()> {
        self.rec("KVM_SET_CPUID2");
        Ok(())
    }
    fn get_mp_state(&self) -> R<kvm_mp_state> {
        self.rec("KVM_GET_MP_STATE");
        Ok(Default::default())
    }
    fn set_mp_state(&self, _: kvm_mp_state) -> R<()> {
        self.rec("KVM_SET_MP_STATE");
        Ok(())
    }
    fn get_regs(&self) -> R<kvm_regs> {
        self.rec("KVM_GET_REGS");
        Ok(Default::default())
    }
    fn set_regs(&self, _: &kvm_regs) -> R<()> {
        self.rec("KVM_SET_REGS");
        Ok(())
    }
    fn get_sregs(&self) -> R<kvm_sregs> {
        self.rec("KVM_GET_SREGS");
        Ok(Default::default())
    }
    fn set_sregs(&self, _: &kvm_sregs) -> R<()> {
        self.rec("KVM_SET_SREGS");
        Ok(())
    }
    fn get_xsave(&self) -> R<kvm_xsave> {
        self.rec("KVM_GET_XSAVE");
        Ok(Default::default())
    }
    fn set_xsave(&self, _: &kvm_xsave) -> R<()> {
        self.rec("KVM_SET_XSAVE");
        Ok(())
    }
    fn get_xcrs(&self) -> R<kvm_xcrs> {
        self.rec("KVM_GET_XCRS");
        Ok(Default::default())
    }
    fn set_xcrs(&self, _: &kvm_xcrs) -> R<()> {
        self.rec("KVM_SET_XCRS");
        Ok(())
    }
    fn get_debug_regs(&self) -> R<kvm_debugregs> {
        self.rec("KVM_GET_DEBUGREGS");
        Ok(Default::default())
    }
    fn set_debug_regs(&self, _: &kvm_debugregs) -> R<()> {
        self.rec("KVM_SET_DEBUGREGS");
        Ok(())
    }
    fn get_lapic(&self) -> R<kvm_lapic_state> {
        self.rec("KVM_GET_LAPIC");
        Ok(Default::default())
    }
    fn set_lapic(&self, _: &kvm_lapic_state) -> R<()> {
        self.rec("KVM_SET_LAPIC");
        Ok(())
    }
    fn get_msrs(&self, entries: &mut [kvm_msr_entry]) -> R<usize> {
        self.rec("KVM_GET_MSRS");
        let n = self.accepted(entries);
        for e in &mut entries[..n] {
            // A TSC deadline of 0: no timer armed.
            e.data = if e.index == 0x6e0 { 0 } else { u64::from(e.index) * 2 };
        }
        Ok(n)
    }
    fn set_msrs(&self, entries: &[kvm_msr_entry]) -> R<usize> {
        self.rec("KVM_SET_MSRS");
        let n = self.accepted(entries);
        self.set_msrs.borrow_mut().extend(entries[..n].iter().map(|e| e.index));
        Ok(n)
    }
    fn get_vcpu_events(&self) -> R<kvm_vcpu_events> {
        self.rec("KVM_GET_VCPU_EVENTS");
        Ok(Default::default())
    }
    fn set_vcpu_events(&self, _: &kvm_vcpu_events) -> R<()> {
        self.rec("KVM_SET_VCPU_EVENTS");
        Ok(())
    }
}

#[test]
fn restore_sets_state_in_the_documented_order() {
    let fake = FakeVcpu::default();
    let skipped = vcpu::restore(&fake, 0, &vcpu_state(0)).unwrap();
    assert!(skipped.is_empty());
    assert_eq!(*fake.calls.borrow(), RESTORE_ORDER.to_vec());
}

#[test]
fn save_reads_mp_state_first_and_vcpu_events_last() {
    let fake = FakeVcpu::default();
    let s = vcpu::save(&fake, 0, &[0x10, 0x6e0, 0xc000_0082]).unwrap();
    let calls = fake.calls.borrow();
    assert_eq!(calls.first(), Some(&"KVM_GET_MP_STATE"));
    assert_eq!(calls.last(), Some(&"KVM_GET_VCPU_EVENTS"));
    assert_eq!(s.msrs.iter().map(|m| (m.index, m.data)).collect::<Vec<_>>(), [(0x10, 0x20), (0x6e0, 0x20), (0xc000_0082, 0x1_8000_0104)]);
}

#[test]
fn refused_msrs_on_the_list_are_skipped_and_others_fail() {
    assert!(REFUSED_MSRS.iter().any(|(i, _)| *i == 0x3a), "IA32_FEATURE_CONTROL is on the list");
    // The host refuses IA32_FEATURE_CONTROL: skipped, the MSRs after it still set.
    let fake = FakeVcpu { refuse: vec![0x3a], ..Default::default() };
    let mut state = vcpu_state(0);
    state.msrs =
        [0x10, 0x3a, 0x6e0, 0xc000_0082, 0x174].iter().map(|&index| kvm_msr_entry { index, data: 1, ..Default::default() }).collect();
    let skipped = vcpu::restore(&fake, 0, &state).unwrap();
    assert_eq!(skipped, [0x3a]);
    // TSC deadline moved after the TSC and everything else.
    assert_eq!(*fake.set_msrs.borrow(), [0x10, 0xc000_0082, 0x174, 0x6e0]);

    // Any other refusal fails, naming the MSR and the vCPU.
    let fake = FakeVcpu { refuse: vec![0x174], ..Default::default() };
    let e = vcpu::restore(&fake, 1, &state).unwrap_err();
    assert!(matches!(e, SnapshotError::MsrRefused { cpu: 1, index: 0x174, .. }), "{e}");
    assert!(e.to_string().contains("0x174"), "{e}");
    assert!(!fake.calls.borrow().contains(&"KVM_SET_VCPU_EVENTS"), "the restore stopped there");

    // The same rules when saving.
    let fake = FakeVcpu { refuse: vec![0x3a], ..Default::default() };
    let s = vcpu::save(&fake, 0, &[0x3a, 0x10]).unwrap();
    assert_eq!(s.msrs.iter().map(|m| m.index).collect::<Vec<_>>(), [0x10]);
    let fake = FakeVcpu { refuse: vec![0x10], ..Default::default() };
    assert!(matches!(vcpu::save(&fake, 0, &[0x3a, 0x10]), Err(SnapshotError::MsrRefused { index: 0x10, .. })));
}

#[test]
fn msrs_go_in_chunks_kvm_accepts() {
    let entries: Vec<kvm_msr_entry> = (0..600u32).map(|index| kvm_msr_entry { index: 0x1000 + index, ..Default::default() }).collect();
    let mut sizes = Vec::new();
    let (done, skipped) = vcpu::msrs_skipping_refused(0, "write", entries, |chunk| {
        sizes.push(chunk.len());
        Ok(chunk.len())
    })
    .unwrap();
    assert_eq!(done.len(), 600);
    assert!(skipped.is_empty());
    assert!(sizes.iter().all(|&s| s <= KVM_MAX_MSR_ENTRIES) && sizes.iter().sum::<usize>() == 600, "{sizes:?}");
}

#[test]
fn a_zero_tsc_deadline_is_saved_as_the_tsc_and_restored_last() {
    let fake = FakeVcpu::default();
    let mut s = vcpu::save(&fake, 0, &[0x6e0, 0x10]).unwrap();
    assert_eq!(s.msrs.iter().map(|m| (m.index, m.data)).collect::<Vec<_>>(), [(0x6e0, 0x20), (0x10, 0x20)]);
    vcpu::order_msrs(&mut s.msrs);
    assert_eq!(s.msrs.iter().map(|m| m.index).collect::<Vec<_>>(), [0x10, 0x6e0]);
}
