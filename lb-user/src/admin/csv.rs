//! `;csv` (`/;csv`, `/haproxy?stats;csv`): the stats document in HAProxy's CSV, so scripts and
//! exporters written for `listen admin` / `stats enable` keep working.
//!
//! The header is HAProxy 2.6's, from `pxname` to `conn_tot` (its first 80 columns, in its order;
//! the later ones are about HTTP, caches, SSL and H1/H2, none of which an L4 balancer has). Every
//! line ends with a comma, as HAProxy's do. Per service (`pxname` = service name) there is a
//! `FRONTEND` row, one row per configured backend (`svname` = backend name) and a `BACKEND` row.
//! Columns lb has no value for are left empty. What is filled:
//!
//! | column | FRONTEND | server | BACKEND |
//! | --- | --- | --- | --- |
//! | `stot` | new flows of the service | (empty, see below) | new flows of the service |
//! | `bin` / `bout` | service bytes client to backend / back | (empty) | same as FRONTEND |
//! | `dreq` | packets of the service the data path dropped (packets, not requests) | | |
//! | `status` | `OPEN` | `UP`, `DOWN`, `UP f/fall` (going down), `DOWN p/rise` (going up), `DRAIN` / `MAINT` (operator override), `no check` | `UP` if the set has a member, else `DOWN` |
//! | `weight` / `act` | | 1 if in the installed set, else 0 | members of the set |
//! | `bck` | | 0 | 0 |
//! | `lastchg` | | seconds since the last transition | |
//! | `pid`, `iid`, `sid` | 1, service index + 1, 0 | 1, service index + 1, backend index + 1 | 1, service index + 1, 0 |
//! | `lbtot` | | | new flows of the service |
//! | `type` | 0 | 2 | 1 |
//! | `rate` | new flows per second over the last window | | same |
//! | `check_status` | | `L7OK` (positive), `L7STS` (negative answer), `L4CON`, `L4TOUT`, `L7TOUT`, `L7RSP` (failed) | |
//! | `check_duration` | | last check's latency in ms | |
//! | `check_desc` | | lb's text of the last result | |
//! | `check_rise` / `check_fall` | | the check's rise and fall | |
//! | `addr` | | backend address:backend_port | |
//! | `mode` | `tcp` | `tcp` | `tcp` |
//! | `algo` | | | `first`, `roundrobin` or `maglev` |
//! | `conn_rate` / `conn_tot` | new flows per second / new flows | | |
//!
//! The data path counts traffic per service and per backend, not per (service, backend) pair, so
//! the server rows carry no traffic columns (a backend's counters would show up under every
//! service it is in, and sums over server rows would be wrong). Per-backend traffic is in
//! `/stats.json`, on the dashboard and in `/metrics` (`lb_backend_*`).
use std::fmt::Write;

use super::model::{PairDoc, ServiceDoc, StatsDoc};
use crate::live::Admin;

/// HAProxy 2.6's columns up to `conn_tot`, in its order.
pub const COLUMNS: &[&str] = &[
    "pxname",
    "svname",
    "qcur",
    "qmax",
    "scur",
    "smax",
    "slim",
    "stot",
    "bin",
    "bout",
    "dreq",
    "dresp",
    "ereq",
    "econ",
    "eresp",
    "wretr",
    "wredis",
    "status",
    "weight",
    "act",
    "bck",
    "chkfail",
    "chkdown",
    "lastchg",
    "downtime",
    "qlimit",
    "pid",
    "iid",
    "sid",
    "throttle",
    "lbtot",
    "tracked",
    "type",
    "rate",
    "rate_lim",
    "rate_max",
    "check_status",
    "check_code",
    "check_duration",
    "hrsp_1xx",
    "hrsp_2xx",
    "hrsp_3xx",
    "hrsp_4xx",
    "hrsp_5xx",
    "hrsp_other",
    "hanafail",
    "req_rate",
    "req_rate_max",
    "req_tot",
    "cli_abrt",
    "srv_abrt",
    "comp_in",
    "comp_out",
    "comp_byp",
    "comp_rsp",
    "lastsess",
    "last_chk",
    "last_agt",
    "qtime",
    "ctime",
    "rtime",
    "ttime",
    "agent_status",
    "agent_code",
    "agent_duration",
    "check_desc",
    "agent_desc",
    "check_rise",
    "check_fall",
    "check_health",
    "agent_rise",
    "agent_fall",
    "agent_health",
    "addr",
    "cookie",
    "mode",
    "algo",
    "conn_rate",
    "conn_rate_max",
    "conn_tot",
];

/// One CSV line being filled by column name.
struct Row(Vec<String>);

impl Row {
    fn new(px: &str, sv: &str) -> Self {
        let mut r = Row(vec![String::new(); COLUMNS.len()]);
        r.set("pxname", px);
        r.set("svname", sv);
        r
    }

