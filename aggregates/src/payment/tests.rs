//! Every payment rule as given / when / then.

use cqrs_es::test::TestFramework;

use super::*;

type PaymentTest = TestFramework<PaymentAccount>;

fn alice() -> CustomerId {
    CustomerId::new("alice").unwrap()
}

fn order(n: u128) -> OrderId {
    OrderId(uuid::Uuid::from_u128(n))
}

fn deposited(amount: u64) -> PaymentEvent {
    PaymentEvent::FundsDeposited(FundsDeposited {
        customer_id: alice(),
        amount_cents: Cents(amount),
    })
}

fn charged(n: u128, amount: u64) -> PaymentEvent {
    PaymentEvent::PaymentCharged(PaymentCharged {
        order_id: order(n),
        amount_cents: Cents(amount),
    })
}

fn charge(n: u128, amount: u64) -> PaymentCommand {
    PaymentCommand::ChargePayment {
        order_id: order(n),
        amount_cents: Cents(amount),
    }
}

#[test]
fn deposit_funds_the_account() {
    PaymentTest::with(())
        .given_no_previous_events()
        .when(PaymentCommand::Deposit {
            customer_id: alice(),
            amount_cents: Cents(500),
        })
        .then_expect_events(vec![deposited(500)]);
}

#[test]
fn deposit_past_the_balance_limit_is_refused() {
    PaymentTest::with(())
        .given(vec![deposited(PaymentAccount::MAX_BALANCE)])
        .when(PaymentCommand::Deposit {
            customer_id: alice(),
            amount_cents: Cents(1),
        })
        .then_expect_error(PaymentError::BalanceLimitExceeded {
            max: PaymentAccount::MAX_BALANCE,
        });
}

#[test]
fn charge_within_the_balance_is_taken() {
    PaymentTest::with(())
        .given(vec![deposited(500)])
        .when(charge(1, 500))
        .then_expect_events(vec![charged(1, 500)]);
}

#[test]
fn charge_above_the_balance_is_declined() {
    PaymentTest::with(())
        .given(vec![deposited(500), charged(1, 200)])
        .when(charge(2, 301))
        .then_expect_error(PaymentError::PaymentDeclined {
            amount: 301,
            balance: 300,
        });
}

#[test]
fn charge_to_an_account_never_funded_is_declined() {
    PaymentTest::with(())
        .given_no_previous_events()
        .when(charge(1, 1))
        .then_expect_error(PaymentError::PaymentDeclined {
            amount: 1,
            balance: 0,
        });
}

#[test]
fn an_order_is_charged_once() {
    PaymentTest::with(())
        .given(vec![deposited(500), charged(1, 100)])
        .when(charge(1, 100))
        .then_expect_error(PaymentError::AlreadyCharged { order_id: order(1) });
}

#[test]
fn refund_gives_back_exactly_what_was_charged() {
    PaymentTest::with(())
        .given(vec![deposited(500), charged(1, 120)])
        .when(PaymentCommand::RefundPayment { order_id: order(1) })
        .then_expect_events(vec![PaymentEvent::PaymentRefunded(PaymentRefunded {
            order_id: order(1),
            amount_cents: Cents(120),
        })]);
}

#[test]
fn refund_without_a_charge_is_refused_so_money_is_conserved() {
    let refunded = PaymentEvent::PaymentRefunded(PaymentRefunded {
        order_id: order(1),
        amount_cents: Cents(120),
    });
    PaymentTest::with(())
        .given(vec![deposited(500), charged(1, 120), refunded])
        .when(PaymentCommand::RefundPayment { order_id: order(1) })
        .then_expect_error(PaymentError::ChargeNotFound { order_id: order(1) });
}

#[test]
fn balance_follows_charges_and_refunds() {
    let mut account = PaymentAccount::default();
    for event in [deposited(1000), charged(1, 300), charged(2, 200)] {
        account.apply(event);
    }
    assert_eq!(account.balance_cents, 500);
    for event in account
        .decide(PaymentCommand::RefundPayment { order_id: order(1) })
        .unwrap()
    {
        account.apply(event);
    }
    assert_eq!(account.balance_cents, 800);
}
