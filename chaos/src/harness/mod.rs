//! `chaos run`: the fault-injection harness around the checker. It starts Tally processes
//! with split roles against the harness's own Kafka and PostgreSQL (brought up by
//! `scripts/chaos`), runs the [`workload`] and the [`nemesis`] for the duration, stops the
//! faults, lets the system settle (bounded), judges the log with the [`crate::check`]er and
//! prints one report ([`report`]).
//!
//! - [`rng`]: the seeded PRNG everything random draws from;
//! - [`plan`]: the fault schedule of a seed, and the rule that a run must inject every
//!   kind asked for;
//! - [`processes`]: the Tally processes, started, killed, paused and watched;
//! - [`workload`]: the bounded request loop and the client record it writes;
//! - [`nemesis`]: injects and heals the faults;
//! - [`run`]: the whole run, start to verdict.

pub mod nemesis;
pub mod plan;
pub mod processes;
pub mod report;
pub mod rng;
pub mod run;
pub mod workload;
