//! Saga counters and step-duration histograms, rendered in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::fulfilment::{StepName, StepStatus};
use crate::SagaStatus;

/// Upper bounds of the step-duration buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Sagas by status and how long their steps took.
#[derive(Clone, Default)]
pub struct SagaMetrics {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    started: AtomicU64,
    completed: AtomicU64,
    compensated: AtomicU64,
    running: AtomicI64,
    steps: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
}

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl SagaMetrics {
    pub(crate) fn started(&self) {
        self.inner.started.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn ended(&self, status: SagaStatus) {
        let counter = match status {
            SagaStatus::Completed => &self.inner.completed,
            SagaStatus::Compensated => &self.inner.compensated,
            SagaStatus::Running => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_running(&self, delta: i64) {
        self.inner.running.fetch_add(delta, Ordering::Relaxed);
    }

    pub(crate) fn step_ended(&self, step: StepName, status: StepStatus, seconds: f64) {
        let mut steps = self.inner.steps.lock().unwrap_or_else(|p| p.into_inner());
        let h = steps.entry((step.as_str(), status.as_str())).or_default();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    /// Sagas that reached `completed` in this process.
    pub fn completed(&self) -> u64 {
        self.inner.completed.load(Ordering::Relaxed)
    }

    /// Sagas that reached `compensated` in this process.
    pub fn compensated(&self) -> u64 {
        self.inner.compensated.load(Ordering::Relaxed)
    }

    /// Appends the saga metric families to `out`.
    pub fn render(&self, out: &mut String) {
        let i = &self.inner;
        let _ = writeln!(out, "# HELP tally_sagas_started_total Fulfilment sagas started by this process.\n# TYPE tally_sagas_started_total counter\ntally_sagas_started_total {}", i.started.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP tally_sagas_ended_total Fulfilment sagas that ended, by final status.\n# TYPE tally_sagas_ended_total counter");
        let _ = writeln!(
            out,
            "tally_sagas_ended_total{{status=\"completed\"}} {}",
            self.completed()
        );
        let _ = writeln!(
            out,
            "tally_sagas_ended_total{{status=\"compensated\"}} {}",
            self.compensated()
        );
        let _ = writeln!(out, "# HELP tally_sagas_running Sagas still running in the partitions this process owns.\n# TYPE tally_sagas_running gauge\ntally_sagas_running {}", i.running.load(Ordering::Relaxed).max(0));
        let _ = writeln!(out, "# HELP tally_saga_step_seconds Time from a saga step's start to its end, by step and outcome.\n# TYPE tally_saga_step_seconds histogram");
        let steps = i.steps.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for ((step, status), h) in steps {
            let labels = format!("step=\"{step}\",status=\"{status}\"");
            for (bound, count) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    out,
                    "tally_saga_step_seconds_bucket{{{labels},le=\"{bound}\"}} {count}"
                );
            }
            let _ = writeln!(
                out,
                "tally_saga_step_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "tally_saga_step_seconds_sum{{{labels}}} {}", h.sum);
            let _ = writeln!(out, "tally_saga_step_seconds_count{{{labels}}} {}", h.count);
        }
    }
}
