//! The routes: what each test of sandpool's custom-container pools asks of the app.
//!
//! Most handlers build a whole [`Response`]; `/echo`, `PUT /files/…` and `/ws` work on the
//! connection directly because they stream (which is what they test a proxy for).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::http::{write_head, BodyReader, ChunkedWriter, Framing, Request, Response};
use crate::json::{self, Object};
use crate::ws;

/// How long `/exit` waits before exiting, so its 200 reaches the client first.
const EXIT_DELAY: Duration = Duration::from_millis(100);
/// Largest body `/echo?buffer=1` holds in memory.
const MAX_BUFFERED_ECHO: u64 = 256 * 1024 * 1024;

/// Process-wide state, shared by all connection threads.
#[derive(Debug)]
pub struct AppState {
    pub started: Instant,
    /// `/startup` answers 503 until this long after `started`.
    pub startup_delay: Duration,
    /// Random per process: tells a restarted container from the same one.
    pub instance: String,
    /// Where `/files/NAME` lives (`/data` in the image).
    pub data_dir: PathBuf,
    /// When this file exists `/health` fails (`/tmp/unhealthy` in the image).
    pub unhealthy_file: PathBuf,
    counter: AtomicU64,
}

impl AppState {
    pub fn new(startup_delay: Duration, instance: String, data_dir: PathBuf, unhealthy_file: PathBuf) -> Self {
        Self { started: Instant::now(), startup_delay, instance, data_dir, unhealthy_file, counter: AtomicU64::new(0) }
    }
}

/// What a handler did with the exchange.
pub enum Handled {
    /// A response for the connection loop to send.
    Respond(Response),
    /// The handler already wrote the whole response; `keep_alive` says whether the
    /// connection can carry another request.
    Written { status: u16, keep_alive: bool },
}

impl From<Response> for Handled {
    fn from(r: Response) -> Self {
        Handled::Respond(r)
    }
}

/// The methods each known path answers, for 405 versus 404.
const ROUTES: &[(&str, &str)] = &[
    ("/", "GET"),
    ("/health", "GET"),
    ("/startup", "GET"),
    ("/counter", "GET"),
    ("/ls", "GET"),
    ("/read", "GET"),
    ("/attack", "POST"),
    ("/write", "POST"),
    ("/env", "GET"),
    ("/whoami", "GET"),
    ("/connect", "GET"),
    ("/exit", "POST"),
    ("/unhealthy", "POST"),
    ("/echo", "POST"),
    ("/ws", "GET"),
    ("/slow", "GET"),
];

/// Routes one request. `out` is the connection; handlers that stream write to it.
pub fn handle<R: BufRead, W: Write>(req: &Request, body: &mut BodyReader<'_, R>, out: &mut W, state: &AppState) -> io::Result<Handled> {
    if let Some(name) = req.path.strip_prefix("/files/") {
        return match req.method.as_str() {
            "GET" => Ok(get_file(state, name).into()),
            "PUT" => put_file(state, name, body).map(Handled::from),
            _ => Ok(method_not_allowed("GET, PUT").into()),
        };
    }
    let response = match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/") => Response::text(200, "sandpool-testapp\n"),
        ("GET", "/health") => health(state),
        ("GET", "/startup") => startup(state),
        ("GET", "/counter") => counter(state),
        ("GET", "/ls") => list_dir(req),
        ("GET", "/read") => read_any(req),
        ("POST", "/attack") => attack(req),
        ("POST", "/write") => return write_any(req, body),
        ("GET", "/env") => env(),
        ("GET", "/whoami") => whoami(),
        ("GET", "/connect") => connect(req),
        ("POST", "/exit") => exit(req),
        ("POST", "/unhealthy") => make_unhealthy(state),
        ("POST", "/echo") => return echo(req, body, out),
        ("GET", "/ws") => return websocket(req, body, out),
        ("GET", "/slow") => slow(req),
        (_, path) => match ROUTES.iter().find(|(p, _)| *p == path) {
            Some((_, allowed)) => method_not_allowed(allowed),
            None => Response::error(404, "no such route"),
        },
    };
    Ok(response.into())
}

fn method_not_allowed(allowed: &str) -> Response {
    Response::error(405, "method not allowed").with_header("Allow", allowed)
}

