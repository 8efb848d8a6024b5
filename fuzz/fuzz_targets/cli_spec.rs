//! The command line's value parsers: `--disk`, `--net`, `--memory`, `--serial`/`--console`
//! and MAC addresses; each accepted value is also validated and printed back.
#![no_main]
use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use vmm::config::{CharBackend, DiskConfig, MacAddr, MemSize, NetConfig};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 5 {
        0 => {
            if let Ok(d) = DiskConfig::from_str(s) {
                let _ = serde_json::to_string(&d);
            }
        }
        1 => {
            if let Ok(n) = NetConfig::from_str(s) {
                let _ = n.effective_mac(3);
                let _ = serde_json::to_string(&n);
            }
        }
        2 => {
            if let Ok(m) = MemSize::from_str(s) {
                let shown = m.to_string();
                let _ = MemSize::from_str(&shown);
            }
        }
        3 => {
            if let Ok(c) = CharBackend::from_str(s) {
                let _ = c.to_string();
            }
        }
        _ => {
            if let Ok(m) = MacAddr::from_str(s) {
                assert_eq!(MacAddr::from_str(&m.to_string()).ok(), Some(m));
            }
        }
    }
});