    fn set(&mut self, col: &str, v: impl ToString) {
        if let Some(i) = COLUMNS.iter().position(|c| *c == col) {
            self.0[i] = field(&v.to_string());
        }
    }

    fn line(&self, out: &mut String) {
        for f in &self.0 {
            out.push_str(f);
            out.push(',');
        }
        out.push('\n');
    }
}

/// Quotes a field that holds a comma, a quote or a line break (RFC 4180).
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// HAProxy's server status for a pair.
pub fn server_status(s: &ServiceDoc, p: &PairDoc) -> String {
    match p.admin {
        Admin::Disable => return "MAINT".into(),
        Admin::Drain => return "DRAIN".into(),
        Admin::Ready => {}
    }
    let n = |prefix: &str, suffix: &str| {
        p.state
            .strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(suffix))
            .and_then(|n| n.trim().parse::<u32>().ok())
    };
    let of = |x: Option<u32>| x.map(|v| v.to_string()).unwrap_or_else(|| "?".into());
    if p.state == "NO CHECK" {
        "no check".into()
    } else if let Some(f) = n("UP (going down,", "failed)") {
        format!("UP {f}/{}", of(s.fall))
    } else if let Some(k) = n("DOWN (going up,", "passed)") {
        format!("DOWN {k}/{}", of(s.rise))
    } else if p.state.starts_with("UP") {
        "UP".into()
    } else {
        "DOWN".into()
    }
}

/// HAProxy's `check_status` code for lb's text of a check result.
pub fn check_status(last: &str) -> &'static str {
    if last == "positive" {
        "L7OK"
    } else if last.starts_with("negative") {
        "L7STS"
    } else if last.contains("timeout") {
        if last.contains("connect") {
            "L4TOUT"
        } else {
            "L7TOUT"
        }
    } else if last.contains("connect") || last.contains("refused") {
        "L4CON"
    } else {
        "L7RSP"
    }
}

