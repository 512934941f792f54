//! A tiny in-memory Tally for the checker's tests: the real aggregates decide, the real
//! saga state machine runs, and every event, outcome and acknowledgement lands in a
//! [`Model`] the way the real system writes them. Good logs come from here; bad ones are
//! these with one thing broken on purpose.

use std::collections::{BTreeMap, VecDeque};

use aggregates::fulfilment::{Deadlines, Fulfilment, Input, Outgoing, SagaLine};
use aggregates::streams::{FULFILMENT, INVENTORY, ORDER, PAYMENT};
use aggregates::{
    Cents, CustomerId, Inventory, InventoryCommand, Order, OrderCommand, OrderEvent, OrderId,
    OrderLine, OrderStatus, PaymentAccount, PaymentCommand, Quantity, Sku,
};
use chrono::{DateTime, Duration, TimeZone, Utc};
use cqrs_es::Aggregate;
use eventlog::{CommandResult, EventEnvelope, EventMetadata, Outcome};
use uuid::Uuid;

use super::views;
use crate::check::History;
use crate::model::{Ack, LoggedEvent, LoggedOutcome, Model};

const PARTITIONS: i32 = 4;

/// The simulated system and the model it has written so far.
pub struct Sim {
    pub model: Model,
    now: DateTime<Utc>,
    next: u128,
    offsets: BTreeMap<(String, i32), i64>,
    versions: BTreeMap<(String, String), u64>,
    orders: BTreeMap<String, Order>,
    inventory: BTreeMap<String, Inventory>,
    accounts: BTreeMap<String, PaymentAccount>,
    sagas: BTreeMap<String, Fulfilment>,
    inputs: VecDeque<(String, Input)>,
}

/// Who asks: a client over HTTP (acknowledged, with a correlation id) or the saga.
#[derive(Clone, Copy, PartialEq)]
enum From {
    Client,
    Saga,
}

impl Sim {
    pub fn new() -> Self {
        Sim {
            model: Model::default(),
            now: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            next: 0,
            offsets: BTreeMap::new(),
            versions: BTreeMap::new(),
            orders: BTreeMap::new(),
            inventory: BTreeMap::new(),
            accounts: BTreeMap::new(),
            sagas: BTreeMap::new(),
            inputs: VecDeque::new(),
        }
    }

    fn id(&mut self) -> u128 {
        self.next += 1;
        self.next
    }

    pub fn restock(&mut self, sku: &str, quantity: u64) {
        let command = InventoryCommand::Restock {
            sku: Sku::new(sku).unwrap(),
            quantity: Quantity(quantity),
        };
        let id = Uuid::from_u128(self.id());
        self.inventory_command(sku, id, command, From::Client)
            .unwrap();
    }

    pub fn deposit(&mut self, customer: &str, cents: u64) {
        let command = PaymentCommand::Deposit {
            customer_id: CustomerId::new(customer).unwrap(),
            amount_cents: Cents(cents),
        };
        let id = Uuid::from_u128(self.id());
        self.payment_command(customer, id, command, From::Client)
            .unwrap();
    }

    /// Creates and places an order of `(sku, quantity, unit price)` lines, and lets the
    /// saga run to its end.
    pub fn order(&mut self, customer: &str, lines: &[(&str, u64, u64)]) -> String {
        let id = self.order_draft(customer, lines);
        self.client_order(&id, OrderCommand::PlaceOrder);
        id
    }

    /// Creates an order of `(sku, quantity, unit price)` lines and leaves it a draft.
    pub fn order_draft(&mut self, customer: &str, lines: &[(&str, u64, u64)]) -> String {
        let order_id = OrderId(Uuid::from_u128(1 << 64 | self.id()));
        let lines = lines
            .iter()
            .map(|(sku, q, p)| OrderLine {
                sku: Sku::new(*sku).unwrap(),
                quantity: Quantity(*q),
                unit_price_cents: Cents(*p),
            })
            .collect();
        let create = OrderCommand::CreateOrder {
            order_id,
            customer_id: CustomerId::new(customer).unwrap(),
            lines,
        };
        let id = order_id.to_string();
        self.client_order(&id, create);
        id
    }

