#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keystore::fuzzing::backup_payload(data));
