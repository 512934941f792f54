//! Each read-model table equals a fold of the log, row by row: the rows the projectors
//! should have written (folded here with the aggregates' own `apply`) against the rows
//! PostgreSQL holds — none missing, none extra, every column equal.

use std::collections::BTreeMap;

use aggregates::fulfilment::Fulfilment;
use aggregates::{Inventory, Order, PaymentAccount};
use serde_json::{json, Value};
use uuid::Uuid;

use super::history::{fold, Aggregates};
use super::Applied;
use super::{names, Verdict};
use crate::check::History;
use crate::model::{AccountRow, InventoryRow, OrderRow, SagaRow};

/// A row compared column by column.
pub(super) trait Row {
    fn key(&self) -> String;
    fn columns(&self) -> Vec<(&'static str, String)>;
}

/// The rows `table` should hold against those it holds.
pub(super) fn compare<R: Row>(
    name: &'static str,
    table: &str,
    expected: Vec<R>,
    found: &[R],
) -> Verdict {
    let mut v = Verdict::new(name);
    let mut held: BTreeMap<String, &R> = found.iter().map(|r| (r.key(), r)).collect();
    for want in &expected {
        v.checked += 1;
        let subject = format!("{table} row {}", want.key());
        let Some(got) = held.remove(&want.key()) else {
            v.violate(subject, "a row", "none: missing");
            continue;
        };
        let differing: Vec<String> = want
            .columns()
            .into_iter()
            .zip(got.columns())
            .filter(|(w, g)| w != g)
            .map(|((column, w), (_, g))| format!("{column}: {w} ≠ {g}"))
            .collect();
        if !differing.is_empty() {
            v.violate(subject, "the fold's columns", differing.join("; "));
        }
    }
    for extra in held.keys() {
        v.checked += 1;
        v.violate(
            format!("{table} row {extra}"),
            "no row",
            "a row no event made",
        );
    }
    v
}

/// JSON text with every object's keys sorted: PostgreSQL's `jsonb` keeps its own key
/// order, which is no difference.
pub(super) fn canonical(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical(&map[k])))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(canonical).collect();
            format!("[{}]", items.join(","))
        }
        other => other.to_string(),
    }
}

/// The JSON string a serde enum is written as (`"confirmed"` → `confirmed`).
fn text_of<T: serde::Serialize>(value: &T) -> Option<String> {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
}

