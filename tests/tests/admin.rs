//! The admin server (`[admin]`, HAProxy's `listen admin` / `stats enable`), end to end: lb in
//! front of three simulated Neo4j servers, the admin server on the lb namespace's loopback
//! (127.0.0.1:8080 there), Bolt writes through the VIP. Checks that `/stats.json` counts them
//! exactly, that `/metrics` and `;csv` say the same, that headless Chromium renders a dashboard
//! with the same values, that the NIC's own XDP counters (`ethtool -S`) are there and at least
//! lb's, and that Basic auth refuses without credentials and never leaks the password.
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use lb_tests::{
    harness::{ns::describe, Topology},
    sim::bolt_client::{Access, BoltClient, Negotiation},
};
use serde_json::Value;

const ADMIN: &str = "127.0.0.1:8080";

/// The manual's three services with role checks (faster timings), plus `admin` (an `[admin]`
/// table body, or nothing for the defaults).
fn config(topo: &Topology, admin: &str) -> String {
    let mut s = topo.role_checked_config();
    if !admin.is_empty() {
        s += &format!("[admin]\n{admin}");
    }
    s
}

/// One HTTP/1.0 exchange with the admin server (run inside the lb namespace).
struct Answer {
    status: u16,
    head: String,
    body: String,
}

fn http(method: &str, path: &str, auth: Option<(&str, &str)>) -> Result<Answer> {
    let mut s = TcpStream::connect_timeout(&ADMIN.parse()?, Duration::from_secs(2))
        .with_context(|| format!("connect to the admin server at {ADMIN}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {ADMIN}\r\n");
    if let Some((u, p)) = auth {
        use base64::Engine;
        let cred = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        req += &format!("Authorization: Basic {cred}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("no header end in {raw:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok(Answer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

fn get_ok(topo: &Topology, path: &str, auth: Option<(&str, &str)>) -> Result<String> {
    let a = topo.lb.ns.run_in(|| http("GET", path, auth))??;
    ensure!(a.status == 200, "GET {path}: {}\n{}", a.head, a.body);
    Ok(a.body)
}

fn stats(topo: &Topology, auth: Option<(&str, &str)>) -> Result<Value> {
    serde_json::from_str(&get_ok(topo, "/stats.json", auth)?).context("/stats.json is not JSON")
}

fn u(v: &Value) -> Result<u64> {
    v.as_u64().with_context(|| format!("{v} is not a count"))
}

fn service<'a>(doc: &'a Value, name: &str) -> Result<&'a Value> {
    doc["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .with_context(|| format!("no service {name} in {doc}"))
}

fn backend<'a>(doc: &'a Value, name: &str) -> Result<&'a Value> {
    doc["backends"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .with_context(|| format!("no backend {name} in {doc}"))
}

fn pair<'a>(doc: &'a Value, svc: &str, be: &str) -> Result<&'a Value> {
    service(doc, svc)?["backends"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["backend"] == be))
        .with_context(|| format!("no backend {be} in service {svc}"))
}

/// A series: metric name and sorted labels.
type Key = (String, Vec<(String, String)>);

/// Prometheus text format: `name{k="v",...} value` lines, by series.
fn parse_metrics(text: &str) -> Result<HashMap<Key, f64>> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("metrics line {line:?}"))?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("metrics value in {line:?}"))?;
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), vec![]),
            Some((n, l)) => {
                let l = l
                    .strip_suffix('}')
                    .with_context(|| format!("labels in {line:?}"))?;
                let mut labels = Vec::new();
                for kv in l.split(',').filter(|x| !x.is_empty()) {
                    let (k, v) = kv
                        .split_once('=')
                        .with_context(|| format!("label in {line:?}"))?;
                    labels.push((k.to_string(), v.trim_matches('"').to_string()));
                }
                labels.sort();
                (n.to_string(), labels)
            }
        };
        out.insert((name, labels), value);
    }
    Ok(out)
}

fn metric(m: &HashMap<Key, f64>, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.sort();
    m.get(&(name.to_string(), l))
        .copied()
        .with_context(|| format!("no {name}{labels:?} in /metrics"))
}

