//! `tally-bench`: drives a running Tally with workload orders-v1 and prints one JSON line.
//!
//! orders-v1: C virtual clients, each looping: create an order with 2 lines, add 2 lines,
//! place it; every 20th order also sends one invalid command (a line added after place)
//! that must be refused with 422. Every command's latency is measured, and for every 10th
//! order the freshness of the read side: from the place's answer until a plain GET (no
//! token) shows the placed order.
//!
//! `--workload fulfilment` is orders-v1 with the saga at work: stock and funds are seeded
//! first, every placed order is reserved, charged and confirmed, and the figures add sagas
//! completed per second (from /metrics) and, sampled on every 10th order, the time from the
//! place's answer until the order view shows `confirmed`.
//!
//! `--workload seed-events --events N` instead writes N order events straight to Kafka
//! (orders of 10 events each), for measuring `tally replay orders`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde_json::json;

mod seed;

/// Load generator for Tally.
#[derive(Debug, Parser)]
#[command(name = "tally-bench")]
struct Args {
    /// Base URL of the Tally API.
    #[arg(long, env = "TALLY_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Virtual clients.
    #[arg(long, short = 'c', default_value_t = 64)]
    clients: usize,
    /// How long to run, in seconds (after a 2 s warm-up that is not counted).
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// The workload: `orders-v1`, or `create-only` (one creation per order, to fill the
    /// processors with aggregates, e.g. to measure their memory).
    #[arg(long, default_value = "orders-v1")]
    workload: String,
    /// Stop after this many orders (default: run for the duration).
    #[arg(long)]
    orders: Option<u64>,
    /// seed-events: how many events to write.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// seed-events: Kafka bootstrap servers.
    #[arg(long, env = "TALLY_KAFKA_BROKERS", default_value = "127.0.0.1:19092")]
    kafka_brokers: String,
    /// seed-events: topic prefix of the Tally to seed.
    #[arg(long, env = "TALLY_TOPIC_PREFIX", default_value = "tally")]
    topic_prefix: String,
    /// seed-events: partitions of its topics.
    #[arg(long, env = "TALLY_PARTITIONS", default_value_t = 4)]
    partitions: i32,
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
    rejected_ok: u64,
}

