//! The nemesis: injects the planned faults at their times, each held for its time and then
//! healed, several at once when they overlap; logs each with its time; and, when told to
//! stop, heals whatever is still held before it returns.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::plan::{FaultKind, Planned};
use super::processes::{Processes, Spec};

/// How the nemesis reaches what is not a Tally process: `scripts/services` (which knows
/// the harness's own Kafka and PostgreSQL from the environment) and the database.
#[derive(Debug, Clone)]
pub struct Infra {
    pub services: PathBuf,
    pub brokers: usize,
    pub database_url: String,
}

/// One fault as it happened.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    /// When it was injected, from the start of the run.
    pub at: Duration,
    pub kind: FaultKind,
    pub target: String,
    /// How long it was held (until healed).
    pub held: Duration,
    /// `Err` when it could not be injected (it then does not count).
    pub outcome: Result<(), String>,
}

impl fmt::Display for FaultRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>7.1}s  {:<10}  {:<14}  held {:>5.1}s",
            self.at.as_secs_f64(),
            self.kind.name(),
            self.target,
            self.held.as_secs_f64()
        )?;
        if let Err(e) = &self.outcome {
            write!(f, "  NOT INJECTED: {e}")?;
        }
        Ok(())
    }
}

/// The nemesis of one run.
pub struct Nemesis {
    processes: Arc<Processes>,
    infra: Infra,
    start: Instant,
    log: Mutex<Vec<FaultRecord>>,
    /// A broker is down: the next broker fault waits (one broker at a time).
    broker_down: Mutex<bool>,
    extras: AtomicU32,
}

/// How long a fault waits for a free target before it is given up.
const TARGET_PATIENCE: Duration = Duration::from_secs(20);

impl Nemesis {
    pub fn new(processes: Arc<Processes>, infra: Infra, start: Instant) -> Self {
        Self {
            processes,
            infra,
            start,
            log: Mutex::new(Vec::new()),
            broker_down: Mutex::new(false),
            extras: AtomicU32::new(0),
        }
    }

