//! Which pool and which operation a request addresses.
//!
//! Clients append operation paths to whatever endpoint they were given, so the pool is found
//! either at `/pools/{pool}/...` or after a `sessionPools/{pool}` segment anywhere in the path
//! (the Azure shape `/subscriptions/{s}/resourceGroups/{rg}/sessionPools/{pool}/...`). The
//! rest of the path selects the operation (contract §1 and §10.1).
//!
//! Query strings are decoded here too, strictly: `+` stays `+` (identifiers may contain it),
//! malformed `%` escapes are errors, and a bare `&`-separated fragment right after
//! `identifier=` is reported as the unencoded `&` it almost certainly is (contract §2.2).

use axum::http::{Method, StatusCode};
use percent_encoding::percent_decode_str;
use sandpool_auth::Role;
use sandpool_engine::Identifier;

use crate::error::{code, ApiError};

/// Characters percent-encoded in query values we generate: everything but RFC 3986's
/// unreserved characters.
pub const QUERY_VALUE: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// A request's target inside the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub pool: String,
    /// The path up to and including the pool segment, as sent (used to build
    /// `Operation-Location`).
    pub base_path: String,
    pub operation: Operation,
}

/// Every operation of both API generations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    LegacyExecute,
    LegacyUpload,
    LegacyDownload {
        name: String,
    },
    /// `GET files`: legacy or new shape depending on the api-version.
    ListFiles,
    Upload,
    FileMetadata {
        name: String,
    },
    FileContent {
        name: String,
    },
    DeleteFile {
        name: String,
    },
    Execute,
    GetExecution {
        id: String,
    },
    GetSession,
    DeleteSession,
    ListSessions,
    Metadata,
    ManagementGetSession,
    ManagementListSessions,
    ManagementStopSession,
    /// `GET events`: the pool's session event log (sandpool's own route).
    ListEvents,
}

impl Operation {
    /// The role a caller needs for this operation.
    pub fn required_role(&self) -> Role {
        match self {
            Operation::ListSessions | Operation::ManagementListSessions | Operation::ListEvents => Role::Contributor,
            _ => Role::Executor,
        }
    }

    /// True when the request names a session by its `identifier` (which an identifier-scoped
    /// token must match).
    pub fn names_identifier(&self) -> bool {
        !matches!(self, Operation::ListSessions | Operation::ManagementListSessions | Operation::Metadata | Operation::ListEvents)
    }

    /// A fixed name, for metrics labels and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Operation::LegacyExecute => "legacy_execute",
            Operation::LegacyUpload => "legacy_upload",
            Operation::LegacyDownload { .. } => "legacy_download",
            Operation::ListFiles => "list_files",
            Operation::Upload => "upload",
            Operation::FileMetadata { .. } => "file_metadata",
            Operation::FileContent { .. } => "file_content",
            Operation::DeleteFile { .. } => "delete_file",
            Operation::Execute => "execute",
            Operation::GetExecution { .. } => "get_execution",
            Operation::GetSession => "get_session",
            Operation::DeleteSession => "delete_session",
            Operation::ListSessions => "list_sessions",
            Operation::Metadata => "metadata",
            Operation::ManagementGetSession => "management_get_session",
            Operation::ManagementListSessions => "management_list_sessions",
            Operation::ManagementStopSession => "management_stop_session",
            Operation::ListEvents => "list_events",
        }
    }
}

/// A path split at its pool segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolPath {
    pub pool: String,
    /// The path up to and including the pool segment, as sent.
    pub base_path: String,
    /// The decoded segments after the pool.
    pub rest: Vec<String>,
    /// The path after the pool segment exactly as sent (still percent-encoded), starting
    /// with `/`: what a custom container receives.
    pub raw_rest: String,
}

/// Finds the pool in a request path. `Ok(None)` means the path is not a pool path at all.
pub fn split_pool(path: &str) -> Result<Option<PoolPath>, ApiError> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let pool_idx = if segments.first() == Some(&"pools") && segments.len() >= 2 {
        1
    } else if let Some(idx) = segments.iter().position(|s| s.eq_ignore_ascii_case("sessionPools")) {
        if idx + 1 >= segments.len() {
            return Ok(None);
        }
        idx + 1
    } else {
        return Ok(None);
    };
    let pool = decode_segment(segments[pool_idx])?;
    let base_path = format!("/{}", segments[..=pool_idx].join("/"));
    let rest: Vec<String> = segments[pool_idx + 1..].iter().map(|s| decode_segment(s)).collect::<Result<_, _>>()?;
    // The raw remainder keeps empty segments and a trailing slash, which an app may route on.
    let mut seen = 0;
    let mut raw_rest = "/";
    for (offset, _) in path.match_indices('/') {
        let segment_start = offset + 1;
        if segment_start < path.len() && !path[segment_start..].starts_with('/') {
            seen += 1;
            if seen == pool_idx + 1 {
                raw_rest = path[segment_start..].find('/').map_or("/", |end| &path[segment_start + end..]);
                break;
            }
        }
    }
    Ok(Some(PoolPath { pool, base_path, rest, raw_rest: raw_rest.to_owned() }))
}

