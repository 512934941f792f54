//! The `PaymentAccount` aggregate: one customer's balance. The saga charges an order's
//! total to it and refunds exactly what was charged when it compensates; the balance
//! never goes negative, so money is conserved.

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::values::{Cents, CustomerId, OrderId};

/// Every command the `payment_account` aggregate handles. Charge and refund come from the saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PaymentCommand {
    Deposit {
        customer_id: CustomerId,
        amount_cents: Cents,
    },
    /// Charges an order's total; declined when the balance is short.
    ChargePayment {
        order_id: OrderId,
        amount_cents: Cents,
    },
    /// Gives back exactly what was charged for the order (compensation).
    RefundPayment { order_id: OrderId },
}

/// Every event of the `payment_account` aggregate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub enum PaymentEvent {
    FundsDeposited(FundsDeposited),
    PaymentCharged(PaymentCharged),
    PaymentRefunded(PaymentRefunded),
}

/// Money was paid into the account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FundsDeposited {
    pub customer_id: CustomerId,
    pub amount_cents: Cents,
}

/// An order's total was taken from the balance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentCharged {
    pub order_id: OrderId,
    pub amount_cents: Cents,
}

/// An order's charge was given back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentRefunded {
    pub order_id: OrderId,
    pub amount_cents: Cents,
}

impl DomainEvent for PaymentEvent {
    fn event_type(&self) -> String {
        match self {
            PaymentEvent::FundsDeposited(_) => "FundsDeposited",
            PaymentEvent::PaymentCharged(_) => "PaymentCharged",
            PaymentEvent::PaymentRefunded(_) => "PaymentRefunded",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1".to_string()
    }
}

/// Why a payment command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    #[error("payment declined: {amount} cents charged against a balance of {balance}")]
    PaymentDeclined { amount: u64, balance: u64 },
    #[error("order {order_id} was already charged to this account")]
    AlreadyCharged { order_id: OrderId },
    #[error("order {order_id} has no charge on this account to refund")]
    ChargeNotFound { order_id: OrderId },
    #[error("the balance would exceed {max} cents")]
    BalanceLimitExceeded { max: u64 },
}

impl PaymentError {
    /// The rule name reported in `details.rule` of a `422`.
    pub fn rule(&self) -> &'static str {
        match self {
            PaymentError::PaymentDeclined { .. } => "payment_declined",
            PaymentError::AlreadyCharged { .. } => "already_charged",
            PaymentError::ChargeNotFound { .. } => "charge_not_found",
            PaymentError::BalanceLimitExceeded { .. } => "balance_limit_exceeded",
        }
    }
}

/// One customer's account. `charges` holds what each order paid and has not had back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PaymentAccount {
    pub customer_id: Option<CustomerId>,
    pub balance_cents: u64,
    pub charges: BTreeMap<OrderId, Cents>,
}

impl PaymentAccount {
    /// Largest balance one account may hold (keeps every sum far from overflow).
    pub const MAX_BALANCE: u64 = 1_000_000_000_000_000;

    /// Decides which events a command produces, without changing the account.
    pub fn decide(&self, command: PaymentCommand) -> Result<Vec<PaymentEvent>, PaymentError> {
        let event = match command {
            PaymentCommand::Deposit {
                customer_id,
                amount_cents,
            } => {
                if self.balance_cents.saturating_add(amount_cents.0) > Self::MAX_BALANCE {
                    return Err(PaymentError::BalanceLimitExceeded {
                        max: Self::MAX_BALANCE,
                    });
                }
                PaymentEvent::FundsDeposited(FundsDeposited {
                    customer_id,
                    amount_cents,
                })
            }
            PaymentCommand::ChargePayment {
                order_id,
                amount_cents,
            } => {
                if self.charges.contains_key(&order_id) {
                    return Err(PaymentError::AlreadyCharged { order_id });
                }
                // An account never funded has a balance of 0: every charge is declined.
                if amount_cents.0 > self.balance_cents {
                    return Err(PaymentError::PaymentDeclined {
                        amount: amount_cents.0,
                        balance: self.balance_cents,
                    });
                }
                PaymentEvent::PaymentCharged(PaymentCharged {
                    order_id,
                    amount_cents,
                })
            }
            PaymentCommand::RefundPayment { order_id } => {
                let amount_cents = *self
                    .charges
                    .get(&order_id)
                    .ok_or(PaymentError::ChargeNotFound { order_id })?;
                PaymentEvent::PaymentRefunded(PaymentRefunded {
                    order_id,
                    amount_cents,
                })
            }
        };
        Ok(vec![event])
    }
}

impl Aggregate for PaymentAccount {
    const TYPE: &'static str = "payment_account";
    type Command = PaymentCommand;
    type Event = PaymentEvent;
    type Error = PaymentError;
    type Services = ();

    async fn handle(
        &mut self,
        command: PaymentCommand,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), PaymentError> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: PaymentEvent) {
        match event {
            PaymentEvent::FundsDeposited(e) => {
                self.customer_id = Some(e.customer_id);
                self.balance_cents = self.balance_cents.saturating_add(e.amount_cents.0);
            }
            PaymentEvent::PaymentCharged(e) => {
                self.balance_cents = self.balance_cents.saturating_sub(e.amount_cents.0);
                self.charges.insert(e.order_id, e.amount_cents);
            }
            PaymentEvent::PaymentRefunded(e) => {
                self.balance_cents = self.balance_cents.saturating_add(e.amount_cents.0);
                self.charges.remove(&e.order_id);
            }
        }
    }
}
