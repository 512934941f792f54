//! What is wrong with a projector right now, if anything, and how errors are classified
//! where they arise: transient (wait and retry), permanent for a record (dead-letter it,
//! decided before any database work), or a stop that needs an operator.

use std::sync::Mutex;
use std::time::Duration;

use chrono::Utc;
use eventlog::rdkafka::error::{KafkaError, RDKafkaErrorCode};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// The error a projector is in, as the admin status shows it (API.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Fault {
    /// What went wrong, with its cause chain.
    pub message: String,
    /// When this run of errors began (RFC 3339).
    pub since: String,
    /// A database or broker briefly away: retried while the status stays `running`.
    pub transient: bool,
}

/// The current error of one projector; cleared as soon as it makes progress again, so
/// the status says what is true now.
#[derive(Default, Debug)]
pub struct Health {
    /// The error, and whether the projector stopped over it.
    fault: Mutex<Option<(Fault, bool)>>,
}

impl Health {
    /// Records an error that is being retried. `since` is kept across a run of errors.
    pub fn failing(&self, message: String, transient: bool) {
        self.set(message, transient, false);
    }

    /// Records that the projector stopped and will not retry by itself.
    pub fn stopped(&self, message: String) {
        self.set(message, false, true);
    }

    /// The projector made progress: no error any more.
    pub fn ok(&self) {
        let mut fault = self.fault.lock().unwrap_or_else(|p| p.into_inner());
        if fault.is_some() {
            *fault = None;
        }
    }

    /// The current error, if any.
    pub fn fault(&self) -> Option<Fault> {
        self.state().map(|(fault, _)| fault)
    }

    /// The current error, and whether the projector has stopped over it (it will not
    /// retry by itself, e.g. an out-of-range checkpoint).
    pub fn state(&self) -> Option<(Fault, bool)> {
        self.fault.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, message: String, transient: bool, stopped: bool) {
        let mut fault = self.fault.lock().unwrap_or_else(|p| p.into_inner());
        let since = match fault.take() {
            Some((old, _)) => old.since,
            None => crate::rfc3339(Utc::now()),
        };
        let fault_now = Fault {
            message,
            since,
            transient,
        };
        *fault = Some((fault_now, stopped));
    }
}

/// Whether a database error is one that goes away by itself: a connection lost or
/// refused, a pool timeout, a deadlock or serialization failure, an administrator's
/// shutdown, a lock timeout, insufficient resources. Anything else (a constraint
/// violation, a missing table) is still retried, more slowly, but needs an operator.
pub fn is_transient_db(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|e| e.downcast_ref::<sqlx::Error>())
        .any(|e| match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::BeginFailed => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|c| is_transient_sqlstate(&c)),
            _ => false,
        })
}

/// SQLSTATE classes 08 (connection), 40 (rollback: deadlock, serialization), 53
/// (insufficient resources), 57 (operator intervention: shutdown, cancel) and 55P03
/// (lock not available).
pub fn is_transient_sqlstate(code: &str) -> bool {
    matches!(code.get(..2), Some("08" | "40" | "53" | "57")) || code == "55P03"
}

/// Whether the consumer reports a checkpoint outside the log (with `auto.offset.reset`
/// set to `error`): nothing to wait for, the projector must stop rather than jump.
pub fn is_out_of_range(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange)
    )
}

/// Whether a consumer error is a broker briefly away (librdkafka reconnects by itself).
pub fn is_transient_kafka(error: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    match error.rdkafka_error_code() {
        Some(code) => matches!(
            code,
            BrokerTransportFailure
                | AllBrokersDown
                | Resolve
                | OperationTimedOut
                | RequestTimedOut
                | NetworkException
                | LeaderNotAvailable
                | NotLeaderForPartition
                | BrokerNotAvailable
                | ReplicaNotAvailable
                | CoordinatorNotAvailable
                | NotCoordinator
                | TimedOutQueue
                | KafkaStorageError
                | FencedLeaderEpoch
                | UnknownLeaderEpoch
                | OffsetNotAvailable
                | PreferredLeaderNotAvailable
        ),
        None => false,
    }
}

/// Exponential backoff between retries, capped; slower for errors that are not transient
/// (they need an operator, and retrying them fast only fills the log).
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The first wait after a failure.
    const FIRST: Duration = Duration::from_millis(100);
    /// The longest wait for a transient error.
    const CAP: Duration = Duration::from_secs(5);
    /// The longest wait for an error that is not transient.
    const SLOW_CAP: Duration = Duration::from_secs(30);

    /// The wait before the next attempt.
    pub fn next_delay(&mut self, transient: bool) -> Duration {
        let cap = if transient { Self::CAP } else { Self::SLOW_CAP };
        let delay = Self::FIRST.saturating_mul(1 << self.failures.min(16));
        self.failures = self.failures.saturating_add(1);
        delay.min(cap)
    }

    /// Waits [`Backoff::next_delay`]; false when `shutdown` came first.
    pub async fn wait(&mut self, transient: bool, shutdown: &CancellationToken) -> bool {
        let delay = self.next_delay(transient);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_and_concurrency_sqlstates_are_transient_constraints_are_not() {
        for code in [
            "08006", "40P01", "40001", "53300", "57P01", "57014", "55P03",
        ] {
            assert!(is_transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "23503", "42P01", "22P02"] {
            assert!(!is_transient_sqlstate(code), "{code}");
        }
    }

    #[test]
    fn a_pool_timeout_is_transient_even_under_context() {
        let e = anyhow::Error::from(sqlx::Error::PoolTimedOut).context("applying a batch");
        assert!(is_transient_db(&e));
        assert!(!is_transient_db(&anyhow::anyhow!("something else")));
    }

    #[test]
    fn a_broker_away_is_transient_an_offset_reset_is_out_of_range() {
        let away = KafkaError::MessageConsumption(RDKafkaErrorCode::BrokerTransportFailure);
        assert!(is_transient_kafka(&away));
        assert!(!is_out_of_range(&away));
        let reset = KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset);
        assert!(is_out_of_range(&reset));
        assert!(!is_transient_kafka(&reset));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::default();
        let delays: Vec<_> = (0..8).map(|_| b.next_delay(true)).collect();
        assert_eq!(delays[0], Duration::from_millis(100));
        assert_eq!(delays[1], Duration::from_millis(200));
        assert_eq!(delays[7], Duration::from_secs(5));
        let slow = (0..4).map(|_| b.next_delay(false)).last();
        assert_eq!(slow, Some(Duration::from_secs(30)));
    }

    #[test]
    fn since_is_kept_across_a_run_of_errors_and_ok_clears() {
        let h = Health::default();
        h.failing("first".into(), true);
        let since = h.fault().unwrap().since;
        h.failing("second".into(), false);
        let f = h.fault().unwrap();
        assert_eq!(
            (f.message.as_str(), f.since, f.transient),
            ("second", since, false)
        );
        h.ok();
        assert_eq!(h.fault(), None);
    }
}