/// A numeric query parameter, its default when absent, or a 400 when it does not parse.
fn numeric_param<T: std::str::FromStr>(req: &Request, name: &str, default: T) -> Result<T, Response> {
    match req.query_param(name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| Response::error(400, &format!("query parameter {name} must be a number"))),
    }
}

fn health(state: &AppState) -> Response {
    if state.unhealthy_file.exists() {
        Response::text(500, "unhealthy\n")
    } else {
        Response::text(200, "ok")
    }
}

fn startup(state: &AppState) -> Response {
    let uptime = state.started.elapsed();
    let ready = uptime >= state.startup_delay;
    let body = Object::new().bool("ready", ready).num("uptime_ms", uptime.as_millis() as u64).finish();
    Response::json(if ready { 200 } else { 503 }, body)
}

fn counter(state: &AppState) -> Response {
    let count = state.counter.fetch_add(1, Ordering::SeqCst) + 1;
    Response::json(200, Object::new().num("count", count).num("pid", std::process::id()).str("instance", &state.instance).finish())
}

/// `NAME` from `/files/NAME`, decoded; no separators or dot names, so it stays in the data dir.
fn file_name(raw: &str) -> Option<String> {
    let name = crate::http::percent_decode(raw, false)?;
    let ok = !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0']);
    ok.then_some(name)
}

fn get_file(state: &AppState, raw_name: &str) -> Response {
    let Some(name) = file_name(raw_name) else {
        return Response::error(400, "bad file name");
    };
    match fs::read(state.data_dir.join(&name)) {
        Ok(data) => Response::new(200, "application/octet-stream", data),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Response::error(404, "no such file"),
        Err(e) => Response::error(500, &format!("read {name}: {e}")),
    }
}

fn put_file<R: BufRead>(state: &AppState, raw_name: &str, body: &mut BodyReader<'_, R>) -> io::Result<Response> {
    let Some(name) = file_name(raw_name) else {
        return Ok(Response::error(400, "bad file name"));
    };
    let path = state.data_dir.join(&name);
    let mut file = match fs::File::create(&path) {
        Ok(f) => f,
        Err(e) => return Ok(Response::error(500, &format!("create {}: {e}", path.display()))),
    };
    // A failure reading the body is the connection's (propagate); one writing is the disk's.
    let mut size = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = body.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if let Err(e) = file.write_all(&buf[..n]) {
            return Ok(Response::error(500, &format!("write {}: {e}", path.display())));
        }
        size += n as u64;
    }
    Ok(Response::json(200, Object::new().str("name", &name).num("size", size).finish()))
}

fn list_dir(req: &Request) -> Response {
    let Some(dir) = req.query_param("dir") else {
        return Response::error(400, "query parameter dir is required");
    };
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) => return Response::error(404, &format!("{dir}: {e}")),
    };
    let mut names: Vec<String> = entries.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    Response::json(200, json::string_array(names))
}

/// `POST /attack?what=NAME`: one attack from `attack`, reported as JSON.
fn attack(req: &Request) -> Response {
    let what = req.query_param("what").unwrap_or_default();
    match crate::attack::run(&what) {
        Some(body) => Response::json(200, body),
        None => Response::error(400, &format!("unknown attack {what:?}")),
    }
}

/// Reads any path the process can open (what an attacker in the container would try:
/// `/proc/version`, other sessions' files, host paths).
fn read_any(req: &Request) -> Response {
    let Some(path) = req.query_param("path") else {
        return Response::error(400, "query parameter path is required");
    };
    match fs::read(&path) {
        Ok(data) => Response::new(200, "application/octet-stream", data),
        Err(e) => Response::error(404, &format!("{path}: {e}")),
    }
}

/// Writes the request body to any path (`?path=`), creating or truncating it.
fn write_any<R: BufRead>(req: &Request, body: &mut BodyReader<'_, R>) -> io::Result<Handled> {
    let Some(path) = req.query_param("path") else {
        return Ok(Response::error(400, "query parameter path is required").into());
    };
    let mut data = Vec::new();
    body.read_to_end(&mut data)?;
    Ok(match fs::write(&path, &data) {
        Ok(()) => Response::json(200, Object::new().str("path", &path).num("size", data.len() as u64).finish()),
        Err(e) => Response::error(403, &format!("{path}: {e}")),
    }
    .into())
}

