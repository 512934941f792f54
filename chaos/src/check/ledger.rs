//! Stock and money are conserved: counted in signed arithmetic from the events, apart
//! from the aggregates' own (saturating) fold, so that a movement the fold would clamp
//! away — a sale of units never reserved, a refund of money never charged — shows.

use aggregates::{Inventory, InventoryEvent, PaymentAccount, PaymentEvent};

use super::history::fold;
use super::{names, History, Verdict};

/// Running totals of one SKU, signed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Stock {
    restocked: i128,
    returned: i128,
    sold: i128,
    reserved: i128,
}

impl Stock {
    fn on_hand(&self) -> i128 {
        self.restocked + self.returned - self.sold
    }

    fn available(&self) -> i128 {
        self.on_hand() - self.reserved
    }

    fn take(&mut self, event: &InventoryEvent) {
        let q = |n: u64| i128::from(n);
        match event {
            InventoryEvent::StockRestocked(e) => self.restocked += q(e.quantity.0),
            InventoryEvent::StockReserved(e) => self.reserved += q(e.quantity.0),
            InventoryEvent::StockReleased(e) => self.reserved -= q(e.quantity.0),
            InventoryEvent::StockSold(e) => {
                self.reserved -= q(e.quantity.0);
                self.sold += q(e.quantity.0);
            }
            InventoryEvent::StockReturned(e) => self.returned += q(e.quantity.0),
        }
    }
}

/// Replaying each SKU's events in order, available stock (on hand − reserved) and
/// reserved stock are never below zero after any event: nothing was oversold.
pub fn stock_never_negative(history: &History<'_>) -> Verdict {
    let mut v = Verdict::new(names::STOCK_NEVER_NEGATIVE);
    for (sku, events) in &history.inventory {
        v.checked += 1;
        let mut stock = Stock::default();
        for applied in events {
            stock.take(&applied.event);
            if stock.available() < 0 || stock.reserved < 0 {
                v.violate(
                    format!("inventory/{sku}"),
                    "available >= 0 and reserved >= 0 after every event",
                    format!(
                        "available {} reserved {} after {} (sequence {})",
                        stock.available(),
                        stock.reserved,
                        applied.logged.envelope.event_type,
                        applied.sequence()
                    ),
                );
                break;
            }
        }
    }
    v
}

/// For every SKU, the write side's folded stock balances against the movements in the
/// log: available + reserved + sold − returned = restocked.
pub fn stock_conserved(history: &History<'_>) -> Verdict {
    let mut v = Verdict::new(names::STOCK_CONSERVED);
    for (sku, events) in &history.inventory {
        v.checked += 1;
        let folded: Inventory = fold(events);
        let mut moved = Stock::default();
        for applied in events {
            moved.take(&applied.event);
        }
        let (available, reserved) = (i128::from(folded.available()), i128::from(folded.reserved));
        let lhs = available + reserved + moved.sold - moved.returned;
        if lhs != moved.restocked {
            v.violate(
                format!("inventory/{sku}"),
                format!("restocked {}", moved.restocked),
                format!(
                    "available {available} + reserved {reserved} + sold {} - returned {} = {lhs}",
                    moved.sold, moved.returned
                ),
            );
        }
    }
    v
}

/// For every account, the folded balance accounts for every cent: deposits = balance +
/// charges − refunds; and replaying its events, the balance and the charged-but-not-
/// refunded total are never below zero (no money spent twice, none given back unpaid).
pub fn money_conserved(history: &History<'_>) -> Verdict {
    let mut v = Verdict::new(names::MONEY_CONSERVED);
    for (customer, events) in &history.payment {
        v.checked += 1;
        let subject = format!("payment/{customer}");
        let (mut deposits, mut charges, mut refunds) = (0i128, 0i128, 0i128);
        let mut negative = None;
        for applied in events {
            match &applied.event {
                PaymentEvent::FundsDeposited(e) => deposits += i128::from(e.amount_cents.0),
                PaymentEvent::PaymentCharged(e) => charges += i128::from(e.amount_cents.0),
                PaymentEvent::PaymentRefunded(e) => refunds += i128::from(e.amount_cents.0),
            }
            let balance = deposits - charges + refunds;
            if negative.is_none() && (balance < 0 || charges < refunds) {
                negative = Some((balance, charges - refunds, applied.sequence()));
            }
        }
        if let Some((balance, outstanding, sequence)) = negative {
            v.violate(
                &subject,
                "balance >= 0 and refunds <= charges after every event",
                format!("balance {balance}, outstanding {outstanding} at sequence {sequence}"),
            );
        }
        let account: PaymentAccount = fold(events);
        let balance = i128::from(account.balance_cents);
        if deposits != balance + charges - refunds {
            v.violate(
                subject,
                format!("deposits {deposits}"),
                format!("balance {balance} + charges {charges} - refunds {refunds}"),
            );
        }
    }
    v
}
