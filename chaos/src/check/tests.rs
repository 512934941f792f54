//! The checker passes good logs and fails each log made bad on purpose — on the
//! invariant that names the fault.

use aggregates::inventory::StockReserved;
use aggregates::streams::{FULFILMENT, INVENTORY, ORDER, PAYMENT};
use aggregates::{Inventory, InventoryEvent, OrderId, Quantity};
use chrono::Duration;
use eventlog::{EventEnvelope, EventMetadata};
use serde_json::json;
use uuid::Uuid;

use super::fixtures::{settle, Sim};
use super::{check, names, summarize, AckCounts, SagaCounts, Verdict};
use crate::model::{Ack, DeadLetter, HttpAnswer, KeyRow, KeyedRequest, LoggedEvent, Model};

/// A shop's afternoon: stock, money, and one order of each ending.
fn shop() -> (Sim, Orders) {
    let mut sim = Sim::new();
    sim.restock("WIDGET", 10);
    sim.restock("GADGET", 3);
    sim.deposit("alice", 10_000);
    sim.deposit("bob", 100);
    let confirmed = sim.order("alice", &[("WIDGET", 2, 1_500), ("GADGET", 1, 999)]);
    let short = sim.order("alice", &[("GADGET", 5, 10)]);
    let declined = sim.order("bob", &[("WIDGET", 1, 5_000)]);
    let cancelled = sim.order("alice", &[("WIDGET", 3, 100)]);
    sim.cancel(&cancelled);
    let draft_cancelled = sim.order_draft("bob", &[("WIDGET", 1, 1)]);
    sim.cancel(&draft_cancelled);
    let orders = Orders {
        confirmed,
        short,
        declined,
        cancelled,
    };
    (sim, orders)
}

struct Orders {
    confirmed: String,
    short: String,
    declined: String,
    cancelled: String,
}

fn failed(model: &Model) -> Vec<&'static str> {
    check(model)
        .into_iter()
        .filter(|v| !v.passed())
        .map(|v| v.name)
        .collect()
}

fn verdict(model: &Model, name: &str) -> Verdict {
    check(model)
        .into_iter()
        .find(|v| v.name == name)
        .expect("every invariant is reported")
}

fn events<'a>(model: &'a mut Model, stream: &str) -> &'a mut Vec<LoggedEvent> {
    model
        .log
        .events
        .get_mut(stream)
        .expect("the stream has events")
}

/// The index of the first event of `stream` with `event_type` (and of `aggregate`).
fn find(model: &Model, stream: &str, event_type: &str, aggregate: Option<&str>) -> usize {
    model.log.events[stream]
        .iter()
        .position(|e| {
            e.envelope.event_type == event_type
                && aggregate.is_none_or(|a| e.envelope.aggregate_id == a)
        })
        .expect("the event is in the log")
}

#[test]
fn a_good_log_passes_every_invariant_and_each_looked_at_something() {
    let (sim, o) = shop();
    let model = sim.settled();
    let verdicts = check(&model);
    for v in &verdicts {
        assert!(v.passed(), "{}: {:?}", v.name, v.violations);
    }
    for v in verdicts.iter().filter(|v| v.name != names::DEAD_LETTERS) {
        assert!(v.checked > 0, "{} judged nothing", v.name);
    }
    // The shop ran as intended: each ending is there.
    let status = |id: &str| {
        let row = model
            .read
            .orders
            .iter()
            .find(|r| r.order_id.to_string() == id);
        row.map(|r| (r.status.clone(), r.rejection_reason.clone()))
    };
    assert_eq!(status(&o.confirmed), Some(("confirmed".into(), None)));
    assert_eq!(
        status(&o.short),
        Some(("rejected".into(), Some("insufficient_stock".into())))
    );
    assert_eq!(
        status(&o.declined),
        Some(("rejected".into(), Some("payment_declined".into())))
    );
    assert_eq!(status(&o.cancelled), Some(("cancelled".into(), None)));
    let summary = summarize(&model);
    assert_eq!(
        summary.sagas,
        SagaCounts {
            completed: 1,
            compensated: 3,
            stuck: 0
        }
    );
    assert_eq!((summary.commands.lost, summary.commands.doubled), (0, 0));
    assert!(summary.commands.acknowledged > 20, "{summary:?}");
    let stock: Vec<_> = model
        .read
        .inventory
        .iter()
        .map(|r| (&r.sku[..], r.on_hand, r.reserved))
        .collect();
    assert_eq!(stock, vec![("GADGET", 2, 0), ("WIDGET", 8, 0)]);
}

