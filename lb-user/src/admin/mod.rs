//! The admin HTTP server, lb's `listen admin` / `stats enable`: bound to `[admin] listen`
//! (default 127.0.0.1:8080), optional Basic auth on every route.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /`, `/stats`, `/haproxy?stats` | HTML dashboard ([`dashboard`]) |
//! | `GET /stats.json` | the stats document ([`model::StatsDoc`]) |
//! | `GET /;csv`, `/stats;csv`, `/haproxy?stats;csv` | HAProxy CSV ([`csv`]) |
//! | `GET /metrics` | Prometheus text format ([`metrics`]) |
//! | `POST /api/server/NAME/drain\|disable\|enable` | operator override, like `lb server` |
//!
//! Counters are read from the pinned maps on each request; a background task samples them
//! every second so that rates cover the last window, not the time since start. The NIC's XDP
//! counters come from `ethtool -S` per attached interface, read at most once a second
//! ([`crate::nic::Cache`]).
pub mod csv;
pub mod dashboard;
pub mod metrics;
pub mod model;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    header::{self, HeaderMap, HeaderValue},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode, Uri,
};
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::{
    config::{AdminConfig, Config},
    health::spec::BasicAuth,
    live::Live,
    nic,
    ops::{parse_admin, OpRequest},
    status,
};
use model::{Sample, Sampler, Static, StatsDoc};

/// Reads the counters now (the pinned maps in the agent; a stub in tests).
pub type CounterSource = Arc<dyn Fn() -> Result<Sample> + Send + Sync>;

/// Everything a request needs.
pub struct State {
    pub live: Live,
    pub statics: Static,
    pub auth: Option<BasicAuth>,
    pub ops: mpsc::Sender<OpRequest>,
    pub sampler: Mutex<Sampler>,
    pub counters: CounterSource,
    /// The attached interfaces' XDP counters, cached.
    pub nic: nic::Cache,
    /// The operator API is on (`[admin] operations = true`); off, every POST is refused.
    pub operations: bool,
}

/// Most connections the admin server serves at once: further ones wait in the kernel's accept
/// queue, so that idle or slow clients can never take the agent's file descriptors (which its
/// health checks need).
pub const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this (also the longest a keep-alive connection
/// waits for its next request).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest one connection is served.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts the admin server of the running agent (nothing if `[admin] listen = "off"`).
/// Binding happens here, so an address in use is a startup error. Returns the bound address.
pub fn spawn(cfg: &Config, live: Live, ops: mpsc::Sender<OpRequest>) -> Result<Option<SocketAddr>> {
    let instance = cfg.instance.clone();
    let counters: CounterSource = Arc::new(move || {
        let s = status::snapshot(&instance)?;
        Ok(Sample::from_snapshot(&s, Instant::now()))
    });
    start(
        &cfg.admin,
        Static::new(cfg),
        live,
        ops,
        counters,
        nic::ethtool_source(),
    )
}

/// [`spawn`] with the counter sources given (tests).
pub fn start(
    acfg: &AdminConfig,
    statics: Static,
    live: Live,
    ops: mpsc::Sender<OpRequest>,
    counters: CounterSource,
    nic_source: nic::Source,
) -> Result<Option<SocketAddr>> {
    let Some(addr) = acfg.listen else {
        info!("admin server off ([admin] listen = \"off\")");
        return Ok(None);
    };
    let std_listener = std::net::TcpListener::bind(addr).with_context(|| {
        format!("admin server: cannot listen on {addr} (change or turn off with [admin] listen = \"ADDRESS:PORT\" or \"off\")")
    })?;
    std_listener
        .set_nonblocking(true)
        .context("admin server: non-blocking socket")?;
    let listener = tokio::net::TcpListener::from_std(std_listener)
        .context("admin server: register the socket with the runtime")?;
    let bound = listener
        .local_addr()
        .context("admin server: local address")?;
    let state = Arc::new(State {
        live,
        statics,
        auth: acfg.auth.clone(),
        ops,
        sampler: Mutex::new(Sampler::default()),
        counters,
        nic: nic::Cache::new(nic_source),
        operations: acfg.operations,
    });
    info!(
        listen = %bound,
        auth = if acfg.auth.is_some() { "basic" } else { "none" },
        "admin server: dashboard at http://{bound}/ (also /haproxy?stats), /stats.json, /;csv, /metrics"
    );
    tokio::spawn(sample_loop(state.clone()));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            // A free slot first, then the next connection: at most MAX_CONNECTIONS sockets.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!("admin server: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let state = state.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(&state, req).await) }
                });
                let conn = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), svc);
                match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!("admin server: connection from {peer}: {e}"),
                    Err(_) => debug!(
                        "admin server: connection from {peer} closed after {CONNECTION_TIMEOUT:?}"
                    ),
                }
            });
        }
    });
    Ok(Some(bound))
}

