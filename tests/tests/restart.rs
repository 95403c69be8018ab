//! The data plane outlives the agent: its XDP links and maps are pinned, so a 60 s stream
//! through the VIP survives `kill -9` of the agent and its restart (adoption) with a changed
//! configuration, and an upgrade to a genuinely different program build (replaced atomically
//! through the pinned link), byte for byte; and a build whose map layout changed refuses to
//! adopt the pinned maps.
use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use aya::maps::{Array, Map, MapData};
use lb_common::{abi, names};
use lb_tests::harness::{Ns, Topology};
use nix::sys::signal::Signal;

const ECHO_PORT: u16 = 9000;

fn config(topo: &Topology, extra: &str) -> String {
    let mut s = format!("instance = \"{}\"\n", topo.instance);
    s += "[[check]]\nname = \"master\"\npreset = \"neo4j-ha-master\"\ninter = \"200ms\"\nrise = 1\nfall = 2\n";
    s += &topo.backends_toml();
    s += &format!(
        "[[service]]\nname = \"write\"\nvip = \"{}:7680\"\nbackend_port = {ECHO_PORT}\nbackends = [\"db01\", \"db02\", \"db03\"]\ncheck = \"master\"\n",
        topo.vip
    );
    s + extra
}

/// An echo server in `ns` on `addr` (one connection).
fn echo(ns: &Ns, addr: SocketAddrV4) -> Result<thread::JoinHandle<Result<u64>>> {
    let listener = ns.run_in(|| TcpListener::bind(addr))??;
    Ok(thread::spawn(move || -> Result<u64> {
        let (mut c, _) = listener.accept()?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = [0u8; 4096];
        let mut total = 0;
        loop {
            let n = c.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            c.write_all(&buf[..n])?;
            total += n as u64;
        }
    }))
}

/// Streams chunks through `conn` and checks every echoed byte until `stop`; returns bytes.
fn stream(mut conn: TcpStream, stop: &AtomicBool) -> Result<u64> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut total = 0u64;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let chunk: Vec<u8> = (0..4096u64).map(|j| (i * 31 + j) as u8).collect();
        conn.write_all(&chunk)
            .with_context(|| format!("write after {total} bytes"))?;
        let mut back = vec![0u8; chunk.len()];
        conn.read_exact(&mut back)
            .with_context(|| format!("echo after {total} bytes"))?;
        ensure!(back == chunk, "chunk {i} came back damaged");
        total += chunk.len() as u64;
        i += 1;
        thread::sleep(Duration::from_millis(20));
    }
    conn.shutdown(std::net::Shutdown::Write)?;
    Ok(total)
}

/// How long the stream runs in all.
const STREAM: Duration = Duration::from_secs(60);

