//! virtio-mem against a driver written here: plugging up to the requested size, unplugging
//! (the memory goes back and reads as zeroes), STATE, UNPLUG_ALL, hostile requests, and the
//! state a snapshot keeps.

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::testing::*;

const CONFIG: u64 = 0x100;
/// The region: the upper half of the test memory, in 64 KiB blocks (32 of them).
const ADDR: u64 = 0x20_0000;
const SIZE: u64 = 0x20_0000;
const BS: u64 = 0x1_0000;
/// Where requests and responses go.
const REQ: u64 = BUFS;
const RESP: u64 = BUFS + 0x100;

struct Rig {
    d: Driver,
    h: MemHandle,
    freer: Arc<Freer>,
    q: VirtQueue,
    sent: u16,
}

fn opts() -> MemOptions {
    MemOptions {
        addr: ADDR,
        size: SIZE,
        block_size: BS,
    }
}

fn rig() -> Rig {
    let freer = Arc::new(Freer::default());
    let dev = VirtioMem::new(opts(), freer.clone()).unwrap();
    let h = dev.handle();
    let mut d = Driver::new(Box::new(dev));
    freer.mem.set(d.mem.clone()).unwrap();
    let q = VirtQueue::new(0x1000);
    assert!(d.negotiate(VERSION_1 | 1 << F_UNPLUGGED_INACCESSIBLE));
    d.setup_queue(0, &q);
    d.add_status(DRIVER_OK);
    assert_eq!(d.read(REG_STATUS) & NEEDS_RESET, 0, "not started");
    Rig {
        d,
        h,
        freer,
        q,
        sent: 0,
    }
}

fn config64(r: &mut Rig, off: u64) -> u64 {
    u64::from(r.d.read(CONFIG + off)) | u64::from(r.d.read(CONFIG + off + 4)) << 32
}

/// Sends a request; returns (response type, state).
fn request(r: &mut Rig, kind: u16, addr: u64, blocks: u16) -> (u16, u16) {
    let mut req = [0u8; 24];
    req[0..2].copy_from_slice(&kind.to_le_bytes());
    req[8..16].copy_from_slice(&addr.to_le_bytes());
    req[16..18].copy_from_slice(&blocks.to_le_bytes());
    r.d.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    r.d.mem
        .write_slice(&[0xff; 10], GuestAddress(RESP))
        .unwrap();
    r.q.add_chain(&r.d.mem, &[(REQ, 24, false), (RESP, 10, true)]);
    r.d.notify(0);
    r.sent += 1;
    let want = r.sent;
    assert!(wait_for(|| r.q.used_idx(&r.d.mem) == want), "no response");
    let mut resp = [0u8; 10];
    r.d.mem.read_slice(&mut resp, GuestAddress(RESP)).unwrap();
    (
        u16::from_le_bytes([resp[0], resp[1]]),
        u16::from_le_bytes([resp[8], resp[9]]),
    )
}

const ACK: (u16, u16) = (0, 0);
const NACK: (u16, u16) = (1, 0);
const ERROR: (u16, u16) = (3, 0);

#[test]
fn the_config_space_describes_the_region_and_the_request_arrives_with_an_interrupt() {
    let mut r = rig();
    assert_eq!(r.d.read(0x8), DEVICE_TYPE);
    assert_eq!(config64(&mut r, 0), BS);
    assert_eq!(config64(&mut r, 16), ADDR);
    assert_eq!(config64(&mut r, 24), SIZE);
    assert_eq!(config64(&mut r, 32), SIZE);
    assert_eq!(config64(&mut r, 40), 0);
    assert_eq!(config64(&mut r, 48), 0);
    r.h.set_requested(4 * BS).unwrap();
    assert_eq!(config64(&mut r, 48), 4 * BS);
    assert_ne!(r.d.read(REG_ISR) & 2, 0, "no config interrupt");
    // The driver cannot write the device's fields.
    r.d.write(CONFIG + 48, 0);
    assert_eq!(config64(&mut r, 48), 4 * BS);
    let e = r.h.set_requested(SIZE + BS).unwrap_err();
    assert!(e.starts_with("invalid") && e.contains("hotplugged"), "{e}");
    let e = r.h.set_requested(BS / 2).unwrap_err();
    assert!(e.starts_with("invalid") && e.contains("block size"), "{e}");
}

#[test]
fn plugging_stops_at_the_requested_size_and_unplugged_memory_goes_back_as_zeroes() {
    let mut r = rig();
    r.h.set_requested(4 * BS).unwrap();
    assert_eq!(request(&mut r, 0, ADDR, 3), ACK);
    // One block more than requested: refused, nothing changes.
    assert_eq!(request(&mut r, 0, ADDR + 3 * BS, 2), NACK);
    assert_eq!(request(&mut r, 0, ADDR + 3 * BS, 1), ACK);
    assert_eq!(config64(&mut r, 40), 4 * BS);
    assert_eq!(r.h.status().plugged, 4 * BS);
    // STATE: plugged, unplugged, mixed.
    assert_eq!(request(&mut r, 3, ADDR, 4), (0, 0));
    assert_eq!(request(&mut r, 3, ADDR + 4 * BS, 8), (0, 1));
    assert_eq!(request(&mut r, 3, ADDR + 2 * BS, 4), (0, 2));
    // The guest uses the memory; unplugging two blocks frees them on the host.
    r.d.mem
        .write_slice(&vec![0xa5; (4 * BS) as usize], GuestAddress(ADDR))
        .unwrap();
    assert_eq!(request(&mut r, 1, ADDR + BS, 2), ACK);
    assert_eq!(*r.freer.freed.lock().unwrap(), vec![(ADDR + BS, 2 * BS)]);
    let mut b = vec![0u8; (4 * BS) as usize];
    r.d.mem.read_slice(&mut b, GuestAddress(ADDR)).unwrap();
    let bs = BS as usize;
    assert!(b[..bs].iter().all(|&x| x == 0xa5));
    assert!(b[bs..3 * bs].iter().all(|&x| x == 0));
    assert!(b[3 * bs..].iter().all(|&x| x == 0xa5));
    assert_eq!(config64(&mut r, 40), 2 * BS);
    assert_eq!(r.h.freed_bytes(), 2 * BS);
    // Unplugging what is not plugged, or plugging what is, is an error.
    assert_eq!(request(&mut r, 1, ADDR + BS, 1), ERROR);
    assert_eq!(request(&mut r, 0, ADDR, 1), ERROR);
    // UNPLUG_ALL frees the rest.
    assert_eq!(request(&mut r, 2, 0, 0), ACK);
    assert_eq!(r.h.status().plugged, 0);
    assert_eq!(r.freer.freed.lock().unwrap().len(), 3);
}

