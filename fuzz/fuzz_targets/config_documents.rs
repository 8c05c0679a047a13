//! Configuration documents as `weft apply` and `--config` read them: parse, validate,
//! compile. Whatever the validator accepts must compile to a snapshot with the
//! properties of `weft_fuzz::check_snapshot`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(resources) = weft_model::parse_documents("fuzz.yaml", text) {
        let snapshot = weft_model::compile(&resources, weft_fuzz::NAMESPACE);
        weft_fuzz::check_snapshot(&resources, &snapshot);
    }
});
