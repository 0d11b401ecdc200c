//! Graph files (TOML or JSON): any text gives a resolved graph, a model spec
//! or a clear error (unknown keys, bad paddings, huge or cyclic graphs).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(g) = prelu::graph::Graph::parse(text) {
        for input in [[1, 28, 28], [3, 8, 8], [16, 1, 1]] {
            if let Ok(r) = g.resolve(input) {
                let _ = r.param_count();
            }
        }
    }
    let _ = prelu::store::checkpoint::spec_from_graph(text, &Default::default());
});
