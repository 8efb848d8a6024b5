//! fw_cfg: selector, data and DMA port accesses with guest-written DMA descriptors (any
//! control bits, lengths and addresses, in or outside guest memory). After each DMA read of a
//! whole file from its start, guest memory must hold exactly that file.
#![no_main]
use devices::fw_cfg::{FwCfg, FwCfgItems};
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use tern_fuzz::Input;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 0x10000;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let mut items = FwCfgItems::new(2, 4);
    let files: Vec<(String, Vec<u8>)> = (0..3u8)
        .map(|i| (format!("etc/f{i}"), vec![i + 1; usize::from(input.u8()) * 8]))
        .collect();
    for (n, d) in &files {
        items.add_file(n, d.clone()).unwrap();
    }
    items.add_writable_file("etc/w", vec![0; 16]).unwrap();
    let keys: Vec<u16> = files.iter().map(|(n, _)| items.key(n).unwrap()).collect();
    let mut dev = FwCfg::new(items, mem.clone());
    let mut steps = 0;
    while !input.is_empty() && steps < 256 {
        steps += 1;
        let mut b = [0u8; 4];
        match input.u8() % 6 {
            0 => dev.write(0, &input.u16().to_le_bytes()),
            1 => dev.read(1, &mut b[..1]),
            2 => dev.read(4 + u64::from(input.u8() % 8), &mut b[..1 + usize::from(input.u8() % 4)]),
            3 => {
                // A descriptor anywhere (maybe straddling the end of memory), then the doorbell.
                let at = u64::from(input.u32()) % (MEM + 64);
                let desc = input.bytes(16);
                let _ = mem.write_slice(desc, GuestAddress(at));
                dev.write(4, &((at >> 32) as u32).to_be_bytes());
                dev.write(8, &(at as u32).to_be_bytes());
            }
            4 => {
                // A well-formed whole-file read: the result must be the file.
                let i = usize::from(input.u8()) % files.len();
                let (at, buf) = (0x100u64, 0x1000u64);
                let len = files[i].1.len() as u32;
                let control = (u32::from(keys[i]) << 16) | 0x08 | 0x02;
                let mut desc = Vec::new();
                desc.extend_from_slice(&control.to_be_bytes());
                desc.extend_from_slice(&len.to_be_bytes());
                desc.extend_from_slice(&buf.to_be_bytes());
                mem.write_slice(&desc, GuestAddress(at)).unwrap();
                dev.write(8, &(at as u32).to_be_bytes());
                let mut got = vec![0u8; len as usize];
                mem.read_slice(&mut got, GuestAddress(buf)).unwrap();
                assert_eq!(got, files[i].1);
                let mut status = [0u8; 4];
                mem.read_slice(&mut status, GuestAddress(at)).unwrap();
                assert_eq!(status, [0; 4]);
            }
            _ => {
                let w = input.bytes(2);
                dev.write(u64::from(input.u8() % 12), w);
            }
        }
    }
});
