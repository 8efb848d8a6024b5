//! The balloon against a driver written here: inflating frees the pages (they read as zeroes
//! afterwards), statistics come and go back, free page reports free memory unless the guest
//! poisons it, and hostile requests break the device or are skipped.

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::testing::*;

const CONFIG: u64 = 0x100;
const INFLATE_Q: u32 = 0;
const DEFLATE_Q: u32 = 1;

struct Rig {
    d: Driver,
    h: BalloonHandle,
    freer: Arc<Freer>,
    qs: Vec<VirtQueue>,
}

/// A balloon offering `opts`, driven with `features` (bit numbers, besides VERSION_1) and as
/// many queues as they call for.
fn rig(opts: BalloonOptions, features: &[u32]) -> Rig {
    let freer = Arc::new(Freer::default());
    let b = Balloon::new(opts, MEM_SIZE, freer.clone()).unwrap();
    let h = b.handle();
    let mut d = Driver::new(Box::new(b));
    freer.mem.set(d.mem.clone()).unwrap();
    let bits = features.iter().fold(0u64, |a, b| a | 1 << b);
    let n = 2
        + usize::from(features.contains(&F_STATS_VQ))
        + usize::from(features.contains(&F_PAGE_REPORTING));
    let qs: Vec<VirtQueue> = (0..n)
        .map(|i| VirtQueue::new(0x1000 + 0x1000 * i as u64))
        .collect();
    assert!(d.negotiate(VERSION_1 | bits));
    for (i, q) in qs.iter().enumerate() {
        d.setup_queue(i as u32, q);
    }
    d.add_status(DRIVER_OK);
    assert_eq!(d.read(REG_STATUS) & NEEDS_RESET, 0, "not started");
    Rig { d, h, freer, qs }
}

fn pfns(list: &[u32]) -> Vec<u8> {
    list.iter().flat_map(|p| p.to_le_bytes()).collect()
}

/// Puts `data` at BUFS + `off` and offers it to queue `q` as one device-readable buffer.
fn send(r: &mut Rig, q: u32, off: u64, data: &[u8]) -> u16 {
    r.d.mem.write_slice(data, GuestAddress(BUFS + off)).unwrap();
    let head = r.qs[q as usize].add_chain(&r.d.mem, &[(BUFS + off, data.len() as u32, false)]);
    r.d.notify(q);
    head
}

fn page_bytes(r: &Rig, pfn: u64) -> Vec<u8> {
    let mut v = vec![0u8; PAGE as usize];
    r.d.mem
        .read_slice(&mut v, GuestAddress(pfn * PAGE))
        .unwrap();
    v
}

#[test]
fn inflating_frees_the_pages_adjacent_ones_together_and_skips_foreign_ones() {
    let mut r = rig(BalloonOptions::default(), &[]);
    assert_eq!(r.d.read(0x8), DEVICE_TYPE);
    for p in 0x200..0x208u64 {
        r.d.mem
            .write_slice(&[0xa5; PAGE as usize], GuestAddress(p * PAGE))
            .unwrap();
    }
    // Out of order, a duplicate, and a page far outside guest memory.
    let list = [0x203, 0x200, 0x201, 0x202, 0x201, 0x206, 0xf_ffff];
    send(&mut r, INFLATE_Q, 0, &pfns(&list));
    assert!(wait_for(|| r.qs[0].used_idx(&r.d.mem) == 1));
    assert_eq!(
        *r.freer.freed.lock().unwrap(),
        vec![(0x200 * PAGE, 4 * PAGE), (0x206 * PAGE, PAGE)]
    );
    for p in [0x200, 0x203, 0x206] {
        assert!(page_bytes(&r, p).iter().all(|&b| b == 0), "page {p:#x}");
    }
    // Pages not in the balloon keep their contents.
    assert!(page_bytes(&r, 0x204).iter().all(|&b| b == 0xa5));
    let st = r.h.status();
    assert_eq!((st.inflated_pages, st.invalid_pages), (5, 1));
    // Deflating needs nothing of the host but is counted.
    send(&mut r, DEFLATE_Q, 0x100, &pfns(&[0x200, 0x201]));
    assert!(wait_for(|| r.qs[1].used_idx(&r.d.mem) == 1));
    assert_eq!(r.h.status().deflated_pages, 2);
    assert_eq!(r.freer.freed.lock().unwrap().len(), 2);
}

#[test]
fn the_target_reaches_the_driver_with_a_config_interrupt_and_actual_comes_back() {
    let mut r = rig(BalloonOptions::default(), &[]);
    assert_eq!(r.d.read(CONFIG), 0);
    r.h.set_target(300).unwrap();
    assert_eq!(r.d.read(CONFIG), 300);
    assert_ne!(r.d.read(REG_ISR) & 2, 0, "no config interrupt");
    r.d.write(CONFIG + 4, 120);
    let st = r.h.status();
    assert_eq!((st.target_pages, st.actual_pages), (300, 120));
    // num_pages is the device's: a driver write does not change it.
    r.d.write(CONFIG, 5);
    assert_eq!(r.d.read(CONFIG), 300);
    let pages = (MEM_SIZE / PAGE) as u32;
    let e = r.h.set_target(pages + 1).unwrap_err();
    assert!(e.contains("larger than the guest's memory"), "{e}");
    // A reset (the guest rebooting) empties the balloon but keeps the target.
    r.d.write(REG_STATUS, 0);
    let st = r.h.status();
    assert_eq!((st.target_pages, st.actual_pages), (300, 0));
}

