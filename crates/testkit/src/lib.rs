//! Test support shared by reptrace's tests, benches and examples: one place
//! that builds runs and runs the binaries, so that a test says what it checks
//! and not how its run was made.
//!
//! - [`bench`](mod@bench): the bench binaries' options and median timing;
//! - [`cli`]: running `reptrace` (and `reptrace-torch`) and asserting that a
//!   refusal is one line with exit code 1;
//! - [`digits`]: runs of the bundled digits data trained by the CLI with given
//!   settings, built once per test process;
//! - [`files`]: copying runs, listing and snapshotting their files (killed and
//!   damaged runs start from a copy);
//! - [`handmade`]: tiny runs written by hand through the recorder (one
//!   Linear layer, given update factors), and recording child processes to
//!   kill;
//! - [`models`]: manifest models of given shapes (an MLP, a small CNN) for
//!   hand-built runs and schema examples;
//! - [`synthetic`]: synthetic runs of given shapes written through
//!   `reptrace-record`, with known answers.
//!
//! Dev-only: a `[dev-dependencies]` entry of the crates that test with it,
//! never a dependency of a library or binary.

pub mod bench;
pub mod cli;
pub mod digits;
pub mod files;
pub mod handmade;
pub mod models;
pub mod synthetic;