fn env() -> Response {
    let vars: BTreeMap<String, String> =
        std::env::vars_os().map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned())).collect();
    let body = vars.iter().fold(Object::new(), |obj, (k, v)| obj.str(k, v)).finish();
    Response::json(200, body)
}

fn whoami() -> Response {
    // /proc/self/status has the effective ids without libc; null if /proc is not mounted.
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let id_field = |field: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(field))?;
        // "Uid:\treal\teffective\tsaved\tfs"
        line.split_whitespace().nth(2)?.parse().ok()
    };
    let hostname = fs::read_to_string("/proc/sys/kernel/hostname").or_else(|_| fs::read_to_string("/etc/hostname")).ok();
    let body = Object::new()
        .opt_num("uid", id_field("Uid:"))
        .opt_num("gid", id_field("Gid:"))
        .opt_str("hostname", hostname.as_deref().map(str::trim))
        .num("pid", std::process::id())
        .raw("pids", json::number_array(&visible_pids()))
        .finish();
    Response::json(200, body)
}

/// The numeric entries of /proc: the processes this one can see (its pid namespace).
fn visible_pids() -> Vec<u64> {
    let mut pids: Vec<u64> = fs::read_dir("/proc")
        .map(|entries| entries.filter_map(Result::ok).filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    pids.sort_unstable();
    pids
}

fn connect(req: &Request) -> Response {
    let Some(addr) = req.query_param("addr") else {
        return Response::error(400, "query parameter addr is required");
    };
    let timeout = match numeric_param(req, "timeout_ms", 1000u64) {
        Ok(ms) => Duration::from_millis(ms.max(1)),
        Err(response) => return response,
    };
    let result = try_connect(&addr, timeout);
    let body = Object::new().str("addr", &addr).bool("connected", result.is_ok()).opt_str("error", result.err().as_deref()).finish();
    Response::json(200, body)
}

/// Tries every address `addr` resolves to; Ok on the first that accepts.
fn try_connect(addr: &str, timeout: Duration) -> Result<(), String> {
    // A literal IP:port never reaches the resolver, which matters in an image with no
    // /etc/resolv.conf or NSS libraries.
    let addrs: Vec<_> = addr.to_socket_addrs().map_err(|e| format!("resolve {addr}: {e}"))?.collect();
    let mut last_error = format!("{addr} resolved to no address");
    for sa in addrs {
        match TcpStream::connect_timeout(&sa, timeout) {
            Ok(_) => return Ok(()),
            Err(e) => last_error = format!("connect {sa}: {e}"),
        }
    }
    Err(last_error)
}

fn exit(req: &Request) -> Response {
    let code = match numeric_param(req, "code", 0i32) {
        Ok(code) => code,
        Err(response) => return response,
    };
    // Exit from another thread after a moment: the connection loop sends this reply first.
    thread::spawn(move || {
        thread::sleep(EXIT_DELAY);
        eprintln!("sandpool-testapp: exiting with code {code} as asked");
        std::process::exit(code);
    });
    Response::json(200, Object::new().bool("exiting", true).num("code", code).finish()).with_header("Connection", "close")
}

fn make_unhealthy(state: &AppState) -> Response {
    if let Some(parent) = state.unhealthy_file.parent() {
        let _ = fs::create_dir_all(parent);
    }
    match fs::write(&state.unhealthy_file, b"") {
        Ok(()) => Response::json(200, Object::new().bool("unhealthy", true).finish()),
        Err(e) => Response::error(500, &format!("create {}: {e}", state.unhealthy_file.display())),
    }
}

fn slow(req: &Request) -> Response {
    match numeric_param(req, "ms", 1000u64) {
        Ok(ms) => {
            thread::sleep(Duration::from_millis(ms));
            Response::json(200, Object::new().num("slept_ms", ms).finish())
        }
        Err(response) => response,
    }
}

/// The response headers `/echo` adds: the request's `x-test-*` headers, whether it carried
/// `Authorization` (a proxy must not forward sandpool's own bearer token) and its query.
fn echo_headers(req: &Request) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> =
        req.headers.iter().filter(|(n, _)| n.to_ascii_lowercase().starts_with("x-test-")).cloned().collect();
    let content_type = req.header("content-type").unwrap_or("application/octet-stream");
    headers.push(("Content-Type".into(), content_type.into()));
    headers.push(("x-saw-authorization".into(), if req.header("authorization").is_some() { "yes" } else { "no" }.into()));
    headers.push(("x-query".into(), req.query.clone()));
    headers
}

