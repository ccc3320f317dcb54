//! The virtio-mmio transport (virtio 1.x, "version 2" register layout).
//!
//! [`MmioTransport`] sits in a 4 KiB MMIO window and implements the register
//! file of virtio spec section 4.2.2: identification, feature negotiation,
//! queue setup, notifications, interrupt status and the device status state
//! machine. The device-specific configuration space starts at 0x100.
//!
//! A misbehaving driver never makes it panic: accesses of the wrong width,
//! to unknown registers, or out of the order the spec prescribes are ignored
//! with a warning; a device that fails to activate is flagged with
//! DEVICE_NEEDS_RESET and a configuration-change interrupt.
//!
//! Wiring, for the VMM core (one transport per device):
//!
//! ```ignore
//! let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK)?));
//! vm_fd.register_irqfd(irq.irqfd(), gsi)?;            // KVM delivers the line
//! let dev = Vsock::new(guest_cid, uds_path)?;         // binds the Unix socket
//! let t = MmioTransport::new(mem.clone(), Box::new(dev), irq);
//! // Optional: let QueueNotify skip the exit to user space.
//! for (i, evt) in t.queue_evts().iter().enumerate() {
//!     vm_fd.register_ioevent(evt, &IoEventAddress::Mmio(base + 0x50), i as u32)?;
//! }
//! mmio_bus.insert(Arc::new(Mutex::new(t)), base, MMIO_WINDOW_SIZE);
//! // Guest kernel command line: virtio_mmio.device=4K@<base>:<gsi>
//! ```
//!
//! Feature bits the driver acked are applied to the queues handed to the
//! device (VIRTIO_RING_F_EVENT_IDX in particular), so devices only have to
//! use `enable_notification`/`needs_notification` as usual.

use std::sync::Arc;

use tracing::debug;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{ActiveQueue, Interrupt, VirtioDevice, VIRTIO_MMIO_INT_CONFIG};
use crate::devices::bus::BusDevice;
use crate::snapshot::{QueueSnapshot, TransportState};

/// "virt" in little-endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The register layout version (virtio 1.x).
pub const MMIO_VERSION: u32 = 2;
/// Our vendor ID ("CRPC").
pub const MMIO_VENDOR_ID: u32 = 0x4350_5243;
/// The size of the MMIO window a transport occupies.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Where the device-specific configuration space starts.
pub const MMIO_CONFIG_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;

