//! The run's report: faults injected by kind, what the workload sent and what became of
//! it, the sagas, each invariant PASS/FAIL (the checker's table), the verdict, and the seed
//! and command that replay the run.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;
use std::time::Duration;

use super::nemesis::FaultRecord;
use super::plan::{missing_kinds, FaultKind};
use super::workload::Counts;
use crate::check::{Summary, Verdict};

/// Everything a run found.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub duration: Duration,
    pub ran_for: Duration,
    pub settled_in: Duration,
    pub brokers: usize,
    pub asked: Vec<FaultKind>,
    pub faults: Vec<FaultRecord>,
    pub injected: BTreeMap<FaultKind, usize>,
    pub unplanned_exits: Vec<String>,
    pub workload: Counts,
    pub summary: Summary,
    pub verdicts: Vec<Verdict>,
    pub replay: String,
    pub dir: PathBuf,
}

impl Report {
    /// Why the run fails; empty when it passes. A run fails on any violated invariant, on
    /// a kind of fault asked for and never injected, and when nothing was acknowledged
    /// (a run that tested nothing).
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        let missing = missing_kinds(&self.asked, &self.injected);
        if !missing.is_empty() {
            let names: Vec<_> = missing.iter().map(|k| k.name()).collect();
            out.push(format!("no fault injected of kind {}", names.join(", ")));
        }
        for v in self.verdicts.iter().filter(|v| !v.passed()) {
            out.push(format!("invariant violated: {}", v.name));
        }
        if self.summary.commands.acknowledged == 0 {
            out.push("no command was acknowledged: the run tested nothing".into());
        }
        out
    }

    pub fn passed(&self) -> bool {
        self.failures().is_empty()
    }

    /// The fault log, one line per fault.
    pub fn fault_log(&self) -> String {
        self.faults.iter().map(|f| format!("{f}\n")).collect()
    }

    /// The whole report.
    pub fn render(&self, shown: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "chaos run: seed {}, {} s of faults (ran {:.0} s, settled in {:.0} s), {} broker(s)",
            self.seed,
            self.duration.as_secs(),
            self.ran_for.as_secs_f64(),
            self.settled_in.as_secs_f64(),
            self.brokers
        );
        let _ = writeln!(out, "\nfaults injected");
        let _ = writeln!(out, "  {:<10}  {:>5}  {:>8}", "kind", "asked", "injected");
        for kind in FaultKind::ALL {
            let asked = self.asked.contains(&kind);
            let injected = self.injected.get(&kind).copied().unwrap_or(0);
            if !asked && injected == 0 {
                continue;
            }
            let _ = writeln!(
                out,
                "  {:<10}  {:>5}  {:>8}",
                kind.name(),
                if asked { "yes" } else { "no" },
                injected
            );
        }
        let not_injected = self.faults.iter().filter(|f| f.outcome.is_err()).count();
        let _ = writeln!(
            out,
            "  total {} injected, {not_injected} could not be; processes that exited on their own: {}",
            self.injected.values().sum::<usize>(),
            if self.unplanned_exits.is_empty() {
                "none".to_string()
            } else {
                self.unplanned_exits.join("; ")
            }
        );
        let w = &self.workload;
        let c = &self.summary.commands;
        let s = &self.summary.sagas;
        let _ = writeln!(out, "\ncommands");
        let _ = writeln!(
            out,
            "  sent {} ({} HTTP attempts; {} keyed commands retried, {} never answered)",
            w.commands, w.attempts, w.retried, w.unresolved
        );
        let _ = writeln!(
            out,
            "  answers: {} 2xx, {} 409, {} 422, {} other 4xx, {} 5xx, {} none",
            w.ok, w.conflicts, w.refusals, w.other_4xx, w.server_errors, w.no_answer
        );
        let _ = writeln!(
            out,
            "  acknowledged {}, lost {}, doubled {} (the client's 2xx and the saga's accepted commands)",
            c.acknowledged, c.lost, c.doubled
        );
        let _ = writeln!(
            out,
            "  If-Match races {}: {} with one winner, {} with none, {} with two",
            w.races, w.race_winners[1], w.race_winners[0], w.race_winners[2]
        );
        if w.bad_bodies > 0 {
            let _ = writeln!(
                out,
                "  {} 2xx answers without aggregate_id/version",
                w.bad_bodies
            );
        }
        let _ = writeln!(
            out,
            "\nsagas\n  completed {}, compensated {}, stuck {}\n",
            s.completed, s.compensated, s.stuck
        );
        out.push_str(&crate::report::render(&self.verdicts, shown));
        let failures = self.failures();
        let _ = writeln!(
            out,
            "\nresult: {}",
            if failures.is_empty() {
                "PASS".to_string()
            } else {
                format!("FAIL — {}", failures.join("; "))
            }
        );
        let _ = writeln!(out, "seed {} — replay with: {}", self.seed, self.replay);
        let _ = writeln!(out, "files: {}", self.dir.display());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{AckCounts, SagaCounts};

    fn report(injected: &[(FaultKind, usize)], acknowledged: usize) -> Report {
        Report {
            seed: 7,
            duration: Duration::from_secs(150),
            ran_for: Duration::from_secs(160),
            settled_in: Duration::from_secs(20),
            brokers: 1,
            asked: vec![FaultKind::Kill, FaultKind::Broker],
            faults: Vec::new(),
            injected: injected.iter().copied().collect(),
            unplanned_exits: Vec::new(),
            workload: Counts::default(),
            summary: Summary {
                commands: AckCounts {
                    acknowledged,
                    ..AckCounts::default()
                },
                sagas: SagaCounts::default(),
            },
            verdicts: vec![Verdict {
                checked: 3,
                ..Verdict::new("holds")
            }],
            replay: "scripts/chaos --seed 7".into(),
            dir: PathBuf::from("/tmp/run"),
        }
    }

    #[test]
    fn a_run_passes_only_with_every_kind_injected_something_acknowledged_and_every_invariant() {
        let good = report(&[(FaultKind::Kill, 2), (FaultKind::Broker, 1)], 10);
        assert!(good.passed(), "{:?}", good.failures());
        let text = good.render(5);
        assert!(text.contains("result: PASS"), "{text}");
        assert!(
            text.contains("replay with: scripts/chaos --seed 7"),
            "{text}"
        );

        let short = report(&[(FaultKind::Kill, 2)], 10);
        assert_eq!(short.failures(), vec!["no fault injected of kind broker"]);
        assert!(short.render(5).contains("result: FAIL"));

        let idle = report(&[(FaultKind::Kill, 2), (FaultKind::Broker, 1)], 0);
        assert!(!idle.passed());

        let mut broken = good.clone();
        broken.verdicts[0].violate("x", "good", "bad");
        assert_eq!(broken.failures(), vec!["invariant violated: holds"]);
    }
}
