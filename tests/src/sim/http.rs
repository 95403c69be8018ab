//! The HTTP management port: Neo4j 3.x HA role endpoints (and the 4.x/5.x cluster ones), optional
//! Basic auth, per-path request counting and the fault modes `hang`, `status500` and `garbage`.
//!
//! Endpoints (GET or HEAD; HEAD gets the same status and headers without a body):
//! - `/db/manage/server/ha/master`: master 200 `true`, slave 404 `false`, unknown 404 `UNKNOWN`;
//! - `/db/manage/server/ha/slave`: slave 200 `true`, master 404 `false`, unknown 404 `UNKNOWN`;
//! - `/db/manage/server/ha/available`: master 200 `master`, slave 200 `slave`, unknown 404 `UNKNOWN`;
//! - `/db/manage/server/causalclustering/{writable,read-only,available}` and
//!   `/db/{name}/cluster/{writable,read-only,available}`: 200 `true` when the member is the
//!   writer / a reader / settled, else 404 `false`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::{Auth, Mode, Role, SimState};

/// What the `garbage` mode writes instead of an HTTP response.
pub const GARBAGE: &[u8] = b"\x00\xff\xfeSIM-GARBAGE this is not HTTP\x01\x02\x03\n";

/// Accepts HTTP connections until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    state: Arc<SimState>,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: keep the listener, retry shortly.
                tracing::warn!("HTTP accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        state.count_http_accept();
        let state = state.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                res = connection(stream, state) => {
                    if let Err(e) = res {
                        tracing::debug!("HTTP connection ended: {e:#}");
                    }
                }
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
        });
    }
}

/// Serves one connection according to the mode in force when it was accepted.
async fn connection(stream: TcpStream, state: Arc<SimState>) -> Result<()> {
    match state.mode() {
        Mode::Hang => hang(stream, &state).await,
        Mode::Garbage => garbage(stream, &state).await,
        Mode::Normal | Mode::Status500 => {
            let svc_state = state.clone();
            let service = hyper::service::service_fn(move |req| {
                let state = svc_state.clone();
                async move { respond(&state, req).await }
            });
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
                .context("serving HTTP connection")
        }
    }
}

/// `hang`: reads (and counts) the request, never answers; returns when the client closes.
///
/// The request line may arrive in several segments (a client writing it piecewise): it is
/// counted once its line end is in, not judged by the first read.
async fn hang(mut stream: TcpStream, state: &SimState) -> Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut head = Vec::new();
    let mut counted = false;
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .context("reading hung request")?;
        if n == 0 {
            return Ok(());
        }
        if counted {
            continue;
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(path) = request_path(&head) {
            state.count_check(&path);
            counted = true;
        } else if head.len() >= 16 * 1024 {
            // No request line in 16 KiB: not a request, nothing to count.
            counted = true;
        }
    }
}

/// `garbage`: reads the request head (at most 2 s), writes non-HTTP bytes, closes.
async fn garbage(mut stream: TcpStream, state: &SimState) -> Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), read_head).await;
    if let Some(path) = request_path(&head) {
        state.count_check(&path);
    }
    stream.write_all(GARBAGE).await.context("writing garbage")?;
    stream.shutdown().await.context("closing after garbage")?;
    Ok(())
}

/// The path of the request line at the start of `head`, without the query string.
fn request_path(head: &[u8]) -> Option<String> {
    let line_end = head.iter().position(|&b| b == b'\r' || b == b'\n')?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?;
    let target = line.split(' ').nth(1)?;
    Some(target.split('?').next().unwrap_or(target).to_string())
}

