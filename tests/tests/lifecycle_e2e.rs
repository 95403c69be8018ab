//! Connection-table lifecycle end to end: the agent's GC, with `[timeouts] idle = "3s"` and
//! `close = "2s"`, removes an idle connection's entries after ~3 s (+ the 1 s GC period) and
//! connections the server closed first after the close timeout (one the client closed first
//! is gone at its last ACK, deleted by the data path), while a connection exchanging a byte
//! every 500 ms keeps its entries and keeps working. The tables are read from the agent's pins
//! (`/sys/fs/bpf/lb/<instance>/CT_*`).
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use aya::maps::{HashMap, Map, MapData};
use lb_common::{addr_be, names, port_be, Flow, FlowKey, IPPROTO_TCP};
use lb_tests::harness::Topology;

const PORT: u16 = 9000;
const VIP_PORT: u16 = 7680;

fn config(topo: &Topology) -> String {
    let mut s = format!(
        "instance = \"{}\"\nsnat_ports = \"10000-32767\"\nconnection_log = \"{}\"\n[timeouts]\nidle = \"3s\"\nclose = \"2s\"\n",
        topo.instance,
        conn_log(topo).display()
    );
    s += &topo.backends_toml();
    s += &format!(
        "[[service]]\nname = \"write\"\nvip = \"{}:{VIP_PORT}\"\nbackend_port = {PORT}\nbackends = [\"db01\"]\n",
        topo.vip
    );
    s
}

/// Where the agent appends its connection log (`connection_log`).
fn conn_log(topo: &Topology) -> std::path::PathBuf {
    topo.log_dir.join("connections.log")
}

/// The agent's established table, opened from its pin.
fn established(topo: &Topology) -> Result<Table> {
    let path = lb_user::dataplane::pin_dir(&topo.instance).join(names::CT_ESTABLISHED);
    let data = MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?;
    Ok(HashMap::try_from(Map::from_map_data(data)?)?)
}

type Table = HashMap<MapData, FlowKey, Flow>;

/// Whether the flow with forward key `key` has both entries in the table.
fn in_table(t: &Table, key: &FlowKey) -> bool {
    match t.get(key, 0) {
        Ok(f) => t
            .get(&f.partner_key(IPPROTO_TCP), 0)
            .is_ok_and(|r| r.points_back_to(key)),
        Err(_) => false,
    }
}

/// Whether any entry of the flow with forward key `key` is left (the forward entry, or a
/// reply entry pointing to it).
fn any_entry(t: &Table, key: &FlowKey) -> bool {
    t.get(key, 0).is_ok() || t.iter().flatten().any(|(_, f)| f.points_back_to(key))
}

/// A connection through the VIP: both ends, as seen by the test.
struct Conn {
    client: TcpStream,
    server: TcpStream,
    fwd_key: FlowKey,
}

impl Conn {
    fn open(topo: &Topology, listener: &TcpListener) -> Result<Conn> {
        let vip = SocketAddrV4::new(topo.vip, VIP_PORT);
        let client = topo
            .client
            .ns
            .run_in(|| TcpStream::connect_timeout(&vip.into(), Duration::from_secs(5)))??;
        let (server, _) = listener.accept()?;
        for s in [&client, &server] {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.set_nodelay(true)?;
        }
        let SocketAddr::V4(local) = client.local_addr()? else {
            bail!("not IPv4");
        };
        let fwd_key = FlowKey {
            saddr: addr_be(local.ip().octets()),
            daddr: addr_be(topo.vip.octets()),
            sport: port_be(local.port()),
            dport: port_be(VIP_PORT),
            proto: IPPROTO_TCP,
            _pad: 0,
            _pad16: 0,
        };
        let mut c = Conn {
            client,
            server,
            fwd_key,
        };
        c.ping(0)?;
        Ok(c)
    }

    /// One byte each way.
    fn ping(&mut self, round: u8) -> Result<()> {
        let mut b = [0u8; 1];
        self.client.write_all(&[round])?;
        self.server.read_exact(&mut b)?;
        ensure!(b[0] == round, "backend got {b:?}");
        self.server.write_all(&[round ^ 0xff])?;
        self.client.read_exact(&mut b)?;
        ensure!(b[0] == round ^ 0xff, "client got {b:?}");
        Ok(())
    }

    fn in_table(&self, t: &Table) -> bool {
        in_table(t, &self.fwd_key)
    }

    /// Closes cleanly, the server first: its FIN, the client reads EOF and closes too (the
    /// backend then holds the TIME_WAIT: the flow waits for the close timeout).
    fn close_from_server(mut self) -> Result<FlowKey> {
        self.server.shutdown(Shutdown::Write)?;
        let mut rest = Vec::new();
        self.client.read_to_end(&mut rest)?;
        ensure!(rest.is_empty(), "unexpected bytes {rest:?}");
        drop(self.client);
        self.server.read_to_end(&mut rest)?;
        Ok(self.fwd_key)
    }