/// The `"nic"` entry of `iface` in a stats document.
fn nic<'a>(doc: &'a Value, iface: &str) -> Result<&'a Value> {
    doc["nic"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["iface"] == iface))
        .with_context(|| format!("no nic entry for {iface} in {}", doc["nic"]))
}

/// The NIC XDP section of `doc` against lb's own counters and `/metrics` read right after it.
/// Every packet lb's program counted ran through the driver's XDP path of the interface it
/// arrived on (clients on `ifaces[0]`, backends on `ifaces[1]`), so the driver's
/// `rx_xdp_packets` is at least lb's count; `/metrics` has the same totals and nothing per queue.
fn check_nic(doc: &Value, m: &HashMap<Key, f64>, ifaces: &[String]) -> Result<()> {
    let totals = &doc["totals"]["counters"];
    let lower = [
        (&ifaces[0], "packets in", u(&totals["packets_in"])?),
        (&ifaces[1], "packets out", u(&totals["packets_out"])?),
    ];
    for (iface, what, lb_count) in lower {
        let n = nic(doc, iface)?;
        ensure!(n["error"].is_null(), "{iface}: {}", n["error"]);
        let xdp = u(&n["counters"]["rx_xdp_packets"])?;
        ensure!(
            xdp >= lb_count,
            "{iface}: the driver's rx_xdp_packets {xdp} < lb's {what} {lb_count}"
        );
        // The total is the sum of the driver's per-queue values.
        let queues: u64 = n["per_queue"]
            .as_object()
            .context("per_queue")?
            .iter()
            .filter(|(k, _)| k.starts_with("rx_queue_") && k.ends_with("_xdp_packets"))
            .map(|(_, v)| v.as_u64().unwrap_or(0))
            .sum();
        ensure!(
            queues == xdp,
            "{iface}: per-queue sum {queues} vs total {xdp}"
        );
    }
    let mut series = 0;
    for n in doc["nic"].as_array().context("nic")? {
        let iface = n["iface"].as_str().context("nic iface")?;
        for (name, v) in n["counters"].as_object().context("nic counters")? {
            let got = metric(
                m,
                "lb_nic_xdp_total",
                &[("iface", iface), ("counter", name)],
            )?;
            ensure!(
                got == u(v)? as f64,
                "{iface}/{name}: /metrics {got} vs /stats.json {v}"
            );
            series += 1;
        }
    }
    let in_metrics = m.keys().filter(|(n, _)| n == "lb_nic_xdp_total").count();
    ensure!(
        in_metrics == series,
        "{in_metrics} lb_nic_xdp_total series for {series} counters in /stats.json"
    );
    Ok(())
}

/// `n` Bolt writes through the write VIP, each with a query of `query_len` bytes.
fn writes(topo: &Topology, n: usize, query_len: usize) -> Result<()> {
    let w = SocketAddrV4::new(topo.vip, 7680);
    let query = format!("RETURN '{}'", "x".repeat(query_len.saturating_sub(10)));
    topo.client.ns.run_in(|| -> Result<()> {
        for i in 0..n {
            let mut c = BoltClient::connect(SocketAddr::V4(w), Negotiation::Classic, None)
                .with_context(|| format!("write {i}"))?;
            let r = c.run(&query, Access::Write)?;
            ensure!(r.server == "db01", "write {i} went to {}", r.server);
            c.goodbye()?;
        }
        Ok(())
    })?
}

/// Runs headless Chromium in the lb namespace (own profile dir, no network but loopback there),
/// with a deadline; returns its stdout.
fn chromium(topo: &Topology, args: &[String]) -> Result<String> {
    let profile = topo.log_dir.join(format!(
        "chromium-profile-{}",
        Instant::now().elapsed().as_nanos()
    ));
    std::fs::create_dir_all(&profile)?;
    let mut cmd = topo.lb.ns.command("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--virtual-time-budget=3000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(format!("http://{ADMIN}/"))
    .env("HOME", &profile)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let what = describe(&cmd);
    let mut child = cmd.spawn().with_context(|| format!("spawn {what}"))?;
    let deadline = Instant::now() + Duration::from_secs(90);
    // Read stdout on a thread so a large DOM cannot fill the pipe and stall Chromium.
    let mut stdout = child.stdout.take().context("chromium stdout")?;
    let mut stderr = child.stderr.take().context("chromium stderr")?;
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    std::fs::write(topo.log_dir.join("chromium.stderr"), &err)?;
    let _ = std::fs::remove_dir_all(&profile);
    ensure!(status.success(), "{what}: {status}\n{err}");
    Ok(out)
}

/// The `<tr id="ID" ...>...</tr>` element of the dumped DOM.
fn row<'a>(dom: &'a str, id: &str) -> Result<&'a str> {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .with_context(|| format!("no element id={id} in the dashboard DOM"))?;
    let end = dom[start..]
        .find("</tr>")
        .with_context(|| format!("row {id} does not end"))?;
    Ok(&dom[start..start + end])
}

