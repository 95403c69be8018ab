//! The state of one (service, backend) check: HAProxy's rise/fall semantics with lb's role rules.
//! Pure: no I/O, time comes in as an argument.
//!
//! Rules:
//! - a server starts DOWN; if the very first check is positive it comes UP at once (no `rise`);
//! - a [`Outcome::Positive`] counts toward `rise` (DOWN -> UP after `rise` consecutive positives)
//!   and resets the failure streak;
//! - a [`Outcome::Negative`] (a definitive "not in this role" from a server that answered) takes an
//!   UP server DOWN at once, without `fall`, and resets both streaks;
//! - a [`Outcome::Failed`] (no usable answer) counts toward `fall` (UP -> DOWN after `fall`
//!   consecutive failures) and resets the positive streak.
use std::{
    fmt,
    time::{Duration, Instant},
};

use super::{probe::Outcome, spec::CheckSpec};

/// What a check machine says of its (service, backend) pair: what the set decision reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// The rise/fall state machine says UP.
    pub up: bool,
    /// The latest check answered positive (the server claims the role).
    pub latest_positive: bool,
    /// The latest check answered a definitive negative (the server says it lost the role).
    pub latest_negative: bool,
}

/// A change of state, returned once by [`Machine::observe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub up: bool,
    pub cause: Cause,
}

/// Why a transition happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// The first check ever passed.
    FirstPositive,
    /// `rise` consecutive positives.
    Rise,
    /// A definitive negative answer.
    Negative { status: u16, body: String },
    /// `fall` consecutive failures; the last one's reason.
    Fall(String),
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::FirstPositive => f.write_str("first check passed"),
            Cause::Rise => f.write_str("rise: consecutive positive answers"),
            Cause::Negative { status, body } if body.is_empty() => {
                write!(f, "negative answer: HTTP {status}")
            }
            Cause::Negative { status, body } => {
                write!(f, "negative answer: HTTP {status} {body:?}")
            }
            Cause::Fall(e) => write!(f, "fall: consecutive failures, last: {e}"),
        }
    }
}

/// One (service, backend) check's state.
#[derive(Debug, Clone)]
pub struct Machine {
    up: bool,
    checked: bool,
    positives: u32,
    failures: u32,
    rise: u32,
    fall: u32,
    last: Option<Outcome>,
    since: Instant,
}

impl Machine {
    /// A server already in service when the agent (re)started: UP at full health, so that only
    /// a definitive negative or `fall` failures take it out (HAProxy's server-state file).
    pub fn new_up(spec: &CheckSpec) -> Self {
        Machine {
            up: true,
            checked: true,
            ..Machine::new(spec)
        }
    }

    /// A DOWN server that has not been checked yet.
    pub fn new(spec: &CheckSpec) -> Self {
        Machine {
            up: false,
            checked: false,
            positives: 0,
            failures: 0,
            rise: spec.rise.max(1),
            fall: spec.fall.max(1),
            last: None,
            since: Instant::now(),
        }
    }

