//! One function per data-plane operation.
//!
//! [`dispatch`] is the single entry point for every pool path: it routes, authenticates,
//! finds the pool and calls the operation. Every failure becomes an [`ApiError`] and thus the
//! error envelope; nothing here panics on client input.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use http_body_util::BodyExt;
use sandpool_engine::backend::{Cell, FileEntry};
use sandpool_engine::events::FileChange;
use sandpool_engine::path::DataPath;
use sandpool_engine::pool::Pool;
use sandpool_engine::session::SessionLease;
use sandpool_engine::Identifier;
use sandpool_engine::PoolKind;
use serde_json::{json, Value};
use tokio_util::io::ReaderStream;
use tracing::Instrument;

use crate::error::{code, ApiError};
use crate::routing::{management_operation, route, split_pool, Operation, Query, Target};
use crate::{upload, wire, AppState, MAX_JSON_BYTES, MAX_UPLOAD_BYTES};

/// Sessions per page of `listSessions` (the management API's page size).
const SESSIONS_PAGE: usize = 300;

/// Handles every request that is not a health check.
#[axum::debug_handler]
pub async fn dispatch(State(state): State<AppState>, request: axum::extract::Request) -> Response {
    let started = Instant::now();
    let trace_id = uuid::Uuid::new_v4().to_string();
    let (mut parts, body) = request.into_parts();
    // Present when the connection can be upgraded (a WebSocket to a custom container).
    let on_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let (method, uri, headers) = (parts.method, parts.uri, parts.headers);
    let mut route_name = "unknown";
    let mut response = match handle(&state, &method, &uri, &headers, body, on_upgrade, &mut route_name).await {
        Ok(response) => response,
        Err(err) => err.into_response_with(&trace_id),
    };
    let took = started.elapsed();
    state.telemetry.metrics.observe_request(route_name, response.status().as_u16(), took);
    if let Ok(value) = HeaderValue::from_str(&format!("{:.3}", took.as_secs_f64() * 1e3)) {
        response.headers_mut().insert("x-ms-total-execution-service-time", value);
    }
    response
}

async fn handle(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    route_name: &mut &'static str,
) -> Result<Response, ApiError> {
    let Some(pool_path) = split_pool(uri.path())? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            code::ROUTE_NOT_FOUND,
            "not a session pool endpoint; use /pools/{pool}/... or .../sessionPools/{pool}/...",
        ));
    };
    let custom_pool = state.engine.pool(&pool_path.pool).filter(|pool| pool.settings().kind == PoolKind::CustomContainer);
    let target = match custom_pool {
        Some(pool) => match management_operation(method, &pool_path.rest) {
            Some(operation) => Target { pool: pool_path.pool, base_path: pool_path.base_path, operation },
            None => {
                *route_name = "forward";
                return forward_to_container(state, pool, &pool_path.raw_rest, method, uri, headers, body, on_upgrade).await;
            }
        },
        None => route(method, uri.path())?.expect("split_pool found a pool segment"),
    };
    *route_name = target.operation.name();
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let principal = state.auth.authenticate(authorization).instrument(tracing::info_span!("auth")).await?;
    let query = Query::parse(uri.query())?;
    let identifier = if target.operation.names_identifier() { query.get("identifier") } else { None };
    principal.authorize(target.operation.required_role(), identifier)?;
    let pool = state.engine.pool(&target.pool).ok_or_else(|| {
        let known: Vec<String> = state.engine.pools().iter().map(|p| p.name().to_owned()).collect();
        ApiError::new(
            StatusCode::NOT_FOUND,
            code::POOL_NOT_FOUND,
            format!("session pool '{}' does not exist; this server has: {}", target.pool, known.join(", ")),
        )
    })?;
    let request = Ctx { pool, target, query, headers, telemetry: &state.telemetry };
    match request.target.operation.clone() {
        Operation::LegacyExecute => legacy_execute(&request, body).await,
        Operation::Execute => execute(&request, body).await,
        Operation::GetExecution { id } => get_execution(&request, &id).await,
        Operation::LegacyUpload => upload_files(&request, body, true).await,
        Operation::Upload => upload_files(&request, body, false).await,
        Operation::ListFiles => list_files(&request).await,
        Operation::LegacyDownload { name } => download(&request, DataPath::parse(&name)?).await,
        Operation::FileContent { name } => download(&request, DataPath::parse_in(request.query.get("path"), &name)?).await,
        Operation::FileMetadata { name } => file_metadata(&request, DataPath::parse_in(request.query.get("path"), &name)?).await,
        Operation::DeleteFile { name } => delete_file(&request, DataPath::parse_in(request.query.get("path"), &name)?).await,
        Operation::GetSession => get_session(&request, false).await,
        Operation::ManagementGetSession => get_session(&request, true).await,
        Operation::DeleteSession => delete_session(&request, false).await,
        Operation::ManagementStopSession => delete_session(&request, true).await,
        Operation::ListSessions => list_sessions(&request, false),
        Operation::ManagementListSessions => list_sessions(&request, true),
        Operation::Metadata => metadata(&request),
        Operation::ListEvents => list_events(&request),
    }
}