/// Splits a request path into its pool and operation. `Ok(None)` means the path is not a
/// pool path at all.
pub fn route(method: &Method, path: &str) -> Result<Option<Target>, ApiError> {
    let Some(PoolPath { pool, base_path, rest, .. }) = split_pool(path)? else { return Ok(None) };
    let operation = operation(method, &rest)?;
    Ok(Some(Target { pool, base_path, operation }))
}

/// The operations sandpool answers itself on a custom container pool; every other path is
/// forwarded to the session's container (contract §4.1, avoiding Azure's bug of forwarding
/// these too).
pub fn management_operation(method: &Method, rest: &[String]) -> Option<Operation> {
    let parts: Vec<&str> = rest.iter().map(String::as_str).collect();
    match match_operation(method, &parts)? {
        operation @ (Operation::GetSession
        | Operation::DeleteSession
        | Operation::ListSessions
        | Operation::Metadata
        | Operation::ListEvents
        | Operation::ManagementGetSession
        | Operation::ManagementListSessions
        | Operation::ManagementStopSession) => Some(operation),
        _ => None,
    }
}

fn operation(method: &Method, rest: &[String]) -> Result<Operation, ApiError> {
    let parts: Vec<&str> = rest.iter().map(String::as_str).collect();
    if let Some(found) = match_operation(method, &parts) {
        return Ok(found);
    }
    let shown = format!("/{}", rest.join("/"));
    // Right path, wrong method: say which methods the path takes.
    let allowed: Vec<&str> = [Method::GET, Method::POST, Method::DELETE]
        .iter()
        .filter(|other| match_operation(other, &parts).is_some())
        .map(|other| other.as_str())
        .collect();
    if !allowed.is_empty() {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            code::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {shown}; use {}", allowed.join(" or ")),
        ));
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        code::ROUTE_NOT_FOUND,
        format!("there is no operation {method} {shown} in the dynamic sessions API"),
    ))
}

fn match_operation(method: &Method, parts: &[&str]) -> Option<Operation> {
    let joined = |parts: &[&str]| parts.join("/");
    match (parts, method) {
        (["code", "execute"] | ["python", "execute"], &Method::POST) => Some(Operation::LegacyExecute),
        (["files", "upload"], &Method::POST) => Some(Operation::LegacyUpload),
        (["files", "content", name @ ..], &Method::GET) if !name.is_empty() => Some(Operation::LegacyDownload { name: joined(name) }),
        (["files"], &Method::GET) => Some(Operation::ListFiles),
        (["files"], &Method::POST) => Some(Operation::Upload),
        (["files", name @ .., "content"], &Method::GET) if !name.is_empty() => Some(Operation::FileContent { name: joined(name) }),
        (["files", name @ ..], &Method::GET) if !name.is_empty() => Some(Operation::FileMetadata { name: joined(name) }),
        (["files", name @ ..], &Method::DELETE) if !name.is_empty() => Some(Operation::DeleteFile { name: joined(name) }),
        (["executions"], &Method::POST) => Some(Operation::Execute),
        (["executions", id], &Method::GET) => Some(Operation::GetExecution { id: id.to_string() }),
        (["session"], &Method::GET) => Some(Operation::GetSession),
        (["session"], &Method::DELETE) => Some(Operation::DeleteSession),
        (["listSessions"], &Method::GET) => Some(Operation::ListSessions),
        (["metadata"], &Method::GET) => Some(Operation::Metadata),
        (["events"], &Method::GET) => Some(Operation::ListEvents),
        ([".management", "getSession"], &Method::POST) => Some(Operation::ManagementGetSession),
        ([".management", "listSessions"], &Method::POST) => Some(Operation::ManagementListSessions),
        ([".management", "stopSession"], &Method::POST) => Some(Operation::ManagementStopSession),
        _ => None,
    }
}

fn decode_segment(segment: &str) -> Result<String, ApiError> {
    strict_decode(segment).map_err(|bad| ApiError::validation(format!("the path contains a malformed percent-escape near {bad:?}")))
}

/// Percent-decodes `text`, refusing `%` not followed by two hex digits and invalid UTF-8.
/// The error carries the offending fragment.
fn strict_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    for (idx, byte) in bytes.iter().enumerate() {
        if *byte == b'%' {
            let valid = bytes.len() > idx + 2 && bytes[idx + 1].is_ascii_hexdigit() && bytes[idx + 2].is_ascii_hexdigit();
            if !valid {
                return Err(text[idx..].chars().take(3).collect());
            }
        }
    }
    percent_decode_str(text).decode_utf8().map(|s| s.into_owned()).map_err(|_| text.chars().take(16).collect())
}

