//! Forwarding requests to custom container sessions (contract §4.1).
//!
//! Everything after the pool segment goes to the session's target port: method, path,
//! query (the `identifier` included), headers and a streaming body, and back the status,
//! headers and a streaming body. WebSocket (and any other `Upgrade`) handshakes pass through
//! and the two connections are then joined byte for byte. The `Authorization` header is not
//! forwarded: it carries the caller's sandpool token, which the container has no business
//! seeing. Hop-by-hop headers are dropped as any proxy must (RFC 9110 §7.6.1).
//!
//! The request holds a lease on the session until the response body has been sent (or the
//! upgraded connection closed), so a session is never reaped under an open request.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, Method, Request, StatusCode, Uri};
use axum::response::Response;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use sandpool_engine::backend::SandboxError;
use sandpool_engine::session::SessionLease;

use crate::error::{code, ApiError};

/// Headers that describe one hop, never forwarded (`Connection` and `Upgrade` are re-added
/// for an upgrade).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// What to forward.
pub struct Forward {
    pub method: Method,
    /// Path after the pool segment, as sent, plus the query string as sent.
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Body,
    /// The client side of a requested protocol upgrade.
    pub on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// How long to wait for the container's response headers.
    pub timeout: std::time::Duration,
}

/// Sends `request` to the lease's container and returns its response.
pub async fn forward(lease: SessionLease, request: Forward) -> Result<Response, ApiError> {
    let upstream = lease.upstream().ok_or_else(|| ApiError::internal("a custom container session has no upstream"))?;
    let stream = upstream.connect().await.map_err(unreachable_container)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| bad_gateway(format!("cannot talk HTTP to the session's container: {e}")))?;
    tokio::spawn(async move {
        if let Err(err) = connection.with_upgrades().await {
            tracing::debug!("connection to a session container ended: {err}");
        }
    });

    let upgrade = request.on_upgrade.is_some() && request.headers.contains_key(header::UPGRADE);
    let uri: Uri = request.path_and_query.parse().map_err(|_| ApiError::validation("the request path cannot be forwarded"))?;
    let mut outgoing = Request::builder().method(request.method).uri(uri);
    let headers = outgoing.headers_mut().expect("a fresh builder has headers");
    copy_end_to_end(&request.headers, headers);
    headers.remove(header::AUTHORIZATION);
    if upgrade {
        headers.insert(header::CONNECTION, header::HeaderValue::from_static("upgrade"));
        if let Some(protocol) = request.headers.get(header::UPGRADE) {
            headers.insert(header::UPGRADE, protocol.clone());
        }
    }
    let outgoing = outgoing.body(request.body).map_err(|e| ApiError::validation(format!("the request cannot be forwarded: {e}")))?;
    let mut response = match tokio::time::timeout(request.timeout, sender.send_request(outgoing)).await {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => {
            return Err(bad_gateway(format!("the session's container closed the connection without a complete response: {err}")))
        }
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                code::UPSTREAM_TIMEOUT,
                format!("the session's container did not answer within {} s", request.timeout.as_secs()),
            ))
        }
    };

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client) = request.on_upgrade else {
            return Err(bad_gateway("the session's container switched protocols without being asked to"));
        };
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let mut reply = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
        for (name, value) in response.headers() {
            reply = reply.header(name, value);
        }
        tokio::spawn(async move {
            // The lease lives as long as the joined connection.
            let _lease = lease;
            let (client, upstream) = match tokio::join!(client, upstream_upgrade) {
                (Ok(client), Ok(upstream)) => (client, upstream),
                (client, upstream) => {
                    tracing::debug!(client_ok = client.is_ok(), upstream_ok = upstream.is_ok(), "an upgrade did not complete");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
        return reply.body(Body::empty()).map_err(ApiError::internal);
    }

    let (parts, incoming) = response.into_parts();
    let mut reply = Response::builder().status(parts.status);
    copy_end_to_end(&parts.headers, reply.headers_mut().expect("a fresh builder has headers"));
    // The closure owns the lease: it is released when the body is done or dropped.
    let body = incoming.map_frame(move |frame| {
        let _ = &lease;
        frame
    });
    reply.body(Body::new(body)).map_err(ApiError::internal)
}

/// Copies every header except the hop-by-hop ones and those `Connection` names.
fn copy_end_to_end(from: &HeaderMap, to: &mut HeaderMap) {
    let named: Vec<HeaderName> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for (name, value) in from {
        if HOP_BY_HOP.contains(&name.as_str()) || named.contains(name) {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

fn bad_gateway(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, code::UPSTREAM_FAILED, message)
}

fn unreachable_container(err: SandboxError) -> ApiError {
    match err {
        SandboxError::Died { message, .. } => bad_gateway(format!("{message}; the next request with this identifier starts a new session")),
        other => bad_gateway(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_not_forwarded() {
        let mut from = HeaderMap::new();
        from.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        from.insert("keep-alive", "timeout=5".parse().unwrap());
        from.insert("x-private", "secret".parse().unwrap());
        from.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        from.append("x-test-a", "1".parse().unwrap());
        from.append("x-test-a", "2".parse().unwrap());
        from.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        let mut to = HeaderMap::new();
        copy_end_to_end(&from, &mut to);
        assert_eq!(to.get_all("x-test-a").iter().count(), 2);
        assert_eq!(to.get(header::CONTENT_TYPE).unwrap(), "text/plain");
        for gone in ["connection", "keep-alive", "x-private", "transfer-encoding"] {
            assert!(!to.contains_key(gone), "{gone} was forwarded");
        }
    }
}
