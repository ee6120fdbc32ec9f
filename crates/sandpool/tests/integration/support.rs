//! Test support: a real `sandpool serve` process on a free port, with its own state
//! directory, and small HTTP helpers.
//!
//! Every server shares one Python runtime directory (`SANDPOOL_TEST_RUNTIME_DIR`, by default
//! `target/sandpool-test-runtime`), so the venv is built by the first server only.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, RequestBuilder, Response};
use serde_json::Value;

pub const LEGACY: &str = "2024-02-02-preview";
pub const NEW: &str = "2025-10-02-preview";

pub fn sandpool_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sandpool")
}

pub fn runtime_dir() -> PathBuf {
    std::env::var_os("SANDPOOL_TEST_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/sandpool-test-runtime"))
}

/// Pool settings for a test server; the defaults suit most tests.
pub struct PoolSpec {
    pub max_concurrent_sessions: u32,
    pub ready_session_instances: u32,
    pub cooldown_seconds: u32,
    pub timeout_seconds: u32,
    pub memory: &'static str,
    pub max_output_characters: u32,
    pub max_processes: u32,
    pub cpu: f64,
}

impl Default for PoolSpec {
    fn default() -> PoolSpec {
        PoolSpec {
            max_concurrent_sessions: 20,
            ready_session_instances: 2,
            cooldown_seconds: 300,
            timeout_seconds: 60,
            memory: "1Gi",
            max_output_characters: 262_144,
            max_processes: 64,
            cpu: 1.0,
        }
    }
}

pub struct TestServer {
    child: Child,
    pub addr: SocketAddr,
    pub state_dir: tempfile::TempDir,
    pub token: String,
    log: PathBuf,
    http: Client,
}

impl TestServer {
    pub fn start() -> TestServer {
        TestServer::with_pool(PoolSpec::default())
    }

    pub fn with_pool(pool: PoolSpec) -> TestServer {
        let config = format!(
            "[runtime]\ndir = {runtime:?}\n\n[[pools]]\nname = \"default\"\nmax_concurrent_sessions = {max}\nready_session_instances = {ready}\n\
             cooldown_period_in_seconds = {cooldown}\nexecution_timeout_in_seconds = {timeout}\n\n[pools.resources]\nmemory = {memory:?}\n\
             max_output_characters = {output}\nmax_processes = {procs}\ncpu = {cpu:?}\ndata_dir_size = \"256Mi\"\ntmp_dir_size = \"64Mi\"\n",
            runtime = runtime_dir().display().to_string(),
            max = pool.max_concurrent_sessions,
            ready = pool.ready_session_instances,
            cooldown = pool.cooldown_seconds,
            timeout = pool.timeout_seconds,
            memory = pool.memory,
            output = pool.max_output_characters,
            procs = pool.max_processes,
            cpu = pool.cpu,
        );
        TestServer::with_config(&config)
    }

    pub fn with_config(config: &str) -> TestServer {
        TestServer::with_config_and_env(config, &[])
    }

    /// A server with extra environment variables (for example `SANDPOOL_LOG_FORMAT`).
    pub fn with_config_and_env(config: &str, env: &[(&str, &str)]) -> TestServer {
        let state_dir = tempfile::Builder::new().prefix("sandpool-test-").tempdir().expect("temp dir");
        let config_path = state_dir.path().join("config.toml");
        std::fs::write(&config_path, config).expect("write config");
        let log = state_dir.path().join("server.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut child = Command::new(sandpool_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config_path)
            .arg("--state-dir")
            .arg(state_dir.path().join("state"))
            .env("SANDPOOL_LOG", "info,sandpool_api=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("start sandpool serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        let addr: SocketAddr = first
            .rsplit("http://")
            .next()
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
        // Keep draining stdout so the server never blocks on it.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        let token = issue_token(&state_dir.path().join("state"), "1h");
        sandpool_auth::install_tls_provider();
        let http = Client::builder().timeout(Duration::from_secs(120)).build().expect("client");
        let mut server = TestServer { child, addr, state_dir, token, log, http };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sandpool serve exited with {status} during start-up; log:\n{}", self.log_text());
            }
            if let Ok(response) = self.http.get(format!("http://{}/readyz", self.addr)).send() {
                if response.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "server not ready after 10 minutes; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Pids of this server's zygotes.
    pub fn zygote_pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            let parent = status.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|p| p.trim().parse::<u32>().ok());
            if cmdline.ends_with(b"__zygote\0") && parent == Some(self.pid()) {
                pids.push(pid);
            }
        }
        pids
    }

