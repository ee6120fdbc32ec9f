//! Telemetry through the real API: Prometheus metrics, the per-session event log, and
//! Azure's timing headers.

use serde_json::{json, Value};

use crate::support::{assert_error, issue_token_with, new_id, TestServer, NEW};

#[test]
fn metrics_count_what_happened_for_readers_and_never_name_an_identifier() {
    let server = TestServer::start();
    let url = format!("http://{}/metrics", server.addr);
    assert_error(server.http().get(&url).send().unwrap(), 401, "Unauthorized");
    let executor = issue_token_with(&server.state_path(), &[]);
    assert_error(server.http().get(&url).bearer_auth(&executor).send().unwrap(), 403, "AuthorizationFailed");

    let id = new_id("metrics-secret");
    server.eval(&id, "1 + 1");
    server.execute(&id, "raise ValueError('no')");
    let reader = issue_token_with(&server.state_path(), &["--role", "reader"]);
    let response = server.http().get(&url).bearer_auth(&reader).send().unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = response.text().unwrap();
    for expected in [
        r#"sandpool_executions_total{pool="default",outcome="succeeded"} 1"#,
        r#"sandpool_executions_total{pool="default",outcome="error"} 1"#,
        r#"sandpool_session_allocation_seconds_count{pool="default",source="ready_queue"} 1"#,
        r#"sandpool_sessions{pool="default",state="allocated"} 1"#,
        r#"sandpool_sessions{pool="default",state="pending"} 0"#,
        r#"sandpool_max_sessions{pool="default"} 20"#,
        r#"sandpool_http_requests_total{route="execute",status="200"} 2"#,
    ] {
        assert!(text.contains(expected), "missing {expected}:\n{text}");
    }
    assert!(text.contains(r#"sandpool_refills_total{pool="default",outcome="created"}"#), "{text}");
    assert!(!text.contains(&id), "an identifier leaked into the metrics");
}

#[test]
fn the_event_log_tells_a_sessions_story_without_its_code() {
    let server = TestServer::start();
    let id = new_id("events");
    server.execute(&id, "secret_value = 'do-not-log-me'\nraise KeyError(secret_value)");
    assert_eq!(server.upload(&id, "data.csv", b"a,b\n1,2\n".to_vec(), None).status(), 200);
    let delete_file = server.authed(server.http().delete(server.url("files/data.csv", Some(&id), NEW))).send().unwrap();
    assert_eq!(delete_file.status(), 204);
    let delete = server.authed(server.http().delete(server.url("session", Some(&id), NEW))).send().unwrap();
    assert_eq!(delete.status(), 204);
    server.eval(&new_id("someone-else"), "1");

    let events_url = format!("{}&identifier={id}", server.url("events", None, NEW));
    let body: Value = server.authed(server.http().get(&events_url)).send().unwrap().json().unwrap();
    let events = body["value"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["allocated", "executed", "files_changed", "files_changed", "deleted"], "{body}");
    assert_eq!(events[0]["details"]["from_ready_queue"], json!(true));
    assert_eq!(events[1]["details"]["outcome"], json!("error"));
    assert_eq!(events[2]["details"], json!({ "change": "uploaded", "path": "data.csv", "bytes": 8.0 }));
    assert_eq!(events[3]["details"]["change"], json!("deleted"));
    assert_eq!(events[4]["details"]["reason"], json!("explicit"));
    assert!(events.iter().all(|e| e["identifier"] == json!(id) && e["pool"] == json!("default")));
    assert!(!body.to_string().contains("do-not-log-me"), "code or output leaked into the event log");

    // Newer than a sequence number, and the newest `limit`.
    let last = events[4]["sequence"].as_u64().unwrap();
    let all: Value =
        server.authed(server.http().get(format!("{}&after={last}", server.url("events", None, NEW)))).send().unwrap().json().unwrap();
    assert!(all["value"].as_array().unwrap().iter().all(|e| e["identifier"] != json!(id)));
    let bad = server.authed(server.http().get(format!("{}&limit=0", server.url("events", None, NEW)))).send().unwrap();
    assert_error(bad, 400, "SessionRequestValidationFailed");
    // Contributors only.
    let executor = issue_token_with(&server.state_path(), &[]);
    assert_error(server.http().get(&events_url).bearer_auth(&executor).send().unwrap(), 403, "AuthorizationFailed");
}

#[test]
fn executions_carry_azures_timing_headers() {
    let server = TestServer::start();
    let response = server
        .authed(server.http().post(server.url("executions", Some(&new_id("timing")), NEW)))
        .json(&json!({ "code": "import time; time.sleep(0.05)" }))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let ms = |name: &str| -> f64 { response.headers()[name].to_str().unwrap().parse().unwrap() };
    let (preparation, execution, total) =
        (ms("x-ms-preparation-time"), ms("x-ms-container-execution-duration"), ms("x-ms-total-execution-service-time"));
    assert!(execution >= 50.0, "{execution}");
    assert!(total >= execution + preparation, "{total} < {execution} + {preparation}");
}

#[test]
fn json_logs_are_one_object_per_line_and_hash_identifiers() {
    let config = format!(
        "[runtime]\ndir = {:?}\n\n[[pools]]\nname = \"default\"\nready_session_instances = 1\n",
        crate::support::runtime_dir().display().to_string()
    );
    let server = TestServer::with_config_and_env(&config, &[("SANDPOOL_LOG_FORMAT", "json")]);
    let id = new_id("json-log");
    server.eval(&id, "1");
    let delete = server.authed(server.http().delete(server.url("session", Some(&id), NEW))).send().unwrap();
    assert_eq!(delete.status(), 204);
    server.execute(&id, "import os; os._exit(3)");
    let log = server.log_text();
    let lines: Vec<Value> =
        log.lines().map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))).collect();
    assert!(lines.iter().any(|l| l["message"] == json!("zygote ready")), "{log}");
    assert!(lines.iter().all(|l| l["level"].is_string() && l["timestamp"].is_string()));
    // The crashed session is logged under the identifier's hash, never the identifier.
    use sha2::Digest;
    let digest: String = sha2::Sha256::digest(id.as_bytes())[..6].iter().map(|b| format!("{b:02x}")).collect();
    assert!(log.contains(&format!("id:{digest}")), "{log}");
    assert!(!log.contains(&id));
}