fn version<E>(events: &[Applied<'_, E>]) -> i64 {
    events.last().map_or(0, |a| a.sequence() as i64)
}

/// The `orders` table against the order events.
pub fn orders(history: &History<'_>, found: &[OrderRow]) -> Verdict {
    let expected = expected_orders(history);
    compare(names::ORDERS_VIEW, "orders", expected, found)
}

/// The rows of `orders` the projector should have written.
pub fn expected_orders(history: &History<'_>) -> Vec<OrderRow> {
    rows(&history.orders, |id, events| {
        let order: Order = fold(events);
        let first = events.first()?.logged.envelope.occurred_at;
        Some(OrderRow {
            order_id: Uuid::parse_str(id).ok()?,
            customer_id: order
                .customer_id
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_default(),
            status: text_of(&order.status).unwrap_or_default(),
            lines: json!(order.lines),
            total_cents: order.total_cents().0 as i64,
            version: version(events),
            rejection_reason: order.rejection_reason.as_ref().and_then(text_of),
            cancellation_reason: order.cancellation_reason.clone(),
            created_at: first,
            updated_at: events.last()?.logged.envelope.occurred_at,
        })
    })
}

/// The `inventory` table against the inventory events.
pub fn inventory(history: &History<'_>, found: &[InventoryRow]) -> Verdict {
    let expected = expected_inventory(history);
    compare(names::INVENTORY_VIEW, "inventory", expected, found)
}

/// The rows of `inventory` the projector should have written.
pub fn expected_inventory(history: &History<'_>) -> Vec<InventoryRow> {
    rows(&history.inventory, |id, events| {
        let stock: Inventory = fold(events);
        Some(InventoryRow {
            sku: id.to_string(),
            on_hand: stock.on_hand as i64,
            reserved: stock.reserved as i64,
            version: version(events),
        })
    })
}

/// The `accounts` table against the payment events.
pub fn accounts(history: &History<'_>, found: &[AccountRow]) -> Verdict {
    let expected = expected_accounts(history);
    compare(names::ACCOUNTS_VIEW, "accounts", expected, found)
}

/// The rows of `accounts` the projector should have written.
pub fn expected_accounts(history: &History<'_>) -> Vec<AccountRow> {
    rows(&history.payment, |id, events| {
        let account: PaymentAccount = fold(events);
        Some(AccountRow {
            customer_id: id.to_string(),
            balance_cents: account.balance_cents as i64,
            version: version(events),
        })
    })
}

/// The `sagas` table against the saga events.
pub fn sagas(history: &History<'_>, found: &[SagaRow]) -> Verdict {
    let expected = expected_sagas(history);
    compare(names::SAGAS_VIEW, "sagas", expected, found)
}

/// The rows of `sagas` the projector should have written.
pub fn expected_sagas(history: &History<'_>) -> Vec<SagaRow> {
    rows(&history.sagas, |id, events| {
        let saga: Fulfilment = fold(events);
        Some(SagaRow {
            saga_id: Uuid::parse_str(id).ok()?,
            status: saga.status.map_or("running", |s| s.as_str()).to_string(),
            failure_reason: saga.failure_reason.map(|r| r.as_str().to_string()),
            state: serde_json::to_value(&saga).ok()?,
            version: version(events),
        })
    })
}

/// One expected row per aggregate; an id the projector could not key (not a UUID)
/// gives none, as the projector writes none.
fn rows<E, R>(
    aggregates: &Aggregates<'_, E>,
    row: impl Fn(&str, &[Applied<'_, E>]) -> Option<R>,
) -> Vec<R> {
    aggregates
        .iter()
        .filter_map(|(id, events)| row(id, events))
        .collect()
}

impl Row for OrderRow {
    fn key(&self) -> String {
        self.order_id.to_string()
    }

    fn columns(&self) -> Vec<(&'static str, String)> {
        vec![
            ("customer_id", self.customer_id.clone()),
            ("status", self.status.clone()),
            ("lines", canonical(&self.lines)),
            ("total_cents", self.total_cents.to_string()),
            ("version", self.version.to_string()),
            ("rejection_reason", format!("{:?}", self.rejection_reason)),
            (
                "cancellation_reason",
                format!("{:?}", self.cancellation_reason),
            ),
            ("created_at", self.created_at.to_rfc3339()),
            ("updated_at", self.updated_at.to_rfc3339()),
        ]
    }
}

impl Row for InventoryRow {
    fn key(&self) -> String {
        self.sku.clone()
    }

    fn columns(&self) -> Vec<(&'static str, String)> {
        vec![
            ("on_hand", self.on_hand.to_string()),
            ("reserved", self.reserved.to_string()),
            ("version", self.version.to_string()),
        ]
    }
}

impl Row for AccountRow {
    fn key(&self) -> String {
        self.customer_id.clone()
    }

    fn columns(&self) -> Vec<(&'static str, String)> {
        vec![
            ("balance_cents", self.balance_cents.to_string()),
            ("version", self.version.to_string()),
        ]
    }
}

impl Row for SagaRow {
    fn key(&self) -> String {
        self.saga_id.to_string()
    }

    fn columns(&self) -> Vec<(&'static str, String)> {
        vec![
            ("status", self.status.clone()),
            ("failure_reason", format!("{:?}", self.failure_reason)),
            ("state", canonical(&self.state)),
            ("version", self.version.to_string()),
        ]
    }
}
