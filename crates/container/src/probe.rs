//! Liveness and startup probes (HTTP and TCP), with Azure's probe settings.
//!
//! A probe connects inside the session's network namespace, like the proxy does. An HTTP
//! probe succeeds on a status from 200 to 399 (as Kubernetes and Azure count it); a TCP
//! probe succeeds when the port accepts a connection.

use std::net::SocketAddr;
use std::time::Duration;

use sandpool_sandbox::netns::NetNamespace;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// When a probe runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// Until it first succeeds, the session is not ready; too many failures and it is
    /// replaced.
    Startup,
    /// After start-up, for the session's whole life; too many failures in a row and it is
    /// stopped and replaced.
    Liveness,
}

/// What a probe checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeCheck {
    Http { path: String, port: u16, host: Option<String>, headers: Vec<(String, String)> },
    Tcp { port: u16 },
}

/// One configured probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub kind: ProbeKind,
    pub check: ProbeCheck,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
}

impl Probe {
    /// Checks once; the error says what was seen.
    pub async fn check_once(&self, netns: &NetNamespace) -> Result<(), String> {
        match tokio::time::timeout(self.timeout, self.check_inner(netns)).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
        }
    }

    async fn check_inner(&self, netns: &NetNamespace) -> Result<(), String> {
        let port = match &self.check {
            ProbeCheck::Http { port, .. } | ProbeCheck::Tcp { port } => *port,
        };
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let mut stream = netns.connect_async(address, self.timeout).await.map_err(|e| format!("cannot connect to port {port}: {e}"))?;
        let ProbeCheck::Http { path, host, headers, .. } = &self.check else {
            return Ok(());
        };
        let host = host.clone().unwrap_or_else(|| format!("127.0.0.1:{port}"));
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sandpool-probe\r\nConnection: close\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.map_err(|e| format!("cannot send the probe request: {e}"))?;
        let mut head = Vec::with_capacity(64);
        let mut buf = [0u8; 256];
        while !head.contains(&b'\n') && head.len() < 4096 {
            let n = stream.read(&mut buf).await.map_err(|e| format!("cannot read the probe response: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let status = parse_status(&head).ok_or_else(|| "the answer is not an HTTP response".to_owned())?;
        if (200..400).contains(&status) {
            Ok(())
        } else {
            Err(format!("GET {path} answered {status}"))
        }
    }
}

/// The status code of an HTTP/1.x status line.
fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split_whitespace();
    parts.next().filter(|version| version.starts_with("HTTP/1."))?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_parsed() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.0 503 Service Unavailable\r\nx: y"), Some(503));
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status(b""), None);
    }
}
