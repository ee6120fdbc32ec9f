//! The JSON shapes of both API generations (contract §3), built from engine values.
//!
//! Engine types are not serializable on purpose; this module is the one place that knows
//! how they look on the wire.

use std::time::SystemTime;

use chrono::{DateTime, SecondsFormat, Utc};
use sandpool_engine::backend::{CellOutcome, CellResult, CellStatus, FileEntry, FileKind, RuntimeInfo};
use sandpool_engine::path::DataPath;
use sandpool_engine::session::{ExecutionRecord, ExecutionState, SessionInfo};
use serde_json::{json, Value};

/// RFC 3339 with milliseconds, as the new generation writes times.
pub fn time_ms(time: SystemTime) -> String {
    DateTime::<Utc>::from(time).to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The legacy generation's .NET-style time with seven fractional digits.
pub fn time_legacy(time: SystemTime) -> String {
    let time = DateTime::<Utc>::from(time);
    format!("{}.{:07}Z", time.format("%Y-%m-%dT%H:%M:%S"), time.timestamp_subsec_nanos() / 100)
}

/// The `result` value: `""` when the cell has no value, the JSON value itself, the text of
/// a non-JSON value, or the image object.
fn result_value(result: &CellResult) -> Value {
    match result {
        CellResult::None => Value::String(String::new()),
        CellResult::Json(text) => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone())),
        CellResult::Repr(text) => Value::String(text.clone()),
        CellResult::Image { format, base64_data } => json!({ "type": "image", "format": format, "base64_data": base64_data }),
    }
}

