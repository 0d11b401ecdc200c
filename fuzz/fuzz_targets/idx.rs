//! IDX files, raw or gzip: any bytes give a data set or a clear error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = prelu::data::parse_idx(data, "fuzz.idx") {
        // Use the same array as images and as labels: exercises every shape check.
        let _ = prelu::data::Dataset::from_idx(a.clone(), a, "fuzz-images.idx", "fuzz-labels.idx");
    }
});
