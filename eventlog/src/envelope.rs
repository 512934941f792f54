//! The event envelope: how one domain event is written to an event topic.

use chrono::{DateTime, SecondsFormat, Utc};
use cqrs_es::{Aggregate, DomainEvent};
use rdkafka::message::{Header, OwnedHeaders};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Kafka header names. Type and version are repeated there so that a consumer can route
/// or skip a record without decoding its value.
pub mod headers {
    pub const AGGREGATE_TYPE: &str = "tally-aggregate-type";
    pub const EVENT_TYPE: &str = "tally-event-type";
    pub const EVENT_VERSION: &str = "tally-event-version";
    pub const CORRELATION_ID: &str = "tally-correlation-id";
    /// W3C trace context, under its standard name.
    pub const TRACEPARENT: &str = "traceparent";
    /// Why a dead-lettered record could not be handled.
    pub const DLQ_ERROR: &str = "tally-dlq-error";
    /// Where a dead-lettered record came from: `topic/partition/offset`.
    pub const DLQ_SOURCE: &str = "tally-dlq-source";
    /// Who gave up on a dead-lettered record (a processor or a projection).
    pub const DLQ_BY: &str = "tally-dlq-by";
}

/// The headers of a dead-lettered record: the error, its source and who gave up on it.
pub fn dead_letter_headers(error: &str, source: &str, by: &str) -> OwnedHeaders {
    OwnedHeaders::new_with_capacity(3)
        .insert(header(headers::DLQ_ERROR, error))
        .insert(header(headers::DLQ_SOURCE, source))
        .insert(header(headers::DLQ_BY, by))
}

/// Who and what caused an event, carried from the HTTP request into the log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    pub command_id: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub actor: Option<String>,
    pub traceparent: Option<String>,
}

/// One event as stored: the record value of an event topic, keyed by `aggregate_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// 1-based version of the aggregate after this event.
    pub sequence: u64,
    pub event_type: String,
    /// The version of the event's shape: an integer (written so since 0.1's trust
    /// fixes; older records hold it as a string such as `"1"`, read all the same).
    #[serde(deserialize_with = "version::integer_or_string")]
    pub event_version: u32,
    #[serde(with = "rfc3339")]
    pub occurred_at: DateTime<Utc>,
    /// The event's own fields, without the type tag (that is `event_type`).
    pub payload: Value,
    pub metadata: EventMetadata,
}

impl EventEnvelope {
    /// Wraps an aggregate's event. The caller supplies the clock reading, so this stays
    /// deterministic in tests.
    pub fn wrap<A: Aggregate>(
        aggregate_id: &str,
        sequence: u64,
        event: &A::Event,
        metadata: EventMetadata,
        occurred_at: DateTime<Utc>,
    ) -> serde_json::Result<Self> {
        let event_type = event.event_type();
        // A cqrs-es event enum serialises as `{ "<Variant>": { fields } }`; store the fields.
        let payload = match serde_json::to_value(event)? {
            Value::Object(mut map) if map.len() == 1 => {
                map.remove(&event_type).unwrap_or(Value::Object(map))
            }
            other => other,
        };
        Ok(Self {
            event_id: Uuid::new_v4(),
            aggregate_type: A::TYPE.to_string(),
            aggregate_id: aggregate_id.to_string(),
            sequence,
            event_type,
            // cqrs-es hands versions out as text; ours are whole numbers from 1.
            event_version: event.event_version().parse().unwrap_or(1),
            occurred_at,
            payload,
            metadata,
        })
    }

    /// Decodes the payload back into the aggregate's event enum.
    pub fn decode<E: DomainEvent>(&self) -> serde_json::Result<E> {
        let mut tagged = Map::with_capacity(1);
        tagged.insert(self.event_type.clone(), self.payload.clone());
        serde_json::from_value(Value::Object(tagged))
    }

