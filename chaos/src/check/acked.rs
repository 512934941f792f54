//! Each acknowledged command is in the log exactly once.

use std::collections::{BTreeMap, BTreeSet};

use eventlog::{EventEnvelope, Outcome};

use super::{names, Verdict};
use crate::model::{Ack, Log, Model};

/// Every acknowledged command — a `2xx` the client recorded, or an acceptance the log
/// holds (outcomes topics, saga inbox, command results) — has its events in the log
/// exactly once: an event at the version it was answered with, and the events carrying
/// its command id form one run of consecutive sequences of that one aggregate, decided
/// once (distinct event ids, one decision instant), ending at that version.
pub fn acknowledged_once(model: &Model) -> Verdict {
    let mut v = Verdict::new(names::ACKNOWLEDGED_ONCE);
    let index = Index::of(&model.log);
    let mut seen = BTreeSet::new();
    for ack in acks(model) {
        // Without a command id, the request is known by where it landed and who sent it.
        let identity = ack.command_id.map(|c| c.to_string()).unwrap_or_else(|| {
            format!(
                "{:?}/{}@{}/{:?}",
                ack.stream, ack.aggregate_id, ack.version, ack.correlation_id
            )
        });
        if seen.insert(identity) {
            v.checked += 1;
            check_ack(&mut v, &index, &ack);
        }
    }
    for o in &model.log.outcomes {
        let command = o.result.command_id.to_string();
        let applied = index.by_command.get(command.as_str()).map_or(0, Vec::len);
        if !o.result.outcome.is_accepted() && applied > 0 && seen.insert(command.clone()) {
            v.checked += 1;
            v.violate(
                format!("command {command}"),
                "no event for a refused command",
                format!("{applied} events, refused {:?}", o.result.outcome.refusal()),
            );
        }
    }
    v
}

/// The client's acks, then the acceptances found in the log.
fn acks(model: &Model) -> Vec<Ack> {
    let mut acks = model.client.acks.clone();
    for o in &model.log.outcomes {
        if let Outcome::Accepted {
            aggregate_id,
            version,
            ..
        } = &o.result.outcome
        {
            acks.push(Ack {
                stream: o.stream.clone(),
                aggregate_id: aggregate_id.clone(),
                version: *version,
                command_id: Some(o.result.command_id),
                correlation_id: None,
                idempotency_key: None,
            });
        }
    }
    acks
}

/// Events by command id and by (aggregate id, sequence), with their streams.
struct Index<'a> {
    by_command: BTreeMap<&'a str, Vec<(&'a str, &'a EventEnvelope)>>,
    by_position: BTreeMap<(&'a str, u64), Vec<(&'a str, &'a EventEnvelope)>>,
}

impl<'a> Index<'a> {
    fn of(log: &'a Log) -> Self {
        let mut index = Index {
            by_command: BTreeMap::new(),
            by_position: BTreeMap::new(),
        };
        for (stream, events) in &log.events {
            for e in events.iter().map(|e| &e.envelope) {
                if let Some(c) = &e.metadata.command_id {
                    index.by_command.entry(c).or_default().push((stream, e));
                }
                let position = (e.aggregate_id.as_str(), e.sequence);
                index
                    .by_position
                    .entry(position)
                    .or_default()
                    .push((stream, e));
            }
        }
        index
    }
}

fn check_ack(v: &mut Verdict, index: &Index<'_>, ack: &Ack) {
    let subject = format!(
        "{} {}@{}",
        ack.stream.as_deref().unwrap_or("command"),
        ack.aggregate_id,
        ack.version
    );
    let at: Vec<&EventEnvelope> = index
        .by_position
        .get(&(ack.aggregate_id.as_str(), ack.version))
        .into_iter()
        .flatten()
        .filter(|(s, _)| ack.stream.as_deref().is_none_or(|want| want == *s))
        .map(|(_, e)| *e)
        .collect();
    // A saga's events share its order's id: prefer the event of the acked command.
    let wanted = ack.command_id.map(|c| c.to_string());
    let event = at
        .iter()
        .find(|e| wanted.is_some() && e.metadata.command_id == wanted)
        .or(at.first());
    let Some(event) = event else {
        return v.violate(
            subject,
            "its event in the log",
            "no event at that version: lost",
        );
    };
    let found_command = event.metadata.command_id.clone().unwrap_or_default();
    let command = ack
        .command_id
        .map_or(found_command.clone(), |c| c.to_string());
    if command != found_command {
        return v.violate(
            subject,
            format!("the event of command {command}"),
            format!("the event of command {found_command:?}"),
        );
    }
    if let Some(corr) = &ack.correlation_id {
        if event.metadata.correlation_id.as_ref() != Some(corr) {
            return v.violate(
                subject,
                format!("an event with correlation id {corr}"),
                format!("{:?}", event.metadata.correlation_id),
            );
        }
    }
    let carrying = index
        .by_command
        .get(command.as_str())
        .cloned()
        .unwrap_or_default();
    if let Err(found) = applied_once(&carrying, ack) {
        v.violate(subject, format!("command {command} applied once"), found);
    }
}

/// The events of one command: one aggregate, consecutive sequences ending at the acked
/// version, distinct event ids, one decision instant.
fn applied_once(events: &[(&str, &EventEnvelope)], ack: &Ack) -> Result<(), String> {
    let ids: BTreeSet<&str> = events
        .iter()
        .map(|(_, e)| e.aggregate_id.as_str())
        .collect();
    if ids.len() != 1 {
        return Err(format!("its events on aggregates {ids:?}"));
    }
    let event_ids: BTreeSet<_> = events.iter().map(|(_, e)| e.event_id).collect();
    let instants: BTreeSet<_> = events.iter().map(|(_, e)| e.occurred_at).collect();
    let mut sequences: Vec<u64> = events.iter().map(|(_, e)| e.sequence).collect();
    sequences.sort_unstable();
    let consecutive = sequences.windows(2).all(|w| w[1] == w[0] + 1);
    if event_ids.len() != events.len() || instants.len() != 1 || !consecutive {
        return Err(format!(
            "{} events at sequences {sequences:?} from {} decisions: doubled",
            events.len(),
            instants.len()
        ));
    }
    if sequences.last() != Some(&ack.version) {
        return Err(format!("its events at sequences {sequences:?}"));
    }
    Ok(())
}
