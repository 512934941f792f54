//! The `inventory` read model: stock levels per SKU, folded with `Inventory::apply`.

use std::collections::HashMap;

use aggregates::Inventory;
use anyhow::Context;
use serde_json::{json, Value};
use sqlx::{PgConnection, Row};

use crate::fold::{fold_all, Folded};
use crate::kinds::Record;

/// The inventory view of API.md from a row of the read model.
pub fn view(row: &sqlx::postgres::PgRow) -> anyhow::Result<Value> {
    let (on_hand, reserved): (i64, i64) = (row.try_get("on_hand")?, row.try_get("reserved")?);
    Ok(json!({
        "sku": row.try_get::<String, _>("sku")?,
        "on_hand": on_hand,
        "reserved": reserved,
        "available": (on_hand - reserved).max(0),
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
    let mut rows: HashMap<String, Folded<Inventory>> = HashMap::new();
    let query = format!("SELECT sku, on_hand, reserved, version, updated_at FROM {table} WHERE sku = ANY($1) FOR UPDATE");
    for row in sqlx::query(&query).bind(&ids).fetch_all(&mut *tx).await? {
        let sku: String = row.try_get("sku")?;
        let stock = Inventory {
            sku: aggregates::Sku::new(sku.clone()).ok(),
            on_hand: row.try_get::<i64, _>("on_hand")? as u64,
            reserved: row.try_get::<i64, _>("reserved")? as u64,
            reservations: Default::default(),
        };
        rows.insert(
            sku,
            Folded {
                state: stock,
                version: row.try_get("version")?,
                updated_at: row.try_get("updated_at")?,
            },
        );
    }
    let changed = fold_all(&mut rows, records)?;
    for id in &changed {
        // The read model keeps only the totals.
        if let Some(row) = rows.get_mut(id) {
            row.state.reservations.clear();
        }
    }
    if changed.is_empty() {
        return Ok(());
    }
    let rows: Vec<&Folded<Inventory>> = changed.iter().map(|id| &rows[id]).collect();
    sqlx::query(&format!(
        "INSERT INTO {table} (sku, on_hand, reserved, version, updated_at)
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::timestamptz[])
         ON CONFLICT (sku) DO UPDATE SET on_hand = EXCLUDED.on_hand, reserved = EXCLUDED.reserved,
           version = EXCLUDED.version, updated_at = EXCLUDED.updated_at"
    ))
    .bind(&changed)
    .bind(
        rows.iter()
            .map(|r| r.state.on_hand as i64)
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|r| r.state.reserved as i64)
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.version).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await
    .context("upserting inventory")?;
    Ok(())
}
