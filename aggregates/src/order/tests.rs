//! Every order rule as given / when / then.

use cqrs_es::test::TestFramework;

use super::*;

type OrderTest = TestFramework<Order>;

fn order_id() -> OrderId {
    OrderId(uuid::Uuid::from_u128(1))
}

fn customer() -> CustomerId {
    CustomerId::new("alice").unwrap()
}

fn line(sku: &str, quantity: u64, price: u64) -> OrderLine {
    OrderLine {
        sku: Sku::new(sku).unwrap(),
        quantity: Quantity(quantity),
        unit_price_cents: Cents(price),
    }
}

fn created(lines: Vec<OrderLine>) -> OrderEvent {
    OrderEvent::OrderCreated(OrderCreated {
        order_id: order_id(),
        customer_id: customer(),
        lines,
    })
}

fn placed() -> OrderEvent {
    OrderEvent::OrderPlaced(OrderPlaced {
        customer_id: customer(),
        lines: vec![line("A", 2, 150)],
        total_cents: Cents(300),
    })
}

fn given_draft() -> cqrs_es::test::AggregateTestExecutor<Order> {
    OrderTest::with(()).given(vec![created(vec![line("A", 2, 150)])])
}

fn create(lines: Vec<OrderLine>) -> OrderCommand {
    OrderCommand::CreateOrder {
        order_id: order_id(),
        customer_id: customer(),
        lines,
    }
}

#[test]
fn create_opens_a_draft_with_its_lines() {
    OrderTest::with(())
        .given_no_previous_events()
        .when(create(vec![line("A", 2, 150)]))
        .then_expect_events(vec![created(vec![line("A", 2, 150)])]);
}

#[test]
fn create_needs_at_least_one_line() {
    OrderTest::with(())
        .given_no_previous_events()
        .when(create(vec![]))
        .then_expect_error(OrderError::NoLines);
}

#[test]
fn create_with_more_than_50_lines_is_refused() {
    let lines = (0..51).map(|i| line(&format!("S{i}"), 1, 1)).collect();
    OrderTest::with(())
        .given_no_previous_events()
        .when(create(lines))
        .then_expect_error(OrderError::TooManyLines { max: 50 });
}

#[test]
fn create_naming_a_sku_twice_is_refused() {
    OrderTest::with(())
        .given_no_previous_events()
        .when(create(vec![
            line("A", 1, 1),
            line("B", 1, 1),
            line("A", 2, 1),
        ]))
        .then_expect_error(OrderError::DuplicateSku {
            sku: Sku::new("A").unwrap(),
        });
}

#[test]
fn creating_an_existing_order_is_refused() {
    given_draft()
        .when(create(vec![line("B", 1, 1)]))
        .then_expect_error(OrderError::AlreadyExists);
}

#[test]
fn commands_to_an_unknown_order_are_not_found() {
    for command in [
        OrderCommand::PlaceOrder,
        OrderCommand::AddLine(line("A", 1, 1)),
        OrderCommand::ConfirmOrder,
    ] {
        OrderTest::with(())
            .given_no_previous_events()
            .when(command)
            .then_expect_error(OrderError::NotFound);
    }
}

#[test]
fn add_line_of_a_new_sku_adds_a_line() {
    given_draft()
        .when(OrderCommand::AddLine(line("B", 3, 99)))
        .then_expect_events(vec![OrderEvent::LineAdded(LineAdded {
            sku: Sku::new("B").unwrap(),
            quantity: Quantity(3),
            unit_price_cents: Cents(99),
        })]);
}

#[test]
fn add_line_of_a_sku_on_the_order_adds_to_its_quantity_keeping_order() {
    let mut order = Order::default();
    order.apply(created(vec![line("A", 2, 150), line("B", 1, 10)]));
    order.apply(OrderEvent::LineAdded(LineAdded {
        sku: Sku::new("A").unwrap(),
        quantity: Quantity(5),
        unit_price_cents: Cents(150),
    }));
    assert_eq!(order.lines, vec![line("A", 7, 150), line("B", 1, 10)]);
    assert_eq!(order.total_cents(), Cents(7 * 150 + 10));
}

#[test]
fn add_line_at_another_price_for_the_same_sku_is_refused() {
    given_draft()
        .when(OrderCommand::AddLine(line("A", 1, 151)))
        .then_expect_error(OrderError::PriceMismatch {
            sku: Sku::new("A").unwrap(),
            existing_cents: 150,
        });
}

#[test]
fn add_line_beyond_1000_units_on_one_line_is_refused() {
    given_draft()
        .when(OrderCommand::AddLine(line("A", 999, 150)))
        .then_expect_error(OrderError::LineQuantityExceeded {
            sku: Sku::new("A").unwrap(),
            max: 1000,
            would_be: 1001,
        });
}

#[test]
fn add_line_beyond_50_lines_is_refused() {
    let lines = (0..50).map(|i| line(&format!("S{i}"), 1, 1)).collect();
    OrderTest::with(())
        .given(vec![created(lines)])
        .when(OrderCommand::AddLine(line("NEW", 1, 1)))
        .then_expect_error(OrderError::TooManyLines { max: 50 });
}

#[test]
fn add_line_after_place_is_rejected() {
    given_draft()
        .and(vec![placed()])
        .when(OrderCommand::AddLine(line("B", 1, 1)))
        .then_expect_error(OrderError::NotDraft {
            status: OrderStatus::Placed,
        });
}

