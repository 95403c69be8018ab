//! One HTTP check: one request on a fresh connection, judged against the [`CheckSpec`].
//!
//! A small hand-written HTTP/1.x client, not a general one: HAProxy-compatible requests (HAProxy
//! 2.6 sends `HEAD /db/manage/server/ha/master HTTP/1.0\r\n\r\n`, header names lowercased, and
//! adds `connection: close` to HTTP/1.1 requests; lb does the same and also adds a `host` header
//! to HTTP/1.1 requests that have none, as HTTP/1.1 servers may reject requests without it), and
//! a strict response parser: status line `HTTP/1.x NNN`, headers up to CRLFCRLF, a body up to the
//! close, `content-length` or chunked end, capped at [`MAX_BODY`]. Anything else is
//! `Failed("garbage: ...")`. The whole check is bounded by `spec.timeout`.
//!
//! HEAD answers have no body, so `expect_body` is not checked for HEAD checks (the manual's
//! checks are HEAD and rely on the status alone).
use std::{
    fmt,
    io::ErrorKind,
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::spec::{CheckSpec, HttpVersion, Method, MAX_BODY};

/// The most bytes of status line and headers accepted.
const MAX_HEAD: usize = 16 * 1024;
/// The most bytes of a negative answer's body kept for display.
const SHOWN_BODY: usize = 128;

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The expected status (and body substring, if set and the method has a body).
    Positive,
    /// A status in `negative_status`: the server answered "not in this role". `body` is the
    /// answer's body, trimmed and shortened for display (empty for HEAD).
    Negative { status: u16, body: String },
    /// No usable answer: connect error, timeout, reset, garbage, any other status or body.
    Failed(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Positive => f.write_str("positive"),
            Outcome::Negative { status, body } if body.is_empty() => {
                write!(f, "negative: HTTP {status}")
            }
            Outcome::Negative { status, body } => write!(f, "negative: HTTP {status} {body:?}"),
            Outcome::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// One check's outcome and how long it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub outcome: Outcome,
    pub latency: Duration,
}

/// Where a check was when it timed out.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Connect,
    Send,
    Head,
    Body,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Connect => "connecting",
            Phase::Send => "sending the request",
            Phase::Head => "waiting for the answer",
            Phase::Body => "reading the body",
        }
    }
}

/// A parsed answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Vec<u8>,
}

/// Runs one check against `addr` (the backend's address and check port).
pub async fn probe(addr: SocketAddr, spec: &CheckSpec) -> Probe {
    let start = Instant::now();
    let mut phase = Phase::Connect;
    let result = tokio::time::timeout(spec.timeout, exchange(addr, spec, &mut phase)).await;
    let outcome = match result {
        Ok(Ok(answer)) => judge(spec, answer),
        Ok(Err(e)) => Outcome::Failed(e),
        Err(_) => Outcome::Failed(format!(
            "timeout after {} ({})",
            humantime::format_duration(spec.timeout),
            phase.as_str()
        )),
    };
    Probe {
        outcome,
        latency: start.elapsed(),
    }
}

