//! The `event_journal` table holds every envelope of the aggregates' streams, once per
//! (aggregate type, id, sequence): the first the projector read, as it was in the log.

use std::collections::BTreeMap;

use aggregates::streams::{INVENTORY, ORDER, PAYMENT};

use super::views::{canonical, compare, Row};
use super::{names, Verdict};
use crate::model::{JournalRow, Log};

/// The streams the journal projection reads (the saga's are not journaled).
const JOURNALED: [&str; 3] = [ORDER, INVENTORY, PAYMENT];

/// The `event_journal` table against the log.
pub fn journal(log: &Log, found: &[JournalRow]) -> Verdict {
    compare(
        names::JOURNAL_VIEW,
        "event_journal",
        expected_journal(log),
        found,
    )
}

/// One row per (aggregate type, id, sequence): the first record of it in log order
/// (the projector inserts with `ON CONFLICT DO NOTHING`).
pub fn expected_journal(log: &Log) -> Vec<JournalRow> {
    let mut rows: BTreeMap<String, JournalRow> = BTreeMap::new();
    for stream in JOURNALED {
        let mut events: Vec<_> = log.events.get(stream).into_iter().flatten().collect();
        events.sort_by_key(|e| (e.partition, e.offset));
        for e in events {
            let Ok(envelope) = serde_json::to_value(&e.envelope) else {
                continue;
            };
            let row = JournalRow {
                aggregate_type: e.envelope.aggregate_type.clone(),
                aggregate_id: e.envelope.aggregate_id.clone(),
                sequence: e.envelope.sequence as i64,
                envelope,
                partition: e.partition,
                offset: e.offset,
            };
            rows.entry(row.key()).or_insert(row);
        }
    }
    rows.into_values().collect()
}

impl Row for JournalRow {
    fn key(&self) -> String {
        format!(
            "{}/{}@{}",
            self.aggregate_type, self.aggregate_id, self.sequence
        )
    }

    fn columns(&self) -> Vec<(&'static str, String)> {
        vec![
            ("envelope", canonical(&self.envelope)),
            ("partition", self.partition.to_string()),
            ("offset", self.offset.to_string()),
        ]
    }
}
