//! Shared helpers of tern's fuzz targets: a byte reader for structured inputs, a guest memory,
//! and a virtio driver that lays a fuzz input out as guest memory and queues, starts a device
//! behind the virtio-mmio transport and lets its worker process the notified queues.

use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use devices::BusDevice;
use virtio::transport::mmio::MmioTransport;
use virtio::transport::PauseDevice;
use virtio::{GuestMemoryMmap, VirtioDevice, VmMemory};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Reads fixed-size fields off the front of a fuzz input; past its end every field reads 0.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }
    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let s = self.bytes(2);
        b[..s.len()].copy_from_slice(s);
        u16::from_le_bytes(b)
    }
    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let s = self.bytes(4);
        b[..s.len()].copy_from_slice(s);
        u32::from_le_bytes(b)
    }
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

/// Guest memory size of the device targets.
pub const MEM_SIZE: usize = 0x4_0000;

/// One guest memory per process, cleared by [`Driver::new`].
pub fn guest_mem() -> GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
        .clone()
}

/// [`guest_mem`] as a VM's shared memory handle, for a transport.
pub fn vm_mem() -> VmMemory {
    VmMemory::new(guest_mem())
}

/// A guest driver of one device behind virtio-mmio.
pub struct Driver {
    pub t: MmioTransport,
    pub mem: GuestMemoryMmap,
    queues: usize,
}

impl Driver {
    /// Wraps `device`; guest memory is cleared.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let mem = guest_mem();
        mem.write_slice(&vec![0u8; MEM_SIZE], GuestAddress(0))
            .unwrap();
        let queues = device.queue_max_sizes().len();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(VmMemory::new(mem.clone()), device, irq).unwrap();
        Driver { t, mem, queues }
    }

    pub fn read(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write(&mut self, offset: u64, val: u32) {
        self.t.write(offset, &val.to_le_bytes());
    }

    /// Takes the input apart: driver features (u64), notify mask (u8), per queue its size,
    /// and where its descriptor table, available ring and used ring lie (u16 each, in units of
    /// 16, 2 and 4 bytes), then the guest memory image from address 0. Negotiates, programs the
    /// queues, sets DRIVER_OK (the device starts its worker) and returns the notify mask.
    pub fn start(&mut self, input: &mut Input<'_>) -> u8 {
        let features = input.u64();
        let notify = input.u8();
        let queues: Vec<[u64; 4]> = (0..self.queues)
            .map(|_| {
                let size = u64::from(input.u16());
                let desc = u64::from(input.u16()) * 16;
                let avail = u64::from(input.u16()) * 2;
                let used = u64::from(input.u16()) * 4;
                [size, desc, avail, used]
            })
            .collect();
        let image = input.rest();
        let image = &image[..image.len().min(MEM_SIZE)];
        self.mem.write_slice(image, GuestAddress(0)).unwrap();
        self.write(0x70, 0);
        for s in [1, 3] {
            self.write(0x70, s);
        }
        self.write(0x24, 0);
        self.write(0x20, features as u32);
        self.write(0x24, 1);
        self.write(0x20, (features >> 32) as u32);
        self.write(0x70, 3 | 8);
        for (q, &[size, desc, avail, used]) in queues.iter().enumerate() {
            self.write(0x30, q as u32);
            self.write(0x38, size as u32);
            for (reg, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
                self.write(reg, addr as u32);
                self.write(reg + 4, 0);
            }
            self.write(0x44, 1);
        }
        self.write(0x70, 3 | 8 | 4);
        notify
    }

    /// Notifies the queues in `mask`, waits until the worker took every notification (or the
    /// device gave up on the driver), then pauses the device: once that returns, the worker
    /// has finished handling them.
    pub fn notify_and_settle(&mut self, mask: u8) {
        for q in 0..self.queues.min(8) {
            if mask & (1 << q) != 0 {
                self.write(0x50, q as u32);
            }
        }
        self.settle();
    }

    /// Waits for the worker as [`notify_and_settle`](Self::notify_and_settle) does.
    pub fn settle(&mut self) {
        let fds: Vec<i32> = self
            .t
            .queue_notify_eventfds()
            .iter()
            .map(|(_, _, e)| e.as_raw_fd())
            .collect();
        let start = Instant::now();
        while fds.iter().any(|&fd| readable(fd))
            && self.t.status() & 0x40 == 0
            && self.t.status() & 4 != 0
            && start.elapsed() < Duration::from_millis(100)
        {
            std::thread::yield_now();
        }
        // A device that does not stop is a hang the guest caused: report it as a crash.
        assert!(
            self.t.pause_device(Instant::now() + Duration::from_secs(5)),
            "the device did not stop within 5 s of a pause"
        );
    }
}

fn readable(fd: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

/// A 64 KiB raw image per process (its file is unlinked at once; the descriptor keeps it).
pub fn raw_disk() -> std::sync::Arc<block::Disk> {
    static DISK: OnceLock<std::sync::Arc<block::Disk>> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = scratch_dir("blk").join("disk.raw");
        std::fs::write(&path, vec![0x5au8; 64 << 10]).unwrap();
        let (disk, _) = block::Disk::open(&block::DiskOptions {
            path: path.clone(),
            format: Some(block::ImageFormat::Raw),
            ..block::DiskOptions::default()
        })
        .unwrap();
        let _ = std::fs::remove_file(&path);
        std::sync::Arc::new(disk)
    })
    .clone()
}

/// A device picked by `which`: rng, console, or blk over [`raw_disk`].
pub fn some_device(which: u8) -> Box<dyn VirtioDevice> {
    use virtio::devices::{Block, BlockOptions, Console, Rng};
    match which % 3 {
        0 => Box::new(Rng::new()),
        1 => Box::new(Console::new(Some(Box::new(std::io::sink()))).unwrap()),
        _ => Box::new(Block::new(
            raw_disk(),
            BlockOptions {
                serial: "fuzz".into(),
                queues: 2,
                engine: block::EngineKind::Sync,
                iops: 0,
                bandwidth: 0,
            },
        )),
    }
}

/// One register access of a transport target: (write?, offset, size in bytes, value).
pub fn access(input: &mut Input<'_>, offset_mask: u64) -> (bool, u64, usize, u64) {
    let op = input.u8();
    let offset = u64::from(input.u32()) & offset_mask;
    let size = [1, 2, 4, 8][usize::from(op >> 1) & 3];
    let value = if op & 1 != 0 { input.u64() } else { 0 };
    (op & 1 != 0, offset, size, value)
}

/// MSI routing that delivers nothing.
pub struct NoMsi;

impl devices::pci::MsiRouting for NoMsi {
    fn update(&self, _vector: u16, _msg: Option<devices::pci::MsiMessage>) {}
    fn trigger(&self, _vector: u16) -> std::io::Result<()> {
        Ok(())
    }
}

/// A directory of this process's own for scratch files: on /dev/shm where there is one
/// (rewriting a file on a disk file system each run costs milliseconds).
pub fn scratch_dir(what: &str) -> std::path::PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("tern-fuzz-{what}-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// One current-thread tokio runtime for the API targets, made on first use.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    })
}
