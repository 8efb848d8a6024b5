//! MSI-X: the capability, the vector table and the pending-bit array of one function, and the
//! [`MsiRouting`] trait through which the VMM learns which messages to route (KVM GSI routes
//! plus irqfds) and when to fire them.
//!
//! The guest programs the table through a BAR and the enable / function-mask bits through the
//! capability's message control in configuration space. The device owns an [`MsixState`],
//! forwards table/PBA accesses to it, calls [`MsixState::set_message_control`] after each
//! configuration write, and raises vectors with [`MsixState::trigger`]. A vector that fires
//! while masked sets its pending bit and is delivered when it is unmasked.

use std::sync::Arc;

/// Entries in an MSI-X table are 16 bytes.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// Most vectors a function may have.
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// Length of the MSI-X capability body (after the ID and next-pointer bytes).
pub const MSIX_CAP_BODY_LEN: usize = 10;
/// Message control: function mask.
pub const MSIX_CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// Message control: MSI-X enable.
pub const MSIX_CTRL_ENABLE: u16 = 1 << 15;
/// Vector control: the entry is masked.
pub const MSIX_VECTOR_MASKED: u32 = 1;

/// An MSI message: a DMA write of `data` to `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MsiMessage {
    /// Message address (on x86, 0xfee0_0000 | destination, ...).
    pub addr: u64,
    /// Message data (vector, delivery mode, trigger mode).
    pub data: u32,
}

/// What the VMM provides to deliver a function's MSI-X vectors, typically one KVM GSI route
/// and one irqfd per vector.
///
/// Contract: [`MsixState`] calls `trigger(v)` only after `update(v, Some(_))` and before any
/// later `update(v, None)`; masking, the function mask, the enable bit and pending bits are
/// handled on the device side. Calls come from vCPU threads (guest table and config writes)
/// and from device worker threads (interrupts), with the device's MSI-X lock held: an
/// implementation must not lock the PCI root or the device.
pub trait MsiRouting: Send + Sync {
    /// Vector `vector` now delivers `msg` (`Some`), or cannot be delivered (`None`: masked, or
    /// MSI-X disabled). Called only when this changes.
    fn update(&self, vector: u16, msg: Option<MsiMessage>);
    /// Delivers vector `vector` now.
    fn trigger(&self, vector: u16) -> std::io::Result<()>;
}

/// The MSI-X state of one function.
pub struct MsixState {
    /// Per entry: address low, address high, data, vector control.
    table: Vec<[u32; 4]>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    /// What was last reported to `routing` per vector.
    routed: Vec<Option<MsiMessage>>,
    routing: Arc<dyn MsiRouting>,
}

impl MsixState {
    /// `num_vectors` vectors (clamped to 1..=2048), all masked, MSI-X disabled.
    pub fn new(num_vectors: u16, routing: Arc<dyn MsiRouting>) -> Self {
        let n = usize::from(num_vectors.clamp(1, MSIX_MAX_VECTORS));
        MsixState {
            table: vec![[0, 0, 0, MSIX_VECTOR_MASKED]; n],
            pba: vec![0; n.div_ceil(64)],
            enabled: false,
            function_masked: false,
            routed: vec![None; n],
            routing,
        }
    }

    /// Number of vectors.
    pub fn num_vectors(&self) -> u16 {
        self.table.len() as u16
    }

