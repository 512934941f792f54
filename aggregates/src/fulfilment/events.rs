//! What the saga records on its own topic. Like the aggregates' events, each `event_type`
//! is its struct name and never changes once written.

use crate::{Cents, CustomerId, OrderId, Quantity, RejectionReason, Sku};
use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Reply;

/// Every event of a fulfilment saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub enum FulfilmentEvent {
    SagaStarted(SagaStarted),
    StepStarted(StepStarted),
    ReplyReceived(ReplyReceived),
    StepEnded(StepEnded),
    CancelRequested(CancelRequested),
    CompensationStarted(CompensationStarted),
    SagaEnded(SagaEnded),
}

impl DomainEvent for FulfilmentEvent {
    fn event_type(&self) -> String {
        match self {
            FulfilmentEvent::SagaStarted(_) => "SagaStarted",
            FulfilmentEvent::StepStarted(_) => "StepStarted",
            FulfilmentEvent::ReplyReceived(_) => "ReplyReceived",
            FulfilmentEvent::StepEnded(_) => "StepEnded",
            FulfilmentEvent::CancelRequested(_) => "CancelRequested",
            FulfilmentEvent::CompensationStarted(_) => "CompensationStarted",
            FulfilmentEvent::SagaEnded(_) => "SagaEnded",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1".to_string()
    }
}

/// One line of the placed order, as the saga needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SagaLine {
    pub sku: Sku,
    pub quantity: Quantity,
}

/// The order was placed: fulfilment begins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SagaStarted {
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    pub lines: Vec<SagaLine>,
    pub total_cents: Cents,
}

/// A step began: its commands were sent in the same transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepStarted {
    pub step: StepName,
    /// The SKUs of a stock step, one command each.
    pub skus: Vec<Sku>,
    /// When the saga stops waiting and compensates (steps that hold stock or money).
    pub deadline: Option<DateTime<Utc>>,
    /// The saga waits for the answers before going on.
    pub awaited: bool,
    pub at: DateTime<Utc>,
}

/// One of a step's commands was answered. `step` is the step's index in the timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplyReceived {
    pub step: usize,
    /// The SKU of a stock step's command, `""` otherwise.
    pub key: String,
    pub reply: Reply,
}

/// A step is over: completed, failed or timed out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepEnded {
    pub step: usize,
    pub status: StepStatus,
    pub at: DateTime<Utc>,
}

/// The order was cancelled while placed or confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRequested {}

/// The saga gave up going forward and undoes what it did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CompensationStarted {
    pub reason: FailureReason,
}

/// The saga is over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SagaEnded {
    pub status: SagaStatus,
}

/// The steps of fulfilment and of its compensation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepName {
    ReserveStock,
    ChargePayment,
    ConfirmOrder,
    SellStock,
    RefundPayment,
    ReleaseStock,
    ReturnStock,
    RejectOrder,
}

impl StepName {
    /// Its name in the timeline.
    pub fn as_str(self) -> &'static str {
        match self {
            StepName::ReserveStock => "reserve_stock",
            StepName::ChargePayment => "charge_payment",
            StepName::ConfirmOrder => "confirm_order",
            StepName::SellStock => "sell_stock",
            StepName::RefundPayment => "refund_payment",
            StepName::ReleaseStock => "release_stock",
            StepName::ReturnStock => "return_stock",
            StepName::RejectOrder => "reject_order",
        }
    }

    /// It undoes a forward step.
    pub fn is_compensation(self) -> bool {
        matches!(
            self,
            StepName::RefundPayment | StepName::ReleaseStock | StepName::ReturnStock
        )
    }
}

/// Where a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Started,
    Completed,
    Failed,
    TimedOut,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Started => "started",
            StepStatus::Completed => "completed",
            StepStatus::Failed => "failed",
            StepStatus::TimedOut => "timed_out",
        }
    }
}

/// Where a saga is (API.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    Running,
    Completed,
    Compensated,
}

impl SagaStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
        }
    }
}

/// Why a saga compensated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    InsufficientStock,
    PaymentDeclined,
    Timeout,
    Cancelled,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::InsufficientStock => "insufficient_stock",
            FailureReason::PaymentDeclined => "payment_declined",
            FailureReason::Timeout => "timeout",
            FailureReason::Cancelled => "cancelled",
        }
    }

    /// The order's rejection reason; `None` for a cancellation (the order is cancelled).
    pub fn rejection(self) -> Option<RejectionReason> {
        match self {
            FailureReason::InsufficientStock => Some(RejectionReason::InsufficientStock),
            FailureReason::PaymentDeclined => Some(RejectionReason::PaymentDeclined),
            FailureReason::Timeout => Some(RejectionReason::Timeout),
            FailureReason::Cancelled => None,
        }
    }
}

/// The saga's event types for the event contract (`schemas/json`, `schemas/samples`).
pub fn schema_catalogue() -> Vec<crate::schema::EventSchema> {
    use crate::schema::EventSchema;
    use cqrs_es::Aggregate;
    let t = super::Fulfilment::TYPE;
    vec![
        EventSchema::v1::<SagaStarted>(t, "SagaStarted"),
        EventSchema::v1::<StepStarted>(t, "StepStarted"),
        EventSchema::v1::<ReplyReceived>(t, "ReplyReceived"),
        EventSchema::v1::<StepEnded>(t, "StepEnded"),
        EventSchema::v1::<CancelRequested>(t, "CancelRequested"),
        EventSchema::v1::<CompensationStarted>(t, "CompensationStarted"),
        EventSchema::v1::<SagaEnded>(t, "SagaEnded"),
    ]
}
