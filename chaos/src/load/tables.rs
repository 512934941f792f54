//! The read-model tables and the idempotency keys, read whole from PostgreSQL.

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::model::{AccountRow, InventoryRow, JournalRow, KeyRow, OrderRow, ReadModel, SagaRow};

type OrderColumns = (
    Uuid,
    String,
    String,
    Value,
    i64,
    i64,
    Option<String>,
    Option<String>,
    DateTime<Utc>,
    DateTime<Utc>,
);

/// The read-model tables and the idempotency keys, whole.
pub async fn read_models(pool: &PgPool) -> anyhow::Result<ReadModel> {
    let orders: Vec<OrderColumns> = sqlx::query_as(
        "SELECT order_id, customer_id, status, lines, total_cents, version, rejection_reason,
                cancellation_reason, created_at, updated_at FROM orders",
    )
    .fetch_all(pool)
    .await
    .context("reading orders")?;
    let inventory: Vec<(String, i64, i64, i64)> =
        sqlx::query_as("SELECT sku, on_hand, reserved, version FROM inventory")
            .fetch_all(pool)
            .await
            .context("reading inventory")?;
    let accounts: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT customer_id, balance_cents, version FROM accounts")
            .fetch_all(pool)
            .await
            .context("reading accounts")?;
    let sagas: Vec<(Uuid, String, Option<String>, Value, i64)> =
        sqlx::query_as("SELECT saga_id, status, failure_reason, state, version FROM sagas")
            .fetch_all(pool)
            .await
            .context("reading sagas")?;
    let journal: Vec<(String, String, i64, Value, i32, i64)> = sqlx::query_as(
        r#"SELECT aggregate_type, aggregate_id, sequence, envelope, "partition", "offset"
           FROM event_journal"#,
    )
    .fetch_all(pool)
    .await
    .context("reading event_journal")?;
    let keys: Vec<(String, Uuid, Option<i16>, Option<Value>)> =
        sqlx::query_as("SELECT key, command_id, status, body FROM idempotency_keys")
            .fetch_all(pool)
            .await
            .context("reading idempotency_keys")?;
    Ok(ReadModel {
        orders: orders.into_iter().map(order_row).collect(),
        inventory: inventory
            .into_iter()
            .map(|(sku, on_hand, reserved, version)| InventoryRow {
                sku,
                on_hand,
                reserved,
                version,
            })
            .collect(),
        accounts: accounts
            .into_iter()
            .map(|(customer_id, balance_cents, version)| AccountRow {
                customer_id,
                balance_cents,
                version,
            })
            .collect(),
        sagas: sagas
            .into_iter()
            .map(
                |(saga_id, status, failure_reason, state, version)| SagaRow {
                    saga_id,
                    status,
                    failure_reason,
                    state,
                    version,
                },
            )
            .collect(),
        journal: journal
            .into_iter()
            .map(
                |(aggregate_type, aggregate_id, sequence, envelope, partition, offset)| {
                    JournalRow {
                        aggregate_type,
                        aggregate_id,
                        sequence,
                        envelope,
                        partition,
                        offset,
                    }
                },
            )
            .collect(),
        idempotency_keys: keys
            .into_iter()
            .map(|(key, command_id, status, body)| KeyRow {
                key,
                command_id,
                status: status.map(|s| s as u16),
                body,
            })
            .collect(),
    })
}

fn order_row(c: OrderColumns) -> OrderRow {
    OrderRow {
        order_id: c.0,
        customer_id: c.1,
        status: c.2,
        lines: c.3,
        total_cents: c.4,
        version: c.5,
        rejection_reason: c.6,
        cancellation_reason: c.7,
        created_at: c.8,
        updated_at: c.9,
    }
}
