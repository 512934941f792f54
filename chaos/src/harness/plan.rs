//! The nemesis's schedule: which fault, when, held how long — a pure function of the seed,
//! the duration and the kinds asked for, so that `--seed` replays the same schedule. And
//! the rule that judges a run by the faults it really injected: fewer than one of each kind
//! asked for fails the run (a fault suite that injected nothing proves nothing).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::rng::Rng;

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// SIGKILL of a Tally process, restarted after the hold.
    Kill,
    /// SIGSTOP of a Tally process for longer than the consumer session timeout, then SIGCONT.
    Pause,
    /// Extra processes started and, after the hold, stopped (some killed): rebalances.
    Storm,
    /// kill -9 of a Kafka broker (one at a time), restarted after the hold.
    Broker,
    /// `pg_terminate_backend` of every connection to Tally's database.
    PgKill,
    /// A restart (immediate mode) of the harness's own PostgreSQL cluster.
    PgRestart,
}

impl FaultKind {
    pub const ALL: [FaultKind; 6] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Storm,
        FaultKind::Broker,
        FaultKind::PgKill,
        FaultKind::PgRestart,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Storm => "storm",
            FaultKind::Broker => "broker",
            FaultKind::PgKill => "pg-kill",
            FaultKind::PgRestart => "pg-restart",
        }
    }

    /// How long a fault of this kind is held before it heals, as a range in milliseconds.
    /// A pause outlasts the owners' consumer session timeout (10 s, `eventlog::owner`), so
    /// the group moves the paused member's partitions while it still thinks it owns them.
    fn hold_ms(self) -> (u64, u64) {
        match self {
            FaultKind::Kill => (2_000, 8_000),
            FaultKind::Pause => (SESSION_TIMEOUT_MS + 1_500, SESSION_TIMEOUT_MS + 6_000),
            FaultKind::Storm => (5_000, 15_000),
            FaultKind::Broker => (3_000, 10_000),
            FaultKind::PgKill | FaultKind::PgRestart => (0, 0),
        }
    }
}

/// The `session.timeout.ms` of the partition owners' consumers (eventlog/src/owner.rs).
pub const SESSION_TIMEOUT_MS: u64 = 10_000;

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FaultKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FaultKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let known: Vec<_> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown fault kind {s:?} (known: {})", known.join(", "))
            })
    }
}

/// One scheduled fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    /// When it is injected, from the start of the run.
    pub at: Duration,
    pub kind: FaultKind,
    /// How long it is held before it heals.
    pub hold: Duration,
    /// Picks the target among those free when it is injected (`pick % free.len()`).
    pub pick: u64,
}

/// Gaps between two faults' injections, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub min_gap_ms: u64,
    pub max_gap_ms: u64,
    /// No fault starts in this last stretch of the run, so that every one is injected.
    pub quiet_tail_ms: u64,
}

impl Default for Pace {
    fn default() -> Self {
        Self {
            min_gap_ms: 4_000,
            max_gap_ms: 12_000,
            quiet_tail_ms: 5_000,
        }
    }
}

/// The schedule of a run: faults at random gaps over `duration`; the first ones are every
/// kind asked for once, in a random order, the rest random kinds. Errs when `duration` is
/// too short to hold one fault of each kind.
pub fn plan(
    seed: u64,
    duration: Duration,
    kinds: &[FaultKind],
    pace: Pace,
) -> Result<Vec<Planned>, String> {
    let mut rng = Rng::stream(seed, 0x6e656d65736973); // "nemesis"
    let mut kinds: Vec<FaultKind> = kinds.to_vec();
    kinds.sort();
    kinds.dedup();
    if kinds.is_empty() {
        return Ok(Vec::new());
    }
    let mut first = kinds.clone();
    rng.shuffle(&mut first);
    let last_start = duration
        .as_millis()
        .saturating_sub(u128::from(pace.quiet_tail_ms)) as u64;
    let mut out = Vec::new();
    let mut at = rng.range(pace.min_gap_ms / 2, pace.min_gap_ms);
    while at <= last_start {
        let kind = match first.get(out.len()) {
            Some(k) => *k,
            None => kinds[rng.below(kinds.len())],
        };
        let (lo, hi) = kind.hold_ms();
        out.push(Planned {
            at: Duration::from_millis(at),
            kind,
            hold: Duration::from_millis(rng.range(lo, hi)),
            pick: rng.next_u64(),
        });
        at += rng.range(pace.min_gap_ms, pace.max_gap_ms);
    }
    if out.len() < kinds.len() {
        return Err(format!(
            "{} s hold only {} faults, fewer than the {} kinds asked for: run longer or ask for fewer kinds",
            duration.as_secs(),
            out.len(),
            kinds.len()
        ));
    }
    Ok(out)
}