#[test]
fn a_duplicated_event_fails_sequences_and_exactly_once() {
    let (sim, _) = shop();
    let mut model = sim.settled();
    let i = find(&model, INVENTORY, "StockSold", Some("WIDGET"));
    let stream = events(&mut model, INVENTORY);
    let mut copy = stream[i].clone();
    copy.offset = stream.iter().map(|e| e.offset).max().unwrap_or(0) + 1;
    stream.push(copy);
    let failed = failed(&model);
    assert!(failed.contains(&names::SEQUENCES), "{failed:?}");
    assert!(failed.contains(&names::ACKNOWLEDGED_ONCE), "{failed:?}");
    let counted = summarize(&model).commands;
    assert_eq!(
        (counted.lost, counted.doubled),
        (0, 1),
        "the saga's sale, twice"
    );
}

#[test]
fn a_command_applied_twice_fails_exactly_once_even_with_whole_sequences() {
    let mut sim = Sim::new();
    sim.restock("WIDGET", 10);
    let mut model = sim.settled();
    // The same restock decided again later: a new event id and instant, the next sequence.
    let stream = events(&mut model, INVENTORY);
    let mut again = stream[0].clone();
    again.offset += 1;
    again.envelope.sequence = 2;
    again.envelope.event_id = Uuid::from_u128(99);
    again.envelope.occurred_at += Duration::seconds(5);
    stream.push(again);
    settle(&mut model);
    assert_eq!(failed(&model), vec![names::ACKNOWLEDGED_ONCE]);
}

#[test]
fn a_sequence_gap_fails_sequences() {
    let (sim, o) = shop();
    let mut model = sim.settled();
    let i = find(&model, ORDER, "OrderPlaced", Some(&o.confirmed));
    events(&mut model, ORDER).remove(i);
    let v = verdict(&model, names::SEQUENCES);
    assert!(!v.passed());
    assert!(v.violations[0].subject.contains(&o.confirmed), "{v:?}");
}

#[test]
fn a_reservation_that_drives_stock_negative_fails_both_stock_invariants() {
    let mut sim = Sim::new();
    sim.restock("WIDGET", 5);
    let mut model = sim.settled();
    let stream = events(&mut model, INVENTORY);
    let mut over = stream[0].clone();
    let event = InventoryEvent::StockReserved(StockReserved {
        order_id: OrderId(Uuid::from_u128(7)),
        quantity: Quantity(6),
    });
    over.offset += 1;
    over.envelope = EventEnvelope::wrap::<Inventory>(
        "WIDGET",
        2,
        &event,
        EventMetadata::default(),
        over.envelope.occurred_at,
    )
    .expect("an inventory event wraps");
    stream.push(over);
    settle(&mut model);
    let failed = failed(&model);
    assert!(failed.contains(&names::STOCK_NEVER_NEGATIVE), "{failed:?}");
    assert!(failed.contains(&names::STOCK_CONSERVED), "{failed:?}");
}

