//! The VM: KVM, guest memory, devices, boot loading, and the vCPU threads.
//!
//! [`Vmm::new`] validates the config and builds everything (nothing runs
//! yet); [`Vmm::run`] starts the vCPUs, waits for the first [`VmExit`],
//! stops every vCPU thread and drops the devices (the vsock device removes
//! its socket then).

use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use tracing::{debug, error, info, info_span, warn};
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::{self, boot, cpuid, layout, mptable, paging, regs};
use crate::bus::{Bus, BusError};
use crate::cmdline::{self, CmdlineError, HostKind, MmioSlot};
use crate::config::{ConfigError, SerialOutput, VmConfig};
use crate::devices::legacy::{open_sink, SerialDevice, SerialError, I8042};
use crate::devices::virtio::fs::{Fs, FsError};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{Net, NetError};
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::error::one_line;
use crate::exit::{ExitSender, VmEvent, VmExit};
use crate::profile::{Profile, Sampler};
use crate::seccomp::{self, Filters, SeccompError, ThreadKind};
use crate::snapshot::{self, DeviceShape, KvmVmState, Shape, SnapshotError, TransportState, VmState};
use crate::vcpu::{Vcpu, VcpuShared};

/// Offset of QueueNotify in a virtio-mmio window.
const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;
/// How long stopping may wait for a vCPU thread before giving up on it.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Serial(#[from] SerialError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM: {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM on this host lacks {0}")]
    MissingCap(&'static str),
    #[error("vcpus {want}: this host's KVM allows at most {max}")]
    TooManyVcpus { want: u8, max: usize },
    #[error("cannot allocate {mib} MiB of guest memory")]
    Memory {
        mib: u32,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error(transparent)]
    Load(#[from] boot::LoadError),
    #[error(transparent)]
    Tables(#[from] arch::TableError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    #[error("device bus")]
    Bus(#[from] BusError),
    #[error("too many virtio devices (no MMIO slot/GSI left)")]
    TooManyDevices,
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot start vCPU thread {cpu}")]
    SpawnVcpu {
        cpu: u8,
        #[source]
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

/// A built VM, ready to [`run`](Vmm::run).
#[derive(Debug)]
pub struct Vmm {
    host: HostKind,
    kvm: Kvm,
    vm: VmFd,
    mem: GuestMemoryMmap,
    pio: Bus,
    mmio: Bus,
    slots: Vec<MmioSlot>,
    vcpus: Vec<VcpuFd>,
    cmdline: String,
    exit_tx: ExitSender,
    exit_rx: Receiver<VmEvent>,
    /// The filters the VMM's threads confine themselves with while the VM
    /// runs (none: unconfined).
    seccomp: Option<Arc<Filters>>,
    /// The UART (its registers go into a snapshot).
    serial: Option<Arc<Mutex<SerialDevice>>>,
    /// The virtio-mmio transports, in bus order (for snapshots).
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// What a snapshot of this VM must be restored into.
    shape: Shape,
    /// Where SIGUSR2 writes a snapshot.
    snapshot_to: Option<PathBuf>,
    /// The MSRs a snapshot saves (KVM_GET_MSR_INDEX_LIST), read while the
    /// VM is built.
    msr_list: Vec<u32>,
    /// The snapshot's device states, restored when the VM starts to run
    /// (device workers start confined, through the seccomp spawner).
    restore_devices: Option<Vec<TransportState>>,
    /// Where guest samples go, if the guest is profiled.
    profile: Option<Arc<Profile>>,
}

/// The shape of the VM `config` describes on a `host` (see [`Shape`]).
pub fn shape_of(config: &VmConfig, host: HostKind) -> Shape {
    use virtio_bindings::virtio_ids::{VIRTIO_ID_FS, VIRTIO_ID_NET, VIRTIO_ID_VSOCK};
    let mut devices = Vec::new();
    // The order `build` puts them on the bus.
    if config.vsock.is_some() {
        devices.push(DeviceShape { device_type: VIRTIO_ID_VSOCK, tag: None });
    }
    for f in &config.fs {
        devices.push(DeviceShape { device_type: VIRTIO_ID_FS, tag: Some(f.tag.clone()) });
    }
    for _ in &config.net {
        devices.push(DeviceShape { device_type: VIRTIO_ID_NET, tag: None });
    }
    Shape { vcpus: config.vcpus, mem_mib: config.mem_mib, pvm: host == HostKind::Pvm, devices }
}

impl Vmm {
    /// Validates `config` and builds the VM: KVM, memory, devices, the
    /// loaded guest and configured vCPUs. On error nothing is left behind.
    pub fn new(config: &VmConfig) -> Result<Self, VmmError> {
        Self::with_host(config, HostKind::detect())
    }

    /// [`Vmm::new`] for an explicitly given host kind.
    pub fn with_host(config: &VmConfig, host: HostKind) -> Result<Self, VmmError> {
        let _span = info_span!("vmm_new", vcpus = config.vcpus, mem_mib = config.mem_mib).entered();
        config.validate()?;
        // A console file we create is removed again if the VM cannot be built.
        let created_console = match &config.serial {
            SerialOutput::File(p) if std::fs::symlink_metadata(p).is_err() => Some(p.clone()),
            _ => None,
        };
        let built = Self::build(config, host);
        if let (Err(_), Some(p)) = (&built, created_console) {
            let _ = std::fs::remove_file(p);
        }
        built
    }

    fn build(config: &VmConfig, host: HostKind) -> Result<Self, VmmError> {
        // A snapshot that cannot be restored into this config is refused
        // before anything is created.
        let shape = shape_of(config, host);
        let restore = match &config.restore_from {
            Some(dir) => {
                let _s = info_span!("read_snapshot").entered();
                let state = snapshot::read_state(dir)?;
                snapshot::check_shape(&state.shape, &shape)?;
                if state.vcpus.len() != usize::from(config.vcpus) || state.devices.len() != shape.devices.len() {
                    return Err(SnapshotError::ShapeMismatch {
                        what: "state file".into(),
                        snapshot: format!("{} vCPU and {} device states", state.vcpus.len(), state.devices.len()),
                        config: format!("{} vCPUs and {} devices", config.vcpus, shape.devices.len()),
                    }
                    .into());
                }
                Some((dir.clone(), state))
            }
            None => None,
        };
        // Host resources that can fail on user input come first: before any KVM work.
        let sink = open_sink(&config.serial)?;
        let vsock = match &config.vsock {
            Some(v) => Some(Vsock::new(v.guest_cid, v.uds_path.clone())?),
            None => None,
        };
        let shares = config.fs.iter().map(|f| Fs::new(f.clone()).map_err(VmmError::Fs)).collect::<Result<Vec<_>, _>>()?;
        // Taps are opened (or inherited ones checked) before the guest
        // exists: a bad fd or name fails the start, not the guest's boot.
        let nets = config.net.iter().map(|n| Net::new(n).map_err(VmmError::Net)).collect::<Result<Vec<_>, _>>()?;
        info!(?host, "host KVM kind");

        let kvm = Kvm::new().map_err(VmmError::OpenKvm)?;
        let max = kvm.get_max_vcpus();
        if usize::from(config.vcpus) > max {
            return Err(VmmError::TooManyVcpus { want: config.vcpus, max });
        }
        for (cap, name) in [(Cap::Irqchip, "KVM_CAP_IRQCHIP"), (Cap::Irqfd, "KVM_CAP_IRQFD"), (Cap::Pit2, "KVM_CAP_PIT2")] {
            if !kvm.check_extension(cap) {
                return Err(VmmError::MissingCap(name));
            }
        }
        let msr_list = match &config.snapshot_to {
            Some(_) => kvm.get_msr_index_list().map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?.as_slice().to_vec(),
            None => Vec::new(),
        };
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        // Memory slots before any vCPU: kvm_pvm's MSR_PVM_VCPU_STRUCT (restored
        // with the MSRs) points into guest memory.
        let mem = Self::create_memory(&vm, config, restore.as_ref().map(|(dir, _)| dir.as_path()))?;
        {
            let _s = info_span!("irqchip").entered();
            vm.set_tss_address(layout::KVM_TSS_ADDR).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
            vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
            let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
            vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        }
        let (exit_tx, exit_rx) = ExitSender::channel();
        let mut vmm = Vmm {
            host,
            kvm,
            vm,
            mem,
            pio: Bus::new(),
            mmio: Bus::new(),
            slots: Vec::new(),
            vcpus: Vec::new(),
            cmdline: String::new(),
            exit_tx,
            exit_rx,
            seccomp: None,
            serial: None,
            transports: Vec::new(),
            shape,
            snapshot_to: config.snapshot_to.clone(),
            msr_list,
            restore_devices: None,
            profile: None,
        };
        vmm.add_legacy_devices(sink, restore.as_ref().map(|(_, s)| &s.serial))?;
        if let Some(v) = vsock {
            vmm.add_virtio_device(Box::new(v))?;
        }
        for share in shares {
            vmm.add_virtio_device(Box::new(share))?;
        }
        for net in nets {
            vmm.add_virtio_device(Box::new(net))?;
        }
        vmm.cmdline = cmdline::build(vmm.host, &vmm.slots, &config.cmdline)?;
        info!(cmdline = %vmm.cmdline, "kernel command line");
        match restore {
            Some((dir, state)) => {
                let _s = info_span!("restore", dir = %dir.display()).entered();
                // Firecracker's order: the vCPUs, then the VM-wide state
                // (the PIC/IOAPIC routing and the clock over vCPUs that
                // exist), then the devices (at `run`): an interrupt a
                // restored device raises must not be overwritten by the
                // irqchip state restored after it.
                vmm.restore_vcpus(&state)?;
                vmm.restore_kvm_state(&state.kvm)?;
                vmm.restore_devices = Some(state.devices);
            }
            None => {
                let entry = vmm.load_guest(config)?;
                vmm.create_vcpus(config.vcpus, entry, config.mem_bytes())?;
            }
        }
        Ok(vmm)
    }

    /// Fresh vCPUs with the snapshot's state: kvm_pvm sets the CPL from
    /// SREGS only on a vCPU that never ran.
    fn restore_vcpus(&mut self, state: &VmState) -> Result<(), VmmError> {
        for (id, st) in (0u8..).zip(&state.vcpus) {
            let fd = self.vm.create_vcpu(u64::from(id)).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let skipped = snapshot::vcpu::restore(&fd, id, st)?;
            debug!(cpu = id, msrs = st.msrs.len(), ?skipped, "vCPU restored (MSRs this host refused: skipped)");
            self.vcpus.push(fd);
        }
        Ok(())
    }

    fn restore_kvm_state(&self, s: &KvmVmState) -> Result<(), VmmError> {
        self.vm.set_pit2(&s.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        // KVM_SET_CLOCK refuses KVM_CLOCK_TSC_STABLE (it reports, not sets, it).
        let mut clock = s.clock;
        clock.flags &= !kvm_bindings::KVM_CLOCK_TSC_STABLE;
        self.vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
            self.vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }

    fn save_kvm_state(&self) -> Result<KvmVmState, SnapshotError> {
        let kvm = |what| move |source| SnapshotError::Kvm { what, source };
        let pit = self.vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
        let clock = self.vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        let chip = |id| {
            let mut c = kvm_bindings::kvm_irqchip { chip_id: id, ..Default::default() };
            self.vm.get_irqchip(&mut c).map(|()| c).map_err(kvm("KVM_GET_IRQCHIP"))
        };
        Ok(KvmVmState {
            pit,
            clock,
            pic_master: chip(kvm_bindings::KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(kvm_bindings::KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(kvm_bindings::KVM_IRQCHIP_IOAPIC)?,
        })
    }

    /// Writes a snapshot of the stopped VM to `dir`: every vCPU thread has
    /// ended (handing back its fd, I/O completed). First the devices stop
    /// (their workers run on their own threads, unlike Firecracker's, and
    /// could still use buffers and raise interrupts): from then on neither
    /// guest memory nor the interrupt controllers change. Then, as
    /// Firecracker does it, the VM-wide KVM state and each vCPU
    /// (KVM_GET_VCPU_EVENTS is only safe with no vCPU running); memory and
    /// the state file last.
    fn take_snapshot(&self, dir: &Path, fds: Vec<Option<VcpuFd>>) -> Result<u64, SnapshotError> {
        let started = Instant::now();
        let mut vcpu_fds = Vec::new();
        for (cpu, fd) in (0u8..).zip(fds) {
            vcpu_fds.push(fd.ok_or(SnapshotError::VcpuNotStopped { cpu })?);
        }
        let mut devices = Vec::new();
        for (index, t) in self.transports.iter().enumerate() {
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            let device = self.shape.devices.get(index).map_or_else(String::new, DeviceShape::describe);
            devices.push(t.save().map_err(|reason| SnapshotError::Device { index, device, reason })?);
        }
        let kvm = self.save_kvm_state()?;
        let mut vcpus = Vec::new();
        for (cpu, fd) in (0u8..).zip(&vcpu_fds) {
            vcpus.push(snapshot::vcpu::save(fd, cpu, &self.msr_list)?);
        }
        let serial = match &self.serial {
            Some(s) => s.lock().unwrap_or_else(|e| e.into_inner()).state().into(),
            None => vm_superio::serial::SerialState::default().into(),
        };
        let state = VmState { shape: self.shape.clone(), vcpus, kvm, serial, devices };
        // The state file last: a directory with a good state file is complete.
        let written = snapshot::write_memory(&self.mem, &dir.join(snapshot::MEMORY_FILE))
            .and_then(|written| snapshot::write_state(dir, &state).map(|()| written))
            .inspect_err(|_| {
                // Nothing half-written is left for a restore to trip on.
                let _ = std::fs::remove_file(dir.join(snapshot::MEMORY_FILE));
                let _ = std::fs::remove_file(dir.join(snapshot::STATE_FILE));
            })?;
        info!(dir = %dir.display(), memory_written = written, after = ?started.elapsed(), "snapshot written");
        Ok(written)
    }

    fn create_memory(vm: &VmFd, config: &VmConfig, snapshot: Option<&Path>) -> Result<GuestMemoryMmap, VmmError> {
        let _s = info_span!("memory").entered();
        let mut ranges = Vec::new();
        for (addr, len) in layout::ram_regions(config.mem_bytes()) {
            let len = usize::try_from(len)
                .map_err(|_| VmmError::Memory { mib: config.mem_mib, source: vm_memory::mmap::FromRangesError::InvalidGuestRegion })?;
            ranges.push((addr, len));
        }
        let mem = match snapshot {
            Some(dir) => snapshot::map_memory(&dir.join(snapshot::MEMORY_FILE), &ranges, config.mem_mib)?,
            None => GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(|source| VmmError::Memory { mib: config.mem_mib, source })?,
        };
        for (slot, region) in (0u32..).zip(mem.iter()) {
            let host = region.as_ptr();
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range [userspace_addr, +memory_size) is a live
            // mmap owned by `mem`, which the Vmm keeps alive for as long as
            // the VM (and so the slot) exists; slots do not overlap.
            unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(mem)
    }

    fn add_legacy_devices(
        &mut self,
        sink: Box<dyn std::io::Write + Send>,
        state: Option<&snapshot::SerialSnapshot>,
    ) -> Result<(), VmmError> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        self.vm.register_irqfd(&irq, layout::SERIAL_IRQ).map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let serial = match state {
            Some(s) => SerialDevice::from_state(&s.into(), irq, sink).map_err(|reason| SnapshotError::Device {
                index: 0,
                device: "serial".into(),
                reason,
            })?,
            None => SerialDevice::new(irq, sink),
        };
        let serial = Arc::new(Mutex::new(serial));
        self.serial = Some(serial.clone());
        self.pio.insert(u64::from(layout::SERIAL_PORT), 8, serial)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(self.exit_tx.clone())));
        self.pio.insert(u64::from(layout::I8042_PORT), I8042::PORTS, i8042)?;
        Ok(())
    }

    /// Puts a virtio device on the next virtio-mmio slot: irqfd on its GSI,
    /// ioeventfds for its queue notifications, and an entry for the command line.
    /// Only before the command line is built and the guest loaded (inside `build`).
    fn add_virtio_device(&mut self, device: Box<dyn VirtioDevice>) -> Result<(), VmmError> {
        let (addr, gsi) = layout::virtio_slot(self.slots.len()).ok_or(VmmError::TooManyDevices)?;
        let _s = info_span!("virtio_device", kind = device.device_type(), addr, gsi).entered();
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        self.vm.register_irqfd(&irq, gsi).map_err(kvm_err("KVM_IRQFD (virtio)"))?;
        let interrupt = Arc::new(Interrupt::new(irq));
        let transport = MmioTransport::new(self.mem.clone(), device, interrupt);
        for (i, evt) in (0u32..).zip(transport.queue_evts()) {
            let notify = IoEventAddress::Mmio(addr + VIRTIO_MMIO_QUEUE_NOTIFY);
            if let Err(e) = self.vm.register_ioevent(evt, &notify, i) {
                // The transport signals the same eventfd itself on QueueNotify.
                warn!("virtio-mmio at {addr:#x}: no ioeventfd for queue {i} ({e}); notifications exit to the VMM");
            }
        }
        let transport = Arc::new(Mutex::new(transport));
        self.transports.push(transport.clone());
        self.mmio.insert(addr, layout::VIRTIO_MMIO_SIZE, transport)?;
        self.slots.push(MmioSlot { addr, gsi, size: layout::VIRTIO_MMIO_SIZE });
        Ok(())
    }

    /// Loads kernel, initramfs, command line and the boot tables; returns the entry point.
    fn load_guest(&self, config: &VmConfig) -> Result<u64, VmmError> {
        let _s = info_span!("load_guest").entered();
        let mem_bytes = config.mem_bytes();
        let kernel = boot::load_kernel(&self.mem, &config.kernel, mem_bytes)?;
        debug!(entry = kernel.entry, end = kernel.end, "kernel loaded");
        let initrd = match &config.initramfs {
            Some(p) => {
                let rd = boot::load_initrd(&self.mem, p, kernel.end, mem_bytes)?;
                debug!(addr = rd.addr, size = rd.size, "initramfs loaded");
                Some(rd)
            }
            None => None,
        };
        let len = boot::write_cmdline(&self.mem, &self.cmdline)?;
        boot::write_boot_params(&self.mem, &boot::boot_params(mem_bytes, len, initrd))?;
        arch::gdt::write_gdt_idt(&self.mem)?;
        mptable::write(&self.mem, config.vcpus)?;
        Ok(kernel.entry)
    }

    fn create_vcpus(&mut self, count: u8, entry: u64, mem_bytes: u64) -> Result<(), VmmError> {
        let _s = info_span!("vcpus", count).entered();
        let base_cpuid = self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let cr3 = paging::write_page_tables(&self.mem, layout::low_ram_end(mem_bytes))?;
        for id in 0..count {
            let fd = self.vm.create_vcpu(u64::from(id)).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let mut cpuid = base_cpuid.clone();
            cpuid::patch_entries(cpuid.as_mut_slice(), id, count, self.host == HostKind::Pvm);
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            regs::setup_msrs(&fd, id)?;
            regs::setup_fpu(&fd, id)?;
            regs::setup_lapic(&fd, id)?;
            if id == 0 {
                regs::setup_boot_cpu(&fd, entry, cr3)?;
            }
            self.vcpus.push(fd);
        }
        Ok(())
    }

    /// The kernel command line the guest gets.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The host kind the command line was built for.
    pub fn host(&self) -> HostKind {
        self.host
    }

    /// The guest's memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Confines every thread of the VMM with `filters` (one per thread kind)
    /// from before the guest's first instruction until the process ends;
    /// see [`seccomp`](crate::seccomp). Without it the VMM runs unconfined
    /// (library users, tests, `carapace-vmm --no-seccomp`).
    pub fn with_seccomp(mut self, filters: Arc<Filters>) -> Self {
        self.seccomp = Some(filters);
        self
    }

    /// Samples where the vCPUs are into `profile` while the VM runs; see
    /// [`profile`](crate::profile).
    pub fn with_profile(mut self, profile: Profile) -> Self {
        self.profile = Some(Arc::new(profile));
        self
    }

    /// A handle to stop the VM from elsewhere (e.g. on SIGTERM):
    /// `exit_sender().send(VmExit::Signal(15))`.
    pub fn exit_sender(&self) -> ExitSender {
        self.exit_tx.clone()
    }

    /// Runs the guest until it reboots, crashes or is stopped; then stops
    /// all vCPU threads and drops the devices. Returns why it ended.
    pub fn run(mut self) -> Result<VmExit, VmmError> {
        install_kick_handler();
        let stop = Arc::new(AtomicBool::new(false));
        let dump_gen = Arc::new(AtomicU64::new(0));
        let pio = Arc::new(std::mem::take(&mut self.pio));
        let mmio = Arc::new(std::mem::take(&mut self.mmio));
        let mut threads: Vec<JoinHandle<Option<VcpuFd>>> = Vec::new();
        let pause = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let filters = self.seccomp.clone();
        if let Some(f) = &filters {
            // Before any thread of ours is confined: device threads start
            // there, confined to their own kind.
            seccomp::install_spawner(f.clone())?;
        }
        if let Some(states) = self.restore_devices.take() {
            let _s = info_span!("restore_devices").entered();
            for (index, (t, state)) in self.transports.iter().zip(&states).enumerate() {
                let device = self.shape.devices.get(index).map_or_else(String::new, DeviceShape::describe);
                let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
                t.restore(state).map_err(|reason| SnapshotError::Device { index, device, reason })?;
            }
        }
        // vCPUs enter KVM_RUN only once every thread is confined.
        let go = Arc::new(Gate::default());
        let shared = VcpuShared {
            pio: pio.clone(),
            mmio: mmio.clone(),
            mem: self.mem.clone(),
            exit: self.exit_tx.clone(),
            stop: stop.clone(),
            dump_gen: dump_gen.clone(),
            pause: pause.clone(),
            profile: self.profile.clone(),
        };
        for (id, fd) in (0u8..).zip(self.vcpus.drain(..)) {
            let vcpu = Vcpu::new(id, fd, shared.clone());
            let (filters, gate, exit) = (filters.clone(), go.clone(), self.exit_tx.clone());
            let spawned = std::thread::Builder::new().name(format!("vcpu{id}")).spawn(move || {
                let confined = filters.as_ref().map_or(Ok(()), |f| f.apply(ThreadKind::Vcpu));
                gate.wait();
                match confined {
                    Ok(()) => Some(vcpu.run()),
                    Err(e) => {
                        exit.send(VmExit::VmmError { cpu: id, reason: one_line(&e) });
                        None
                    }
                }
            });
            match spawned {
                Ok(t) => threads.push(t),
                Err(source) => {
                    // Release the threads already waiting; they stop at once.
                    stop.store(true, Ordering::SeqCst);
                    go.open();
                    let _ = stop_vcpus(&stop, threads);
                    drop(shared);
                    return Err(VmmError::SpawnVcpu { cpu: id, source });
                }
            }
        }
        let confined = filters.as_ref().map_or(Ok(()), |f| f.apply(ThreadKind::Vmm));
        if let Err(e) = &confined {
            // The vCPUs see `stop` before their first KVM_RUN.
            error!("{}", one_line(e));
            stop.store(true, Ordering::SeqCst);
        }
        go.open();
        if let Err(e) = confined {
            let _ = stop_vcpus(&stop, threads);
            drop(shared);
            return Err(e.into());
        }
        info!(vcpus = threads.len(), seccomp = filters.is_some(), "guest running");
        // Stopped before the vCPU threads are joined (its kicks name them).
        let sampler = self.profile.take().and_then(|p| {
            let ids = threads.iter().map(JoinHandleExt::as_pthread_t).collect();
            Sampler::start(p, ids, kick_signal()).map_err(|e| warn!("{}", one_line(&e))).ok()
        });
        // None: stop for a snapshot.
        let exit = loop {
            // `self` holds a sender, so recv() cannot fail while we wait.
            match self.exit_rx.recv() {
                Ok(VmEvent::Exit(e)) => break Some(e),
                Ok(VmEvent::Snapshot) => {
                    if self.snapshot_to.is_some() {
                        break None;
                    }
                    warn!("snapshot requested (SIGUSR2), but the VM has no snapshot_to directory: ignored");
                }
                Ok(VmEvent::DumpVcpus) => {
                    dump_gen.fetch_add(1, Ordering::SeqCst);
                    kick_all(&threads);
                }
                Err(_) => break Some(VmExit::VmmError { cpu: 0, reason: "exit channel closed".into() }),
            }
        };
        if let Some(s) = sampler {
            s.stop();
        }
        let exit = match (exit, &self.snapshot_to) {
            (Some(exit), _) => {
                info!(%exit, after = ?started.elapsed(), "VM stopping");
                let _ = stop_vcpus(&stop, threads);
                exit
            }
            (None, Some(dir)) => {
                info!(after = ?started.elapsed(), "VM pausing for a snapshot");
                pause.store(true, Ordering::SeqCst);
                let fds = stop_vcpus(&stop, threads);
                match self.take_snapshot(dir, fds) {
                    Ok(_) => VmExit::Snapshotted(dir.clone()),
                    Err(e) => VmExit::SnapshotFailed(one_line(&e)),
                }
            }
            (None, None) => VmExit::VmmError { cpu: 0, reason: "snapshot without a directory".into() },
        };
        // Dropping the buses drops the devices (the vsock device removes its socket).
        drop(shared);
        drop(pio);
        drop(mmio);
        Ok(exit)
    }
}

/// Holds vCPU threads back until the main thread opens it.
#[derive(Debug, Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn open(&self) {
        *self.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.opened.notify_all();
    }

    fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        while !*open {
            open = self.opened.wait(open).unwrap_or_else(|e| e.into_inner());
        }
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), kick_handler) {
            warn!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

/// Kicks every vCPU out of KVM_RUN a few times (a kick can land just
/// before a thread enters KVM_RUN and be lost).
fn kick_all<T>(threads: &[JoinHandle<T>]) {
    for _ in 0..3 {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            let _ = t.kill(kick_signal());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sets `stop` and kicks every vCPU out of KVM_RUN until its thread ends;
/// returns each vCPU thread gave back (None: it did not stop).
fn stop_vcpus(stop: &AtomicBool, threads: Vec<JoinHandle<Option<VcpuFd>>>) -> Vec<Option<VcpuFd>> {
    stop.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + STOP_TIMEOUT;
    let mut fds = Vec::new();
    for t in threads {
        let name = t.thread().name().unwrap_or("vcpu").to_string();
        // A kick can land just before the thread enters KVM_RUN: repeat it.
        while !t.is_finished() && Instant::now() < deadline {
            if let Err(e) = t.kill(kick_signal()) {
                warn!("cannot signal {name}: {e}");
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if t.is_finished() {
            match t.join() {
                Ok(fd) => fds.push(fd),
                Err(_) => {
                    warn!("{name} panicked");
                    fds.push(None);
                }
            }
        } else {
            warn!("{name} did not stop within {STOP_TIMEOUT:?}; leaving it");
            fds.push(None);
        }
    }
    fds
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::path::Path;

    use super::*;
    use crate::config::VsockConfig;
    use crate::test_utils::tiny_elf;

    /// `mov dx, 0x3f8; mov al, 'O'; out dx, al; mov al, 'K'; out dx, al;
    /// mov al, 0xfe; out 0x64, al; hlt; jmp .-1`
    const HELLO_AND_RESET: &[u8] = &[0x66, 0xba, 0xf8, 0x03, 0xb0, b'O', 0xee, 0xb0, b'K', 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];
    /// `ud2` with an empty IDT: #UD -> #DF -> triple fault.
    const CRASH: &[u8] = &[0x0f, 0x0b];

    fn kvm_available(test: &str) -> bool {
        carapace_test_support::can_run(test, &[carapace_test_support::Need::Kvm])
    }

    fn config(dir: &Path, code: &[u8]) -> VmConfig {
        let kernel = dir.join("kernel.elf");
        std::fs::write(&kernel, tiny_elf(code, 0x20_0000)).unwrap();
        VmConfig {
            kernel,
            initramfs: None,
            cmdline: String::new(),
            vcpus: 1,
            mem_mib: 64,
            serial: SerialOutput::File(dir.join("console.log")),
            vsock: None,
            fs: Vec::new(),
            net: Vec::new(),
            snapshot_to: None,
            restore_from: None,
        }
    }

    #[test]
    fn runs_guest_code_to_an_i8042_reset() {
        if !kvm_available("runs_guest_code_to_an_i8042_reset") {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let mut cfg = config(d.path(), HELLO_AND_RESET);
        cfg.vcpus = 2;
        cfg.vsock = Some(VsockConfig { uds_path: d.path().join("v.sock"), guest_cid: 3 });
        let vmm = Vmm::with_host(&cfg, HostKind::Native).unwrap();
        assert!(vmm.cmdline().contains("virtio_mmio.device=4K@0xd0000000:5"), "{}", vmm.cmdline());
        assert!(d.path().join("v.sock").exists());
        assert_eq!(vmm.run().unwrap(), VmExit::GuestReset);
        assert_eq!(std::fs::read(d.path().join("console.log")).unwrap(), b"OK");
        assert!(!d.path().join("v.sock").exists(), "the vsock socket is removed with the VM");
    }

    #[test]
    fn guest_crash_is_not_a_clean_exit() {
        if !kvm_available("guest_crash_is_not_a_clean_exit") {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let exit = Vmm::with_host(&config(d.path(), CRASH), HostKind::Native).unwrap().run().unwrap();
        // A triple fault with hardware virtualization; kvm_pvm's emulator
        // may give up on the UD2 first.
        assert!(matches!(exit, VmExit::TripleFault { cpu: 0 } | VmExit::KvmError { cpu: 0, .. }), "{exit:?}");
        assert_ne!(exit.exit_code(), 0);
    }

    #[test]
    fn socket_in_use_fails_before_the_vm_and_leaves_it_alone() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("busy.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let mut cfg = config(d.path(), HELLO_AND_RESET);
        cfg.vsock = Some(VsockConfig { uds_path: sock.clone(), guest_cid: 3 });
        let e = Vmm::with_host(&cfg, HostKind::Native).unwrap_err();
        assert!(matches!(e, VmmError::Vsock(_)), "{e}");
        assert!(e.to_string().contains("busy.sock"), "{e}");
        assert!(sock.exists(), "someone else's socket is not removed");
    }

    #[test]
    fn setup_error_after_binding_removes_the_socket() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = config(d.path(), HELLO_AND_RESET);
        cfg.vsock = Some(VsockConfig { uds_path: d.path().join("v.sock"), guest_cid: 3 });
        // An ELF whose code lies beyond RAM: fails after the socket was bound.
        std::fs::write(&cfg.kernel, tiny_elf(HELLO_AND_RESET, 0x1_0000_0000)).unwrap();
        if Vmm::with_host(&cfg, HostKind::Native).is_ok() {
            panic!("kernel beyond RAM accepted");
        }
        assert!(!d.path().join("v.sock").exists());
        assert!(!d.path().join("console.log").exists(), "the console file we created is removed");
    }
}
