//! Authorisation: what each role may do, tokens scoped to one identifier, and static API
//! keys, all through the real API with tokens minted by the real CLI.

use std::process::Command;

use reqwest::blocking::Response;
use serde_json::json;

use crate::support::{assert_error, issue_token_with, new_id, refused_config, runtime_dir, sandpool_bin, TestServer, NEW};

/// What a request with `token` gets: execute in `identifier`, and list the pool's sessions.
fn execute(server: &TestServer, token: &str, identifier: &str) -> Response {
    server.http().post(server.url("executions", Some(identifier), NEW)).bearer_auth(token).json(&json!({ "code": "6 * 7" })).send().unwrap()
}

fn list(server: &TestServer, token: &str) -> Response {
    server.http().get(server.url("listSessions", None, NEW)).bearer_auth(token).send().unwrap()
}

#[test]
fn each_role_may_do_its_own_operations_only() {
    let server = TestServer::start();
    let state = server.state_path();
    let token = |roles: &[&str]| {
        let mut args = Vec::new();
        for role in roles {
            args.extend(["--role", role]);
        }
        issue_token_with(&state, &args)
    };
    let id = new_id("roles");

    // The default role is executor: code and files, not the session list.
    let executor = issue_token_with(&state, &[]);
    assert_eq!(execute(&server, &executor, &id).status(), 200);
    let message = assert_error(list(&server, &executor), 403, "AuthorizationFailed");
    assert!(message.contains("'contributor'") && message.contains("'executor'"), "{message}");

    let contributor = token(&["contributor"]);
    assert_eq!(list(&server, &contributor).status(), 200);
    assert_error(execute(&server, &contributor, &id), 403, "AuthorizationFailed");

    let reader = token(&["reader"]);
    assert!(assert_error(execute(&server, &reader, &id), 403, "AuthorizationFailed").contains("'executor'"));
    assert_error(list(&server, &reader), 403, "AuthorizationFailed");

    let both = token(&["executor", "contributor"]);
    assert_eq!(execute(&server, &both, &id).status(), 200);
    assert_eq!(list(&server, &both).status(), 200);
    let admin = token(&["admin"]);
    assert_eq!(execute(&server, &admin, &id).status(), 200);
    assert_eq!(list(&server, &admin).status(), 200);

    // An unknown role is refused by the CLI with the list of roles.
    let output = Command::new(sandpool_bin()).args(["token", "issue", "--role", "owner", "--state-dir"]).arg(&state).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("executor, contributor, reader, admin"));
}

#[test]
fn an_identifier_scoped_token_works_for_its_session_only() {
    let server = TestServer::start();
    let state = server.state_path();
    let mine = new_id("user-a");
    let token = issue_token_with(&state, &["--identifier", &mine]);
    assert_eq!(execute(&server, &token, &mine).status(), 200);
    // Files and the session itself, under the same identifier.
    let files = server.http().get(server.url("files", Some(&mine), NEW)).bearer_auth(&token).send().unwrap();
    assert_eq!(files.status(), 200);
    let message = assert_error(execute(&server, &token, &new_id("user-b")), 403, "AuthorizationFailed");
    assert!(message.contains(&mine), "{message}");
    assert_error(execute(&server, &token, &format!("{mine}x")), 403, "AuthorizationFailed");
    assert_error(list(&server, &token), 403, "AuthorizationFailed");
    // Deleting someone else's session is refused too, and theirs survives.
    let other = new_id("user-b");
    server.eval(&other, "kept = 1");
    let delete = server.http().delete(server.url("session", Some(&other), NEW)).bearer_auth(&token).send().unwrap();
    assert_error(delete, 403, "AuthorizationFailed");
    assert_eq!(server.eval(&other, "kept"), json!(1));

    // A prefix scope: every identifier that starts with it, nothing else.
    let prefix = new_id("tenant");
    let token = issue_token_with(&state, &["--identifier-prefix", &prefix]);
    assert_eq!(execute(&server, &token, &format!("{prefix}-one")).status(), 200);
    assert_eq!(execute(&server, &token, &format!("{prefix}-two")).status(), 200);
    assert_error(execute(&server, &token, &new_id("tenant")), 403, "AuthorizationFailed");
}

#[test]
fn api_keys_are_configured_by_hash_and_work_as_bearer_tokens() {
    let created = Command::new(sandpool_bin()).args(["api-key", "create", "--name", "ci-bot", "--role", "executor"]).output().unwrap();
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let key = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("spk_"), "{key}");
    let stderr = String::from_utf8(created.stderr).unwrap();
    let entry = &stderr[stderr.find("[[auth.api_keys]]").expect("a config entry on stderr")..];
    assert!(!entry.contains(&key), "the config entry must hold the hash, not the key");
    let config = format!(
        "[auth]\n\n{entry}\n[runtime]\ndir = {runtime:?}\n\n[[pools]]\nname = \"default\"\nready_session_instances = 1\n",
        runtime = runtime_dir().display().to_string()
    );
    let server = TestServer::with_config(&config);
    let id = new_id("apikey");
    let response = execute(&server, &key, &id);
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<serde_json::Value>().unwrap()["result"]["executionResult"], json!(42));
    assert_error(list(&server, &key), 403, "AuthorizationFailed");
    // Change the last character (to another one: a key may end in 'A').
    let last = if key.ends_with('A') { 'B' } else { 'A' };
    let wrong = format!("{}{last}", &key[..key.len() - 1]);
    assert_error(execute(&server, &wrong, &id), 401, "Unauthorized");
    assert!(!server.log_text().contains(&key), "the key leaked into the log");
}

#[test]
fn bad_auth_configuration_is_refused_at_start_with_the_problem_named() {
    let cases = [
        ("[auth]\nlocal_issuer = false\n", "no request could ever be authenticated"),
        ("[[auth.api_keys]]\nname = \"x\"\nsha256 = \"abc\"\nroles = [\"executor\"]\n", "64 hexadecimal"),
        ("[[auth.api_keys]]\nname = \"x\"\nsha256 = \"abc\"\nroles = [\"owner\"]\n", "unknown role 'owner'"),
        ("[[auth.oidc]]\nissuer = \"http://login.example.com/\"\n", "https"),
        ("[auth]\naudiences = []\n", "at least one audience"),
    ];
    for (auth, expected) in cases {
        let stderr = refused_config("auth.toml", &format!("{auth}\n[[pools]]\nname = \"default\"\n"));
        assert!(stderr.contains(expected), "{auth}: {stderr}");
    }
}
