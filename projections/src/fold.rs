//! Folding records into read-model rows with the aggregates' own `apply`.

use std::collections::HashMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;

use crate::kinds::Record;

/// One aggregate as a read model holds it.
#[derive(Default)]
pub(crate) struct Folded<A> {
    pub state: A,
    /// Sequence of the last event applied; an event at or below it is skipped.
    pub version: i64,
    pub updated_at: DateTime<Utc>,
}

/// Folds `records` into `rows` (by aggregate id), skipping events applied already, and
/// answers the ids that changed, in the order they first changed.
pub(crate) fn fold_all<A: Aggregate + Default>(
    rows: &mut HashMap<String, Folded<A>>,
    records: &[Record],
) -> anyhow::Result<Vec<String>> {
    let mut changed: Vec<String> = Vec::new();
    for r in records {
        let row = rows.entry(r.envelope.aggregate_id.clone()).or_default();
        let sequence = r.envelope.sequence as i64;
        if sequence <= row.version {
            continue;
        }
        let event: A::Event = r
            .envelope
            .decode()
            .with_context(|| format!("decoding a {} event", A::TYPE))?;
        row.state.apply(event);
        row.version = sequence;
        row.updated_at = r.at();
        if !changed.contains(&r.envelope.aggregate_id) {
            changed.push(r.envelope.aggregate_id.clone());
        }
    }
    Ok(changed)
}
