//! (filled by the test-kit work; see lib.rs)