#[test]
fn a_charge_without_its_refund_after_a_cancel_fails_orders_settled() {
    let mut sim = Sim::new();
    sim.restock("WIDGET", 10);
    sim.deposit("alice", 1_000);
    let order = sim.order("alice", &[("WIDGET", 2, 100)]);
    sim.cancel(&order);
    let mut model = sim.settled();
    assert!(failed(&model).is_empty(), "{:?}", failed(&model));
    // The refund is alice's last payment event: drop it and its outcome.
    let i = find(&model, PAYMENT, "PaymentRefunded", None);
    let refund = events(&mut model, PAYMENT).remove(i);
    let command = refund.envelope.metadata.command_id.clone();
    model
        .log
        .outcomes
        .retain(|o| Some(o.result.command_id.to_string()) != command);
    settle(&mut model);
    assert_eq!(failed(&model), vec![names::ORDERS_SETTLED]);
    let v = verdict(&model, names::ORDERS_SETTLED);
    assert!(v.violations[0].subject.contains(&order), "{v:?}");
    assert_eq!(v.violations[0].found, "200");
}

#[test]
fn a_read_model_row_that_differs_from_the_fold_fails_its_table() {
    let (sim, o) = shop();
    let good = sim.settled();

    let mut model = good.clone();
    model.read.inventory[0].on_hand += 1;
    assert_eq!(failed(&model), vec![names::INVENTORY_VIEW]);

    let mut model = good.clone();
    let row = model
        .read
        .orders
        .iter_mut()
        .find(|r| r.order_id.to_string() == o.cancelled);
    row.expect("the order has a row").status = "confirmed".into();
    assert_eq!(failed(&model), vec![names::ORDERS_VIEW]);

    let mut model = good.clone();
    model.read.accounts.pop();
    assert_eq!(failed(&model), vec![names::ACCOUNTS_VIEW]);

    let mut model = good.clone();
    model.read.sagas[0].version -= 1;
    assert_eq!(failed(&model), vec![names::SAGAS_VIEW]);

    let mut model = good.clone();
    model.read.journal.remove(3);
    assert_eq!(failed(&model), vec![names::JOURNAL_VIEW]);

    let mut model = good.clone();
    model.read.journal[0].envelope["payload"]["quantity"] = json!(11);
    assert_eq!(failed(&model), vec![names::JOURNAL_VIEW]);

    let mut model = good;
    let mut extra = model.read.inventory[0].clone();
    extra.sku = "NEVER-STOCKED".into();
    model.read.inventory.push(extra);
    assert_eq!(failed(&model), vec![names::INVENTORY_VIEW]);
}

#[test]
fn a_saga_that_never_ended_fails_both_saga_invariants() {
    let (sim, o) = shop();
    let mut model = sim.settled();
    let stream = events(&mut model, FULFILMENT);
    let last = stream
        .iter()
        .rposition(|e| e.envelope.aggregate_id == o.confirmed)
        .expect("the saga has events");
    assert_eq!(stream[last].envelope.event_type, "SagaEnded");
    stream.remove(last);
    settle(&mut model);
    assert_eq!(
        failed(&model),
        vec![names::SAGAS_TERMINAL, names::SAGA_MATCHES_ORDER]
    );
    assert_eq!(summarize(&model).sagas.stuck, 1);
}

#[test]
fn a_lost_acknowledged_command_fails_exactly_once() {
    let (sim, _) = shop();
    let mut model = sim.settled();
    let mut lost = model.client.acks[0].clone();
    lost.version += 100;
    model.client.acks.push(lost);
    let v = verdict(&model, names::ACKNOWLEDGED_ONCE);
    assert_eq!(v.violations.len(), 1, "{v:?}");
    assert!(v.violations[0].found.contains("lost"), "{v:?}");
    let AckCounts { lost, doubled, .. } = summarize(&model).commands;
    assert_eq!((lost, doubled), (1, 0));

    // An ack whose correlation id names another request's event is not that event.
    let mut model = sim.settled();
    model.client.acks.push(Ack {
        correlation_id: Some("someone-else".into()),
        ..model.client.acks[0].clone()
    });
    assert_eq!(failed(&model), vec![names::ACKNOWLEDGED_ONCE]);
}