/// Echoes the body as it arrives: a length-delimited body with the same length, a chunked one
/// chunk by chunk. `?buffer=1` reads it all first, for clients that only read the response
/// after sending everything (streaming to them deadlocks once the socket buffers fill).
fn echo<R: BufRead, W: Write>(req: &Request, body: &mut BodyReader<'_, R>, out: &mut W) -> io::Result<Handled> {
    let keep_alive = req.keep_alive();
    let mut headers = echo_headers(req);
    if req.query_param("buffer").is_some_and(|v| v == "1") {
        let mut data = Vec::new();
        body.take(MAX_BUFFERED_ECHO + 1).read_to_end(&mut data)?;
        if data.len() as u64 > MAX_BUFFERED_ECHO {
            return Ok(Response::error(413, "body too large to buffer").into());
        }
        return Ok(Response { status: 200, headers, body: data }.into());
    }
    if !keep_alive {
        headers.push(("Connection".into(), "close".into()));
    }
    match req.framing().unwrap_or(Framing::None) {
        Framing::Chunked if req.minor_version >= 1 => {
            headers.push(("Transfer-Encoding".into(), "chunked".into()));
            write_head(out, 200, &headers)?;
            let mut chunked = ChunkedWriter::new(&mut *out);
            copy_flushing(body, &mut chunked)?;
            chunked.finish()?;
        }
        Framing::Length(n) => {
            headers.push(("Content-Length".into(), n.to_string()));
            write_head(out, 200, &headers)?;
            copy_flushing(body, out)?;
        }
        // No body, or chunked from an HTTP/1.0 client (which cannot read chunked): close-delimited.
        framing => {
            let close_delimited = framing == Framing::Chunked;
            if !close_delimited {
                headers.push(("Content-Length".into(), "0".into()));
            }
            write_head(out, 200, &headers)?;
            copy_flushing(body, out)?;
            out.flush()?;
            return Ok(Handled::Written { status: 200, keep_alive: keep_alive && !close_delimited });
        }
    }
    Ok(Handled::Written { status: 200, keep_alive })
}

/// Copies `r` to `w`, flushing after every read so each piece is on the wire before the next
/// is awaited.
fn copy_flushing(r: &mut impl Read, w: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            w.flush()?;
            return Ok(total);
        }
        w.write_all(&buf[..n])?;
        w.flush()?;
        total += n as u64;
    }
}

/// The WebSocket handshake, then the echo loop until the client closes.
fn websocket<R: BufRead, W: Write>(req: &Request, body: &mut BodyReader<'_, R>, out: &mut W) -> io::Result<Handled> {
    if !ws::is_upgrade(req) {
        return Ok(Response::error(426, "this route speaks WebSocket").with_header("Upgrade", "websocket").into());
    }
    if !body.is_done() {
        return Ok(Response::error(400, "a WebSocket upgrade has no body").into());
    }
    match ws::handshake(req) {
        Ok(switching) => {
            write_head(out, switching.status, &switching.headers)?;
            out.flush()?;
            ws::echo(body.connection(), out)?;
            Ok(Handled::Written { status: 101, keep_alive: false })
        }
        Err(refusal) => Ok(refusal.into()),
    }
}

