//! A lean HTTP/1.1 client on hyper: one keep-alive connection per virtual client, no pool,
//! no locks, so the load generator spends as little of the shared CPU as it can.

use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

/// One HTTP/1.1 connection, reopened if the server closed it.
pub struct Conn {
    addr: SocketAddr,
    host: HeaderValue,
    auth: Option<HeaderValue>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    pub async fn open(addr: SocketAddr, token: Option<&str>) -> anyhow::Result<Conn> {
        let auth = token.map(|t| HeaderValue::from_str(&format!("Bearer {t}"))).transpose().context("bad token")?;
        let host = HeaderValue::from_str(&addr.to_string()).context("bad address")?;
        let mut conn = Conn { addr, host, auth, sender: None };
        conn.connect().await?;
        Ok(conn)
    }

    async fn connect(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        let stream = tokio::net::TcpStream::connect(self.addr).await.with_context(|| format!("cannot connect to {}", self.addr))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.context("HTTP handshake failed")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(self.sender.insert(sender))
    }

    /// Sends one request and reads the whole answer.
    pub async fn request(&mut self, method: Method, path: &str, body: Option<Bytes>) -> anyhow::Result<(StatusCode, Bytes)> {
        let mut builder = Request::builder().method(method).uri(path).header(HOST, self.host.clone());
        if let Some(auth) = &self.auth {
            builder = builder.header(AUTHORIZATION, auth.clone());
        }
        let request = match body {
            Some(body) => builder.header(CONTENT_TYPE, HeaderValue::from_static("application/json")).body(Full::new(body)),
            None => builder.body(Full::new(Bytes::new())),
        }
        .context("cannot build the request")?;
        let reusable = self.sender.as_ref().is_some_and(|s| !s.is_closed());
        let sender = if reusable { self.sender.as_mut().expect("present") } else { self.connect().await? };
        sender.ready().await.context("connection not ready")?;
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(err) => {
                self.sender = None;
                return Err(err).with_context(|| format!("request to {path} failed"));
            }
        };
        let status = response.status();
        let body = response.into_body().collect().await.context("cannot read the response")?.to_bytes();
        Ok((status, body))
    }

    pub async fn get(&mut self, path: &str) -> anyhow::Result<(StatusCode, Bytes)> {
        self.request(Method::GET, path, None).await
    }

    pub async fn post(&mut self, path: &str, body: Bytes) -> anyhow::Result<(StatusCode, Bytes)> {
        self.request(Method::POST, path, Some(body)).await
    }
}

/// Whether `haystack` contains `needle`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
