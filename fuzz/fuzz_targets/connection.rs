//! See `daffi_proto::fuzzing::connection`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| daffi_proto::fuzzing::connection(data));