/// Creates `dir` if missing; a failure is reported but not fatal (the routes that need it
/// answer 500 then).
pub fn ensure_dir(dir: &Path) {
    if let Err(e) = fs::create_dir_all(dir) {
        eprintln!("sandpool-testapp: cannot create {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::read_request;

    fn state(dir: &Path) -> AppState {
        AppState::new(Duration::from_secs(3600), "inst".into(), dir.join("data"), dir.join("unhealthy"))
    }

    /// Runs one raw request through `handle` and returns the response as (lossy) text.
    fn exchange(state: &AppState, raw: &[u8]) -> String {
        String::from_utf8_lossy(&exchange_bytes(state, raw)).into_owned()
    }

    /// Runs one raw request through `handle` and returns the response bytes.
    fn exchange_bytes(state: &AppState, raw: &[u8]) -> Vec<u8> {
        let mut reader = raw;
        let req = read_request(&mut reader).unwrap().unwrap();
        let framing = req.framing().unwrap();
        let mut body = BodyReader::new(&mut reader, framing);
        let mut out = Vec::new();
        match handle(&req, &mut body, &mut out, state).unwrap() {
            Handled::Respond(r) => r.write_to(&mut out, true).unwrap(),
            Handled::Written { .. } => {}
        }
        out
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sandpool-testapp-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("data")).unwrap();
        dir
    }

    #[test]
    fn counter_health_startup_and_unknown_routes() {
        let dir = temp_dir("basic");
        let st = state(&dir);
        assert!(exchange(&st, b"GET /counter HTTP/1.1\r\n\r\n")
            .ends_with(&format!(r#"{{"count":1,"pid":{},"instance":"inst"}}"#, std::process::id())));
        assert!(exchange(&st, b"GET /counter HTTP/1.1\r\n\r\n").contains(r#""count":2"#));
        assert!(exchange(&st, b"GET /health HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200 "));
        assert!(exchange(&st, b"POST /unhealthy HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200 "));
        assert!(exchange(&st, b"GET /health HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 500 "));
        assert!(exchange(&st, b"GET /startup HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 503 "));
        assert!(exchange(&st, b"GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(exchange(&st, b"DELETE /echo HTTP/1.1\r\n\r\n").contains("Allow: POST\r\n"));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn files_round_trip_and_names_are_confined() {
        let dir = temp_dir("files");
        let st = state(&dir);
        assert!(exchange(&st, b"PUT /files/a%20b HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz").contains(r#"{"name":"a b","size":3}"#));
        assert!(exchange(&st, b"GET /files/a%20b HTTP/1.1\r\n\r\n").ends_with("\r\n\r\nxyz"));
        assert!(exchange(&st, b"GET /files/missing HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(exchange(&st, b"GET /files/..%2Fx HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 400 "));
        assert!(exchange(&st, b"GET /files/.. HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 400 "));
        let listing = format!("GET /ls?dir={} HTTP/1.1\r\n\r\n", st.data_dir.display());
        assert!(exchange(&st, listing.as_bytes()).ends_with(r#"["a b"]"#));
        assert!(exchange(&st, b"GET /ls?dir=/no/such/dir HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn echo_streams_chunked_and_reports_headers() {
        let dir = temp_dir("echo");
        let st = state(&dir);
        let raw = b"POST /echo?a=1&b HTTP/1.1\r\nTransfer-Encoding: chunked\r\nX-Test-Foo: bar\r\nX-Other: no\r\nAuthorization: Bearer t\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let out = exchange(&st, raw);
        assert!(out.contains("X-Test-Foo: bar\r\n"));
        assert!(!out.contains("X-Other"));
        assert!(out.contains("x-saw-authorization: yes\r\n"));
        assert!(out.contains("x-query: a=1&b\r\n"));
        assert!(out.ends_with("Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "{out}");
        let out = exchange(&st, b"POST /echo HTTP/1.1\r\nContent-Length: 4\r\n\r\nwxyz");
        assert!(out.contains("x-saw-authorization: no\r\n") && out.ends_with("Content-Length: 4\r\n\r\nwxyz"), "{out}");
        let out = exchange(&st, b"POST /echo?buffer=1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n");
        assert!(out.ends_with("Content-Length: 2\r\n\r\nhi"), "{out}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn websocket_route_upgrades_and_echoes() {
        let dir = temp_dir("ws");
        let st = state(&dir);
        let mut raw = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec();
        raw.extend(ws::encode_frame(true, ws::OP_TEXT, b"hi", Some([1, 2, 3, 4])));
        let out = exchange_bytes(&st, &raw);
        assert!(out.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(out.ends_with(b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi"));
        assert!(exchange(&st, b"GET /ws HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 426 "));
        fs::remove_dir_all(dir).unwrap();
    }
}