/// The parts of an execution both generations report.
struct Summary {
    succeeded: bool,
    stdout: String,
    stderr: String,
    result: Value,
    millis: Option<u64>,
    error: Option<(&'static str, String)>,
}

fn summarize(state: &ExecutionState) -> Summary {
    match state {
        ExecutionState::Running => {
            Summary { succeeded: false, stdout: String::new(), stderr: String::new(), result: Value::Null, millis: None, error: None }
        }
        ExecutionState::Finished(outcome) => summarize_outcome(outcome),
        ExecutionState::Failed { message, .. } => Summary {
            succeeded: false,
            stdout: String::new(),
            stderr: format!("{message}\n"),
            result: Value::Null,
            millis: Some(0),
            error: Some(("SessionTerminated", message.clone())),
        },
    }
}

fn summarize_outcome(outcome: &CellOutcome) -> Summary {
    let succeeded = outcome.status == CellStatus::Success;
    let error = match (outcome.status, &outcome.error) {
        (CellStatus::Success, _) => None,
        (CellStatus::Timeout, _) => Some(("ExecutionTimeout", outcome.error.as_ref().map(|(_, m)| m.clone()).unwrap_or_default())),
        (CellStatus::Error, Some((name, message))) => {
            Some(("ExecutionFailed", if message.is_empty() { name.clone() } else { format!("{name}: {message}") }))
        }
        (CellStatus::Error, None) => Some(("ExecutionFailed", "the code raised an exception".to_owned())),
    };
    Summary {
        succeeded,
        stdout: outcome.stdout.clone(),
        stderr: outcome.stderr.clone(),
        result: if succeeded { result_value(&outcome.result) } else { Value::Null },
        millis: Some(outcome.duration.as_millis() as u64),
        error,
    }
}

/// Legacy `code/execute` response (§3.1.1): both `result` and `executionResult`.
pub fn legacy_execution(record: &ExecutionRecord) -> Value {
    let summary = summarize(&record.state);
    json!({
        "$id": "1",
        "properties": {
            "$id": "2",
            "status": if summary.succeeded { "Success" } else { "Failure" },
            "stdout": summary.stdout,
            "stderr": summary.stderr,
            "result": summary.result,
            "executionResult": summary.result,
            "executionTimeInMilliseconds": summary.millis.unwrap_or(0),
        }
    })
}

/// New-generation execution resource (§3.2.1).
pub fn execution(record: &ExecutionRecord, identifier: &str) -> Value {
    let summary = summarize(&record.state);
    let status = match record.state {
        ExecutionState::Running => "Running",
        _ if summary.succeeded => "Succeeded",
        _ => "Failed",
    };
    let mut body = json!({
        "id": record.id,
        "identifier": identifier,
        "executionType": if record.asynchronous { "Asynchronous" } else { "Synchronous" },
        "status": status,
    });
    if !matches!(record.state, ExecutionState::Running) {
        body["result"] = json!({
            "stdout": summary.stdout,
            "stderr": summary.stderr,
            "executionResult": summary.result,
            "executionTimeInMilliseconds": summary.millis,
        });
    }
    if let Some((code, message)) = summary.error {
        body["error"] = json!({ "code": code, "message": message });
    }
    body
}

/// Legacy list/upload shape (§3.1.2, §3.1.3), `$id`s numbered as .NET does.
pub fn legacy_files(entries: &[FileEntry]) -> Value {
    let value: Vec<Value> = entries
        .iter()
        .enumerate()
        .map(|(idx, entry)| {
            json!({
                "$id": (2 + 2 * idx).to_string(),
                "properties": {
                    "$id": (3 + 2 * idx).to_string(),
                    "filename": entry.path.as_relative(),
                    "size": entry.size,
                    "lastModifiedTime": time_legacy(entry.modified),
                }
            })
        })
        .collect();
    json!({ "$id": "1", "value": value })
}

/// A new-generation `SessionResourceFile` (§3.2.4); `root` is the listed directory, for the
/// `directory` field.
pub fn file(entry: &FileEntry, root: &DataPath) -> Value {
    let parent = entry.path.parent();
    let directory = parent.components().strip_prefix(root.components()).map(|rest| rest.join("/")).unwrap_or_else(|| parent.as_relative());
    let name = entry.path.file_name().unwrap_or_default();
    let mut body = json!({
        "name": name,
        "directory": directory,
        "type": match entry.kind { FileKind::File => "File", FileKind::Directory => "Directory" },
        "lastModifiedAt": time_ms(entry.modified),
    });
    if entry.kind == FileKind::File {
        body["sizeInBytes"] = json!(entry.size);
        body["contentType"] = json!(content_type(name));
    }
    body
}

pub fn files(entries: &[FileEntry], root: &DataPath) -> Value {
    json!({ "value": entries.iter().map(|e| file(e, root)).collect::<Vec<_>>(), "nextLink": null })
}

pub fn content_type(name: &str) -> String {
    mime_guess::from_path(name).first_or_octet_stream().essence_str().to_owned()
}

/// A session view with both spellings of the expiry (`expireAt` in the swagger, `expiresAt`
/// in the management docs; contract §3.2.6).
pub fn session(info: &SessionInfo) -> Value {
    json!({
        "identifier": info.identifier.as_str(),
        "createdAt": time_ms(info.created_at),
        "lastAccessedAt": time_ms(info.last_access),
        "expireAt": time_ms(info.expires_at),
        "expiresAt": time_ms(info.expires_at),
        "etag": info.sandbox_id.clone().unwrap_or_default(),
    })
}

/// One entry of the session event log (sandpool's own `events` route).
pub fn event(event: &sandpool_telemetry::LoggedEvent) -> Value {
    use sandpool_telemetry::event_log::Detail;
    let mut details = serde_json::Map::new();
    for (name, value) in &event.details {
        let value = match value {
            Detail::Text(text) => json!(text),
            Detail::Number(number) => json!(number),
            Detail::Flag(flag) => json!(flag),
        };
        details.insert(name.clone(), value);
    }
    json!({
        "sequence": event.sequence,
        "time": time_ms(event.at),
        "pool": event.pool,
        "identifier": event.identifier,
        "sessionGuid": event.session_guid,
        "kind": event.kind,
        "details": details,
    })
}

/// Pool metadata (§3.2.6).
pub fn metadata(runtime: &RuntimeInfo) -> Value {
    json!({
        "runtimes": [{ "name": runtime.language, "version": runtime.language_version }],
        "preInstalledPackages": runtime.packages.iter().map(|(name, version)| json!({ "name": name, "version": version })).collect::<Vec<_>>(),
        "createdAt": time_ms(runtime.started_at),
        "lastUpdatedAt": time_ms(runtime.started_at),
        "jupyterKernel": {
            "name": "sandpool-python",
            "version": env!("CARGO_PKG_VERSION"),
            "projectUrl": "https://github.com/sandpool/sandpool",
            "description": "sandpool's Python runner: a persistent interpreter per session",
        },
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn times_use_the_formats_clients_parse() {
        let t = UNIX_EPOCH + Duration::new(1_714_634_467, 992_261_700);
        assert_eq!(time_legacy(t), "2024-05-02T07:21:07.9922617Z");
        assert_eq!(time_ms(t), "2024-05-02T07:21:07.992Z");
    }

    fn finished(status: CellStatus, result: CellResult) -> ExecutionRecord {
        ExecutionRecord {
            id: "op".into(),
            asynchronous: false,
            started_at: UNIX_EPOCH,
            state: ExecutionState::Finished(CellOutcome {
                status,
                stdout: "out\n".into(),
                stderr: String::new(),
                result,
                error: (status != CellStatus::Success).then(|| ("ZeroDivisionError".into(), "division by zero".into())),
                duration: Duration::from_millis(7),
            }),
        }
    }

    #[test]
    fn legacy_execution_has_every_field_a_client_reads() {
        let body = legacy_execution(&finished(CellStatus::Success, CellResult::Json("2".into())));
        let props = &body["properties"];
        assert_eq!(props["status"], "Success");
        assert_eq!(props["result"], 2);
        assert_eq!(props["executionResult"], 2);
        assert_eq!(props["stdout"], "out\n");
        assert_eq!(props["stderr"], "");
        assert_eq!(props["executionTimeInMilliseconds"], 7);

        let body = legacy_execution(&finished(CellStatus::Success, CellResult::None));
        assert_eq!(body["properties"]["result"], "");
        let body = legacy_execution(&finished(CellStatus::Error, CellResult::None));
        assert_eq!(body["properties"]["status"], "Failure");
        assert!(body["properties"]["result"].is_null());
    }

    #[test]
    fn new_execution_reports_status_and_errors() {
        let body = execution(&finished(CellStatus::Error, CellResult::None), "sess");
        assert_eq!(body["status"], "Failed");
        assert_eq!(body["identifier"], "sess");
        assert_eq!(body["error"]["code"], "ExecutionFailed");
        assert_eq!(body["error"]["message"], "ZeroDivisionError: division by zero");
        let image = CellResult::Image { format: "png".into(), base64_data: "AAAA".into() };
        let body = execution(&finished(CellStatus::Success, image), "sess");
        assert_eq!(body["status"], "Succeeded");
        assert_eq!(body["result"]["executionResult"]["type"], "image");
        assert!(body.get("error").is_none());
    }

    #[test]
    fn file_entries_report_their_directory_relative_to_the_listing() {
        let entry = FileEntry { path: DataPath::parse("a/b/c.csv").unwrap(), kind: FileKind::File, size: 4, modified: UNIX_EPOCH };
        let body = file(&entry, &DataPath::parse("a").unwrap());
        assert_eq!((body["name"].as_str(), body["directory"].as_str()), (Some("c.csv"), Some("b")));
        assert_eq!(body["contentType"], "text/csv");
        let listing = legacy_files(&[entry.clone(), entry]);
        assert_eq!(listing["value"][1]["$id"], "4");
        assert_eq!(listing["value"][1]["properties"]["filename"], "a/b/c.csv");
    }
}
