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
    let (fates, mut seen) = fates(model, &index);
    for (ack, fate) in fates {
        v.checked += 1;
        let subject = format!(
            "{} {}@{}",
            ack.stream.as_deref().unwrap_or("command"),
            ack.aggregate_id,
            ack.version
        );
        match fate {
            Fate::Once => {}
            Fate::Lost => v.violate(subject, "its event in the log", "no event there: lost"),
            Fate::Doubled(found) => v.violate(subject, "its command applied once", found),
            Fate::Mismatched { expected, found } => v.violate(subject, expected, found),
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

/// What became of one acknowledged command.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    /// Its events are in the log once.
    Once,
    /// No event where it was answered to be.
    Lost,
    /// Its command's events are there more than once.
    Doubled(String),
    /// The event where it was answered to be belongs to another command.
    Mismatched { expected: String, found: String },
}

/// Each distinct acknowledged command with its fate, and the identities judged.
fn fates(model: &Model, index: &Index<'_>) -> (Vec<(Ack, Fate)>, BTreeSet<String>) {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for ack in acks(model) {
        // A command is known by its id (the client's ack and the log's outcome of one
        // command are one); without one, by where it landed and who sent it.
        let (fate, command) = fate(index, &ack);
        let identity = command
            .or(ack.command_id.map(|c| c.to_string()))
            .unwrap_or_else(|| {
                format!(
                    "{:?}/{}@{}/{:?}",
                    ack.stream, ack.aggregate_id, ack.version, ack.correlation_id
                )
            });
        if seen.insert(identity) {
            out.push((ack, fate));
        }
    }
    (out, seen)
}

/// Commands acknowledged, and of those, lost and doubled: the run's headline figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AckCounts {
    pub acknowledged: usize,
    pub lost: usize,
    pub doubled: usize,
}

/// Counts what became of the acknowledged commands.
pub fn ack_counts(model: &Model) -> AckCounts {
    let index = Index::of(&model.log);
    let (fates, _) = fates(model, &index);
    let mut counts = AckCounts {
        acknowledged: fates.len(),
        ..AckCounts::default()
    };
    for (_, fate) in fates {
        match fate {
            Fate::Lost => counts.lost += 1,
            Fate::Doubled(_) => counts.doubled += 1,
            Fate::Once | Fate::Mismatched { .. } => {}
        }
    }
    counts
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

/// Judges one acknowledged command against the log; with the id of its command when the
/// log names it (its event is where the ack says, and no other command's).
fn fate(index: &Index<'_>, ack: &Ack) -> (Fate, Option<String>) {
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
        return (Fate::Lost, None);
    };
    let found_command = event.metadata.command_id.clone().unwrap_or_default();
    let command = wanted.unwrap_or_else(|| found_command.clone());
    if command != found_command {
        let fate = Fate::Mismatched {
            expected: format!("the event of command {command}"),
            found: format!("the event of command {found_command:?}"),
        };
        return (fate, None);
    }
    if let Some(corr) = &ack.correlation_id {
        if event.metadata.correlation_id.as_ref() != Some(corr) {
            let fate = Fate::Mismatched {
                expected: format!("an event with correlation id {corr}"),
                found: format!("{:?}", event.metadata.correlation_id),
            };
            return (fate, None);
        }
    }
    let carrying = index
        .by_command
        .get(command.as_str())
        .cloned()
        .unwrap_or_default();
    let fate = match applied_once(&carrying, ack) {
        Ok(()) => Fate::Once,
        Err(found) => Fate::Doubled(format!("command {command}: {found}")),
    };
    (fate, Some(command))
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
