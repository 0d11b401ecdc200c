//! `.npy` files: any bytes give an array or a clear error (headers with
//! repeated or misplaced keys, declared sizes the data does not hold).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = prelu::data::npy::parse_npy(data, "fuzz.npy");
});
