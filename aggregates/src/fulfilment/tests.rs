//! The saga's decisions, input by input, with no Kafka and a fixed clock.

use super::*;

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn sku(s: &str) -> Sku {
    Sku::new(s).unwrap()
}

const ORDER: OrderId = OrderId(Uuid::from_u128(7));

/// A saga under test: its state, and the commands it has sent so far.
struct Run {
    saga: Fulfilment,
    sent: Vec<Outgoing>,
    now: DateTime<Utc>,
}

impl Run {
    fn placed(lines: &[(&str, u64)]) -> Self {
        let mut run = Run {
            saga: Fulfilment::default(),
            sent: Vec::new(),
            now: t0(),
        };
        run.feed(Input::Placed {
            order_id: ORDER,
            customer_id: CustomerId::new("c-1").unwrap(),
            lines: lines
                .iter()
                .map(|(s, q)| SagaLine {
                    sku: sku(s),
                    quantity: Quantity(*q),
                })
                .collect(),
            total_cents: Cents(500),
        });
        run
    }

    fn feed(&mut self, input: Input) -> Vec<Outgoing> {
        let events = self.saga.decide(input, self.now, Deadlines::default());
        let mut sent = Vec::new();
        for event in events {
            self.saga.apply(event.clone());
            sent.extend(self.saga.commands_for(&event));
        }
        self.sent.extend(sent.clone());
        sent
    }

    /// Answers the sent command of `stream`/`aggregate_id` whose JSON names `command`.
    fn answer(
        &mut self,
        command: &str,
        aggregate_id: &str,
        ok: bool,
        code: Option<&str>,
    ) -> Vec<Outgoing> {
        let id = self
            .sent
            .iter()
            .rev()
            .find(|o| o.aggregate_id == aggregate_id && o.command.get(command).is_some())
            .unwrap_or_else(|| panic!("no {command} sent to {aggregate_id}"))
            .command_id;
        self.feed(Input::Reply {
            command_id: id,
            ok,
            code: code.map(String::from),
        })
    }

    fn timeline(&self) -> Vec<(&'static str, &'static str)> {
        self.saga
            .steps
            .iter()
            .map(|s| (s.name.as_str(), s.status.as_str()))
            .collect()
    }
}

fn names(sent: &[Outgoing]) -> Vec<String> {
    sent.iter()
        .map(|o| {
            let name = o
                .command
                .as_object()
                .map(|m| m.keys().next().unwrap().clone());
            format!(
                "{}:{}",
                name.unwrap_or_else(|| o.command.as_str().unwrap().to_string()),
                o.aggregate_id
            )
        })
        .collect()
}

#[test]
fn happy_path_reserves_charges_confirms_and_sells() {
    let mut run = Run::placed(&[("a", 1), ("b", 2)]);
    assert_eq!(names(&run.sent), ["ReserveStock:a", "ReserveStock:b"]);
    assert!(
        run.answer("ReserveStock", "a", true, None).is_empty(),
        "waits for every line"
    );
    let next = run.answer("ReserveStock", "b", true, None);
    assert_eq!(names(&next), ["ChargePayment:c-1"]);
    assert_eq!(next[0].command["ChargePayment"]["amount_cents"], 500);
    let next = run.answer("ChargePayment", "c-1", true, None);
    assert_eq!(
        names(&next),
        ["ConfirmOrder:00000000-0000-0000-0000-000000000007"]
    );
    let next = run.feed(Input::Reply {
        command_id: next[0].command_id,
        ok: true,
        code: None,
    });
    assert_eq!(names(&next), ["SellStock:a", "SellStock:b"]);
    run.answer("SellStock", "a", true, None);
    run.answer("SellStock", "b", true, None);
    assert_eq!(run.saga.status, Some(SagaStatus::Completed));
    assert_eq!(run.saga.failure_reason, None);
    assert_eq!(
        run.timeline(),
        [
            ("reserve_stock", "completed"),
            ("charge_payment", "completed"),
            ("confirm_order", "completed"),
            ("sell_stock", "completed")
        ]
    );
}

#[test]
fn short_stock_on_one_line_releases_the_others_then_rejects() {
    let mut run = Run::placed(&[("a", 1), ("b", 1), ("c", 1)]);
    run.answer("ReserveStock", "a", true, None);
    run.answer("ReserveStock", "b", false, Some("insufficient_stock"));
    let next = run.answer("ReserveStock", "c", true, None);
    assert_eq!(
        names(&next),
        ["ReleaseStock:a", "ReleaseStock:c"],
        "only what was reserved"
    );
    assert!(
        run.answer("ReleaseStock", "a", true, None).is_empty(),
        "rejects only once all is released"
    );
    let next = run.answer("ReleaseStock", "c", true, None);
    assert_eq!(
        names(&next),
        ["RejectOrder:00000000-0000-0000-0000-000000000007"]
    );
    assert_eq!(
        next[0].command["RejectOrder"]["reason"],
        "insufficient_stock"
    );
    run.feed(Input::Reply {
        command_id: next[0].command_id,
        ok: true,
        code: None,
    });
    assert_eq!(run.saga.status, Some(SagaStatus::Compensated));
    assert_eq!(
        run.saga.failure_reason,
        Some(FailureReason::InsufficientStock)
    );
    assert_eq!(
        run.timeline(),
        [
            ("reserve_stock", "failed"),
            ("release_stock", "completed"),
            ("reject_order", "completed")
        ]
    );
}