    /// Cancels an order and lets its saga compensate.
    pub fn cancel(&mut self, order_id: &str) {
        let reason = "changed my mind".to_string();
        self.client_order(order_id, OrderCommand::CancelOrder { reason });
    }

    fn client_order(&mut self, order_id: &str, command: OrderCommand) {
        let id = Uuid::from_u128(self.id());
        self.order_command(order_id, id, command, From::Client)
            .unwrap();
        self.pump();
    }

    /// The model with read models that are exactly the fold of the log.
    pub fn settled(&self) -> Model {
        let mut model = self.model.clone();
        settle(&mut model);
        model
    }

    /// Runs the saga until nothing is left to do.
    fn pump(&mut self) {
        while let Some((order_id, input)) = self.inputs.pop_front() {
            self.now += Duration::milliseconds(1);
            let mut saga = self.sagas.remove(&order_id).unwrap_or_default();
            let decided = saga.run(input, self.now, Deadlines::default());
            self.sagas.insert(order_id.clone(), saga);
            for (event, commands) in decided {
                let seq = self.bump(FULFILMENT, &order_id);
                let envelope =
                    EventEnvelope::wrap::<Fulfilment>(&order_id, seq, &event, meta(None), self.now)
                        .unwrap();
                self.log(FULFILMENT, envelope);
                for command in commands {
                    self.send(&order_id, command);
                }
            }
        }
    }

    /// A saga's command: decided by its aggregate, answered to the saga's inbox.
    fn send(&mut self, order_id: &str, out: Outgoing) {
        let (id, cmd) = (out.aggregate_id.as_str(), out.command.clone());
        let result = match out.stream {
            INVENTORY => {
                let c = serde_json::from_value(cmd).unwrap();
                self.inventory_command(id, out.command_id, c, From::Saga)
            }
            PAYMENT => {
                let c = serde_json::from_value(cmd).unwrap();
                self.payment_command(id, out.command_id, c, From::Saga)
            }
            _ => {
                let c = serde_json::from_value(cmd).unwrap();
                self.order_command(id, out.command_id, c, From::Saga)
            }
        };
        let (ok, code) = match &result {
            Ok(_) => (true, None),
            Err(rule) => (false, Some(rule.clone())),
        };
        self.outcome(
            "tally.saga.order-fulfilment.inbox",
            None,
            out.command_id,
            id,
            result,
        );
        let input = Input::Reply {
            command_id: out.command_id,
            ok,
            code,
        };
        self.inputs.push_back((order_id.to_string(), input));
    }

    fn inventory_command(
        &mut self,
        sku: &str,
        id: Uuid,
        c: InventoryCommand,
        from: From,
    ) -> Result<u64, String> {
        let mut state = self.inventory.remove(sku).unwrap_or_default();
        let decided = state.decide(c).map_err(|e| e.rule().to_string());
        let result = self.record(INVENTORY, sku, id, &mut state, decided, from);
        self.inventory.insert(sku.to_string(), state);
        result
    }

    fn payment_command(
        &mut self,
        customer: &str,
        id: Uuid,
        c: PaymentCommand,
        from: From,
    ) -> Result<u64, String> {
        let mut state = self.accounts.remove(customer).unwrap_or_default();
        let decided = state.decide(c).map_err(|e| e.rule().to_string());
        let result = self.record(PAYMENT, customer, id, &mut state, decided, from);
        self.accounts.insert(customer.to_string(), state);
        result
    }

    fn order_command(
        &mut self,
        order_id: &str,
        id: Uuid,
        c: OrderCommand,
        from: From,
    ) -> Result<u64, String> {
        let mut state = self.orders.remove(order_id).unwrap_or_default();
        let decided = state.decide(c).map_err(|e| e.rule().to_string());
        for event in decided.iter().flatten() {
            self.saga_input(order_id, event);
        }
        let result = self.record(ORDER, order_id, id, &mut state, decided, from);
        self.orders.insert(order_id.to_string(), state);
        result
    }

