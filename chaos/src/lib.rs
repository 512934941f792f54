//! The checker of the fault-injection suite (issue 12): after a run under faults, it reads
//! the whole log `read_committed` and the read models, and judges the promises Tally makes
//! whatever crashes — an acknowledged command is in the log exactly once, stock is never
//! oversold, money is neither created nor lost, every saga ends as its order did, and every
//! read model equals a fold of the log.
//!
//! - [`model`]: the log, the client's record and the read-model rows as plain data;
//! - [`check`]: the invariants, pure functions over a [`model::Model`], each shown to fail
//!   on a log made bad on purpose;
//! - [`load`]: builds the model from Kafka and PostgreSQL;
//! - [`report`]: the table `chaos check` prints;
//! - [`harness`]: `chaos run`, the harness around the checker — Tally processes with
//!   split roles, a workload, a nemesis injecting faults from a seeded schedule, and one
//!   report of faults, commands, sagas and invariants.
//!
//! It sits beside the system, not in it: it depends on `aggregates` (to fold events with
//! their own `apply`) and `eventlog` (topics, envelopes, the `read_committed` reader),
//! never on the processors or projectors whose work it judges.

pub mod check;
pub mod harness;
pub mod load;
pub mod model;
pub mod report;
