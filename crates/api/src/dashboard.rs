//! The dashboard: one static page (`/dashboard`, with its script and style) and the JSON it
//! reads (`/dashboard/api/*`), behind the same tokens as the API.
//!
//! The page itself holds no data, so it is served without a token; the browser asks for one
//! and sends it as a bearer token with every API call (it is kept in the tab's
//! `sessionStorage`, never in a URL). `overview` needs the `reader` role; identifiers and
//! recent events are included only for a `contributor` (or `admin`), readers see each
//! session's hash instead. Deleting a session needs `contributor`.

use std::time::SystemTime;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use sandpool_auth::{Principal, Role};
use sandpool_engine::Identifier;
use sandpool_telemetry::timeline::seconds_since;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{code, ApiError};
use crate::{wire, AppState};

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/style.css");
/// Recent events shown on the page.
const RECENT_EVENTS: usize = 50;

/// No inline script or style, nothing from elsewhere: the page can only talk to this server.
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

pub async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

async fn caller(state: &AppState, headers: &HeaderMap, needed: Role) -> Result<Principal, ApiError> {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let principal = state.auth.authenticate(authorization).await?;
    principal.authorize(needed, None)?;
    Ok(principal)
}

/// Pools, their sessions, the last hour per minute, and (for contributors) recent events.
pub async fn overview(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match overview_body(&state, &headers).await {
        Ok(body) => Json(body).into_response(),
        Err(err) => err.into_response(),
    }
}

async fn overview_body(state: &AppState, headers: &HeaderMap) -> Result<Value, ApiError> {
    let principal = caller(state, headers, Role::Reader).await?;
    let sees_identifiers = principal.authorize(Role::Contributor, None).is_ok();
    let now = SystemTime::now();
    let pools: Vec<Value> = state
        .engine
        .pools()
        .iter()
        .map(|pool| {
            let counts = pool.counts();
            let sessions: Vec<Value> = pool
                .sessions()
                .iter()
                .map(|session| {
                    let identifier = if sees_identifiers { session.identifier.as_str().to_owned() } else { session.identifier.redacted() };
                    json!({
                        "identifier": identifier,
                        "sessionGuid": session.sandbox_id,
                        "ageSeconds": seconds_since(session.created_at, now),
                        "idleSeconds": if session.in_use { 0 } else { seconds_since(session.last_access, now) },
                        "cooldownLeftSeconds": session.expires_at.duration_since(now).map(|d| d.as_secs()).unwrap_or(0),
                        "inUse": session.in_use,
                    })
                })
                .collect();
            json!({
                "name": pool.name(),
                "status": format!("{:?}", pool.status()),
                "ready": counts.ready,
                "allocated": counts.allocated,
                "creating": counts.creating,
                "max": pool.settings().max_concurrent_sessions,
                "sessions": sessions,
            })
        })
        .collect();
    let minutes: Vec<Value> = state
        .telemetry
        .timeline
        .last_hour(now)
        .iter()
        .map(|m| {
            let mean = if m.allocations > 0 { m.allocation_wait_ms_sum / m.allocations as f64 } else { 0.0 };
            json!({
                "start": m.start,
                "allocations": m.allocations,
                "allocationWaitMsMean": mean,
                "allocationWaitMsMax": m.allocation_wait_ms_max,
                "executions": m.executions,
                "executionFailures": m.execution_failures,
            })
        })
        .collect();
    let events: Option<Vec<Value>> = sees_identifiers.then(|| {
        let query = sandpool_telemetry::EventQuery { limit: RECENT_EVENTS, ..Default::default() };
        state.telemetry.events.query(&query).iter().rev().map(wire::event).collect()
    });
    Ok(json!({
        "caller": { "subject": principal.subject, "roles": principal.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(), "canDelete": sees_identifiers },
        "pools": pools,
        "minutes": minutes,
        "events": events,
    }))
}

#[derive(Debug, Deserialize)]
pub struct DeleteParams {
    pool: String,
    identifier: String,
}

/// Deletes one session (the dashboard's button).
pub async fn delete_session(State(state): State<AppState>, headers: HeaderMap, Query(params): Query<DeleteParams>) -> Response {
    let result = async {
        caller(&state, &headers, Role::Contributor).await?;
        let pool = state
            .engine
            .pool(&params.pool)
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, code::POOL_NOT_FOUND, format!("no session pool '{}'", params.pool)))?;
        let identifier = Identifier::parse(&params.identifier).map_err(|e| ApiError::validation(e.to_string()))?;
        if pool.delete(&identifier).await {
            Ok(StatusCode::NO_CONTENT.into_response())
        } else {
            Err(ApiError::new(StatusCode::NOT_FOUND, code::SESSION_NOT_FOUND, "there is no session with this identifier"))
        }
    }
    .await;
    result.unwrap_or_else(|err| err.into_response())
}
