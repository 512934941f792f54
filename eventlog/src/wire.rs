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

/// The outcome of one command, written in the same transaction as the command's events:
/// to `<prefix>.command-results` for a request in another process, to the saga's inbox
/// for a saga's command, and to the stream's outcomes topic for a command keyed over HTTP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "WireResult")]
pub struct CommandResult {
    pub command_id: Uuid,
    pub outcome: Outcome,
    /// The command carried an Idempotency-Key: a new owner of the partition reloads this
    /// outcome (within the dedup window) so a late retry still gets it.
    pub idempotent: bool,
}

/// What a processor decided for one command. It is not an HTTP answer: the HTTP layer
/// maps it to a status and a body (`commands::http`), and the saga reads `rule`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The command's events are in the log: the aggregate is at `version`, and `token`
    /// (a consistency token) names the position of its last event.
    Accepted {
        aggregate_id: String,
        version: u64,
        /// The command created the aggregate (its first events).
        created: bool,
        token: String,
    },
    /// Nothing was written.
    Rejected(Rejection),
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    pub code: Code,
    /// The domain rule refused (`insufficient_stock`, ...) when `code` is
    /// [`Code::RuleViolation`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// A sentence for humans.
    pub message: String,
    /// What a client may branch on beyond the code (e.g. the versions of a conflict).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

/// The codes a processor refuses a command with; their names are API.md's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// The command does not decode as one of the stream's commands.
    MalformedRequest,
    /// The token's customer may not act on this aggregate.
    Forbidden,
    /// The aggregate does not exist.
    NotFound,
    /// The processor decided after the command's deadline.
    CommandExpired,
    /// `If-Match` named another version.
    VersionConflict,
    /// The aggregate refused: a domain rule, named in `rule`.
    RuleViolation,
}

impl Code {
    /// The code as API.md spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::MalformedRequest => "malformed_request",
            Code::Forbidden => "forbidden",
            Code::NotFound => "not_found",
            Code::CommandExpired => "command_expired",
            Code::VersionConflict => "version_conflict",
            Code::RuleViolation => "rule_violation",
        }
    }
}

impl Outcome {
    /// A refusal with `code` and a sentence for humans.
    pub fn rejected(code: Code, message: impl Into<String>) -> Self {
        Outcome::Rejected(Rejection {
            code,
            rule: None,
            message: message.into(),
            details: None,
        })
    }

    /// A domain rule refused the command.
    pub fn rule_violation(rule: &str, message: impl Into<String>) -> Self {
        Outcome::Rejected(Rejection {
            code: Code::RuleViolation,
            rule: Some(rule.to_string()),
            message: message.into(),
            details: None,
        })
    }

    /// Adds `details` to a refusal (an acceptance has none).
    pub fn with_details(mut self, value: Value) -> Self {
        if let Outcome::Rejected(r) = &mut self {
            r.details = Some(value);
        }
        self
    }

    pub fn is_accepted(&self) -> bool {
        matches!(self, Outcome::Accepted { .. })
    }

    /// What a saga records of a refusal: the rule, or else the code.
    pub fn refusal(&self) -> Option<&str> {
        match self {
            Outcome::Accepted { .. } => None,
            Outcome::Rejected(r) => Some(r.rule.as_deref().unwrap_or(r.code.as_str())),
        }
    }
}

/// A result as it is on the wire: the typed outcome, or — written by a version before
/// outcomes were typed — the HTTP status and body it was answered with.
#[derive(Deserialize)]
struct WireResult {
    command_id: Uuid,
    #[serde(default)]
    idempotent: bool,
    #[serde(default)]
    outcome: Option<Outcome>,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    body: Option<Value>,
}

impl TryFrom<WireResult> for CommandResult {
    type Error = String;

    fn try_from(wire: WireResult) -> Result<Self, String> {
        let outcome = match (wire.outcome, wire.status, wire.body) {
            (Some(outcome), _, _) => outcome,
            (None, Some(status), Some(body)) => legacy(status, body)?,
            _ => return Err("a command result without an outcome".to_string()),
        };
        Ok(CommandResult {
            command_id: wire.command_id,
            outcome,
            idempotent: wire.idempotent,
        })
    }
}

/// The outcome an HTTP answer of the previous version stood for.
fn legacy(status: u16, body: Value) -> Result<Outcome, String> {
    if (200..300).contains(&status) {
        let field = |name: &str| body.get(name).cloned().unwrap_or_default();
        return Ok(Outcome::Accepted {
            aggregate_id: field("aggregate_id")
                .as_str()
                .unwrap_or_default()
                .to_string(),
            version: field("version").as_u64().unwrap_or_default(),
            created: status == 201,
            token: field("consistency_token")
                .as_str()
                .unwrap_or_default()
                .to_string(),
        });
    }
    let error = body.get("error").cloned().unwrap_or_default();
    let code: Code = serde_json::from_value(error["code"].clone())
        .map_err(|e| format!("a command result with an unknown code: {e}"))?;
    let mut details = error.get("details").cloned();
    let rule = details
        .as_mut()
        .and_then(Value::as_object_mut)
        .and_then(|d| d.remove("rule"))
        .and_then(|r| r.as_str().map(String::from));
    let details = details.filter(|d| d.as_object().is_none_or(|o| !o.is_empty()));
    Ok(Outcome::Rejected(Rejection {
        code,
        rule,
        message: error["message"].as_str().unwrap_or_default().to_string(),
        details,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_result_round_trips_and_one_of_the_previous_version_still_reads() {
        let id = Uuid::new_v4();
        let new = CommandResult {
            command_id: id,
            outcome: Outcome::rule_violation("insufficient_stock", "only 2 left"),
            idempotent: true,
        };
        let back: CommandResult =
            serde_json::from_slice(&serde_json::to_vec(&new).unwrap()).unwrap();
        assert_eq!(back, new);

        let old = json!({"command_id": id, "status": 422, "idempotent": true, "body":
            {"error": {"code": "rule_violation", "message": "only 2 left",
                       "details": {"rule": "insufficient_stock"}}}});
        let read: CommandResult = serde_json::from_value(old).unwrap();
        assert_eq!(read, new);
        assert_eq!(read.outcome.refusal(), Some("insufficient_stock"));

        let old = json!({"command_id": id, "status": 201, "body":
            {"aggregate_id": "o-1", "version": 1, "consistency_token": "t"}});
        let read: CommandResult = serde_json::from_value(old).unwrap();
        assert_eq!(
            read.outcome,
            Outcome::Accepted {
                aggregate_id: "o-1".into(),
                version: 1,
                created: true,
                token: "t".into()
            }
        );

        let old = json!({"command_id": id, "status": 409, "body": {"error": {"code":
            "version_conflict", "message": "m", "details": {"current_version": 2}}}});
        let read: CommandResult = serde_json::from_value(old).unwrap();
        assert_eq!(read.outcome.refusal(), Some("version_conflict"));
        assert!(serde_json::from_value::<CommandResult>(json!({"command_id": id})).is_err());
    }
}