#[test]
fn statistics_are_kept_and_the_buffer_goes_back_when_fresh_ones_are_wanted() {
    let opts = BalloonOptions {
        stats_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    let mut r = rig(opts, &[F_STATS_VQ]);
    assert!(r.h.status().stats.is_none());
    let mut entries = Vec::new();
    for (tag, v) in [(4u16, 1u64 << 30), (5, 2 << 30), (99, 7)] {
        entries.extend(tag.to_le_bytes());
        entries.extend(v.to_le_bytes());
    }
    let head = send(&mut r, 2, 0, &entries);
    assert!(wait_for(|| r.h.status().stats.is_some()));
    let st = r.h.status().stats.unwrap();
    assert_eq!(st.values, vec![(4, 1 << 30), (5, 2 << 30), (99, 7)]);
    // Held until figures are wanted.
    assert_eq!(r.qs[2].used_idx(&r.d.mem), 0);
    r.h.refresh_stats();
    assert!(wait_for(|| r.qs[2].used_idx(&r.d.mem) == 1));
    assert_eq!(r.qs[2].used_elem(&r.d.mem, 0).0, u32::from(head));
}

#[test]
fn free_page_reports_free_memory_unless_the_guest_poisons_it() {
    let opts = BalloonOptions {
        free_page_reporting: true,
        ..Default::default()
    };
    let mut r = rig(opts, &[F_PAGE_REPORTING, F_PAGE_POISON]);
    let at = 0x10_0000u64 * 2;
    r.d.mem
        .write_slice(&vec![0x77; 0x4_0000], GuestAddress(at))
        .unwrap();
    // Reporting is queue 2 when there is no statistics queue; its buffers are device-writable.
    let h = r.qs[2].add_chain(&r.d.mem, &[(at, 0x2_0000, true)]);
    r.d.notify(2);
    assert!(wait_for(|| r.qs[2].used_idx(&r.d.mem) == 1));
    assert_eq!(r.qs[2].used_elem(&r.d.mem, 0).0, u32::from(h));
    assert_eq!(*r.freer.freed.lock().unwrap(), vec![(at, 0x2_0000)]);
    assert_eq!(r.h.status().reported_bytes, 0x2_0000);
    // A guest poisoning free pages with 0xaa: freed pages would read 0, not its poison.
    r.d.write(CONFIG + 12, 0xaa);
    r.qs[2].add_chain(&r.d.mem, &[(at + 0x2_0000, 0x2_0000, true)]);
    r.d.notify(2);
    assert!(wait_for(|| r.qs[2].used_idx(&r.d.mem) == 2));
    assert_eq!(r.freer.freed.lock().unwrap().len(), 1);
    let mut v = [0u8; 16];
    r.d.mem
        .read_slice(&mut v, GuestAddress(at + 0x2_0000))
        .unwrap();
    assert_eq!(v, [0x77; 16]);
}

#[test]
fn hostile_requests_break_the_device() {
    // A device-writable inflate buffer.
    let mut r = rig(BalloonOptions::default(), &[]);
    r.qs[0].add_chain(&r.d.mem, &[(BUFS, 64, true)]);
    r.d.notify(0);
    assert!(r.d.wait_needs_reset());
    assert!(r.freer.freed.lock().unwrap().is_empty());
    // An inflate request far larger than any driver sends.
    let mut r = rig(BalloonOptions::default(), &[]);
    r.qs[0].add_chain(&r.d.mem, &[(BUFS, 0x2_0000, false)]);
    r.d.notify(0);
    assert!(r.d.wait_needs_reset());
    assert!(r.freer.freed.lock().unwrap().is_empty());
    // A feature not offered (reporting, here) cannot be taken.
    let b = Balloon::new(
        BalloonOptions::default(),
        MEM_SIZE,
        Arc::new(Freer::default()),
    )
    .unwrap();
    let mut d = Driver::new(Box::new(b));
    assert!(!d.negotiate(VERSION_1 | 1 << F_PAGE_REPORTING));
}

#[test]
fn its_state_survives_a_snapshot_and_bad_state_is_refused() {
    let mut r = rig(BalloonOptions::default(), &[]);
    r.h.set_target(64).unwrap();
    r.d.write(CONFIG + 4, 64);
    let mut b = Balloon::new(
        BalloonOptions::default(),
        MEM_SIZE,
        Arc::new(Freer::default()),
    )
    .unwrap();
    let state = serde_json::json!({"target_pages": 64, "actual_pages": 64, "poison": 0});
    b.restore_backend(&state).unwrap();
    b.reset(); // the transport's, on its way to restoring
    let st = b.handle().status();
    assert_eq!((st.target_pages, st.actual_pages), (64, 64));
    let e = b
        .restore_backend(
            &serde_json::json!({"target_pages": 1u64 << 40, "actual_pages": 0, "poison": 0}),
        )
        .unwrap_err();
    assert!(e.contains("target_pages"), "{e}");
    let e = b
        .restore_backend(&serde_json::json!({"target_pages": 1, "actual_pages": 2000, "poison": 0}))
        .unwrap_err();
    assert!(e.contains("actual_pages"), "{e}");
}