/// Forwards a request to the session container of a custom container pool.
#[allow(clippy::too_many_arguments)]
async fn forward_to_container(
    state: &AppState,
    pool: Arc<Pool>,
    raw_rest: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Result<Response, ApiError> {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let principal = state.auth.authenticate(authorization).instrument(tracing::info_span!("auth")).await?;
    let query = Query::parse(uri.query())?;
    principal.authorize(sandpool_auth::Role::Executor, query.get("identifier"))?;
    let identifier = query.identifier()?;
    let lease = pool.lease(&identifier).instrument(tracing::info_span!("allocate", pool = %pool.name())).await?;
    let path_and_query = match uri.query() {
        Some(query) => format!("{raw_rest}?{query}"),
        None => raw_rest.to_owned(),
    };
    let request = crate::forward::Forward {
        method: method.clone(),
        path_and_query,
        headers: headers.clone(),
        body,
        on_upgrade,
        timeout: pool.settings().max_timeout,
    };
    crate::forward::forward(lease, request).instrument(tracing::info_span!("forward", pool = %pool.name())).await
}

/// One request's context.
struct Ctx<'a> {
    pool: Arc<Pool>,
    target: Target,
    query: Query,
    headers: &'a HeaderMap,
    telemetry: &'a sandpool_telemetry::Telemetry,
}

impl Ctx<'_> {
    /// The session for the request's identifier, allocated on first use.
    async fn lease(&self) -> Result<(Identifier, SessionLease), ApiError> {
        let identifier = self.query.identifier()?;
        let lease = self.pool.lease(&identifier).instrument(tracing::info_span!("allocate", pool = %self.pool.name())).await?;
        Ok((identifier, lease))
    }
}

fn execute_span(request: &Ctx<'_>) -> tracing::Span {
    tracing::info_span!("execute", pool = %request.pool.name())
}

/// Azure's timing headers of an execution (contract §2.5), in milliseconds: the time spent
/// getting the session (`x-ms-preparation-time`) and running the code
/// (`x-ms-container-execution-duration`).
fn with_timings(mut response: Response, preparation: Duration, record: &sandpool_engine::session::ExecutionRecord) -> Response {
    let ms = |d: Duration| HeaderValue::from_str(&format!("{:.3}", d.as_secs_f64() * 1e3)).ok();
    let headers = response.headers_mut();
    if let Some(value) = ms(preparation) {
        headers.insert("x-ms-preparation-time", value);
    }
    if let sandpool_engine::session::ExecutionState::Finished(outcome) = &record.state {
        if let Some(value) = ms(outcome.duration) {
            headers.insert("x-ms-container-execution-duration", value);
        }
    }
    response
}

