//! `cargo xtask demo`: lb in front of a simulated 3-server Neo4j cluster, all in network namespaces.
//!
//! Builds the two-armed topology, starts `neo4j-sim` on db01 (master), db02 and db03 (slaves),
//! starts `lb run` in the lb namespace, drives Bolt and HTTP traffic from the client namespace
//! through the VIP 198.18.0.10, prints which server answered and lb's own counters, then removes
//! everything. Exits non-zero if traffic did not get through as configured.
//!
//! Environment (set by xtask): LB_BIN, LB_SIM_BIN, LB_PYTHON, LB_REPO.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use lb_tests::harness::{self, Shape, Topology, TopologyOptions};
use lb_tests::sim::control::SimControl;

/// The demo's lb configuration (the same services as the HAProxy setup it replaces).
const CONFIG: &str = r#"instance = "demo"
snat_ports = "10000-32767"
[[backend]]
name = "db01"
address = "10.0.1.10"
[[backend]]
name = "db02"
address = "10.0.1.11"
[[backend]]
name = "db03"
address = "10.0.1.12"
# The manual's three HAProxy sections: HEAD /db/manage/server/ha/master|slave and GET .../available
# on port 7474, with HAProxy's default timings (inter 2s, rise 2, fall 3; fastinter 250ms).
[[service]]
name = "write"
vip = "198.18.0.10:7680"
backend_port = 7687
backends = ["db01", "db02", "db03"]
check = "neo4j-ha-master"
[[service]]
name = "read"
vip = "198.18.0.10:7681"
backend_port = 7687
backends = ["db01", "db02", "db03"]
check = "neo4j-ha-slave"
[[service]]
name = "http"
vip = "198.18.0.10:80"
backend_port = 7474
backends = ["db01", "db02", "db03"]
check = "neo4j-ha-available"
"#;

const WRITES: usize = 50;
const READS: usize = 50;
const HTTP_GETS: usize = 20;

/// Opens one fresh Bolt connection per query with the official Neo4j Python driver; prints one JSON
/// line: {"write": {server: n}, "read": {server: n}, "errors": [...]}.
const BOLT_SCRIPT: &str = r#"
import json, sys
import neo4j
from neo4j import GraphDatabase
vip, writes, reads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {"write": {}, "read": {}, "errors": [], "driver": neo4j.__version__}
for kind, port, n, access in (("write", 7680, writes, neo4j.WRITE_ACCESS), ("read", 7681, reads, neo4j.READ_ACCESS)):
    for i in range(n):
        try:
            with GraphDatabase.driver("bolt://%s:%d" % (vip, port), auth=None, connection_timeout=5.0,
                                      connection_acquisition_timeout=10.0) as driver:
                with driver.session(default_access_mode=access) as session:
                    record = session.run("RETURN 1 AS probe").single(strict=True)
                    server = record["server"]
                    out[kind][server] = out[kind].get(server, 0) + 1
        except Exception as e:
            out["errors"].append("%s #%d: %s: %s" % (kind, i, type(e).__name__, e))
print(json.dumps(out))
"#;

fn say(line: &str) {
    println!("demo: {line}");
}