/// Samples the counters every [`model::SAMPLE_EVERY`] for the rates.
async fn sample_loop(state: Arc<State>) {
    let mut tick = tokio::time::interval(model::SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let source = state.counters.clone();
        match tokio::task::spawn_blocking(move || source()).await {
            Ok(Ok(s)) => {
                failing = false;
                if let Ok(mut sampler) = state.sampler.lock() {
                    sampler.push(s);
                }
            }
            Ok(Err(e)) => {
                if !failing {
                    debug!("admin server: counters not readable yet: {e:#}");
                }
                failing = true;
            }
            Err(e) => warn!("admin server: sampling task: {e}"),
        }
    }
}

type Resp = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn text(status: StatusCode, body: impl Into<String>) -> Resp {
    respond(status, "text/plain; charset=utf-8", body.into())
}

fn json_message(status: StatusCode, ok: bool, message: &str) -> Resp {
    let body = serde_json::json!({ "ok": ok, "message": message }).to_string();
    respond(status, "application/json", body)
}

/// Whether the request carries the configured credentials (always true without auth).
pub fn authorized(auth: Option<&BasicAuth>, headers: &HeaderMap) -> bool {
    let Some(auth) = auth else { return true };
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, b64)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
        return false;
    };
    let expected = format!("{}:{}", auth.user, auth.password);
    constant_time_eq(&given, expected.as_bytes())
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

/// Without credentials to check, an operation must name this server by address (`Host` an IP
/// address or `localhost`): a page whose own name was re-pointed at the server (DNS rebinding)
/// sends its name.
fn host_is_an_address(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// A cross-site POST from a browser (its `Origin` is not this server) is refused, so a page
/// elsewhere cannot drain backends with the operator's cached credentials.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(origin);
    !host.is_empty() && origin_host.eq_ignore_ascii_case(host)
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Dashboard,
    Json,
    Csv,
    Metrics,
    Op { backend: String, action: String },
    NotFound,
}