fn with_session_guid(mut response: Response, lease: &SessionLease) -> Response {
    if let Ok(value) = HeaderValue::from_str(lease.sandbox_id()) {
        response.headers_mut().insert("x-ms-session-guid", value);
    }
    response
}

async fn read_json(body: Body) -> Result<Value, ApiError> {
    read_json_expecting(body, "a JSON object with a `code` field").await
}

/// Reads a JSON request body; `expected` says what an empty body should have held.
pub(crate) async fn read_json_expecting(body: Body, expected: &str) -> Result<Value, ApiError> {
    let limited = http_body_util::Limited::new(body, MAX_JSON_BYTES);
    let bytes = match limited.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                code::TOO_LARGE,
                format!("the request body exceeds {} MiB", MAX_JSON_BYTES >> 20),
            ));
        }
        Err(err) => return Err(ApiError::validation(format!("could not read the request body: {err}"))),
    };
    if bytes.is_empty() {
        return Err(ApiError::validation(format!("the request body is empty; send {expected}")));
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::validation(format!("the request body is not valid JSON: {e}")))
}

/// An execution request from either generation.
struct ExecutionRequest {
    code: String,
    asynchronous: bool,
    timeout: Duration,
    output_cap: usize,
}

/// Reads an execution body: top level or wrapped in `properties` (both are in use; contract
/// §3.2.1), enum values case-insensitive, unknown fields ignored.
fn parse_execution(body: &Value, pool: &Pool) -> Result<ExecutionRequest, ApiError> {
    let Some(object) = body.as_object() else {
        return Err(ApiError::validation("the request body must be a JSON object"));
    };
    let fields = match object.get("properties") {
        Some(Value::Object(properties)) => properties,
        _ => object,
    };
    let text = |key: &str| -> Result<Option<&str>, ApiError> {
        match fields.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(ApiError::validation(format!("`{key}` must be a string"))),
        }
    };
    if fields.contains_key("shellCommand") || fields.contains_key("execCommandAndArgs") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            code::UNSUPPORTED,
            format!("session pool '{}' runs Python; `shellCommand` and `execCommandAndArgs` need a Shell pool", pool.name()),
        ));
    }
    let raw_code = text("code")?.ok_or_else(|| ApiError::validation("`code` is required: the Python source to run"))?;
    let code = match text("codeInputType")?.map(str::to_ascii_lowercase).as_deref() {
        None | Some("inline") | Some("inlinetext") => raw_code.to_owned(),
        Some("inlinebase64") => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(raw_code.trim())
                .map_err(|e| ApiError::validation(format!("`code` is not valid base64 (codeInputType is InlineBase64): {e}")))?;
            String::from_utf8(bytes).map_err(|_| ApiError::validation("the base64 `code` does not decode to UTF-8 text"))?
        }
        Some(other) => return Err(ApiError::validation(format!("unknown codeInputType {other:?}; use Inline or InlineBase64"))),
    };
    let asynchronous = match text("executionType")?.map(str::to_ascii_lowercase).as_deref() {
        None | Some("synchronous") => false,
        Some("asynchronous") => true,
        Some(other) => return Err(ApiError::validation(format!("unknown executionType {other:?}; use Synchronous or Asynchronous"))),
    };
    let max = pool.settings().max_timeout;
    let timeout = match fields.get("timeoutInSeconds") {
        None | Some(Value::Null) => pool.settings().default_timeout,
        Some(value) => {
            let seconds = value.as_f64().ok_or_else(|| ApiError::validation("`timeoutInSeconds` must be a number"))?;
            if !seconds.is_finite() || seconds <= 0.0 {
                return Err(ApiError::validation("`timeoutInSeconds` must be positive"));
            }
            // Longer timeouts are cut to the pool's maximum, as Azure caps them at 220 s.
            Duration::from_secs_f64(seconds).min(max)
        }
    };
    let cap = pool.settings().output_cap;
    let output_cap = match fields.get("outputStreamsMaxLength") {
        None | Some(Value::Null) => cap,
        Some(value) => {
            let n = value
                .as_u64()
                .filter(|n| *n > 0)
                .ok_or_else(|| ApiError::validation("`outputStreamsMaxLength` must be a positive integer"))?;
            (n as usize).min(cap)
        }
    };
    Ok(ExecutionRequest { code, asynchronous, timeout, output_cap })
}

