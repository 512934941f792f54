//! Each order against everything done for it: the stock and money the saga moved, and the
//! saga's own end.

use std::collections::BTreeMap;

use aggregates::fulfilment::{Fulfilment, SagaStatus};
use aggregates::{InventoryEvent, Order, OrderEvent, OrderStatus, PaymentEvent};

use super::history::fold;
use super::{names, Applied, History, Verdict};

/// What the log says of one order: its folded state, and the total it was placed with.
struct OrderFacts {
    order: Order,
    placed_total: Option<u64>,
}

fn facts(events: &[Applied<'_, OrderEvent>]) -> OrderFacts {
    let mut facts = OrderFacts {
        order: fold(events),
        placed_total: None,
    };
    for applied in events {
        if let OrderEvent::OrderPlaced(e) = &applied.event {
            facts.placed_total = Some(e.total_cents.0);
        }
    }
    facts
}

/// Stock moved for one order, per SKU: (reserved, released, sold, returned).
type Moves = BTreeMap<String, [i128; 4]>;

fn stock_moves(history: &History<'_>) -> BTreeMap<String, Moves> {
    let mut out: BTreeMap<String, Moves> = BTreeMap::new();
    for (sku, events) in &history.inventory {
        for applied in events {
            let (order, slot, q) = match &applied.event {
                InventoryEvent::StockRestocked(_) => continue,
                InventoryEvent::StockReserved(e) => (e.order_id, 0, e.quantity.0),
                InventoryEvent::StockReleased(e) => (e.order_id, 1, e.quantity.0),
                InventoryEvent::StockSold(e) => (e.order_id, 2, e.quantity.0),
                InventoryEvent::StockReturned(e) => (e.order_id, 3, e.quantity.0),
            };
            let moves = out.entry(order.to_string()).or_default();
            moves.entry(sku.clone()).or_default()[slot] += i128::from(q);
        }
    }
    out
}

/// Charged minus refunded, per order.
fn net_charges(history: &History<'_>) -> BTreeMap<String, i128> {
    let mut out: BTreeMap<String, i128> = BTreeMap::new();
    for applied in history.payment.values().flatten() {
        let (order, amount) = match &applied.event {
            PaymentEvent::FundsDeposited(_) => continue,
            PaymentEvent::PaymentCharged(e) => (e.order_id, i128::from(e.amount_cents.0)),
            PaymentEvent::PaymentRefunded(e) => (e.order_id, -i128::from(e.amount_cents.0)),
        };
        *out.entry(order.to_string()).or_default() += amount;
    }
    out
}

/// Once an order is settled, what was done for it is exactly what its status says: a
/// confirmed order paid its total and took its lines for good; a rejected or cancelled
/// one (or one never placed) holds no money, no reservation and no sold unit.
pub fn orders_settled(history: &History<'_>) -> Verdict {
    let mut v = Verdict::new(names::ORDERS_SETTLED);
    let (stock, money) = (stock_moves(history), net_charges(history));
    for (id, events) in &history.orders {
        let f = facts(events);
        if f.order.status == Some(OrderStatus::Placed) {
            continue; // not settled: the saga invariants speak of it
        }
        v.checked += 1;
        let subject = format!("order/{id} ({})", show(f.order.status));
        let net = money.get(id).copied().unwrap_or(0);
        let moves = stock.get(id).cloned().unwrap_or_default();
        let confirmed = f.order.status == Some(OrderStatus::Confirmed);
        let want_net = if confirmed {
            f.placed_total.unwrap_or(0)
        } else {
            0
        };
        if net != i128::from(want_net) {
            v.violate(&subject, format!("net charge {want_net}"), format!("{net}"));
        }
        for (sku, [reserved, released, sold, returned]) in &moves {
            let open = reserved - released - sold;
            let kept = sold - returned;
            let want_kept = if confirmed {
                line_quantity(&f.order, sku)
            } else {
                0
            };
            if open != 0 || kept != want_kept {
                v.violate(
                    &subject,
                    format!("{sku}: 0 reserved, {want_kept} sold for good"),
                    format!("{open} reserved, {kept} sold for good"),
                );
            }
        }
        if confirmed {
            for line in &f.order.lines {
                if !moves.contains_key(line.sku.as_str()) {
                    v.violate(&subject, format!("{} sold", line.sku), "no stock moved");
                }
            }
        }
    }
    v
}

fn line_quantity(order: &Order, sku: &str) -> i128 {
    order
        .lines
        .iter()
        .find(|l| l.sku.as_str() == sku)
        .map_or(0, |l| i128::from(l.quantity.0))
}

fn show(status: Option<OrderStatus>) -> String {
    status.map_or("no status".to_string(), |s| s.to_string())
}

/// Sagas by how they ended, for the run's headline figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SagaCounts {
    pub completed: usize,
    pub compensated: usize,
    /// Still running when the log was read.
    pub stuck: usize,
}

