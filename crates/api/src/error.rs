//! API errors and the Azure error envelope.
//!
//! Every error response has the body `{"error": {"code", "message", "traceId"}}` and the
//! header `x-ms-error-code` (contract §2.6). This is the only place that maps failures to
//! status codes. Internal errors get a generic message; their detail is logged, never sent.

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sandpool_auth::{AuthError, Forbidden};
use sandpool_engine::backend::FileError;
use sandpool_engine::path::DataPathError;
use sandpool_engine::pool::EngineError;

/// Error codes. Where Azure's own code is known it is used; the others follow its style.
pub mod code {
    pub const VALIDATION: &str = "SessionRequestValidationFailed";
    pub const UNAUTHORIZED: &str = "Unauthorized";
    pub const FORBIDDEN: &str = "AuthorizationFailed";
    pub const AUTH_UNAVAILABLE: &str = "AuthenticationUnavailable";
    pub const POOL_NOT_FOUND: &str = "SessionPoolNotFound";
    pub const ROUTE_NOT_FOUND: &str = "RouteNotFound";
    pub const METHOD_NOT_ALLOWED: &str = "MethodNotAllowed";
    pub const CAPACITY: &str = "SessionPoolCapacityExceeded";
    pub const POOL_STARTING: &str = "SessionPoolStarting";
    pub const POOL_UNAVAILABLE: &str = "SessionPoolUnavailable";
    pub const SESSION_CREATION: &str = "SessionCreationFailed";
    pub const SESSION_NOT_FOUND: &str = "SessionNotFound";
    pub const SESSION_WITH_IDENTIFIER_NOT_FOUND: &str = "SessionWithIdentifierNotFound";
    pub const EXECUTION_NOT_FOUND: &str = "ExecutionNotFound";
    pub const FILE_NOT_FOUND: &str = "FileNotFound";
    pub const FILE_ACCESS_DENIED: &str = "FileAccessDenied";
    pub const FILE_CONFLICT: &str = "FileConflict";
    pub const STORAGE_FULL: &str = "SessionStorageFull";
    pub const TOO_LARGE: &str = "PayloadTooLarge";
    pub const UNSUPPORTED: &str = "OperationNotSupported";
    pub const INTERNAL: &str = "InternalServerError";
    /// A custom container session could not be reached or answered badly.
    pub const UPSTREAM_FAILED: &str = "SessionContainerUnavailable";
    pub const UPSTREAM_TIMEOUT: &str = "SessionContainerTimeout";
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra headers (for example `Retry-After`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), headers: Vec::new() }
    }

    pub fn validation(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code::VALIDATION, message)
    }

    pub fn internal(detail: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %detail, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            code::INTERNAL,
            "the server failed to process the request; the details are in its log",
        )
    }

    fn with_header(mut self, name: HeaderName, value: &'static str) -> ApiError {
        self.headers.push((name, HeaderValue::from_static(value)));
        self
    }

    /// The response, with a trace id that also appears in the server's log.
    pub fn into_response_with(self, trace_id: &str) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(trace_id, code = self.code, message = %self.message, "request failed");
        } else {
            tracing::debug!(trace_id, code = self.code, message = %self.message, "request refused");
        }
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message, "traceId": trace_id } });
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert("x-ms-error-code", HeaderValue::from_static(self.code));
        for (name, value) in self.headers {
            headers.insert(name, value);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert("www-authenticate", HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let trace_id = uuid::Uuid::new_v4().to_string();
        self.into_response_with(&trace_id)
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> ApiError {
        match err {
            // The identity provider is unreachable: the token may well be fine, so retry.
            AuthError::IssuerUnavailable(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code::AUTH_UNAVAILABLE, err.to_string())
                .with_header(header::RETRY_AFTER, "5"),
            _ => ApiError::new(StatusCode::UNAUTHORIZED, code::UNAUTHORIZED, err.to_string()),
        }
    }
}

impl From<Forbidden> for ApiError {
    fn from(err: Forbidden) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, code::FORBIDDEN, err.to_string())
    }
}

impl From<DataPathError> for ApiError {
    fn from(err: DataPathError) -> ApiError {
        ApiError::validation(err.to_string())
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> ApiError {
        let message = err.to_string();
        match err {
            // Contract §8.3: Azure answers 404 when the pool is at maxConcurrentSessions.
            EngineError::AtCapacity { .. } => ApiError::new(StatusCode::NOT_FOUND, code::CAPACITY, message),
            EngineError::Starting { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code::POOL_STARTING, message)
                .with_header(HeaderName::from_static("retry-after"), "5"),
            EngineError::Failed { .. } | EngineError::Stopped { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code::POOL_UNAVAILABLE, message)
            }
            EngineError::Sandbox(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code::SESSION_CREATION, message)
                .with_header(HeaderName::from_static("retry-after"), "1"),
        }
    }
}

impl From<FileError> for ApiError {
    fn from(err: FileError) -> ApiError {
        let message = err.to_string();
        match err {
            FileError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, code::FILE_NOT_FOUND, message),
            FileError::Escapes(_) => ApiError::new(StatusCode::FORBIDDEN, code::FILE_ACCESS_DENIED, message),
            FileError::IsDirectory(_) | FileError::NotDirectory(_) | FileError::NotRegular(_) => {
                ApiError::new(StatusCode::CONFLICT, code::FILE_CONFLICT, message)
            }
            FileError::NoSpace => ApiError::new(StatusCode::INSUFFICIENT_STORAGE, code::STORAGE_FULL, message),
            FileError::Io(e) => ApiError::internal(e),
        }
    }
}
