//! The `event_journal` read model: every envelope, by aggregate and sequence.

use anyhow::Context;
use sqlx::PgConnection;

use crate::kinds::Record;

pub(crate) async fn apply(
    tx: &mut PgConnection,
    table: &str,
    records: &[Record],
) -> anyhow::Result<()> {
    let envelopes: Vec<serde_json::Value> = records
        .iter()
        .map(|r| serde_json::to_value(&r.envelope))
        .collect::<Result<_, _>>()?;
    sqlx::query(&format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, sequence, envelope, topic, \"partition\", \"offset\")
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::jsonb[], $5::text[], $6::int4[], $7::int8[])
         ON CONFLICT DO NOTHING"
    ))
    .bind(records.iter().map(|r| r.envelope.aggregate_type.clone()).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.envelope.aggregate_id.clone()).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.envelope.sequence as i64).collect::<Vec<_>>())
    .bind(envelopes)
    .bind(records.iter().map(|r| r.topic.clone()).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.partition).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.offset).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await
    .context("appending to the event journal")?;
    Ok(())
}