#[test]
fn a_retry_answered_differently_fails_keyed_retries() {
    let (sim, _) = shop();
    let ok = HttpAnswer {
        status: 201,
        body: json!({"aggregate_id": "o-1", "version": 1}),
    };
    let timeout = HttpAnswer {
        status: 503,
        body: json!({"error": {"code": "command_timeout"}}),
    };
    let mut model = sim.settled();
    model.client.keyed.push(KeyedRequest {
        key: "k-1".into(),
        answers: vec![timeout.clone(), ok.clone(), timeout, ok.clone()],
    });
    model.read.idempotency_keys.push(KeyRow {
        key: "k-1".into(),
        command_id: Uuid::from_u128(1),
        status: Some(201),
        body: Some(ok.body.clone()),
    });
    assert!(failed(&model).is_empty(), "{:?}", failed(&model));

    let mut twice = model.clone();
    let second = HttpAnswer {
        body: json!({"aggregate_id": "o-1", "version": 2}),
        ..ok.clone()
    };
    twice.client.keyed[0].answers.push(second);
    assert_eq!(failed(&twice), vec![names::KEYED_RETRIES]);

    let mut kept_other = model.clone();
    kept_other.read.idempotency_keys[0].status = Some(422);
    assert_eq!(failed(&kept_other), vec![names::KEYED_RETRIES]);

    // Two different outcomes of one command id in the log.
    let mut log = model;
    let mut other = log.log.outcomes[0].clone();
    other.result.outcome = eventlog::Outcome::rule_violation("insufficient_stock", "no");
    log.log.outcomes.push(other);
    assert!(failed(&log).contains(&names::KEYED_RETRIES));
}

#[test]
fn money_refunded_without_a_charge_fails_money_conserved() {
    let (sim, _) = shop();
    let mut model = sim.settled();
    let i = find(&model, PAYMENT, "PaymentCharged", None);
    let stream = events(&mut model, PAYMENT);
    // The charge becomes a refund: the account gives back money it never took.
    let e = &mut stream[i].envelope;
    e.event_type = "PaymentRefunded".into();
    settle(&mut model);
    let failed = failed(&model);
    assert!(failed.contains(&names::MONEY_CONSERVED), "{failed:?}");
}

#[test]
fn an_undecodable_event_and_a_valid_dead_letter_fail_their_invariants() {
    let (sim, _) = shop();
    let mut model = sim.settled();
    let valid = model.log.events[ORDER][0].envelope.clone();
    model.log.dead_letters.push(DeadLetter {
        offset: 0,
        source: Some("tally.order.events/0/0".into()),
        payload: Some(serde_json::to_vec(&valid).expect("an envelope serialises")),
    });
    model.log.dead_letters.push(DeadLetter {
        offset: 1,
        source: None,
        payload: Some(b"not json".to_vec()),
    });
    assert_eq!(failed(&model), vec![names::DEAD_LETTERS]);

    // A parked command: only one whose envelope does not parse may be there.
    let mut model = sim.settled();
    let unparsable = br#"{"command_id": "not a uuid"}"#.to_vec();
    model.log.dead_letters.push(DeadLetter {
        offset: 0,
        source: Some("tally.order.commands/0/7".into()),
        payload: Some(unparsable),
    });
    assert!(failed(&model).is_empty(), "{:?}", failed(&model));
    let command = json!({
        "command_id": "5f0c2b1e-8d1a-4c5e-9a4b-2f7f0c1d2e3f",
        "aggregate_id": "WIDGET-1",
        "command": {"Restock": {"quantity": 1}},
        "expected_version": null,
        "correlation_id": null,
        "traceparent": null,
        "actor": null
    });
    model.log.dead_letters.push(DeadLetter {
        offset: 1,
        source: Some("tally.inventory.commands/0/8".into()),
        payload: Some(serde_json::to_vec(&command).expect("json serialises")),
    });
    assert_eq!(failed(&model), vec![names::DEAD_LETTERS]);

    let mut model = sim.settled();
    let stream = events(&mut model, ORDER);
    let last = stream.len() - 1;
    stream[last].envelope.payload = json!({"unexpected": true});
    assert!(failed(&model).contains(&names::EVENTS_DECODE));
}
