//! What the API and the command processors of one process share.
//!
//! - Waiting requests, by command id. Outcomes arrive from a processor in this process
//!   (right after its commit) or from the command-results topic (another process).
//! - The partitions this process owns and has rebuilt. A command for one of them goes
//!   straight to its worker — no trip through the command topic — which saves the broker
//!   a produce, a fetch and the offset commit of every such command. Commands for
//!   partitions owned elsewhere, and every command from other clients (the saga), still
//!   travel through the command topic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use eventlog::rdkafka::message::OwnedMessage;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::wire::{CommandEnvelope, CommandResult};

/// One unit of work for a partition worker.
pub(crate) enum Work {
    /// A command read from the command topic (its offset is committed with the batch).
    Consumed(OwnedMessage),
    /// A command handed over in-process by the API.
    Direct(CommandEnvelope),
}

type Senders = HashMap<Uuid, Vec<oneshot::Sender<CommandResult>>>;
type Owners = HashMap<(&'static str, i32), mpsc::Sender<Work>>;
type Bounced = mpsc::UnboundedSender<(&'static str, CommandEnvelope)>;

/// Shared by the API and processors of one process. Cheap to clone.
#[derive(Clone, Default)]
pub struct Local {
    waiting: Arc<Mutex<Senders>>,
    owners: Arc<RwLock<Owners>>,
    bounced: Arc<Mutex<Option<Bounced>>>,
}

impl Local {
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
    pub fn waiting(&self) -> usize {
        self.lock().len()
    }

    /// Hands `command` to this process's worker of its partition, if it has one that is
    /// ready and not full. False when the command must travel through the topic instead.
    pub(crate) fn try_direct(
        &self,
        stream: &'static str,
        partition: i32,
        command: &CommandEnvelope,
    ) -> bool {
        let owners = self.owners.read().unwrap_or_else(|p| p.into_inner());
        owners
            .get(&(stream, partition))
            .is_some_and(|worker| worker.try_send(Work::Direct(command.clone())).is_ok())
    }

    /// Where commands handed over in-process go when their worker fails before handling
    /// them: the API's bus sends them through the command topic.
    pub(crate) fn on_bounce(&self, to: Bounced) {
        *self.bounced.lock().unwrap_or_else(|p| p.into_inner()) = Some(to);
    }

    /// Sends an unhandled in-process command on through the command topic.
    pub(crate) fn bounce(&self, stream: &'static str, command: CommandEnvelope) {
        if let Some(to) = &*self.bounced.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = to.send((stream, command));
        }
    }

    pub(crate) fn set_owner(
        &self,
        stream: &'static str,
        partition: i32,
        worker: mpsc::Sender<Work>,
    ) {
        self.owners
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert((stream, partition), worker);
    }

    /// Withdraws `worker`'s registration (and no newer worker's).
    pub(crate) fn remove_owner_if(
        &self,
        stream: &'static str,
        partition: i32,
        worker: &mpsc::Sender<Work>,
    ) {
        let mut owners = self.owners.write().unwrap_or_else(|p| p.into_inner());
        if owners
            .get(&(stream, partition))
            .is_some_and(|w| w.same_channel(worker))
        {
            owners.remove(&(stream, partition));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Senders> {
        // A panic while holding this lock cannot leave the map inconsistent: recover it.
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
