//! The simulator's HTTP role endpoints, auth, fault modes, staged transitions and control socket,
//! on loopback only (no root needed).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lb_tests::sim::control::SimControl;
use lb_tests::sim::http::GARBAGE;
use lb_tests::sim::{spawn_server, Auth, Mode, Role, SimConfig, SimHandle};

/// A parsed HTTP answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request with `Connection: close` semantics and reads the whole answer.
fn request(addr: SocketAddr, method: &str, path: &str, version: &str, extra: &str) -> Answer {
    let raw = raw_request(addr, method, path, version, extra);
    let text = String::from_utf8(raw).expect("utf-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("complete head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

fn raw_request(addr: SocketAddr, method: &str, path: &str, version: &str, extra: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "{method} {path} {version}\r\nHost: sim\r\nConnection: close\r\n{extra}\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    out
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let a = request(addr, "GET", path, "HTTP/1.1", "");
    (a.status, a.body)
}

async fn start(role: Role, auth: Option<Auth>) -> (SimHandle, SimControl, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("db01.sock");
    let mut cfg = SimConfig::loopback("db01", role);
    cfg.auth = auth;
    cfg.control = Some(sock.clone());
    let handle = spawn_server(cfg).await.unwrap();
    (handle, SimControl::new(sock), dir)
}

const HA: &str = "/db/manage/server/ha";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_endpoints_answer_like_neo4j_ha() {
    let (sim, ctl, _dir) = start(Role::Master, None).await;
    let expect: [(Role, [(u16, &str); 3]); 3] = [
        (
            Role::Master,
            [(200, "true"), (404, "false"), (200, "master")],
        ),
        (Role::Slave, [(404, "false"), (200, "true"), (200, "slave")]),
        (
            Role::Unknown,
            [(404, "UNKNOWN"), (404, "UNKNOWN"), (404, "UNKNOWN")],
        ),
    ];
    for (role, answers) in expect {
        ctl.set_role(role).unwrap();
        for (check, (status, body)) in ["master", "slave", "available"].iter().zip(answers) {
            let path = format!("{HA}/{check}");
            let a = request(sim.http_addr, "GET", &path, "HTTP/1.1", "");
            assert_eq!(
                (a.status, a.body.as_str()),
                (status, body),
                "GET {path} as {role}"
            );
            assert!(a.header("content-type").unwrap().starts_with("text/plain"));
            // HAProxy's check: HEAD over HTTP/1.0, same status, no body.
            let h = request(sim.http_addr, "HEAD", &path, "HTTP/1.0", "");
            assert_eq!(h.status, status, "HEAD {path} as {role}");
            assert_eq!(h.body, "", "HEAD has no body");
        }
    }
    let stats = ctl.stats().unwrap();
    assert_eq!(stats.checks[&format!("{HA}/master")], 6);
    assert_eq!(stats.checks[&format!("{HA}/available")], 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn causal_cluster_endpoints() {
    let (sim, ctl, _dir) = start(Role::Master, None).await;
    let cc = "/db/manage/server/causalclustering";
    let a = sim.http_addr;
    assert_eq!(get(a, &format!("{cc}/writable")), (200, "true".into()));
    assert_eq!(get(a, &format!("{cc}/read-only")), (404, "false".into()));
    assert_eq!(get(a, "/db/neo4j/cluster/available"), (200, "true".into()));
    ctl.set_role(Role::Slave).unwrap();
    assert_eq!(get(a, "/db/neo4j/cluster/writable"), (404, "false".into()));
    assert_eq!(get(a, "/db/system/cluster/read-only"), (200, "true".into()));
    ctl.set_role(Role::Unknown).unwrap();
    assert_eq!(get(a, &format!("{cc}/available")), (404, "false".into()));
    assert_eq!(get(a, "/nothing/here").0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_required_when_configured() {
    let auth = Auth {
        user: "neo4j".into(),
        password: "s3cret".into(),
    };
    let (sim, ctl, _dir) = start(Role::Master, Some(auth)).await;
    let path = format!("{HA}/master");
    let none = request(sim.http_addr, "HEAD", &path, "HTTP/1.0", "");
    assert_eq!(none.status, 401);
    assert_eq!(
        none.header("www-authenticate"),
        Some("Basic realm=\"Neo4j\"")
    );
    // base64("neo4j:wrong") and base64("neo4j:s3cret").
    let wrong = request(
        sim.http_addr,
        "GET",
        &path,
        "HTTP/1.0",
        "Authorization: Basic bmVvNGo6d3Jvbmc=\r\n",
    );
    assert_eq!(wrong.status, 401);
    let right = request(
        sim.http_addr,
        "GET",
        &path,
        "HTTP/1.0",
        "Authorization: Basic bmVvNGo6czNjcmV0\r\n",
    );
    assert_eq!((right.status, right.body.as_str()), (200, "true"));
    // Cleared at runtime: no header needed any more.
    assert!(!ctl.set_auth(None).unwrap().auth);
    assert_eq!(get(sim.http_addr, &path), (200, "true".into()));
    // Set at runtime.
    ctl.set_auth(Some("u:p".parse().unwrap())).unwrap();
    assert_eq!(get(sim.http_addr, &path).0, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_modes() {
    let (sim, ctl, _dir) = start(Role::Master, None).await;
    let path = format!("{HA}/master");

    ctl.set_mode(Mode::Status500).unwrap();
    assert_eq!(get(sim.http_addr, &path).0, 500);

    ctl.set_mode(Mode::Garbage).unwrap();
    let raw = raw_request(sim.http_addr, "HEAD", &path, "HTTP/1.0", "");
    assert_eq!(raw, GARBAGE);
    assert!(!raw.starts_with(b"HTTP/"));

    ctl.set_mode(Mode::Hang).unwrap();
    let mut hung = TcpStream::connect(sim.http_addr).unwrap();
    hung.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    write!(hung, "HEAD {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut buf = [0u8; 64];
    let err = hung
        .read(&mut buf)
        .expect_err("a hung server answers nothing");
    assert!(matches!(
        err.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));

    // Back to normal: new connections are answered, the hung one stays hung.
    ctl.set_mode(Mode::Normal).unwrap();
    assert_eq!(get(sim.http_addr, &path), (200, "true".into()));
    assert!(
        hung.read(&mut buf).is_err(),
        "still hung after the mode is cleared"
    );

    let stats = ctl.stats().unwrap();
    // 500, garbage, hang and normal: every request was read and counted.
    assert_eq!(stats.checks[&path], 4);
    assert_eq!(stats.mode, Mode::Normal);
}

/// A hung server counts a request whose line came in several segments (CI once saw 3 of 4: a
/// `write!` sends its pieces separately, and the first read held only "HEAD ").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_counts_a_request_line_sent_in_pieces() {
    let (sim, ctl, _dir) = start(Role::Master, None).await;
    let path = format!("{HA}/master");
    ctl.set_mode(Mode::Hang).unwrap();
    let mut hung = TcpStream::connect(sim.http_addr).unwrap();
    hung.set_nodelay(true).unwrap();
    for piece in ["HEAD ", path.as_str(), " HTTP/1.0\r\n\r\n"] {
        hung.write_all(piece.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let t0 = Instant::now();
    while !ctl.stats().unwrap().checks.contains_key(&path) && t0.elapsed() < Duration::from_secs(2)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(ctl.stats().unwrap().checks.get(&path), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_transition_runs_on_schedule() {
    let (sim, ctl, _dir) = start(Role::Master, None).await;
    let master = format!("{HA}/master");
    let slave = format!("{HA}/slave");
    let t0 = Instant::now();
    let stats = ctl
        .stage(&[
            (Role::Unknown, Duration::from_millis(800)),
            (Role::Slave, Duration::ZERO),
        ])
        .unwrap();
    assert_eq!(stats.role, Role::Unknown, "first step applies at once");
    assert_eq!(get(sim.http_addr, &master), (404, "UNKNOWN".into()));
    let mut became_slave = None;
    while t0.elapsed() < Duration::from_secs(5) {
        if get(sim.http_addr, &slave).0 == 200 {
            became_slave = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let at = became_slave.expect("became slave");
    assert!(at >= Duration::from_millis(800), "too early: {at:?}");
    assert!(at < Duration::from_millis(2000), "too late: {at:?}");
    assert_eq!(get(sim.http_addr, &master), (404, "false".into()));

    // A role set from outside cancels a running stage.
    ctl.stage(&[
        (Role::Unknown, Duration::from_millis(300)),
        (Role::Slave, Duration::ZERO),
    ])
    .unwrap();
    ctl.set_role(Role::Master).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(ctl.stats().unwrap().role, Role::Master);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_round_trip_and_async_client() {
    let (sim, ctl, _dir) = start(Role::Slave, None).await;
    let s = ctl.stats().unwrap();
    assert_eq!(
        (s.name.as_str(), s.role, s.mode),
        ("db01", Role::Slave, Mode::Normal)
    );
    assert_eq!((s.bolt_accepted, s.bolt_open, s.writes), (0, 0, 0));
    assert!(s.checks.is_empty());
    get(sim.http_addr, &format!("{HA}/slave"));
    let s = ctl.set_role_async(Role::Master).await.unwrap();
    assert_eq!(s.role, Role::Master);
    assert_eq!(s.checks[&format!("{HA}/slave")], 1);
    assert_eq!(s.http_accepted, 1);
    assert_eq!(ctl.stats_async().await.unwrap(), ctl.stats().unwrap());
    assert_eq!(sim.state.role(), Role::Master);
    // A malformed request is refused, and the socket keeps working.
    {
        use std::io::BufRead;
        let mut raw = std::os::unix::net::UnixStream::connect(&ctl.path).unwrap();
        raw.write_all(b"{\"cmd\":\"fly\"}\n").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&raw).read_line(&mut line).unwrap();
        assert!(line.contains("\"ok\":false"), "{line}");
    }
    assert_eq!(ctl.stats().unwrap().role, Role::Master);
    sim.shutdown().await.unwrap();
}

#[test]
fn binary_prints_ready_line_and_stops_on_sigterm() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("db02.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_neo4j-sim"))
        .args([
            "--name",
            "db02",
            "--http",
            "127.0.0.1:0",
            "--bolt",
            "127.0.0.1:0",
        ])
        .args(["--role", "slave", "--auth", "neo4j:pw", "--control"])
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // neo4j-sim db02 ready http=127.0.0.1:PORT bolt=127.0.0.1:PORT
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&words[..3], ["neo4j-sim", "db02", "ready"], "{line}");
    let http: SocketAddr = words[3].strip_prefix("http=").unwrap().parse().unwrap();
    assert!(words[4].starts_with("bolt=127.0.0.1:"));
    let a = request(
        http,
        "HEAD",
        &format!("{HA}/slave"),
        "HTTP/1.0",
        "Authorization: Basic bmVvNGo6cHc=\r\n",
    );
    assert_eq!(a.status, 200);
    let ctl = SimControl::new(&sock);
    assert_eq!(ctl.stats().unwrap().role, Role::Slave);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let t0 = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
    assert!(!sock.exists(), "control socket removed on exit");
}
