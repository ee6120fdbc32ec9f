//! The pool management API: `Microsoft.App/sessionPools` resources (contract §5).
//!
//! Routes (contributor role; an `api-version` is accepted and not required):
//! * `GET  /subscriptions/{s}/providers/Microsoft.App/sessionPools` and
//!   `GET  /subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.App/sessionPools`: list;
//! * `GET | PUT | PATCH | DELETE …/resourceGroups/{rg}/providers/Microsoft.App/sessionPools/{name}`;
//! * the same under sandpool's short prefix: `GET /pools`, and `/pools/{name}` itself.
//!
//! `PUT …?whatIf=true` validates the resource and answers what applying it would change
//! (`sandpool apply` shows that as its plan) without changing anything.
//!
//! This module knows the routes, the roles and the status codes; what a pool definition is
//! and how a pool is built belong to the server ([`PoolAdmin`], implemented by the binary).
//! Writes answer like a finished Azure long-running operation (`provisioningState:
//! Succeeded`, 200 or 201), so ARM clients stop polling at once.

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use sandpool_auth::Role;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::AppState;

/// What the server does for the management API.
#[async_trait]
pub trait PoolAdmin: Send + Sync {
    /// Every pool, as `sessionPools` resources, by name.
    async fn list(&self) -> Result<Vec<Value>, AdminError>;
    /// One pool, if it exists.
    async fn get(&self, name: &str) -> Result<Option<Value>, AdminError>;
    /// Creates or replaces a pool from a `sessionPools` resource; returns the stored resource
    /// and whether the pool is new.
    async fn put(&self, name: &str, resource: Value) -> Result<(Value, bool), AdminError>;
    /// Applies a JSON merge patch to an existing pool's resource.
    async fn patch(&self, name: &str, patch: Value) -> Result<Value, AdminError>;
    /// Deletes a pool and every session in it; false if there was none.
    async fn delete(&self, name: &str) -> Result<bool, AdminError>;
    /// What a `put` of `resource` would change, changing nothing: `{"change": "create" |
    /// "update" | "none", "fields": [...]}`.
    async fn plan(&self, name: &str, resource: Value) -> Result<Value, AdminError>;
}

/// Why a management request failed; messages are shown to the client.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The definition is not acceptable (a bad value, an unknown property).
    #[error("{0}")]
    Invalid(String),
    #[error("session pool '{0}' does not exist")]
    NotFound(String),
    /// The definition is valid but the pool cannot run (a missing image or runtime).
    #[error("{0}")]
    CannotStart(String),
    /// The database could not record the change (nothing was changed).
    #[error("{0}")]
    Storage(String),
}

impl From<AdminError> for ApiError {
    fn from(err: AdminError) -> ApiError {
        let message = err.to_string();
        match err {
            AdminError::Invalid(_) => ApiError::new(StatusCode::BAD_REQUEST, code::INVALID_POOL, message),
            AdminError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, crate::error::code::POOL_NOT_FOUND, message),
            AdminError::CannotStart(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code::POOL_START_FAILED, message),
            AdminError::Storage(_) => ApiError::new(StatusCode::INSUFFICIENT_STORAGE, code::STORAGE, message),
        }
    }
}

mod code {
    pub const INVALID_POOL: &str = "InvalidSessionPoolDefinition";
    pub const POOL_START_FAILED: &str = "SessionPoolCannotStart";
    pub const STORAGE: &str = "StateStorageFailed";
}

/// Checks the caller holds the contributor role.
async fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let authorization = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let principal = state.auth.authenticate(authorization).await?;
    principal.authorize(Role::Contributor, None)?;
    Ok(())
}

fn admin(state: &AppState) -> Result<&dyn PoolAdmin, ApiError> {
    state.pool_admin.as_deref().ok_or_else(|| {
        ApiError::new(StatusCode::NOT_IMPLEMENTED, crate::error::code::UNSUPPORTED, "this server does not manage pools at run time")
    })
}

pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> Response {
    respond(async {
        authorize(&state, &headers).await?;
        let pools = admin(&state)?.list().await?;
        Ok(Json(json!({ "value": pools, "nextLink": null })).into_response())
    })
    .await
}

