//! HTTP requests waiting for their command's outcome, by command id. Outcomes arrive from
//! a processor in this process (right after its commit: the fast path) or from the
//! command-results topic (when the partition's owner is another process).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use uuid::Uuid;

use crate::wire::CommandResult;

/// The registry of waiting requests. Cheap to clone; shared by the API and processors.
#[derive(Clone, Default)]
pub struct Waiters {
    inner: Arc<Mutex<HashMap<Uuid, Vec<oneshot::Sender<CommandResult>>>>>,
}

impl Waiters {
    /// Registers interest in `command_id`'s outcome. Register before sending the command,
    /// so a fast outcome cannot slip past.
    pub fn register(&self, command_id: Uuid) -> oneshot::Receiver<CommandResult> {
        let (tx, rx) = oneshot::channel();
        self.lock().entry(command_id).or_default().push(tx);
        rx
    }

    /// Hands an outcome to everyone waiting for it; an outcome nobody waits for is dropped.
    pub fn complete(&self, result: &CommandResult) {
        if let Some(senders) = self.lock().remove(&result.command_id) {
            for tx in senders {
                let _ = tx.send(result.clone());
            }
        }
    }

    /// Forgets a waiter that gave up (its request timed out).
    pub fn forget(&self, command_id: Uuid) {
        let mut map = self.lock();
        if let Some(senders) = map.get_mut(&command_id) {
            senders.retain(|tx| !tx.is_closed());
            if senders.is_empty() {
                map.remove(&command_id);
            }
        }
    }

    /// How many commands have requests waiting.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when nobody waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Uuid, Vec<oneshot::Sender<CommandResult>>>> {
        // A panic while holding this lock cannot leave the map inconsistent: recover it.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