/// Routes HAProxy's URLs too: `/haproxy?stats`, `/haproxy?stats;csv`, `/;csv`.
pub fn route(method: &Method, uri: &Uri) -> Route {
    let path = uri.path();
    let query = uri.query().unwrap_or("");
    if method == Method::POST {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        return match parts.as_slice() {
            ["api", "server", name, action] if !name.is_empty() => Route::Op {
                backend: percent_decode(name),
                action: action.to_string(),
            },
            _ => Route::NotFound,
        };
    }
    let csv = path.ends_with(";csv") || query.split(';').any(|x| x == "csv");
    let base = path.trim_end_matches(";csv");
    match base {
        "/" | "" | "/stats" | "/haproxy" if csv => Route::Csv,
        "/" | "/stats" | "/haproxy" => Route::Dashboard,
        "/stats.json" => Route::Json,
        "/metrics" => Route::Metrics,
        _ => Route::NotFound,
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The stats document now: live view, counters read now, rates over the last window, the
/// NIC's XDP counters of the last second.
pub async fn document(state: &State) -> Result<StatsDoc> {
    let source = state.counters.clone();
    let now = tokio::task::spawn_blocking(move || source())
        .await
        .context("counter read task")?
        .map_err(|e| format!("{e:#}"));
    let ifaces = state
        .live
        .read()
        .map_err(|_| anyhow::anyhow!("live view lock poisoned"))?
        .ifaces
        .clone();
    let nic = state.nic.get(&ifaces).await;
    let live = state
        .live
        .read()
        .map_err(|_| anyhow::anyhow!("live view lock poisoned"))?
        .snapshot();
    let sampler = state
        .sampler
        .lock()
        .map_err(|_| anyhow::anyhow!("sampler lock poisoned"))?;
    let mut doc = model::build(
        &live,
        &state.statics,
        now.as_ref().map_err(|e| e.clone()),
        sampler.window(),
        nic,
    );
    // The pair's streams publish their own status (a file the agent's pair thread writes).
    doc.pair = crate::pair::read_status(&doc.instance).map(|(p, _)| p);
    Ok(doc)
}

/// Answers one request (auth first, on every route).
pub async fn handle<B>(state: &State, req: Request<B>) -> Resp {
    if !authorized(state.auth.as_ref(), req.headers()) {
        let mut r = text(StatusCode::UNAUTHORIZED, "401 Unauthorized\n");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"lb\""),
        );
        return r;
    }
    let route = route(req.method(), req.uri());
    let is_get = req.method() == Method::GET || req.method() == Method::HEAD;
    match route {
        Route::Op { backend, action } => {
            if !state.operations {
                return json_message(
                    StatusCode::FORBIDDEN,
                    false,
                    "read-only: the operator API is off ([admin] operations = true, HAProxy's `stats admin`, turns it on; `lb server` works on the host)",
                );
            }
            if !same_origin(req.headers()) {
                return json_message(StatusCode::FORBIDDEN, false, "cross-origin request refused");
            }
            if state.auth.is_none() && !host_is_an_address(req.headers()) {
                return json_message(
                    StatusCode::FORBIDDEN,
                    false,
                    "without [admin] user, operations must address the server by IP address or localhost",
                );
            }
            op(state, backend, &action).await
        }
        Route::NotFound => text(
            StatusCode::NOT_FOUND,
            "not found: try /, /stats.json, /;csv, /metrics\n",
        ),
        _ if !is_get => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        r => match document(state).await {
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")),
            Ok(doc) => match r {
                Route::Dashboard => respond(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    dashboard::page(&doc),
                ),
                Route::Json => match serde_json::to_string_pretty(&doc) {
                    Ok(j) => respond(StatusCode::OK, "application/json", j),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                },
                Route::Csv => respond(
                    StatusCode::OK,
                    "text/plain; charset=utf-8",
                    csv::encode_doc(&doc),
                ),
                _ => match metrics::encode_doc(&doc) {
                    Ok(m) => respond(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        m,
                    ),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")),
                },
            },
        },
    }
}

