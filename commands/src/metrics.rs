//! Counters of the write side, read by `/metrics` and the benchmark.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Transactions committed and the commands in them.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    transactions: AtomicU64,
    commands: AtomicU64,
    largest_batch: AtomicU64,
}

impl Metrics {
    pub(crate) fn record_batch(&self, commands: usize) {
        self.inner.transactions.fetch_add(1, Ordering::Relaxed);
        self.inner
            .commands
            .fetch_add(commands as u64, Ordering::Relaxed);
        self.inner
            .largest_batch
            .fetch_max(commands as u64, Ordering::Relaxed);
    }

    /// Transactions committed so far.
    pub fn transactions(&self) -> u64 {
        self.inner.transactions.load(Ordering::Relaxed)
    }

    /// Commands handled in committed transactions so far.
    pub fn commands(&self) -> u64 {
        self.inner.commands.load(Ordering::Relaxed)
    }

    /// The most commands one transaction carried.
    pub fn largest_batch(&self) -> u64 {
        self.inner.largest_batch.load(Ordering::Relaxed)
    }
}
