//! Stopping a long command when the user asks (Ctrl-C).
//!
//! The process has one interruption flag. Whoever handles the signal (the
//! command line installs a handler for SIGINT and SIGTERM) calls [`raise`];
//! the work notices it where stopping is safe:
//! - queries wait on [`interrupted`] beside their result stream
//!   ([`crate::sql::Output`], [`crate::export`]): the stream is dropped, which
//!   cancels DataFusion's tasks;
//! - the replay of update records ([`crate::replay::stream`]) calls
//!   [`check`] before each batch, so `attribute`, the computed
//!   `contributions` and `verify` stop within one batch.
//!
//! The work then fails with [`Error::Interrupted`] and takes its ordinary
//! error path: temporary files and parts removed, the run's manifest never
//! touched, spill directories removed. Nothing is ever stopped between the
//! writes of a commit.
use crate::{Error, Result};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, Ordering};
use tokio::sync::Notify;

/// The signal that interrupted the process (0: none yet).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

fn notify() -> &'static Notify {
    static NOTIFY: OnceLock<Notify> = OnceLock::new();
    NOTIFY.get_or_init(Notify::new)
}

/// Marks the process as interrupted by `signal` (its number, e.g. 2 for
/// SIGINT) and wakes every [`interrupted`] future. Safe to call from any
/// thread (not from a signal handler itself: call it from the thread that
/// receives the signals).
pub fn raise(signal: i32) {
    let _ = SIGNAL.compare_exchange(0, signal.max(1), Ordering::SeqCst, Ordering::SeqCst);
    notify().notify_waiters();
}

/// The signal that interrupted the process, if any.
pub fn signal() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// `Err(Error::Interrupted)` once the process is interrupted.
pub fn check() -> Result<()> {
    match signal() {
        None => Ok(()),
        Some(signal) => Err(Error::Interrupted { signal }),
    }
}

/// Completes when the process is interrupted (at once if it already is).
pub async fn interrupted() -> Error {
    let notify = notify();
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        // Registered before the flag is read, so that a `raise` in between
        // is not missed.
        notified.as_mut().enable();
        if let Some(signal) = signal() {
            return Error::Interrupted { signal };
        }
        notified.await;
    }
}

/// Runs `work` until it completes or the process is interrupted, whichever
/// comes first; on interruption `work` is dropped (which cancels a query).
pub async fn or_interrupted<T>(work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::select! {
        biased;
        e = interrupted() => Err(e),
        r = work => r,
    }
}
