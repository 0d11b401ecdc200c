//! JSON beside a run (`stability.json`, `attack.json`) as the report reads
//! it, into the result types: any text gives plot series / a table or a
//! parse error, and no value ever reaches the HTML as markup.
#![no_main]
use libfuzzer_sys::fuzz_target;

const TAGS: [&str; 12] = [
    "<h2>", "</h2>", "<table>", "</table>", "<tr>", "</tr>", "<th>", "</th>", "<td>", "</td>", "<p>", "</p>",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(s) = prelu::analyses::stability::StabilityResult::from_json(text) {
        let _ = prelu::report::stability_series(&s);
    }
    if let Ok(a) = serde_json::from_str::<prelu::analyses::attack::AttackResult>(text) {
        let html = prelu::report::attack_table(&a);
        let mut rest = html.clone();
        for t in TAGS {
            rest = rest.replace(t, "");
        }
        assert!(!rest.contains('<') && !rest.contains('>'), "markup from a value: {html}");
    }
});