/// The decoded query string.
#[derive(Debug, Default)]
pub struct Query {
    params: Vec<(String, String)>,
    identifier_error: Option<String>,
}

impl Query {
    pub fn parse(raw: Option<&str>) -> Result<Query, ApiError> {
        let mut query = Query::default();
        let Some(raw) = raw else { return Ok(query) };
        let mut after_identifier = false;
        for fragment in raw.split('&') {
            if fragment.is_empty() {
                continue;
            }
            let Some((key, value)) = fragment.split_once('=') else {
                if after_identifier {
                    query.identifier_error = Some(
                        "the identifier appears to contain an unencoded '&' (the query has a stray fragment after identifier=); percent-encode '&', '#' and '%' in identifiers (as %26, %23 and %25)".into(),
                    );
                }
                after_identifier = false;
                continue;
            };
            let key = strict_decode(key)
                .map_err(|bad| ApiError::validation(format!("the query string has a malformed percent-escape near {bad:?}")))?;
            after_identifier = key == "identifier";
            match strict_decode(value) {
                Ok(value) => query.params.push((key, value)),
                Err(bad) if key == "identifier" => {
                    query.identifier_error = Some(format!(
                        "the identifier contains a '%' that is not a valid percent-escape (near {bad:?}); percent-encode '%' in identifiers as %25"
                    ));
                }
                Err(bad) => {
                    return Err(ApiError::validation(format!("query parameter {key:?} has a malformed percent-escape near {bad:?}")))
                }
            }
        }
        Ok(query)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The validated `identifier` parameter.
    pub fn identifier(&self) -> Result<Identifier, ApiError> {
        if let Some(error) = &self.identifier_error {
            return Err(ApiError::validation(error.clone()));
        }
        let mut values = self.params.iter().filter(|(k, _)| k == "identifier");
        let Some((_, value)) = values.next() else {
            return Err(ApiError::validation("the 'identifier' query parameter is required: it names the session (4 to 128 characters)"));
        };
        if values.next().is_some() {
            return Err(ApiError::validation("the 'identifier' query parameter is given more than once"));
        }
        Identifier::parse(value).map_err(|e| ApiError::validation(format!("invalid session identifier: {e}")))
    }

    pub fn api_version(&self) -> Option<&str> {
        self.get("api-version")
    }

    /// True for the api-versions whose `GET files` returns the legacy shape (contract §2.3).
    pub fn is_legacy_version(&self) -> bool {
        matches!(self.api_version(), Some("2024-02-02-preview" | "2024-08-02-preview"))
    }

    pub fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None => Ok(false),
            Some(v) if v.eq_ignore_ascii_case("true") || v == "1" => Ok(true),
            Some(v) if v.eq_ignore_ascii_case("false") || v == "0" || v.is_empty() => Ok(false),
            Some(v) => Err(ApiError::validation(format!("query parameter {key:?} must be true or false, not {v:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(method: Method, path: &str) -> Operation {
        route(&method, path).unwrap().unwrap().operation
    }

    #[test]
    fn finds_the_pool_under_both_endpoint_shapes() {
        let azure = route(&Method::POST, "/subscriptions/s/resourceGroups/rg/sessionPools/mypool/code/execute").unwrap().unwrap();
        assert_eq!((azure.pool.as_str(), azure.base_path.as_str()), ("mypool", "/subscriptions/s/resourceGroups/rg/sessionPools/mypool"));
        let short = route(&Method::POST, "/pools/default/executions").unwrap().unwrap();
        assert_eq!((short.pool.as_str(), short.operation), ("default", Operation::Execute));
        assert!(route(&Method::GET, "/").unwrap().is_none());
        assert!(route(&Method::GET, "/something/else").unwrap().is_none());
        assert!(route(&Method::GET, "/x/sessionPools").unwrap().is_none());
    }

    #[test]
    fn maps_every_operation() {
        let p = "/pools/default";
        assert_eq!(op(Method::POST, &format!("{p}/code/execute")), Operation::LegacyExecute);
        assert_eq!(op(Method::POST, &format!("{p}/files/upload")), Operation::LegacyUpload);
        assert_eq!(op(Method::GET, &format!("{p}/files/content/sub/a%20b.txt")), Operation::LegacyDownload { name: "sub/a b.txt".into() });
        assert_eq!(op(Method::GET, &format!("{p}/files")), Operation::ListFiles);
        assert_eq!(op(Method::POST, &format!("{p}/files")), Operation::Upload);
        assert_eq!(op(Method::GET, &format!("{p}/files/x.csv")), Operation::FileMetadata { name: "x.csv".into() });
        assert_eq!(op(Method::GET, &format!("{p}/files/dir/x.csv/content")), Operation::FileContent { name: "dir/x.csv".into() });
        assert_eq!(op(Method::DELETE, &format!("{p}/files/x.csv")), Operation::DeleteFile { name: "x.csv".into() });
        assert_eq!(op(Method::GET, &format!("{p}/executions/abc")), Operation::GetExecution { id: "abc".into() });
        assert_eq!(op(Method::GET, &format!("{p}/session")), Operation::GetSession);
        assert_eq!(op(Method::DELETE, &format!("{p}/session")), Operation::DeleteSession);
        assert_eq!(op(Method::GET, &format!("{p}/listSessions")), Operation::ListSessions);
        assert_eq!(op(Method::GET, &format!("{p}/metadata")), Operation::Metadata);
        assert_eq!(op(Method::POST, &format!("{p}/.management/stopSession")), Operation::ManagementStopSession);
    }

    #[test]
    fn custom_container_pools_answer_management_routes_and_forward_the_rest() {
        let split = split_pool("/subscriptions/s/resourceGroups/r/sessionPools/web/api//items/a%20b/").unwrap().unwrap();
        assert_eq!(split.pool, "web");
        assert_eq!(split.raw_rest, "/api//items/a%20b/");
        assert_eq!(split_pool("/pools/web").unwrap().unwrap().raw_rest, "/");
        assert_eq!(split_pool("/pools/web/").unwrap().unwrap().raw_rest, "/");
        assert_eq!(split_pool("//pools//web/health").unwrap().unwrap().raw_rest, "/health");
        let managed = |method: Method, path: &str| management_operation(&method, &split_pool(path).unwrap().unwrap().rest);
        assert_eq!(managed(Method::GET, "/pools/web/session"), Some(Operation::GetSession));
        assert_eq!(managed(Method::DELETE, "/pools/web/session"), Some(Operation::DeleteSession));
        assert_eq!(managed(Method::GET, "/pools/web/listSessions"), Some(Operation::ListSessions));
        assert_eq!(managed(Method::GET, "/pools/web/metadata"), Some(Operation::Metadata));
        assert_eq!(managed(Method::POST, "/pools/web/.management/stopSession"), Some(Operation::ManagementStopSession));
        // Code-interpreter operations belong to the container on such a pool.
        assert_eq!(managed(Method::POST, "/pools/web/executions"), None);
        assert_eq!(managed(Method::GET, "/pools/web/files"), None);
        assert_eq!(managed(Method::POST, "/pools/web/session"), None);
        assert_eq!(managed(Method::GET, "/pools/web/api/anything"), None);
    }

    #[test]
    fn unknown_routes_and_wrong_methods_are_explained() {
        let err = route(&Method::GET, "/pools/default/nothing").unwrap_err();
        assert_eq!((err.status, err.code), (StatusCode::NOT_FOUND, code::ROUTE_NOT_FOUND));
        let err = route(&Method::GET, "/pools/default/code/execute").unwrap_err();
        assert_eq!(err.status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(err.message.contains("POST"), "{}", err.message);
        let err = route(&Method::PUT, "/pools/default/session").unwrap_err();
        assert!(err.message.contains("use GET or DELETE"), "{}", err.message);
    }

    #[test]
    fn identifiers_are_decoded_strictly() {
        let id = |raw: &str| Query::parse(Some(raw)).unwrap().identifier();
        assert_eq!(id("identifier=a%7Cb%26c&api-version=x").unwrap().as_str(), "a|b&c");
        assert_eq!(id("api-version=x&identifier=a+b+c+d").unwrap().as_str(), "a+b+c+d");
        // An unencoded '&' splits the identifier (AutoGen and Semantic Kernel send it raw).
        let err = id("api-version=x&identifier=user&name").unwrap_err();
        assert!(err.message.contains("unencoded '&'"), "{}", err.message);
        // A raw '%' that is not an escape.
        let err = id("identifier=100%zz").unwrap_err();
        assert!(err.message.contains("'%'"), "{}", err.message);
        // A raw '#' never reaches the server: the rest is cut off, and what is left is
        // validated like any identifier.
        assert_eq!(id("identifier=abc").unwrap_err().code, code::VALIDATION);
        assert!(id("api-version=x").unwrap_err().message.contains("required"));
        assert!(id("identifier=abcd&identifier=efgh").unwrap_err().message.contains("more than once"));
        assert!(id("identifier=has%20space").unwrap_err().message.contains("' '"));
    }

    #[test]
    fn legacy_api_versions_are_recognised() {
        assert!(Query::parse(Some("api-version=2024-02-02-preview")).unwrap().is_legacy_version());
        assert!(!Query::parse(Some("api-version=2025-02-02-preview")).unwrap().is_legacy_version());
        assert!(!Query::parse(None).unwrap().is_legacy_version());
    }
}
