//! What travels on the command and result topics, and the consistency token.

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
