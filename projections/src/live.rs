//! A live projector in this process: kept running (restarted when it fails, except over
//! a checkpoint outside the log), and stopped on demand for a replay's swap.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::health::{is_transient_db, Health};
use crate::kinds::Kind;
use crate::projectors::Projectors;
use crate::runner::{self, CheckpointMoved, OutOfRange, Target};

/// The live projector of one projection in this process, if one runs.
#[derive(Default)]
pub struct LiveSlot(pub(crate) Mutex<Option<(CancellationToken, JoinHandle<()>)>>);

impl LiveSlot {
    /// Stops the live projector, if one runs, and waits until it has ended (a batch in
    /// progress commits with its checkpoints first).
    pub async fn stop(&self) {
        let live = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((token, task)) = live {
            token.cancel();
            let _ = task.await;
        }
    }
}

/// Runs the live projector of `kind` until `token`, restarting it when it fails, except
/// over a checkpoint outside the log: that stops it (status `failed`) until a replay.
pub(crate) async fn keep_running(
    ctx: &Projectors,
    kind: Kind,
    health: &Arc<Health>,
    token: &CancellationToken,
) {
    let target = Target::live(kind, health.clone());
    while !token.is_cancelled() {
        let Err(e) = runner::run(ctx, kind, &target, token).await else {
            continue;
        };
        if let Some(out) = e.downcast_ref::<OutOfRange>() {
            error!(projection = kind.name(), error = %out, "projector stopped");
            health.stopped(out.to_string());
            return;
        }
        if e.downcast_ref::<CheckpointMoved>().is_some() {
            warn!(projection = kind.name(), error = %e, "restarting from the stored checkpoints");
        } else {
            let transient = is_transient_db(&e);
            error!(projection = kind.name(), transient, error = %format!("{e:#}"), "projector failed; restarting in 1s");
            health.failing(format!("{e:#}"), transient);
        }
        tokio::select! {
            _ = token.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
