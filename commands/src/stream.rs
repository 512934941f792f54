//! What the write side needs to know of each aggregate type beyond cqrs-es: its stream
//! name (topic names) and how its refusals read as typed outcomes.

use aggregates::{
    streams, Inventory, InventoryError, Order, OrderError, PaymentAccount, PaymentError,
};
use cqrs_es::Aggregate;
use eventlog::{Code, Outcome};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// An aggregate type the command processor can serve.
pub trait CommandStream:
    Aggregate<
        Services = (),
        Command: DeserializeOwned + Serialize + Send,
        Event: Send,
        Error: Send + Sync,
    > + Clone
    + 'static
{
    /// The stream name in topic names: `<prefix>.<STREAM>.commands` / `.events`.
    const STREAM: &'static str;

    /// The version of the state's JSON form in the changelog and local store. Bump it when
    /// the aggregate's fields change meaning: owners then fold the events again instead of
    /// trusting snapshots of the old form (ADR 10).
    const STATE_SCHEMA: u32 = 1;

    /// The outcome of a command this aggregate refused (an [`Outcome::Rejected`]).
    fn rejection(err: &Self::Error) -> Outcome;

    /// The customer this aggregate belongs to, if it belongs to one that a `customer`
    /// token must match (an order's customer).
    fn owner(&self) -> Option<&str> {
        None
    }
}

fn rule(rule: &str, err: &impl std::fmt::Display) -> Outcome {
    Outcome::rule_violation(rule, err.to_string())
}

impl CommandStream for Order {
    const STREAM: &'static str = streams::ORDER;

    fn rejection(err: &OrderError) -> Outcome {
        if err.is_not_found() {
            Outcome::rejected(Code::NotFound, err.to_string())
        } else {
            rule(err.rule(), err)
        }
    }

    fn owner(&self) -> Option<&str> {
        self.customer_id.as_ref().map(|c| c.as_str())
    }
}

impl CommandStream for Inventory {
    const STREAM: &'static str = streams::INVENTORY;

    fn rejection(err: &InventoryError) -> Outcome {
        rule(err.rule(), err)
    }
}

impl CommandStream for PaymentAccount {
    const STREAM: &'static str = streams::PAYMENT;

    fn rejection(err: &PaymentError) -> Outcome {
        rule(err.rule(), err)
    }
}

/// The outcome of a command whose `If-Match` names another version than the aggregate's.
pub fn version_conflict(expected: u64, current: u64) -> Outcome {
    Outcome::rejected(
        Code::VersionConflict,
        format!("If-Match was {expected} but the aggregate is at version {current}; read it again and retry"),
    )
    .with_details(serde_json::json!({ "current_version": current, "expected_version": expected }))
}
