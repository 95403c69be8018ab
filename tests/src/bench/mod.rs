//! Measurement code of `lb-bench` (`cargo xtask bench`): scenarios that run a balancer under test in
//! the netns harness and record what clients saw, and the summaries the report prints.
//!
//! Benchmarks are not tests: nothing here asserts a number. A scenario fails only when it could not
//! measure (a balancer that did not start, a cluster that never served a write).
//!
//! - [`failover`]: role flip db01 -> db02 under a stream of new write connections and a few pooled
//!   ones; lb and HAProxy 2.6 (the manual's configuration), each at the manual's timings and at
//!   `inter 250ms rise 1 fall 1`.
//! - [`clients`]: the Bolt client load (new connections, pooled ones) and outcome classification;
//! - [`stats`]: medians and spreads over runs.

pub mod clients;
pub mod failover;
pub mod stats;
