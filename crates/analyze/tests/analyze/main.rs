//! Integration tests of reptrace-analyze (one binary): synthetic traces are
//! written through the Recorder with a simulated SGD, then attributed,
//! queried and verified against independent computations.
mod adam;
mod attribution;
mod factor_route;
mod kinds;
mod limits;
mod patches;
mod queries;
mod ragged;
mod read;
mod shard;
mod sql;
mod verify;