/// The request bytes, exactly as written on the wire. Contains the credentials: never log it.
pub fn request(addr: SocketAddr, spec: &CheckSpec) -> Vec<u8> {
    let mut r = format!("{} {} {}\r\n", spec.method, spec.uri, spec.version);
    for (k, v) in &spec.headers {
        r.push_str(&format!("{}: {}\r\n", k.to_ascii_lowercase(), v));
    }
    if let Some(auth) = &spec.auth {
        r.push_str(&format!("authorization: {}\r\n", auth.header_value()));
    }
    if spec.version == HttpVersion::Http11 {
        if !spec
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("host"))
        {
            r.push_str(&format!("host: {addr}\r\n"));
        }
        r.push_str("connection: close\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

fn judge(spec: &CheckSpec, a: Answer) -> Outcome {
    let shown = || shown_body(&a.body);
    if a.status == spec.expect_status {
        match &spec.expect_body {
            Some(want) if spec.method != Method::Head => {
                if contains(&a.body, want.as_bytes()) {
                    Outcome::Positive
                } else {
                    Outcome::Failed(format!(
                        "HTTP {}: body {:?} does not contain {want:?}",
                        a.status,
                        shown()
                    ))
                }
            }
            _ => Outcome::Positive,
        }
    } else if spec.negative_status.contains(&a.status) {
        Outcome::Negative {
            status: a.status,
            body: shown(),
        }
    } else {
        let hint = match a.status {
            401 | 403 => " (check credentials)",
            _ => "",
        };
        let body = shown();
        if body.is_empty() {
            Outcome::Failed(format!("HTTP {}{hint}", a.status))
        } else {
            Outcome::Failed(format!("HTTP {}{hint} {body:?}", a.status))
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// The body for logs and status: lossy UTF-8, trimmed, at most [`SHOWN_BODY`] characters.
fn shown_body(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let t = text.trim();
    match t.char_indices().nth(SHOWN_BODY) {
        Some((i, _)) => format!("{}...", &t[..i]),
        None => t.to_string(),
    }
}

fn io_error(what: &str, e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionRefused => format!("{what}: connection refused"),
        ErrorKind::ConnectionReset => format!("reset ({what})"),
        ErrorKind::BrokenPipe => format!("reset ({what}: broken pipe)"),
        _ => format!("{what}: {e}"),
    }
}

async fn exchange(addr: SocketAddr, spec: &CheckSpec, phase: &mut Phase) -> Result<Answer, String> {
    *phase = Phase::Connect;
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| io_error("connect", &e))?;
    let _ = s.set_nodelay(true);
    *phase = Phase::Send;
    s.write_all(&request(addr, spec))
        .await
        .map_err(|e| io_error("send", &e))?;
    *phase = Phase::Head;
    let mut r = Reader {
        s,
        buf: Vec::with_capacity(1024),
        eof: false,
    };
    let head_end = loop {
        if let Some(i) = find(&r.buf, b"\r\n\r\n") {
            break i;
        }
        if r.buf.len() > MAX_HEAD {
            return Err(format!(
                "garbage: no end of headers within {MAX_HEAD} bytes"
            ));
        }
        if !r
            .fill()
            .await
            .map_err(|e| io_error("reading the answer", &e))?
        {
            return Err(if r.buf.is_empty() {
                "closed without an answer".to_string()
            } else {
                format!(
                    "garbage: answer ended inside the headers: {}",
                    escaped(&r.buf)
                )
            });
        }
        // Fail fast on an answer that cannot be HTTP.
        let n = r.buf.len().min(7);
        if r.buf[..n] != b"HTTP/1."[..n] {
            return Err(format!("garbage: {}", escaped(&r.buf)));
        }
    };
    let head = parse_head(&r.buf[..head_end])?;
    r.buf.drain(..head_end + 4);
    *phase = Phase::Body;
    let no_body = spec.method == Method::Head
        || head.status == 204
        || head.status == 304
        || head.status < 200;
    let body = if no_body {
        Vec::new()
    } else if head.chunked {
        r.chunked().await?
    } else if let Some(len) = head.content_length {
        r.exact(len).await?
    } else {
        r.until_close().await?
    };
    Ok(Answer {
        status: head.status,
        body,
    })
}

struct Head {
    status: u16,
    content_length: Option<usize>,
    chunked: bool,
}

fn parse_head(head: &[u8]) -> Result<Head, String> {
    let text = std::str::from_utf8(head)
        .map_err(|_| format!("garbage: headers are not text: {}", escaped(head)))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let garbage = || format!("garbage: status line {}", escaped(status_line.as_bytes()));
    let rest = status_line
        .strip_prefix("HTTP/1.0 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.1 "))
        .ok_or_else(garbage)?;
    let code = rest.get(..3).ok_or_else(garbage)?;
    if !code.bytes().all(|c| c.is_ascii_digit()) || !(rest.len() == 3 || rest.as_bytes()[3] == b' ')
    {
        return Err(garbage());
    }
    let status: u16 = code.parse().map_err(|_| garbage())?;
    if !(100..=599).contains(&status) {
        return Err(garbage());
    }
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let bad = || format!("garbage: header line {}", escaped(line.as_bytes()));
        let (name, value) = line.split_once(':').ok_or_else(bad)?;
        if name.is_empty()
            || !name.bytes().all(is_token)
            || line.bytes().any(|c| c < b' ' && c != b'\t')
        {
            return Err(bad());
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .ok()
                .filter(|_| value.bytes().all(|c| c.is_ascii_digit()))
                .ok_or_else(bad)?;
            if content_length.is_some_and(|c| c != n) {
                return Err(format!(
                    "garbage: conflicting content-length headers ({})",
                    escaped(line.as_bytes())
                ));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("chunked") {
                return Err(format!("garbage: unsupported transfer-encoding {value:?}"));
            }
            chunked = true;
        }
    }
    Ok(Head {
        status,
        content_length,
        chunked,
    })
}

fn is_token(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The first bytes of an unexpected answer, printable.
fn escaped(b: &[u8]) -> String {
    let shown: String = b
        .iter()
        .take(64)
        .flat_map(|c| std::ascii::escape_default(*c))
        .map(char::from)
        .collect();
    if b.len() > 64 {
        format!("\"{shown}\"...")
    } else {
        format!("\"{shown}\"")
    }
}

/// A buffered reader over the connection that stops reading at [`MAX_BODY`].
struct Reader {
    s: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Reader {
    /// Reads more; `false` at the end of the stream.
    async fn fill(&mut self) -> std::io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        let mut chunk = [0u8; 4096];
        let n = self.s.read(&mut chunk).await?;
        if n == 0 {
            self.eof = true;
            return Ok(false);
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(true)
    }

    async fn fill_body(&mut self) -> Result<bool, String> {
        self.fill()
            .await
            .map_err(|e| io_error("reading the body", &e))
    }

    /// The body up to the close, capped.
    async fn until_close(&mut self) -> Result<Vec<u8>, String> {
        while self.buf.len() < MAX_BODY && self.fill_body().await? {}
        self.buf.truncate(MAX_BODY);
        Ok(std::mem::take(&mut self.buf))
    }

    /// A `content-length` body; only the first [`MAX_BODY`] bytes are read.
    async fn exact(&mut self, len: usize) -> Result<Vec<u8>, String> {
        let want = len.min(MAX_BODY);
        while self.buf.len() < want {
            if !self.fill_body().await? {
                return Err(format!(
                    "garbage: body ended after {} of {len} bytes",
                    self.buf.len()
                ));
            }
        }
        self.buf.truncate(want);
        Ok(std::mem::take(&mut self.buf))
    }

    /// A chunked body (RFC 9112 7.1), capped; trailers are not read.
    async fn chunked(&mut self) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                if self.buf.len() > 1024 {
                    return Err("garbage: chunk size line too long".into());
                }
                if !self.fill_body().await? {
                    return Err("garbage: chunked body ended early".into());
                }
            };
            let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size_text = line
                .split(';')
                .next()
                .unwrap_or_default()
                .trim_matches([' ', '\t']);
            let size = usize::from_str_radix(size_text, 16)
                .ok()
                .filter(|_| !size_text.is_empty() && size_text.len() <= 8)
                .ok_or_else(|| format!("garbage: chunk size {}", escaped(line.as_bytes())))?;
            self.buf.drain(..line_end + 2);
            if size == 0 {
                return Ok(body);
            }
            while self.buf.len() < size + 2 {
                if body.len() + self.buf.len() >= MAX_BODY {
                    // Enough: keep what fits.
                    body.extend_from_slice(&self.buf[..self.buf.len().min(size)]);
                    body.truncate(MAX_BODY);
                    return Ok(body);
                }
                if !self.fill_body().await? {
                    return Err("garbage: chunked body ended early".into());
                }
            }
            if &self.buf[size..size + 2] != b"\r\n" {
                return Err("garbage: chunk not followed by CRLF".into());
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
            if body.len() >= MAX_BODY {
                body.truncate(MAX_BODY);
                return Ok(body);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::spec::{preset, BasicAuth};
    use std::sync::Arc;
    use tokio::{net::TcpListener, sync::Mutex};

    /// What a test server does with a connection after reading the request.
    #[derive(Clone)]
    enum Serve {
        /// Writes these bytes and closes.
        Bytes(Vec<u8>),
        /// Never answers (keeps the connection open).
        Hang,
        /// Closes with a RST (SO_LINGER 0) without answering.
        Reset,
    }

    /// A one-connection-at-a-time server on 127.0.0.1:0; records every request it read.
    async fn server(serve: Serve) -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let serve = serve.clone();
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut b = [0u8; 1024];
                    while find(&req, b"\r\n\r\n").is_none() {
                        match s.read(&mut b).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => req.extend_from_slice(&b[..n]),
                        }
                    }
                    seen.lock().await.push(req);
                    match serve {
                        Serve::Bytes(out) => {
                            let _ = s.write_all(&out).await;
                            let _ = s.shutdown().await;
                        }
                        Serve::Hang => {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                        }
                        Serve::Reset => {
                            // SO_LINGER 0: close sends a RST.
                            let zero = libc::linger {
                                l_onoff: 1,
                                l_linger: 0,
                            };
                            let _ = nix::sys::socket::setsockopt(
                                &s,
                                nix::sys::socket::sockopt::Linger,
                                &zero,
                            );
                            drop(s);
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    async fn check(answer: &str, spec: &CheckSpec) -> Outcome {
        let (addr, _) = server(Serve::Bytes(answer.as_bytes().to_vec())).await;
        probe(addr, spec).await.outcome
    }

    fn get(name: &str) -> CheckSpec {
        let mut s = preset(name).unwrap();
        s.method = Method::Get;
        s
    }

    fn failed_with(o: &Outcome, part: &str) -> bool {
        matches!(o, Outcome::Failed(e) if e.contains(part))
    }

    #[tokio::test]
    async fn neo4j_answers() {
        let m = preset("neo4j-ha-master").unwrap();
        let g = get("neo4j-ha-master");
        let ok = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\ntrue";
        assert_eq!(check(ok, &m).await, Outcome::Positive);
        assert_eq!(check(ok, &g).await, Outcome::Positive);
        // Without content-length: body until close.
        assert_eq!(
            check("HTTP/1.0 200 OK\r\n\r\ntrue", &g).await,
            Outcome::Positive
        );
        let slave = "HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\nfalse";
        assert_eq!(
            check(slave, &g).await,
            Outcome::Negative {
                status: 404,
                body: "false".into()
            }
        );
        // HEAD: the server sends no body; we do not read one.
        assert_eq!(
            check("HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\n", &m).await,
            Outcome::Negative {
                status: 404,
                body: String::new()
            }
        );
        let unknown = "HTTP/1.1 404 Not Found\r\nContent-Length: 7\r\n\r\nUNKNOWN";
        assert_eq!(
            check(unknown, &g).await,
            Outcome::Negative {
                status: 404,
                body: "UNKNOWN".into()
            }
        );
        // The available check: 200 "master"/"slave".
        let a = preset("neo4j-ha-available").unwrap();
        assert_eq!(
            check("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nslave", &a).await,
            Outcome::Positive
        );
    }

    #[tokio::test]
    async fn patroni_answers() {
        let p = preset("patroni-primary").unwrap();
        let body = "{\"state\": \"running\", \"role\": \"replica\"}";
        let ans = format!(
            "HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n\r\n{body}"
        );
        assert_eq!(
            check(&ans, &p).await,
            Outcome::Negative {
                status: 503,
                body: body.into()
            }
        );
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\n{\"role\"\r\nb;x=y\r\n: \"primary\"\r\n0\r\n\r\n";
        let mut p2 = p.clone();
        p2.expect_body = Some("\"role\": \"primary\"".into());
        assert_eq!(check(chunked, &p2).await, Outcome::Positive);
    }

    #[tokio::test]
    async fn errors_and_unexpected_answers_fail() {
        let g = get("neo4j-ha-master");
        let o = check(
            "HTTP/1.1 500 Server Error\r\nContent-Length: 4\r\n\r\noops",
            &g,
        )
        .await;
        assert_eq!(o, Outcome::Failed("HTTP 500 \"oops\"".into()));
        let o = check("HTTP/1.1 500 Server Error\r\n\r\n", &g).await;
        assert_eq!(o, Outcome::Failed("HTTP 500".into()));
        let o = check(
            "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n",
            &preset("neo4j-ha-master").unwrap(),
        )
        .await;
        assert_eq!(o, Outcome::Failed("HTTP 401 (check credentials)".into()));
        let o = check("HTTP/1.1 403 Forbidden\r\n\r\n", &g).await;
        assert!(failed_with(&o, "credentials"), "{o:?}");
        let o = check("HTTP/1.1 302 Found\r\nLocation: /x\r\n\r\n", &g).await;
        assert!(failed_with(&o, "HTTP 302"), "{o:?}");
        // The expected status with the wrong body (GET).
        let o = check("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfalse", &g).await;
        assert!(failed_with(&o, "does not contain \"true\""), "{o:?}");
        // Closed without a word.
        let o = check("", &g).await;
        assert!(failed_with(&o, "closed without an answer"), "{o:?}");
    }

    #[tokio::test]
    async fn garbage_fails() {
        let g = get("neo4j-ha-master");
        for (answer, what) in [
            ("SSH-2.0-OpenSSH_9.2\r\n", "garbage: \"SSH"),
            ("\x16\x03\x01\x00\x25\x01\x00\x00", "garbage: \"\\x16"),
            ("HTTP/1.1 2000 OK\r\n\r\n", "garbage: status line"),
            ("HTTP/1.1 20 OK\r\n\r\n", "garbage: status line"),
            ("HTTP/2 200\r\n\r\n", "garbage"),
            (
                "HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
                "garbage: header line",
            ),
            (
                "HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
                "garbage: header line",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                "garbage: header line",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                "conflicting content-length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\ntrue",
                "garbage: body ended after 4 of 10 bytes",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Type: text",
                "garbage: answer ended inside the headers",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                "unsupported transfer-encoding",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "garbage: chunk size",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ntrue",
                "chunked body ended early",
            ),
        ] {
            let o = check(answer, &g).await;
            assert!(failed_with(&o, what), "{answer:?}: {o:?}");
        }
        // Endless headers.
        let long = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(40_000));
        let o = check(&long, &g).await;
        assert!(failed_with(&o, "no end of headers"), "{o:?}");
    }

    #[tokio::test]
    async fn body_is_capped() {
        let mut g = get("neo4j-ha-available");
        g.expect_body = Some("needle".into());
        // The needle lies past the cap: not read, so not found.
        let big = format!("HTTP/1.1 200 OK\r\n\r\n{}needle", "x".repeat(MAX_BODY));
        let o = check(&big, &g).await;
        assert!(failed_with(&o, "does not contain"), "{o:?}");
        let big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\nneedle{}",
            MAX_BODY * 4,
            "x".repeat(MAX_BODY * 4 - 6)
        );
        assert_eq!(check(&big, &g).await, Outcome::Positive);
        // A long negative body is shortened for display.
        let big = format!("HTTP/1.1 404 Not Found\r\n\r\n{}", "y".repeat(1000));
        match check(&big, &g).await {
            Outcome::Negative { status: 404, body } => {
                assert_eq!(body, format!("{}...", "y".repeat(SHOWN_BODY)))
            }
            o => panic!("{o:?}"),
        }
    }

    #[tokio::test]
    async fn hanging_server_times_out_within_the_timeout() {
        let (addr, _) = server(Serve::Hang).await;
        let mut g = get("neo4j-ha-master");
        g.timeout = Duration::from_millis(300);
        let t0 = Instant::now();
        let p = probe(addr, &g).await;
        let took = t0.elapsed();
        assert_eq!(
            p.outcome,
            Outcome::Failed("timeout after 300ms (waiting for the answer)".into())
        );
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_millis(450),
            "{took:?}"
        );
        assert!(p.latency >= Duration::from_millis(300) && p.latency < Duration::from_millis(450));
    }

    #[tokio::test]
    async fn refused_and_reset() {
        // A port nobody listens on: bind, learn the port, close.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let p = probe(addr, &get("neo4j-ha-master")).await;
        assert_eq!(
            p.outcome,
            Outcome::Failed("connect: connection refused".into())
        );
        let (addr, _) = server(Serve::Reset).await;
        let o = probe(addr, &get("neo4j-ha-master")).await.outcome;
        assert!(failed_with(&o, "reset"), "{o:?}");
    }

    #[tokio::test]
    async fn requests_on_the_wire_are_haproxys() {
        let ok = Serve::Bytes(b"HTTP/1.0 200 OK\r\n\r\n".to_vec());
        let (addr, seen) = server(ok.clone()).await;
        // Captured from HAProxy 2.6 running `option httpchk HEAD /db/manage/server/ha/master HTTP/1.0`.
        let m = preset("neo4j-ha-master").unwrap();
        assert_eq!(probe(addr, &m).await.outcome, Outcome::Positive);
        assert_eq!(
            seen.lock().await.pop().unwrap(),
            b"HEAD /db/manage/server/ha/master HTTP/1.0\r\n\r\n"
        );
        // `option httpchk GET /db/manage/server/ha/available` (HAProxy defaults to HTTP/1.0).
        let a = preset("neo4j-ha-available").unwrap();
        probe(addr, &a).await;
        assert_eq!(
            seen.lock().await.pop().unwrap(),
            b"GET /db/manage/server/ha/available HTTP/1.0\r\n\r\n"
        );
        // With credentials (HAProxy 2.6 lowercases header names).
        let mut m = preset("neo4j-ha-master").unwrap();
        m.auth = Some(BasicAuth {
            user: "neo4j".into(),
            password: "secret".into(),
        });
        probe(addr, &m).await;
        assert_eq!(
            seen.lock().await.pop().unwrap(),
            b"HEAD /db/manage/server/ha/master HTTP/1.0\r\nauthorization: Basic bmVvNGo6c2VjcmV0\r\n\r\n"
        );
        // HTTP/1.1: `http-check send meth HEAD uri ... ver HTTP/1.1 hdr Host neo4j hdr Authorization ...`.
        m.version = HttpVersion::Http11;
        m.headers = vec![("Host".into(), "neo4j".into())];
        probe(addr, &m).await;
        assert_eq!(
            seen.lock().await.pop().unwrap(),
            b"HEAD /db/manage/server/ha/master HTTP/1.1\r\nhost: neo4j\r\nauthorization: Basic bmVvNGo6c2VjcmV0\r\nconnection: close\r\n\r\n"
        );
        // HTTP/1.1 without a configured host: lb adds one (HAProxy does not).
        let mut r = preset("patroni-replica").unwrap();
        r.version = HttpVersion::Http11;
        r.headers = vec![("X-Foo".into(), "bar".into())];
        probe(addr, &r).await;
        assert_eq!(
            seen.lock().await.pop().unwrap(),
            format!(
                "GET /replica HTTP/1.1\r\nx-foo: bar\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
            )
            .into_bytes()
        );
    }

    #[test]
    fn outcome_display_has_no_secrets_to_show() {
        assert_eq!(
            Outcome::Negative {
                status: 404,
                body: "false".into()
            }
            .to_string(),
            "negative: HTTP 404 \"false\""
        );
        assert_eq!(
            Outcome::Negative {
                status: 503,
                body: String::new()
            }
            .to_string(),
            "negative: HTTP 503"
        );
        assert_eq!(
            Outcome::Failed("HTTP 500".into()).to_string(),
            "failed: HTTP 500"
        );
        assert_eq!(Outcome::Positive.to_string(), "positive");
    }
}
