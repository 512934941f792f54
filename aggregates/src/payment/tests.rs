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

fn refunded(n: u128, amount: u64) -> PaymentEvent {
    PaymentEvent::PaymentRefunded(PaymentRefunded {
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

fn refund(n: u128, amount: u64) -> PaymentCommand {
    PaymentCommand::RefundPayment {
        order_id: order(n),
        amount_cents: Cents(amount),
    }
}

/// Decides `command` and applies what it produced.
fn run(account: &mut PaymentAccount, command: PaymentCommand) {
    for event in account.decide(command).unwrap() {
        account.apply(event);
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

/// The account does not remember orders: a charge sent twice is answered twice by the
/// processor from its record of command ids, never decided here a second time.
#[test]
fn the_account_does_not_tell_orders_apart() {
    PaymentTest::with(())
        .given(vec![deposited(500), charged(1, 100)])
        .when(charge(1, 100))
        .then_expect_events(vec![charged(1, 100)]);
}

#[test]
fn refund_gives_back_the_amount_the_saga_charged() {
    PaymentTest::with(())
        .given(vec![deposited(500), charged(1, 120)])
        .when(refund(1, 120))
        .then_expect_events(vec![refunded(1, 120)]);
}

#[test]
fn refund_above_what_is_charged_and_not_refunded_is_refused() {
    PaymentTest::with(())
        .given(vec![deposited(500), charged(1, 120), charged(2, 80)])
        .when(refund(1, 201))
        .then_expect_error(PaymentError::ChargeNotFound {
            order_id: order(1),
            amount: 201,
            outstanding: 200,
        });
}

#[test]
fn refund_without_a_charge_is_refused_so_money_is_conserved() {
    PaymentTest::with(())
        .given(vec![deposited(500), charged(1, 120), refunded(1, 120)])
        .when(refund(1, 120))
        .then_expect_error(PaymentError::ChargeNotFound {
            order_id: order(1),
            amount: 120,
            outstanding: 0,
        });
}

#[test]
fn balance_follows_charges_and_refunds_and_nothing_is_made_up() {
    let mut account = PaymentAccount::default();
    for event in [deposited(1000), charged(1, 300), charged(2, 200)] {
        account.apply(event);
    }
    assert_eq!(
        (account.balance_cents, account.outstanding_cents),
        (500, 500)
    );
    run(&mut account, refund(1, 300));
    assert_eq!(
        (account.balance_cents, account.outstanding_cents),
        (800, 200)
    );
    assert_eq!(
        account.balance_cents + account.outstanding_cents,
        1000,
        "everything deposited is in the balance or charged"
    );
}

/// The account's cost per command (its clone, its snapshot) does not grow with the
/// customer's history: neither with orders compensated nor with orders kept.
#[test]
fn an_account_does_not_grow_with_its_history() {
    let size = |a: &PaymentAccount| serde_json::to_vec(a).unwrap().len();
    let mut account = PaymentAccount::default();
    account.apply(deposited(PaymentAccount::MAX_BALANCE));
    run(&mut account, charge(0, 12_345));
    run(&mut account, refund(0, 12_345));
    let after_one = size(&account);
    for n in 1..=1_000 {
        run(&mut account, charge(n, 12_345));
        run(&mut account, refund(n, 12_345));
    }
    assert_eq!(size(&account), after_one, "1,000 charge/refund pairs later");

    // Charges never refunded (confirmed orders) only change numbers, within these bounds.
    let widest = size(&PaymentAccount {
        customer_id: Some(alice()),
        balance_cents: u64::MAX,
        outstanding_cents: u64::MAX,
    });
    for n in 1_001..=2_000 {
        run(&mut account, charge(n, 12_345));
    }
    assert!(size(&account) <= widest, "1,000 kept charges later");
    assert_eq!(account.outstanding_cents, 1_000 * 12_345);
}

/// A state saved before `outstanding_cents` existed still loads, and refuses refunds
/// rather than giving back money it cannot account for.
#[test]
fn a_state_from_before_the_totals_loads() {
    let old = r#"{"customer_id":"alice","balance_cents":500,
        "charges":{"00000000-0000-0000-0000-000000000001":120}}"#;
    let account: PaymentAccount = serde_json::from_str(old).unwrap();
    assert_eq!((account.balance_cents, account.outstanding_cents), (500, 0));
    assert!(account.decide(refund(1, 1)).is_err());
}