/// The execution id: the client's `operation-id` header when it is usable, else a new one.
fn execution_id(headers: &HeaderMap) -> String {
    headers
        .get("operation-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

async fn legacy_execute(request: &Ctx<'_>, body: Body) -> Result<Response, ApiError> {
    let body = read_json(body).await?;
    let parsed = parse_execution(&body, &request.pool)?;
    let preparing = Instant::now();
    let (_, lease) = request.lease().await?;
    let preparation = preparing.elapsed();
    // The legacy generation has no polling route, so every execution runs synchronously.
    let cell = Cell { code: parsed.code, timeout: parsed.timeout, output_cap: parsed.output_cap };
    let record = lease.execute(execution_id(request.headers), cell).instrument(execute_span(request)).await;
    let response = with_timings(Json(wire::legacy_execution(&record)).into_response(), preparation, &record);
    Ok(with_session_guid(response, &lease))
}

fn operation_location(request: &Ctx<'_>, id: &str, identifier: &Identifier) -> String {
    let encode = |s: &str| percent_encoding::utf8_percent_encode(s, crate::routing::QUERY_VALUE).to_string();
    let version = request.query.api_version().unwrap_or("2025-10-02-preview");
    format!(
        "{}/executions/{}?api-version={}&identifier={}",
        request.target.base_path,
        encode(id),
        encode(version),
        encode(identifier.as_str())
    )
}

async fn execute(request: &Ctx<'_>, body: Body) -> Result<Response, ApiError> {
    let body = read_json(body).await?;
    let parsed = parse_execution(&body, &request.pool)?;
    let preparing = Instant::now();
    let (identifier, lease) = request.lease().await?;
    let preparation = preparing.elapsed();
    let id = execution_id(request.headers);
    let cell = Cell { code: parsed.code, timeout: parsed.timeout, output_cap: parsed.output_cap };
    let location = operation_location(request, &id, &identifier);
    let sandbox_id = lease.sandbox_id().to_owned();
    let (status, record) = if parsed.asynchronous {
        (StatusCode::ACCEPTED, lease.start_execution(id.clone(), cell))
    } else {
        (StatusCode::OK, lease.execute(id.clone(), cell).instrument(execute_span(request)).await)
    };
    let mut response = with_timings((status, Json(wire::execution(&record, identifier.as_str()))).into_response(), preparation, &record);
    let headers = response.headers_mut();
    for (name, value) in
        [("operation-id", id.as_str()), ("operation-location", location.as_str()), ("x-ms-session-guid", sandbox_id.as_str())]
    {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    }
    Ok(response)
}

async fn get_execution(request: &Ctx<'_>, id: &str) -> Result<Response, ApiError> {
    let identifier = request.query.identifier()?;
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, code::EXECUTION_NOT_FOUND, format!("no execution {id:?} in this session"));
    let lease = request.pool.existing(&identifier).await?.ok_or_else(not_found)?;
    let record = lease.session().execution(id).ok_or_else(not_found)?;
    Ok(with_session_guid(Json(wire::execution(&record, identifier.as_str())).into_response(), &lease))
}

/// Runs a blocking file operation of the session's store off the async threads.
async fn with_files<T: Send + 'static>(
    lease: &SessionLease,
    op: impl FnOnce(&dyn sandpool_engine::backend::FileStore) -> Result<T, sandpool_engine::backend::FileError> + Send + 'static,
) -> Result<T, ApiError> {
    let files = lease.files().ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, code::UNSUPPORTED, "this session has no files"))?;
    tokio::task::spawn_blocking(move || op(files.store()))
        .instrument(tracing::info_span!("files"))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::from)
}