/// A cell of a row: (data-v if present, text).
fn cell(row: &str, key: &str) -> Result<(Option<String>, String)> {
    let at = row
        .find(&format!("data-k=\"{key}\""))
        .with_context(|| format!("no cell {key} in {row}"))?;
    let tag_end = at + row[at..].find('>').context("cell tag")?;
    let tag = &row[at..tag_end];
    let v = tag.find("data-v=\"").and_then(|i| {
        let rest = &tag[i + 8..];
        rest.find('"').map(|j| rest[..j].to_string())
    });
    let text_end = tag_end + row[tag_end..].find('<').context("cell text")?;
    let text = row[tag_end + 1..text_end]
        .replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"");
    Ok((v, text))
}

/// Writes the counting test sends, and the size of each one's query.
const N: u64 = 25;
const QUERY: usize = 1000;

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn stats_json_metrics_csv_and_the_dashboard_count_writes_exactly() -> Result<()> {
    let topo = Topology::two_armed("admin")?;
    let _sims = topo.start_sims(&["master", "slave", "slave"])?;
    let lb = topo.start_lb(&config(&topo, ""), &["--xdp-mode", "native"])?;

    let before = stats(&topo, None)?;
    ensure!(
        before["mode"] == "native",
        "mode {} (expected native)",
        before["mode"]
    );
    // The first round of checks installed the master.
    ensure!(
        service(&before, "write")?["members"] == serde_json::json!(["db01"]),
        "write set {}",
        service(&before, "write")?["members"]
    );

    writes(&topo, N as usize, QUERY)?;

    let after = stats(&topo, None)?;
    each_write_is_counted_exactly_once(&before, &after)?;
    rates_rise_with_traffic_and_fall_back_to_zero(&topo)?;
    // Traffic has stopped: every view read now must agree with /stats.json read now.
    let doc = stats(&topo, None)?;
    let m = parse_metrics(&get_ok(&topo, "/metrics", None)?)?;
    metrics_agree_with_stats_json(&doc, &m)?;
    let nic_doc = nic_counters_agree_in_both(&topo, doc.clone(), m)?;
    csv_has_one_row_per_pair_and_the_same_totals(&topo, &doc)?;
    the_dashboard_shows_what_stats_json_says(&topo, &nic_doc)?;
    held_connections_show_as_active_flows_until_closed(&topo)?;
    screenshot(&topo);
    drop(lb);
    Ok(())
}