    /// Closes cleanly: FIN from the client, the server reads EOF and closes too.
    fn close(mut self) -> Result<FlowKey> {
        self.client.shutdown(Shutdown::Write)?;
        let mut rest = Vec::new();
        self.server.read_to_end(&mut rest)?;
        ensure!(rest.is_empty(), "unexpected bytes {rest:?}");
        drop(self.server);
        self.client.read_to_end(&mut rest)?;
        Ok(self.fwd_key)
    }
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn idle_and_closed_flows_leave_the_table_after_their_timeouts_while_active_ones_stay() -> Result<()>
{
    let topo = Topology::two_armed("lifecycle")?;
    let db01 = &topo.backends[0];
    let listener = db01
        .ns
        .run_in(|| TcpListener::bind(SocketAddrV4::new(db01.addr, PORT)))??;
    let lb = topo.start_lb(&config(&topo), &["--xdp-mode", "native"])?;
    let table = established(&topo)?;

    let idle = Conn::open(&topo, &listener)?;
    let idle_since = Instant::now();
    let active = Conn::open(&topo, &listener)?;
    let closing: Vec<Conn> = (0..3)
        .map(|_| Conn::open(&topo, &listener))
        .collect::<Result<_>>()?;
    for c in [&idle, &active].into_iter().chain(&closing) {
        ensure!(c.in_table(&table), "a new connection is not established");
    }

    // The active connection: one byte each way every 500 ms, on its own thread.
    let stop = Arc::new(AtomicBool::new(false));
    let pinger = {
        let stop = stop.clone();
        let mut active = active;
        thread::spawn(move || -> Result<Conn> {
            let mut round = 1u8;
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(500));
                active
                    .ping(round)
                    .with_context(|| format!("active connection, round {round}"))?;
                round = round.wrapping_add(1);
            }
            Ok(active)
        })
    };

    // Closed by the client first: the data path ends the flow at the client's last ACK.
    let client_closed = Conn::open(&topo, &listener)?;
    let client_closed = client_closed.close()?;
    thread::sleep(Duration::from_millis(100));
    ensure!(
        !any_entry(&table, &client_closed),
        "a flow the client closed was not deleted at its last ACK"
    );
    // Closed by the server first (FIN both ways, the backend holds the TIME_WAIT): the entries
    // stay for the close timeout, then the GC takes them.
    let closed: Vec<Conn> = closing;
    let closed_at = Instant::now();
    let closed_keys: Vec<FlowKey> = closed
        .into_iter()
        .map(Conn::close_from_server)
        .collect::<Result<_>>()?;
    thread::sleep(Duration::from_millis(300));
    for k in &closed_keys {
        ensure!(
            any_entry(&table, k),
            "a closed flow was deleted at once instead of after the close timeout"
        );
    }

    // Watch the table until both the closed and the idle flows are gone (or 10 s pass).
    let mut closed_gone: Option<Duration> = None;
    let mut idle_gone: Option<Duration> = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && (closed_gone.is_none() || idle_gone.is_none()) {
        thread::sleep(Duration::from_millis(100));
        if closed_gone.is_none() && closed_keys.iter().all(|k| !any_entry(&table, k)) {
            closed_gone = Some(closed_at.elapsed());
        }
        if idle_gone.is_none() && !any_entry(&table, &idle.fwd_key) {
            idle_gone = Some(idle_since.elapsed());
        }
        if pinger.is_finished() {
            return match pinger.join() {
                Ok(Err(e)) => Err(e.context("the active connection broke")),
                _ => bail!("the active connection's thread ended early"),
            };
        }
    }
    eprintln!("closed flows gone after {closed_gone:?}, idle flow gone after {idle_gone:?}");
    let closed_gone = closed_gone.context("closed flows still in the table after 10 s")?;
    let idle_gone = idle_gone.context("the idle flow is still in the table after 10 s")?;
    // close 2 s after the last segment; the GC runs every second; last_seen has 1 s resolution.
    ensure!(
        closed_gone >= Duration::from_millis(1500) && closed_gone <= Duration::from_millis(5000),
        "closed flows left after {closed_gone:?}, expected ~2-3 s"
    );
    ensure!(
        idle_gone >= Duration::from_millis(2500) && idle_gone <= Duration::from_millis(6000),
        "the idle flow left after {idle_gone:?}, expected ~3-4 s"
    );

    // The active connection kept its entries throughout and still works.
    stop.store(true, Ordering::Relaxed);
    let mut active = pinger
        .join()
        .map_err(|_| anyhow::anyhow!("pinger panicked"))??;
    ensure!(
        active.in_table(&table),
        "the active connection lost its entries"
    );
    active.ping(200)?;

    // The connection log (in its own file, not the agent's log) names the client behind each
    // SNAT port and why the connection ended.
    ensure!(
        !lb.logs().contains("connection ended"),
        "connection lines in the agent's log although connection_log is set"
    );
    let logs = std::fs::read_to_string(conn_log(&topo)).context("read the connection log")?;
    let ended: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("connection ended"))
        .collect();
    ensure!(
        ended.iter().any(|l| l.contains("idle timeout"))
            && ended.iter().filter(|l| l.contains("FIN both ways")).count() >= 4,
        "connection log: {ended:#?}"
    );
    ensure!(
        ended
            .iter()
            .all(|l| l.contains(&format!("client={}:", topo.client.addr)) && l.contains("snat=")),
        "connection log lines lack the client or SNAT port: {ended:#?}"
    );
    // Every logged connection carried one byte each way (`Conn::open`'s ping).
    ensure!(
        ended
            .iter()
            .all(|l| l.contains("bytes_in=1") && l.contains("bytes_out=1")),
        "connection log lines lack the payload bytes each way (1 and 1): {ended:#?}"
    );
    Ok(())
}
