//! Client errors: authentication, identifiers, routes, request bodies. Every one answers in
//! the error envelope with `x-ms-error-code`, never with a crash, a hang or a 500.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::support::{assert_error, issue_token, new_id, TestServer, NEW};

fn sign(server: &TestServer, claims: serde_json::Value) -> String {
    let pem = std::fs::read(server.state_path().join("keys/local-issuer.pem")).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&pem).unwrap();
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA), &claims, &key).unwrap()
}

#[test]
fn requests_without_a_valid_token_get_401_and_tokens_never_reach_the_log() {
    let server = TestServer::start();
    let id = new_id("auth");
    let url = server.url("executions", Some(&id), NEW);
    let post = |auth: Option<String>| {
        let mut request = server.http().post(&url).json(&json!({ "code": "1" }));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.send().unwrap()
    };
    let message = assert_error(post(None), 401, "Unauthorized");
    assert!(message.contains("sandpool token issue"), "{message}");
    assert_error(post(Some("Basic dXNlcjpwYXNz".into())), 401, "Unauthorized");
    assert_error(post(Some("Bearer not.a.jwt".into())), 401, "Unauthorized");

    // Signed by another server's key.
    let other = tempfile::tempdir().unwrap();
    let foreign = issue_token(other.path(), "1h");
    let message = assert_error(post(Some(format!("Bearer {foreign}"))), 401, "Unauthorized");
    assert!(message.contains("signature"), "{message}");

    // Signed by the right key but expired, not yet valid, or for another audience.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let base = json!({ "iss": "sandpool-local", "sub": "t", "aud": "https://dynamicsessions.io", "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600, "jti": "j", "roles": ["executor"] });
    let expired = sign(&server, base.clone());
    assert!(assert_error(post(Some(format!("Bearer {expired}"))), 401, "Unauthorized").contains("expired"));
    let mut future = base.clone();
    future["nbf"] = json!(now + 3600);
    future["exp"] = json!(now + 7200);
    assert!(assert_error(post(Some(format!("Bearer {}", sign(&server, future)))), 401, "Unauthorized").contains("not valid yet"));
    let mut audience = base.clone();
    audience["aud"] = json!("https://management.azure.com");
    audience["exp"] = json!(now + 3600);
    assert!(assert_error(post(Some(format!("Bearer {}", sign(&server, audience)))), 401, "Unauthorized").contains("audience"));
    // Semantic Kernel's legacy audience is accepted.
    let mut legacy_audience = base;
    legacy_audience["aud"] = json!("https://acasessions.io");
    legacy_audience["exp"] = json!(now + 3600);
    assert_eq!(post(Some(format!("Bearer {}", sign(&server, legacy_audience)))).status(), 200);

    // A good token works, and no token ever appears in the server's log.
    assert_eq!(post(Some(format!("Bearer {}", server.token))).status(), 200);
    let log = server.log_text();
    for token in [&server.token, &foreign, &expired] {
        assert!(!log.contains(token.as_str()), "a token leaked into the log");
    }
    assert!(!log.contains(&id), "the identifier leaked into the log");
}

#[test]
fn health_endpoints_need_no_token() {
    let server = TestServer::start();
    assert_eq!(server.http().get(format!("http://{}/healthz", server.addr)).send().unwrap().status(), 200);
    let ready: serde_json::Value = server.http().get(format!("http://{}/readyz", server.addr)).send().unwrap().json().unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["pools"][0]["name"], "default");
}

#[test]
fn invalid_identifiers_are_refused_after_percent_decoding() {
    let server = TestServer::start();
    let raw = |query: &str| {
        let url = format!("{}/executions?api-version={NEW}&{query}", server.endpoint());
        server.authed(server.http().post(url)).json(&json!({ "code": "1" })).send().unwrap()
    };
    for (query, expected) in [
        ("identifier=abc", "4 to 128"),
        (&format!("identifier={}", "a".repeat(129)), "4 to 128"),
        ("identifier=has%20a%20space", "' '"),
        ("identifier=caf%C3%A9-id", "'é'"),
        ("identifier=back%5Cslash", "'\\\\'"),
        // Unencoded '&' (AutoGen and Semantic Kernel interpolate identifiers raw).
        ("identifier=user&name", "unencoded '&'"),
        // Unencoded '%' that is not an escape.
        ("identifier=100%zz-done", "'%'"),
        ("api-version=x", "required"),
        ("identifier=aaaa&identifier=bbbb", "more than once"),
    ] {
        let message = assert_error(raw(query), 400, "SessionRequestValidationFailed");
        assert!(message.contains(expected), "{query}: {message}");
    }
    // An unencoded '#' starts the URL fragment, which clients never send: the server sees
    // the identifier cut short, and validates what is left.
    let url = format!("{}/executions?api-version={NEW}&identifier=ab#cdef", server.endpoint());
    assert_error(
        server.authed(server.http().post(url)).json(&json!({ "code": "1" })).send().unwrap(),
        400,
        "SessionRequestValidationFailed",
    );
    // Encoded special characters are fine, and '+' stays a plus.
    let odd = "a|b&c#d%e+f^g$h(i)[j]{k};l<m>n";
    assert_eq!(server.eval(odd, "'ok'"), json!("ok"));
    let raw_plus = raw("identifier=plus+sign+id");
    assert_eq!(raw_plus.status(), 200);
    let sessions: serde_json::Value =
        server.authed(server.http().get(server.url("listSessions", None, NEW))).send().unwrap().json().unwrap();
    let names: Vec<&str> = sessions["sessions"].as_array().unwrap().iter().map(|s| s["identifier"].as_str().unwrap()).collect();
    assert!(names.contains(&odd) && names.contains(&"plus+sign+id"), "{names:?}");
}

