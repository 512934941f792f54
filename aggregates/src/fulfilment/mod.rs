//! The order-fulfilment saga as a pure state machine: what it has done (its state, folded
//! from its events), what it decides on each input, and which commands each decision
//! sends. No Kafka and no clock here: the runtime (`sagas::runtime`) feeds it inputs
//! and the time, and writes what it decides.
//!
//! The forward path is reserve stock (every line at once, all or nothing) → charge the
//! order's total → confirm the order → sell the reserved stock. Reservations and the
//! charge hold something for the order, so they have a deadline; once the charge went
//! through the saga only records the outcome, which no deadline can undo.
//!
//! On a failure, a timeout or a cancellation the saga compensates in reverse: refund what
//! was charged, release what is reserved, return what was sold — then rejects the order
//! (not for a cancellation: the order is cancelled already). A reservation whose outcome
//! is unknown (it timed out) is released too, without waiting: its release sits behind it
//! on the same partition, so it undoes a late success or finds nothing to undo.
//!
//! A charge is refunded only once the saga knows it went through, with the amount it
//! charged: the payment account keeps totals, not each order's charge, so it cannot tell
//! a late charge from none. The saga is what guarantees a refund never exceeds its charge
//! and is sent once (one refund step, a deterministic command id). A charge that timed out
//! still gets its answer — the processor refuses it `command_expired` past its deadline,
//! or took it in time — and the saga refunds it when that answer says it was taken.

mod events;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use crate::{
    Cents, CustomerId, InventoryCommand, OrderCommand, OrderId, PaymentCommand, Quantity,
    RejectionReason, Sku,
};
use chrono::{DateTime, Duration, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

pub use events::*;

/// The stream name of the saga: its events are on `<prefix>.saga.order-fulfilment.events`.
pub const STREAM: &str = crate::streams::FULFILMENT;

/// Namespace of the saga's deterministic command ids (UUID v5).
const COMMAND_NAMESPACE: Uuid = Uuid::from_u128(0x6d1f_4c2a_93b7_4e0e_8a51_7c3d_2b9e_f104);

/// One saga instance, folded from its events. Its id is the order id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Fulfilment {
    pub order_id: Option<OrderId>,
    pub customer_id: Option<CustomerId>,
    pub lines: Vec<SagaLine>,
    pub total_cents: u64,
    /// `None` until the order is placed.
    pub status: Option<SagaStatus>,
    /// Set when compensation starts.
    pub failure_reason: Option<FailureReason>,
    /// The order was cancelled: compensate at the next step boundary.
    pub cancel_requested: bool,
    /// Every step taken, compensations included, in order.
    pub steps: Vec<Step>,
}

/// One step as the timeline shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub name: StepName,
    pub status: StepStatus,
    /// The SKUs a stock step addresses (one command each); empty for the others.
    pub skus: Vec<Sku>,
    /// The saga waits for its replies before going on.
    pub awaited: bool,
    pub deadline: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    /// When it reached its current status.
    pub at: DateTime<Utc>,
    /// Replies so far, by SKU (`""` for a step with one command): succeeded or not, and
    /// the rule or error code of a refusal.
    pub replies: BTreeMap<String, Reply>,
}

/// A command's outcome as the saga records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Reply {
    pub ok: bool,
    /// Why it was refused: the rule (e.g. `insufficient_stock`) or the error code.
    pub code: Option<String>,
}

impl Step {
    fn keys(&self) -> Vec<String> {
        if self.skus.is_empty() {
            vec![String::new()]
        } else {
            self.skus.iter().map(|s| s.as_str().to_string()).collect()
        }
    }

    fn answered(&self) -> bool {
        self.replies.len() >= self.keys().len()
    }

    fn ok_skus(&self) -> Vec<Sku> {
        self.skus
            .iter()
            .filter(|s| self.replies.get(s.as_str()).is_some_and(|r| r.ok))
            .cloned()
            .collect()
    }
}

/// What the saga reacts to.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// `OrderPlaced` on the order's stream.
    Placed {
        order_id: OrderId,
        customer_id: CustomerId,
        lines: Vec<SagaLine>,
        total_cents: Cents,
    },
    /// `OrderCancelled` of a placed or confirmed order.
    Cancelled,
    /// The outcome of a command the saga sent.
    Reply {
        command_id: Uuid,
        ok: bool,
        code: Option<String>,
    },
    /// The clock: deadlines up to now have passed.
    Tick,
}

