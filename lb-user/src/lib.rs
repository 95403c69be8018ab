//! The lb agent: loads the XDP program, owns its configuration maps, runs health checks.
//!
//! - [`config`]: the TOML model and its validation; [`haproxy`]: the import of a HAProxy
//!   configuration.
//! - [`dataplane`]: load, attach, pin; [`selftest`]: the SYN sent through the loaded program
//!   before the agent says ready.
//! - [`health`]: where a check decides (probe, rise/fall machine, scheduler, presets).
//! - [`desired`]: where backend sets are decided from health (role rules).
//! - [`state`]: what the agent knows and decided; [`supervise`]: its owner, the loop from
//!   check results to installed sets.
//! - [`control`]: the only writer of the config and backend-set maps (atomic set swaps).
//! - [`live`] and [`mirror`]: the views published from the state (the admin server's, and the
//!   pinned one `lb status` reads).
//! - [`batch`]: many map entries in one syscall (the GC's reads, a standby's installs).
//! - [`gc`]: connection-table expiry and `maxconn` slot release, on a thread of its own;
//!   [`port_hints`]: the SNAT port hints it rewrites; [`connlog`]: the connection log.
//! - [`ids`]: stable service and backend ids, by name, across restarts.
//! - [`host`]: host settings lb changes and restores (forwarding, reserved ports, VIPs).
//! - [`maglev`]: consistent-hash lookup tables.
//! - [`run`]: `lb run`, tying them together; [`ops`]: its control socket.
//! - [`status`]: `lb status`, reading pinned counters; [`readiness`]: `lb health`, whether
//!   this balancer can serve (an exit code for keepalived and monitoring).
//! - [`capture`]: `lb capture`, sampled frames of one service to a pcap file.
//! - [`admin`]: the admin HTTP server (dashboard, /stats.json, ;csv, /metrics).
//! - [`nic`]: the NIC's own XDP counters (`ethtool -S`) for the admin views.
//! - [`pair`]: a pair of nodes for the same VIPs, each streaming its flows to the other.
pub mod admin;
pub mod batch;
pub mod capture;
pub mod config;
pub mod connlog;
pub mod control;
pub mod dataplane;
pub mod desired;
pub mod host;
pub mod ids;
pub mod live;
pub mod maglev;
pub mod mirror;
pub mod nic;
pub mod ops;
pub mod pair;
pub mod port_hints;
pub mod readiness;
pub mod run;
pub mod selftest;
pub mod state;
pub mod status;
pub mod supervise;

/// The compiled XDP object (built by `build.rs` from `lb-ebpf`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));
pub mod gc;
pub mod handshakes;
pub mod haproxy;
pub mod health;
