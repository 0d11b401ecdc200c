//! JSON beside a run (`stability.json`, `attack.json`) as the report reads
//! it: any text gives plot series / a table or a clear error, and no value
//! ever reaches the HTML as markup.
#![no_main]
use libfuzzer_sys::fuzz_target;

const TAGS: [&str; 10] = [
    "<h2>", "</h2>", "<table>", "</table>", "<tr>", "</tr>", "<th>", "</th>", "<td>", "</td>",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else { return };
    let _ = prelu::report::stability_series(&v);
    if let Ok(html) = prelu::report::attack_table(&v) {
        let mut rest = html.clone();
        for t in TAGS {
            rest = rest.replace(t, "");
        }
        assert!(!rest.contains('<') && !rest.contains('>'), "markup from a value: {html}");
    }
});