#[test]
fn a_declined_charge_releases_the_stock() {
    let mut run = Run::placed(&[("a", 1)]);
    run.answer("ReserveStock", "a", true, None);
    let next = run.answer("ChargePayment", "c-1", false, Some("payment_declined"));
    assert_eq!(names(&next), ["ReleaseStock:a"]);
    let next = run.answer("ReleaseStock", "a", true, None);
    assert_eq!(next[0].command["RejectOrder"]["reason"], "payment_declined");
}

#[test]
fn a_reservation_past_its_deadline_is_released_without_waiting_and_rejected_with_timeout() {
    let mut run = Run::placed(&[("a", 1), ("b", 1)]);
    run.answer("ReserveStock", "a", true, None);
    run.now = t0() + Duration::seconds(29);
    assert!(run.feed(Input::Tick).is_empty(), "not yet");
    run.now = t0() + Duration::seconds(30);
    let next = run.feed(Input::Tick);
    assert_eq!(names(&next), ["ReleaseStock:a", "ReleaseStock:b"]);
    let next = run.answer("ReleaseStock", "a", true, None);
    assert_eq!(
        next[0].command["RejectOrder"]["reason"], "timeout",
        "b's release is not awaited"
    );
    // The late answer to b's reservation changes nothing: its release is queued behind it.
    assert!(run.answer("ReserveStock", "b", true, None).is_empty());
    assert_eq!(run.saga.steps[0].status, StepStatus::TimedOut);
}

#[test]
fn a_charge_past_its_deadline_is_not_refunded_blindly_and_expired_commands_mean_timeout() {
    let mut run = Run::placed(&[("a", 1)]);
    run.answer("ReserveStock", "a", true, None);
    run.now = t0() + Duration::seconds(61);
    let next = run.feed(Input::Tick);
    assert_eq!(
        names(&next),
        ["ReleaseStock:a"],
        "the account cannot tell a late charge from none: no refund of a guess"
    );
    let next = run.answer("ReleaseStock", "a", true, None);
    assert_eq!(next[0].command["RejectOrder"]["reason"], "timeout");
    run.feed(Input::Reply {
        command_id: next[0].command_id,
        ok: true,
        code: None,
    });
    assert_eq!(run.saga.status, Some(SagaStatus::Compensated));
    // The charge's late answer: it expired, so there is nothing to give back.
    let late = run.answer("ChargePayment", "c-1", false, Some(EXPIRED));
    assert!(late.is_empty(), "{late:?}");
    assert_eq!(
        run.timeline(),
        [
            ("reserve_stock", "completed"),
            ("charge_payment", "timed_out"),
            ("release_stock", "completed"),
            ("reject_order", "completed")
        ]
    );

    let mut run = Run::placed(&[("a", 1)]);
    run.answer("ReserveStock", "a", true, None);
    run.answer("ChargePayment", "c-1", false, Some(EXPIRED));
    let next = run.answer("ReleaseStock", "a", true, None);
    assert_eq!(next[0].command["RejectOrder"]["reason"], "timeout");
}

