//! `parse_csv` with options taken from the input. The first byte picks the
//! options: bits 0-1 the label column (last, first, index 1, name `y`),
//! bits 2-3 the header (auto, yes, no), bit 4 a test split of 1 row instead
//! of 20 %, bit 5 ten classes, bit 6 a shape `[1, n]` with `n` the first
//! line's fields but one. With bit 7 set, the first line is instead an
//! option query (`label=first&shape=2x3…`, as after `csv:PATH?`). The rest
//! is the CSV text. A data set that loads is consistent: its rows, features
//! and labels fit together and every feature is finite.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reptrace_format::data::{CsvOptions, Header, LabelColumn, TestSplit, parse_csv};
use std::path::Path;

fn options(flags: u8, rest: &[u8]) -> Option<(CsvOptions, &[u8])> {
    if flags & 0x80 != 0 {
        let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let query = std::str::from_utf8(&rest[..end]).ok()?;
        let options = CsvOptions::parse_query(query).ok()?;
        return Some((options, rest.get(end + 1..).unwrap_or_default()));
    }
    let mut o = CsvOptions {
        label: match flags & 3 {
            0 => LabelColumn::Last,
            1 => LabelColumn::First,
            2 => LabelColumn::Index(1),
            _ => LabelColumn::Name("y".into()),
        },
        header: match (flags >> 2) & 3 {
            1 => Header::Yes,
            2 => Header::No,
            _ => Header::Auto,
        },
        ..CsvOptions::default()
    };
    if flags & 0x10 != 0 {
        o.test = TestSplit::Rows(1);
    }
    if flags & 0x20 != 0 {
        o.classes = Some(10);
    }
    if flags & 0x40 != 0 {
        // One feature column per field of the first line but the label: fits
        // a well-formed file, so that shaped data sets get built too.
        let width = rest
            .split(|&b| b == b'\n')
            .next()?
            .split(|&b| b == b',')
            .count();
        o.shape = Some(vec![1, width.saturating_sub(1).max(1)]);
    }
    Some((o, rest))
}

fuzz_target!(|input: &[u8]| {
    let Some((&flags, rest)) = input.split_first() else {
        return;
    };
    let Some((options, text)) = options(flags, rest) else {
        return;
    };
    if let Ok(d) = parse_csv(text, Path::new("fuzz.csv"), &options) {
        assert_eq!(d.features.len(), d.len() * d.dim());
        assert!(d.n_train > 0 && d.n_train <= d.len());
        assert!(d.classes.len() >= 2);
        assert!(
            d.labels
                .iter()
                .all(|&l| l >= 0 && (l as usize) < d.classes.len())
        );
        assert!(
            d.features.iter().all(|x| x.is_finite()),
            "non-finite feature"
        );
    }
});
