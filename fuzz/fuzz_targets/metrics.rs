//! `metrics.jsonl` (the strict reader): any bytes give lines or a clear
//! error; what parses writes back and parses again to the same lines.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(lines) = prelu::run::parse_metrics(data) else { return };
    let mut text = String::new();
    for l in &lines {
        text.push_str(&serde_json::to_string(l).expect("a parsed line serialises"));
        text.push('\n');
    }
    let again = prelu::run::parse_metrics(text.as_bytes()).expect("written lines parse");
    assert_eq!(again.len(), lines.len());
});