/// The tag (hash of the instructions) of the program behind each pinned XDP link.
fn link_program_tags(topo: &Topology) -> Result<Vec<String>> {
    let dir = lb_user::dataplane::pin_dir(&topo.instance);
    let bpftool = |args: &[&str]| -> Result<serde_json::Value> {
        let out = std::process::Command::new("bpftool")
            .arg("-j")
            .args(args)
            .output()
            .context("run bpftool")?;
        ensure!(
            out.status.success(),
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let mut tags = Vec::new();
    for iface in &topo.lb.ifaces {
        let link = dir.join(format!("link_{iface}"));
        let l = bpftool(&["link", "show", "pinned", &link.display().to_string()])?;
        let id = l["prog_id"].as_u64().context("link without prog_id")?;
        let p = bpftool(&["prog", "show", "id", &id.to_string()])?;
        tags.push(p["tag"].as_str().context("program tag")?.to_string());
    }
    Ok(tags)
}

/// Kills the agent with SIGKILL and waits for it to be gone.
fn kill_9(lb: &lb_tests::harness::Process) -> Result<()> {
    lb.signal(Signal::SIGKILL)?;
    let t = Instant::now();
    while lb.try_wait()?.is_none() {
        ensure!(t.elapsed() < Duration::from_secs(5), "lb did not die");
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_60s_stream_survives_kill_9_a_config_change_and_a_program_upgrade() -> Result<()> {
    // The other program build first (an incremental cargo build), so it cannot delay the stream.
    let variant = lb_tests::harness::variant_xdp_object()?;
    let topo = Topology::two_armed("restart")?;
    let _sims = topo.start_sims(&["master", "slave", "slave"])?;
    let server = echo(
        &topo.backends[0].ns,
        SocketAddrV4::new(topo.backends[0].addr, ECHO_PORT),
    )?;
    let lb = topo.start_lb(&config(&topo, ""), &["--xdp-mode", "native"])?;
    let vip = SocketAddr::V4(SocketAddrV4::new(topo.vip, 7680));
    let conn = topo
        .client
        .ns
        .run_in(|| TcpStream::connect_timeout(&vip, Duration::from_secs(5)))??;
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let sent = thread::scope(|s| -> Result<u64> {
        let streamer = s.spawn(|| stream(conn, &stop));
        thread::sleep(Duration::from_millis(1000));
        kill_9(&lb.process)?;
        // No agent: the pinned program keeps translating, and `lb status` says so.
        let mut status = topo.lb.ns.command(lb_tests::harness::lb_bin());
        status.args(["status", "--instance", &topo.instance]);
        let out =
            String::from_utf8_lossy(&lb_tests::harness::ns::run(&mut status)?.stdout).to_string();
        ensure!(
            out.contains("agent: NOT running") && out.contains("no failover happens"),
            "{out}"
        );
        ensure!(
            out.lines()
                .any(|l| l.starts_with("write") && l.contains("db01") && l.contains("UP")),
            "{out}"
        );
        thread::sleep(Duration::from_millis(1500));
        ensure!(
            !streamer.is_finished(),
            "the stream stopped while no agent ran"
        );
        // A new agent, with a changed configuration (one more service), adopts the instance.
        let extra = format!("[[service]]\nname = \"read\"\nvip = \"{}:7681\"\nbackend_port = {ECHO_PORT}\nbackends = [\"db02\"]\n", topo.vip);
        let again = topo.start_lb(&config(&topo, &extra), &["--xdp-mode", "native"])?;
        ensure!(
            again.logs().contains("adopting the running instance"),
            "the restarted agent did not adopt: {}",
            again.logs()
        );
        thread::sleep(Duration::from_millis(1500));
        // Still streaming after the restart: the same connection, never reset, no reconnect.
        ensure!(
            !streamer.is_finished(),
            "the stream ended after the restart"
        );

        // Upgrade: kill -9 again and start an agent with a different program build; it replaces
        // the program behind each pinned link atomically and keeps the maps and flows.
        let before = link_program_tags(&topo)?;
        kill_9(&again.process)?;
        let upgraded = topo.start_lb(
            &config(&topo, &extra),
            &[
                "--xdp-mode",
                "native",
                "--xdp-object",
                &variant.display().to_string(),
            ],
        )?;
        let logs = upgraded.logs();
        ensure!(
            logs.contains("adopting the running instance")
                && logs.contains("loading this XDP object instead of the built-in one")
                && logs.contains("replaced atomically"),
            "the upgrade did not adopt and replace: {logs}"
        );
        let after = link_program_tags(&topo)?;
        ensure!(
            before.iter().zip(&after).all(|(b, a)| b != a),
            "the links still run the same program: tags {before:?} -> {after:?}"
        );
        eprintln!("program tags {before:?} -> {after:?} (upgrade-test build)");

        // Stream on to the full minute.
        while started.elapsed() < STREAM {
            ensure!(
                !streamer.is_finished(),
                "the stream ended {:.1} s after its start",
                started.elapsed().as_secs_f64()
            );
            thread::sleep(Duration::from_millis(250));
        }
        stop.store(true, Ordering::Relaxed);
        let sent = streamer
            .join()
            .map_err(|_| anyhow::anyhow!("streamer panicked"))??;
        drop(upgraded);
        Ok(sent)
    })?;
    let received = server
        .join()
        .map_err(|_| anyhow::anyhow!("echo panicked"))??;
    // 4 KiB every 20 ms or so for a minute: well over 1000 chunks, every one echoed intact.
    ensure!(
        sent >= 1000 * 4096 && received == sent,
        "sent {sent} bytes, the backend received {received}"
    );
    eprintln!(
        "{sent} bytes streamed over {:.0} s across two kill -9 restarts and a program upgrade",
        STREAM.as_secs_f64()
    );
    Ok(())
}

/// Writes a layout hash no build has into the pinned META slot of map `name` in `dir`, as a
/// build with another layout of that map would have left; returns META and the slot.
fn pretend_older_layout(dir: &std::path::Path, name: &str) -> Result<(Array<MapData, u64>, u32)> {
    let mut meta: Array<MapData, u64> = Array::try_from(Map::from_map_data(MapData::from_pin(
        dir.join(names::META),
    )?)?)?;
    let slot = names::ALL.iter().position(|n| *n == name).context("slot")? as u32;
    meta.set(slot, 0xdead_beef, 0)?;
    Ok((meta, slot))
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_build_whose_map_layout_changed_refuses_to_adopt_the_pinned_maps() -> Result<()> {
    let topo = Topology::two_armed("abi")?;
    let _sims = topo.start_sims(&["master", "slave", "slave"])?;
    let lb = topo.start_lb(&config(&topo, ""), &["--xdp-mode", "native"])?;
    lb.stop()?;
    // Pretend the pinned conntrack table was made by a build whose flow value had another layout.
    let dir = std::path::Path::new("/sys/fs/bpf/lb").join(&topo.instance);
    pretend_older_layout(&dir, names::CT_ESTABLISHED)?;
    match topo.start_lb(&config(&topo, ""), &["--xdp-mode", "native"]) {
        Ok(_) => bail!("an incompatible build adopted the pinned maps"),
        Err(e) => {
            let text = format!("{e:#}");
            ensure!(text.contains("CT_ESTABLISHED layout changed"), "{text}");
            ensure!(
                text.contains(&format!("v{}", abi::ABI_VERSION)) && text.contains("drops 0 flows"),
                "{text}"
            );
        }
    }
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_build_whose_handshake_table_layout_changed_replaces_that_table_and_adopts_the_rest(
) -> Result<()> {
    let topo = Topology::two_armed("abihs")?;
    let _sims = topo.start_sims(&["master", "slave", "slave"])?;
    let lb = topo.start_lb(&config(&topo, ""), &["--xdp-mode", "native"])?;
    lb.stop()?;
    let dir = std::path::Path::new("/sys/fs/bpf/lb").join(&topo.instance);
    let id = |name: &str| -> Result<u32> { Ok(MapData::from_pin(dir.join(name))?.info()?.id()) };
    let (embryonic, established) = (id(names::CT_EMBRYONIC)?, id(names::CT_ESTABLISHED)?);
    // Pretend the pinned handshake table was made by a build with another record layout: it
    // holds seconds of state, so it is replaced instead of refusing the upgrade.
    let (meta, slot) = pretend_older_layout(&dir, names::CT_EMBRYONIC)?;
    let lb = topo.start_lb(&config(&topo, ""), &["--xdp-mode", "native"])?;
    ensure!(
        id(names::CT_ESTABLISHED)? == established,
        "the established table was adopted"
    );
    let replaced = id(names::CT_EMBRYONIC)?;
    ensure!(replaced != embryonic, "the handshake table was replaced");
    ensure!(
        meta.get(&slot, 0)? == abi::layout(names::CT_EMBRYONIC).context("layout")?,
        "META records this build's layout"
    );
    lb.stop()?;
    // Its own layout now: adopted on the next start.
    let _lb = topo.start_lb(&config(&topo, ""), &["--xdp-mode", "native"])?;
    ensure!(
        id(names::CT_EMBRYONIC)? == replaced,
        "adopted after the replacement"
    );
    Ok(())
}

/// What the agents of `topo`'s instance changed on the lb host and pinned: VIP address,
/// managed neighbor entries, reserved ports, pinned links.
fn host_settings(topo: &Topology) -> Result<Vec<String>> {
    let text = |out: std::process::Output| String::from_utf8_lossy(&out.stdout).to_string();
    let mut have = Vec::new();
    let addrs = text(topo.lb.ns.exec(&["ip", "-o", "addr", "show"])?);
    if addrs.contains(&format!("{}/32", topo.vip)) {
        have.push(format!("VIP {}", topo.vip));
    }
    let neigh = text(topo.lb.ns.exec(&["ip", "neigh", "show"])?);
    for b in &topo.backends {
        if neigh
            .lines()
            .any(|l| l.starts_with(&format!("{} ", b.addr)) && l.contains("managed"))
        {
            have.push(format!("neighbor {}", b.name));
        }
    }
    let reserved = text(
        topo.lb
            .ns
            .exec(&["sysctl", "-n", "net.ipv4.ip_local_reserved_ports"])?,
    );
    if reserved.trim() == "10000-32767" {
        have.push("reserved ports".into());
    }
    let dir = lb_user::dataplane::pin_dir(&topo.instance);
    for iface in &topo.lb.ifaces {
        if dir.join(format!("link_{iface}")).exists() {
            have.push(format!("link {iface}"));
        }
    }
    Ok(have)
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn an_agent_that_errors_or_panics_after_ready_leaves_the_data_path_forwarding_for_the_next(
) -> Result<()> {
    let topo = Topology::two_armed("crash")?;
    let _sims = topo.start_sims(&["master", "slave", "slave"])?;
    let server = echo(
        &topo.backends[0].ns,
        SocketAddrV4::new(topo.backends[0].addr, ECHO_PORT),
    )?;
    // The fault is injected into the agent's main loop at its third tick (about 2 s after
    // ready): first an error returned from the loop (as a failed map write would), then a
    // panic in a second agent.
    let faults = [
        (
            "error",
            "2*off->return(a map write failed)",
            "injected failure: a map write failed",
        ),
        ("panic", "2*off->panic(injected panic)", "injected panic"),
    ];
    let vip = SocketAddr::V4(SocketAddrV4::new(topo.vip, 7680));
    let mut lb = topo.start_lb_env(
        &config(&topo, ""),
        &["--xdp-mode", "native"],
        &[("FAILPOINTS", &format!("agent-loop={}", faults[0].1))],
    )?;
    let expected = host_settings(&topo)?;
    ensure!(expected.len() == 7, "after ready: {expected:?}");
    let conn = topo
        .client
        .ns
        .run_in(|| TcpStream::connect_timeout(&vip, Duration::from_secs(5)))??;
    let stop = AtomicBool::new(false);
    let sent = thread::scope(|s| -> Result<u64> {
        let streamer = s.spawn(|| stream(conn, &stop));
        // A failed check ends the stream too: the scope waits for its thread.
        let _stop_on_exit = StopOnDrop(&stop);
        for (i, (kind, _, message)) in faults.iter().enumerate() {
            let t = Instant::now();
            let status = loop {
                if let Some(st) = lb.process.try_wait()? {
                    break st;
                }
                ensure!(
                    t.elapsed() < Duration::from_secs(10),
                    "the {kind} was not injected"
                );
                thread::sleep(Duration::from_millis(20));
            };
            ensure!(!status.success(), "the agent's {kind} exited with {status}");
            ensure!(lb.logs().contains(message), "{}", lb.logs());
            // Everything stays: the stream goes on, new connections are balanced, the host
            // keeps the VIP, the neighbor entries, the reserved ports and the pinned links.
            thread::sleep(Duration::from_millis(1500));
            ensure!(
                !streamer.is_finished(),
                "the stream ended after the agent's {kind}"
            );
            ensure!(
                host_settings(&topo)? == expected,
                "after the agent's {kind}: {:?}, was {expected:?}",
                host_settings(&topo)?
            );
            // A new connection still gets its handshake through (the echo server's backlog).
            topo.client
                .ns
                .run_in(|| TcpStream::connect_timeout(&vip, Duration::from_secs(3)))?
                .with_context(|| format!("a new connection after the agent's {kind}"))?;
            // A new agent adopts what the failed one left.
            let next = faults.get(i + 1).map(|f| format!("agent-loop={}", f.1));
            let env: Vec<(&str, &str)> = next.iter().map(|n| ("FAILPOINTS", n.as_str())).collect();
            lb = topo.start_lb_env(&config(&topo, ""), &["--xdp-mode", "native"], &env)?;
            ensure!(
                lb.logs().contains("adopting the running instance"),
                "after the {kind}: {}",
                lb.logs()
            );
        }
        thread::sleep(Duration::from_millis(1000));
        ensure!(
            !streamer.is_finished(),
            "the stream ended under the last agent"
        );
        stop.store(true, Ordering::Relaxed);
        streamer
            .join()
            .map_err(|_| anyhow::anyhow!("streamer panicked"))?
    })?;
    let received = server
        .join()
        .map_err(|_| anyhow::anyhow!("echo panicked"))??;
    // Every chunk sent through the failures and restarts came back intact (the stream's own
    // checks), and the backend got every byte.
    ensure!(
        sent > 20 * 4096 && received == sent,
        "sent {sent} bytes, the backend received {received}"
    );
    // Only `lb detach` undoes the host settings.
    lb.stop()?;
    ensure!(host_settings(&topo)? == expected);
    let mut detach = topo.lb.ns.command(lb_tests::harness::lb_bin());
    detach.args(["detach", "--instance", &topo.instance]);
    lb_tests::harness::ns::run(&mut detach)?;
    ensure!(
        host_settings(&topo)?.is_empty(),
        "after lb detach: {:?}",
        host_settings(&topo)?
    );
    Ok(())
}
