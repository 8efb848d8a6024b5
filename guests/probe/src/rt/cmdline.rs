//! `probe.*` parameters from the kernel command line.
//!
//! Parameters are looked up by name when a scenario needs them, so adding a
//! scenario parameter needs no central registration: `params.u64("timer_hz", 1000)`
//! reads `probe.timer_hz=N` (decimal, or hex with `0x`).

pub struct Params<'a> {
    cmdline: &'a str,
}

impl<'a> Params<'a> {
    pub fn new(cmdline: &'a str) -> Self {
        Params { cmdline }
    }

    /// Value of `probe.<key>=...` (the last occurrence wins).
    pub fn get(&self, key: &str) -> Option<&'a str> {
        let mut found = None;
        for word in self.cmdline.split(' ') {
            if let Some(rest) = word.strip_prefix("probe.") {
                if let Some(value) = rest.strip_prefix(key).and_then(|v| v.strip_prefix('=')) {
                    found = Some(value);
                }
            }
        }
        found
    }

    /// Numeric parameter with a default; malformed values give `Err(value)`.
    pub fn u64(&self, key: &str, default: u64) -> Result<u64, &'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => parse_u64(v).ok_or(v),
        }
    }
}

pub fn parse_u64(s: &str) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => (h, 16),
        None => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}
