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

/// Where a command's last event landed: a read model has caught up with the command once
/// its checkpoint for this topic partition is past `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

/// An opaque read-your-writes token: the event-topic positions a command wrote.
/// Format `t1.<stream>.<partition>.<offset>[~...]`; clients must not parse it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsistencyToken {
    pub stream: String,
    pub positions: Vec<Position>,
}

impl ConsistencyToken {
    /// Encodes the token.
    pub fn encode(&self) -> String {
        let parts: Vec<String> = self
            .positions
            .iter()
            .map(|p| format!("t1.{}.{}.{}", self.stream, p.partition, p.offset))
            .collect();
        parts.join("~")
    }

    /// Decodes a token; `None` when it is not one Tally made.
    pub fn decode(s: &str) -> Option<Self> {
        let mut stream = None;
        let mut positions = Vec::new();
        for part in s.split('~') {
            let mut fields = part.split('.');
            let (Some("t1"), Some(name), Some(p), Some(o), None) = (
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
            ) else {
                return None;
            };
            if name.is_empty() || stream.get_or_insert(name) != &name {
                return None;
            }
            let partition = p.parse().ok().filter(|p: &i32| *p >= 0)?;
            let offset = o.parse().ok().filter(|o: &i64| *o >= 0)?;
            positions.push(Position { partition, offset });
        }
        Some(Self {
            stream: stream?.to_string(),
            positions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let token = ConsistencyToken {
            stream: "order".into(),
            positions: vec![Position {
                partition: 3,
                offset: 41,
            }],
        };
        let s = token.encode();
        assert_eq!(ConsistencyToken::decode(&s), Some(token));
        for bad in [
            "",
            "t1.order.3",
            "t2.order.1.1",
            "t1.order.-1.4",
            "t1.order.1.x",
            "t1..1.1",
        ] {
            assert_eq!(ConsistencyToken::decode(bad), None, "{bad}");
        }
    }
}