/// Answers one parsed request in `normal` or `status500` mode (or hangs / aborts if the mode changed
/// on a kept-alive connection).
async fn respond(
    state: &SimState,
    req: Request<Incoming>,
) -> std::result::Result<Response<Full<Bytes>>, std::io::Error> {
    let path = req.uri().path().to_string();
    state.count_check(&path);
    match state.mode() {
        Mode::Hang => std::future::pending().await,
        Mode::Garbage => {
            return Err(std::io::Error::other(
                "garbage mode: dropping kept-alive connection",
            ))
        }
        Mode::Status500 => {
            return Ok(text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal Server Error",
            ))
        }
        Mode::Normal => {}
    }
    if let Some(auth) = state.auth() {
        if !authorized(&req, &auth) {
            let mut resp = Response::new(Full::new(Bytes::from_static(
                br#"{"errors":[{"code":"Neo.ClientError.Security.Unauthorized","message":"No authentication header supplied."}]}"#,
            )));
            *resp.status_mut() = StatusCode::UNAUTHORIZED;
            resp.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"Neo4j\""),
            );
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=UTF-8"),
            );
            return Ok(resp);
        }
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed"));
    }
    Ok(match route(&path, state.role()) {
        Some((status, body)) => text(status, body),
        None => text(StatusCode::NOT_FOUND, "Not Found"),
    })
}

/// Whether the request carries `Authorization: Basic base64(user:password)` matching `auth`.
fn authorized(req: &Request<Incoming>, auth: &Auth) -> bool {
    let Some(value) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, encoded)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    decoded == format!("{}:{}", auth.user, auth.password).as_bytes()
}

/// The status and body of a role endpoint for `role`, or `None` for an unknown path.
pub fn route(path: &str, role: Role) -> Option<(StatusCode, &'static str)> {
    const OK: StatusCode = StatusCode::OK;
    const NF: StatusCode = StatusCode::NOT_FOUND;
    if let Some(check) = path.strip_prefix("/db/manage/server/ha/") {
        return match (check, role) {
            ("master", Role::Master) | ("slave", Role::Slave) => Some((OK, "true")),
            ("master", Role::Slave) | ("slave", Role::Master) => Some((NF, "false")),
            ("available", Role::Master) => Some((OK, "master")),
            ("available", Role::Slave) => Some((OK, "slave")),
            ("master" | "slave" | "available", Role::Unknown) => Some((NF, "UNKNOWN")),
            _ => None,
        };
    }
    let check = if let Some(check) = path.strip_prefix("/db/manage/server/causalclustering/") {
        check
    } else {
        // /db/{name}/cluster/{check}
        let rest = path.strip_prefix("/db/")?;
        let (db, check) = rest.split_once("/cluster/")?;
        if db.is_empty() || db.contains('/') {
            return None;
        }
        check
    };
    let yes = match check {
        "writable" => role == Role::Master,
        "read-only" => role == Role::Slave,
        "available" => role != Role::Unknown,
        _ => return None,
    };
    Some(if yes { (OK, "true") } else { (NF, "false") })
}

/// A text/plain response.
fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=UTF-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ha_routes() {
        let m = "/db/manage/server/ha/master";
        assert_eq!(route(m, Role::Master), Some((StatusCode::OK, "true")));
        assert_eq!(
            route(m, Role::Slave),
            Some((StatusCode::NOT_FOUND, "false"))
        );
        assert_eq!(
            route(m, Role::Unknown),
            Some((StatusCode::NOT_FOUND, "UNKNOWN"))
        );
        let a = "/db/manage/server/ha/available";
        assert_eq!(route(a, Role::Slave), Some((StatusCode::OK, "slave")));
        assert_eq!(route("/db/manage/server/ha/other", Role::Master), None);
    }

    #[test]
    fn cluster_routes() {
        assert_eq!(
            route("/db/neo4j/cluster/writable", Role::Master),
            Some((StatusCode::OK, "true"))
        );
        assert_eq!(
            route("/db/neo4j/cluster/read-only", Role::Master),
            Some((StatusCode::NOT_FOUND, "false"))
        );
        assert_eq!(
            route(
                "/db/manage/server/causalclustering/available",
                Role::Unknown
            ),
            Some((StatusCode::NOT_FOUND, "false"))
        );
        assert_eq!(route("/db/a/b/cluster/writable", Role::Master), None);
    }

    #[test]
    fn request_line_path() {
        assert_eq!(
            request_path(b"HEAD /db/manage/server/ha/master?x=1 HTTP/1.0\r\n\r\n").as_deref(),
            Some("/db/manage/server/ha/master")
        );
        assert_eq!(request_path(b"partial"), None);
    }
}
