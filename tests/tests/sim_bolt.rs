//! The simulator's Bolt server: a Rust client round trip on loopback, and (when `LB_PYTHON` names an
//! interpreter with the official `neo4j` driver) the driver probe of tests/py/driver_probe.py.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use lb_tests::sim::bolt::{tag, Version};
use lb_tests::sim::bolt_client::{Access, BoltClient, BoltFailure, Negotiation};
use lb_tests::sim::packstream::{map, Value};
use lb_tests::sim::{spawn_server, Auth, Role, SimConfig, SimHandle};

async fn start(role: Role, auth: Option<Auth>) -> SimHandle {
    let mut cfg = SimConfig::loopback("db01", role);
    cfg.auth = auth;
    spawn_server(cfg).await.unwrap()
}

/// Runs blocking client code off the runtime's worker threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn failure_code(err: &anyhow::Error) -> String {
    err.downcast_ref::<BoltFailure>()
        .unwrap_or_else(|| panic!("not a Bolt FAILURE: {err:#}"))
        .code
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_round_trip_both_negotiations() {
    let sim = start(Role::Master, None).await;
    let addr = sim.bolt_addr;
    blocking(move || {
        for (negotiation, expected) in [
            (Negotiation::Classic, Version(5, 8)),
            (Negotiation::Manifest, Version(5, 8)),
        ] {
            let mut c = BoltClient::connect(addr, negotiation, None).unwrap();
            assert_eq!(c.version, expected);
            let hello = c.hello.as_map().unwrap();
            assert_eq!(hello["server"].as_str(), Some("Neo4j/5.20.0"));
            assert!(hello["connection_id"]
                .as_str()
                .unwrap()
                .starts_with("bolt-"));
            let r = c.run("RETURN 1", Access::Write).unwrap();
            assert_eq!((r.server.as_str(), r.role.as_str()), ("db01", "master"));
            let before = r.writes;
            assert_eq!(c.run("RETURN 1", Access::Write).unwrap().writes, before + 1);
            assert_eq!(c.run("RETURN 1", Access::Read).unwrap().writes, before + 1);
            c.goodbye().unwrap();
        }
    })
    .await;
    let stats = sim.state.stats();
    assert_eq!(stats.writes, 4);
    assert_eq!(stats.bolt_accepted, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_on_slave_fails_not_a_leader_until_reset() {
    let sim = start(Role::Slave, None).await;
    let addr = sim.bolt_addr;
    blocking(move || {
        let mut c = BoltClient::connect(addr, Negotiation::Manifest, None).unwrap();
        let err = c.run("CREATE ()", Access::Write).unwrap_err();
        assert_eq!(failure_code(&err), "Neo.ClientError.Cluster.NotALeader");
        // Failed: everything is IGNORED until RESET.
        let err = c.run("RETURN 1", Access::Read).unwrap_err();
        assert!(err.to_string().contains("IGNORED"), "{err:#}");
        c.reset().unwrap();
        let r = c.run("RETURN 1", Access::Read).unwrap();
        assert_eq!((r.role.as_str(), r.writes), ("slave", 0));
    })
    .await;
    assert_eq!(sim.state.stats().writes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_count_writes_per_run_and_commit_returns_a_bookmark() {
    let sim = start(Role::Master, None).await;
    let addr = sim.bolt_addr;
    blocking(move || {
        let mut c = BoltClient::connect(addr, Negotiation::Classic, None).unwrap();
        c.summary(Value::Struct(tag::BEGIN, vec![map::<&str, Value>([])]))
            .unwrap();
        for qid in 0..2 {
            let meta = c
                .summary(Value::Struct(
                    tag::RUN,
                    vec![
                        Value::from("CREATE ()"),
                        map::<&str, Value>([]),
                        map::<&str, Value>([]),
                    ],
                ))
                .unwrap();
            assert_eq!(meta.as_map().unwrap()["qid"], Value::Int(qid));
        }
        // Pull the first result by qid, discard the second.
        let (records, _) = c
            .exchange(Value::Struct(
                tag::PULL,
                vec![map([("n", Value::Int(-1)), ("qid", Value::Int(0))])],
            ))
            .unwrap();
        assert_eq!(records[0][1], Value::Int(1));
        c.summary(Value::Struct(
            tag::DISCARD,
            vec![map([("n", Value::Int(-1))])],
        ))
        .unwrap();
        let commit = c.summary(Value::Struct(tag::COMMIT, vec![])).unwrap();
        assert!(commit.as_map().unwrap()["bookmark"]
            .as_str()
            .unwrap()
            .starts_with("FB:"));
        // A read transaction on a master does not count.
        c.summary(Value::Struct(tag::BEGIN, vec![map([("mode", "r")])]))
            .unwrap();
        let r = c.run("RETURN 1", Access::Write).unwrap();
        assert_eq!(r.writes, 2, "BEGIN's mode wins over RUN's");
        c.summary(Value::Struct(tag::ROLLBACK, vec![])).unwrap();
    })
    .await;
    assert_eq!(sim.state.stats().writes, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_route_and_telemetry() {
    let auth = Auth {
        user: "neo4j".into(),
        password: "pw".into(),
    };
    let sim = start(Role::Master, Some(auth)).await;
    let addr = sim.bolt_addr;
    let state = sim.state.clone();
    blocking(move || {
        let err = BoltClient::connect(addr, Negotiation::Manifest, Some(("neo4j", "nope")))
            .err()
            .unwrap();
        assert_eq!(failure_code(&err), "Neo.ClientError.Security.Unauthorized");
        let mut c =
            BoltClient::connect(addr, Negotiation::Manifest, Some(("neo4j", "pw"))).unwrap();
        c.summary(Value::Struct(tag::TELEMETRY, vec![Value::Int(0)]))
            .unwrap();
        let route = Value::Struct(
            tag::ROUTE,
            vec![
                map::<&str, Value>([]),
                Value::List(vec![]),
                map([("db", "neo4j")]),
            ],
        );
        let rt = c.summary(route.clone()).unwrap();
        let rt = rt.as_map().unwrap()["rt"].as_map().unwrap().clone();
        let Value::List(servers) = &rt["servers"] else {
            panic!("servers")
        };
        let roles: Vec<&str> = servers
            .iter()
            .map(|s| s.as_map().unwrap()["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["WRITE", "READ", "ROUTE"]);
        assert_eq!(
            servers[0].as_map().unwrap()["addresses"],
            Value::List(vec![Value::from(addr.to_string())])
        );
        state.set_role(Role::Unknown);
        let err = c.summary(route).unwrap_err();
        assert_eq!(
            failure_code(&err),
            "Neo.TransientError.General.DatabaseUnavailable"
        );
        assert_eq!(state.stats().bolt_open, 1);
    })
    .await;
}

/// The official Python driver through tests/py/driver_probe.py; skipped unless `LB_PYTHON` is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_driver() {
    let Some(python) = std::env::var_os("LB_PYTHON") else {
        println!(
            "skipped: set LB_PYTHON to a python with the neo4j driver (tests/py/requirements.txt)"
        );
        return;
    };
    let probe = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py/driver_probe.py");
    let run = move |addr: SocketAddr, mode: &str| -> (i32, serde_json::Value) {
        let out = Command::new(&python)
            .arg(&probe)
            .arg(format!("bolt://{addr}"))
            .arg(mode)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "probe output {stdout:?} ({e}); stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap_or(-1), json)
    };
    let master = start(Role::Master, None).await;
    let mut slave_cfg = SimConfig::loopback("db02", Role::Slave);
    slave_cfg.auth = None;
    let slave = spawn_server(slave_cfg).await.unwrap();
    let (m, s) = (master.bolt_addr, slave.bolt_addr);
    blocking(move || {
        let (rc, first) = run(m, "write");
        assert_eq!(rc, 0, "{first}");
        assert_eq!(first["server"], "db01");
        assert_eq!(first["role"], "master");
        assert_eq!(first["writes"], 1);
        assert_eq!(first["bolt"], "5.8");
        let (_, second) = run(m, "write");
        assert_eq!(second["writes"], 2, "a write increments the counter");

        let (rc, read) = run(s, "read");
        assert_eq!(rc, 0, "{read}");
        assert_eq!(
            (read["server"].as_str(), read["role"].as_str()),
            (Some("db02"), Some("slave"))
        );

        let (rc, refused) = run(s, "write");
        assert_eq!(rc, 1, "{refused}");
        assert_eq!(refused["code"], "Neo.ClientError.Cluster.NotALeader");
        // The direct driver reports WriteServiceUnavailable raised while handling NotALeader.
        assert!(refused["chain"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "NotALeader"));
    })
    .await;
    assert_eq!(master.state.stats().writes, 2);
    assert_eq!(slave.state.stats().writes, 0);
}