    pub fn state_path(&self) -> PathBuf {
        self.state_dir.path().join("state")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `http://ADDR/pools/default`
    pub fn endpoint(&self) -> String {
        format!("http://{}/pools/default", self.addr)
    }

    pub fn url(&self, route: &str, identifier: Option<&str>, api_version: &str) -> String {
        let mut url = format!("{}/{route}?api-version={api_version}", self.endpoint());
        if let Some(identifier) = identifier {
            url.push_str("&identifier=");
            url.push_str(&encode(identifier));
        }
        url
    }

    pub fn http(&self) -> &Client {
        &self.http
    }

    /// A request with the server's token.
    pub fn authed(&self, builder: RequestBuilder) -> RequestBuilder {
        builder.bearer_auth(&self.token)
    }

    /// `POST executions` (new generation), synchronous; returns the response JSON.
    pub fn execute(&self, identifier: &str, code: &str) -> Value {
        let response = self
            .authed(self.http.post(self.url("executions", Some(identifier), NEW)))
            .json(&serde_json::json!({ "code": code }))
            .send()
            .expect("request");
        let status = response.status();
        let body: Value = response.json().expect("json body");
        assert_eq!(status, 200, "execute {code:?}: {body}");
        body
    }

    /// Runs code and returns its `executionResult`, asserting it succeeded.
    pub fn eval(&self, identifier: &str, code: &str) -> Value {
        let body = self.execute(identifier, code);
        assert_eq!(body["status"], "Succeeded", "{code:?} failed: {body}");
        body["result"]["executionResult"].clone()
    }

    /// The sandbox id (`x-ms-session-guid`, the session's `etag`) of a live session.
    pub fn sandbox_id(&self, identifier: &str) -> String {
        let view: Value =
            self.authed(self.http.get(self.url("session", Some(identifier), NEW))).send().expect("get session").json().expect("json");
        view["etag"].as_str().expect("etag").to_owned()
    }

    /// Host pids of every process of a session, read from its cgroup (inside the session,
    /// `os.getpid()` is a pid of the session's own PID namespace).
    pub fn session_host_pids(&self, identifier: &str) -> Vec<i32> {
        let sandbox = self.sandbox_id(identifier);
        for hierarchy in ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"] {
            let Ok(entries) = std::fs::read_dir(hierarchy) else { continue };
            for instance in entries.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("sandpool-")) {
                let procs = instance.path().join("default").join(&sandbox).join("cgroup.procs");
                if let Ok(text) = std::fs::read_to_string(&procs) {
                    return text.lines().filter_map(|l| l.trim().parse().ok()).collect();
                }
            }
        }
        panic!("no cgroup found for sandbox {sandbox}");
    }

    /// Runs code and returns its result as JSON data, for results that the API reports as
    /// text (lists, dicts): the runner keeps the last value in `_`, which a second cell dumps.
    pub fn eval_json(&self, identifier: &str, code: &str) -> Value {
        self.eval(identifier, code);
        let text = self.eval(identifier, "__import__('json').dumps(_)");
        serde_json::from_str(text.as_str().expect("a JSON string")).expect("valid JSON")
    }

    /// `POST .../files` multipart upload of one file (new generation).
    pub fn upload(&self, identifier: &str, name: &str, bytes: Vec<u8>, path: Option<&str>) -> Response {
        let mut url = self.url("files", Some(identifier), NEW);
        if let Some(path) = path {
            url.push_str("&path=");
            url.push_str(&encode(path));
        }
        let part = reqwest::blocking::multipart::Part::bytes(bytes).file_name(name.to_owned());
        self.authed(self.http.post(url)).multipart(reqwest::blocking::multipart::Form::new().part("file", part)).send().expect("upload")
    }
}

impl TestServer {
    /// Sends SIGTERM and waits for the server to exit; returns its exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.terminate();
        self.child.wait().expect("wait for the server")
    }

    fn terminate(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.terminate();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- server log (last lines) ---\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
    }
}

pub fn issue_token(state_dir: &Path, ttl: &str) -> String {
    issue_token_with(state_dir, &["--role", "admin", "--ttl", ttl])
}

/// `sandpool token issue` with these arguments.
pub fn issue_token_with(state_dir: &Path, args: &[&str]) -> String {
    let output =
        Command::new(sandpool_bin()).args(["token", "issue"]).args(args).arg("--state-dir").arg(state_dir).output().expect("token issue");
    assert!(output.status.success(), "token issue failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("utf-8").trim().to_owned()
}

/// Starts `sandpool serve` with `config` (written to a file named `file_name`), expects it to
/// refuse to start, and returns what it printed on stderr.
pub fn refused_config(file_name: &str, config: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file_name);
    std::fs::write(&path, config).unwrap();
    let output = Command::new(sandpool_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success(), "the server started with:\n{config}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Percent-encodes a query value (everything but unreserved characters).
pub fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// A fresh identifier for one test's session.
pub fn new_id(tag: &str) -> String {
    format!("{tag}-{}", uuid::Uuid::new_v4())
}

/// Asserts an error response: status, envelope, and `x-ms-error-code`; returns the message.
pub fn assert_error(response: Response, status: u16, code: &str) -> String {
    assert_eq!(response.status(), status, "expected {status} {code}");
    let header = response.headers().get("x-ms-error-code").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body: Value = response.json().expect("error body is JSON");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(header.as_deref(), Some(code));
    let message = body["error"]["message"].as_str().expect("message").to_owned();
    assert!(!message.is_empty());
    message
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    condition()
}