    /// Every fault so far, in the order injected.
    pub fn faults(&self) -> Vec<FaultRecord> {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner()).clone();
        log.sort_by_key(|f| f.at);
        log
    }

    /// Faults injected, by kind.
    pub fn injected(&self) -> BTreeMap<FaultKind, usize> {
        let mut out = BTreeMap::new();
        for f in self.faults().iter().filter(|f| f.outcome.is_ok()) {
            *out.entry(f.kind).or_insert(0) += 1;
        }
        out
    }

    /// Injects `plan` until `stop`; then heals every fault still held and returns.
    pub async fn run(self: &Arc<Self>, plan: Vec<Planned>, stop: CancellationToken) {
        let mut faults = tokio::task::JoinSet::new();
        for planned in plan {
            let at = tokio::time::Instant::from_std(self.start + planned.at);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(at) => {}
            }
            let nemesis = Arc::clone(self);
            let stop = stop.clone();
            faults.spawn(async move { nemesis.fault(planned, stop).await });
        }
        stop.cancelled().await;
        while faults.join_next().await.is_some() {}
        info!("nemesis: every fault healed");
    }

    /// Holds a fault for its time, or until `stop`.
    async fn hold(hold: Duration, stop: &CancellationToken) {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(hold) => {}
        }
    }

    async fn fault(&self, planned: Planned, stop: CancellationToken) {
        let at = self.start.elapsed();
        let result = match planned.kind {
            FaultKind::Kill => self.kill(&planned, &stop).await,
            FaultKind::Pause => self.pause(&planned, &stop).await,
            FaultKind::Storm => self.storm(&planned, &stop).await,
            FaultKind::Broker => self.broker(&planned, &stop).await,
            FaultKind::PgKill => self.pg_kill().await,
            FaultKind::PgRestart => self
                .services(&["restart-postgres"])
                .await
                .map(|()| "postgres".into()),
        };
        let record = match result {
            Ok(target) => FaultRecord {
                at,
                kind: planned.kind,
                target,
                held: self.start.elapsed() - at,
                outcome: Ok(()),
            },
            Err(e) => FaultRecord {
                at,
                kind: planned.kind,
                target: "-".into(),
                held: Duration::ZERO,
                outcome: Err(format!("{e:#}")),
            },
        };
        match &record.outcome {
            Ok(()) => info!("fault healed: {record}"),
            Err(_) => warn!("fault: {record}"),
        }
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(record);
    }

    fn at(&self) -> String {
        format!("{:.1}s", self.start.elapsed().as_secs_f64())
    }

    /// Claims a free base process, picked by `pick`, waiting a while for one.
    async fn claim(&self, pick: u64, stop: &CancellationToken) -> anyhow::Result<String> {
        let deadline = Instant::now() + TARGET_PATIENCE;
        loop {
            let free = self.processes.free();
            if !free.is_empty() {
                let name = &free[(pick % free.len() as u64) as usize];
                if self.processes.claim(name) {
                    return Ok(name.clone());
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline && !stop.is_cancelled(),
                "no free Tally process to fault"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn kill(&self, p: &Planned, stop: &CancellationToken) -> anyhow::Result<String> {
        let name = self.claim(p.pick, stop).await?;
        let killed = self.processes.kill(&name);
        if let Err(e) = killed {
            self.processes.release(&name);
            return Err(e);
        }
        info!(at = %self.at(), process = %name, "fault: SIGKILL");
        Self::hold(p.hold, stop).await;
        let restarted = self.processes.restart(&name);
        self.processes.release(&name);
        if let Err(e) = restarted {
            error!(process = %name, "restarting after a kill: {e:#}");
        }
        Ok(name)
    }

    async fn pause(&self, p: &Planned, stop: &CancellationToken) -> anyhow::Result<String> {
        let name = self.claim(p.pick, stop).await?;
        if let Err(e) = self.processes.pause(&name) {
            self.processes.release(&name);
            return Err(e);
        }
        info!(at = %self.at(), process = %name, hold = ?p.hold, "fault: SIGSTOP");
        Self::hold(p.hold, stop).await;
        let resumed = self.processes.resume(&name);
        self.processes.release(&name);
        resumed.with_context(|| format!("SIGCONT of {name}"))?;
        Ok(name)
    }

    /// Starts two or three extra processes with owner roles; after the hold, kills some
    /// and stops the others cleanly: each start and stop moves partitions.
    async fn storm(&self, p: &Planned, stop: &CancellationToken) -> anyhow::Result<String> {
        const ROLES: [&str; 3] = ["commands,sagas", "commands", "sagas"];
        let count = 2 + (p.pick % 2) as usize;
        let mut names = Vec::new();
        for i in 0..count {
            let n = self.extras.fetch_add(1, Ordering::Relaxed) + 1;
            let spec = Spec {
                name: format!("extra-{n}"),
                roles: ROLES[(p.pick as usize + i) % ROLES.len()],
                port: None,
                extra: true,
            };
            match self.processes.start(spec.clone()) {
                Ok(()) => names.push(spec.name),
                Err(e) => warn!("storm: {e:#}"),
            }
        }
        anyhow::ensure!(!names.is_empty(), "could not start any extra process");
        info!(at = %self.at(), processes = ?names, "fault: storm started");
        Self::hold(p.hold, stop).await;
        for (i, name) in names.iter().enumerate() {
            if (p.pick >> (8 + i)) & 1 == 1 {
                let _ = self.processes.kill(name);
            } else if let Err(e) = self
                .processes
                .terminate(name, Duration::from_secs(15))
                .await
            {
                warn!(process = %name, "storm: stopping: {e:#}");
            }
            self.processes.remove(name);
        }
        Ok(names.join(","))
    }

    async fn broker(&self, p: &Planned, stop: &CancellationToken) -> anyhow::Result<String> {
        let deadline = Instant::now() + TARGET_PATIENCE;
        loop {
            {
                let mut down = self.broker_down.lock().unwrap_or_else(|e| e.into_inner());
                if !*down {
                    *down = true;
                    break;
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline && !stop.is_cancelled(),
                "another broker is still down"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let broker = 1 + (p.pick % self.infra.brokers.max(1) as u64);
        let index = broker.to_string();
        let killed = self.services(&["kill-broker", &index]).await;
        if let Err(e) = killed {
            *self.broker_down.lock().unwrap_or_else(|e| e.into_inner()) = false;
            return Err(e);
        }
        info!(at = %self.at(), broker, hold = ?p.hold, "fault: kill -9 of a broker");
        Self::hold(p.hold, stop).await;
        let mut restarted = Err(anyhow::anyhow!("not tried"));
        for _ in 0..3 {
            restarted = self.services(&["start-broker", &index]).await;
            if restarted.is_ok() {
                break;
            }
        }
        if let Err(e) = restarted {
            error!(broker, "restarting a killed broker: {e:#}");
        }
        *self.broker_down.lock().unwrap_or_else(|e| e.into_inner()) = false;
        Ok(format!("broker-{broker}"))
    }

    /// Terminates every backend of Tally's database but its own connection.
    async fn pg_kill(&self) -> anyhow::Result<String> {
        use sqlx::Connection;
        let connect = sqlx::PgConnection::connect(&self.infra.database_url);
        let mut conn = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .context("connecting to PostgreSQL: timed out")?
            .context("connecting to PostgreSQL")?;
        let (killed,): (i64,) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_one(&mut conn)
        .await
        .context("pg_terminate_backend")?;
        let _ = conn.close().await;
        info!(at = %self.at(), killed, "fault: pg_terminate_backend");
        Ok(format!("{killed} backends"))
    }

    /// Runs `scripts/services <args>` (blocking, off the runtime).
    async fn services(&self, args: &[&str]) -> anyhow::Result<()> {
        let script = self.infra.services.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let shown = args.join(" ");
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new(&script)
                .args(&args)
                .stdin(std::process::Stdio::null())
                .output()
        })
        .await?
        .with_context(|| format!("running services {shown}"))?;
        anyhow::ensure!(
            output.status.success(),
            "services {shown}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    }
}
