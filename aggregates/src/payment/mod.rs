//! The `PaymentAccount` aggregate: one customer's balance. The saga charges an order's
//! total to it and refunds exactly what was charged when it compensates; the balance
//! never goes negative, so money is conserved.
//!
//! The account keeps totals, not a list of orders: its state is the same size after a
//! customer's millionth order as after the first, so each command costs the same. Which
//! order was charged how much, and whether it was refunded, is the saga's knowledge (it
//! keeps one state per order): it refunds only a charge it saw go through, with the amount
//! it charged, under a deterministic command id the processor answers once. The account
//! still refuses a refund larger than everything charged and not yet refunded, so even a
//! wrong refund can never hand out money that was not paid in (ADR 9).

#[cfg(test)]
mod tests;

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
    /// Gives back what was charged for the order (compensation). The saga sends it once,
    /// and only for a charge it saw go through, with that charge's amount: the account
    /// no longer knows each order's charge, only that `amount_cents` fits in what was
    /// charged and not refunded.
    ///
    /// `amount_cents` is required. A refund written before it existed (`{"order_id"}`
    /// alone) does not decode, so the processor refuses it (`400 malformed_request`)
    /// and nothing moves: no refund of a guessed amount, and the saga's timeline shows
    /// the refund failed, not done. To upgrade without such refusals, run the new sagas
    /// first (a previous processor ignores the new field and refunds from its own
    /// record), or let the payment command topic drain of the old refunds before the new
    /// payment processors start.
    RefundPayment {
        order_id: OrderId,
        amount_cents: Cents,
    },
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
    #[error("order {order_id}: no charge of {amount} cents to refund ({outstanding} outstanding)")]
    ChargeNotFound {
        order_id: OrderId,
        amount: u64,
        outstanding: u64,
    },
    #[error("the balance would exceed {max} cents")]
    BalanceLimitExceeded { max: u64 },
}

impl PaymentError {
    /// The rule name reported in `details.rule` of a `422`.
    pub fn rule(&self) -> &'static str {
        match self {
            PaymentError::PaymentDeclined { .. } => "payment_declined",
            PaymentError::ChargeNotFound { .. } => "charge_not_found",
            PaymentError::BalanceLimitExceeded { .. } => "balance_limit_exceeded",
        }
    }
}

/// One customer's account: a fixed number of fields, whatever its history. Everything
/// deposited is `balance_cents + outstanding_cents`: a charge moves money from the first
/// to the second, a refund moves it back, and neither can make money up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PaymentAccount {
    pub customer_id: Option<CustomerId>,
    pub balance_cents: u64,
    /// Charged and not refunded, over all orders: the most a refund may give back.
    /// (New with the bounded account; a state saved with the old `charges` map instead
    /// loads with 0 here, which refuses refunds rather than inventing money.)
    #[serde(default)]
    pub outstanding_cents: u64,
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
                // A charge sent again is answered by the processor (same command id), not
                // refused here: the account does not remember orders.
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
            PaymentCommand::RefundPayment {
                order_id,
                amount_cents,
            } => {
                // Named `charge_not_found` so a compensation counts it as nothing to undo.
                if amount_cents.0 > self.outstanding_cents {
                    return Err(PaymentError::ChargeNotFound {
                        order_id,
                        amount: amount_cents.0,
                        outstanding: self.outstanding_cents,
                    });
                }
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
                self.outstanding_cents = self.outstanding_cents.saturating_add(e.amount_cents.0);
            }
            PaymentEvent::PaymentRefunded(e) => {
                self.balance_cents = self.balance_cents.saturating_add(e.amount_cents.0);
                self.outstanding_cents = self.outstanding_cents.saturating_sub(e.amount_cents.0);
            }
        }
    }
}