async fn upload_files(request: &Ctx<'_>, body: Body, legacy: bool) -> Result<Response, ApiError> {
    let dir = match request.query.get("path") {
        Some(path) if !legacy => DataPath::parse(path)?,
        _ => DataPath::default(),
    };
    let (_, lease) = request.lease().await?;
    let files = lease.files().ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, code::UNSUPPORTED, "this session has no files"))?;
    let entries = upload::receive(request.headers, body, &dir, files, MAX_UPLOAD_BYTES)
        .instrument(tracing::info_span!("files", pool = %request.pool.name(), op = "upload"))
        .await?;
    for entry in &entries {
        let change = FileChange::Uploaded { path: entry.path.as_relative(), bytes: entry.size };
        request.pool.report_file_change(&lease, change);
    }
    let body = if legacy {
        wire::legacy_files(&entries)
    } else {
        // The new generation answers with one file object (contract §3.2.3).
        wire::file(&entries[0], &dir)
    };
    Ok(with_session_guid(Json(body).into_response(), &lease))
}

async fn list_files(request: &Ctx<'_>) -> Result<Response, ApiError> {
    let legacy = request.query.is_legacy_version();
    let dir = match request.query.get("path") {
        Some(path) => DataPath::parse(path)?,
        None => DataPath::default(),
    };
    let recursive = request.query.flag("recursive")?;
    let (_, lease) = request.lease().await?;
    let listed = dir.clone();
    // Legacy clients expect files only, named by their path under /mnt/data, so they see
    // (and can download) files in subdirectories too.
    let entries: Vec<FileEntry> = with_files(&lease, move |store| {
        let entries = store.list(&listed, legacy || recursive)?;
        Ok(if legacy { entries.into_iter().filter(|e| e.kind == sandpool_engine::backend::FileKind::File).collect() } else { entries })
    })
    .await?;
    let body = if legacy { wire::legacy_files(&entries) } else { wire::files(&entries, &dir) };
    Ok(with_session_guid(Json(body).into_response(), &lease))
}

async fn download(request: &Ctx<'_>, path: DataPath) -> Result<Response, ApiError> {
    let (_, lease) = request.lease().await?;
    let name = path.file_name().unwrap_or_default().to_owned();
    let (file, entry) = with_files(&lease, move |store| store.open_read(&path)).await?;
    let stream = ReaderStream::new(tokio::fs::File::from_std(file));
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(entry.size));
    if let Ok(value) = HeaderValue::from_str(&wire::content_type(&name)) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    let modified = chrono::DateTime::<chrono::Utc>::from(entry.modified).format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    if let Ok(value) = HeaderValue::from_str(&modified) {
        headers.insert(header::LAST_MODIFIED, value);
    }
    Ok(with_session_guid(response, &lease))
}

async fn file_metadata(request: &Ctx<'_>, path: DataPath) -> Result<Response, ApiError> {
    let (_, lease) = request.lease().await?;
    let root = path.parent();
    let entry = with_files(&lease, move |store| store.stat(&path)).await?;
    Ok(with_session_guid(Json(wire::file(&entry, &root)).into_response(), &lease))
}

async fn delete_file(request: &Ctx<'_>, path: DataPath) -> Result<Response, ApiError> {
    if path.is_root() {
        return Err(ApiError::validation("give the name of the file to delete"));
    }
    let (_, lease) = request.lease().await?;
    let deleted = path.as_relative();
    with_files(&lease, move |store| store.delete(&path)).await?;
    request.pool.report_file_change(&lease, FileChange::Deleted { path: deleted });
    Ok(with_session_guid(StatusCode::NO_CONTENT.into_response(), &lease))
}

