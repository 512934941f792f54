//! The `sagas` read model: each fulfilment saga's folded state, for
//! `GET /v1/orders/{id}/saga` (API.md) — status, failure reason and the step timeline.

use std::collections::HashMap;

use aggregates::fulfilment::Fulfilment;
use anyhow::Context;
use serde_json::{json, Value};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::fold::{fold_all, Folded};
use crate::kinds::Record;

/// The saga view of API.md.
pub fn view(saga_id: Uuid, saga: &Fulfilment, version: i64) -> Value {
    let steps: Vec<Value> = saga
        .steps
        .iter()
        .map(|s| {
            json!({
                "name": s.name.as_str(),
                "status": s.status.as_str(),
                "at": rfc3339(s.at),
                "started_at": rfc3339(s.started_at),
            })
        })
        .collect();
    json!({
        "saga_id": saga_id,
        "order_id": saga_id,
        "status": saga.status.map(|s| s.as_str()).unwrap_or("running"),
        "steps": steps,
        "failure_reason": saga.failure_reason.map(|r| r.as_str()),
        "version": version,
    })
}

fn rfc3339(at: chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

pub(crate) async fn apply(
    tx: &mut PgConnection,
    table: &str,
    records: &[Record],
) -> anyhow::Result<()> {
    let mut ids: Vec<Uuid> = records
        .iter()
        .filter_map(|r| r.envelope.aggregate_id.parse().ok())
        .collect();
    ids.sort();
    ids.dedup();
    let mut rows: HashMap<String, Folded<Fulfilment>> = HashMap::new();
    let query = format!(
        "SELECT saga_id, state, version, updated_at FROM {table} WHERE saga_id = ANY($1) FOR UPDATE"
    );
    for row in sqlx::query(&query).bind(&ids).fetch_all(&mut *tx).await? {
        let id: Uuid = row.try_get("saga_id")?;
        let state: Value = row.try_get("state")?;
        rows.insert(
            id.to_string(),
            Folded {
                state: serde_json::from_value(state).context("a stored saga state")?,
                version: row.try_get("version")?,
                updated_at: row.try_get("updated_at")?,
            },
        );
    }
    let changed = fold_all(&mut rows, records)?;
    if changed.is_empty() {
        return Ok(());
    }
    let rows: Vec<&Folded<Fulfilment>> = changed.iter().map(|id| &rows[id]).collect();
    let ids: Vec<Uuid> = changed
        .iter()
        .map(|id| id.parse().context("a saga id that is not a UUID"))
        .collect::<anyhow::Result<_>>()?;
    sqlx::query(&format!(
        "INSERT INTO {table} (saga_id, status, failure_reason, state, version, updated_at)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::int8[], $6::timestamptz[])
         ON CONFLICT (saga_id) DO UPDATE SET status = EXCLUDED.status,
           failure_reason = EXCLUDED.failure_reason, state = EXCLUDED.state,
           version = EXCLUDED.version, updated_at = EXCLUDED.updated_at"
    ))
    .bind(&ids)
    .bind(
        rows.iter()
            .map(|r| r.state.status.map(|s| s.as_str()).unwrap_or("running"))
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|r| r.state.failure_reason.map(|f| f.as_str()))
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|r| serde_json::to_value(&r.state))
            .collect::<Result<Vec<_>, _>>()?,
    )
    .bind(rows.iter().map(|r| r.version).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await
    .context("upserting sagas")?;
    Ok(())
}