/// How long the steps that hold something may wait for their answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    pub step: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            step: Duration::seconds(30),
        }
    }
}

/// A command the saga sends, to the command topic of `stream`, keyed by `aggregate_id`.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub stream: &'static str,
    pub aggregate_id: String,
    /// Deterministic (saga id, step, SKU): a replayed step is a duplicate.
    pub command_id: Uuid,
    /// The aggregate's command in its JSON form.
    pub command: Value,
    /// The command processor refuses the command after this instant.
    pub deadline: Option<DateTime<Utc>>,
}

/// The saga's `handle` input: an [`Input`] with the clock reading and the deadlines.
#[derive(Debug, Clone)]
pub struct Decide {
    pub input: Input,
    pub now: DateTime<Utc>,
    pub deadlines: Deadlines,
}

/// The saga never refuses an input; it decides to do nothing instead.
#[derive(Debug, thiserror::Error)]
#[error("never happens")]
pub enum Never {}

impl Aggregate for Fulfilment {
    const TYPE: &'static str = "saga.order_fulfilment";
    type Command = Decide;
    type Event = FulfilmentEvent;
    type Error = Never;
    type Services = ();

    async fn handle(
        &mut self,
        command: Decide,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), Never> {
        for event in self.decide(command.input, command.now, command.deadlines) {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: FulfilmentEvent) {
        match event {
            FulfilmentEvent::SagaStarted(e) => {
                self.order_id = Some(e.order_id);
                self.customer_id = Some(e.customer_id);
                self.lines = e.lines;
                self.total_cents = e.total_cents.0;
                self.status = Some(SagaStatus::Running);
            }
            FulfilmentEvent::StepStarted(e) => self.steps.push(Step {
                name: e.step,
                status: StepStatus::Started,
                skus: e.skus,
                awaited: e.awaited,
                deadline: e.deadline,
                started_at: e.at,
                at: e.at,
                replies: BTreeMap::new(),
            }),
            FulfilmentEvent::ReplyReceived(e) => {
                if let Some(step) = self.steps.get_mut(e.step) {
                    step.replies.insert(e.key, e.reply);
                }
            }
            FulfilmentEvent::StepEnded(e) => {
                if let Some(step) = self.steps.get_mut(e.step) {
                    step.status = e.status;
                    step.at = e.at;
                }
            }
            FulfilmentEvent::CancelRequested(_) => self.cancel_requested = true,
            FulfilmentEvent::CompensationStarted(e) => {
                self.failure_reason = Some(e.reason);
                self.status = Some(SagaStatus::Running);
            }
            FulfilmentEvent::SagaEnded(e) => self.status = Some(e.status),
        }
    }
}

impl Fulfilment {
    /// Decides what `input` means for this saga at `now`: the events to record (in order).
    /// Their commands follow from them: [`Fulfilment::commands_for`].
    pub fn decide(
        &self,
        input: Input,
        now: DateTime<Utc>,
        deadlines: Deadlines,
    ) -> Vec<FulfilmentEvent> {
        let mut next = self.clone();
        next.run(input, now, deadlines)
            .into_iter()
            .map(|(event, _)| event)
            .collect()
    }

