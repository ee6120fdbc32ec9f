//! The HTTP API: the Azure Container Apps dynamic sessions data plane, plus health checks.
//!
//! Layout:
//! * [`routing`]: finds the pool and operation in a path under any prefix, and decodes the
//!   query string (identifiers included) strictly.
//! * [`handlers`]: one function per operation, calling the engine.
//! * [`upload`]: streaming multipart uploads, including bodies whose `Content-Type` is wrong.
//! * `forward`: custom container pools: every request outside the session management
//!   routes is forwarded to the session's container, WebSocket upgrades included.
//! * [`wire`]: the JSON shapes of both API generations.
//! * [`error`]: the error envelope and the status code of every failure.
//! * `dashboard`: the web dashboard (a static page) and the JSON it reads.
//! * [`pool_admin`]: the pool management API (`Microsoft.App/sessionPools` resources) on
//!   top of a [`pool_admin::PoolAdmin`] the server provides.
//! * `/metrics`: Prometheus metrics from `sandpool-telemetry`.
//!
//! Architecture invariant: this is the only crate that knows HTTP, and it knows nothing about
//! namespaces or processes; it talks to the engine only.

mod dashboard;
pub mod error;
mod forward;
mod handlers;
pub mod pool_admin;
pub mod routing;
mod upload;
pub mod wire;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use sandpool_auth::{Authenticator, Role};
use sandpool_engine::pool::PoolStatus;
use sandpool_engine::Engine;
use serde_json::json;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::error::{code, ApiError};

/// The largest file an upload may carry (contract §3.1.2: 128 MB, then 413).
pub const MAX_UPLOAD_BYTES: u64 = 128 * 1024 * 1024;
/// The largest JSON body (an execution request) the API reads.
pub const MAX_JSON_BYTES: usize = 16 * 1024 * 1024;

/// What every handler needs.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub auth: Arc<Authenticator>,
    pub telemetry: Arc<sandpool_telemetry::Telemetry>,
    /// The management API's backend; `None` answers its routes with 501.
    pub pool_admin: Option<Arc<dyn pool_admin::PoolAdmin>>,
}

/// The application, without a socket (tests drive it with `oneshot`).
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/dashboard", get(dashboard::page))
        .route("/dashboard/app.js", get(dashboard::script))
        .route("/dashboard/style.css", get(dashboard::style))
        .route("/dashboard/api/overview", get(dashboard::overview))
        .route("/dashboard/api/delete", axum::routing::post(dashboard::delete_session))
        .route("/pools", get(pool_admin::list))
        .route(
            "/pools/{name}",
            get(pool_admin::get_short).put(pool_admin::put_short).patch(pool_admin::patch_short).delete(pool_admin::delete_short),
        )
        .route("/subscriptions/{sub}/providers/Microsoft.App/sessionPools", get(pool_admin::list))
        .route("/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.App/sessionPools", get(pool_admin::list))
        .route(
            "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.App/sessionPools/{name}",
            get(pool_admin::get_arm).put(pool_admin::put_arm).patch(pool_admin::patch_arm).delete(pool_admin::delete_arm),
        )
        .fallback(handlers::dispatch)
        .with_state(state)
        .layer(CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| ApiError::internal("a request handler panicked").into_response()))
        // Spans carry the method and path only: the query holds the session identifier,
        // which is a secret.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(
                    |request: &Request<_>| tracing::info_span!("request", method = %request.method(), path = %request.uri().path()),
                )
                // Failures are logged where they are understood (ApiError); a 503 from
                // /readyz while a pool starts is not worth an error line.
                .on_failure(tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
}

/// Serves `app` on `listener` until `shutdown` completes, then lets in-flight requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state).into_make_service_with_connect_info::<SocketAddr>()).with_graceful_shutdown(shutdown).await
}

/// Prometheus metrics, for a caller with the reader role.
async fn metrics(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    let authorization = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let allowed = match state.auth.authenticate(authorization).await {
        Ok(principal) => principal.authorize(Role::Reader, None).map_err(ApiError::from),
        Err(err) => Err(ApiError::from(err)),
    };
    if let Err(err) = allowed {
        return err.into_response();
    }
    let pools: Vec<sandpool_telemetry::PoolGauges> = state
        .engine
        .pools()
        .iter()
        .map(|pool| {
            let counts = pool.counts();
            sandpool_telemetry::PoolGauges {
                pool: pool.name().to_owned(),
                ready: counts.ready,
                allocated: counts.allocated,
                pending: counts.pending,
                creating: counts.creating,
                max: pool.settings().max_concurrent_sessions,
            }
        })
        .collect();
    let text = state.telemetry.render(&pools);
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Response {
    let pools: Vec<serde_json::Value> = state
        .engine
        .pools()
        .iter()
        .map(|pool| {
            let counts = pool.counts();
            let status = match pool.status() {
                PoolStatus::Starting => "Starting".to_owned(),
                PoolStatus::Running => "Running".to_owned(),
                PoolStatus::Failed(reason) => format!("Failed: {reason}"),
                PoolStatus::Stopped => "Stopped".to_owned(),
            };
            json!({
                "name": pool.name(),
                "status": status,
                "ready": pool.is_ready(),
                "readySessions": counts.ready,
                "allocatedSessions": counts.allocated,
                "maxConcurrentSessions": pool.settings().max_concurrent_sessions,
            })
        })
        .collect();
    let ready = state.engine.is_ready();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({ "status": if ready { "ready" } else { "not ready" }, "pools": pools });
    let mut response = (status, Json(body)).into_response();
    if !ready {
        response.headers_mut().insert("x-ms-error-code", axum::http::HeaderValue::from_static(code::POOL_STARTING));
    }
    response
}
