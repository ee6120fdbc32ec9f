//! A minimal RFC 6455 WebSocket server: the opening handshake, the frame codec, and an echo
//! loop (text and binary messages, fragmented messages, ping/pong, the close handshake).
//!
//! Not implemented, because no test needs them: extensions (permessage-deflate is simply not
//! negotiated) and sending fragmented messages (every echo is one frame).

use std::fmt;
use std::io::{self, Read, Write};

use base64::Engine as _;
use sha1::{Digest as _, Sha1};

use crate::http::{Request, Response};

/// The key suffix fixed by RFC 6455 section 1.3.
const HANDSHAKE_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// The largest message (after reassembly) the echo accepts; larger ones close with 1009.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Close codes (RFC 6455 section 7.4.1).
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
const CLOSE_INVALID_PAYLOAD: u16 = 1007;
const CLOSE_TOO_BIG: u16 = 1009;

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(client_key: &str) -> String {
    let digest = Sha1::digest(format!("{client_key}{HANDSHAKE_GUID}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(digest)
}

/// Whether `req` asks to switch to WebSocket (before validating the details).
pub fn is_upgrade(req: &Request) -> bool {
    req.header_has_token("upgrade", "websocket")
}

/// Checks the opening handshake and returns the 101 response, or the error response to send
/// instead (400, or 426 naming the one version spoken here).
pub fn handshake(req: &Request) -> Result<Response, Response> {
    if req.method != "GET" || !is_upgrade(req) || !req.header_has_token("connection", "upgrade") {
        return Err(Response::error(400, "not a WebSocket upgrade request"));
    }
    if req.header("sec-websocket-version") != Some("13") {
        return Err(Response::error(426, "only WebSocket version 13 is supported").with_header("Sec-WebSocket-Version", "13"));
    }
    let key = match req.header("sec-websocket-key") {
        // The key is 16 random bytes in base64: 24 characters.
        Some(key) if key.len() == 24 => key,
        _ => return Err(Response::error(400, "missing or malformed Sec-WebSocket-Key")),
    };
    let mut response = Response { status: 101, headers: Vec::new(), body: Vec::new() }
        .with_header("Upgrade", "websocket")
        .with_header("Connection", "Upgrade")
        .with_header("Sec-WebSocket-Accept", accept_key(key));
    // Agree to the client's first subprotocol, so a proxy that drops this header is visible.
    if let Some(first) = req.header("sec-websocket-protocol").and_then(|p| p.split(',').next()) {
        response = response.with_header("Sec-WebSocket-Protocol", first.trim());
    }
    Ok(response)
}

/// One frame, payload already unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

/// Why reading a frame failed.
#[derive(Debug)]
pub enum FrameError {
    Io(io::Error),
    /// The peer broke the protocol; close with this code.
    Protocol(u16, &'static str),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "i/o error: {e}"),
            Self::Protocol(code, why) => write!(f, "protocol error {code}: {why}"),
        }
    }
}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// Reads one frame, checking what does not depend on the conversation (reserved bits,
/// known opcode, control frame rules, size) and unmasking the payload.
pub fn read_frame(r: &mut impl Read, max_payload: usize) -> Result<Frame, FrameError> {
    let mut head = [0u8; 2];
    r.read_exact(&mut head)?;
    let fin = head[0] & 0x80 != 0;
    let opcode = head[0] & 0x0F;
    if head[0] & 0x70 != 0 {
        // RSV bits mean an extension, and none was negotiated.
        return Err(FrameError::Protocol(CLOSE_PROTOCOL_ERROR, "reserved bits set"));
    }
    if !matches!(opcode, OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG) {
        return Err(FrameError::Protocol(CLOSE_PROTOCOL_ERROR, "unknown opcode"));
    }
    let masked = head[1] & 0x80 != 0;
    let len = read_payload_len(r, head[1] & 0x7F)?;
    if is_control(opcode) && (len > 125 || !fin) {
        return Err(FrameError::Protocol(CLOSE_PROTOCOL_ERROR, "control frame too long or fragmented"));
    }
    let len = usize::try_from(len).ok().filter(|l| *l <= max_payload).ok_or(FrameError::Protocol(CLOSE_TOO_BIG, "frame too large"))?;
    let mask = if masked {
        let mut key = [0u8; 4];
        r.read_exact(&mut key)?;
        Some(key)
    } else {
        None
    };
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    if let Some(key) = mask {
        apply_mask(&mut payload, key);
    }
    Ok(Frame { fin, opcode, masked, payload })
}

/// The 7-bit length, or the 16/64-bit extended length it announces.
fn read_payload_len(r: &mut impl Read, len7: u8) -> Result<u64, FrameError> {
    Ok(match len7 {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(FrameError::Protocol(CLOSE_PROTOCOL_ERROR, "64-bit length with the high bit set"));
            }
            len
        }
        n => u64::from(n),
    })
}

fn is_control(opcode: u8) -> bool {
    opcode & 0x8 != 0
}