    /// Size of the table in bytes.
    pub fn table_size(&self) -> u64 {
        self.table.len() as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    /// Size of the pending-bit array in bytes.
    pub fn pba_size(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    /// The capability body and its write mask for [`add_capability`]: the table at
    /// `table_offset` of BAR `table_bar`, the PBA at `pba_offset` of BAR `pba_bar` (offsets
    /// 8-byte aligned).
    ///
    /// [`add_capability`]: super::PciConfiguration::add_capability
    pub fn capability(
        &self,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> ([u8; MSIX_CAP_BODY_LEN], [u8; MSIX_CAP_BODY_LEN]) {
        let mut body = [0u8; MSIX_CAP_BODY_LEN];
        let ctrl = self.num_vectors() - 1;
        body[0..2].copy_from_slice(&ctrl.to_le_bytes());
        body[2..6].copy_from_slice(&((table_offset & !7) | u32::from(table_bar & 7)).to_le_bytes());
        body[6..10].copy_from_slice(&((pba_offset & !7) | u32::from(pba_bar & 7)).to_le_bytes());
        let mut wmask = [0u8; MSIX_CAP_BODY_LEN];
        wmask[0..2].copy_from_slice(&(MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK).to_le_bytes());
        (body, wmask)
    }

    /// Whether the guest enabled MSI-X.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the guest masked the whole function.
    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// Whether vector `vector` is pending.
    pub fn is_pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        self.pba
            .get(v / 64)
            .is_some_and(|w| w & (1 << (v % 64)) != 0)
    }

    fn set_pending(&mut self, v: usize, on: bool) {
        if let Some(w) = self.pba.get_mut(v / 64) {
            if on {
                *w |= 1 << (v % 64);
            } else {
                *w &= !(1 << (v % 64));
            }
        }
    }

    /// The message control register as the guest left it in configuration space (call after
    /// every configuration write that may touch it).
    pub fn set_message_control(&mut self, ctrl: u16) {
        let enabled = ctrl & MSIX_CTRL_ENABLE != 0;
        let masked = ctrl & MSIX_CTRL_FUNCTION_MASK != 0;
        if (enabled, masked) == (self.enabled, self.function_masked) {
            return;
        }
        if enabled != self.enabled {
            tracing::debug!("msix: {}", if enabled { "enabled" } else { "disabled" });
        }
        self.enabled = enabled;
        self.function_masked = masked;
        for v in 0..self.table.len() {
            self.refresh(v);
        }
    }

    fn deliverable(&self, v: usize) -> Option<MsiMessage> {
        let e = self.table.get(v)?;
        (self.enabled && !self.function_masked && e[3] & MSIX_VECTOR_MASKED == 0).then_some(
            MsiMessage {
                addr: u64::from(e[0]) | (u64::from(e[1]) << 32),
                data: e[2],
            },
        )
    }

    /// Reports a change of vector `v`'s routing and delivers it if it became deliverable with
    /// its pending bit set.
    fn refresh(&mut self, v: usize) {
        let want = self.deliverable(v);
        if want != self.routed[v] {
            self.routing.update(v as u16, want);
            self.routed[v] = want;
        }
        if want.is_some() && self.is_pending(v as u16) {
            self.set_pending(v, false);
            if let Err(e) = self.routing.trigger(v as u16) {
                ratelimit::warn_limited!("msix: cannot deliver pending vector {v}: {e}");
            }
        }
    }

    /// A guest read of the table at `offset` (any size; outside the table reads zeros).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| {
                    let e = self.table.get(usize::try_from(o / 16).ok()?)?;
                    Some(e[(o % 16 / 4) as usize].to_le_bytes()[(o % 4) as usize])
                })
                .unwrap_or(0);
        }
    }

    /// A guest write of the table at `offset` (any size; outside the table is ignored).
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let mut touched: Vec<usize> = Vec::new();
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i as u64) else {
                break;
            };
            let Some(v) = usize::try_from(o / 16)
                .ok()
                .filter(|&v| v < self.table.len())
            else {
                continue;
            };
            let word = (o % 16 / 4) as usize;
            let shift = 8 * (o % 4);
            let mut mask = 0xffu32 << shift;
            if word == 3 {
                // Vector control: only the mask bit is writable.
                mask &= MSIX_VECTOR_MASKED;
            }
            let w = &mut self.table[v][word];
            *w = (*w & !mask) | ((u32::from(b) << shift) & mask);
            if !touched.contains(&v) {
                touched.push(v);
            }
        }
        for v in touched {
            self.refresh(v);
        }
    }

    /// A guest read of the pending-bit array at `offset`.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| {
                    let w = self.pba.get(usize::try_from(o / 8).ok()?)?;
                    Some(w.to_le_bytes()[(o % 8) as usize])
                })
                .unwrap_or(0);
        }
    }

    /// A guest write of the pending-bit array: read-only, ignored.
    pub fn pba_write(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "msix: ignoring {}-byte write to the PBA at {offset:#x}",
            data.len()
        );
    }

    /// The device raises vector `vector`: delivered now, or left pending while masked.
    /// Returns false (and does nothing) when MSI-X is disabled or the vector does not exist,
    /// so the caller may fall back to INTx.
    pub fn trigger(&mut self, vector: u16) -> std::io::Result<bool> {
        let v = usize::from(vector);
        if !self.enabled || v >= self.table.len() {
            return Ok(false);
        }
        if self.routed[v].is_some() {
            self.routing.trigger(vector)?;
        } else {
            self.set_pending(v, true);
        }
        Ok(true)
    }

    /// The pending-bit array (bit `v % 64` of word `v / 64` is vector `v`), for a snapshot.
    pub fn pending_bits(&self) -> Vec<u64> {
        self.pba.clone()
    }

    /// Puts saved pending bits back (after the table and the message control): a vector that
    /// can be delivered now is, the others stay pending.
    pub fn restore_pending(&mut self, bits: &[u64]) {
        for v in 0..self.table.len() {
            if bits.get(v / 64).is_some_and(|w| w & (1 << (v % 64)) != 0) {
                self.set_pending(v, true);
                self.refresh(v);
            }
        }
    }

    /// Function-level reset: every vector masked and cleared, MSI-X disabled, nothing pending.
    pub fn reset(&mut self) {
        for e in &mut self.table {
            *e = [0, 0, 0, MSIX_VECTOR_MASKED];
        }
        self.pba.fill(0);
        self.enabled = false;
        self.function_masked = false;
        for v in 0..self.table.len() {
            self.refresh(v);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// What an [`MsiRouting`] saw.
    #[derive(Debug, PartialEq, Eq, Clone)]
    pub(crate) enum Call {
        Update(u16, Option<MsiMessage>),
        Trigger(u16),
    }

    #[derive(Default)]
    pub(crate) struct Recorder(pub Mutex<Vec<Call>>);

    impl Recorder {
        pub(crate) fn take(&self) -> Vec<Call> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    impl MsiRouting for Recorder {
        fn update(&self, vector: u16, msg: Option<MsiMessage>) {
            self.0.lock().unwrap().push(Call::Update(vector, msg));
        }
        fn trigger(&self, vector: u16) -> std::io::Result<()> {
            self.0.lock().unwrap().push(Call::Trigger(vector));
            Ok(())
        }
    }

    fn program(m: &mut MsixState, v: u64, addr: u64, data: u32) {
        // Linux writes address low/high and data as dwords, then the vector control.
        m.table_write(v * 16, &(addr as u32).to_le_bytes());
        m.table_write(v * 16 + 4, &((addr >> 32) as u32).to_le_bytes());
        m.table_write(v * 16 + 8, &data.to_le_bytes());
    }

    /// A vector raised while masked is pending in a snapshot; restored into a function whose
    /// table has it unmasked, it is delivered; still masked, it stays pending.
    #[test]
    fn pending_bits_survive_a_restore() {
        let rec = Arc::new(Recorder::default());
        let mut m = MsixState::new(4, rec.clone());
        program(&mut m, 2, 0xfee0_0000, 0x41);
        m.set_message_control(MSIX_CTRL_ENABLE);
        // Masked (the reset state): the trigger is left pending.
        assert!(m.trigger(2).unwrap());
        assert!(m.is_pending(2));
        let bits = m.pending_bits();
        let mut table = vec![0u8; m.table_size() as usize];
        m.table_read(0, &mut table);

        let rec2 = Arc::new(Recorder::default());
        let mut still_masked = MsixState::new(4, rec2.clone());
        still_masked.table_write(0, &table);
        still_masked.set_message_control(MSIX_CTRL_ENABLE);
        still_masked.restore_pending(&bits);
        assert!(still_masked.is_pending(2));
        assert!(!rec2.take().contains(&Call::Trigger(2)));

        table[2 * 16 + 12] = 0; // unmask vector 2
        let rec3 = Arc::new(Recorder::default());
        let mut unmasked = MsixState::new(4, rec3.clone());
        unmasked.table_write(0, &table);
        unmasked.set_message_control(MSIX_CTRL_ENABLE);
        unmasked.restore_pending(&bits);
        assert!(!unmasked.is_pending(2));
        assert!(rec3.take().contains(&Call::Trigger(2)));
    }

    #[test]
    fn capability_layout() {
        let rec = Arc::new(Recorder::default());
        let m = MsixState::new(3, rec);
        let (body, wmask) = m.capability(0, 0x4000, 2, 0x5008);
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 2);
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x4000);
        assert_eq!(
            u32::from_le_bytes(body[6..10].try_into().unwrap()),
            0x5008 | 2
        );
        assert_eq!(&wmask[..2], &[0, 0xc0]);
        assert_eq!((m.table_size(), m.pba_size()), (48, 8));
        assert_eq!(
            MsixState::new(0, Arc::new(Recorder::default())).num_vectors(),
            1
        );
        assert_eq!(
            MsixState::new(u16::MAX, Arc::new(Recorder::default())).num_vectors(),
            2048
        );
    }

    #[test]
    fn table_writes_update_routes() {
        let rec = Arc::new(Recorder::default());
        let mut m = MsixState::new(2, rec.clone());
        // Reset state: all entries masked.
        let mut d = [0u8; 4];
        m.table_read(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
        program(&mut m, 0, 0xfee0_1000, 0x4041);
        // Masked and MSI-X disabled: nothing routed.
        assert!(rec.take().is_empty());
        m.set_message_control(MSIX_CTRL_ENABLE);
        assert!(rec.take().is_empty());
        // Unmask entry 0: a route appears.
        m.table_write(12, &0u32.to_le_bytes());
        let msg = MsiMessage {
            addr: 0xfee0_1000,
            data: 0x4041,
        };
        assert_eq!(rec.take(), vec![Call::Update(0, Some(msg))]);
        // Reserved vector-control bits are read-only; a qword read returns data + control.
        m.table_write(12, &0xffff_fffeu32.to_le_bytes());
        let mut q = [0u8; 8];
        m.table_read(8, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x4041);
        assert!(rec.take().is_empty());
        // Changing data while unmasked re-routes.
        m.table_write(8, &0x4042u32.to_le_bytes());
        assert_eq!(
            rec.take(),
            vec![Call::Update(
                0,
                Some(MsiMessage {
                    addr: 0xfee0_1000,
                    data: 0x4042
                })
            )]
        );
        // Function mask, then MSI-X disable: the route goes away once.
        m.set_message_control(MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK);
        assert_eq!(rec.take(), vec![Call::Update(0, None)]);
        m.set_message_control(0);
        assert!(rec.take().is_empty());
        // Out-of-range table accesses are ignored / read zero.
        m.table_write(32, &[0xff; 8]);
        m.table_write(u64::MAX - 2, &[0xff; 8]);
        m.table_read(u64::MAX - 2, &mut q);
        assert_eq!(q, [0; 8]);
        assert!(rec.take().is_empty());
    }

    #[test]
    fn masked_vector_pends_and_delivers_on_unmask() {
        let rec = Arc::new(Recorder::default());
        let mut m = MsixState::new(70, rec.clone());
        // Disabled: not taken (INTx fallback is the caller's business).
        assert!(!m.trigger(0).unwrap());
        m.set_message_control(MSIX_CTRL_ENABLE);
        program(&mut m, 65, 0xfee0_0000, 0x30);
        // Masked entry: pending bit set, nothing delivered.
        assert!(m.trigger(65).unwrap());
        assert!(m.is_pending(65));
        let mut pba = [0u8; 16];
        m.pba_read(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba[8..].try_into().unwrap()), 1 << 1);
        m.pba_write(8, &[0; 8]);
        assert!(m.is_pending(65));
        assert!(rec.take().is_empty());
        // Unmask: routed, then the pending vector fires and its bit clears.
        m.table_write(65 * 16 + 12, &[0]);
        let msg = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x30,
        };
        assert_eq!(
            rec.take(),
            vec![Call::Update(65, Some(msg)), Call::Trigger(65)]
        );
        assert!(!m.is_pending(65));
        // Unmasked: delivered directly.
        assert!(m.trigger(65).unwrap());
        assert_eq!(rec.take(), vec![Call::Trigger(65)]);
        // Function mask pends too, and unmasking the function delivers.
        m.set_message_control(MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK);
        assert_eq!(rec.take(), vec![Call::Update(65, None)]);
        assert!(m.trigger(65).unwrap());
        assert!(m.is_pending(65));
        m.set_message_control(MSIX_CTRL_ENABLE);
        assert_eq!(
            rec.take(),
            vec![Call::Update(65, Some(msg)), Call::Trigger(65)]
        );
        // Vectors that do not exist are refused.
        assert!(!m.trigger(70).unwrap());
        // Reset withdraws the route.
        m.reset();
        assert_eq!(rec.take(), vec![Call::Update(65, None)]);
        assert!(!m.enabled());
    }
}
