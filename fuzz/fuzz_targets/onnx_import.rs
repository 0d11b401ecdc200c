//! ONNX files: any bytes give an imported model or a clear error (no panic,
//! no unbounded allocation), also when built for a free input size; a model
//! that imports exports and imports again.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prelu::store::onnx::export_with;
use prelu::store::onnx::import_bytes;
use prelu::store::onnx::import_bytes_with;
use prelu::store::onnx::ImportOptions;

fuzz_target!(|data: &[u8]| {
    let sized = ImportOptions {
        input_size: Some([8, 8]),
    };
    for im in [import_bytes(data), import_bytes_with(data, &sized)]
        .into_iter()
        .flatten()
    {
        // The export has a fixed input size: no options needed.
        if let Ok(bytes) = export_with(&im.model, Some(&im.io)) {
            let _ = import_bytes(&bytes);
        }
    }
});