#[test]
fn unknown_pools_routes_and_methods_are_explained() {
    let server = TestServer::start();
    let id = new_id("routes");
    let get = |path: &str| server.authed(server.http().get(format!("http://{}{path}", server.addr))).send().unwrap();
    let message = assert_error(get(&format!("/pools/nosuchpool/files?identifier={id}")), 404, "SessionPoolNotFound");
    assert!(message.contains("default"), "lists the pools that exist: {message}");
    assert_error(get(&format!("/pools/default/nothing/here?identifier={id}")), 404, "RouteNotFound");
    assert_error(get("/favicon.ico"), 404, "RouteNotFound");
    let message = assert_error(get(&format!("/pools/default/code/execute?identifier={id}")), 405, "MethodNotAllowed");
    assert!(message.contains("POST"), "{message}");
    // Authentication comes before revealing which pools exist.
    assert_error(server.http().get(format!("http://{}/pools/secretpool/files", server.addr)).send().unwrap(), 401, "Unauthorized");
}

#[test]
fn malformed_execution_requests_are_refused_clearly() {
    let server = TestServer::start();
    let id = new_id("bodies");
    let url = server.url("executions", Some(&id), NEW);
    let send = |body: &str| {
        server.authed(server.http().post(&url)).header("content-type", "application/json").body(body.to_owned()).send().unwrap()
    };
    for (body, expected) in [
        ("", "empty"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (r#"{"codeInputType": "inline"}"#, "`code` is required"),
        (r#"{"code": 42}"#, "must be a string"),
        (r#"{"code": "1", "executionType": "sometimes"}"#, "executionType"),
        (r#"{"code": "1", "codeInputType": "carrier-pigeon"}"#, "codeInputType"),
        (r#"{"code": "not base64!", "codeInputType": "InlineBase64"}"#, "base64"),
        (r#"{"code": "1", "timeoutInSeconds": -5}"#, "positive"),
        (r#"{"code": "1", "outputStreamsMaxLength": 0}"#, "outputStreamsMaxLength"),
    ] {
        let message = assert_error(send(body), 400, "SessionRequestValidationFailed");
        assert!(message.contains(expected), "{body}: {message}");
    }
    let message = assert_error(send(r#"{"shellCommand": "ls"}"#), 400, "OperationNotSupported");
    assert!(message.contains("Shell pool"), "{message}");
    // Base64 code and case-insensitive enums are accepted.
    let ok = send(r#"{"code": "cHJpbnQoJ2I2NCcp", "codeInputType": "INLINEBASE64", "executionType": "SYNCHRONOUS"}"#);
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.json::<serde_json::Value>().unwrap()["result"]["stdout"], "b64\n");
    assert_error(
        server.authed(server.http().get(server.url("executions/unknown-op", Some(&id), NEW))).send().unwrap(),
        404,
        "ExecutionNotFound",
    );
}

#[test]
fn a_full_pool_answers_404_with_the_envelope_until_a_session_leaves() {
    let server =
        TestServer::with_pool(crate::support::PoolSpec { max_concurrent_sessions: 2, ready_session_instances: 1, ..Default::default() });
    let (a, b, c) = (new_id("cap-a"), new_id("cap-b"), new_id("cap-c"));
    server.eval(&a, "1");
    server.eval(&b, "1");
    let url = server.url("executions", Some(&c), NEW);
    let message = assert_error(
        server.authed(server.http().post(&url)).json(&json!({ "code": "1" })).send().unwrap(),
        404,
        "SessionPoolCapacityExceeded",
    );
    assert!(message.contains("maxConcurrentSessions=2"), "{message}");
    // Existing sessions keep working at the limit.
    assert_eq!(server.eval(&a, "2"), json!(2));
    assert_eq!(server.authed(server.http().delete(server.url("session", Some(&b), NEW))).send().unwrap().status(), 204);
    assert_eq!(server.eval(&c, "3"), json!(3));
}