async fn get_session(request: &Ctx<'_>, management: bool) -> Result<Response, ApiError> {
    let identifier = request.query.identifier()?;
    let Some(lease) = request.pool.existing(&identifier).await? else {
        // The management route's code and status are the ones observed on Azure (contract §2.6).
        return Err(if management {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                code::SESSION_WITH_IDENTIFIER_NOT_FOUND,
                "no session with this identifier exists in the pool",
            )
        } else {
            ApiError::new(StatusCode::NOT_FOUND, code::SESSION_NOT_FOUND, "no session with this identifier exists in the pool")
        });
    };
    Ok(with_session_guid(Json(wire::session(&lease.info())).into_response(), &lease))
}

async fn delete_session(request: &Ctx<'_>, management: bool) -> Result<Response, ApiError> {
    let identifier = request.query.identifier()?;
    let existed = request.pool.delete(&identifier).await;
    if !management {
        // Deleting is idempotent, as Azure's deletes are (204 also when there was nothing).
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    if !existed {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            code::SESSION_WITH_IDENTIFIER_NOT_FOUND,
            "no session with this identifier exists in the pool",
        ));
    }
    let text = format!("Session {} in session pool {} stopped.", identifier.as_str(), request.pool.name());
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

fn list_sessions(request: &Ctx<'_>, management: bool) -> Result<Response, ApiError> {
    let skip = match request.query.get("skip") {
        None => 0,
        Some(text) => {
            text.parse::<usize>().map_err(|_| ApiError::validation(format!("`skip` must be a non-negative integer, not {text:?}")))?
        }
    };
    let sessions = request.pool.sessions();
    let total = sessions.len();
    let page: Vec<Value> = sessions.iter().skip(skip).take(SESSIONS_PAGE).map(wire::session).collect();
    let next_link = (skip + SESSIONS_PAGE < total).then(|| {
        let route = if management { ".management/listSessions" } else { "listSessions" };
        let version = request.query.api_version().unwrap_or("2025-10-02-preview");
        format!("{}/{route}?api-version={version}&skip={}", request.target.base_path, skip + SESSIONS_PAGE)
    });
    // Both list spellings: `sessions` (swagger) and `value` + `count` (management docs).
    let body = json!({ "sessions": page, "value": page, "count": total, "nextLink": next_link });
    Ok(Json(body).into_response())
}

/// The pool's session events, oldest first: `identifier` narrows them to one session,
/// `after` (a sequence number) to newer ones, `limit` (default 100, at most 1000) keeps the newest.
fn list_events(request: &Ctx<'_>) -> Result<Response, ApiError> {
    let number = |name: &str| -> Result<Option<u64>, ApiError> {
        request
            .query
            .get(name)
            .map(|text| {
                text.parse::<u64>().map_err(|_| ApiError::validation(format!("`{name}` must be a non-negative integer, not {text:?}")))
            })
            .transpose()
    };
    let limit = number("limit")?.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::validation("`limit` must be between 1 and 1000"));
    }
    let identifier = match request.query.get("identifier") {
        Some(_) => Some(request.query.identifier()?.as_str().to_owned()),
        None => None,
    };
    let query = sandpool_telemetry::EventQuery {
        pool: Some(request.pool.name().to_owned()),
        identifier,
        after: number("after")?,
        limit: limit as usize,
    };
    let events: Vec<Value> = request.telemetry.events.query(&query).iter().map(wire::event).collect();
    Ok(Json(json!({ "value": events, "count": events.len() })).into_response())
}

fn metadata(request: &Ctx<'_>) -> Result<Response, ApiError> {
    let runtime = request
        .pool
        .runtime()
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code::POOL_STARTING, "the pool is still starting"))?;
    Ok(Json(wire::metadata(runtime)).into_response())
}
