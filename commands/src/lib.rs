//! Tally's write side (DESIGN.md §3).
//!
//! - [`http::routes`]: the command routes of API.md. They validate everything a request
//!   can get wrong, claim the Idempotency-Key, and hand the command to the [`CommandBus`].
//! - [`CommandBus`]: appends the command to its partition of `<prefix>.<stream>.commands`
//!   (the same partition as the aggregate's events) and waits for the outcome.
//! - [`processor::run`]: one per aggregate type, a member of the command topic's consumer
//!   group. Each owned partition is fenced (`init_transactions`), rebuilt from the event
//!   partition up to the last stable offset, then served in batches: events + command
//!   results + consumed offsets in ONE Kafka transaction, state updated after the commit.
//! - Outcomes come back through [`Local`]: straight from a processor in this process, or
//!   through the command-results topic ([`start_results_listener`]) from another one.

mod bus;
pub mod http;
pub mod idempotency;
mod local;
pub mod metrics;
mod partition;
pub mod processor;
mod stream;

pub use bus::{start_results_listener, CommandBus, DispatchError};
pub use local::Local;
pub use metrics::Metrics;
pub use processor::{ProcessorConfig, ProcessorStatus};
pub use stream::CommandStream;
/// The command and result records, defined with the log they travel on.
pub mod wire {
    pub use eventlog::{CommandEnvelope, CommandResult, ReplyTo};
}
