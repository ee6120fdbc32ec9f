//! The command-line tools: `token issue`, `exec`, `default-config`, and how `serve` reports
//! a broken configuration.

use std::process::Command;

use crate::support::{new_id, refused_config, sandpool_bin, TestServer};

#[test]
fn token_issue_prints_a_token_and_nothing_else() {
    let server = TestServer::start();
    let output =
        Command::new(sandpool_bin()).args(["token", "issue", "--ttl", "10m", "--state-dir"]).arg(server.state_path()).output().unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1);
    let token = stdout.trim();
    assert_eq!(token.split('.').count(), 3, "a JWT");
    let response = server.http().get(server.url("files", Some(&new_id("tok")), crate::support::NEW)).bearer_auth(token).send().unwrap();
    assert_eq!(response.status(), 200);
}

#[test]
fn exec_runs_code_and_prints_like_a_repl() {
    let server = TestServer::start();
    let id = new_id("cli");
    let exec = |code: &str| {
        Command::new(sandpool_bin())
            .args(["exec", "--endpoint", &server.endpoint(), "--identifier", &id, "--state-dir"])
            .arg(server.state_path())
            .arg(code)
            .output()
            .unwrap()
    };
    let first = exec("x = 20\nprint('set')");
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert_eq!(String::from_utf8_lossy(&first.stdout), "set\n");
    let second = exec("x * 2 + 2");
    assert_eq!(String::from_utf8_lossy(&second.stdout), "42\n");
    let failed = exec("raise ValueError('nope')");
    assert_eq!(failed.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&failed.stderr).contains("ValueError: nope"));
    let unreachable = Command::new(sandpool_bin())
        .args(["exec", "--endpoint", "http://127.0.0.1:9/pools/default", "--token", "x", "1"])
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach"));
}

#[test]
fn a_broken_config_file_is_refused_with_the_key_named() {
    let stderr = refused_config("bad.toml", "[[pools]]\nname = \"default\"\nmax_sesions = 3\n");
    assert!(stderr.contains("max_sesions") && stderr.contains("bad.toml"), "{stderr}");
}

#[test]
fn the_printed_default_config_is_the_one_serve_uses() {
    let output = Command::new(sandpool_bin()).arg("default-config").output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("name = \"default\"") && text.contains("container_type = \"PythonLTS\""));
    assert!(text.contains("cooldown_period_in_seconds = 300"));
}

#[test]
fn a_missing_python_or_package_index_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let prepare = |runtime: &str| {
        let path = dir.path().join("config.toml");
        std::fs::write(&path, format!("[runtime]\n{runtime}\n[[pools]]\nname = \"default\"\n")).unwrap();
        Command::new(sandpool_bin())
            .args(["prepare", "--config"])
            .arg(&path)
            .arg("--runtime-dir")
            .arg(dir.path().join("runtime"))
            .env("PIP_RETRIES", "0")
            .env("PIP_DEFAULT_TIMEOUT", "3")
            .output()
            .unwrap()
    };
    let output = prepare("python = \"/nonexistent/bin/python3\"");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/bin/python3") && stderr.contains("no Python 3 interpreter found"), "{stderr}");

    let output = prepare("index_url = \"http://127.0.0.1:9/simple\"\npackages = [\"numpy==2.4.6\"]");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("package index"), "{stderr}");

    // `serve` with such a runtime reports the cause and exits instead of serving nothing.
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[runtime]\npython = \"/nonexistent/bin/python3\"\n[[pools]]\nname = \"default\"\n").unwrap();
    let output = Command::new(sandpool_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no pool could start") && stderr.contains("/nonexistent/bin/python3"), "{stderr}");
}

#[test]
fn a_second_server_on_the_same_state_directory_waits_for_the_first_to_stop() {
    use std::io::{BufRead, BufReader};
    let first = TestServer::start();
    let config = first.state_dir.path().join("config.toml");
    let mut second = Command::new(sandpool_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(first.state_path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = second.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // While the first server runs, the second one does not start serving...
    assert!(rx.recv_timeout(std::time::Duration::from_secs(2)).is_err(), "two servers share one state directory");
    // ...and the first server is undisturbed.
    assert_eq!(first.eval(&new_id("first"), "'still serving'"), serde_json::json!("still serving"));
    assert!(first.stop().success());
    let line = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("the second server starts once the first stopped");
    assert!(line.contains("listening on"), "{line}");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(second.id() as i32), nix::sys::signal::Signal::SIGTERM);
    assert!(second.wait().unwrap().success());
}
