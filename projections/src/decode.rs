//! Deciding, before any database work, whether a record can ever be applied: its value
//! must be an event envelope whose payload decodes to its stream's event type at a
//! version this build knows. Only records that fail here are dead-lettered; any error
//! after this point is the database's, and is retried.

use aggregates::fulfilment::Fulfilment;
use aggregates::{Inventory, Order, PaymentAccount};
use cqrs_es::{Aggregate, DomainEvent};
use eventlog::EventEnvelope;

use crate::kinds::streams;

/// The envelope of a record of `stream`, or why it can never be applied.
pub(crate) fn decode(stream: &str, value: Option<&[u8]>) -> Result<EventEnvelope, String> {
    let value = value.ok_or_else(|| "empty record".to_string())?;
    let envelope: EventEnvelope =
        serde_json::from_slice(value).map_err(|e| format!("not an event envelope: {e}"))?;
    match stream {
        streams::ORDER => check::<Order>(&envelope, true)?,
        streams::INVENTORY => check::<Inventory>(&envelope, false)?,
        streams::PAYMENT => check::<PaymentAccount>(&envelope, false)?,
        streams::SAGA => check::<Fulfilment>(&envelope, true)?,
        other => return Err(format!("no projection reads stream {other:?}")),
    }
    Ok(envelope)
}

/// The payload decodes to `A::Event` at the envelope's version; the read models of
/// orders and sagas key their rows by UUID.
fn check<A: Aggregate>(envelope: &EventEnvelope, uuid_ids: bool) -> Result<(), String> {
    let event: A::Event = envelope.decode().map_err(|e| {
        format!(
            "not a {} event: {} v{}: {e}",
            A::TYPE,
            envelope.event_type,
            envelope.event_version
        )
    })?;
    if event.event_version() != envelope.event_version.to_string() {
        return Err(format!(
            "unknown version {} of {} (this build reads version {})",
            envelope.event_version,
            envelope.event_type,
            event.event_version()
        ));
    }
    if uuid_ids && uuid::Uuid::parse_str(&envelope.aggregate_id).is_err() {
        return Err(format!(
            "{} id {:?} is not a UUID",
            A::TYPE,
            envelope.aggregate_id
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(event_type: &str, version: &str, payload: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "event_id": uuid::Uuid::new_v4(),
            "aggregate_type": "Inventory",
            "aggregate_id": "SKU-1",
            "sequence": 1,
            "event_type": event_type,
            "event_version": version,
            "occurred_at": "2026-01-01T00:00:00.000000Z",
            "payload": payload,
            "metadata": {},
        }))
        .unwrap()
    }

    #[test]
    fn garbage_unknown_types_and_unknown_versions_can_never_apply() {
        assert!(decode(streams::INVENTORY, None).is_err());
        assert!(decode(streams::INVENTORY, Some(b"not json")).is_err());
        let unknown = envelope("StockExploded", "1", serde_json::json!({}));
        let e = decode(streams::INVENTORY, Some(&unknown)).unwrap_err();
        assert!(e.contains("StockExploded"), "{e}");
    }

    #[test]
    fn a_known_event_decodes_only_at_its_version() {
        let payload = serde_json::json!({ "sku": "SKU-1", "quantity": 100 });
        let good = envelope("StockRestocked", "1", payload.clone());
        assert!(decode(streams::INVENTORY, Some(&good)).is_ok());
        let newer = envelope("StockRestocked", "2", payload);
        let e = decode(streams::INVENTORY, Some(&newer)).unwrap_err();
        assert!(e.contains("unknown version 2"), "{e}");
        assert!(decode(streams::ORDER, Some(&good)).is_err());
    }
}
