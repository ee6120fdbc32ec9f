//! The HTTP/1.1 wire format, as much of it as a test backend needs: parsing a request head,
//! reading its body (`Content-Length` or `Transfer-Encoding: chunked`), and writing
//! responses (fixed length or chunked).
//!
//! Everything is generic over [`BufRead`]/[`Write`] so the unit tests drive it with byte
//! slices; the server hands it a buffered `TcpStream`.
//!
//! The parser is strict where leniency would hide a proxy bug (both `Content-Length` and
//! `Transfer-Encoding`, conflicting lengths, folded header lines, a bad chunk size: all 400)
//! and bounded where a peer could make it allocate without limit (head size, line length).

use std::fmt;
use std::io::{self, BufRead, Read, Write};

/// Upper bound on the request line plus all header lines.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Upper bound on one chunk-size or trailer line of a chunked body.
const MAX_CHUNK_LINE_BYTES: usize = 4096;

/// Why a request could not be read.
#[derive(Debug)]
pub enum HttpError {
    /// The connection failed or closed in the middle of a request.
    Io(io::Error),
    /// The bytes are not an HTTP/1.x request this server accepts (answer 400).
    Malformed(&'static str),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "i/o error: {e}"),
            Self::Malformed(why) => write!(f, "malformed request: {why}"),
        }
    }
}

impl From<io::Error> for HttpError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// A parsed request line and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path as sent (still percent-encoded), always starting with `/`.
    pub path: String,
    /// The raw query string without the `?` (empty when there is none).
    pub query: String,
    /// The `x` of `HTTP/1.x` (0 or 1).
    pub minor_version: u8,
    /// Header names and values as received (values trimmed), in order.
    pub headers: Vec<(String, String)>,
}

/// How a request's body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

