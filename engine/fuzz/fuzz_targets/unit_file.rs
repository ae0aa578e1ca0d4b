#![no_main]
//! See fleet_engine::fuzz_checks::unit_file: the property checked on every input.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fleet_engine::fuzz_checks::unit_file(data));
