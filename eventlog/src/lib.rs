//! Tally's Kafka plumbing. It knows topics, envelopes, transactions and partitions, and
//! nothing of orders: the domain crates sit on top of it (DESIGN.md §1–§3).
//!
//! - [`KafkaConfig`]: where the brokers are, the topic prefix, partitions, and any extra
//!   librdkafka properties (SASL/SSL) passed through to every client.
//! - [`Topics`] names every topic; [`ensure_topics`] creates the missing ones with the
//!   right settings (event topics are kept forever) and checks co-partitioning.
//! - [`EventEnvelope`]: the JSON record of one event, with type and version repeated as
//!   Kafka headers so consumers can route without decoding.
//! - [`TxnProducer`]: a transactional producer whose blocking calls run off the async
//!   runtime, with librdkafka's errors sorted into retriable / abortable / fatal.
//! - [`read_partition`]: read one partition `read_committed` from an offset up to its
//!   last stable offset, the catch-up step before a processor takes commands.
//! - [`owner`]: the partition-owner runtime the command processors and the saga share —
//!   membership, fencing, hand-over, transaction retries — and [`state`], the bounded
//!   state each owner keeps over a local store and a compacted changelog (ADR 10).
//! - [`log_identity`]: which log this is (Kafka's cluster id and the id in
//!   `<prefix>.meta`), so that the read side can tell it from another (ADR 7).

mod config;
mod envelope;
mod identity;
pub mod owner;
mod partitioner;
mod reader;
pub mod state;
mod token;
mod topics;
pub mod trace;
mod txn;
mod wire;

pub use config::KafkaConfig;
pub use envelope::{dead_letter_headers, headers, EventEnvelope, EventMetadata};
pub use identity::{end_offsets, log_identity, LogIdentity, LOG_ID_KEY};
pub use partitioner::{murmur2, partition_for};
pub use reader::{consumer_lags, offset_for_time, read_partition, watermarks};
pub use token::{ConsistencyToken, Position};
pub use topics::{check_connection, ensure_topics, TopicSpec, Topics, OUTCOMES_RETENTION};
pub use txn::{classify, CommitError, Delivery, Landed, TxnErrorKind, TxnProducer};
pub use wire::{Code, CommandEnvelope, CommandResult, Outcome, Rejection, ReplyTo};

/// Re-exported so dependants use the same rdkafka as this crate.
pub use rdkafka;
