//! `Manifest::parse` on arbitrary UTF-8: it returns an error or a manifest,
//! never panics; a manifest that parses serializes and parses back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reptrace_format::Manifest;
use std::path::Path;

fuzz_target!(|text: &str| {
    let path = Path::new("fuzz/manifest.json");
    if let Ok(m) = Manifest::parse(text, path) {
        let json = m.to_json();
        let back = Manifest::parse(&json, path)
            .unwrap_or_else(|e| panic!("to_json output does not parse: {e}\n{json}"));
        assert_eq!(m, back, "to_json → parse changed the manifest");
    }
});