/// `{name}` from `/pools/{name}`; `(sub, rg, name)` from the ARM path.
pub async fn get_short(state: State<AppState>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    get(state, name, headers).await
}

pub async fn get_arm(state: State<AppState>, Path((_, _, name)): Path<(String, String, String)>, headers: HeaderMap) -> Response {
    get(state, name, headers).await
}

async fn get(State(state): State<AppState>, name: String, headers: HeaderMap) -> Response {
    respond(async {
        authorize(&state, &headers).await?;
        match admin(&state)?.get(&name).await? {
            Some(resource) => Ok(Json(resource).into_response()),
            None => Err(AdminError::NotFound(name).into()),
        }
    })
    .await
}

pub async fn put_short(state: State<AppState>, Path(name): Path<String>, query: RawQuery, headers: HeaderMap, body: Body) -> Response {
    put(state, name, query, headers, body).await
}

pub async fn put_arm(
    state: State<AppState>,
    Path((_, _, name)): Path<(String, String, String)>,
    query: RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    put(state, name, query, headers, body).await
}

async fn put(State(state): State<AppState>, name: String, RawQuery(query): RawQuery, headers: HeaderMap, body: Body) -> Response {
    respond(async {
        let what_if = what_if(query.as_deref())?;
        authorize(&state, &headers).await?;
        if what_if {
            let resource = crate::handlers::read_json_expecting(body, "a sessionPools resource: {\"properties\": {...}}").await?;
            let plan = admin(&state)?.plan(&name, resource).await?;
            return Ok(Json(plan).into_response());
        }
        let resource = crate::handlers::read_json_expecting(body, "a sessionPools resource: {\"properties\": {...}}").await?;
        let (stored, created) = admin(&state)?.put(&name, resource).await?;
        let status = if created { StatusCode::CREATED } else { StatusCode::OK };
        Ok((status, Json(stored)).into_response())
    })
    .await
}

pub async fn patch_short(state: State<AppState>, Path(name): Path<String>, headers: HeaderMap, body: Body) -> Response {
    patch(state, name, headers, body).await
}

pub async fn patch_arm(
    state: State<AppState>,
    Path((_, _, name)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    patch(state, name, headers, body).await
}

async fn patch(State(state): State<AppState>, name: String, headers: HeaderMap, body: Body) -> Response {
    respond(async {
        authorize(&state, &headers).await?;
        let changes = crate::handlers::read_json_expecting(body, "a JSON merge patch of the pool's resource").await?;
        let stored = admin(&state)?.patch(&name, changes).await?;
        Ok(Json(stored).into_response())
    })
    .await
}

pub async fn delete_short(state: State<AppState>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    delete(state, name, headers).await
}

pub async fn delete_arm(state: State<AppState>, Path((_, _, name)): Path<(String, String, String)>, headers: HeaderMap) -> Response {
    delete(state, name, headers).await
}

async fn delete(State(state): State<AppState>, name: String, headers: HeaderMap) -> Response {
    respond(async {
        authorize(&state, &headers).await?;
        // The deletion is complete when this answers, and deleting is idempotent: 204 either
        // way (the sessionPools API allows 202 and 204; the Azure SDK refuses a 200).
        admin(&state)?.delete(&name).await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

/// `whatIf`, `whatIf=true` or `whatIf=1` ask for a plan; `false`, `0` or no `whatIf` for the
/// change itself; any other value is refused rather than guessed.
fn what_if(query: Option<&str>) -> Result<bool, ApiError> {
    let mut asked = false;
    for pair in query.unwrap_or_default().split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !key.eq_ignore_ascii_case("whatif") {
            continue;
        }
        asked = match value.to_ascii_lowercase().as_str() {
            "" | "true" | "1" => true,
            "false" | "0" => false,
            other => return Err(AdminError::Invalid(format!("whatIf={other:?} is neither true nor false")).into()),
        };
    }
    Ok(asked)
}

async fn respond(work: impl std::future::Future<Output = Result<Response, ApiError>>) -> Response {
    work.await.unwrap_or_else(IntoResponse::into_response)
}