/// A virtio device on the virtio-mmio transport.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Box<dyn VirtioDevice>,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// The driver wrote feature bits beyond bit 63.
    driver_features_high: bool,
    queue_sel: u32,
    shm_sel: u32,
    status: u32,
    config_generation: u32,
    device_activated: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("queue_sel", &self.queue_sel)
            .field("device_activated", &self.device_activated)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Puts `device` on the transport. `interrupt` is the device's line; its
    /// irqfd must be registered with KVM for the device's GSI.
    pub fn new(mem: GuestMemoryMmap, device: Box<dyn VirtioDevice>, interrupt: Arc<Interrupt>) -> MmioTransport {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &max in device.queue_max_sizes() {
            let q = Queue::new(max).unwrap_or_else(|e| {
                crate::guest_warn!(max, "virtio-mmio: device reports an invalid queue size ({e}); using 256");
                #[allow(clippy::expect_used)]
                Queue::new(256).expect("256 is a valid queue size")
            });
            queues.push(q);
            #[allow(clippy::expect_used)]
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK).expect("cannot create an eventfd"));
        }
        MmioTransport {
            mem,
            device,
            interrupt,
            queues,
            queue_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            driver_features_high: false,
            queue_sel: 0,
            shm_sel: 0,
            status: 0,
            config_generation: 0,
            device_activated: false,
        }
    }

    /// The eventfds signalled on QueueNotify, by queue index. The VMM may
    /// register them with KVM as ioeventfds on `base + 0x50` (datamatch =
    /// queue index) so notifications skip the vCPU exit to user space.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's interrupt line.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The Status register (with DEVICE_NEEDS_RESET if the running device
    /// marked itself broken).
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Whether the device was activated (DRIVER_OK).
    pub fn is_activated(&self) -> bool {
        self.device_activated
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    fn has(&self, bit: u32) -> bool {
        self.status & bit != 0
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// Applies `f` to the selected queue if queue registers may be written now.
    fn with_queue(&mut self, what: &str, f: impl FnOnce(&mut Queue)) {
        if self.has(VIRTIO_CONFIG_S_DRIVER_OK) || self.has(VIRTIO_CONFIG_S_FAILED) {
            crate::guest_warn!(register = what, status = self.status, "virtio-mmio: queue write after DRIVER_OK ignored");
            return;
        }
        match self.queues.get_mut(self.queue_sel as usize) {
            Some(q) => f(q),
            None => crate::guest_warn!(register = what, queue = self.queue_sel, "virtio-mmio: write to a nonexistent queue"),
        }
    }

    /// Like [`with_queue`](Self::with_queue) for the size and ring
    /// addresses, which the driver may only change while the queue is not
    /// ready (virtio 1.2, 4.2.3.2): a queue is configured, then enabled.
    fn with_queue_config(&mut self, what: &str, f: impl FnOnce(&mut Queue)) {
        if self.selected_queue().is_some_and(|q| q.ready()) {
            crate::guest_warn!(register = what, queue = self.queue_sel, "virtio-mmio: write to a ready queue's configuration ignored");
            return;
        }
        self.with_queue(what, f);
    }

    fn read_reg(&self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                let f = self.device.avail_features();
                match self.device_features_sel {
                    0 => u32::try_from(f & 0xffff_ffff).unwrap_or(0),
                    1 => u32::try_from(f >> 32).unwrap_or(0),
                    _ => 0,
                }
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status(),
            // No shared memory regions: a length of all ones says so.
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_SHM_BASE_LOW | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => {
                crate::guest_warn!(offset, "virtio-mmio: read of a write-only or unknown register");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u32, v: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(v),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM => self.with_queue_config("QueueNum", |q| {
                if let Ok(size) = u16::try_from(v) {
                    if q.try_set_size(size).is_ok() {
                        return;
                    }
                }
                crate::guest_warn!(size = v, "virtio-mmio: invalid queue size ignored");
            }),
            VIRTIO_MMIO_QUEUE_READY => self.with_queue("QueueReady", |q| q.set_ready(v == 1)),
            VIRTIO_MMIO_QUEUE_DESC_LOW => self.with_queue_config("QueueDescLow", |q| q.set_desc_table_address(Some(v), None)),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => self.with_queue_config("QueueDescHigh", |q| q.set_desc_table_address(None, Some(v))),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.with_queue_config("QueueDriverLow", |q| q.set_avail_ring_address(Some(v), None)),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.with_queue_config("QueueDriverHigh", |q| q.set_avail_ring_address(None, Some(v))),
            VIRTIO_MMIO_QUEUE_USED_LOW => self.with_queue_config("QueueDeviceLow", |q| q.set_used_ring_address(Some(v), None)),
            VIRTIO_MMIO_QUEUE_USED_HIGH => self.with_queue_config("QueueDeviceHigh", |q| q.set_used_ring_address(None, Some(v))),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(v),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            VIRTIO_MMIO_STATUS => self.set_status(v),
            VIRTIO_MMIO_SHM_SEL => self.shm_sel = v,
            _ => crate::guest_warn!(offset, value = v, "virtio-mmio: write to a read-only or unknown register"),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if !self.has(VIRTIO_CONFIG_S_DRIVER) || self.has(VIRTIO_CONFIG_S_FEATURES_OK) || self.has(VIRTIO_CONFIG_S_FAILED) {
            crate::guest_warn!(status = self.status, "virtio-mmio: DriverFeatures write out of order ignored");
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            sel => {
                if v != 0 {
                    crate::guest_warn!(sel, value = v, "virtio-mmio: driver accepted features beyond bit 63");
                    self.driver_features_high = true;
                }
            }
        }
    }

    fn notify(&mut self, v: u32) {
        if !self.device_activated {
            crate::guest_warn!(queue = v, "virtio-mmio: QueueNotify before DRIVER_OK ignored");
            return;
        }
        // Without VIRTIO_F_NOTIFICATION_DATA the value is the queue index.
        match self.queue_evts.get(v as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    crate::guest_warn!(queue = v, "virtio-mmio: cannot signal queue: {e}");
                }
            }
            None => crate::guest_warn!(queue = v, "virtio-mmio: notify for a nonexistent queue"),
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.avail_features();
        let version_1 = 1u64 << VIRTIO_F_VERSION_1;
        if self.driver_features_high || self.driver_features & !offered != 0 {
            crate::guest_warn!(driver = self.driver_features, offered, "virtio-mmio: driver accepted features the device does not offer");
            return false;
        }
        if offered & version_1 == 0 || self.driver_features & version_1 == 0 {
            crate::guest_warn!(driver = self.driver_features, "virtio-mmio: VIRTIO_F_VERSION_1 not negotiated");
            return false;
        }
        true
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if self.has(VIRTIO_CONFIG_S_FAILED) {
            // The driver gave up on the device: only a reset brings it back.
            crate::guest_warn!(status = self.status, value = v, "virtio-mmio: Status write after FAILED ignored (reset first)");
            return;
        }
        let needs_reset = self.status & VIRTIO_CONFIG_S_NEEDS_RESET;
        let old = self.status & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let new = v & !VIRTIO_CONFIG_S_NEEDS_RESET;
        if new & old != old {
            crate::guest_warn!(old, new, "virtio-mmio: driver cleared status bits without a reset; ignored");
            return;
        }
        let added = new & !old;
        let in_order = |bit: u32, needs: u32| added & bit == 0 || new & needs == needs;
        if !in_order(VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE)
            || !in_order(VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
            || !in_order(VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK)
        {
            crate::guest_warn!(old, new, "virtio-mmio: status bits set out of order; ignored");
            return;
        }
        let mut new = new;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            if self.features_acceptable() {
                self.device.set_acked_features(self.driver_features);
            } else {
                // The driver reads Status back and sees FEATURES_OK unset.
                new &= !VIRTIO_CONFIG_S_FEATURES_OK;
                if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
                    return;
                }
            }
        }
        self.status = new | needs_reset;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !self.has(VIRTIO_CONFIG_S_FAILED) {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.device_activated {
            return;
        }
        let event_idx = self.driver_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut active = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(&self.mem) {
                crate::guest_warn!(queue = i, "virtio-mmio: queue set up with invalid addresses or size");
                return self.needs_reset();
            }
            let notify = match self.queue_evts[i].try_clone() {
                Ok(e) => e,
                Err(e) => {
                    crate::guest_warn!("virtio-mmio: cannot clone a queue eventfd: {e}");
                    return self.needs_reset();
                }
            };
            let mut queue = match Queue::try_from(q.state()) {
                Ok(q) => q,
                Err(e) => {
                    crate::guest_warn!(queue = i, "virtio-mmio: invalid queue state: {e}");
                    return self.needs_reset();
                }
            };
            queue.set_event_idx(event_idx);
            active.push(ActiveQueue { queue, notify });
        }
        match self.device.activate(self.mem.clone(), self.interrupt.clone(), active) {
            Ok(()) => {
                debug!(device = self.device.device_type(), "virtio-mmio: device activated");
                self.device_activated = true;
            }
            Err(e) => {
                crate::guest_warn!(device = self.device.device_type(), "virtio-mmio: activation failed: {e}");
                self.needs_reset();
            }
        }
    }

    /// For a snapshot: stops the device for good and returns the
    /// transport's registers with the queues as the device left them.
    pub fn save(&mut self) -> Result<TransportState, String> {
        let live = if self.device_activated { self.device.quiesce()? } else { None };
        let queues = match live {
            Some(live) => {
                let enabled = self.queues.iter().filter(|q| q.ready()).count();
                if live.len() != enabled {
                    return Err(format!("the device returned {} queues, {enabled} were enabled", live.len()));
                }
                // The device got the ready queues, in order; the driver's
                // configuration is the transport's, the positions the worker's.
                let mut live = live.into_iter();
                self.queues
                    .iter()
                    .map(|q| {
                        let mut snap = QueueSnapshot::from(q.state());
                        if q.ready() {
                            if let Some(l) = live.next() {
                                snap.next_avail = l.next_avail();
                                snap.next_used = l.next_used();
                            }
                        }
                        snap
                    })
                    .collect()
            }
            None => self.queues.iter().map(|q| QueueSnapshot::from(q.state())).collect(),
        };
        Ok(TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            shm_sel: self.shm_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.device_activated,
            queues,
        })
    }

    /// Restores the registers and queues of a snapshot onto this fresh
    /// transport (whose device was built from the new config) and, if the
    /// driver had activated the device, activates it again with them.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), String> {
        if state.device_type != self.device.device_type() {
            let config = self.device.device_type();
            return Err(format!("snapshot device type {}, config device type {config}", state.device_type));
        }
        if state.queues.len() != self.queues.len() {
            return Err(format!("snapshot has {} queues, the device {}", state.queues.len(), self.queues.len()));
        }
        for (i, (q, s)) in self.queues.iter_mut().zip(&state.queues).enumerate() {
            if s.max_size != q.max_size() {
                return Err(format!("queue {i}: snapshot max size {}, device {}", s.max_size, q.max_size()));
            }
            *q = Queue::try_from(QueueState::from(s)).map_err(|e| format!("queue {i}: {e}"))?;
        }
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.shm_sel = state.shm_sel;
        self.config_generation = state.config_generation;
        self.status = state.status & !VIRTIO_CONFIG_S_NEEDS_RESET;
        if self.has(VIRTIO_CONFIG_S_FEATURES_OK) {
            self.device.set_acked_features(self.driver_features);
        }
        self.interrupt.ack(u32::MAX);
        if state.interrupt_status != 0 {
            // The guest had not acknowledged it yet: raise it again (a
            // spurious one is harmless, a lost one would stall the driver).
            self.interrupt.trigger(state.interrupt_status).map_err(|e| format!("cannot raise the interrupt: {e}"))?;
        }
        if state.activated {
            self.device.prepare_restore();
            self.activate();
            if !self.device_activated {
                return Err("the device did not activate with the snapshot's queues".into());
            }
            // Whatever the driver queued just before the snapshot is looked at now.
            for e in &self.queue_evts {
                let _ = e.write(1);
            }
        }
        Ok(())
    }

    /// Flags the device as broken and tells the driver.
    fn needs_reset(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        if self.has(VIRTIO_CONFIG_S_DRIVER_OK) {
            if let Err(e) = self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG) {
                crate::guest_warn!("virtio-mmio: cannot raise the config interrupt: {e}");
            }
        }
    }

    fn reset(&mut self) {
        if self.device_activated {
            if !self.device.reset() {
                crate::guest_warn!(device = self.device.device_type(), "virtio-mmio: device cannot be reset");
                self.status = VIRTIO_CONFIG_S_NEEDS_RESET;
                return;
            }
            self.device_activated = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        for e in &self.queue_evts {
            let _ = e.read();
        }
        self.interrupt.ack(u32::MAX);
        self.interrupt.clear_needs_reset();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_high = false;
        self.queue_sel = 0;
        self.shm_sel = 0;
        self.status = 0;
    }
}