#[test]
fn remove_line_takes_the_sku_off() {
    given_draft()
        .when(OrderCommand::RemoveLine {
            sku: Sku::new("A").unwrap(),
        })
        .then_expect_events(vec![OrderEvent::LineRemoved(LineRemoved {
            sku: Sku::new("A").unwrap(),
        })]);
}

#[test]
fn remove_line_of_a_sku_not_on_the_order_is_refused() {
    given_draft()
        .when(OrderCommand::RemoveLine {
            sku: Sku::new("Z").unwrap(),
        })
        .then_expect_error(OrderError::LineNotFound {
            sku: Sku::new("Z").unwrap(),
        });
}

#[test]
fn remove_line_after_place_is_refused() {
    given_draft()
        .and(vec![placed()])
        .when(OrderCommand::RemoveLine {
            sku: Sku::new("A").unwrap(),
        })
        .then_expect_error(OrderError::NotDraft {
            status: OrderStatus::Placed,
        });
}

#[test]
fn place_carries_customer_lines_and_total() {
    given_draft()
        .when(OrderCommand::PlaceOrder)
        .then_expect_events(vec![placed()]);
}

#[test]
fn place_needs_at_least_one_line() {
    given_draft()
        .and(vec![OrderEvent::LineRemoved(LineRemoved {
            sku: Sku::new("A").unwrap(),
        })])
        .when(OrderCommand::PlaceOrder)
        .then_expect_error(OrderError::NoLines);
}

#[test]
fn place_twice_is_refused() {
    given_draft()
        .and(vec![placed()])
        .when(OrderCommand::PlaceOrder)
        .then_expect_error(OrderError::NotDraft {
            status: OrderStatus::Placed,
        });
}

#[test]
fn cancel_is_allowed_for_draft_placed_and_confirmed_and_remembers_the_status() {
    let confirmed = OrderEvent::OrderConfirmed(OrderConfirmed {});
    let cases = [
        (vec![], OrderStatus::Draft),
        (vec![placed()], OrderStatus::Placed),
        (vec![placed(), confirmed], OrderStatus::Confirmed),
    ];
    for (history, previous_status) in cases {
        given_draft()
            .and(history)
            .when(OrderCommand::CancelOrder {
                reason: "changed my mind".into(),
            })
            .then_expect_events(vec![OrderEvent::OrderCancelled(OrderCancelled {
                reason: "changed my mind".into(),
                previous_status,
            })]);
    }
}

#[test]
fn cancel_is_refused_for_cancelled_and_rejected_orders() {
    let cancelled = OrderEvent::OrderCancelled(OrderCancelled {
        reason: "x".into(),
        previous_status: OrderStatus::Draft,
    });
    let rejected = OrderEvent::OrderRejected(OrderRejected {
        reason: RejectionReason::Timeout,
    });
    for (history, status) in [
        (vec![cancelled], OrderStatus::Cancelled),
        (vec![placed(), rejected], OrderStatus::Rejected),
    ] {
        given_draft()
            .and(history)
            .when(OrderCommand::CancelOrder {
                reason: "again".into(),
            })
            .then_expect_error(OrderError::NotCancellable { status });
    }
}

#[test]
fn cancel_needs_a_reason_that_is_not_blank_or_huge_or_full_of_control_characters() {
    for reason in [
        "".to_string(),
        "   ".to_string(),
        "x".repeat(1001),
        "nul \u{0} inside".to_string(),
        "bell \u{7}".to_string(),
    ] {
        given_draft()
            .when(OrderCommand::CancelOrder { reason })
            .then_expect_error(OrderError::InvalidReason { max: 1000 });
    }
}

#[test]
fn confirm_and_reject_need_a_placed_order() {
    given_draft()
        .and(vec![placed()])
        .when(OrderCommand::ConfirmOrder)
        .then_expect_events(vec![OrderEvent::OrderConfirmed(OrderConfirmed {})]);
    given_draft()
        .and(vec![placed()])
        .when(OrderCommand::RejectOrder {
            reason: RejectionReason::PaymentDeclined,
        })
        .then_expect_events(vec![OrderEvent::OrderRejected(OrderRejected {
            reason: RejectionReason::PaymentDeclined,
        })]);
    given_draft()
        .when(OrderCommand::ConfirmOrder)
        .then_expect_error(OrderError::NotPlaced {
            status: OrderStatus::Draft,
        });
    let cancelled = OrderEvent::OrderCancelled(OrderCancelled {
        reason: "x".into(),
        previous_status: OrderStatus::Placed,
    });
    given_draft()
        .and(vec![placed(), cancelled])
        .when(OrderCommand::RejectOrder {
            reason: RejectionReason::Timeout,
        })
        .then_expect_error(OrderError::NotPlaced {
            status: OrderStatus::Cancelled,
        });
}

#[test]
fn reasons_are_kept_only_in_their_status() {
    let mut order = Order::default();
    order.apply(created(vec![line("A", 1, 1)]));
    order.apply(placed());
    order.apply(OrderEvent::OrderRejected(OrderRejected {
        reason: RejectionReason::InsufficientStock,
    }));
    assert_eq!(order.status, Some(OrderStatus::Rejected));
    assert_eq!(
        order.rejection_reason,
        Some(RejectionReason::InsufficientStock)
    );
    assert_eq!(order.cancellation_reason, None);
}

#[test]
fn every_error_names_a_snake_case_rule() {
    let err = OrderError::NotDraft {
        status: OrderStatus::Placed,
    };
    assert_eq!(err.rule(), "order_not_draft");
    assert!(err.to_string().contains("placed"));
    assert!(OrderError::NotFound.is_not_found());
}
