//! The `orders` read model: one row per order, folded with `Order::apply`.

use std::collections::HashMap;

use aggregates::{Order, OrderEvent, OrderLine};
use anyhow::Context;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use serde_json::{json, Value};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::kinds::Record;

/// An order as the read model holds it.
#[derive(Debug, Clone, Default)]
pub struct OrderRow {
    pub order: Order,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl OrderRow {
    /// Folds one event in; false when it was applied already.
    pub fn fold(&mut self, record: &Record) -> anyhow::Result<bool> {
        let sequence = record.envelope.sequence as i64;
        if sequence <= self.version {
            return Ok(false);
        }
        let event: OrderEvent = record
            .envelope
            .decode()
            .context("decoding an order event")?;
        if self.version == 0 {
            self.created_at = record.at();
        }
        self.order.apply(event);
        self.version = sequence;
        self.updated_at = record.at();
        Ok(true)
    }

    /// The order view of API.md.
    pub fn view(&self) -> Value {
        let o = &self.order;
        json!({
            "order_id": o.order_id,
            "customer_id": o.customer_id,
            "status": o.status,
            "lines": o.lines,
            "total_cents": o.total_cents(),
            "version": self.version,
            "rejection_reason": o.rejection_reason,
            "cancellation_reason": o.cancellation_reason,
            "created_at": crate::rfc3339(self.created_at),
            "updated_at": crate::rfc3339(self.updated_at),
        })
    }
}

const COLUMNS: &str = "order_id, customer_id, status, lines, total_cents, version, rejection_reason, cancellation_reason, created_at, updated_at";

/// Reads rows into [`OrderRow`]s.
pub fn from_row(row: &sqlx::postgres::PgRow) -> anyhow::Result<OrderRow> {
    let text = |c: &str| -> anyhow::Result<Value> {
        Ok(row
            .try_get::<Option<String>, _>(c)?
            .map(Value::String)
            .unwrap_or(Value::Null))
    };
    let lines: Vec<OrderLine> = serde_json::from_value(row.try_get("lines")?)?;
    let order = Order {
        order_id: Some(aggregates::OrderId(row.try_get("order_id")?)),
        customer_id: serde_json::from_value(text("customer_id")?)?,
        status: serde_json::from_value(text("status")?)?,
        lines,
        rejection_reason: serde_json::from_value(text("rejection_reason")?)?,
        cancellation_reason: row.try_get("cancellation_reason")?,
    };
    Ok(OrderRow {
        order,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// Selects orders by a `WHERE` clause over the read model.
pub fn select(table: &str, clause: &str) -> String {
    format!("SELECT {COLUMNS} FROM {table} {clause}")
}

fn text_of<T: serde::Serialize>(v: &T) -> Option<String> {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
}

pub(crate) async fn apply(
    tx: &mut PgConnection,
    table: &str,
    records: &[Record],
) -> anyhow::Result<()> {
    let mut ids: Vec<Uuid> = Vec::new();
    for r in records {
        let id =
            Uuid::parse_str(&r.envelope.aggregate_id).context("an order id that is not a UUID")?;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    let mut rows: HashMap<Uuid, OrderRow> = HashMap::new();
    for row in sqlx::query(&select(table, "WHERE order_id = ANY($1) FOR UPDATE"))
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?
    {
        let row = from_row(&row)?;
        rows.insert(row.order.order_id.map(|o| o.0).unwrap_or_default(), row);
    }
    let mut changed = Vec::new();
    for r in records {
        let id = Uuid::parse_str(&r.envelope.aggregate_id)?;
        if rows.entry(id).or_default().fold(r)? && !changed.contains(&id) {
            changed.push(id);
        }
    }
    if changed.is_empty() {
        return Ok(());
    }
    let rows: Vec<&OrderRow> = changed.iter().map(|id| &rows[id]).collect();
    sqlx::query(&format!(
        "INSERT INTO {table} ({COLUMNS})
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::int8[], $6::int8[], $7::text[], $8::text[], $9::timestamptz[], $10::timestamptz[])
         ON CONFLICT (order_id) DO UPDATE SET customer_id = EXCLUDED.customer_id, status = EXCLUDED.status,
           lines = EXCLUDED.lines, total_cents = EXCLUDED.total_cents, version = EXCLUDED.version,
           rejection_reason = EXCLUDED.rejection_reason, cancellation_reason = EXCLUDED.cancellation_reason,
           created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at"
    ))
    .bind(&changed)
    .bind(rows.iter().map(|r| r.order.customer_id.as_ref().map(|c| c.to_string()).unwrap_or_default()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| text_of(&r.order.status).unwrap_or_default()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| json!(r.order.lines)).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.order.total_cents().0 as i64).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.version).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.order.rejection_reason.as_ref().and_then(text_of)).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.order.cancellation_reason.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.created_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await
    .context("upserting orders")?;
    Ok(())
}
