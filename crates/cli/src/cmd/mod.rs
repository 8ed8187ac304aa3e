//! One module per subcommand: its clap arguments struct and
//! `pub fn run(args, out) -> anyhow::Result<()>`.
pub mod attribute;
#[cfg(feature = "tch")]
pub mod demo;
pub mod export;
pub mod info;
pub mod query;
pub mod report;
pub mod sql;
#[cfg(feature = "tch")]
pub mod train;
pub mod verify;
