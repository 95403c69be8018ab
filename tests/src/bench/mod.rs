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
//! - [`driver`]: `lb-bench all|throughput|connrate|latency|cost|memory` (the figures):
//!   [`contestants`] (direct, lb native/generic, HAProxy, nftables, each in a fresh cell),
//!   [`suite`] (iperf3, Bolt short sessions and ping-pong from [`loadgen`], memory), [`probe`]
//!   (CPU, bpf_stats, lb counters, ForwDatagrams), [`cost`] (XDP cost per packet via
//!   BPF_PROG_TEST_RUN) and [`report`] (the markdown tables);
//! - [`churn`]: `lb-bench churn`, the machine's full connection rate for a minute from the native
//!   client of [`handshakes`] (direct, lb write and read VIPs, HAProxy);
//! - [`synflood`]: `lb-bench synflood`, spoofed SYNs at the write VIP (20,000 and 50 per second)
//!   while a legitimate client connects every 10 ms; lb and HAProxy;
//! - [`idle`]: `lb-bench idle`, a million idle flows in the tables: check timing, agent CPU and
//!   RSS, expiry;
//! - [`benchmarks_md`]: each bench's section of `BENCHMARKS.md`.

pub mod benchmarks_md;
pub mod churn;
pub mod clients;
pub mod contestants;
pub mod cost;
pub mod driver;
pub mod failover;
pub mod handshakes;
pub mod idle;
pub mod loadgen;
pub mod pair;
pub mod probe;
pub mod report;
pub mod stats;
pub mod suite;
pub mod synflood;