    /// The Kafka headers of this event's record.
    pub fn kafka_headers(&self) -> OwnedHeaders {
        let mut h = OwnedHeaders::new_with_capacity(5)
            .insert(header(headers::AGGREGATE_TYPE, &self.aggregate_type))
            .insert(header(headers::EVENT_TYPE, &self.event_type))
            .insert(header(
                headers::EVENT_VERSION,
                &self.event_version.to_string(),
            ));
        if let Some(id) = &self.metadata.correlation_id {
            h = h.insert(header(headers::CORRELATION_ID, id));
        }
        if let Some(tp) = &self.metadata.traceparent {
            h = h.insert(header(headers::TRACEPARENT, tp));
        }
        h
    }
}

mod version {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Integer(u32),
        Text(String),
    }

    /// `1` or `"1"`: the log holds both forms.
    pub fn integer_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        match Written::deserialize(d)? {
            Written::Integer(n) => Ok(n),
            Written::Text(s) => s.trim().parse().map_err(|_| {
                serde::de::Error::custom(format!("event_version {s:?} is not a whole number"))
            }),
        }
    }
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

/// RFC 3339 in UTC with microseconds, as API.md promises for every timestamp.
mod rfc3339 {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use aggregates::order::{OrderConfirmed, OrderRejected};
    use aggregates::{Order, OrderEvent, RejectionReason};
    use chrono::TimeZone;

    use super::*;

    fn at() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap()
    }

    #[test]
    fn an_event_round_trips_through_its_envelope() {
        let event = OrderEvent::OrderRejected(OrderRejected {
            reason: RejectionReason::Timeout,
        });
        let meta = EventMetadata {
            command_id: Some("c-1".into()),
            ..Default::default()
        };
        let env = EventEnvelope::wrap::<Order>("o-1", 3, &event, meta, at()).unwrap();
        assert_eq!(env.aggregate_type, "order");
        assert_eq!(env.event_type, "OrderRejected");
        assert_eq!(env.event_version, 1);
        assert_eq!(env.payload, serde_json::json!({ "reason": "timeout" }));

        let json = serde_json::to_string(&env).unwrap();
        assert!(
            json.contains("\"occurred_at\":\"2026-01-02T03:04:05.000000Z\""),
            "{json}"
        );
        assert!(json.contains("\"event_version\":1,"), "an integer: {json}");
        let back: EventEnvelope = serde_json::from_str(&json).unwrap();
        assert_eq!(back, env);
        // Records written before versions were integers still read.
        let old = json.replace("\"event_version\":1,", "\"event_version\":\"1\",");
        let back: EventEnvelope = serde_json::from_str(&old).unwrap();
        assert_eq!(back, env);
        let bad = json.replace("\"event_version\":1,", "\"event_version\":\"v1\",");
        assert!(serde_json::from_str::<EventEnvelope>(&bad).is_err());
        assert_eq!(back.decode::<OrderEvent>().unwrap(), event);
    }

    #[test]
    fn an_empty_event_keeps_an_empty_object_payload() {
        let event = OrderEvent::OrderConfirmed(OrderConfirmed {});
        let env = EventEnvelope::wrap::<Order>("o", 1, &event, Default::default(), at()).unwrap();
        assert_eq!(env.payload, serde_json::json!({}));
        assert_eq!(env.decode::<OrderEvent>().unwrap(), event);
    }

    #[test]
    fn headers_name_type_and_version() {
        use rdkafka::message::Headers;
        let event = OrderEvent::OrderConfirmed(OrderConfirmed {});
        let meta = EventMetadata {
            traceparent: Some("00-abc-def-01".into()),
            ..Default::default()
        };
        let env = EventEnvelope::wrap::<Order>("o", 1, &event, meta, at()).unwrap();
        let h = env.kafka_headers();
        let found: Vec<(String, String)> = h
            .iter()
            .map(|h| {
                (
                    h.key.to_string(),
                    String::from_utf8_lossy(h.value.unwrap()).into_owned(),
                )
            })
            .collect();
        assert!(found.contains(&(headers::EVENT_TYPE.into(), "OrderConfirmed".into())));
        assert!(found.contains(&(headers::EVENT_VERSION.into(), "1".into())));
        assert!(found.contains(&(headers::TRACEPARENT.into(), "00-abc-def-01".into())));
    }
}
