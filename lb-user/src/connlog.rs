//! The connection log: one line per finished connection (client, VIP, SNAT port, backend,
//! duration, payload bytes each way, why it ended). Backends only see the SNAT address, so this
//! is how an operator maps a backend's peer back to a client. Two sources feed it: the GC, for
//! the flows it expires (closed, idle), and the data path's `CONN_EVENTS` ring buffer, for the
//! flows it deletes itself (reset on a demoted backend, a closed tuple reused, a closed flow
//! whose SNAT port a new flow took over). At most
//! [`ConnLog::PER_SECOND`] lines a second, the rest counted in one summary line. Lines go to the
//! agent's log (target `lb::conn`) or, with `connection_log = "FILE"`, appended to that file.
use std::{
    fs::File,
    io::Write,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use lb_common::{
    ConnEvent, Flow, FlowKey, CONN_END_CLOSED, CONN_END_CLOSED_RST, CONN_END_RESET, CONN_END_REUSED,
};
use tracing::{info, warn};

/// One finished connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Ended {
    pub client: SocketAddrV4,
    pub vip: SocketAddrV4,
    pub snat: SocketAddrV4,
    pub backend: SocketAddrV4,
    pub duration_s: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub reason: &'static str,
}

fn addr(a: u32, p: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(a)), u16::from_be(p))
}

impl Ended {
    /// A flow the GC deletes: forward key and entry, reply entry.
    pub fn from_flows(key: &FlowKey, fwd: &Flow, rev: &Flow, reason: &'static str) -> Self {
        let last = fwd.last_seen_ns.max(rev.last_seen_ns);
        Self {
            client: addr(key.saddr, key.sport),
            vip: addr(key.daddr, key.dport),
            snat: addr(fwd.nat_saddr, fwd.nat_sport),
            backend: addr(fwd.nat_daddr, fwd.nat_dport),
            duration_s: last.saturating_sub(fwd.created_ns) as f64 / 1e9,
            bytes_in: fwd.bytes,
            bytes_out: rev.bytes,
            reason,
        }
    }

    /// A flow the data path deleted.
    pub fn from_event(e: &ConnEvent) -> Self {
        Self {
            client: addr(e.key.saddr, e.key.sport),
            vip: addr(e.key.daddr, e.key.dport),
            snat: addr(e.snat_addr, e.snat_port),
            backend: addr(e.backend_addr, e.backend_port),
            duration_s: e.ended_ns.saturating_sub(e.created_ns) as f64 / 1e9,
            bytes_in: e.bytes_in,
            bytes_out: e.bytes_out,
            reason: match e.reason {
                CONN_END_RESET => "reset (backend demoted, on_down = reset)",
                CONN_END_REUSED => "closed (tuple reused by a new connection)",
                CONN_END_CLOSED => "closed (FIN both ways)",
                CONN_END_CLOSED_RST => "reset",
                _ => "ended by the data path",
            },
        }
    }

    /// `key=value` fields of the line.
    pub fn text(&self) -> String {
        format!(
            "client={} vip={} snat={} backend={} duration_s={:.1} bytes_in={} bytes_out={} reason={:?}",
            self.client,
            self.vip,
            self.snat,
            self.backend,
            self.duration_s,
            self.bytes_in,
            self.bytes_out,
            self.reason
        )
    }
}

/// Where lines go and how many this second.
pub struct ConnLog {
    file: Option<(PathBuf, File)>,
    window: Instant,
    logged: usize,
    suppressed: u64,
}

impl Default for ConnLog {
    fn default() -> Self {
        Self {
            file: None,
            window: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }
}

impl ConnLog {
    pub const PER_SECOND: usize = 100;

    /// A log to the agent's log, or appended to `file`.
    pub fn new(file: Option<&Path>) -> Result<Self> {
        let file = match file {
            None => None,
            Some(p) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("cannot open connection_log {}", p.display()))?;
                Some((p.to_path_buf(), f))
            }
        };
        Ok(Self {
            file,
            ..Self::default()
        })
    }

    /// Logs one finished connection (or counts it, past this second's budget).
    pub fn record(&mut self, e: &Ended) {
        self.roll();
        if self.logged >= Self::PER_SECOND {
            self.suppressed += 1;
            return;
        }
        self.logged += 1;
        self.emit(&format!("connection ended {}", e.text()));
    }

    /// Starts a new second, summarising what the last one suppressed.
    fn roll(&mut self) {
        if self.window.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.window = Instant::now();
        self.logged = 0;
        if self.suppressed > 0 {
            let n = std::mem::take(&mut self.suppressed);
            self.emit(&format!(
                "{n} more connections ended (connection log limited to {} lines a second)",
                Self::PER_SECOND
            ));
        }
    }

    /// Writes the summary of a finished second, if one is due (called once a GC pass).
    pub fn flush(&mut self) {
        self.roll();
    }

    fn emit(&mut self, line: &str) {
        if let Some((path, f)) = &mut self.file {
            let at = humantime::format_rfc3339_millis(SystemTime::now());
            match writeln!(f, "{at} {line}") {
                Ok(()) => return,
                Err(e) => {
                    warn!(
                        "writing the connection log {}: {e}; logging connections to the agent's log from now on",
                        path.display()
                    );
                    self.file = None;
                }
            }
        }
        info!(target: "lb::conn", "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(reason: u32) -> ConnEvent {
        ConnEvent {
            created_ns: 1_000_000_000,
            ended_ns: 3_500_000_000,
            bytes_in: 12,
            bytes_out: 3400,
            key: FlowKey {
                saddr: u32::from_be_bytes([198, 18, 0, 2]).to_be(),
                daddr: u32::from_be_bytes([198, 18, 0, 10]).to_be(),
                sport: 40000u16.to_be(),
                dport: 7680u16.to_be(),
                proto: 6,
                _pad: 0,
                _pad16: 0,
            },
            snat_addr: u32::from_be_bytes([10, 0, 1, 1]).to_be(),
            backend_addr: u32::from_be_bytes([10, 0, 1, 10]).to_be(),
            snat_port: 12345u16.to_be(),
            backend_port: 7687u16.to_be(),
            service_id: 0,
            backend_id: 0,
            reason,
            generation: 1,
            _pad: 0,
        }
    }

    #[test]
    fn a_data_path_event_becomes_a_line_with_every_field() {
        let t = Ended::from_event(&event(CONN_END_RESET)).text();
        assert_eq!(
            t,
            "client=198.18.0.2:40000 vip=198.18.0.10:7680 snat=10.0.1.1:12345 \
             backend=10.0.1.10:7687 duration_s=2.5 bytes_in=12 bytes_out=3400 \
             reason=\"reset (backend demoted, on_down = reset)\""
        );
        assert!(Ended::from_event(&event(CONN_END_REUSED))
            .text()
            .ends_with("reason=\"closed (tuple reused by a new connection)\""));
    }

    #[test]
    fn the_file_gets_at_most_per_second_lines_and_a_summary() {
        let dir = std::env::temp_dir().join(format!("lb-connlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("conn.log");
        let _ = std::fs::remove_file(&path);
        let mut log = ConnLog::new(Some(&path)).unwrap();
        let e = Ended::from_event(&event(CONN_END_RESET));
        for _ in 0..ConnLog::PER_SECOND + 5 {
            log.record(&e);
        }
        log.window -= Duration::from_secs(2);
        log.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), ConnLog::PER_SECOND + 1, "{text}");
        assert!(lines[0].contains(" connection ended client=198.18.0.2:40000 "));
        assert!(lines[ConnLog::PER_SECOND]
            .ends_with("5 more connections ended (connection log limited to 100 lines a second)"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
