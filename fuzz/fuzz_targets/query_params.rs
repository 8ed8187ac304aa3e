//! The `-- param:` header of an arbitrary query text, then binding
//! arbitrary `name=value` strings to it. The input is the query text, a NUL
//! byte, and the `name=value` lines (split on the first `=` as the CLI's
//! `--param` does; a line without one is skipped, as the CLI rejects it
//! before binding). Bound values are exactly the declared parameters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reptrace_format::params::{Header, ParamType, ParamValue};

fuzz_target!(|input: &str| {
    let (text, given) = input.split_once('\0').unwrap_or((input, ""));
    let Ok(header) = Header::parse(text) else {
        return;
    };
    let given: Vec<(&str, &str)> = given.lines().filter_map(|l| l.split_once('=')).collect();
    if let Ok(values) = header.bind("fuzz", &given) {
        assert_eq!(values.len(), header.params.len());
        for p in &header.params {
            let v = &values[&p.name];
            let fits = matches!(
                (p.ty, v),
                (ParamType::Int64, ParamValue::Int64(_))
                    | (ParamType::Float64, ParamValue::Float64(_))
                    | (ParamType::String, ParamValue::String(_))
            );
            assert!(fits, "{}: {v:?} is not a {}", p.name, p.ty);
        }
    }
});