fn config_access_in_window(offset: u64, len: usize) -> bool {
    (offset - MMIO_CONFIG_OFFSET).saturating_add(len as u64) <= MMIO_WINDOW_SIZE - MMIO_CONFIG_OFFSET
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= MMIO_CONFIG_OFFSET {
            if !config_access_in_window(offset, data.len()) {
                crate::guest_warn!(offset, len = data.len(), "virtio-mmio: config read beyond the window");
                data.fill(0);
                return;
            }
            self.device.read_config(offset - MMIO_CONFIG_OFFSET, data);
            return;
        }
        let Ok(reg) = u32::try_from(offset) else { return data.fill(0) };
        if data.len() != 4 || reg % 4 != 0 {
            crate::guest_warn!(offset, len = data.len(), "virtio-mmio: register read must be 32-bit aligned");
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(reg).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= MMIO_CONFIG_OFFSET {
            if !config_access_in_window(offset, data.len()) {
                crate::guest_warn!(offset, len = data.len(), "virtio-mmio: config write beyond the window");
                return;
            }
            self.device.write_config(offset - MMIO_CONFIG_OFFSET, data);
            return;
        }
        let Ok(reg) = u32::try_from(offset) else { return };
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::guest_warn!(offset, len = data.len(), "virtio-mmio: register write must be 32-bit");
            return;
        };
        if reg % 4 != 0 {
            crate::guest_warn!(offset, "virtio-mmio: unaligned register write");
            return;
        }
        self.write_reg(reg, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use crate::devices::virtio::ActivateError;

    #[derive(Default)]
    struct Record {
        acked: Option<u64>,
        activations: Vec<Vec<(u16, bool)>>,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
        /// (next_avail, next_used) of each queue handed over, per activation.
        positions: Vec<Vec<(u16, u16)>>,
        prepared_restore: bool,
    }

    struct DummyDevice {
        features: u64,
        sizes: Vec<u16>,
        fail_activate: bool,
        resettable: bool,
        rec: Arc<Mutex<Record>>,
    }

    impl VirtioDevice for DummyDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn avail_features(&self) -> u64 {
            self.features
        }
        fn set_acked_features(&mut self, features: u64) {
            self.rec.lock().expect("lock").acked = Some(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.rec.lock().expect("lock").config_writes.push((offset, data.to_vec()));
        }
        fn activate(&mut self, _mem: GuestMemoryMmap, _interrupt: Arc<Interrupt>, queues: Vec<ActiveQueue>) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::BadConfig("no".into()));
            }
            let qs = queues.iter().map(|q| (q.queue.size(), q.queue.event_idx_enabled())).collect();
            let pos = queues.iter().map(|q| (q.queue.next_avail(), q.queue.next_used())).collect();
            let mut rec = self.rec.lock().expect("lock");
            rec.activations.push(qs);
            rec.positions.push(pos);
            Ok(())
        }
        /// As if the worker had used 5 buffers of queue 0 and 1 of queue 1.
        fn quiesce(&mut self) -> Result<Option<Vec<Queue>>, String> {
            let rec = self.rec.lock().expect("lock");
            let Some(last) = rec.activations.last() else { return Ok(None) };
            let mut out = Vec::new();
            for (i, (size, _)) in last.iter().enumerate() {
                let mut q = Queue::new(*size).map_err(|e| e.to_string())?;
                let n = if i == 0 { 5 } else { 1 };
                q.set_next_avail(n);
                q.set_next_used(n);
                out.push(q);
            }
            Ok(Some(out))
        }
        fn prepare_restore(&mut self) {
            self.rec.lock().expect("lock").prepared_restore = true;
        }
        fn reset(&mut self) -> bool {
            self.rec.lock().expect("lock").resets += 1;
            self.resettable
        }
    }

    const V1: u64 = 1 << VIRTIO_F_VERSION_1;
    const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    const DRV: u32 = VIRTIO_CONFIG_S_DRIVER;
    const FOK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    const DOK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;

    struct Fixture {
        t: MmioTransport,
        rec: Arc<Mutex<Record>>,
        mem: GuestMemoryMmap,
    }

    fn fixture_with(features: u64, fail_activate: bool, resettable: bool) -> Fixture {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory");
        let rec = Arc::new(Mutex::new(Record::default()));
        let dev = DummyDevice { features, sizes: vec![16, 32], fail_activate, resettable, rec: rec.clone() };
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
        let t = MmioTransport::new(mem.clone(), Box::new(dev), irq);
        Fixture { t, rec, mem }
    }

    fn fixture() -> Fixture {
        fixture_with(V1 | (1 << VIRTIO_RING_F_EVENT_IDX) | 1, false, true)
    }

    fn rd(t: &mut MmioTransport, off: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u32, v: u32) {
        t.write(u64::from(off), &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) -> bool {
        wr(t, VIRTIO_MMIO_STATUS, 0);
        wr(t, VIRTIO_MMIO_STATUS, ACK);
        wr(t, VIRTIO_MMIO_STATUS, ACK | DRV);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        wr(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK);
        rd(t, VIRTIO_MMIO_STATUS) & FOK != 0
    }

    fn setup_queue(t: &mut MmioTransport, mem: &GuestMemoryMmap, index: u32, base: u64, size: u16) {
        let mq = MockSplitQueue::create(mem, GuestAddress(base), size);
        wr(t, VIRTIO_MMIO_QUEUE_SEL, index);
        assert_eq!(rd(t, VIRTIO_MMIO_QUEUE_READY), 0);
        wr(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
        let split = |a: GuestAddress| (a.0 as u32, (a.0 >> 32) as u32);
        let (lo, hi) = split(mq.desc_table_addr());
        wr(t, VIRTIO_MMIO_QUEUE_DESC_LOW, lo);
        wr(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, hi);
        let (lo, hi) = split(mq.avail_addr());
        wr(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, lo);
        wr(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, hi);
        let (lo, hi) = split(mq.used_addr());
        wr(t, VIRTIO_MMIO_QUEUE_USED_LOW, lo);
        wr(t, VIRTIO_MMIO_QUEUE_USED_HIGH, hi);
        wr(t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(rd(t, VIRTIO_MMIO_QUEUE_READY), 1);
    }

    #[test]
    fn identification_registers() {
        let mut f = fixture();
        let t = &mut f.t;
        assert_eq!(rd(t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rd(t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(rd(t, VIRTIO_MMIO_DEVICE_ID), 42);
        assert_eq!(rd(t, VIRTIO_MMIO_VENDOR_ID), MMIO_VENDOR_ID);
        assert_eq!(rd(t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(rd(t, VIRTIO_MMIO_CONFIG_GENERATION), 0);
        assert_eq!(rd(t, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
        // Device features, both words.
        wr(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(t, VIRTIO_MMIO_DEVICE_FEATURES), (1 << VIRTIO_RING_F_EVENT_IDX) | 1);
        wr(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
        wr(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
        assert_eq!(rd(t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
        // Queue sizes, and a queue that does not exist.
        wr(t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(rd(t, VIRTIO_MMIO_QUEUE_NUM_MAX), 32);
        wr(t, VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(rd(t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        assert_eq!(rd(t, VIRTIO_MMIO_QUEUE_READY), 0);
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let mut f = fixture();
        let t = &mut f.t;
        // Wrong widths and alignment.
        let mut b2 = [0xffu8; 2];
        t.read(0, &mut b2);
        assert_eq!(b2, [0, 0]);
        let mut b4 = [0xffu8; 4];
        t.read(2, &mut b4);
        assert_eq!(b4, [0; 4]);
        t.write(u64::from(VIRTIO_MMIO_STATUS), &[1]);
        assert_eq!(rd(t, VIRTIO_MMIO_STATUS), 0);
        t.write(u64::from(VIRTIO_MMIO_STATUS) + 1, &1u32.to_le_bytes());
        assert_eq!(rd(t, VIRTIO_MMIO_STATUS), 0);
        // Read-only and write-only registers, unknown offsets.
        wr(t, VIRTIO_MMIO_MAGIC_VALUE, 0);
        assert_eq!(rd(t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert_eq!(rd(t, VIRTIO_MMIO_QUEUE_NOTIFY), 0);
        assert_eq!(rd(t, 0xf0), 0);
        wr(t, 0xf0, 1);
        // Past the window, and huge offsets.
        let mut b8 = [0xffu8; 8];
        t.read(0xffc, &mut b8);
        assert_eq!(b8, [0; 8]);
        t.read(u64::MAX - 3, &mut b4);
        t.write(u64::MAX - 3, &b4);
        // Notify before activation, for a queue that doesn't exist.
        wr(t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        wr(t, VIRTIO_MMIO_QUEUE_NOTIFY, 99);
        assert!(t.queue_evts()[0].read().is_err());
        // Queue registers of a nonexistent queue.
        wr(t, VIRTIO_MMIO_QUEUE_SEL, 9);
        wr(t, VIRTIO_MMIO_QUEUE_NUM, 8);
        wr(t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(rd(t, VIRTIO_MMIO_QUEUE_READY), 0);
    }

    #[test]
    fn feature_negotiation() {
        let mut f = fixture();
        assert!(negotiate(&mut f.t, V1 | 1));
        assert_eq!(f.rec.lock().expect("lock").acked, Some(V1 | 1));

        // A feature the device does not offer.
        let mut f = fixture();
        assert!(!negotiate(&mut f.t, V1 | 2));
        assert_eq!(f.rec.lock().expect("lock").acked, None);
        assert_eq!(rd(&mut f.t, VIRTIO_MMIO_STATUS), ACK | DRV);
        // DRIVER_OK without FEATURES_OK is refused.
        wr(&mut f.t, VIRTIO_MMIO_STATUS, ACK | DRV | DOK);
        assert_eq!(rd(&mut f.t, VIRTIO_MMIO_STATUS), ACK | DRV);
        assert!(!f.t.is_activated());

        // A legacy driver (no VERSION_1).
        let mut f = fixture();
        assert!(!negotiate(&mut f.t, 1));

        // Features beyond bit 63.
        let mut f = fixture();
        wr(&mut f.t, VIRTIO_MMIO_STATUS, ACK);
        wr(&mut f.t, VIRTIO_MMIO_STATUS, ACK | DRV);
        wr(&mut f.t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(&mut f.t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(&mut f.t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 2);
        wr(&mut f.t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(&mut f.t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK);
        assert_eq!(rd(&mut f.t, VIRTIO_MMIO_STATUS) & FOK, 0);

        // A device that does not offer VERSION_1 can't be negotiated.
        let mut f = fixture_with(1, false, true);
        assert!(!negotiate(&mut f.t, 1));

        // Feature writes after FEATURES_OK are ignored.
        let mut f = fixture();
        assert!(negotiate(&mut f.t, V1));
        wr(&mut f.t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        wr(&mut f.t, VIRTIO_MMIO_DRIVER_FEATURES, 2);
        assert_eq!(f.t.driver_features, V1);
    }

    #[test]
    fn status_order_enforced() {
        let mut f = fixture();
        let t = &mut f.t;
        // DRIVER before ACKNOWLEDGE.
        wr(t, VIRTIO_MMIO_STATUS, DRV);
        assert_eq!(rd(t, VIRTIO_MMIO_STATUS), 0);
        // FEATURES_OK before DRIVER.
        wr(t, VIRTIO_MMIO_STATUS, ACK);
        wr(t, VIRTIO_MMIO_STATUS, ACK | FOK);
        assert_eq!(rd(t, VIRTIO_MMIO_STATUS), ACK);
        // Features written before DRIVER are ignored.
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        assert_eq!(t.driver_features, 0);
        // Clearing bits without a reset.
        wr(t, VIRTIO_MMIO_STATUS, ACK | DRV);
        wr(t, VIRTIO_MMIO_STATUS, ACK);
        assert_eq!(rd(t, VIRTIO_MMIO_STATUS), ACK | DRV);
        // The driver can't set NEEDS_RESET; FAILED is accepted.
        wr(t, VIRTIO_MMIO_STATUS, ACK | DRV | VIRTIO_CONFIG_S_NEEDS_RESET);
        assert_eq!(rd(t, VIRTIO_MMIO_STATUS), ACK | DRV);
        wr(t, VIRTIO_MMIO_STATUS, ACK | DRV | VIRTIO_CONFIG_S_FAILED);
        assert_eq!(rd(t, VIRTIO_MMIO_STATUS), ACK | DRV | VIRTIO_CONFIG_S_FAILED);
    }

    #[test]
    fn queue_setup_and_activation() {
        let mut f = fixture();
        let mem = f.mem.clone();
        let t = &mut f.t;
        assert!(negotiate(t, V1 | (1 << VIRTIO_RING_F_EVENT_IDX)));
        setup_queue(t, &mem, 0, 0x1000, 16);
        // Invalid sizes are ignored (not a power of 2, above the maximum).
        wr(t, VIRTIO_MMIO_QUEUE_SEL, 1);
        wr(t, VIRTIO_MMIO_QUEUE_NUM, 12);
        wr(t, VIRTIO_MMIO_QUEUE_NUM, 64);
        assert_eq!(t.queues[1].size(), 32);
        setup_queue(t, &mem, 1, 0x4000, 8);
        assert_eq!(t.queues[1].desc_table(), 0x4000);

        wr(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert!(t.is_activated());
        assert_eq!(rd(t, VIRTIO_MMIO_STATUS), ACK | DRV | FOK | DOK);
        assert_eq!(f.rec.lock().expect("lock").activations, vec![vec![(16, true), (8, true)]]);

        // Queue registers are frozen now.
        wr(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        wr(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x8000);
        assert_eq!(t.queues[0].desc_table(), 0x1000);

        // QueueNotify signals the queue's eventfd.
        wr(t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_evts()[1].read().expect("notified"), 1);
        assert!(t.queue_evts()[0].read().is_err());

        // Interrupt status and ack.
        t.interrupt().trigger(super::super::VIRTIO_MMIO_INT_VRING).expect("trigger");
        assert_eq!(rd(t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        wr(t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(rd(t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        // Writing DRIVER_OK again doesn't activate twice.
        wr(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert_eq!(f.rec.lock().expect("lock").activations.len(), 1);
    }

    #[test]
    fn config_space_forwarded() {
        let mut f = fixture();
        let mut b = [0u8; 3];
        f.t.read(0x104, &mut b);
        assert_eq!(b, [4, 5, 6]);
        f.t.write(0x102, &[9, 9]);
        assert_eq!(f.rec.lock().expect("lock").config_writes, vec![(2, vec![9, 9])]);
    }

    #[test]
    fn activation_failures_need_reset() {
        // The device refuses.
        let mut f = fixture_with(V1, true, true);
        let mem = f.mem.clone();
        assert!(negotiate(&mut f.t, V1));
        setup_queue(&mut f.t, &mem, 0, 0x1000, 16);
        wr(&mut f.t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert!(!f.t.is_activated());
        assert_ne!(rd(&mut f.t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(rd(&mut f.t, VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_CONFIG);
        // Reset clears it all.
        wr(&mut f.t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(rd(&mut f.t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(rd(&mut f.t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        // A ready queue outside guest memory.
        let mut f = fixture();
        assert!(negotiate(&mut f.t, V1));
        wr(&mut f.t, VIRTIO_MMIO_QUEUE_SEL, 0);
        wr(&mut f.t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x10);
        wr(&mut f.t, VIRTIO_MMIO_QUEUE_READY, 1);
        wr(&mut f.t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert!(!f.t.is_activated());
        assert!(f.rec.lock().expect("lock").activations.is_empty());
        assert_ne!(rd(&mut f.t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn reset_and_reinit() {
        let mut f = fixture();
        let mem = f.mem.clone();
        assert!(negotiate(&mut f.t, V1));
        setup_queue(&mut f.t, &mem, 0, 0x1000, 16);
        wr(&mut f.t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert!(f.t.is_activated());
        wr(&mut f.t, VIRTIO_MMIO_STATUS, 0);
        assert!(!f.t.is_activated());
        assert_eq!(rd(&mut f.t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(f.rec.lock().expect("lock").resets, 1);
        wr(&mut f.t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(rd(&mut f.t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(f.t.queues[0].size(), 16);
        // Again, from scratch.
        assert!(negotiate(&mut f.t, V1));
        setup_queue(&mut f.t, &mem, 0, 0x1000, 16);
        wr(&mut f.t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert!(f.t.is_activated());
        assert_eq!(f.rec.lock().expect("lock").activations.len(), 2);

        // A device that can't reset: NEEDS_RESET, stays active.
        let mut f = fixture_with(V1, false, false);
        assert!(negotiate(&mut f.t, V1));
        let mem = mem_of(&f);
        setup_queue(&mut f.t, &mem, 0, 0x1000, 16);
        wr(&mut f.t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        wr(&mut f.t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(rd(&mut f.t, VIRTIO_MMIO_STATUS), VIRTIO_CONFIG_S_NEEDS_RESET);
        assert!(f.t.is_activated());
    }

    /// Random register traffic (a poor man's fuzzer): nothing panics and the
    /// transport still works afterwards.
    #[test]
    fn random_accesses_never_panic() {
        let mut f = fixture();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200_000 {
            let r = next();
            let offset = match r % 4 {
                0 => r >> 40,
                1 => (r >> 8) % 0x1000,
                _ => ((r >> 8) % 0x40) * 4,
            };
            let len = [1usize, 2, 4, 8, 3][(r >> 32) as usize % 5];
            let val = next();
            let mut buf = [0u8; 8];
            if r & 0x10 == 0 {
                f.t.read(offset, &mut buf[..len]);
            } else {
                buf.copy_from_slice(&val.to_le_bytes());
                // Drive Status more often: that's where the state machine lives.
                let off = if r & 0x20 == 0 { u64::from(VIRTIO_MMIO_STATUS) } else { offset };
                f.t.write(off, &buf[..len]);
            }
        }
        wr(&mut f.t, VIRTIO_MMIO_STATUS, 0);
        let mem = f.mem.clone();
        assert!(negotiate(&mut f.t, V1));
        setup_queue(&mut f.t, &mem, 0, 0x1000, 16);
        wr(&mut f.t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert_eq!(rd(&mut f.t, VIRTIO_MMIO_STATUS) & DOK, DOK);
    }

    /// Hostile orderings of the queue registers: a queue enabled before it
    /// is configured, reconfigured while ready, sizes out of range, and
    /// selectors that name no queue. Nothing panics, a ready queue's
    /// configuration is frozen, and the device only ever sees queues that
    /// lie in guest memory.
    #[test]
    fn hostile_queue_register_sequences() {
        let mut f = fixture();
        let mem = f.mem.clone();
        let t = &mut f.t;
        assert!(negotiate(t, V1));
        // QueueReady first: the queue keeps its reset values (size = max,
        // rings at 0), which do lie in guest memory.
        wr(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        wr(t, VIRTIO_MMIO_QUEUE_READY, 1);
        // Sizes and addresses written afterwards are ignored.
        wr(t, VIRTIO_MMIO_QUEUE_NUM, 8);
        wr(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x8000);
        wr(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0xffff_ffff);
        wr(t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x9000);
        assert_eq!((t.queues[0].size(), t.queues[0].desc_table(), t.queues[0].used_ring()), (16, 0, 0));
        // QueueReady = 0 unfreezes it; then a proper setup works.
        wr(t, VIRTIO_MMIO_QUEUE_READY, 0);
        setup_queue(t, &mem, 0, 0x1000, 16);
        // Sizes: zero, not a power of two, above the maximum, above u16.
        wr(t, VIRTIO_MMIO_QUEUE_SEL, 1);
        for size in [0, 3, 33, 64, 0x1_0000, u32::MAX] {
            wr(t, VIRTIO_MMIO_QUEUE_NUM, size);
            assert_eq!(t.queues[1].size(), 32, "size {size}");
        }
        // Selectors naming no queue: reads are 0, writes go nowhere.
        for sel in [2, 0x8000, u32::MAX] {
            wr(t, VIRTIO_MMIO_QUEUE_SEL, sel);
            assert_eq!(rd(t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
            wr(t, VIRTIO_MMIO_QUEUE_NUM, 4);
            wr(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x2000);
            wr(t, VIRTIO_MMIO_QUEUE_READY, 1);
            assert_eq!(rd(t, VIRTIO_MMIO_QUEUE_READY), 0);
        }
        // Notifications for nonexistent queues once running.
        wr(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert!(t.is_activated());
        for q in [2, 0x1_0000, u32::MAX] {
            wr(t, VIRTIO_MMIO_QUEUE_NOTIFY, q);
        }
        assert_eq!(f.rec.lock().expect("lock").activations, vec![vec![(16, false)]]);
    }

    /// Status writes out of order or after the driver gave up.
    #[test]
    fn status_after_failed_needs_a_reset() {
        let mut f = fixture();
        let mem = f.mem.clone();
        let t = &mut f.t;
        assert!(negotiate(t, V1));
        setup_queue(t, &mem, 0, 0x1000, 16);
        wr(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | VIRTIO_CONFIG_S_FAILED);
        // Neither DRIVER_OK nor feature writes are taken any more.
        wr(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | VIRTIO_CONFIG_S_FAILED | DOK);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES, 0);
        assert!(!t.is_activated());
        assert_eq!(rd(t, VIRTIO_MMIO_STATUS), ACK | DRV | FOK | VIRTIO_CONFIG_S_FAILED);
        assert!(f.rec.lock().expect("lock").activations.is_empty());
        // DRIVER_OK without FEATURES_OK, and FEATURES_OK with DRIVER_OK in
        // one write for features the device does not offer.
        let t = &mut f.t;
        wr(t, VIRTIO_MMIO_STATUS, 0);
        wr(t, VIRTIO_MMIO_STATUS, ACK | DRV | DOK);
        assert_eq!(rd(t, VIRTIO_MMIO_STATUS), 0);
        wr(t, VIRTIO_MMIO_STATUS, ACK | DRV);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES, 0x8000_0001);
        wr(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert_eq!(rd(t, VIRTIO_MMIO_STATUS), ACK | DRV);
        assert!(!t.is_activated());
        // After a reset all is well again.
        assert!(negotiate(t, V1));
        setup_queue(t, &mem, 0, 0x1000, 16);
        wr(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert!(t.is_activated());
    }

    /// A running device that finds its queues corrupt marks itself broken
    /// through its interrupt line: the driver sees DEVICE_NEEDS_RESET and a
    /// configuration interrupt until it resets the device.
    #[test]
    fn device_marks_itself_broken() {
        let mut f = fixture();
        let mem = f.mem.clone();
        assert!(negotiate(&mut f.t, V1));
        setup_queue(&mut f.t, &mem, 0, 0x1000, 16);
        wr(&mut f.t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert!(f.t.is_activated());
        let irq = f.t.interrupt().clone();
        irq.set_needs_reset();
        irq.set_needs_reset();
        assert_eq!(rd(&mut f.t, VIRTIO_MMIO_STATUS), ACK | DRV | FOK | DOK | VIRTIO_CONFIG_S_NEEDS_RESET);
        assert_eq!(rd(&mut f.t, VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.irqfd().read().expect("config interrupt"), 1, "raised once");
        // The driver can't clear it by writing Status...
        wr(&mut f.t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert_ne!(rd(&mut f.t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        // ...only a reset does.
        wr(&mut f.t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(rd(&mut f.t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(f.rec.lock().expect("lock").resets, 1);
        assert!(negotiate(&mut f.t, V1));
        setup_queue(&mut f.t, &mem, 0, 0x1000, 16);
        wr(&mut f.t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert_eq!(rd(&mut f.t, VIRTIO_MMIO_STATUS), ACK | DRV | FOK | DOK);
    }

    fn mem_of(f: &Fixture) -> GuestMemoryMmap {
        f.mem.clone()
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn save_and_restore_carry_registers_and_live_queue_positions() {
        let mut f = fixture();
        let features = V1 | (1 << VIRTIO_RING_F_EVENT_IDX);
        assert!(negotiate(&mut f.t, features));
        setup_queue(&mut f.t, &f.mem, 0, 0x1000, 16);
        setup_queue(&mut f.t, &f.mem, 1, 0x4000, 8);
        wr(&mut f.t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert!(f.t.is_activated());
        f.t.interrupt().trigger(1).unwrap();
        let state = f.t.save().unwrap();
        assert!(state.activated);
        assert_eq!(state.driver_features, features);
        assert_eq!(state.interrupt_status, 1);
        assert_eq!((state.queues[0].next_avail, state.queues[1].next_used), (5, 1), "the worker's positions");
        assert_eq!((state.queues[0].size, state.queues[1].size), (16, 8));
        assert!(state.queues.iter().all(|q| q.ready));

        // A fresh transport and device (the new config's backend) take it.
        let mut g = fixture();
        g.t.restore(&state).unwrap();
        assert!(g.t.is_activated());
        assert_eq!(rd(&mut g.t, VIRTIO_MMIO_STATUS), ACK | DRV | FOK | DOK);
        assert_eq!(rd(&mut g.t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        let rec = g.rec.lock().unwrap();
        assert!(rec.prepared_restore);
        assert_eq!(rec.acked, Some(features));
        assert_eq!(rec.activations, vec![vec![(16, true), (8, true)]]);
        assert_eq!(rec.positions, vec![vec![(5, 5), (1, 1)]]);
        drop(rec);
        // The restored queues cannot be reconfigured behind the driver's back.
        wr(&mut g.t, VIRTIO_MMIO_QUEUE_SEL, 0);
        wr(&mut g.t, VIRTIO_MMIO_QUEUE_NUM, 4);
        assert_eq!(g.t.save().unwrap().queues[0].size, 16);

        // A device that was never activated restores inactive.
        let mut h = fixture();
        assert!(negotiate(&mut h.t, features));
        let idle = h.t.save().unwrap();
        assert!(!idle.activated);
        let mut i = fixture();
        i.t.restore(&idle).unwrap();
        assert!(!i.t.is_activated());
        assert_eq!(rd(&mut i.t, VIRTIO_MMIO_STATUS), ACK | DRV | FOK);

        // Another shape of queue is refused.
        let mut bad = state.clone();
        bad.queues[0].max_size = 64;
        let e = fixture().t.restore(&bad).unwrap_err();
        assert!(e.contains("queue 0") && e.contains("max size"), "{e}");
        let mut bad = state;
        bad.device_type = 19;
        assert!(fixture().t.restore(&bad).unwrap_err().contains("device type 19"));
    }
}