/// Sends an operator request to the map owner's loop and returns its answer.
async fn op(state: &State, backend: String, action: &str) -> Resp {
    let admin = match parse_admin(action) {
        Ok(a) => a,
        Err(e) => return json_message(StatusCode::BAD_REQUEST, false, &format!("{e:#}")),
    };
    let (reply, rx) = oneshot::channel();
    if state
        .ops
        .send(OpRequest {
            backend: backend.clone(),
            admin,
            reply,
        })
        .await
        .is_err()
    {
        return json_message(
            StatusCode::SERVICE_UNAVAILABLE,
            false,
            "the agent is stopping",
        );
    }
    match tokio::time::timeout(Duration::from_secs(10), rx).await {
        Ok(Ok(Ok(m))) => {
            info!(backend, action, "admin server: operator request applied");
            json_message(StatusCode::OK, true, &m)
        }
        Ok(Ok(Err(e))) => json_message(StatusCode::BAD_REQUEST, false, &e),
        Ok(Err(_)) => json_message(
            StatusCode::SERVICE_UNAVAILABLE,
            false,
            "the agent is stopping",
        ),
        Err(_) => json_message(
            StatusCode::GATEWAY_TIMEOUT,
            false,
            "no answer from the agent within 10s",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::model::tests::{live, nic, sample, statics};
    use crate::live::Admin;
    use http_body_util::BodyExt;
    use std::sync::RwLock;

    fn state(auth: Option<BasicAuth>) -> (Arc<State>, mpsc::Receiver<OpRequest>) {
        let (tx, rx) = mpsc::channel(4);
        let counters: CounterSource = Arc::new(|| Ok(sample(Instant::now(), 42)));
        (
            Arc::new(State {
                live: Arc::new(RwLock::new(live())),
                statics: statics(),
                auth,
                ops: tx,
                sampler: Mutex::new(Sampler::default()),
                counters,
                nic: nic::Cache::new(stub_nic()),
                operations: true,
            }),
            rx,
        )
    }

    fn stub_nic() -> nic::Source {
        Arc::new(|_| Box::pin(async { nic() }))
    }

    fn req(method: Method, uri: &str, auth: Option<&str>) -> Request<()> {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, "127.0.0.1:8080");
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(()).unwrap()
    }

    async fn body(r: Resp) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    fn basic(user: &str, pw: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
        )
    }

    #[test]
    fn routes_include_haproxys_urls() {
        let r = |m: Method, u: &str| route(&m, &u.parse().unwrap());
        assert_eq!(r(Method::GET, "/"), Route::Dashboard);
        assert_eq!(r(Method::GET, "/haproxy?stats"), Route::Dashboard);
        assert_eq!(r(Method::GET, "/stats"), Route::Dashboard);
        assert_eq!(r(Method::GET, "/haproxy?stats;csv"), Route::Csv);
        assert_eq!(r(Method::GET, "/haproxy?stats;csv;norefresh"), Route::Csv);
        assert_eq!(r(Method::GET, "/;csv"), Route::Csv);
        assert_eq!(r(Method::GET, "/stats;csv"), Route::Csv);
        assert_eq!(r(Method::GET, "/stats.json"), Route::Json);
        assert_eq!(r(Method::GET, "/metrics"), Route::Metrics);
        assert_eq!(r(Method::GET, "/nope"), Route::NotFound);
        assert_eq!(
            r(Method::POST, "/api/server/db%2001/drain"),
            Route::Op {
                backend: "db 01".into(),
                action: "drain".into()
            }
        );
        assert_eq!(r(Method::POST, "/api/server//drain"), Route::NotFound);
    }

    #[tokio::test]
    async fn basic_auth_guards_every_route() {
        let auth = BasicAuth {
            user: "ops".into(),
            password: "pa55-w0rd".into(),
        };
        let (st, _rx) = state(Some(auth));
        for uri in [
            "/",
            "/haproxy?stats",
            "/stats.json",
            "/;csv",
            "/metrics",
            "/nope",
        ] {
            let r = handle(&st, req(Method::GET, uri, None)).await;
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{uri}");
            assert_eq!(
                r.headers().get(header::WWW_AUTHENTICATE).unwrap(),
                "Basic realm=\"lb\""
            );
            let wrong = basic("ops", "pa55-w0rD");
            let r = handle(&st, req(Method::GET, uri, Some(&wrong))).await;
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{uri}");
            let b = body(r).await;
            assert!(!b.contains("pa55"), "{b}");
        }
        for bad in [
            basic("op", "pa55-w0rd"),
            basic("ops", "pa55-w0rd2"),
            basic("ops", ""),
            "Bearer x".into(),
            "Basic !!!".into(),
        ] {
            let r = handle(&st, req(Method::GET, "/stats.json", Some(&bad))).await;
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{bad}");
        }
        let good = basic("ops", "pa55-w0rd");
        for uri in ["/", "/haproxy?stats", "/stats.json", "/;csv", "/metrics"] {
            let r = handle(&st, req(Method::GET, uri, Some(&good))).await;
            assert_eq!(r.status(), StatusCode::OK, "{uri}");
            assert!(!body(r).await.contains("pa55-w0rd"), "{uri}");
        }
        let r = handle(&st, req(Method::POST, "/api/server/db01/drain", None)).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn without_auth_everything_answers() {
        let (st, _rx) = state(None);
        let r = handle(&st, req(Method::GET, "/stats.json", None)).await;
        assert_eq!(r.status(), StatusCode::OK);
        let j: serde_json::Value = serde_json::from_str(&body(r).await).unwrap();
        assert_eq!(j["services"][0]["counters"]["new_flows"], 42);
        assert_eq!(j["nic"][0]["counters"]["rx_xdp_packets"], 42);
        let r = handle(&st, req(Method::GET, "/;csv", None)).await;
        assert!(body(r).await.starts_with("# pxname,svname,"));
        let r = handle(&st, req(Method::GET, "/metrics", None)).await;
        let m = body(r).await;
        assert!(m.contains("lb_service_new_flows_total{service=\"write\"} 42"));
        assert!(
            m.contains("lb_nic_xdp_total{iface=\"veth0\",counter=\"rx_xdp_packets\"} 42"),
            "{m}"
        );
        assert!(
            !m.contains("rx_queue_"),
            "per-queue detail in /metrics: {m}"
        );
        let r = handle(&st, req(Method::GET, "/", None)).await;
        assert!(body(r).await.contains("<!DOCTYPE html>"));
        let r = handle(&st, req(Method::DELETE, "/", None)).await;
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn the_operator_api_is_off_unless_operations_are_enabled() {
        let (st, _rx) = state(None);
        let mut st = Arc::try_unwrap(st).ok().unwrap();
        st.operations = false;
        let st = Arc::new(st);
        let r = handle(&st, req(Method::POST, "/api/server/db01/disable", None)).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(body(r).await.contains("read-only"));
        // Reading stays open.
        let r = handle(&st, req(Method::GET, "/stats.json", None)).await;
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn without_auth_an_operation_must_name_the_server_by_address_not_a_rebound_name() {
        let (st, mut rx) = state(None);
        let owner = tokio::spawn(async move {
            let op = rx.recv().await.unwrap();
            let _ = op.reply.send(Ok(format!("{}: Drain", op.backend)));
        });
        // A page of evil.example whose name now points at the server: same origin for the
        // browser, but its Host is a name.
        let mut rebound = req(Method::POST, "/api/server/db01/drain", None);
        for (h, v) in [
            (header::HOST, "evil.example:8080"),
            (header::ORIGIN, "http://evil.example:8080"),
        ] {
            rebound.headers_mut().insert(h, HeaderValue::from_static(v));
        }
        let r = handle(&st, rebound).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(body(r).await.contains("by IP address or localhost"));
        for host in ["localhost:8080", "[::1]:8080", "127.0.0.1"] {
            assert!(host_is_an_address(&HeaderMap::from_iter([(
                header::HOST,
                HeaderValue::from_static(host)
            )])));
        }
        assert!(!host_is_an_address(&HeaderMap::new()));
        // By address, from curl (no Origin): served.
        let r = handle(&st, req(Method::POST, "/api/server/db01/drain", None)).await;
        assert_eq!(r.status(), StatusCode::OK);
        owner.await.unwrap();
    }

    #[tokio::test]
    async fn operator_requests_go_to_the_map_owner_and_back() {
        let (st, mut rx) = state(None);
        let owner = tokio::spawn(async move {
            let op = rx.recv().await.unwrap();
            assert_eq!((op.backend.as_str(), op.admin), ("db02", Admin::Drain));
            let _ = op.reply.send(Ok("db02: Drain".into()));
            let op = rx.recv().await.unwrap();
            let _ = op.reply.send(Err("no backend \"db09\"".into()));
        });
        let r = handle(&st, req(Method::POST, "/api/server/db02/drain", None)).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(body(r).await.contains("db02: Drain"));
        let r = handle(&st, req(Method::POST, "/api/server/db09/enable", None)).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let r = handle(&st, req(Method::POST, "/api/server/db01/explode", None)).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let mut cross = req(Method::POST, "/api/server/db01/drain", None);
        cross.headers_mut().insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        cross
            .headers_mut()
            .insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert_eq!(handle(&st, cross).await.status(), StatusCode::FORBIDDEN);
        owner.await.unwrap();
    }

    #[tokio::test]
    async fn the_server_listens_and_an_address_in_use_is_a_clear_error() {
        let (tx, _rx) = mpsc::channel(1);
        let counters: CounterSource = Arc::new(|| Ok(sample(Instant::now(), 7)));
        let acfg = AdminConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..AdminConfig::default()
        };
        let live: Live = Arc::new(RwLock::new(live()));
        let addr = start(
            &acfg,
            statics(),
            live.clone(),
            tx.clone(),
            counters.clone(),
            stub_nic(),
        )
        .unwrap()
        .unwrap();
        let got = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /haproxy?stats;csv HTTP/1.0\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .await
        .unwrap();
        assert!(got.starts_with("HTTP/1.0 200 OK"), "{got}");
        assert!(got.contains("\r\n\r\n# pxname,svname,"), "{got}");
        let taken = AdminConfig {
            listen: Some(addr),
            ..AdminConfig::default()
        };
        let e = start(&taken, statics(), live, tx, counters, stub_nic()).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains(&format!("admin server: cannot listen on {addr}")) && e.contains("in use"),
            "{e}"
        );
        let off = AdminConfig {
            listen: None,
            ..AdminConfig::default()
        };
        let (tx, _rx) = mpsc::channel(1);
        let live: Live = Arc::new(RwLock::new(crate::admin::model::tests::live()));
        assert_eq!(
            start(
                &off,
                statics(),
                live,
                tx,
                Arc::new(|| anyhow::bail!("unused")),
                stub_nic(),
            )
            .unwrap(),
            None
        );
    }
}
