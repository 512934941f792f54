//! The projections: which streams each reads, which tables it writes, and how a batch of
//! records is applied (folded with the aggregates' own `apply`).

use chrono::{DateTime, Utc};
use eventlog::EventEnvelope;
use sqlx::PgConnection;

use crate::{accounts, inventory, journal, orders, saga_views};

/// One committed event record, decoded to its envelope.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub envelope: EventEnvelope,
}

impl Record {
    /// When the event happened.
    pub fn at(&self) -> DateTime<Utc> {
        self.envelope.occurred_at
    }
}

/// The event streams projections read.
pub(crate) mod streams {
    pub use aggregates::streams::{FULFILMENT as SAGA, INVENTORY, ORDER, PAYMENT};
}

/// A read model and the projector that keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Order views and customers' order lists (`orders`).
    Orders,
    /// Stock levels per SKU (`inventory`).
    Inventory,
    /// Payment account balances (`accounts`).
    Accounts,
    /// Every envelope, for history and time travel (`event_journal`).
    Journal,
    /// Fulfilment sagas and their step timelines (`sagas`).
    Sagas,
}

impl Kind {
    /// Every projection.
    pub const ALL: [Kind; 5] = [
        Kind::Orders,
        Kind::Inventory,
        Kind::Accounts,
        Kind::Journal,
        Kind::Sagas,
    ];

    /// The name used in the admin API, the CLI and checkpoints.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Orders => "orders",
            Kind::Inventory => "inventory",
            Kind::Accounts => "accounts",
            Kind::Journal => "journal",
            Kind::Sagas => "sagas",
        }
    }

    /// The projection with this name.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The event streams it reads.
    pub fn streams(self) -> &'static [&'static str] {
        match self {
            Kind::Orders => &[streams::ORDER],
            Kind::Inventory => &[streams::INVENTORY],
            Kind::Accounts => &[streams::PAYMENT],
            Kind::Journal => &[streams::ORDER, streams::INVENTORY, streams::PAYMENT],
            Kind::Sagas => &[streams::SAGA],
        }
    }

    /// The tables it owns (rebuilt side by side and swapped in by a replay).
    pub fn tables(self) -> &'static [&'static str] {
        match self {
            Kind::Orders => &["orders"],
            Kind::Inventory => &["inventory"],
            Kind::Accounts => &["accounts"],
            Kind::Journal => &["event_journal"],
            Kind::Sagas => &["sagas"],
        }
    }

    /// Applies `records` (in log order per partition) to the tables named with `suffix`,
    /// inside the caller's transaction. Re-applying an event already applied is a no-op.
    pub async fn apply(
        self,
        tx: &mut PgConnection,
        suffix: &str,
        records: &[Record],
    ) -> anyhow::Result<()> {
        match self {
            Kind::Orders => orders::apply(tx, &format!("orders{suffix}"), records).await,
            Kind::Inventory => inventory::apply(tx, &format!("inventory{suffix}"), records).await,
            Kind::Accounts => accounts::apply(tx, &format!("accounts{suffix}"), records).await,
            Kind::Journal => journal::apply(tx, &format!("event_journal{suffix}"), records).await,
            Kind::Sagas => saga_views::apply(tx, &format!("sagas{suffix}"), records).await,
        }
    }
}
