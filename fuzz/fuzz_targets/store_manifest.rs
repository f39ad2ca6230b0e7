#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keystore::fuzzing::store_manifest(data));