fn main() -> ExitCode {
    match demo() {
        Ok(true) => {
            say("OK: traffic through the VIP reached the backends as configured");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            say("FAILED: some traffic did not get through as configured (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> Result<bool> {
    say("1/8 building namespaces: client 198.18.0.2 -> lb (l0 198.18.0.1, l1 10.0.1.1) -> switch br0 -> db01..db03 10.0.1.10-12");
    let topo = Topology::new(
        "demo",
        Shape::TwoArmed,
        TopologyOptions {
            instance: Some("demo".into()),
            ..TopologyOptions::default()
        },
    )?;
    say(&format!(
        "    namespaces: {}",
        topo.namespaces()
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    ));

    say("2/8 starting simulated Neo4j 3.x servers (HTTP role checks on :7474, Bolt on :7687): db01 master, db02 and db03 slaves");
    let sims = topo.start_sims(&["master", "slave", "slave"])?;

    say(&format!(
        "3/8 starting `lb run` in the lb namespace: write {vip}:7680 -> the master, read {vip}:7681 -> the slaves, http {vip}:80 -> all available (role checks on :7474)",
        vip = topo.vip
    ));
    let lb = topo.start_lb(CONFIG, &[])?;
    say(&format!("    {}", lb.ready_line.trim()));

    say(&format!(
        "4/8 {WRITES} Bolt connections to the write VIP and {READS} to the read VIP, each a new connection of the official Python driver"
    ));
    let mut ok = true;
    let python = harness::python();
    let script = topo.log_dir.join("demo_bolt.py");
    std::fs::write(&script, BOLT_SCRIPT).context("writing the Bolt client script")?;
    let out = topo.client.ns.exec_unchecked(&[
        python.as_os_str(),
        script.as_os_str(),
        topo.vip.to_string().as_ref(),
        WRITES.to_string().as_ref(),
        READS.to_string().as_ref(),
    ])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        Some(v) => {
            say(&format!("    write VIP answered by: {}", v["write"]));
            say(&format!("    read VIP answered by:  {}", v["read"]));
            let errors = v["errors"].as_array().cloned().unwrap_or_default();
            for e in errors.iter().take(5) {
                say(&format!("    error: {}", e.as_str().unwrap_or("?")));
            }
            let count = |kind: &str, server: &str| v[kind][server].as_u64().unwrap_or(0);
            let reads = count("read", "db02") + count("read", "db03");
            if !errors.is_empty()
                || count("write", "db01") != WRITES as u64
                || reads != READS as u64
            {
                say(&format!(
                    "    expected all {WRITES} writes on db01 and all {READS} reads on db02/db03; {} errors",
                    errors.len()
                ));
                ok = false;
            }
        }
        None => {
            say(&format!(
                "    the Python client failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            ok = false;
        }
    }

    say(&format!(
        "5/8 {HTTP_GETS} HTTP GETs of /db/manage/server/ha/available to {}:80 (each server answers its role)",
        topo.vip
    ));
    let vip_http = SocketAddr::from((topo.vip, 80));
    let answers = topo.client.ns.run_in(|| {
        (0..HTTP_GETS)
            .map(|_| http_get(vip_http, "/db/manage/server/ha/available"))
            .collect::<Vec<_>>()
    })?;
    let mut by_answer: BTreeMap<String, usize> = BTreeMap::new();
    for a in &answers {
        let key = match a {
            Ok((status, body)) => format!("{status} {body}"),
            Err(e) => format!("error: {e:#}"),
        };
        *by_answer.entry(key).or_default() += 1;
    }
    for (answer, n) in &by_answer {
        say(&format!("    {n:>3} x {answer}"));
    }
    if answers
        .iter()
        .any(|a| !matches!(a, Ok((200, body)) if body == "master" || body == "slave"))
    {
        ok = false;
    }

    say("6/8 failover: db01 becomes a slave and db02 the master (out of band); lb's role checks move new writes");
    match failover(&topo, &sims) {
        Ok((took, stale, refused)) => say(&format!(
            "    first write answered by db02 {} ms after the role change; before that {stale} writes reached the demoted db01 (it refused them: NotALeader) and {refused} were refused fast by lb (no master)",
            took.as_millis()
        )),
        Err(e) => {
            say(&format!("    failover did not complete: {e:#}"));
            ok = false;
        }
    }

    say("7/8 what each server saw (from the simulators' control sockets), then lb's own counters");
    for sim in &sims {
        match SimControl::new(&sim.control).stats() {
            Ok(s) => say(&format!(
                "    {}: role {:?}, Bolt connections {}, writes {}, HTTP connections {}",
                s.name, s.role, s.bolt_accepted, s.writes, s.http_accepted
            )),
            Err(e) => say(&format!("    {}: stats unavailable: {e:#}", sim.name)),
        }
    }
    let mut status = topo.lb.ns.command(harness::lb_bin());
    status.args(["status", "--instance", &topo.instance]);
    say("    $ lb status --instance demo");
    match status.output() {
        Ok(o) if o.status.success() => print!("{}", String::from_utf8_lossy(&o.stdout)),
        Ok(o) => say(&format!(
            "    lb status failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => say(&format!("    lb status could not run: {e}")),
    }

    say("8/8 stopping lb and the simulators, deleting the namespaces");
    if let Err(e) = lb.stop() {
        say(&format!("    stopping lb: {e:#}"));
    }
    drop(lb);
    drop(sims);
    drop(topo);
    Ok(ok)
}

/// One HTTP/1.0 GET; returns (status code, trimmed body).
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", addr.ip())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP response: {resp:?}"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Flips the master role from db01 to db02 and writes through the VIP every 20 ms until db02
/// answers; returns how long that took, and how many writes before that reached db01 (which
/// refuses them, being a slave now) or were refused by lb while no server was master.
fn failover(topo: &Topology, sims: &[harness::SimProcess]) -> Result<(Duration, usize, usize)> {
    use lb_tests::sim::{
        bolt_client::{Access, BoltClient, Negotiation},
        Role,
    };
    let vip = SocketAddr::from((topo.vip, 7680));
    SimControl::new(&sims[0].control).set_role(Role::Slave)?;
    let t0 = std::time::Instant::now();
    SimControl::new(&sims[1].control).set_role(Role::Master)?;
    topo.client
        .ns
        .run_in(|| -> Result<(Duration, usize, usize)> {
            let (mut stale, mut refused) = (0, 0);
            while t0.elapsed() < Duration::from_secs(10) {
                match BoltClient::connect(vip, Negotiation::Classic, None) {
                    Ok(mut c) => match c.run("RETURN 1", Access::Write) {
                        Ok(r) if r.server == "db02" => return Ok((t0.elapsed(), stale, refused)),
                        Ok(r) => anyhow::bail!(
                            "a write was accepted by {} after the role change",
                            r.server
                        ),
                        Err(_) => stale += 1,
                    },
                    Err(_) => refused += 1,
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            anyhow::bail!("no write reached db02 within 10 s")
        })?
}
