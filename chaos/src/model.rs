//! What the checker looks at: the log as read back `read_committed`, what a client was
//! told, and the read models' rows. Plain data, so that a test can build a log (good or
//! bad on purpose) by hand and [`crate::check`] can judge it without Kafka or PostgreSQL.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use eventlog::{CommandResult, EventEnvelope};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Everything a check needs.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub log: Log,
    pub client: ClientRecord,
    pub read: ReadModel,
}

/// The committed log.
#[derive(Debug, Clone, Default)]
pub struct Log {
    /// Each stream's events (`order`, `inventory`, `payment`, `saga.order-fulfilment`),
    /// in log order within each partition.
    pub events: BTreeMap<String, Vec<LoggedEvent>>,
    /// Command outcomes written next to the events: the outcomes topics, the saga's inbox
    /// and the command-results topic.
    pub outcomes: Vec<LoggedOutcome>,
    /// The dead-letter topic.
    pub dead_letters: Vec<DeadLetter>,
    /// Records of event or outcome topics that are not even an envelope or a result:
    /// `topic/partition/offset: error`.
    pub unreadable: Vec<String>,
}

/// One event record.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedEvent {
    pub partition: i32,
    pub offset: i64,
    pub envelope: EventEnvelope,
}

/// One command outcome record.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedOutcome {
    pub topic: String,
    /// The stream whose processor wrote it, when the topic says (`<stream>.outcomes`).
    pub stream: Option<String>,
    pub partition: i32,
    pub offset: i64,
    pub result: CommandResult,
}

/// One dead-lettered record, with where it came from (`topic/partition/offset`).
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub offset: i64,
    pub source: Option<String>,
    pub payload: Option<Vec<u8>>,
}

/// What the workload's client was told, written by the workload as JSON and passed to
/// `chaos check --client-record`. Every field but the ids and versions may be left out:
///
/// ```json
/// {"acks": [{"stream": "inventory", "aggregate_id": "WIDGET-1", "version": 3,
///            "correlation_id": "req-17"},
///           {"aggregate_id": "5f0c…", "version": 4, "idempotency_key": "place-5f0c…"}],
///  "keyed": [{"key": "place-5f0c…", "answers": [{"status": 503, "body": {}},
///                                               {"status": 200, "body": {"version": 4}}]}]}
/// ```
///
/// Send each request with its own `X-Correlation-ID` (the events keep it), or record the
/// Idempotency-Key: the key's command id is looked up in `idempotency_keys`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// Every command answered `2xx`.
    #[serde(default)]
    pub acks: Vec<Ack>,
    /// Every keyed request, with each answer it got over its retries, in order.
    #[serde(default)]
    pub keyed: Vec<KeyedRequest>,
}

/// A `2xx` answer: the command's events end at `version` of `aggregate_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// The stream, when the client knows it (`order`, `inventory`, `payment`).
    #[serde(default)]
    pub stream: Option<String>,
    pub aggregate_id: String,
    pub version: u64,
    /// The command id, when known (a keyed command's, from `idempotency_keys`).
    #[serde(default)]
    pub command_id: Option<Uuid>,
    /// The `X-Correlation-ID` the request carried, which the events' metadata keeps.
    #[serde(default)]
    pub correlation_id: Option<String>,
    /// The request's Idempotency-Key, if it had one.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// A keyed request and the answers its attempts got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyedRequest {
    pub key: String,
    pub answers: Vec<HttpAnswer>,
}

/// One HTTP answer: status and JSON body (`0` when no answer came at all).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpAnswer {
    pub status: u16,
    #[serde(default)]
    pub body: Value,
}

/// The read models' rows, as PostgreSQL holds them.
#[derive(Debug, Clone, Default)]
pub struct ReadModel {
    pub orders: Vec<OrderRow>,
    pub inventory: Vec<InventoryRow>,
    pub accounts: Vec<AccountRow>,
    pub sagas: Vec<SagaRow>,
    pub journal: Vec<JournalRow>,
    pub idempotency_keys: Vec<KeyRow>,
}

/// A row of `orders`.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderRow {
    pub order_id: Uuid,
    pub customer_id: String,
    pub status: String,
    pub lines: Value,
    pub total_cents: i64,
    pub version: i64,
    pub rejection_reason: Option<String>,
    pub cancellation_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A row of `inventory`.
#[derive(Debug, Clone, PartialEq)]
pub struct InventoryRow {
    pub sku: String,
    pub on_hand: i64,
    pub reserved: i64,
    pub version: i64,
}

/// A row of `accounts`.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountRow {
    pub customer_id: String,
    pub balance_cents: i64,
    pub version: i64,
}

/// A row of `sagas`.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaRow {
    pub saga_id: Uuid,
    pub status: String,
    pub failure_reason: Option<String>,
    pub state: Value,
    pub version: i64,
}

/// A row of `event_journal`: one envelope, where it was read from.
#[derive(Debug, Clone, PartialEq)]
pub struct JournalRow {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub envelope: Value,
    pub partition: i32,
    pub offset: i64,
}

/// A row of `idempotency_keys`: the answer a key remembers, once it has one.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRow {
    pub key: String,
    pub command_id: Uuid,
    pub status: Option<u16>,
    pub body: Option<Value>,
}

impl KeyRow {
    /// Whether this row holds the client's `key`: stored as is, or scoped by a principal
    /// (`<principal>\u{1f}<key>`) when authentication is on.
    pub fn holds(&self, key: &str) -> bool {
        self.key == key
            || self
                .key
                .strip_suffix(key)
                .is_some_and(|scope| scope.ends_with('\u{1f}'))
    }
}
