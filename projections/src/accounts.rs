//! The `accounts` read model: balances per customer, folded with `PaymentAccount::apply`.

use std::collections::HashMap;

use aggregates::PaymentAccount;
use anyhow::Context;
use serde_json::{json, Value};
use sqlx::{PgConnection, Row};

use crate::fold::{fold_all, Folded};
use crate::kinds::Record;

/// The account view of API.md from a row of the read model.
pub fn view(row: &sqlx::postgres::PgRow) -> anyhow::Result<Value> {
    Ok(json!({
        "customer_id": row.try_get::<String, _>("customer_id")?,
        "balance_cents": row.try_get::<i64, _>("balance_cents")?,
        "version": row.try_get::<i64, _>("version")?,
    }))
}

pub(crate) async fn apply(
    tx: &mut PgConnection,
    table: &str,
    records: &[Record],
) -> anyhow::Result<()> {
    let mut ids: Vec<String> = records
        .iter()
        .map(|r| r.envelope.aggregate_id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    let mut rows: HashMap<String, Folded<PaymentAccount>> = HashMap::new();
    let query = format!("SELECT customer_id, balance_cents, version, updated_at FROM {table} WHERE customer_id = ANY($1) FOR UPDATE");
    for row in sqlx::query(&query).bind(&ids).fetch_all(&mut *tx).await? {
        let id: String = row.try_get("customer_id")?;
        let account = PaymentAccount {
            customer_id: aggregates::CustomerId::new(id.clone()).ok(),
            balance_cents: row.try_get::<i64, _>("balance_cents")? as u64,
            // The read model stores the balance only: the outstanding total serves refund
            // decisions, which are not made here.
            outstanding_cents: 0,
        };
        rows.insert(
            id,
            Folded {
                state: account,
                version: row.try_get("version")?,
                updated_at: row.try_get("updated_at")?,
            },
        );
    }
    let changed = fold_all(&mut rows, records)?;
    if changed.is_empty() {
        return Ok(());
    }
    let rows: Vec<&Folded<PaymentAccount>> = changed.iter().map(|id| &rows[id]).collect();
    sqlx::query(&format!(
        "INSERT INTO {table} (customer_id, balance_cents, version, updated_at)
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::timestamptz[])
         ON CONFLICT (customer_id) DO UPDATE SET balance_cents = EXCLUDED.balance_cents,
           version = EXCLUDED.version, updated_at = EXCLUDED.updated_at"
    ))
    .bind(&changed)
    .bind(
        rows.iter()
            .map(|r| r.state.balance_cents as i64)
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.version).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await
    .context("upserting accounts")?;
    Ok(())
}
