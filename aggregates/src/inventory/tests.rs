//! Every inventory rule as given / when / then.

use cqrs_es::test::TestFramework;

use super::*;

type InventoryTest = TestFramework<Inventory>;

fn sku() -> Sku {
    Sku::new("SKU-1").unwrap()
}

fn order(n: u128) -> OrderId {
    OrderId(uuid::Uuid::from_u128(n))
}

fn restocked(quantity: u64) -> InventoryEvent {
    InventoryEvent::StockRestocked(StockRestocked {
        sku: sku(),
        quantity: Quantity(quantity),
    })
}

fn reserved(n: u128, quantity: u64) -> InventoryEvent {
    InventoryEvent::StockReserved(StockReserved {
        order_id: order(n),
        quantity: Quantity(quantity),
    })
}

fn reserve(n: u128, quantity: u64) -> InventoryCommand {
    InventoryCommand::ReserveStock {
        order_id: order(n),
        quantity: Quantity(quantity),
    }
}

#[test]
fn restock_adds_on_hand() {
    InventoryTest::with(())
        .given_no_previous_events()
        .when(InventoryCommand::Restock {
            sku: sku(),
            quantity: Quantity(10),
        })
        .then_expect_events(vec![restocked(10)]);
}

#[test]
fn restock_past_the_stock_limit_is_refused() {
    InventoryTest::with(())
        .given(vec![restocked(Inventory::MAX_ON_HAND)])
        .when(InventoryCommand::Restock {
            sku: sku(),
            quantity: Quantity(1),
        })
        .then_expect_error(InventoryError::StockLimitExceeded {
            max: Inventory::MAX_ON_HAND,
        });
}

#[test]
fn reserve_within_available_holds_the_units() {
    InventoryTest::with(())
        .given(vec![restocked(5)])
        .when(reserve(1, 5))
        .then_expect_events(vec![reserved(1, 5)]);
}

#[test]
fn reserve_more_than_available_is_refused_whole() {
    InventoryTest::with(())
        .given(vec![restocked(5), reserved(1, 3)])
        .when(reserve(2, 3))
        .then_expect_error(InventoryError::InsufficientStock {
            requested: 3,
            available: 2,
        });
}

#[test]
fn a_sku_never_restocked_is_short_of_stock() {
    InventoryTest::with(())
        .given_no_previous_events()
        .when(reserve(1, 1))
        .then_expect_error(InventoryError::InsufficientStock {
            requested: 1,
            available: 0,
        });
}

#[test]
fn one_order_reserves_a_sku_once() {
    InventoryTest::with(())
        .given(vec![restocked(5), reserved(1, 1)])
        .when(reserve(1, 1))
        .then_expect_error(InventoryError::ReservationExists { order_id: order(1) });
}

#[test]
fn release_gives_the_whole_reservation_back() {
    InventoryTest::with(())
        .given(vec![restocked(5), reserved(1, 3)])
        .when(InventoryCommand::ReleaseStock { order_id: order(1) })
        .then_expect_events(vec![InventoryEvent::StockReleased(StockReleased {
            order_id: order(1),
            quantity: Quantity(3),
        })]);
}

#[test]
fn release_or_sell_without_a_reservation_is_refused() {
    for command in [
        InventoryCommand::ReleaseStock { order_id: order(9) },
        InventoryCommand::SellStock { order_id: order(9) },
    ] {
        InventoryTest::with(())
            .given(vec![restocked(5)])
            .when(command)
            .then_expect_error(InventoryError::ReservationNotFound { order_id: order(9) });
    }
}

#[test]
fn sale_leaves_on_hand_and_reserved_and_return_puts_it_back() {
    let mut stock = Inventory::default();
    for event in [restocked(10), reserved(1, 4)] {
        stock.apply(event);
    }
    assert_eq!(
        (stock.on_hand, stock.reserved, stock.available()),
        (10, 4, 6)
    );
    for event in stock
        .decide(InventoryCommand::SellStock { order_id: order(1) })
        .unwrap()
    {
        stock.apply(event);
    }
    assert_eq!(
        (stock.on_hand, stock.reserved, stock.available()),
        (6, 0, 6)
    );
    let back = InventoryCommand::ReturnStock {
        order_id: order(1),
        quantity: Quantity(4),
    };
    for event in stock.decide(back).unwrap() {
        stock.apply(event);
    }
    assert_eq!(
        (stock.on_hand, stock.reserved, stock.available()),
        (10, 0, 10)
    );
}

#[test]
fn available_is_never_negative() {
    let mut stock = Inventory::default();
    stock.apply(reserved(1, 3));
    assert_eq!(stock.available(), 0);
}