    /// What the saga is told of an order event.
    fn saga_input(&mut self, order_id: &str, event: &OrderEvent) {
        let input = match event {
            OrderEvent::OrderPlaced(e) => Input::Placed {
                order_id: OrderId::parse(order_id).unwrap(),
                customer_id: e.customer_id.clone(),
                lines: e
                    .lines
                    .iter()
                    .map(|l| SagaLine {
                        sku: l.sku.clone(),
                        quantity: l.quantity,
                    })
                    .collect(),
                total_cents: e.total_cents,
            },
            OrderEvent::OrderCancelled(e)
                if matches!(
                    e.previous_status,
                    OrderStatus::Placed | OrderStatus::Confirmed
                ) =>
            {
                Input::Cancelled
            }
            _ => return,
        };
        self.inputs.push_back((order_id.to_string(), input));
    }

    /// Writes a decision's events (with the command id in their metadata) and its
    /// outcome; a client's acceptance is acknowledged.
    fn record<A: Aggregate>(
        &mut self,
        stream: &'static str,
        id: &str,
        command_id: Uuid,
        state: &mut A,
        decided: Result<Vec<A::Event>, String>,
        from: From,
    ) -> Result<u64, String> {
        self.now += Duration::milliseconds(1);
        let correlation = (from == From::Client).then(|| format!("corr-{command_id}"));
        let mut version = self.versions.get(&key(stream, id)).copied().unwrap_or(0);
        let events = decided.clone().unwrap_or_default();
        for event in events {
            version = self.bump(stream, id);
            let mut metadata = meta(correlation.clone());
            metadata.command_id = Some(command_id.to_string());
            let envelope =
                EventEnvelope::wrap::<A>(id, version, &event, metadata, self.now).unwrap();
            self.log(stream, envelope);
            state.apply(event);
        }
        let result = decided.map(|_| version);
        if from == From::Client {
            let topic = format!("tally.{stream}.outcomes");
            self.outcome(&topic, Some(stream), command_id, id, result.clone());
            if result.is_ok() {
                self.model.client.acks.push(Ack {
                    stream: Some(stream.to_string()),
                    aggregate_id: id.to_string(),
                    version,
                    command_id: None,
                    correlation_id: correlation,
                    idempotency_key: None,
                });
            }
        }
        result
    }

    fn outcome(
        &mut self,
        topic: &str,
        stream: Option<&str>,
        command_id: Uuid,
        aggregate_id: &str,
        result: Result<u64, String>,
    ) {
        let outcome = match result {
            Ok(version) => Outcome::Accepted {
                aggregate_id: aggregate_id.to_string(),
                version,
                created: version == 1,
                token: String::new(),
            },
            Err(rule) => Outcome::rule_violation(&rule, "refused"),
        };
        let offset = self.model.log.outcomes.len() as i64;
        self.model.log.outcomes.push(LoggedOutcome {
            topic: topic.to_string(),
            stream: stream.map(str::to_string),
            partition: 0,
            offset,
            result: CommandResult {
                command_id,
                outcome,
                idempotent: true,
            },
        });
    }

    fn bump(&mut self, stream: &str, id: &str) -> u64 {
        let v = self.versions.entry(key(stream, id)).or_default();
        *v += 1;
        *v
    }

    fn log(&mut self, stream: &str, envelope: EventEnvelope) {
        let partition = eventlog::partition_for(&envelope.aggregate_id, PARTITIONS);
        let offset = self
            .offsets
            .entry((stream.to_string(), partition))
            .or_default();
        let logged = LoggedEvent {
            partition,
            offset: *offset,
            envelope,
        };
        *offset += 1;
        let events = self.model.log.events.entry(stream.to_string()).or_default();
        events.push(logged);
    }
}

fn key(stream: &str, id: &str) -> (String, String) {
    (stream.to_string(), id.to_string())
}

fn meta(correlation_id: Option<String>) -> EventMetadata {
    EventMetadata {
        correlation_id,
        ..Default::default()
    }
}

/// Rewrites `model`'s read models as exactly the fold of its log.
pub fn settle(model: &mut Model) {
    let history = History::of(&model.log);
    let (orders, inventory) = (
        views::expected_orders(&history),
        views::expected_inventory(&history),
    );
    let (accounts, sagas) = (
        views::expected_accounts(&history),
        views::expected_sagas(&history),
    );
    model.read.orders = orders;
    model.read.inventory = inventory;
    model.read.accounts = accounts;
    model.read.sagas = sagas;
    model.read.journal = super::journal::expected_journal(&model.log);
}
