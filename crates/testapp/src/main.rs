//! `sandpool-testapp`: the HTTP server inside the OCI image that sandpool's end-to-end tests
//! run as a custom-container session. Each route exercises one thing the proxy and the
//! session lifecycle must get right (see [`routes`]).
//!
//! Built from std only (plus `sha1`/`base64` for the WebSocket handshake) so that it links
//! statically and runs in an image that contains nothing but this binary:
//!
//! ```sh
//! cargo rustc -p sandpool-testapp --bin sandpool-testapp --target x86_64-unknown-linux-gnu \
//!     -- -C target-feature=+crt-static
//! ```
//!
//! Environment:
//! * `PORT` (default 8080): listens on `0.0.0.0:PORT`.
//! * `STARTUP_DELAY_MS` (default 0): `/startup` answers 503 until then.
//! * `DATA_DIR` (default `/data`) and `UNHEALTHY_FILE` (default `/tmp/unhealthy`): so the
//!   binary can also run directly on a host without touching those paths.
//!
//! One thread per connection; connections are kept alive (HTTP/1.1 rules).
//!
//! Note: there is no SIGTERM handler (std cannot install one). As PID 1 of a container a
//! signal without a handler is ignored, so stopping it takes the runtime's SIGKILL.

mod attack;
mod http;
mod json;
mod routes;
mod ws;

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io::{self, BufReader, BufWriter, Read};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{BodyReader, HttpError, Response};
use routes::{AppState, Handled};

/// How much of a body nobody read is discarded to keep the connection usable; past this the
/// connection is closed instead.
const MAX_DRAIN_BYTES: u64 = 1024 * 1024;
/// An idle keep-alive connection is dropped after this long, so threads do not pile up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

fn main() {
    let port: u16 = env_number("PORT", 8080);
    let startup_delay = Duration::from_millis(env_number("STARTUP_DELAY_MS", 0));
    let data_dir = PathBuf::from(std::env::var_os("DATA_DIR").unwrap_or_else(|| "/data".into()));
    let unhealthy_file = PathBuf::from(std::env::var_os("UNHEALTHY_FILE").unwrap_or_else(|| "/tmp/unhealthy".into()));
    routes::ensure_dir(&data_dir);
    let state = Arc::new(AppState::new(startup_delay, instance_id(), data_dir, unhealthy_file));

    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sandpool-testapp: cannot listen on 0.0.0.0:{port}: {e}");
            std::process::exit(1);
        }
    };
    println!("sandpool-testapp listening on 0.0.0.0:{port} (pid {}, instance {})", std::process::id(), state.instance);
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let state = Arc::clone(&state);
                thread::spawn(move || serve_connection(stream, &state));
            }
            // EMFILE and friends: keep accepting once the pressure is gone.
            Err(e) => eprintln!("sandpool-testapp: accept: {e}"),
        }
    }
}

/// An environment variable as a number; a value that does not parse is fatal (a test that
/// sets it wants it honoured).
fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("sandpool-testapp: {name}={v:?} is not a number");
            std::process::exit(2);
        }),
    }
}

/// 16 random bytes in hex, from /dev/urandom; without it (an image with no /dev), the time
/// and pid hashed with std's randomly keyed hasher (itself seeded by the getrandom syscall).
fn instance_id() -> String {
    let mut bytes = [0u8; 16];
    let from_urandom = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).is_ok();
    if !from_urandom {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
        let seed = RandomState::new().hash_one((nanos, std::process::id()));
        let second = RandomState::new().hash_one(seed);
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        bytes[8..].copy_from_slice(&second.to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serves requests on one connection until either side closes it.
fn serve_connection(stream: TcpStream, state: &AppState) {
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    // Streamed echoes and WebSocket frames must leave as soon as they are written.
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => return eprintln!("sandpool-testapp: {peer}: {e}"),
    };
    let mut reader = BufReader::new(stream);
    let mut writer = BufWriter::new(writer);
    loop {
        match serve_one(&mut reader, &mut writer, state) {
            Ok(true) => continue,
            Ok(false) => return,
            Err(e) => {
                // A client going away mid-exchange is routine for the tests (timeouts, kills).
                if !matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof) {
                    eprintln!("sandpool-testapp: {peer}: {e}");
                }
                return;
            }
        }
    }
}

/// Reads, routes and answers one request; Ok(true) if the connection can take another.
fn serve_one(reader: &mut BufReader<TcpStream>, writer: &mut BufWriter<TcpStream>, state: &AppState) -> io::Result<bool> {
    let req = match http::read_request(reader) {
        Ok(Some(req)) => req,
        Ok(None) => return Ok(false),
        Err(HttpError::Io(e)) => return Err(e),
        Err(HttpError::Malformed(why)) => return reject(writer, why),
    };
    let framing = match req.framing() {
        Ok(f) => f,
        Err(HttpError::Malformed(why)) => return reject(writer, why),
        Err(HttpError::Io(e)) => return Err(e),
    };
    // curl and others wait (up to a second) for this before sending a large body.
    if framing != http::Framing::None && req.header_has_token("expect", "100-continue") {
        http::write_head(writer, 100, &[])?;
        io::Write::flush(writer)?;
    }
    let mut body = BodyReader::new(reader, framing);
    let (status, keep_alive) = match routes::handle(&req, &mut body, writer, state)? {
        Handled::Written { status, keep_alive } => (status, keep_alive),
        Handled::Respond(response) => {
            // Whatever the handler did not read must go before the next request can be parsed.
            let drained = body.drain(MAX_DRAIN_BYTES)?;
            let keep_alive = req.keep_alive() && drained && !response.closes_connection();
            response.write_to(writer, keep_alive)?;
            (response.status, keep_alive)
        }
    };
    eprintln!("sandpool-testapp: {} {}{}{} -> {status}", req.method, req.path, if req.query.is_empty() { "" } else { "?" }, req.query);
    Ok(keep_alive)
}

/// Answers 400 to a request that cannot be parsed and closes (its framing is unknown).
fn reject(writer: &mut BufWriter<TcpStream>, why: &str) -> io::Result<bool> {
    eprintln!("sandpool-testapp: bad request: {why}");
    Response::error(400, why).write_to(writer, false)?;
    Ok(false)
}
