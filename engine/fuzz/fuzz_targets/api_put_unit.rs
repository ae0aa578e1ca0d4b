#![no_main]
//! See fleet_engine::fuzz_checks::api_put_unit: the property checked on every input.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fleet_engine::fuzz_checks::api_put_unit(data));