/// Counts the sagas by their end.
pub fn saga_counts(history: &History<'_>) -> SagaCounts {
    let mut counts = SagaCounts::default();
    for events in history.sagas.values() {
        let saga: Fulfilment = fold(events);
        match saga.status {
            Some(SagaStatus::Completed) => counts.completed += 1,
            Some(SagaStatus::Compensated) => counts.compensated += 1,
            _ => counts.stuck += 1,
        }
    }
    counts
}

/// Every saga ended (completed or compensated), and every order ever placed has one.
pub fn sagas_terminal(history: &History<'_>) -> Verdict {
    let mut v = Verdict::new(names::SAGAS_TERMINAL);
    for (id, events) in &history.sagas {
        v.checked += 1;
        let saga: Fulfilment = fold(events);
        if !matches!(
            saga.status,
            Some(SagaStatus::Completed | SagaStatus::Compensated)
        ) {
            let step = saga.steps.last().map(|s| s.name.as_str()).unwrap_or("none");
            v.violate(
                format!("saga/{id}"),
                "completed or compensated",
                format!("{:?}, last step {step}: stuck", saga.status),
            );
        }
    }
    for (id, events) in &history.orders {
        if facts(events).placed_total.is_some() && !history.sagas.contains_key(id) {
            v.checked += 1;
            v.violate(format!("order/{id}"), "a saga for a placed order", "none");
        }
    }
    v
}

/// Each order's final status is the one its saga's end implies: confirmed ⇔ completed;
/// rejected ⇔ compensated for that reason; cancelled after placing ⇒ compensated; never
/// placed ⇒ no saga.
pub fn saga_matches_order(history: &History<'_>) -> Verdict {
    let mut v = Verdict::new(names::SAGA_MATCHES_ORDER);
    for (id, events) in &history.orders {
        v.checked += 1;
        let f = facts(events);
        let saga: Option<Fulfilment> = history.sagas.get(id).map(|s| fold(s));
        let ended = saga
            .as_ref()
            .and_then(|s| s.status.map(|st| (st, s.failure_reason)));
        let placed = f.placed_total.is_some();
        let ok = match (f.order.status, ended) {
            (Some(OrderStatus::Confirmed), Some((SagaStatus::Completed, _))) => true,
            (Some(OrderStatus::Rejected), Some((SagaStatus::Compensated, Some(r)))) => {
                r.rejection() == f.order.rejection_reason
            }
            (Some(OrderStatus::Cancelled), Some((SagaStatus::Compensated, _))) => placed,
            (Some(OrderStatus::Cancelled | OrderStatus::Draft), None) => !placed,
            _ => false,
        };
        if !ok {
            v.violate(
                format!("order/{id}"),
                "a saga whose end matches the order",
                format!("order {}, saga {:?}", show(f.order.status), ended),
            );
        }
    }
    for id in history.sagas.keys() {
        if !history.orders.contains_key(id) {
            v.checked += 1;
            v.violate(
                format!("saga/{id}"),
                "its order in the log",
                "no such order",
            );
        }
    }
    v
}
