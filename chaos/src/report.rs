//! The checker's table: one line per invariant with PASS or FAIL, and the violations of
//! each failed one beneath it (the first few: a broken log can break thousands).

use std::fmt::Write;

use crate::check::{Summary, Verdict};

/// The table for `verdicts`, showing at most `shown` violations per invariant.
pub fn render(verdicts: &[Verdict], shown: usize) -> String {
    let width = verdicts
        .iter()
        .map(|v| v.name.len())
        .fold("invariant".len(), usize::max);
    let mut out = String::new();
    let _ = writeln!(out, "{:<width$}  {:>8}  result", "invariant", "checked");
    for v in verdicts {
        let result = if v.passed() {
            "PASS".to_string()
        } else {
            format!("FAIL ({} violations)", v.violations.len())
        };
        let _ = writeln!(out, "{:<width$}  {:>8}  {result}", v.name, v.checked);
        for violation in v.violations.iter().take(shown) {
            let _ = writeln!(out, "    - {violation}");
        }
        if v.violations.len() > shown {
            let _ = writeln!(out, "    … and {} more", v.violations.len() - shown);
        }
    }
    let failed = verdicts.iter().filter(|v| !v.passed()).count();
    let _ = writeln!(
        out,
        "{}: {} of {} invariants hold",
        if failed == 0 { "PASS" } else { "FAIL" },
        verdicts.len() - failed,
        verdicts.len()
    );
    out
}

/// The headline figures, one line each for commands and sagas.
pub fn render_summary(summary: &Summary) -> String {
    let (c, s) = (summary.commands, summary.sagas);
    format!(
        "commands: {} acknowledged, {} lost, {} doubled\n\
         sagas: {} completed, {} compensated, {} stuck\n",
        c.acknowledged, c.lost, c.doubled, s.completed, s.compensated, s.stuck
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_invariant_shows_its_first_violations_and_the_total_fails() {
        let pass = Verdict {
            checked: 3,
            ..Verdict::new("holds")
        };
        let mut fail = Verdict::new("breaks");
        fail.checked = 2;
        for n in 0..3 {
            fail.violate(format!("thing {n}"), "good", "bad");
        }
        let table = render(&[pass, fail], 2);
        let words = |line: &str| line.split_whitespace().collect::<Vec<_>>().join(" ");
        let lines: Vec<String> = table.lines().map(words).collect();
        assert!(lines.contains(&"holds 3 PASS".to_string()), "{table}");
        assert!(
            lines.contains(&"breaks 2 FAIL (3 violations)".to_string()),
            "{table}"
        );
        assert!(
            table.contains("    - thing 1: expected good, found bad"),
            "{table}"
        );
        assert!(!table.contains("thing 2:"), "{table}");
        assert!(table.contains("… and 1 more"), "{table}");
        assert!(table.ends_with("FAIL: 1 of 2 invariants hold\n"), "{table}");
    }
}
