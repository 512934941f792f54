//! The log decoded once, per aggregate, as a reader folds it.

use std::collections::BTreeMap;

use aggregates::fulfilment::FulfilmentEvent;
use aggregates::streams::{FULFILMENT, INVENTORY, ORDER, PAYMENT};
use aggregates::{InventoryEvent, OrderEvent, PaymentEvent};
use cqrs_es::{Aggregate, DomainEvent};

use crate::model::{Log, LoggedEvent};

/// One event a reader applies: the record and its decoded event.
#[derive(Debug, Clone)]
pub struct Applied<'a, E> {
    pub logged: &'a LoggedEvent,
    pub event: E,
}

impl<E> Applied<'_, E> {
    /// The aggregate's version after this event.
    pub fn sequence(&self) -> u64 {
        self.logged.envelope.sequence
    }
}

/// The events of one stream by aggregate id.
pub type Aggregates<'a, E> = BTreeMap<String, Vec<Applied<'a, E>>>;

/// Every stream's aggregates, decoded.
#[derive(Debug, Default)]
pub struct History<'a> {
    pub orders: Aggregates<'a, OrderEvent>,
    pub inventory: Aggregates<'a, InventoryEvent>,
    pub payment: Aggregates<'a, PaymentEvent>,
    pub sagas: Aggregates<'a, FulfilmentEvent>,
    /// Records that do not decode as their stream's events: `(stream, record, error)`.
    pub undecodable: Vec<(&'a str, &'a LoggedEvent, String)>,
}

impl<'a> History<'a> {
    /// Decodes `log`'s four event streams.
    pub fn of(log: &'a Log) -> Self {
        let mut history = History::default();
        let mut bad = Vec::new();
        let stream = |name: &str| log.events.get(name).map(Vec::as_slice).unwrap_or(&[]);
        history.orders = decode(ORDER, stream(ORDER), &mut bad);
        history.inventory = decode(INVENTORY, stream(INVENTORY), &mut bad);
        history.payment = decode(PAYMENT, stream(PAYMENT), &mut bad);
        history.sagas = decode(FULFILMENT, stream(FULFILMENT), &mut bad);
        for (name, events) in &log.events {
            if ![ORDER, INVENTORY, PAYMENT, FULFILMENT].contains(&name.as_str()) {
                for e in events {
                    bad.push((name.as_str(), e, "not a stream Tally writes".to_string()));
                }
            }
        }
        history.undecodable = bad;
        history
    }
}

/// Groups `events` by aggregate in log order (partition, then offset) and keeps, per
/// aggregate, each event whose sequence is past the last one kept: what a fold applies.
fn decode<'a, E: DomainEvent>(
    stream: &'a str,
    events: &'a [LoggedEvent],
    bad: &mut Vec<(&'a str, &'a LoggedEvent, String)>,
) -> Aggregates<'a, E> {
    let mut ordered: Vec<&LoggedEvent> = events.iter().collect();
    ordered.sort_by_key(|e| (e.partition, e.offset));
    let mut out: Aggregates<'a, E> = BTreeMap::new();
    for logged in ordered {
        let event = match logged.envelope.decode::<E>() {
            Ok(event) => event,
            Err(e) => {
                bad.push((stream, logged, e.to_string()));
                continue;
            }
        };
        let applied = out.entry(logged.envelope.aggregate_id.clone()).or_default();
        let version = applied.last().map_or(0, Applied::sequence);
        if logged.envelope.sequence > version {
            applied.push(Applied { logged, event });
        }
    }
    out
}

/// Folds an aggregate's events with its own `apply`, as the write side does.
pub fn fold<A: Aggregate + Default>(events: &[Applied<'_, A::Event>]) -> A {
    let mut state = A::default();
    for applied in events {
        state.apply(applied.event.clone());
    }
    state
}