/// Exact: new flows of the write service and of db01 (nothing else sends to db01: it is not a
/// slave, and the http service got no traffic; checks are not balanced flows); lower bounds on
/// packets and bytes both ways.
fn each_write_is_counted_exactly_once(before: &Value, after: &Value) -> Result<()> {
    let wb = &service(before, "write")?["counters"];
    let wa = &service(after, "write")?["counters"];
    ensure!(
        u(&wa["new_flows"])? - u(&wb["new_flows"])? == N,
        "write service: {} new flows for {N} connections",
        u(&wa["new_flows"])? - u(&wb["new_flows"])?
    );
    let db01b = &backend(before, "db01")?["counters"];
    let db01a = &backend(after, "db01")?["counters"];
    ensure!(
        u(&db01a["new_flows"])? - u(&db01b["new_flows"])? == N,
        "db01: {} new flows for {N} connections",
        u(&db01a["new_flows"])? - u(&db01b["new_flows"])?
    );
    ensure!(pair(after, "write", "db01")?["counters"] == *db01a);
    // Lower bounds: every connection carried its query (client to backend), and at least
    // SYN, handshake, HELLO, RUN+PULL, GOODBYE in, and SYN-ACK, version, SUCCESS, RECORD out.
    let d = |a: &Value, b: &Value, k: &str| -> Result<u64> { Ok(u(&a[k])? - u(&b[k])?) };
    for (what, a, b) in [("write", wa, wb), ("db01", db01a, db01b)] {
        ensure!(
            d(a, b, "bytes_in")? >= N * QUERY as u64,
            "{what}: bytes in {}",
            d(a, b, "bytes_in")?
        );
        ensure!(
            d(a, b, "packets_in")? >= N * 5,
            "{what}: packets in {}",
            d(a, b, "packets_in")?
        );
        ensure!(
            d(a, b, "packets_out")? >= N * 3,
            "{what}: packets out {}",
            d(a, b, "packets_out")?
        );
        ensure!(
            d(a, b, "bytes_out")? >= N * 100,
            "{what}: bytes out {}",
            d(a, b, "bytes_out")?
        );
    }
    for other in ["db02", "db03"] {
        ensure!(
            backend(after, other)?["counters"]["new_flows"]
                == backend(before, other)?["counters"]["new_flows"],
            "{other} got new flows"
        );
    }
    ensure!(pair(after, "write", "db01")?["state"] == "UP");
    ensure!(pair(after, "write", "db01")?["in_set"] == true);
    ensure!(pair(after, "write", "db02")?["in_set"] == false);

    Ok(())
}

