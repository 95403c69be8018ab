//! Medians and spreads over repeated runs.

use serde::Serialize;

/// Median, minimum and maximum of the runs that produced a value, and how many did not.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// Median of the present values (mean of the two middle ones for an even count).
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Runs that produced a value.
    pub n: usize,
    /// Runs that did not (e.g. the event did not happen within the window).
    pub missing: usize,
}

/// The spread of `values`; `None` when no run produced a value.
pub fn spread(values: &[Option<f64>]) -> Option<Spread> {
    let mut present: Vec<f64> = values.iter().flatten().copied().collect();
    let missing = values.len() - present.len();
    if present.is_empty() {
        return None;
    }
    present.sort_by(f64::total_cmp);
    let n = present.len();
    let median = if n % 2 == 1 {
        present[n / 2]
    } else {
        (present[n / 2 - 1] + present[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: present[0],
        max: present[n - 1],
        n,
        missing,
    })
}

/// The median of `values` (`None` if empty).
pub fn median(values: &[f64]) -> Option<f64> {
    spread(&values.iter().map(|v| Some(*v)).collect::<Vec<_>>()).map(|s| s.median)
}

/// `1.23 s`, with `(min-max)` when several runs contributed, and `, k/n runs: none` when some did
/// not produce a value; `absent` when none did.
pub fn fmt_secs(s: Option<Spread>, absent: &str) -> String {
    let Some(s) = s else {
        return absent.to_string();
    };
    let mut out = format!("{:.2} s", s.median);
    if s.n > 1 {
        out += &format!(" ({:.2}-{:.2})", s.min, s.max);
    }
    if s.missing > 0 {
        out += &format!(", {}/{} runs: {absent}", s.missing, s.n + s.missing);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_odd_even_and_partial_sets() {
        let s = spread(&[Some(3.0), Some(1.0), Some(2.0)]).unwrap();
        assert_eq!(
            (s.median, s.min, s.max, s.n, s.missing),
            (2.0, 1.0, 3.0, 3, 0)
        );
        let s = spread(&[Some(4.0), None, Some(1.0)]).unwrap();
        assert_eq!((s.median, s.n, s.missing), (2.5, 2, 1));
        assert!(spread(&[None, None]).is_none());
        assert_eq!(median(&[5.0, 1.0, 3.0, 9.0]), Some(4.0));
    }

    #[test]
    fn seconds_are_formatted_with_their_spread() {
        assert_eq!(fmt_secs(spread(&[Some(0.25)]), "never"), "0.25 s");
        assert_eq!(
            fmt_secs(spread(&[Some(0.2), Some(0.3), None]), "never"),
            "0.25 s (0.20-0.30), 1/3 runs: never"
        );
        assert_eq!(fmt_secs(None, "never"), "never");
    }
}