/// XORs `data` with the 4-byte masking key (masking and unmasking are the same operation).
pub fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// Encodes one frame; `mask` is for clients (servers send unmasked frames).
pub fn encode_frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0F));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let start = out.len() + if mask.is_some() { 4 } else { 0 };
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key);
    }
    out
}

/// A close frame's payload: the code, then the reason.
fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    payload
}

/// A complete message: its opcode (text or binary) and payload.
type Message = (u8, Vec<u8>);
/// A close code and reason, for a peer that broke the protocol.
type CloseReason = (u16, &'static str);

/// A message being reassembled from a first frame and its continuations.
struct Partial {
    opcode: u8,
    data: Vec<u8>,
}

/// Echoes every message back until the client closes (or breaks the protocol, which is
/// answered with a close frame carrying the RFC's code). Returns when the connection is done.
pub fn echo(r: &mut impl Read, w: &mut impl Write) -> io::Result<()> {
    let mut partial: Option<Partial> = None;
    loop {
        let frame = match read_frame(r, MAX_MESSAGE_BYTES) {
            Ok(frame) => frame,
            Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(FrameError::Io(e)) => return Err(e),
            Err(FrameError::Protocol(code, why)) => return send_close(w, code, why),
        };
        // RFC 6455 section 5.1: a server must close on an unmasked client frame.
        if !frame.masked {
            return send_close(w, CLOSE_PROTOCOL_ERROR, "client frames must be masked");
        }
        match frame.opcode {
            OP_PING => write_frame(w, OP_PONG, &frame.payload)?,
            OP_PONG => {}
            OP_CLOSE => return answer_close(w, &frame.payload),
            _ => match assemble(&mut partial, frame) {
                Ok(Some((opcode, message))) => write_frame(w, opcode, &message)?,
                Ok(None) => {}
                Err((code, why)) => return send_close(w, code, why),
            },
        }
    }
}

/// Adds a data frame to the message in progress; returns the message once it is complete.
fn assemble(partial: &mut Option<Partial>, frame: Frame) -> Result<Option<Message>, CloseReason> {
    let current = match (partial.take(), frame.opcode) {
        (None, OP_CONTINUATION) => return Err((CLOSE_PROTOCOL_ERROR, "continuation without a message")),
        (Some(_), OP_TEXT | OP_BINARY) => return Err((CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")),
        (None, opcode) => Partial { opcode, data: frame.payload },
        (Some(mut p), _) => {
            if p.data.len() + frame.payload.len() > MAX_MESSAGE_BYTES {
                return Err((CLOSE_TOO_BIG, "message too large"));
            }
            p.data.extend_from_slice(&frame.payload);
            p
        }
    };
    if !frame.fin {
        *partial = Some(current);
        return Ok(None);
    }
    if current.opcode == OP_TEXT && std::str::from_utf8(&current.data).is_err() {
        return Err((CLOSE_INVALID_PAYLOAD, "text message is not UTF-8"));
    }
    Ok(Some((current.opcode, current.data)))
}

/// Completes a close the client started: echo its status code (RFC 6455 section 5.5.1).
fn answer_close(w: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let reply = match payload {
        [] => Vec::new(),
        [a, b, ..] => vec![*a, *b],
        // A 1-byte close payload is malformed.
        [_] => close_payload(CLOSE_PROTOCOL_ERROR, ""),
    };
    write_frame(w, OP_CLOSE, &reply)
}

fn send_close(w: &mut impl Write, code: u16, reason: &str) -> io::Result<()> {
    write_frame(w, OP_CLOSE, &close_payload(code, reason))
}

fn write_frame(w: &mut impl Write, opcode: u8, payload: &[u8]) -> io::Result<()> {
    w.write_all(&encode_frame(true, opcode, payload, None))?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::read_request;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    #[test]
    fn accept_key_matches_the_rfc_example() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn handshake_checks_the_request() {
        let req = |extra: &str| {
            let raw = format!("GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n{extra}\r\n");
            read_request(&mut raw.as_bytes()).unwrap().unwrap()
        };
        let ok =
            handshake(&req("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: a, b\r\n"))
                .unwrap();
        assert_eq!(ok.status, 101);
        assert!(ok.headers.contains(&("Sec-WebSocket-Accept".into(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into())));
        assert!(ok.headers.contains(&("Sec-WebSocket-Protocol".into(), "a".into())));
        assert_eq!(handshake(&req("Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")).unwrap_err().status, 426);
        assert_eq!(handshake(&req("Sec-WebSocket-Version: 13\r\n")).unwrap_err().status, 400);
    }

    #[test]
    fn decodes_the_rfc_examples() {
        // RFC 6455 section 5.7: unmasked and masked "Hello".
        let unmasked = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let frame = read_frame(&mut &unmasked[..], 1024).unwrap();
        assert_eq!(frame, Frame { fin: true, opcode: OP_TEXT, masked: false, payload: b"Hello".to_vec() });
        let masked = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let frame = read_frame(&mut &masked[..], 1024).unwrap();
        assert_eq!(frame.payload, b"Hello");
        assert!(frame.masked);
        assert_eq!(encode_frame(true, OP_TEXT, b"Hello", Some(KEY)), masked);
        assert_eq!(encode_frame(true, OP_TEXT, b"Hello", None), unmasked);
    }

    #[test]
    fn round_trips_every_length_encoding() {
        for len in [0, 125, 126, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let encoded = encode_frame(false, OP_BINARY, &payload, Some(KEY));
            let frame = read_frame(&mut encoded.as_slice(), 1 << 20).unwrap();
            assert_eq!((frame.fin, frame.opcode, frame.payload.len()), (false, OP_BINARY, len));
            assert_eq!(frame.payload, payload);
        }
    }

    #[test]
    fn rejects_bad_frames() {
        let protocol_error = |raw: &[u8], max: usize| match read_frame(&mut &raw[..], max) {
            Err(FrameError::Protocol(code, _)) => code,
            other => panic!("{other:?}"),
        };
        assert_eq!(protocol_error(&[0xC1, 0x80, 0, 0, 0, 0], 10), CLOSE_PROTOCOL_ERROR); // RSV1
        assert_eq!(protocol_error(&[0x83, 0x80, 0, 0, 0, 0], 10), CLOSE_PROTOCOL_ERROR); // opcode 3
        assert_eq!(protocol_error(&[0x09, 0x80, 0, 0, 0, 0], 10), CLOSE_PROTOCOL_ERROR); // fragmented ping
        assert_eq!(protocol_error(&[0x89, 0xFE, 0, 126], 1000), CLOSE_PROTOCOL_ERROR); // 126-byte ping
        assert_eq!(protocol_error(&[0x82, 0x8B, 0, 0, 0, 0], 10), CLOSE_TOO_BIG);
        assert!(matches!(read_frame(&mut &[0x81, 0x85, 1][..], 10), Err(FrameError::Io(_))));
    }

    /// Runs the echo loop over `client_frames` and decodes what it sent back.
    fn echo_frames(client_frames: &[Vec<u8>]) -> Vec<Frame> {
        let input = client_frames.concat();
        let mut output = Vec::new();
        echo(&mut input.as_slice(), &mut output).unwrap();
        let mut out = output.as_slice();
        let mut frames = Vec::new();
        while !out.is_empty() {
            frames.push(read_frame(&mut out, usize::MAX).unwrap());
        }
        frames
    }

    #[test]
    fn echoes_messages_pings_and_the_close_handshake() {
        let frames = echo_frames(&[
            encode_frame(true, OP_TEXT, "héllo".as_bytes(), Some(KEY)),
            encode_frame(false, OP_BINARY, &[0, 1], Some(KEY)),
            encode_frame(true, OP_PING, b"p", Some(KEY)),
            encode_frame(true, OP_CONTINUATION, &[2, 255], Some(KEY)),
            encode_frame(true, OP_CLOSE, &close_payload(1000, "bye"), Some(KEY)),
            encode_frame(true, OP_TEXT, b"never read", Some(KEY)),
        ]);
        let summary: Vec<(u8, Vec<u8>, bool)> = frames.into_iter().map(|f| (f.opcode, f.payload, f.masked)).collect();
        assert_eq!(
            summary,
            [
                (OP_TEXT, "héllo".as_bytes().to_vec(), false),
                (OP_PONG, b"p".to_vec(), false),
                (OP_BINARY, vec![0, 1, 2, 255], false),
                (OP_CLOSE, 1000u16.to_be_bytes().to_vec(), false),
            ]
        );
    }

    #[test]
    fn closes_on_protocol_violations() {
        let close_code = |frames: &[Vec<u8>]| {
            let last = echo_frames(frames).pop().unwrap();
            assert_eq!(last.opcode, OP_CLOSE);
            u16::from_be_bytes([last.payload[0], last.payload[1]])
        };
        assert_eq!(close_code(&[encode_frame(true, OP_TEXT, b"x", None)]), CLOSE_PROTOCOL_ERROR);
        assert_eq!(close_code(&[encode_frame(true, OP_CONTINUATION, b"x", Some(KEY))]), CLOSE_PROTOCOL_ERROR);
        assert_eq!(
            close_code(&[encode_frame(false, OP_TEXT, b"x", Some(KEY)), encode_frame(true, OP_TEXT, b"y", Some(KEY))]),
            CLOSE_PROTOCOL_ERROR
        );
        assert_eq!(close_code(&[encode_frame(true, OP_TEXT, &[0xff], Some(KEY))]), CLOSE_INVALID_PAYLOAD);
    }

    #[test]
    fn eof_without_close_ends_quietly() {
        assert!(echo_frames(&[encode_frame(true, OP_BINARY, b"x", Some(KEY))]).len() == 1);
    }
}