/// Milliseconds from a command's answer until a plain query shows its effect.
type Freshness = Arc<std::sync::Mutex<Vec<f64>>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.workload == "seed-events" {
        return seed::run(
            &args.kafka_brokers,
            &args.topic_prefix,
            args.partitions,
            args.events,
        )
        .await;
    }
    anyhow::ensure!(
        ["orders-v1", "create-only", "fulfilment"].contains(&args.workload.as_str()),
        "unknown workload {}; try orders-v1, fulfilment, create-only or seed-events",
        args.workload
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .build()?;
    http.get(format!("{}/readyz", args.url))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("{} is not ready; start it with scripts/run", args.url))?;

    let fulfilment = args.workload == "fulfilment";
    if fulfilment {
        seed_stock_and_funds(&http, &args.url).await?;
    }
    let before = scrape(&http, &args.url).await;
    // A run bounded by --orders counts from the start; a timed run skips a 2 s warm-up.
    let warmup = Instant::now() + Duration::from_secs(if args.orders.is_some() { 0 } else { 2 });
    let stop = warmup + Duration::from_secs(args.duration_secs);
    let orders = Arc::new(AtomicU64::new(0));
    let freshness = Freshness::default();
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        let (http, url, orders, fresh) = (
            http.clone(),
            args.url.clone(),
            orders.clone(),
            freshness.clone(),
        );
        let plan = Plan {
            create_only: args.workload == "create-only",
            until_status: if fulfilment { "confirmed" } else { "placed" },
            limit: args.orders.unwrap_or(u64::MAX),
            warmup,
            stop,
        };
        clients.push(tokio::spawn(async move {
            client(http, url, orders, plan, fresh).await
        }));
    }
    let mut total = Tally::default();
    let started = Instant::now().max(warmup);
    for c in clients {
        let t = c.await?;
        total.latencies_us.extend(t.latencies_us);
        total.errors += t.errors;
        total.rejected_ok += t.rejected_ok;
    }
    let after = scrape(&http, &args.url).await;
    total.latencies_us.sort_unstable();
    let pct = |p: f64| {
        let l = &total.latencies_us;
        if l.is_empty() {
            0.0
        } else {
            l[((l.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
        }
    };
    let commands = total.latencies_us.len() as f64;
    let mut fresh = freshness.lock().unwrap_or_else(|p| p.into_inner()).clone();
    fresh.sort_by(f64::total_cmp);
    let fresh_pct = |p: f64| {
        fresh
            .get(((fresh.len().max(1) - 1) as f64 * p).round() as usize)
            .map(|v| (v * 10.0).round() / 10.0)
    };
    let elapsed = match args.orders {
        Some(_) => Instant::now().duration_since(started).as_secs_f64(),
        None => args.duration_secs as f64,
    };
    let sagas_completed = match (before, after) {
        (Some((_, _, s0)), Some((_, _, s1))) if fulfilment => Some(s1 - s0),
        _ => None,
    };
    let per_txn = match (before, after) {
        (Some((c0, t0, _)), Some((c1, t1, _))) if t1 > t0 => {
            Some(((c1 - c0) / (t1 - t0) * 10.0).round() / 10.0)
        }
        _ => None,
    };
    println!(
        "{}",
        json!({
            "workload": args.workload,
            "clients": args.clients,
            "duration_s": (elapsed * 10.0).round() / 10.0,
            "commands": commands as u64,
            "commands_per_s": (commands / elapsed).round(),
            "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99),
            "errors": total.errors,
            "rejected_ok": total.rejected_ok,
            "commands_per_txn": per_txn,
            // orders-v1: place → the view shows `placed`; fulfilment: → `confirmed`.
            "freshness_of": if fulfilment { "confirmed" } else { "placed" },
            "freshness_samples": fresh.len(),
            "freshness_p50_ms": fresh_pct(0.50),
            "freshness_p99_ms": fresh_pct(0.99),
            "sagas_completed": sagas_completed,
            "sagas_completed_per_s": sagas_completed.map(|n| (n / elapsed).round()),
        })
    );
    Ok(())
}

/// What a client does and until when.
#[derive(Clone, Copy)]
struct Plan {
    create_only: bool,
    /// The order status a freshness sample waits for.
    until_status: &'static str,
    limit: u64,
    warmup: Instant,
    stop: Instant,
}

/// One virtual client's loop.
async fn client(
    http: reqwest::Client,
    url: String,
    orders: Arc<AtomicU64>,
    plan: Plan,
    fresh: Freshness,
) -> Tally {
    let Plan {
        create_only,
        until_status,
        limit,
        warmup,
        stop,
    } = plan;
    let mut tally = Tally::default();
    while Instant::now() < stop || limit < u64::MAX {
        let n = orders.fetch_add(1, Ordering::Relaxed);
        if n >= limit {
            break;
        }
        let id = uuid::Uuid::new_v4();
        let line = |sku: String| json!({ "sku": sku, "quantity": 1 + n % 5, "unit_price_cents": 100 + n % 900 });
        let mut steps = vec![
            (
                format!("{url}/v1/orders"),
                json!({ "order_id": id, "customer_id": format!("c{}", n % 1000), "lines": [line(format!("S{}", n % 97)), line(format!("T{}", n % 89))] }),
                201,
            ),
            (
                format!("{url}/v1/orders/{id}/lines"),
                line(format!("U{}", n % 83)),
                200,
            ),
            (
                format!("{url}/v1/orders/{id}/lines"),
                line(format!("V{}", n % 79)),
                200,
            ),
            (format!("{url}/v1/orders/{id}/place"), json!({}), 200),
        ];
        if create_only {
            steps.truncate(1);
        } else if n % 20 == 19 {
            steps.push((
                format!("{url}/v1/orders/{id}/lines"),
                line("LATE".into()),
                422,
            ));
        }
        for (target, body, expected) in steps {
            let started = Instant::now();
            let status = http
                .post(&target)
                .json(&body)
                .send()
                .await
                .map(|r| r.status().as_u16());
            let elapsed = started.elapsed();
            if started < warmup {
                continue;
            }
            tally
                .latencies_us
                .push(elapsed.as_micros().min(u32::MAX as u128) as u32);
            if target.ends_with("/place") && n % 10 == 0 && matches!(status, Ok(200)) {
                tokio::spawn(sample_freshness(
                    http.clone(),
                    format!("{url}/v1/orders/{id}"),
                    until_status,
                    fresh.clone(),
                ));
            }
            match status {
                Ok(s) if s == expected && s == 422 => tally.rejected_ok += 1,
                Ok(s) if s == expected => {}
                _ => tally.errors += 1,
            }
        }
    }
    tally
}

/// Polls the order view (no token) until it shows `status`; records how long.
async fn sample_freshness(http: reqwest::Client, url: String, status: &str, fresh: Freshness) {
    let acked = Instant::now();
    while acked.elapsed() < Duration::from_secs(30) {
        if let Ok(r) = http.get(&url).send().await {
            if let Ok(view) = r.json::<serde_json::Value>().await {
                if view["status"] == status {
                    let ms = acked.elapsed().as_secs_f64() * 1000.0;
                    fresh.lock().unwrap_or_else(|p| p.into_inner()).push(ms);
                    return;
                }
            }
        }
        // 5 ms resolution for the read side's freshness; a saga takes several hops, and
        // polling it that often would load the server being measured.
        let poll = if status == "placed" { 5 } else { 20 };
        tokio::time::sleep(Duration::from_millis(poll)).await;
    }
}

/// Restocks every SKU orders-v1 uses and funds every customer, so that sagas confirm.
async fn seed_stock_and_funds(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let mut skus = Vec::new();
    for (letter, n) in [("S", 97), ("T", 89), ("U", 83), ("V", 79)] {
        skus.extend((0..n).map(|i| format!("{letter}{i}")));
    }
    let mut requests = Vec::new();
    for sku in skus {
        requests.push((
            format!("{url}/v1/inventory/{sku}/restock"),
            json!({ "quantity": 1_000_000 }),
        ));
    }
    for c in 0..1000 {
        requests.push((
            format!("{url}/v1/accounts/c{c}/deposits"),
            json!({ "amount_cents": 100_000_000 }),
        ));
    }
    for chunk in requests.chunks(64) {
        let sends: Vec<_> = chunk
            .iter()
            .map(|(target, body)| tokio::spawn(http.post(target).json(body).send()))
            .collect();
        for send in sends {
            send.await??
                .error_for_status()
                .context("seeding stock and funds")?;
        }
    }
    Ok(())
}

/// Sums of `tally_commands_total`, `tally_command_transactions_total` and completed sagas
/// from /metrics.
async fn scrape(http: &reqwest::Client, url: &str) -> Option<(f64, f64, f64)> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let completed = text
        .lines()
        .find(|l| l.starts_with("tally_sagas_ended_total{status=\"completed\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    Some((
        sum("tally_commands_total"),
        sum("tally_command_transactions_total"),
        completed,
    ))
}
