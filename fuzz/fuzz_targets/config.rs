//! Config files: `--config FILE` text (JSON when it starts with `{`, TOML otherwise) parsed
//! into a `VmConfig` and validated, as `tern --config` does; a parsed config also goes back
//! through JSON, as the API and snapshots carry it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vmm::VmConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = VmConfig::from_file_text("fuzz.toml", text) {
        let _ = c.validate();
        let _ = c.effective_cmdline();
        for (i, n) in c.nets.iter().enumerate() {
            let _ = n.effective_mac(i);
        }
        let json = serde_json::to_string(&c).expect("a parsed config serializes");
        let again: VmConfig = serde_json::from_str(&json).expect("a serialized config parses");
        assert_eq!(
            serde_json::to_string(&again).unwrap(),
            json,
            "a config changed on its way through JSON"
        );
    }
});
