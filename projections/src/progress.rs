//! How far each projection has got, per topic partition, for read-your-writes.
//!
//! A query with a consistency token waits on a `watch` channel, not on the database.
//! Projectors in this process advance it directly after each commit; projectors in other
//! processes `NOTIFY tally_progress` in their transaction, and one listener per process
//! reloads the checkpoints when told — one query per batch, not one per waiting request.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// The Postgres channel projectors notify after each commit.
pub const CHANNEL: &str = "tally_progress";

type Positions = HashMap<(String, String, i32), i64>;

/// Next offsets to read, by (projection, topic, partition). Cheap to clone.
#[derive(Clone)]
pub struct Progress {
    positions: Arc<watch::Sender<Positions>>,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            positions: Arc::new(watch::channel(Positions::new()).0),
        }
    }
}

impl Progress {
    /// Records that `projection` has applied everything before `next_offset`.
    pub fn advance(&self, projection: &str, topic: &str, partition: i32, next_offset: i64) {
        self.positions.send_if_modified(|p| {
            let at = p
                .entry((projection.to_string(), topic.to_string(), partition))
                .or_insert(0);
            if next_offset > *at {
                *at = next_offset;
                true
            } else {
                false
            }
        });
    }

    /// The next offset `projection` will read of `topic`/`partition`.
    pub fn position(&self, projection: &str, topic: &str, partition: i32) -> i64 {
        self.positions
            .borrow()
            .get(&(projection.to_string(), topic.to_string(), partition))
            .copied()
            .unwrap_or(0)
    }

    /// Waits until `projection` has applied the record at `offset`; false at the deadline.
    pub async fn wait_past(
        &self,
        projection: &str,
        topic: &str,
        partition: i32,
        offset: i64,
        limit: Duration,
    ) -> bool {
        let key = (projection.to_string(), topic.to_string(), partition);
        let mut rx = self.positions.subscribe();
        let caught_up = tokio::time::timeout(
            limit,
            rx.wait_for(|p| p.get(&key).is_some_and(|next| *next > offset)),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        caught_up
    }

    /// Loads every checkpoint from the database.
    pub async fn reload(&self, pool: &PgPool) -> sqlx::Result<()> {
        let rows: Vec<(String, String, i32, i64)> = sqlx::query_as(
            "SELECT projection, topic, partition, next_offset FROM projection_checkpoints",
        )
        .fetch_all(pool)
        .await?;
        for (projection, topic, partition, next) in rows {
            self.advance(&projection, &topic, partition, next);
        }
        Ok(())
    }

    /// Follows projectors in other processes until `shutdown`.
    pub async fn listen(self, pool: PgPool, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.follow(&pool, &shutdown).await {
                warn!(error = %e, "progress listener lost PostgreSQL; reconnecting in 1s");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn follow(&self, pool: &PgPool, shutdown: &CancellationToken) -> sqlx::Result<()> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(CHANNEL).await?;
        self.reload(pool).await?;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                n = listener.recv() => { n?; self.reload(pool).await?; }
            }
        }
    }
}
