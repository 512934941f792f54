//! What travels on the command, result and reply topics.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// One command on a `<prefix>.<stream>.commands` topic, keyed by aggregate id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandEnvelope {
    /// Unique per intent: a retry with the same Idempotency-Key carries the same id.
    pub command_id: Uuid,
    pub aggregate_id: String,
    /// The aggregate's command, as its JSON form (e.g. `{"PlaceOrder": null}`).
    pub command: Value,
    /// `If-Match`: the version the aggregate must be at.
    pub expected_version: Option<u64>,
    /// True when the client sent an Idempotency-Key: the outcome is remembered for replays.
    #[serde(default)]
    pub idempotent: bool,
    pub correlation_id: Option<String>,
    pub traceparent: Option<String>,
    pub actor: Option<String>,
    /// Where to write the outcome too, in the command's transaction (the saga's inbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ReplyTo>,
    /// The processor refuses the command (`408 command_expired`) when it decides later
    /// than this: a saga that stopped waiting must not find it applied after all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
}

/// A topic partition and key to write a command's [`CommandResult`] to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyTo {
    pub topic: String,
    pub partition: i32,
    pub key: String,
}

/// The outcome of one command, written to `<prefix>.command-results` in the same
/// transaction as the command's events. It is the HTTP answer, ready to send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    pub command_id: Uuid,
    /// HTTP status to answer with.
    pub status: u16,
    /// HTTP body to answer with: the success body or the API.md error shape.
    pub body: Value,
    /// The command carried an Idempotency-Key: a new owner of the partition reloads this
    /// outcome (within the dedup window) so a late retry still gets it.
    #[serde(default)]
    pub idempotent: bool,
}
