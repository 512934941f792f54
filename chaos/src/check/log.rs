//! Invariants of the log itself: it decodes, its sequences are whole, keyed retries were
//! answered alike, and the DLQ parks nothing that could have been applied (no event that
//! decodes, no command whose envelope parses). (That each
//! acknowledged command is in it once is `acked.rs`.)

use std::collections::{BTreeMap, BTreeSet};

use aggregates::fulfilment::FulfilmentEvent;
use aggregates::{InventoryEvent, OrderEvent, PaymentEvent};
use eventlog::{CommandEnvelope, EventEnvelope, Outcome};

use super::{names, History, Verdict};
use crate::model::{HttpAnswer, Log, LoggedEvent, Model};

/// Every record of an event topic decodes as one of its stream's events, and every
/// record of an outcome topic as a command result.
pub fn events_decode(log: &Log, history: &History<'_>) -> Verdict {
    let mut v = Verdict::new(names::EVENTS_DECODE);
    v.checked = log.events.values().map(Vec::len).sum::<usize>()
        + log.outcomes.len()
        + log.unreadable.len();
    for record in &log.unreadable {
        v.violate(
            record,
            "an envelope or a command result",
            "a record that does not parse",
        );
    }
    for (stream, e, error) in &history.undecodable {
        v.violate(
            format!(
                "{stream}/{} at {}:{}",
                e.envelope.aggregate_id, e.partition, e.offset
            ),
            format!("a {stream} event"),
            format!("{} that does not decode: {error}", e.envelope.event_type),
        );
    }
    v
}

/// Each aggregate's events, in log order, carry sequences 1, 2, …, n — no gap, no
/// repeat — and sit on one partition (its key's), so that order is the log's.
pub fn sequences(log: &Log) -> Verdict {
    let mut v = Verdict::new(names::SEQUENCES);
    for (stream, events) in &log.events {
        let mut by_id: BTreeMap<&str, Vec<&LoggedEvent>> = BTreeMap::new();
        for e in events {
            by_id.entry(&e.envelope.aggregate_id).or_default().push(e);
        }
        for (id, mut events) in by_id {
            v.checked += 1;
            events.sort_by_key(|e| (e.partition, e.offset));
            let subject = format!("{stream}/{id}");
            let partitions: BTreeSet<i32> = events.iter().map(|e| e.partition).collect();
            if partitions.len() > 1 {
                v.violate(&subject, "one partition", format!("{partitions:?}"));
            }
            let bad = events
                .iter()
                .enumerate()
                .find(|(i, e)| e.envelope.sequence != *i as u64 + 1);
            if let Some((i, e)) = bad {
                v.violate(
                    &subject,
                    format!("sequence {} at {}:{}", i + 1, e.partition, e.offset),
                    format!(
                        "sequence {} (of {} events)",
                        e.envelope.sequence,
                        events.len()
                    ),
                );
            }
        }
    }
    v
}

/// Whether an answer is the command's own outcome, which uses up its key (API.md): a
/// `2xx`, `409` or `422`. Anything else (no answer, `503`, a `408` that applied nothing)
/// may be followed by another.
fn uses_up_key(status: u16) -> bool {
    (200..300).contains(&status) || status == 409 || status == 422
}

/// A keyed request answered with its command's outcome got that same answer on every
/// later attempt that was answered; the key's stored answer is that answer too; and the
/// log holds one outcome per command id, however often it was written.
pub fn keyed_retries(model: &Model) -> Verdict {
    let mut v = Verdict::new(names::KEYED_RETRIES);
    for request in &model.client.keyed {
        v.checked += 1;
        let subject = format!("key {}", request.key);
        let mut answers = request.answers.iter();
        let Some(first) = answers.by_ref().find(|a| uses_up_key(a.status)) else {
            continue;
        };
        for later in answers.filter(|a| a.status != 0 && a.status < 500 && a.status != 429) {
            if later != first {
                v.violate(
                    &subject,
                    show(first),
                    format!("a retry answered {}", show(later)),
                );
            }
        }
        let mut stored = model.read.idempotency_keys.iter();
        if let Some(row) = stored.find(|r| r.holds(&request.key)) {
            let kept = (row.status, row.body.as_ref());
            if row.status.is_some() && kept != (Some(first.status), Some(&first.body)) {
                v.violate(&subject, show(first), format!("the key keeps {kept:?}"));
            }
        }
    }
    let mut by_command: BTreeMap<_, Vec<&Outcome>> = BTreeMap::new();
    for o in &model.log.outcomes {
        by_command
            .entry(o.result.command_id)
            .or_default()
            .push(&o.result.outcome);
    }
    for (command, outcomes) in by_command {
        v.checked += 1;
        if let Some(other) = outcomes.iter().find(|o| **o != outcomes[0]) {
            v.violate(
                format!("command {command}"),
                format!("one outcome: {:?}", outcomes[0]),
                format!("also {other:?}"),
            );
        }
    }
    v
}

fn show(answer: &HttpAnswer) -> String {
    format!("{} {}", answer.status, answer.body)
}

/// No dead-lettered record is an event that decodes: the projectors park only what can
/// never apply, so a valid event there is one a read model is missing.
pub fn dead_letters(log: &Log) -> Verdict {
    let mut v = Verdict::new(names::DEAD_LETTERS);
    for record in &log.dead_letters {
        v.checked += 1;
        let at = || {
            format!(
                "DLQ offset {} (from {})",
                record.offset,
                record.source.as_deref().unwrap_or("?")
            )
        };
        // A processor parks only a command whose envelope does not parse (one whose
        // command its aggregate does not know is refused, not parked).
        if let Some(command) = record
            .payload
            .as_deref()
            .and_then(|p| serde_json::from_slice::<CommandEnvelope>(p).ok())
        {
            v.violate(
                at(),
                "only records that can never apply",
                format!(
                    "a command envelope that parses ({} for {})",
                    command.command_id, command.aggregate_id
                ),
            );
            continue;
        }
        let Some(envelope) = record
            .payload
            .as_deref()
            .and_then(|p| serde_json::from_slice::<EventEnvelope>(p).ok())
        else {
            continue;
        };
        if decodes(&envelope) {
            v.violate(
                at(),
                "only records that can never apply",
                format!(
                    "a valid {} {} of {}@{}",
                    envelope.aggregate_type,
                    envelope.event_type,
                    envelope.aggregate_id,
                    envelope.sequence
                ),
            );
        }
    }
    v
}

/// Whether an envelope decodes as an event of its aggregate type.
fn decodes(e: &EventEnvelope) -> bool {
    use aggregates::fulfilment::Fulfilment;
    use aggregates::{Inventory, Order, PaymentAccount};
    use cqrs_es::Aggregate;
    match e.aggregate_type.as_str() {
        t if t == Order::TYPE => e.decode::<OrderEvent>().is_ok(),
        t if t == Inventory::TYPE => e.decode::<InventoryEvent>().is_ok(),
        t if t == PaymentAccount::TYPE => e.decode::<PaymentEvent>().is_ok(),
        t if t == Fulfilment::TYPE => e.decode::<FulfilmentEvent>().is_ok(),
        _ => false,
    }
}