#[test]
fn a_charge_taken_after_its_deadline_is_refunded_once_with_its_amount() {
    // The late answer comes while the stock is being released: the rejection waits for
    // the refund too.
    let mut run = Run::placed(&[("a", 1)]);
    run.answer("ReserveStock", "a", true, None);
    run.now = t0() + Duration::seconds(61);
    run.feed(Input::Tick);
    let refund = run.answer("ChargePayment", "c-1", true, None);
    assert_eq!(names(&refund), ["RefundPayment:c-1"]);
    assert_eq!(refund[0].command["RefundPayment"]["amount_cents"], 500);
    assert!(run.saga.steps[3].awaited);
    assert!(
        run.answer("ChargePayment", "c-1", true, None).is_empty(),
        "a duplicate answer refunds nothing more"
    );
    assert!(run.answer("ReleaseStock", "a", true, None).is_empty());
    let next = run.answer("RefundPayment", "c-1", true, None);
    assert_eq!(next[0].command["RejectOrder"]["reason"], "timeout");

    // The late answer comes after the saga ended: the money still goes back.
    let mut run = Run::placed(&[("a", 1)]);
    run.answer("ReserveStock", "a", true, None);
    run.now = t0() + Duration::seconds(61);
    run.feed(Input::Tick);
    let reject = run.answer("ReleaseStock", "a", true, None);
    run.feed(Input::Reply {
        command_id: reject[0].command_id,
        ok: true,
        code: None,
    });
    assert_eq!(run.saga.status, Some(SagaStatus::Compensated));
    let refund = run.answer("ChargePayment", "c-1", true, None);
    assert_eq!(names(&refund), ["RefundPayment:c-1"]);
    assert_eq!(refund[0].command_id, command_id_for(ORDER, 4, ""));
    run.answer("RefundPayment", "c-1", true, None);
    assert_eq!(run.saga.status, Some(SagaStatus::Compensated));
    assert_eq!(
        run.timeline(),
        [
            ("reserve_stock", "completed"),
            ("charge_payment", "timed_out"),
            ("release_stock", "completed"),
            ("reject_order", "completed"),
            ("refund_payment", "completed")
        ]
    );
    assert!(run.answer("ChargePayment", "c-1", true, None).is_empty());
}

#[test]
fn cancelling_a_confirmed_order_returns_the_stock_and_refunds() {
    let mut run = Run::placed(&[("a", 3)]);
    run.answer("ReserveStock", "a", true, None);
    let confirm = run.answer("ChargePayment", "c-1", true, None);
    run.feed(Input::Reply {
        command_id: confirm[0].command_id,
        ok: true,
        code: None,
    });
    run.answer("SellStock", "a", true, None);
    assert_eq!(run.saga.status, Some(SagaStatus::Completed));
    let next = run.feed(Input::Cancelled);
    assert_eq!(names(&next), ["RefundPayment:c-1", "ReturnStock:a"]);
    assert_eq!(
        next[0].command["RefundPayment"]["amount_cents"], 500,
        "the amount the saga charged"
    );
    assert_eq!(next[1].command["ReturnStock"]["quantity"], 3);
    run.answer("RefundPayment", "c-1", true, None);
    let last = run.answer("ReturnStock", "a", true, None);
    assert!(last.is_empty(), "a cancelled order is not rejected");
    assert_eq!(run.saga.status, Some(SagaStatus::Compensated));
    assert_eq!(run.saga.failure_reason, Some(FailureReason::Cancelled));
}

#[test]
fn cancelling_while_reserving_compensates_at_the_step_boundary() {
    let mut run = Run::placed(&[("a", 1)]);
    assert!(run.feed(Input::Cancelled).is_empty());
    let next = run.answer("ReserveStock", "a", true, None);
    assert_eq!(names(&next), ["ReleaseStock:a"]);
    assert!(run.answer("ReleaseStock", "a", true, None).is_empty());
    assert_eq!(run.saga.status, Some(SagaStatus::Compensated));
}

#[test]
fn a_refused_confirmation_means_the_order_was_cancelled() {
    let mut run = Run::placed(&[("a", 1)]);
    run.answer("ReserveStock", "a", true, None);
    let confirm = run.answer("ChargePayment", "c-1", true, None);
    let next = run.feed(Input::Reply {
        command_id: confirm[0].command_id,
        ok: false,
        code: Some("order_not_placed".into()),
    });
    assert_eq!(names(&next), ["RefundPayment:c-1", "ReleaseStock:a"]);
}

#[test]
fn replays_are_harmless_and_ids_are_deterministic() {
    let mut run = Run::placed(&[("a", 1)]);
    let again = run.feed(Input::Placed {
        order_id: ORDER,
        customer_id: CustomerId::new("c-1").unwrap(),
        lines: vec![],
        total_cents: Cents(1),
    });
    assert!(again.is_empty(), "a second OrderPlaced starts nothing");
    let first = run.answer("ReserveStock", "a", true, None);
    assert!(
        run.answer("ReserveStock", "a", true, None).is_empty(),
        "a duplicate reply is ignored"
    );
    assert_eq!(first.len(), 1);
    let other = Run::placed(&[("a", 1)]);
    assert_eq!(other.sent[0].command_id, run.sent[0].command_id);
    assert_eq!(run.sent[0].command_id, command_id_for(ORDER, 0, "a"));
    assert!(run
        .feed(Input::Reply {
            command_id: Uuid::from_u128(1),
            ok: true,
            code: None
        })
        .is_empty());
}

#[test]
fn the_next_deadline_is_the_earliest_open_one() {
    let run = Run::placed(&[("a", 1)]);
    assert_eq!(run.saga.next_deadline(), Some(t0() + Duration::seconds(30)));
    assert_eq!(Fulfilment::default().next_deadline(), None);
}