    /// Decides what `input` means and takes it in: each event is applied as it is
    /// decided, and comes with the commands it sends (what the runtime writes).
    pub fn run(
        &mut self,
        input: Input,
        now: DateTime<Utc>,
        deadlines: Deadlines,
    ) -> Vec<(FulfilmentEvent, Vec<Outgoing>)> {
        let mut out = Vec::new();
        let first = match input {
            Input::Placed {
                order_id,
                customer_id,
                lines,
                total_cents,
            } if self.status.is_none() => {
                let skus = lines.iter().map(|l| l.sku.clone()).collect();
                vec![
                    FulfilmentEvent::SagaStarted(SagaStarted {
                        order_id,
                        customer_id,
                        lines,
                        total_cents,
                    }),
                    started(
                        StepName::ReserveStock,
                        skus,
                        Some(now + deadlines.step),
                        true,
                        now,
                    ),
                ]
            }
            Input::Placed { .. } => Vec::new(),
            Input::Cancelled
                if matches!(
                    self.status,
                    Some(SagaStatus::Running | SagaStatus::Completed)
                ) && !self.cancel_requested =>
            {
                vec![FulfilmentEvent::CancelRequested(CancelRequested {})]
            }
            Input::Cancelled => Vec::new(),
            Input::Reply {
                command_id,
                ok,
                code,
            } => self
                .awaiting(command_id)
                .map(|(step, key)| {
                    let compensation = self.steps[step].name.is_compensation();
                    // Nothing to undo is what a compensation wants.
                    let ok = ok
                        || compensation
                            && matches!(
                                code.as_deref(),
                                Some("reservation_not_found" | "charge_not_found")
                            );
                    vec![FulfilmentEvent::ReplyReceived(ReplyReceived {
                        step,
                        key,
                        reply: Reply { ok, code },
                    })]
                })
                .unwrap_or_default(),
            Input::Tick => self
                .steps
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    s.status == StepStatus::Started && s.deadline.is_some_and(|d| d <= now)
                })
                .map(|(step, _)| {
                    FulfilmentEvent::StepEnded(StepEnded {
                        step,
                        status: StepStatus::TimedOut,
                        at: now,
                    })
                })
                .collect(),
        };
        let mut batch = first;
        while !batch.is_empty() {
            for event in batch {
                self.apply(event.clone());
                let commands = self.commands_for(&event);
                out.push((event, commands));
            }
            batch = self.advance(now, deadlines);
        }
        out
    }

    /// The earliest deadline the saga is waiting on.
    pub fn next_deadline(&self) -> Option<DateTime<Utc>> {
        self.steps
            .iter()
            .filter(|s| s.status == StepStatus::Started)
            .filter_map(|s| s.deadline)
            .min()
    }

    /// The step and reply key a command id belongs to, if the saga still waits for it.
    /// A charge that timed out still waits: its late answer says whether there is money
    /// to give back.
    fn awaiting(&self, command_id: Uuid) -> Option<(usize, String)> {
        let order_id = self.order_id?;
        self.steps.iter().enumerate().find_map(|(i, step)| {
            let late_charge =
                step.name == StepName::ChargePayment && step.status == StepStatus::TimedOut;
            if step.status != StepStatus::Started && !late_charge {
                return None;
            }
            step.keys()
                .into_iter()
                .find(|key| {
                    !step.replies.contains_key(key)
                        && command_id_for(order_id, i, key) == command_id
                })
                .map(|key| (i, key))
        })
    }

    /// The next events once the state has taken in the last ones: end answered steps, then
    /// take the next step when nothing awaited is open.
    fn advance(&self, now: DateTime<Utc>, deadlines: Deadlines) -> Vec<FulfilmentEvent> {
        let ended: Vec<FulfilmentEvent> = self
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.status == StepStatus::Started && s.answered())
            .map(|(step, s)| {
                let ok = s.replies.values().all(|r| r.ok);
                FulfilmentEvent::StepEnded(StepEnded {
                    step,
                    status: if ok {
                        StepStatus::Completed
                    } else {
                        StepStatus::Failed
                    },
                    at: now,
                })
            })
            .collect();
        if !ended.is_empty() {
            return ended;
        }
        // A charge that timed out went through after all: the saga compensates, so give it
        // back (the rejection, if not sent yet, waits for the refund).
        if self.refund_owed() {
            return vec![started(
                StepName::RefundPayment,
                Vec::new(),
                None,
                true,
                now,
            )];
        }
        match self.status {
            Some(SagaStatus::Running) => {}
            Some(SagaStatus::Completed)
                if self.cancel_requested && self.failure_reason.is_none() =>
            {
                return self.compensate(FailureReason::Cancelled, now);
            }
            _ => return Vec::new(),
        }
        if self
            .steps
            .iter()
            .any(|s| s.awaited && s.status == StepStatus::Started)
        {
            return Vec::new();
        }
        if let Some(reason) = self.failure_reason {
            let rejected = self.steps.iter().any(|s| s.name == StepName::RejectOrder);
            return match reason.rejection() {
                Some(_) if !rejected => {
                    vec![started(StepName::RejectOrder, Vec::new(), None, true, now)]
                }
                _ => vec![FulfilmentEvent::SagaEnded(SagaEnded {
                    status: SagaStatus::Compensated,
                })],
            };
        }
        let Some(last) = self.steps.last() else {
            return Vec::new();
        };
        let expired = last
            .replies
            .values()
            .any(|r| r.code.as_deref() == Some(EXPIRED));
        let failed = |reason| {
            self.compensate(
                if expired {
                    FailureReason::Timeout
                } else {
                    reason
                },
                now,
            )
        };
        let cancel = self.cancel_requested;
        let all_skus = || self.lines.iter().map(|l| l.sku.clone()).collect();
        match (last.name, last.status) {
            (_, StepStatus::TimedOut) => self.compensate(FailureReason::Timeout, now),
            (
                StepName::ReserveStock
                | StepName::ChargePayment
                | StepName::ConfirmOrder
                | StepName::SellStock,
                StepStatus::Completed,
            ) if cancel => self.compensate(FailureReason::Cancelled, now),
            (StepName::ReserveStock, StepStatus::Completed) => vec![started(
                StepName::ChargePayment,
                Vec::new(),
                Some(now + deadlines.step),
                true,
                now,
            )],
            (StepName::ReserveStock, StepStatus::Failed) => {
                failed(FailureReason::InsufficientStock)
            }
            (StepName::ChargePayment, StepStatus::Completed) => {
                vec![started(StepName::ConfirmOrder, Vec::new(), None, true, now)]
            }
            (StepName::ChargePayment, StepStatus::Failed) => failed(FailureReason::PaymentDeclined),
            (StepName::ConfirmOrder, StepStatus::Completed) => {
                vec![started(StepName::SellStock, all_skus(), None, true, now)]
            }
            // The order refused confirmation: it was cancelled meanwhile.
            (StepName::ConfirmOrder, StepStatus::Failed) => {
                self.compensate(FailureReason::Cancelled, now)
            }
            (StepName::SellStock, _) => vec![FulfilmentEvent::SagaEnded(SagaEnded {
                status: SagaStatus::Completed,
            })],
            _ => Vec::new(),
        }
    }

    /// A charge is refunded once: when the saga compensates, its charge was taken (in time
    /// or late), and no refund step was started yet.
    fn refund_owed(&self) -> bool {
        let charged = self
            .steps
            .iter()
            .any(|s| s.name == StepName::ChargePayment && s.replies.get("").is_some_and(|r| r.ok));
        let refunding = self.steps.iter().any(|s| s.name == StepName::RefundPayment);
        self.failure_reason.is_some() && charged && !refunding
    }

    /// Starts compensating: undo what was done (awaited) and release reservations that may
    /// have been made (not awaited), in reverse order of the forward steps. A charge that
    /// may have been taken is not refunded blindly: its late answer decides
    /// ([`Fulfilment::refund_owed`]).
    fn compensate(&self, reason: FailureReason, now: DateTime<Utc>) -> Vec<FulfilmentEvent> {
        let mut events = vec![FulfilmentEvent::CompensationStarted(CompensationStarted {
            reason,
        })];
        let of = |name: StepName| self.steps.iter().filter(move |s| s.name == name);
        let sold: Vec<Sku> = of(StepName::SellStock).flat_map(Step::ok_skus).collect();
        let reserved: Vec<Sku> = of(StepName::ReserveStock)
            .flat_map(Step::ok_skus)
            .filter(|s| !sold.contains(s))
            .collect();
        let unsure: Vec<Sku> = of(StepName::ReserveStock)
            .filter(|s| s.status == StepStatus::TimedOut)
            .flat_map(|s| {
                s.skus
                    .iter()
                    .filter(|sku| !s.replies.contains_key(sku.as_str()))
                    .cloned()
            })
            .collect();
        let charge = of(StepName::ChargePayment).next_back();
        if charge.is_some_and(|c| c.replies.get("").is_some_and(|r| r.ok)) {
            events.push(started(
                StepName::RefundPayment,
                Vec::new(),
                None,
                true,
                now,
            ));
        }
        if !sold.is_empty() {
            events.push(started(StepName::ReturnStock, sold, None, true, now));
        }
        if !reserved.is_empty() {
            events.push(started(StepName::ReleaseStock, reserved, None, true, now));
        }
        if !unsure.is_empty() {
            events.push(started(StepName::ReleaseStock, unsure, None, false, now));
        }
        events
    }

    /// The commands `event` sends; `self` is the state after applying it.
    pub fn commands_for(&self, event: &FulfilmentEvent) -> Vec<Outgoing> {
        let (FulfilmentEvent::StepStarted(e), Some(order_id), Some(customer_id)) =
            (event, self.order_id, self.customer_id.as_ref())
        else {
            return Vec::new();
        };
        let index = self.steps.len() - 1;
        let quantity = |sku: &Sku| {
            self.lines
                .iter()
                .find(|l| &l.sku == sku)
                .map(|l| l.quantity)
                .unwrap_or(Quantity(0))
        };
        let stock = |make: &dyn Fn(&Sku) -> InventoryCommand| -> Vec<Outgoing> {
            e.skus
                .iter()
                .map(|sku| Outgoing {
                    stream: crate::streams::INVENTORY,
                    aggregate_id: sku.as_str().to_string(),
                    command_id: command_id_for(order_id, index, sku.as_str()),
                    command: to_json(make(sku)),
                    deadline: e.deadline,
                })
                .collect()
        };
        let one = |stream: &'static str, aggregate_id: String, command: Value| {
            vec![Outgoing {
                stream,
                aggregate_id,
                command_id: command_id_for(order_id, index, ""),
                command,
                deadline: e.deadline,
            }]
        };
        let payment = |command: PaymentCommand| {
            one(
                crate::streams::PAYMENT,
                customer_id.as_str().to_string(),
                to_json(command),
            )
        };
        let order = |command: OrderCommand| {
            one(
                crate::streams::ORDER,
                order_id.to_string(),
                to_json(command),
            )
        };
        match e.step {
            StepName::ReserveStock => stock(&|sku| InventoryCommand::ReserveStock {
                order_id,
                quantity: quantity(sku),
            }),
            StepName::SellStock => stock(&|_| InventoryCommand::SellStock { order_id }),
            StepName::ReleaseStock => stock(&|_| InventoryCommand::ReleaseStock { order_id }),
            StepName::ReturnStock => stock(&|sku| InventoryCommand::ReturnStock {
                order_id,
                quantity: quantity(sku),
            }),
            StepName::ChargePayment => payment(PaymentCommand::ChargePayment {
                order_id,
                amount_cents: Cents(self.total_cents),
            }),
            // The amount the charge took: the account checks only that it has that much
            // charged and not refunded.
            StepName::RefundPayment => payment(PaymentCommand::RefundPayment {
                order_id,
                amount_cents: Cents(self.total_cents),
            }),
            StepName::ConfirmOrder => order(OrderCommand::ConfirmOrder),
            StepName::RejectOrder => {
                let reason = self
                    .failure_reason
                    .and_then(FailureReason::rejection)
                    .unwrap_or(RejectionReason::Timeout);
                order(OrderCommand::RejectOrder { reason })
            }
        }
    }
}

/// The error code a command processor answers for a command past its deadline.
pub const EXPIRED: &str = "command_expired";

/// The id of the command of step `index` for `key` (a SKU, or `""`) of the saga of `order_id`.
pub fn command_id_for(order_id: OrderId, index: usize, key: &str) -> Uuid {
    Uuid::new_v5(
        &COMMAND_NAMESPACE,
        format!("{order_id}/{index}/{key}").as_bytes(),
    )
}

fn started(
    step: StepName,
    skus: Vec<Sku>,
    deadline: Option<DateTime<Utc>>,
    awaited: bool,
    at: DateTime<Utc>,
) -> FulfilmentEvent {
    FulfilmentEvent::StepStarted(StepStarted {
        step,
        skus,
        deadline,
        awaited,
        at,
    })
}

fn to_json<T: Serialize>(command: T) -> Value {
    serde_json::to_value(command).expect("commands serialise")
}
