//! `parse_idx` on arbitrary bytes, asking for 1 to 4 dimensions (the first
//! byte picks): an error or dimensions that account for every data byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reptrace_format::data::parse_idx;
use std::path::Path;

fuzz_target!(|input: &[u8]| {
    let Some((&pick, bytes)) = input.split_first() else {
        return;
    };
    let want_dims = usize::from(pick % 4) + 1;
    if let Ok((dims, data)) = parse_idx(Path::new("fuzz.idx"), bytes, want_dims) {
        assert_eq!(dims.len(), want_dims);
        assert_eq!(dims.iter().product::<usize>(), data.len());
    }
});
