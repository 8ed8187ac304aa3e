//! One module per subcommand: its clap arguments struct and
//! `pub fn run(args, out) -> anyhow::Result<()>`.
#[cfg(feature = "tch")]
pub mod demo;
pub mod info;
#[cfg(feature = "tch")]
pub mod train;