/// Within two sampling windows the writes show up as a positive rate, and once nothing flows
/// the rate goes back to zero (a window, not since start).
fn rates_rise_with_traffic_and_fall_back_to_zero(topo: &Topology) -> Result<()> {
    let mut rates_seen = false;
    let mut idle_seen = false;
    let mut seen = Vec::new();
    // The first window needs two samples at least 1 s apart (sampled every second).
    let end = Instant::now() + Duration::from_secs(5);
    while stats(topo, None)?["rate_window_s"].is_null() {
        ensure!(Instant::now() < end, "no rate window 5 s after the start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let end = Instant::now() + Duration::from_secs(8);
    writes(topo, 5, 10)?;
    while Instant::now() < end && !(rates_seen && idle_seen) {
        let doc = stats(topo, None)?;
        let r = service(&doc, "write")?["rates"]["new_flows"]
            .as_f64()
            .unwrap_or(-1.0);
        seen.push((r, doc["rate_window_s"].clone()));
        if r > 0.0 {
            rates_seen = true;
        } else if rates_seen && r == 0.0 {
            idle_seen = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(
        rates_seen && idle_seen,
        "rates: seen positive {rates_seen}, back to zero {idle_seen}: (rate, window) {seen:?}"
    );

    Ok(())
}

/// /metrics says what /stats.json says (`doc` and `m` read back to back, traffic stopped).
fn metrics_agree_with_stats_json(doc: &Value, m: &HashMap<Key, f64>) -> Result<()> {
    let w = service(doc, "write")?;
    ensure!(
        metric(m, "lb_service_new_flows_total", &[("service", "write")])?
            == u(&w["counters"]["new_flows"])? as f64
    );
    ensure!(
        metric(
            m,
            "lb_service_bytes_total",
            &[("service", "write"), ("direction", "in")]
        )? == u(&w["counters"]["bytes_in"])? as f64
    );
    ensure!(
        metric(
            m,
            "lb_service_packets_total",
            &[("service", "write"), ("direction", "out")]
        )? == u(&w["counters"]["packets_out"])? as f64
    );
    ensure!(
        metric(m, "lb_backend_new_flows_total", &[("backend", "db01")])?
            == u(&backend(doc, "db01")?["counters"]["new_flows"])? as f64
    );
    ensure!(
        metric(
            m,
            "lb_backend_up",
            &[("service", "write"), ("backend", "db01")]
        )? == 1.0
    );
    ensure!(
        metric(
            m,
            "lb_backend_up",
            &[("service", "write"), ("backend", "db02")]
        )? == 0.0
    );
    ensure!(
        metric(
            m,
            "lb_backend_in_set",
            &[("service", "read"), ("backend", "db02")]
        )? == 1.0
    );
    ensure!(
        metric(m, "lb_set_generation", &[("service", "write")])? == u(&w["generation"])? as f64
    );
    ensure!(
        metric(
            m,
            "lb_check_latency_seconds",
            &[("service", "write"), ("backend", "db01")]
        )? >= 0.0
    );
    ensure!(metric(m, "lb_service_drops_total", &[("service", "write")])? >= 0.0);
    ensure!(metric(m, "lb_uptime_seconds", &[])? > 0.0);
    ensure!(
        m.keys().any(|(n, _)| n == "lb_datapath_events_total"),
        "no lb_datapath_events_total"
    );

    Ok(())
}

/// The NIC's XDP counters, in /stats.json and /metrics; returns the /stats.json they agreed in.
fn nic_counters_agree_in_both(topo: &Topology, doc: Value, m: HashMap<Key, f64>) -> Result<Value> {
    // The NIC's XDP counters. They are cached for a second, so /stats.json and /metrics read
    // back to back agree unless a refresh fell between the two reads (health checks keep
    // counting on the backend side): then read both again.
    let mut tries = 0;
    let nic_doc = loop {
        let (doc, m) = if tries == 0 {
            (doc.clone(), m.clone())
        } else {
            let d = stats(topo, None)?;
            (d, parse_metrics(&get_ok(topo, "/metrics", None)?)?)
        };
        tries += 1;
        match check_nic(&doc, &m, &topo.lb.ifaces) {
            Ok(()) => break doc,
            Err(e) if tries < 3 => {
                eprintln!("NIC counters, try {tries}: {e:#}");
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => return Err(e.context(format!("NIC counters after {tries} tries"))),
        }
    };

    Ok(nic_doc)
}

/// CSV, both URLs: one row per backend per service, plus FRONTEND and BACKEND, with the
/// totals of `doc`; the HTML page is the dashboard.
fn csv_has_one_row_per_pair_and_the_same_totals(topo: &Topology, doc: &Value) -> Result<()> {
    let w = service(doc, "write")?;
    for url in ["/;csv", "/haproxy?stats;csv"] {
        let csv = get_ok(topo, url, None)?;
        let mut lines = csv.lines();
        let header = lines.next().context("empty csv")?;
        ensure!(
            header.starts_with("# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,"),
            "{header}"
        );
        let cols: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
        let stot = cols.iter().position(|c| *c == "stot").context("stot")?;
        let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
        for s in ["write", "read", "http"] {
            for sv in ["FRONTEND", "db01", "db02", "db03", "BACKEND"] {
                let n = rows.iter().filter(|r| r[0] == s && r[1] == sv).count();
                ensure!(n == 1, "{url}: {n} rows for {s}/{sv}");
            }
        }
        ensure!(rows.len() == 15, "{url}: {} rows", rows.len());
        let fe = rows
            .iter()
            .find(|r| r[0] == "write" && r[1] == "FRONTEND")
            .context("write FRONTEND")?;
        let want = u(&w["counters"]["new_flows"])?.to_string();
        ensure!(fe[stot] == want, "csv stot {} vs {want}", fe[stot]);
    }
    let page = get_ok(topo, "/haproxy?stats", None)?;
    ensure!(
        page.contains("<!DOCTYPE html>"),
        "/haproxy?stats is not the dashboard"
    );

    Ok(())
}

/// The dashboard as a browser renders it shows what /stats.json says; its NIC value lies
/// between `nic_doc`'s and a reading after.
fn the_dashboard_shows_what_stats_json_says(topo: &Topology, nic_doc: &Value) -> Result<()> {
    let dom = chromium(topo, &["--dump-dom".to_string()])?;
    let doc = stats(topo, None)?;
    std::fs::write(topo.log_dir.join("dashboard.dom.html"), &dom)?;
    for s in doc["services"].as_array().context("services")? {
        let sname = s["name"].as_str().context("service name")?;
        ensure!(
            dom.contains(&format!("id=\"svc-{sname}\"")),
            "no table for {sname}"
        );
        for p in s["backends"].as_array().context("pairs")? {
            let b = p["backend"].as_str().context("backend name")?;
            let r = row(&dom, &format!("row-{sname}-{b}"))?;
            let (_, state) = cell(r, "state")?;
            ensure!(
                state == p["state"].as_str().unwrap_or(""),
                "{sname}/{b}: state {state:?} vs {}",
                p["state"]
            );
            let (v, _) = cell(r, "new_flows")?;
            ensure!(
                v.as_deref() == Some(p["counters"]["new_flows"].to_string().as_str()),
                "{sname}/{b}: new flows {v:?} vs {}",
                p["counters"]["new_flows"]
            );
            let (v, _) = cell(r, "in_set")?;
            ensure!(
                v.as_deref() == Some(p["in_set"].to_string().as_str()),
                "{sname}/{b}: in set {v:?}"
            );
            let (v, _) = cell(r, "bytes_in")?;
            ensure!(
                v.as_deref() == Some(p["counters"]["bytes_in"].to_string().as_str()),
                "{sname}/{b}: bytes in {v:?}"
            );
        }
        let t = row(&dom, &format!("total-{sname}"))?;
        let (v, _) = cell(t, "new_flows")?;
        ensure!(
            v.as_deref() == Some(s["counters"]["new_flows"].to_string().as_str()),
            "{sname} total new flows {v:?}"
        );
    }
    for b in doc["backends"].as_array().context("backends")? {
        let name = b["name"].as_str().context("backend name")?;
        let r = row(&dom, &format!("backend-{name}"))?;
        let (v, _) = cell(r, "new_flows")?;
        ensure!(
            v.as_deref() == Some(b["counters"]["new_flows"].to_string().as_str()),
            "backend {name}: {v:?}"
        );
    }
    let (mode, _) = cell(&dom, "mode")?;
    ensure!(mode.as_deref() == Some("native"), "mode {mode:?}");
    // The NIC table of the client-facing interface, between the readings before and after.
    let l0 = &topo.lb.ifaces[0];
    let r = row(&dom, &format!("nic-{l0}-rx_xdp_packets"))?;
    let (v, _) = cell(r, "value")?;
    let shown: u64 = v.as_deref().unwrap_or("").parse().context("NIC value")?;
    let (lo, hi) = (
        u(&nic(nic_doc, l0)?["counters"]["rx_xdp_packets"])?,
        u(&nic(&doc, l0)?["counters"]["rx_xdp_packets"])?,
    );
    ensure!(
        (lo..=hi).contains(&shown),
        "dashboard {l0} rx_xdp_packets {shown}, not in {lo}..={hi}"
    );

    Ok(())
}

/// Three connections held open show as the pair's active flows after a GC pass (once a
/// second), in /stats.json and /metrics, with the table fill; closed, they go.
fn held_connections_show_as_active_flows_until_closed(topo: &Topology) -> Result<()> {
    let vip = SocketAddrV4::new(topo.vip, 7680);
    let held: Vec<TcpStream> = topo.client.ns.run_in(|| {
        (0..3)
            .map(|_| TcpStream::connect_timeout(&vip.into(), Duration::from_secs(3)))
            .collect::<std::io::Result<Vec<_>>>()
    })??;
    let active = |doc: &Value| -> Result<u64> { u(&pair(doc, "write", "db01")?["active_flows"]) };
    let wait_active = |want: u64| -> Result<Value> {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let doc = stats(topo, None)?;
            if active(&doc).ok() == Some(want) {
                return Ok(doc);
            }
            ensure!(
                Instant::now() < end,
                "write/db01 active_flows {:?}, expected {want}",
                pair(&doc, "write", "db01")?["active_flows"]
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let doc = wait_active(3)?;
    let est = &doc["tables"]["established"];
    ensure!(
        u(&est["entries"])? >= 6 && u(&est["capacity"])? > 0,
        "established table fill {est}"
    );
    let m = parse_metrics(&get_ok(topo, "/metrics", None)?)?;
    let in_metrics = metric(
        &m,
        "lb_active_flows",
        &[("service", "write"), ("backend", "db01")],
    )?;
    ensure!(
        in_metrics == 3.0 || active(&stats(topo, None)?)? as f64 == in_metrics,
        "/metrics lb_active_flows {in_metrics}"
    );
    for c in &held {
        c.shutdown(std::net::Shutdown::Both)?;
    }
    drop(held);
    wait_active(0)?;

    Ok(())
}

/// A screenshot of the dashboard for people (an artifact, not an assertion).
fn screenshot(topo: &Topology) {
    let shot = topo.log_dir.join("dashboard.png");
    if let Err(e) = chromium(
        topo,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,900".to_string(),
        ],
    ) {
        eprintln!("dashboard screenshot failed (not an assertion): {e:#}");
    } else {
        eprintln!("dashboard screenshot: {}", shot.display());
    }
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn basic_auth_refuses_without_credentials_and_the_password_never_shows() -> Result<()> {
    let topo = Topology::two_armed("admin-auth")?;
    let _sims = topo.start_sims(&["master", "slave", "slave"])?;
    let secret = "Adm1n-s3cret-pw";
    let pw = topo.log_dir.join("admin.pass");
    std::fs::write(&pw, format!("{secret}\n"))?;
    let cfg = config(
        &topo,
        &format!(
            "user = \"ops\"\npassword_file = \"{}\"\nrefresh = \"1s\"\noperations = true\n",
            pw.display()
        ),
    );
    let lb = topo.start_lb(&cfg, &["--xdp-mode", "native"])?;
    let creds = Some(("ops", secret));
    for path in ["/", "/haproxy?stats", "/stats.json", "/;csv", "/metrics"] {
        let a = topo.lb.ns.run_in(|| http("GET", path, None))??;
        ensure!(
            a.status == 401,
            "GET {path} without credentials: {}",
            a.head
        );
        ensure!(
            a.head
                .to_ascii_lowercase()
                .contains("www-authenticate: basic realm=\"lb\""),
            "{}",
            a.head
        );
        let a = topo
            .lb
            .ns
            .run_in(|| http("GET", path, Some(("ops", "wrong"))))??;
        ensure!(
            a.status == 401,
            "GET {path} with a wrong password: {}",
            a.head
        );
        let a = topo.lb.ns.run_in(|| http("GET", path, creds))??;
        ensure!(a.status == 200, "GET {path} with credentials: {}", a.head);
        ensure!(!a.body.contains(secret), "{path} shows the password");
    }
    let a = topo
        .lb
        .ns
        .run_in(|| http("POST", "/api/server/db03/drain", None))??;
    ensure!(a.status == 401, "POST without credentials: {}", a.head);

    // Operator control through the admin server, as the dashboard's buttons do.
    let a = topo
        .lb
        .ns
        .run_in(|| http("POST", "/api/server/db03/drain", creds))??;
    ensure!(a.status == 200, "drain: {}\n{}", a.head, a.body);
    let doc = stats(&topo, creds)?;
    ensure!(
        backend(&doc, "db03")?["admin"] == "drain",
        "{}",
        backend(&doc, "db03")?
    );
    ensure!(pair(&doc, "read", "db03")?["in_set"] == false);
    let a = topo
        .lb
        .ns
        .run_in(|| http("POST", "/api/server/db03/enable", creds))??;
    ensure!(a.status == 200, "enable: {}\n{}", a.head, a.body);
    let a = topo
        .lb
        .ns
        .run_in(|| http("POST", "/api/server/db09/enable", creds))??;
    ensure!(
        a.status == 400 && a.body.contains("db09"),
        "unknown backend: {}\n{}",
        a.head,
        a.body
    );

    let mut status = topo.lb.ns.command(lb_tests::harness::lb_bin());
    status.args(["status", "--instance", &topo.instance]);
    let out = lb_tests::harness::ns::run(&mut status)?;
    for (what, text) in [
        ("lb's log", lb.logs()),
        (
            "lb status",
            String::from_utf8_lossy(&out.stdout).to_string(),
        ),
        (
            "lb status (stderr)",
            String::from_utf8_lossy(&out.stderr).to_string(),
        ),
    ] {
        ensure!(!text.contains(secret), "the password appears in {what}");
    }
    ensure!(
        lb.logs().contains("admin server") && lb.logs().contains("basic"),
        "the log does not say the admin server runs with auth:\n{}",
        lb.logs()
    );
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", lb.pid()))?;
    ensure!(
        !String::from_utf8_lossy(&cmdline).contains(secret),
        "the password appears in lb's argv"
    );
    let environ = std::fs::read(format!("/proc/{}/environ", lb.pid()))?;
    ensure!(
        !String::from_utf8_lossy(&environ).contains(secret),
        "the password appears in lb's environment"
    );
    Ok(())
}

/// Opens `n` TCP connections to `to` without waiting for them (non-blocking connects): what a
/// client holding many idle sockets does. The sockets stay open while the result lives.
fn idle_connections(to: SocketAddrV4, n: usize) -> Result<Vec<std::os::fd::OwnedFd>> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        match connect(fd.as_raw_fd(), &SockaddrIn::from(to)) {
            Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => out.push(fd),
            Err(e) => bail!("connect {to}: {e}"),
        }
    }
    Ok(out)
}

/// Raises this process's open-file limit to its hard limit (2,000 sockets need it).
fn raise_fd_limit() -> Result<()> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `l` is a valid rlimit for getrlimit to fill, then for setrlimit to read.
    unsafe {
        ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0,
            "getrlimit"
        );
        l.rlim_cur = l.rlim_max;
        ensure!(libc::setrlimit(libc::RLIMIT_NOFILE, &l) == 0, "setrlimit");
    }
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn an_admin_server_open_to_the_network_is_read_only_and_2000_idle_connections_cannot_starve_the_checks(
) -> Result<()> {
    raise_fd_limit()?;
    let topo = Topology::two_armed("adminfd")?;
    let sims = topo.start_sims(&["master", "slave", "slave"])?;
    // As the manual's `listen admin` / `bind *:8080` / `stats enable` imports: every address,
    // no credentials, no `stats admin`.
    let lb = topo.start_lb(
        &config(&topo, "listen = \"0.0.0.0:8080\"\n"),
        &["--xdp-mode", "native"],
    )?;
    let admin = SocketAddrV4::new(topo.lb.client_addr, 8080);
    // From the client network: stats yes, operations no.
    let post = topo.client.ns.run_in(|| -> Result<String> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::V4(admin), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(
            format!("POST /api/server/db01/disable HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes(),
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })??;
    ensure!(
        post.starts_with("HTTP/1.0 403") && post.contains("read-only"),
        "{post}"
    );
    let w = SocketAddrV4::new(topo.vip, 7680);
    let ask = |vip| -> Result<String> {
        let mut c = BoltClient::connect(SocketAddr::V4(vip), Negotiation::Classic, None)?;
        Ok(c.run("RETURN 1", Access::Write)?.server)
    };
    ensure!(topo.client.ns.run_in(|| ask(w))?? == "db01");

    // 2,000 idle connections to the admin port from the client network.
    let idle = topo.client.ns.run_in(|| idle_connections(admin, 2000))??;
    std::thread::sleep(Duration::from_millis(1500));
    let fds = std::fs::read_dir(format!("/proc/{}/fd", lb.process.pid()))?.count();
    ensure!(
        fds < 300,
        "the agent holds {fds} file descriptors with {} idle admin connections",
        idle.len()
    );
    // A failover still happens on time: checks every 200 ms, rise 2 at fastinter 100 ms.
    let t = Instant::now();
    lb_tests::sim::control::SimControl::new(&sims[0].control)
        .set_role(lb_tests::sim::Role::Slave)?;
    lb_tests::sim::control::SimControl::new(&sims[1].control)
        .set_role(lb_tests::sim::Role::Master)?;
    loop {
        if topo.client.ns.run_in(|| ask(w))?.ok().as_deref() == Some("db02") {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(3),
            "writes did not reach the new master within 3 s with the admin port flooded:\n{}",
            lb.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "failover in {:.2} s with {} idle admin connections; agent fds {fds}",
        t.elapsed().as_secs_f64(),
        idle.len()
    );
    ensure!(!lb.logs().contains("Too many open files"), "{}", lb.logs());
    drop(idle);
    Ok(())
}