impl Request {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Whether any `name` header lists `token` among its comma-separated values
    /// (`Connection: keep-alive, Upgrade`).
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The first query parameter called `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').filter_map(|pair| pair.split_once('=').or(Some((pair, "")))).find_map(|(k, v)| {
            let key = percent_decode(k, true)?;
            (key == name).then(|| percent_decode(v, true)).flatten()
        })
    }

    /// Whether the connection stays open after this exchange: HTTP/1.1 unless the client said
    /// `close`, HTTP/1.0 only if it asked for `keep-alive`.
    pub fn keep_alive(&self) -> bool {
        if self.header_has_token("connection", "close") {
            return false;
        }
        self.minor_version >= 1 || self.header_has_token("connection", "keep-alive")
    }

    /// How the body is delimited. Both headers at once, several different lengths, or a
    /// transfer coding other than chunked are refused: a proxy in front of this app must
    /// never produce them, and a test should see that as a 400 rather than a guess.
    pub fn framing(&self) -> Result<Framing, HttpError> {
        let te: Vec<&str> =
            self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding")).map(|(_, v)| v.as_str()).collect();
        let lengths: Vec<&str> =
            self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("content-length")).map(|(_, v)| v.as_str()).collect();
        if !te.is_empty() {
            if !lengths.is_empty() {
                return Err(HttpError::Malformed("both Transfer-Encoding and Content-Length"));
            }
            let codings: Vec<&str> = te.iter().flat_map(|v| v.split(',')).map(str::trim).filter(|c| !c.is_empty()).collect();
            return match codings.as_slice() {
                [only] if only.eq_ignore_ascii_case("chunked") => Ok(Framing::Chunked),
                _ => Err(HttpError::Malformed("unsupported Transfer-Encoding")),
            };
        }
        let mut length = None;
        for value in lengths.iter().flat_map(|v| v.split(',')).map(str::trim) {
            let n = parse_content_length(value)?;
            if length.is_some_and(|l| l != n) {
                return Err(HttpError::Malformed("conflicting Content-Length values"));
            }
            length = Some(n);
        }
        Ok(match length {
            Some(0) | None => Framing::None,
            Some(n) => Framing::Length(n),
        })
    }
}

fn parse_content_length(value: &str) -> Result<u64, HttpError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::Malformed("bad Content-Length"));
    }
    value.parse().map_err(|_| HttpError::Malformed("Content-Length too large"))
}

/// Reads one request head. `Ok(None)` when the peer closed the connection cleanly before
/// sending anything (the normal end of a keep-alive connection).
pub fn read_request(reader: &mut impl BufRead) -> Result<Option<Request>, HttpError> {
    let mut budget = MAX_HEAD_BYTES;
    // RFC 9112 section 2.2: ignore empty lines before the request line (some clients send a
    // stray CRLF after a body).
    let request_line = loop {
        match read_line(reader, &mut budget)? {
            None => return Ok(None),
            Some(line) if line.is_empty() => continue,
            Some(line) => break line,
        }
    };
    let (method, path, query, minor_version) = parse_request_line(&request_line)?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader, &mut budget)?.ok_or(HttpError::Malformed("connection closed inside the head"))?;
        if line.is_empty() {
            break;
        }
        headers.push(parse_header_line(&line)?);
    }
    Ok(Some(Request { method, path, query, minor_version, headers }))
}

fn parse_request_line(line: &str) -> Result<(String, String, String, u8), HttpError> {
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(HttpError::Malformed("request line is not METHOD TARGET VERSION"));
    };
    if method.is_empty() || !method.bytes().all(is_token_byte) {
        return Err(HttpError::Malformed("bad method"));
    }
    let minor_version = match version {
        "HTTP/1.1" => 1,
        "HTTP/1.0" => 0,
        _ => return Err(HttpError::Malformed("unsupported HTTP version")),
    };
    // Only origin-form targets: this app is never a forward proxy.
    if !target.starts_with('/') {
        return Err(HttpError::Malformed("request target is not an absolute path"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok((method.to_owned(), path.to_owned(), query.to_owned(), minor_version))
}

fn parse_header_line(line: &str) -> Result<(String, String), HttpError> {
    if line.starts_with([' ', '\t']) {
        return Err(HttpError::Malformed("obsolete header line folding"));
    }
    let (name, value) = line.split_once(':').ok_or(HttpError::Malformed("header line without a colon"))?;
    // No whitespace between name and colon (RFC 9112 section 5.1): it is a smuggling vector.
    if name.is_empty() || !name.bytes().all(is_token_byte) {
        return Err(HttpError::Malformed("bad header name"));
    }
    Ok((name.to_owned(), value.trim_matches([' ', '\t']).to_owned()))
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// One line without its CRLF (a bare LF is accepted too), charged against `budget`.
/// `Ok(None)` on EOF before any byte of the line.
fn read_line(reader: &mut impl BufRead, budget: &mut usize) -> Result<Option<String>, HttpError> {
    let mut line = Vec::new();
    // `take` bounds the allocation when a peer sends an endless line.
    let limit = u64::try_from(*budget).unwrap_or(u64::MAX) + 1;
    let n = reader.take(limit).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if n > *budget {
        return Err(HttpError::Malformed("request head too large"));
    }
    *budget -= n;
    if line.pop() != Some(b'\n') {
        return Err(HttpError::Malformed("connection closed inside a line"));
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    // Header values are octets; keep them as (lossy) text since every route treats them so.
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// Percent-decodes `s` (`+` as space when `plus_is_space`, as in query strings). `None` if
/// the result is not UTF-8 or an escape is broken.
pub fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Where a [`BodyReader`] is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Length { remaining: u64 },
    ChunkSize,
    ChunkData { remaining: u64 },
    ChunkDataEnd,
    Done,
}

/// The body of one request, as a [`Read`] that ends where the body ends (the connection's
/// next request stays in the underlying reader). Chunked bodies are de-chunked; trailers
/// are read and dropped.
///
/// A read returns what is available now rather than filling the buffer, so a handler that
/// copies it to the response streams chunk by chunk.
pub struct BodyReader<'a, R> {
    inner: &'a mut R,
    state: BodyState,
}

impl<'a, R: BufRead> BodyReader<'a, R> {
    pub fn new(inner: &'a mut R, framing: Framing) -> Self {
        let state = match framing {
            Framing::None => BodyState::Done,
            Framing::Length(n) => BodyState::Length { remaining: n },
            Framing::Chunked => BodyState::ChunkSize,
        };
        Self { inner, state }
    }

    /// Whether the whole body (and, for chunked, its trailers) has been consumed, so the
    /// connection can carry another request.
    pub fn is_done(&self) -> bool {
        self.state == BodyState::Done
    }

    /// The connection itself, for protocols that take it over after the head (WebSocket).
    /// Only meaningful for a request without a body.
    pub fn connection(&mut self) -> &mut R {
        self.inner
    }

    /// Reads and discards up to `limit` bytes of what is left; true if the body ended.
    pub fn drain(&mut self, limit: u64) -> io::Result<bool> {
        io::copy(&mut self.by_ref().take(limit), &mut io::sink())?;
        Ok(self.is_done())
    }

    fn read_chunk_size(&mut self) -> io::Result<u64> {
        let line = self.read_chunk_line()?;
        // Chunk extensions (`;name=value`) are allowed and ignored.
        let size = line.split(';').next().unwrap_or("").trim_end_matches([' ', '\t']);
        if size.is_empty() || size.len() > 16 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid_data("bad chunk size"));
        }
        u64::from_str_radix(size, 16).map_err(|_| invalid_data("bad chunk size"))
    }

    fn read_chunk_line(&mut self) -> io::Result<String> {
        let mut budget = MAX_CHUNK_LINE_BYTES;
        match read_line(self.inner, &mut budget) {
            Ok(Some(line)) => Ok(line),
            Ok(None) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a chunked body")),
            Err(HttpError::Io(e)) => Err(e),
            Err(HttpError::Malformed(why)) => Err(invalid_data(why)),
        }
    }

    fn skip_trailers(&mut self) -> io::Result<()> {
        while !self.read_chunk_line()?.is_empty() {}
        Ok(())
    }

    /// Reads at most `remaining` bytes into `buf`; EOF before that is an error (a truncated
    /// body must not look like a complete one).
    fn read_bounded(&mut self, buf: &mut [u8], remaining: u64) -> io::Result<usize> {
        let want = usize::try_from(remaining).unwrap_or(usize::MAX).min(buf.len());
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 && want > 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside the body"));
        }
        Ok(n)
    }
}

impl<R: BufRead> Read for BodyReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                BodyState::Done => return Ok(0),
                BodyState::Length { remaining } => {
                    let n = self.read_bounded(buf, remaining)?;
                    let left = remaining - n as u64;
                    self.state = if left == 0 { BodyState::Done } else { BodyState::Length { remaining: left } };
                    return Ok(n);
                }
                BodyState::ChunkSize => {
                    let size = self.read_chunk_size()?;
                    if size == 0 {
                        self.skip_trailers()?;
                        self.state = BodyState::Done;
                    } else {
                        self.state = BodyState::ChunkData { remaining: size };
                    }
                }
                BodyState::ChunkData { remaining } => {
                    let n = self.read_bounded(buf, remaining)?;
                    let left = remaining - n as u64;
                    self.state = if left == 0 { BodyState::ChunkDataEnd } else { BodyState::ChunkData { remaining: left } };
                    return Ok(n);
                }
                BodyState::ChunkDataEnd => {
                    if !self.read_chunk_line()?.is_empty() {
                        return Err(invalid_data("chunk data longer than its size"));
                    }
                    self.state = BodyState::ChunkSize;
                }
            }
        }
    }
}

fn invalid_data(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// The reason phrase for the statuses this app sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// A complete response held in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Self { status, headers: vec![("Content-Type".into(), content_type.into())], body: body.into() }
    }

    pub fn json(status: u16, body: impl Into<String>) -> Self {
        Self::new(status, "application/json", body.into().into_bytes())
    }

    pub fn text(status: u16, body: &str) -> Self {
        Self::new(status, "text/plain; charset=utf-8", body.as_bytes())
    }

    /// `{"error": message}` with `status`.
    pub fn error(status: u16, message: &str) -> Self {
        Self::json(status, crate::json::Object::new().str("error", message).finish())
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Whether the handler asked for the connection to close after this response.
    pub fn closes_connection(&self) -> bool {
        self.headers.iter().any(|(n, v)| n.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close"))
    }

    /// Writes the whole response with a `Content-Length`, and `Connection: close` unless
    /// `keep_alive`.
    pub fn write_to(&self, out: &mut impl Write, keep_alive: bool) -> io::Result<()> {
        let mut headers = self.headers.clone();
        headers.push(("Content-Length".into(), self.body.len().to_string()));
        if !keep_alive && !self.closes_connection() {
            headers.push(("Connection".into(), "close".into()));
        }
        write_head(out, self.status, &headers)?;
        out.write_all(&self.body)?;
        out.flush()
    }
}

/// Writes a status line and headers (the caller delimits the body).
pub fn write_head(out: &mut impl Write, status: u16, headers: &[(String, String)]) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in headers {
        // A CR or LF in a value would let a request inject response headers.
        let value: String = value.chars().filter(|c| *c != '\r' && *c != '\n').collect();
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())
}

/// Writes each `write` as one chunk of a `Transfer-Encoding: chunked` body; [`finish`]
/// writes the last chunk. Callers flush when they want a chunk on the wire now.
///
/// [`finish`]: ChunkedWriter::finish
pub struct ChunkedWriter<W: Write> {
    inner: W,
}

impl<W: Write> ChunkedWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner }
    }

    /// The terminating zero-length chunk (no trailers).
    pub fn finish(mut self) -> io::Result<W> {
        self.inner.write_all(b"0\r\n\r\n")?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for ChunkedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // An empty chunk would end the body.
        if buf.is_empty() {
            return Ok(0);
        }
        write!(self.inner, "{:x}\r\n", buf.len())?;
        self.inner.write_all(buf)?;
        self.inner.write_all(b"\r\n")?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<Request>, HttpError> {
        read_request(&mut &raw[..])
    }

    fn body_of(raw: &[u8]) -> io::Result<(Vec<u8>, Vec<u8>)> {
        let mut reader = raw;
        let req = read_request(&mut reader).unwrap().unwrap();
        let framing = req.framing().unwrap();
        let mut body = Vec::new();
        BodyReader::new(&mut reader, framing).read_to_end(&mut body)?;
        Ok((body, reader.to_vec()))
    }

    #[test]
    fn parses_request_line_headers_and_query() {
        let req = parse(b"GET /files/a%20b?x=1&y=%C3%A9+z HTTP/1.1\r\nHost: h\r\nX-Test-A:  v  \r\n\r\n").unwrap().unwrap();
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, "/files/a%20b");
        assert_eq!(req.query, "x=1&y=%C3%A9+z");
        assert_eq!(req.minor_version, 1);
        assert_eq!(req.header("x-test-a"), Some("v"));
        assert_eq!(req.query_param("y").as_deref(), Some("é z"));
        assert_eq!(req.query_param("missing"), None);
        assert!(req.keep_alive());
        assert_eq!(req.framing().unwrap(), Framing::None);
    }

    #[test]
    fn accepts_bare_lf_and_leading_empty_lines() {
        let req = parse(b"\r\nPOST /echo HTTP/1.0\nContent-Length: 3\n\n").unwrap().unwrap();
        assert_eq!(req.method, "POST");
        assert_eq!(req.minor_version, 0);
        assert!(!req.keep_alive());
        assert_eq!(req.framing().unwrap(), Framing::Length(3));
    }

    #[test]
    fn clean_eof_is_no_request_but_a_truncated_head_is_an_error() {
        assert!(parse(b"").unwrap().is_none());
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n"), Err(HttpError::Malformed(_))));
    }

    #[test]
    fn rejects_malformed_heads() {
        for raw in [
            &b"GET /\r\n\r\n"[..],
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
        ] {
            assert!(matches!(parse(raw), Err(HttpError::Malformed(_))), "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn bounds_the_head_size() {
        let mut raw = b"GET / HTTP/1.1\r\nX: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        raw.extend(b"\r\n\r\n");
        assert!(matches!(parse(&raw), Err(HttpError::Malformed("request head too large"))));
    }

    #[test]
    fn framing_rules() {
        let framing = |headers: &str| parse(format!("POST / HTTP/1.1\r\n{headers}\r\n").as_bytes()).unwrap().unwrap().framing();
        assert_eq!(framing("Content-Length: 5\r\n").unwrap(), Framing::Length(5));
        assert_eq!(framing("Content-Length: 5\r\ncontent-length: 5\r\n").unwrap(), Framing::Length(5));
        assert_eq!(framing("Transfer-Encoding: Chunked\r\n").unwrap(), Framing::Chunked);
        assert!(framing("Content-Length: 5\r\nContent-Length: 6\r\n").is_err());
        assert!(framing("Content-Length: -1\r\n").is_err());
        assert!(framing("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n").is_err());
        assert!(framing("Transfer-Encoding: gzip, chunked\r\n").is_err());
    }

    #[test]
    fn reads_a_length_delimited_body_and_leaves_the_next_request() {
        let (body, rest) = body_of(b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(body, b"hello");
        assert_eq!(rest, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn reads_a_chunked_body_with_extensions_and_trailers() {
        let raw = b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\nA\r\n, world!!!\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
        let (body, rest) = body_of(raw).unwrap();
        assert_eq!(body, b"hello, world!!!");
        assert_eq!(rest, b"NEXT");
    }

    #[test]
    fn truncated_or_bad_chunked_bodies_are_errors() {
        for raw in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort",
        ] {
            assert!(body_of(raw).is_err(), "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb+c", false).as_deref(), Some("a/b+c"));
        assert_eq!(percent_decode("a+c", true).as_deref(), Some("a c"));
        assert_eq!(percent_decode("%zz", false), None);
        assert_eq!(percent_decode("%4", false), None);
        assert_eq!(percent_decode("%ff", false), None);
    }

    #[test]
    fn writes_responses_and_chunks() {
        let mut out = Vec::new();
        Response::text(200, "ok").with_header("X-A", "1\r\nInjected: y").write_to(&mut out, false).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("X-A: 1Injected: y\r\n"));
        assert!(text.contains("Content-Length: 2\r\nConnection: close\r\n\r\nok"));

        let mut chunked = ChunkedWriter::new(Vec::new());
        chunked.write_all(b"hello").unwrap();
        chunked.write_all(b"").unwrap();
        chunked.write_all(&[b'x'; 17]).unwrap();
        let out = chunked.finish().unwrap();
        assert_eq!(out, [&b"5\r\nhello\r\n11\r\n"[..], &[b'x'; 17], b"\r\n0\r\n\r\n"].concat());
    }
}
