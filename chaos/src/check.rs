//! The invariants, judged over a [`Model`]: pure functions, no IO, so that each can be
//! shown to fail on a log made bad on purpose (`check/tests.rs`). A checker that cannot
//! fail proves nothing.
//!
//! Each invariant answers a [`Verdict`]: its name, how many things it looked at (a pass
//! over nothing is visible as `0 checked`), and every violation with what was expected
//! and what was found.
//!
//! The log is decoded once into a [`History`]: per aggregate, the events a reader folds —
//! in log order, each sequence at most once (what the aggregates and the projectors do:
//! an event at or below the version already applied is skipped). Gaps and repeats in the
//! raw log are the business of [`log::sequences`].

mod acked;
mod history;
mod journal;
mod ledger;
mod log;
mod orders;
mod views;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod tests;

use std::fmt;

pub use acked::AckCounts;
pub use history::{Applied, History};
pub use orders::SagaCounts;

use crate::model::Model;

/// What one invariant found.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The invariant's name, as the report prints it.
    pub name: &'static str,
    /// How many things (aggregates, commands, rows, ...) it judged.
    pub checked: usize,
    pub violations: Vec<Violation>,
}

impl Verdict {
    /// A verdict with nothing found yet.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            checked: 0,
            violations: Vec::new(),
        }
    }

    /// True when nothing violated the invariant.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// Records a violation about `subject`.
    pub fn violate(
        &mut self,
        subject: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) {
        self.violations.push(Violation {
            subject: subject.into(),
            expected: expected.into(),
            found: found.into(),
        });
    }
}

/// One thing that broke an invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// What it is about: `inventory/SKU-1`, `command 3f…`, `orders row 9c…`.
    pub subject: String,
    pub expected: String,
    pub found: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: expected {}, found {}",
            self.subject, self.expected, self.found
        )
    }
}

/// Names of the invariants, in the order [`check`] reports them.
pub mod names {
    pub const EVENTS_DECODE: &str = "every record decodes";
    pub const SEQUENCES: &str = "sequences are 1..n per aggregate";
    pub const ACKNOWLEDGED_ONCE: &str = "acknowledged commands are in the log once";
    pub const KEYED_RETRIES: &str = "keyed retries get the first answer";
    pub const STOCK_NEVER_NEGATIVE: &str = "stock is never below zero";
    pub const STOCK_CONSERVED: &str = "available+reserved+sold-returned = restocked";
    pub const MONEY_CONSERVED: &str = "deposits = balance+charges-refunds";
    pub const ORDERS_SETTLED: &str = "each order's stock and money match its status";
    pub const SAGAS_TERMINAL: &str = "every saga is terminal";
    pub const SAGA_MATCHES_ORDER: &str = "each saga matches its order's status";
    pub const ORDERS_VIEW: &str = "orders table = fold of the log";
    pub const INVENTORY_VIEW: &str = "inventory table = fold of the log";
    pub const ACCOUNTS_VIEW: &str = "accounts table = fold of the log";
    pub const SAGAS_VIEW: &str = "sagas table = fold of the log";
    pub const JOURNAL_VIEW: &str = "event_journal table = the log";
    pub const DEAD_LETTERS: &str = "the DLQ holds no valid event";
}

/// The run's headline figures: what became of the acknowledged commands and the sagas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub commands: AckCounts,
    pub sagas: SagaCounts,
}

/// Counts the acknowledged commands and the sagas of `model`.
pub fn summarize(model: &Model) -> Summary {
    Summary {
        commands: acked::ack_counts(model),
        sagas: orders::saga_counts(&History::of(&model.log)),
    }
}

/// Judges every invariant over `model`.
pub fn check(model: &Model) -> Vec<Verdict> {
    let history = History::of(&model.log);
    vec![
        log::events_decode(&model.log, &history),
        log::sequences(&model.log),
        acked::acknowledged_once(model),
        log::keyed_retries(model),
        ledger::stock_never_negative(&history),
        ledger::stock_conserved(&history),
        ledger::money_conserved(&history),
        orders::orders_settled(&history),
        orders::sagas_terminal(&history),
        orders::saga_matches_order(&history),
        views::orders(&history, &model.read.orders),
        views::inventory(&history, &model.read.inventory),
        views::accounts(&history, &model.read.accounts),
        views::sagas(&history, &model.read.sagas),
        journal::journal(&model.log, &model.read.journal),
        log::dead_letters(&model.log),
    ]
}