pub fn encode_doc(doc: &StatsDoc) -> String {
    let mut out = String::new();
    let _ = write!(out, "# ");
    for c in COLUMNS {
        out.push_str(c);
        out.push(',');
    }
    out.push('\n');
    for (i, s) in doc.services.iter().enumerate() {
        let iid = i + 1;
        let rate = s.rates.new_flows.round() as u64;
        let mut f = Row::new(&s.name, "FRONTEND");
        f.set("stot", s.counters.new_flows);
        f.set("bin", s.counters.bytes_in);
        f.set("bout", s.counters.bytes_out);
        f.set("dreq", s.counters.drops.unwrap_or(0));
        f.set("status", "OPEN");
        let scur: Option<u64> = s.backends.iter().map(|p| p.active_flows).sum();
        if let Some(c) = scur {
            f.set("scur", c);
        }
        if let Some(m) = doc.maxconn {
            f.set("slim", m);
        }
        f.set("pid", 1);
        f.set("iid", iid);
        f.set("sid", 0);
        f.set("type", 0);
        f.set("rate", rate);
        f.set("mode", "tcp");
        f.set("conn_rate", rate);
        f.set("conn_tot", s.counters.new_flows);
        f.line(&mut out);
        for p in &s.backends {
            let mut r = Row::new(&s.name, &p.backend);
            r.set("status", server_status(s, p));
            if let Some(a) = p.active_flows {
                r.set("scur", a);
            }
            if let Some(m) = p.maxconn {
                r.set("slim", m);
            }
            let w = u8::from(p.in_set);
            r.set("weight", w);
            r.set("act", w);
            r.set("bck", 0);
            if let Some(t) = p.since_change_s {
                r.set("lastchg", t as u64);
            }
            r.set("pid", 1);
            r.set("iid", iid);
            let sid = doc
                .backends
                .iter()
                .position(|b| b.name == p.backend)
                .map(|x| x + 1)
                .unwrap_or(0);
            r.set("sid", sid);
            r.set("type", 2);
            if let Some(c) = &p.last_check {
                r.set("check_status", check_status(c));
                r.set("check_desc", c);
            }
            if let Some(ms) = p.last_latency_ms {
                r.set("check_duration", ms as u64);
            }
            if let (Some(rise), Some(fall)) = (s.rise, s.fall) {
                r.set("check_rise", rise);
                r.set("check_fall", fall);
            }
            if let Some(b) = doc.backends.iter().find(|b| b.name == p.backend) {
                r.set("addr", format!("{}:{}", b.address, s.backend_port));
            }
            r.set("mode", "tcp");
            r.line(&mut out);
        }
        let mut b = Row::new(&s.name, "BACKEND");
        b.set("stot", s.counters.new_flows);
        b.set("bin", s.counters.bytes_in);
        b.set("bout", s.counters.bytes_out);
        b.set("status", if s.members.is_empty() { "DOWN" } else { "UP" });
        b.set("weight", s.members.len());
        b.set("act", s.members.len());
        b.set("bck", 0);
        b.set("pid", 1);
        b.set("iid", iid);
        b.set("sid", 0);
        b.set("lbtot", s.counters.new_flows);
        b.set("type", 1);
        b.set("rate", rate);
        b.set("mode", "tcp");
        b.set("algo", &s.balance);
        b.line(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::model::tests::doc;

    fn col(name: &str) -> usize {
        COLUMNS.iter().position(|c| *c == name).unwrap()
    }

    #[test]
    fn header_is_haproxys_column_order() {
        let csv = encode_doc(&doc());
        let header = csv.lines().next().unwrap();
        // HAProxy 2.6's header starts exactly like this (checked against `stats enable`).
        assert!(header.starts_with(
            "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,"
        ), "{header}");
        assert!(header.ends_with(",addr,cookie,mode,algo,conn_rate,conn_rate_max,conn_tot,"));
        assert_eq!(COLUMNS.len(), 80);
    }

    #[test]
    fn rows_frontend_servers_backend_per_service() {
        let csv = encode_doc(&doc());
        let rows: Vec<Vec<&str>> = csv
            .lines()
            .skip(1)
            .map(|l| l.split(',').collect())
            .collect();
        // write: FRONTEND, db01, db02, BACKEND; read: FRONTEND, db02, BACKEND.
        let names: Vec<(&str, &str)> = rows.iter().map(|r| (r[0], r[1])).collect();
        assert_eq!(
            names,
            [
                ("write", "FRONTEND"),
                ("write", "db01"),
                ("write", "db02"),
                ("write", "BACKEND"),
                ("read", "FRONTEND"),
                ("read", "db02"),
                ("read", "BACKEND"),
            ]
        );
        for r in &rows {
            // COLUMNS fields plus the empty one after the trailing comma; check_desc of db02
            // is quoted and holds no comma, so plain splitting works here.
            assert_eq!(r.len(), COLUMNS.len() + 1, "{r:?}");
        }
        let fe = &rows[0];
        assert_eq!(fe[col("stot")], "16");
        assert_eq!(fe[col("bin")], "16000");
        assert_eq!(fe[col("bout")], "32000");
        assert_eq!(fe[col("dreq")], "1");
        assert_eq!(fe[col("status")], "OPEN");
        assert_eq!(fe[col("rate")], "5");
        assert_eq!(fe[col("type")], "0");
        let db01 = &rows[1];
        assert_eq!(db01[col("status")], "UP");
        assert_eq!(db01[col("weight")], "1");
        assert_eq!(db01[col("lastchg")], "12");
        assert_eq!(db01[col("check_status")], "L7OK");
        assert_eq!(db01[col("check_duration")], "1");
        assert_eq!(db01[col("check_rise")], "2");
        assert_eq!(db01[col("addr")], "10.0.1.10:7687");
        assert_eq!(db01[col("stot")], "");
        assert_eq!(db01[col("type")], "2");
        let db02 = &rows[2];
        // Operator's drain wins over the check state.
        assert_eq!(db02[col("status")], "DRAIN");
        assert_eq!(db02[col("act")], "0");
        assert_eq!(db02[col("check_status")], "L7STS");
        assert_eq!(
            db02[col("check_desc")],
            "\"negative: HTTP 404 \"\"false\"\"\""
        );
        let be = &rows[3];
        assert_eq!(be[col("status")], "UP");
        assert_eq!(be[col("act")], "1");
        assert_eq!(be[col("algo")], "first");
        assert_eq!(be[col("lbtot")], "16");
        assert_eq!(rows[6][col("status")], "DOWN");
    }

    #[test]
    fn statuses_show_rise_and_fall_progress() {
        let d = doc();
        let s = &d.services[0];
        let mut p = s.backends[0].clone();
        for (state, want) in [
            ("UP", "UP"),
            ("DOWN", "DOWN"),
            ("UP (going down, 1 failed)", "UP 1/3"),
            ("DOWN (going up, 1 passed)", "DOWN 1/2"),
            ("NO CHECK", "no check"),
        ] {
            p.state = state.into();
            assert_eq!(server_status(s, &p), want);
        }
        p.admin = Admin::Disable;
        assert_eq!(server_status(s, &p), "MAINT");
        assert_eq!(check_status("failed: connect: connection refused"), "L4CON");
        assert_eq!(check_status("failed: timeout after 1s (connect)"), "L4TOUT");
        assert_eq!(
            check_status("failed: timeout after 300ms (waiting for the answer)"),
            "L7TOUT"
        );
        assert_eq!(check_status("failed: HTTP 500"), "L7RSP");
    }
}