    /// Feeds one check's outcome; returns the transition it caused, if any.
    pub fn observe(&mut self, outcome: &Outcome, now: Instant) -> Option<Transition> {
        let first = !self.checked;
        self.checked = true;
        self.last = Some(outcome.clone());
        let change = match outcome {
            Outcome::Positive => {
                self.failures = 0;
                self.positives = self.positives.saturating_add(1);
                match self.up {
                    false if first => Some(Transition {
                        up: true,
                        cause: Cause::FirstPositive,
                    }),
                    false if self.positives >= self.rise => Some(Transition {
                        up: true,
                        cause: Cause::Rise,
                    }),
                    _ => None,
                }
            }
            Outcome::Negative { status, body } => {
                self.positives = 0;
                self.failures = 0;
                self.up.then(|| Transition {
                    up: false,
                    cause: Cause::Negative {
                        status: *status,
                        body: body.clone(),
                    },
                })
            }
            Outcome::Failed(e) => {
                self.positives = 0;
                self.failures = self.failures.saturating_add(1);
                (self.up && self.failures >= self.fall).then(|| Transition {
                    up: false,
                    cause: Cause::Fall(e.clone()),
                })
            }
        };
        if let Some(t) = &change {
            self.up = t.up;
            self.since = now;
        }
        change
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// The latest check's outcome (`None` before the first).
    pub fn last(&self) -> Option<&Outcome> {
        self.last.as_ref()
    }

    /// The latest check returned [`Outcome::Positive`] (the server claims the role now).
    pub fn latest_positive(&self) -> bool {
        matches!(self.last, Some(Outcome::Positive))
    }

    /// What the decision reads of this machine: UP, and whether the latest check claimed the
    /// role or definitively denied it.
    pub fn health(&self) -> Health {
        Health {
            up: self.up,
            latest_positive: self.latest_positive(),
            latest_negative: matches!(self.last, Some(Outcome::Negative { .. })),
        }
    }

    /// The time of the last transition (creation time before any).
    pub fn since(&self) -> Instant {
        self.since
    }

    /// (consecutive positives, consecutive failures), for display.
    pub fn progress(&self) -> (u32, u32) {
        (self.positives, self.failures)
    }

    /// How long to wait before the next check: `fastinter` while in transition (UP with
    /// failures, or DOWN with positives), `downinter` while DOWN, else `inter`.
    pub fn next_interval(&self, spec: &CheckSpec) -> Duration {
        match (self.up, self.positives, self.failures) {
            (true, _, 0) => spec.inter,
            (true, _, _) => spec.fastinter,
            (false, 0, _) => spec.downinter,
            (false, _, _) => spec.fastinter,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::spec::preset;

    const P: Outcome = Outcome::Positive;

    fn neg(body: &str) -> Outcome {
        Outcome::Negative {
            status: 404,
            body: body.into(),
        }
    }

    fn fail(e: &str) -> Outcome {
        Outcome::Failed(e.into())
    }

    fn spec(rise: u32, fall: u32) -> CheckSpec {
        let mut s = preset("neo4j-ha-master").unwrap();
        s.rise = rise;
        s.fall = fall;
        s.inter = Duration::from_secs(2);
        s.fastinter = Duration::from_millis(250);
        s.downinter = Duration::from_secs(5);
        s
    }

    /// Feeds a sequence; returns the state after each step and the transitions.
    fn run(m: &mut Machine, seq: &[Outcome]) -> (Vec<bool>, Vec<Option<Transition>>) {
        let t0 = Instant::now();
        let mut ups = Vec::new();
        let mut ts = Vec::new();
        for (i, o) in seq.iter().enumerate() {
            ts.push(m.observe(o, t0 + Duration::from_secs(i as u64)));
            ups.push(m.is_up());
        }
        (ups, ts)
    }

    fn up_at_once(m: &mut Machine) {
        assert_eq!(
            m.observe(&P, Instant::now()),
            Some(Transition {
                up: true,
                cause: Cause::FirstPositive
            })
        );
    }

    #[test]
    fn starts_down_and_first_positive_brings_up_at_once() {
        let s = spec(2, 3);
        let mut m = Machine::new(&s);
        assert!(!m.is_up() && m.last().is_none() && !m.latest_positive());
        assert_eq!(m.progress(), (0, 0));
        let t = Instant::now() + Duration::from_secs(7);
        assert_eq!(
            m.observe(&P, t),
            Some(Transition {
                up: true,
                cause: Cause::FirstPositive
            })
        );
        assert!(m.is_up() && m.latest_positive());
        assert_eq!((m.since(), m.progress(), m.last()), (t, (1, 0), Some(&P)));
        // Staying up is no transition.
        assert_eq!(m.observe(&P, t), None);
    }

    #[test]
    fn first_check_not_positive_then_rise_is_needed() {
        for first in [
            neg("false"),
            neg("UNKNOWN"),
            fail("connect: connection refused"),
        ] {
            let mut m = Machine::new(&spec(3, 3));
            let (ups, ts) = run(
                &mut m,
                &[first.clone(), P.clone(), P.clone(), P.clone(), P.clone()],
            );
            assert_eq!(ups, [false, false, false, true, true], "{first:?}");
            assert_eq!(
                ts[3],
                Some(Transition {
                    up: true,
                    cause: Cause::Rise
                })
            );
            assert!(ts.iter().enumerate().all(|(i, t)| i == 3 || t.is_none()));
        }
        // rise 1: one positive suffices.
        let mut m = Machine::new(&spec(1, 3));
        assert_eq!(run(&mut m, &[neg("false"), P]).0, [false, true]);
    }

    #[test]
    fn rise_streak_is_reset_by_negatives_and_failures() {
        let mut m = Machine::new(&spec(2, 3));
        let seq = [
            fail("x"),
            P,
            neg("UNKNOWN"),
            P,
            fail("timeout after 1s"),
            P,
            P,
        ];
        let (ups, ts) = run(&mut m, &seq);
        assert_eq!(ups, [false, false, false, false, false, false, true]);
        assert_eq!(
            ts[6],
            Some(Transition {
                up: true,
                cause: Cause::Rise
            })
        );
    }

    #[test]
    fn negative_takes_down_at_once() {
        for fall in [1, 3, 10] {
            let mut m = Machine::new(&spec(2, fall));
            up_at_once(&mut m);
            let t = Instant::now() + Duration::from_secs(3);
            assert_eq!(
                m.observe(&neg("false"), t),
                Some(Transition {
                    up: false,
                    cause: Cause::Negative {
                        status: 404,
                        body: "false".into()
                    }
                })
            );
            assert!(!m.is_up() && !m.latest_positive());
            assert_eq!((m.since(), m.progress()), (t, (0, 0)));
            // Further negatives while down: no transition.
            assert_eq!(m.observe(&neg("UNKNOWN"), t), None);
        }
        // Also after failures in progress.
        let mut m = Machine::new(&spec(2, 3));
        up_at_once(&mut m);
        let (ups, ts) = run(
            &mut m,
            &[
                fail("a"),
                fail("b"),
                Outcome::Negative {
                    status: 503,
                    body: String::new(),
                },
            ],
        );
        assert_eq!(ups, [true, true, false]);
        assert_eq!(
            ts[2].as_ref().map(|t| t.cause.clone()),
            Some(Cause::Negative {
                status: 503,
                body: String::new()
            })
        );
    }

    #[test]
    fn failures_are_debounced_by_fall() {
        let mut m = Machine::new(&spec(2, 3));
        up_at_once(&mut m);
        let (ups, ts) = run(
            &mut m,
            &[
                fail("timeout after 1s"),
                fail("reset"),
                fail("HTTP 500"),
                fail("again"),
            ],
        );
        assert_eq!(ups, [true, true, false, false]);
        assert_eq!(
            ts[2],
            Some(Transition {
                up: false,
                cause: Cause::Fall("HTTP 500".into())
            })
        );
        assert_eq!(ts[3], None);
        assert_eq!(m.progress(), (0, 4));
        // fall 1: one failure suffices.
        let mut m = Machine::new(&spec(2, 1));
        up_at_once(&mut m);
        assert_eq!(run(&mut m, &[fail("x")]).0, [false]);
    }

    #[test]
    fn positive_resets_the_failure_streak() {
        let mut m = Machine::new(&spec(2, 3));
        up_at_once(&mut m);
        let (ups, _) = run(
            &mut m,
            &[
                fail("a"),
                fail("b"),
                P,
                fail("c"),
                fail("d"),
                P,
                fail("e"),
                fail("f"),
                fail("g"),
            ],
        );
        assert_eq!(ups, [true, true, true, true, true, true, true, true, false]);
    }

    #[test]
    fn down_and_up_again_needs_rise_not_first_positive() {
        let mut m = Machine::new(&spec(2, 1));
        up_at_once(&mut m);
        let (ups, ts) = run(&mut m, &[fail("x"), P, P]);
        assert_eq!(ups, [false, false, true]);
        assert_eq!(ts[2].as_ref().map(|t| &t.cause), Some(&Cause::Rise));
        let (ups, ts) = run(&mut m, &[neg("false"), P, P]);
        assert_eq!(ups, [false, false, true]);
        assert_eq!(ts[2].as_ref().map(|t| &t.cause), Some(&Cause::Rise));
    }

    #[test]
    fn latest_positive_and_last_follow_every_check() {
        let mut m = Machine::new(&spec(2, 3));
        up_at_once(&mut m);
        m.observe(&fail("timeout after 1s"), Instant::now());
        assert!(m.is_up() && !m.latest_positive());
        assert_eq!(m.last(), Some(&fail("timeout after 1s")));
        m.observe(&P, Instant::now());
        assert!(m.latest_positive());
    }

    #[test]
    fn next_interval_choices() {
        let s = spec(3, 3);
        let (inter, fast, down) = (s.inter, s.fastinter, s.downinter);
        let mut m = Machine::new(&s);
        assert_eq!(m.next_interval(&s), down, "not checked yet: down");
        m.observe(&neg("false"), Instant::now());
        assert_eq!(m.next_interval(&s), down, "down, nothing in progress");
        m.observe(&P, Instant::now());
        assert_eq!(m.next_interval(&s), fast, "down, rising");
        m.observe(&P, Instant::now());
        assert_eq!(m.next_interval(&s), fast, "down, rising");
        m.observe(&P, Instant::now());
        assert!(m.is_up());
        assert_eq!(m.next_interval(&s), inter, "up, stable");
        m.observe(&fail("x"), Instant::now());
        assert_eq!(m.next_interval(&s), fast, "up, falling");
        m.observe(&P, Instant::now());
        assert_eq!(m.next_interval(&s), inter, "up, recovered");
        m.observe(&fail("x"), Instant::now());
        m.observe(&fail("x"), Instant::now());
        m.observe(&fail("x"), Instant::now());
        assert!(!m.is_up());
        assert_eq!(m.next_interval(&s), down, "down after fall");
        m.observe(&fail("x"), Instant::now());
        assert_eq!(m.next_interval(&s), down, "down, still failing");
    }

    #[test]
    fn exhaustive_short_sequences_agree_with_a_reference_model() {
        // Every sequence of up to 7 outcomes over {P, N, F}, for several rise/fall values,
        // against a direct restatement of the rules.
        let alphabet = [P, neg("false"), fail("x")];
        for rise in 1..=3 {
            for fall in 1..=3 {
                let s = spec(rise, fall);
                for len in 1..=7u32 {
                    for code in 0..3usize.pow(len) {
                        let mut c = code;
                        let seq: Vec<&Outcome> = (0..len)
                            .map(|_| {
                                let o = &alphabet[c % 3];
                                c /= 3;
                                o
                            })
                            .collect();
                        let mut m = Machine::new(&s);
                        let (mut up, mut pos, mut fails) = (false, 0, 0);
                        for (i, o) in seq.iter().enumerate() {
                            let was = up;
                            match o {
                                Outcome::Positive => {
                                    pos += 1;
                                    fails = 0;
                                    if i == 0 || pos >= rise {
                                        up = true;
                                    }
                                }
                                Outcome::Negative { .. } => {
                                    pos = 0;
                                    fails = 0;
                                    up = false;
                                }
                                Outcome::Failed(_) => {
                                    pos = 0;
                                    fails += 1;
                                    if fails >= fall {
                                        up = false;
                                    }
                                }
                            }
                            let t = m.observe(o, Instant::now());
                            assert_eq!(m.is_up(), up, "rise {rise} fall {fall} {seq:?} at {i}");
                            assert_eq!(
                                t.is_some(),
                                was != up,
                                "rise {rise} fall {fall} {seq:?} at {i}"
                            );
                            assert_eq!(m.progress(), (pos, fails));
                        }
                    }
                }
            }
        }
    }
}
