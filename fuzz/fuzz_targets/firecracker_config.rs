//! Firecracker configuration files (`tern firecracker --config-file`, and `GET /vm/config`'s
//! shape): JSON parsed into a `FullConfig` and turned into the `VmConfig` tern builds, as
//! `tern firecracker` does. Whatever comes out must be a configuration tern accepts.
#![no_main]
use api::firecracker::FullConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(c) = serde_json::from_slice::<FullConfig>(data) else {
        return;
    };
    if let Ok(vm) = c.vm_config() {
        vm.validate()
            .expect("vm_config returned a configuration that does not validate");
        let _ = vm.effective_cmdline();
    }
    // What GET /vm/config answers parses back to the same.
    let json = serde_json::to_string(&c).expect("a parsed config serializes");
    let again: FullConfig = serde_json::from_str(&json).expect("a serialized config parses");
    assert_eq!(again, c, "a config changed on its way through JSON");
});
