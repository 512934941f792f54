//! One run, start to verdict: processes up, workload and nemesis for the duration, faults
//! healed, a bounded settle, the checker, the report.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use eventlog::KafkaConfig;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::nemesis::{Infra, Nemesis};
use super::plan::{self, FaultKind, Pace};
use super::processes::{base_layout, wait_ready, Processes, TallySettings};
use super::report::Report;
use super::workload::{Client, WorkloadConfig};
use crate::check::{self, Verdict};

/// Everything a run needs to know.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub tally: TallySettings,
    pub seed: u64,
    pub duration: Duration,
    pub kinds: Vec<FaultKind>,
    pub pace: Pace,
    pub infra: Infra,
    /// The first API process listens here, the second on the next port.
    pub base_port: u16,
    /// The most time the system gets to settle after the faults stop.
    pub settle: Duration,
    pub workload: WorkloadConfig,
    /// The command that replays this run (for the report).
    pub replay: String,
}

/// Runs it; the report says whether every invariant held.
pub async fn run(config: RunConfig) -> anyhow::Result<Report> {
    let plan = plan::plan(config.seed, config.duration, &config.kinds, config.pace)
        .map_err(anyhow::Error::msg)?;
    let dir = config.tally.dir.clone();
    let schedule: String = plan
        .iter()
        .map(|p| {
            format!(
                "{:>7.1}s  {:<10}  hold {:.1}s\n",
                p.at.as_secs_f64(),
                p.kind,
                p.hold.as_secs_f64()
            )
        })
        .collect();
    std::fs::write(dir.join("schedule.txt"), schedule)?;
    info!(faults = plan.len(), "schedule written to schedule.txt");

    config.tally.init()?;
    let processes = Arc::new(Processes::new(config.tally.clone()));
    let http = reqwest::Client::new();
    let mut layout = base_layout(config.base_port);
    // The process with every role first: it owns every partition until the others join.
    let first = layout.remove(0);
    let first_url = format!(
        "http://127.0.0.1:{}",
        first.port.unwrap_or(config.base_port)
    );
    processes.start(first)?;
    wait_ready(&http, &first_url, Duration::from_secs(180)).await?;
    for spec in layout {
        processes.start(spec)?;
    }
    for url in processes.all_api_urls() {
        wait_ready(&http, &url, Duration::from_secs(180)).await?;
    }
    info!("every process started");

    let watching = CancellationToken::new();
    let watcher = {
        let (processes, watching) = (Arc::clone(&processes), watching.clone());
        tokio::spawn(async move {
            while !watching.is_cancelled() {
                processes.reap_unplanned();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    let targets = {
        let processes = Arc::clone(&processes);
        Arc::new(move || processes.api_urls())
    };
    let client = Arc::new(Client::new(config.workload.clone(), targets)?);
    client
        .set_up(Duration::from_secs(120))
        .await
        .context("the workload's set-up (stock and accounts)")?;
    info!(
        seconds = config.duration.as_secs(),
        "set up; workload and faults start"
    );

    let start = Instant::now();
    let stop = CancellationToken::new();
    let nemesis = Arc::new(Nemesis::new(
        Arc::clone(&processes),
        config.infra.clone(),
        start,
    ));
    let faults = {
        let (nemesis, stop) = (Arc::clone(&nemesis), stop.clone());
        tokio::spawn(async move { nemesis.run(plan, stop).await })
    };
    let load = {
        let (client, stop) = (Arc::clone(&client), stop.clone());
        tokio::spawn(async move { client.run(stop).await })
    };
    tokio::time::sleep(config.duration).await;
    info!("duration over: healing the faults, finishing the requests in flight");
    stop.cancel();
    faults.await.context("the nemesis")?;
    load.await.context("the workload")?;
    let ran_for = start.elapsed();

    let record = client.record();
    let record_path = dir.join("client-record.json");
    std::fs::write(&record_path, serde_json::to_vec(&record)?)
        .with_context(|| format!("writing {}", record_path.display()))?;

    let settle_start = Instant::now();
    let settle_deadline = settle_start + config.settle;
    for url in processes.all_api_urls() {
        let left = settle_deadline.saturating_duration_since(Instant::now());
        if let Err(e) = wait_ready(&http, &url, left).await {
            warn!("settling: {e:#}");
        }
    }
    let kafka = KafkaConfig {
        topic_prefix: config.tally.prefix.clone(),
        replication_factor: config.tally.replication_factor,
        partitions: config.tally.partitions,
        ..KafkaConfig::local(config.tally.brokers.clone())
    };
    let judged = judge(&kafka, &config.tally.database_url, &record, settle_deadline).await;
    let settled_in = settle_start.elapsed();

    watching.cancel();
    let _ = watcher.await;
    processes.stop_all(Duration::from_secs(15)).await;

    let (summary, verdicts) = judged?;
    Ok(Report {
        seed: config.seed,
        duration: config.duration,
        ran_for,
        settled_in,
        brokers: config.infra.brokers,
        asked: config.kinds.clone(),
        faults: nemesis.faults(),
        injected: nemesis.injected(),
        unplanned_exits: processes.unplanned_exits(),
        workload: client.stats.counts(),
        summary,
        verdicts,
        replay: config.replay.clone(),
        dir,
    })
}

/// Loads and checks until every invariant holds or `deadline` passes (the read side
/// catches up, sagas reach their ends); answers the last judgement.
async fn judge(
    kafka: &KafkaConfig,
    database_url: &str,
    record: &crate::model::ClientRecord,
    deadline: Instant,
) -> anyhow::Result<(check::Summary, Vec<Verdict>)> {
    loop {
        let model = crate::load::load(kafka, database_url, record.clone())
            .await
            .context("loading the log and the read models")?;
        let verdicts = check::check(&model);
        let failing: Vec<&str> = verdicts
            .iter()
            .filter(|v| !v.passed())
            .map(|v| v.name)
            .collect();
        if failing.is_empty() || Instant::now() >= deadline {
            return Ok((check::summarize(&model), verdicts));
        }
        info!(?failing, "not settled yet");
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}
