//! The event contract on disk: `schemas/json/` (generated JSON Schemas, must not drift)
//! and `schemas/samples/` (hand-written golden payloads, must always load) — for the
//! aggregates' events and the fulfilment saga's.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use aggregates::schema::{event_enum_variants, variants, EventSchema};
use aggregates::{Inventory, Order, PaymentAccount};
use cqrs_es::{Aggregate, DomainEvent};
use sagas::Fulfilment;
use serde_json::{json, Value};

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas")
}

/// Every event type ever written: the aggregates' and the saga's.
fn catalogue() -> Vec<EventSchema> {
    let mut all = aggregates::schema::catalogue();
    all.extend(sagas::fulfilment::schema_catalogue());
    all
}

fn files_under(dir: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for aggregate in fs::read_dir(dir).into_iter().flatten().flatten() {
        for file in fs::read_dir(aggregate.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            found.insert(format!(
                "{}/{}",
                aggregate.file_name().to_string_lossy(),
                file.file_name().to_string_lossy()
            ));
        }
    }
    found
}

#[test]
fn checked_in_schemas_match_the_code() {
    let dir = schemas_dir().join("json");
    let bless = std::env::var_os("TALLY_BLESS").is_some();
    let mut drifted = Vec::new();
    for event in catalogue() {
        let path = dir.join(event.file_name());
        let want = serde_json::to_string_pretty(&event.schema).unwrap() + "\n";
        if bless {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, want).unwrap();
        } else if fs::read_to_string(&path).ok().as_deref() != Some(want.as_str()) {
            drifted.push(event.file_name());
        }
    }
    assert!(
        drifted.is_empty(),
        "schemas/json differs from the Rust types for {drifted:?}. A written event's shape \
         must never change: add a new event_version instead. When the change is intended, \
         run `TALLY_BLESS=1 cargo test --test event_schemas` and commit schemas/json."
    );
    let expected: BTreeSet<String> = catalogue().iter().map(EventSchema::file_name).collect();
    assert_eq!(
        files_under(&dir),
        expected,
        "schemas/json has files for no catalogued event"
    );
}

#[test]
fn the_catalogue_names_every_event_variant() {
    let mut enums = event_enum_variants();
    enums.push((Fulfilment::TYPE, variants::<sagas::FulfilmentEvent>()));
    for (aggregate_type, variants) in enums {
        assert!(
            !variants.is_empty(),
            "no variants read for {aggregate_type}"
        );
        let variants: BTreeSet<String> = variants.into_iter().collect();
        let catalogued: BTreeSet<String> = catalogue()
            .into_iter()
            .filter(|e| e.aggregate_type == aggregate_type)
            .map(|e| e.event_type.to_string())
            .collect();
        assert_eq!(
            variants, catalogued,
            "catalogue of {aggregate_type} is incomplete"
        );
    }
}

#[test]
fn every_event_version_has_a_golden_sample_that_still_loads_and_applies() {
    let dir = schemas_dir().join("samples");
    for event in catalogue() {
        let path = dir.join(event.file_name());
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|_| panic!("no golden sample {}: write one by hand", path.display()));
        let payload: Value = serde_json::from_str(&text).unwrap();
        match event.aggregate_type {
            "order" => loads::<Order>(&event, payload),
            "inventory" => loads::<Inventory>(&event, payload),
            "payment_account" => loads::<PaymentAccount>(&event, payload),
            "saga.order_fulfilment" => loads::<Fulfilment>(&event, payload),
            other => panic!("unknown aggregate type {other}"),
        }
    }
    let expected: BTreeSet<String> = catalogue().iter().map(EventSchema::file_name).collect();
    assert_eq!(
        files_under(&dir),
        expected,
        "schemas/samples has samples of no catalogued event"
    );
}

fn loads<A: Aggregate>(schema: &EventSchema, payload: Value) {
    let tagged = json!({ schema.event_type: payload });
    let event: A::Event = serde_json::from_value(tagged.clone())
        .unwrap_or_else(|e| panic!("sample {} no longer deserialises: {e}", schema.file_name()));
    assert_eq!(event.event_type(), schema.event_type);
    assert_eq!(event.event_version(), schema.event_version);
    // Applying to a fresh aggregate must not panic, whatever came before in the log.
    A::default().apply(event.clone());
    // The current version writes exactly what the sample holds: no field renamed or lost.
    assert_eq!(
        serde_json::to_value(&event).unwrap(),
        tagged,
        "{}",
        schema.file_name()
    );
}

#[test]
fn an_unknown_field_in_an_event_is_refused_not_dropped() {
    let tagged = json!({ "LineRemoved": { "sku": "A", "surprise": 1 } });
    assert!(serde_json::from_value::<aggregates::OrderEvent>(tagged).is_err());
}