#[test]
fn ranges_outside_the_region_misaligned_or_empty_are_errors_and_change_nothing() {
    let mut r = rig();
    r.h.set_requested(SIZE).unwrap();
    for (addr, n) in [
        (ADDR - BS, 1),
        (ADDR + SIZE, 1),
        (ADDR + SIZE - BS, 2),
        (ADDR + 1, 1),
        (ADDR, 0),
        (u64::MAX - BS + 1, 1),
        (ADDR, u16::MAX),
        (0, 1),
    ] {
        for kind in [0, 1, 3] {
            assert_eq!(
                request(&mut r, kind, addr, n),
                ERROR,
                "{kind} {addr:#x} {n}"
            );
        }
    }
    // An unknown request type.
    assert_eq!(request(&mut r, 9, ADDR, 1), ERROR);
    assert_eq!(r.h.status().plugged, 0);
    // The whole region at once is fine.
    assert_eq!(request(&mut r, 0, ADDR, (SIZE / BS) as u16), ACK);
    assert_eq!(r.h.status().plugged, SIZE);
    assert_eq!(r.d.read(REG_STATUS) & NEEDS_RESET, 0);
}

#[test]
fn a_chain_too_short_for_a_request_or_response_breaks_the_device() {
    for bufs in [
        [(REQ, 16, false), (RESP, 10, true)],
        [(REQ, 24, false), (RESP, 4, true)],
    ] {
        let mut r = rig();
        r.q.add_chain(&r.d.mem, &bufs);
        r.d.notify(0);
        assert!(r.d.wait_needs_reset());
    }
    // A request split over two buffers is fine.
    let mut r = rig();
    r.h.set_requested(BS).unwrap();
    let mut req = [0u8; 24];
    req[8..16].copy_from_slice(&ADDR.to_le_bytes());
    req[16..18].copy_from_slice(&1u16.to_le_bytes());
    r.d.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    r.q.add_chain(
        &r.d.mem,
        &[(REQ, 10, false), (REQ + 10, 14, false), (RESP, 10, true)],
    );
    r.d.notify(0);
    assert!(wait_for(|| r.q.used_idx(&r.d.mem) == 1));
    assert_eq!(r.h.status().plugged, BS);
}

#[test]
fn the_state_a_snapshot_keeps_comes_back_and_a_foreign_one_is_refused() {
    let mut saved = VirtioMem::new(opts(), Arc::new(Freer::default())).unwrap();
    let s = serde_json::json!({
        "addr": ADDR, "region_size": SIZE, "block_size": BS,
        "requested_size": 6 * BS, "plugged": [[0, 2], [10, 3]],
    });
    saved.restore_backend(&s).unwrap();
    let state = saved.save_backend().unwrap();
    let mut dev = VirtioMem::new(opts(), Arc::new(Freer::default())).unwrap();
    assert_eq!(state["plugged"], serde_json::json!([[0, 2], [10, 3]]));
    dev.restore_backend(&state).unwrap();
    let st = dev.handle().status();
    assert_eq!((st.requested, st.plugged), (6 * BS, 5 * BS));
    for (field, v) in [
        ("block_size", serde_json::json!(BS * 2)),
        ("requested_size", serde_json::json!(SIZE + BS)),
        ("plugged", serde_json::json!([[30, 3]])),
        ("plugged", serde_json::json!([[u64::MAX, 2]])),
        ("plugged", serde_json::json!([[0, 4], [2, 4]])),
        ("plugged", serde_json::json!([[0, 2], [2, 1]])),
        ("plugged", serde_json::json!([[5, 0]])),
        ("plugged", serde_json::json!("all")),
    ] {
        let mut bad = state.clone();
        bad[field] = v;
        let e = dev.restore_backend(&bad).unwrap_err();
        assert!(e.starts_with("virtio-mem state:"), "{e}");
    }
    // A refused state left the restored one alone.
    assert_eq!(dev.handle().status().plugged, 5 * BS);
}

#[test]
fn a_reset_keeps_the_blocks_plugged() {
    let mut r = rig();
    r.h.set_requested(2 * BS).unwrap();
    assert_eq!(request(&mut r, 0, ADDR, 2), ACK);
    r.d.write(REG_STATUS, 0);
    assert_eq!(r.h.status().plugged, 2 * BS);
    assert!(r.freer.freed.lock().unwrap().is_empty());
}