/// The kinds asked for of which fewer than one fault was injected: a run with any fails.
pub fn missing_kinds(asked: &[FaultKind], injected: &BTreeMap<FaultKind, usize>) -> Vec<FaultKind> {
    let mut missing: Vec<FaultKind> = asked
        .iter()
        .copied()
        .filter(|k| injected.get(k).copied().unwrap_or(0) == 0)
        .collect();
    missing.sort();
    missing.dedup();
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOKE: Duration = Duration::from_secs(150);

    #[test]
    fn a_seed_gives_the_same_schedule_and_another_seed_another() {
        let kinds = FaultKind::ALL;
        let a = plan(42, SMOKE, &kinds, Pace::default()).unwrap();
        assert_eq!(a, plan(42, SMOKE, &kinds, Pace::default()).unwrap());
        assert_ne!(a, plan(43, SMOKE, &kinds, Pace::default()).unwrap());
    }

    #[test]
    fn every_kind_asked_for_is_scheduled_early_within_the_run() {
        let kinds = [FaultKind::Kill, FaultKind::Broker, FaultKind::PgKill];
        for seed in 0..50 {
            let faults = plan(seed, SMOKE, &kinds, Pace::default()).unwrap();
            let mut first: Vec<_> = faults[..3].iter().map(|f| f.kind).collect();
            first.sort();
            assert_eq!(first, kinds, "seed {seed}");
            for f in &faults {
                assert!(kinds.contains(&f.kind));
                assert!(f.at <= SMOKE - Duration::from_secs(5), "seed {seed}: {f:?}");
                let (lo, hi) = f.kind.hold_ms();
                assert!((lo..=hi).contains(&(f.hold.as_millis() as u64)));
            }
            assert!(faults.windows(2).all(|w| w[0].at < w[1].at));
        }
    }

    #[test]
    fn a_pause_outlasts_the_session_timeout() {
        let faults = plan(1, SMOKE, &[FaultKind::Pause], Pace::default()).unwrap();
        assert!(faults
            .iter()
            .all(|f| f.hold > Duration::from_millis(SESSION_TIMEOUT_MS)));
    }

    #[test]
    fn a_run_too_short_for_the_kinds_asked_is_refused() {
        let err = plan(1, Duration::from_secs(12), &FaultKind::ALL, Pace::default());
        assert!(err.is_err(), "{err:?}");
    }

    #[test]
    fn a_run_that_injected_fewer_than_one_fault_of_a_kind_asked_for_fails() {
        let asked = [FaultKind::Kill, FaultKind::Broker, FaultKind::PgKill];
        let mut injected = BTreeMap::from([(FaultKind::Kill, 3), (FaultKind::PgKill, 1)]);
        assert_eq!(missing_kinds(&asked, &injected), vec![FaultKind::Broker]);
        injected.insert(FaultKind::Broker, 0);
        assert_eq!(missing_kinds(&asked, &injected), vec![FaultKind::Broker]);
        injected.insert(FaultKind::Broker, 1);
        assert!(missing_kinds(&asked, &injected).is_empty());
        // Faults of kinds not asked for do not stand in for the ones asked.
        let other = BTreeMap::from([(FaultKind::Pause, 9)]);
        assert_eq!(
            missing_kinds(&[FaultKind::Kill], &other),
            vec![FaultKind::Kill]
        );
    }

    #[test]
    fn kinds_parse_by_name() {
        for kind in FaultKind::ALL {
            assert_eq!(kind.name().parse::<FaultKind>(), Ok(kind));
        }
        assert!("reboot".parse::<FaultKind>().is_err());
    }
}
