//! sandpool under test: starts `sandpool serve` in a cgroup of the benchmark's own, talks to
//! it over HTTP, and measures refill, latency, throughput, density and scale.
//!
//! Memory is read from cgroup-v1 accounting: the pool's cgroup
//! (`/sys/fs/cgroup/memory/sandpool-<hash>/<pool>`, which holds every session, ready or
//! allocated) plus the benchmark's cgroup around the server, which holds the server, the
//! zygote, and whatever a session charged before it entered its own cgroup (its share of the
//! fork: page tables, copied pages).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::host::{self, Cgroup, MemoryReading};
use crate::http::{contains, Conn};
use crate::results::{gib, mib, Round};
use crate::workload::{self, Cells, Code, System};
use crate::Settings;

const API_VERSION: &str = "api-version=2025-10-02-preview";

/// A running `sandpool serve`.
pub struct Server {
    child: tokio::process::Child,
    pub pid: i32,
    pub addr: SocketAddr,
    pub token: String,
    pub instance: String,
    pub cgroup: Cgroup,
    pub log: PathBuf,
}

/// One pool's line in `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct PoolCounts {
    pub status: String,
    pub ready: usize,
    pub allocated: usize,
}

impl Server {
    /// Starts the server with `config` in a fresh state directory under `work`.
    pub async fn start(settings: &Settings, label: &str, config: &str) -> anyhow::Result<Server> {
        let dir = settings.work_dir.join(label);
        let _ = std::fs::remove_dir_all(&dir);
        let state_dir = dir.join("state");
        std::fs::create_dir_all(&state_dir)?;
        let config_path = dir.join("sandpool.toml");
        std::fs::write(&config_path, config)?;
        let log = dir.join("server.log");
        let cgroup = Cgroup::create(&format!("bench-{label}"))?;
        let args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--config".into(),
            config_path.display().to_string(),
        ];
        let mut child = cgroup
            .command(&settings.sandpool_bin, &args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", settings.sandpool_bin.display()))?;
        let pid = child.id().context("the server exited at once")? as i32;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await
            .with_context(|| format!("the server printed nothing for 120 s; see {}", log.display()))??
            .with_context(|| format!("the server exited during start-up; see {}", log.display()))?;
        let addr: SocketAddr = first
            .split("http://")
            .nth(1)
            .and_then(|a| a.trim().parse().ok())
            .with_context(|| format!("cannot find the address in {first:?}"))?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let token = host::output_of(
            &settings.sandpool_bin.display().to_string(),
            &["token", "issue", "--state-dir", &state_dir.display().to_string()],
        );
        if token.contains(' ') || token.is_empty() {
            bail!("cannot issue a token: {token}");
        }
        let instance = instance_name(&state_dir);
        Ok(Server { child, pid, addr, token, instance, cgroup, log })
    }

    /// Counts of each pool, by name.
    pub async fn readyz(&self, conn: &mut Conn) -> anyhow::Result<Vec<(String, PoolCounts)>> {
        let (_, body) = conn.get("/readyz").await?;
        let value: serde_json::Value = serde_json::from_slice(&body).context("/readyz is not JSON")?;
        let pools = value["pools"].as_array().context("/readyz has no pools")?;
        Ok(pools
            .iter()
            .map(|p| {
                let name = p["name"].as_str().unwrap_or_default().to_owned();
                let counts = PoolCounts {
                    status: p["status"].as_str().unwrap_or_default().to_owned(),
                    ready: p["readySessions"].as_u64().unwrap_or(0) as usize,
                    allocated: p["allocatedSessions"].as_u64().unwrap_or(0) as usize,
                };
                (name, counts)
            })
            .collect())
    }

    pub async fn pool(&self, conn: &mut Conn, pool: &str) -> anyhow::Result<PoolCounts> {
        let pools = self.readyz(conn).await?;
        pools.into_iter().find(|(name, _)| name == pool).map(|(_, c)| c).with_context(|| format!("/readyz does not list pool {pool}"))
    }

    /// Waits until `pool` holds `ready` ready sessions (and the server is quiet).
    pub async fn wait_ready(&self, conn: &mut Conn, pool: &str, ready: usize, limit: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            let counts = self.pool(conn, pool).await?;
            if counts.ready >= ready {
                break;
            }
            if counts.status.starts_with("Failed") {
                bail!("pool {pool} failed: {}", counts.status);
            }
            if start.elapsed() > limit {
                bail!("pool {pool} has {} of {ready} ready sessions after {limit:?}", counts.ready);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.cgroup.wait_quiet(0.05, Duration::from_secs(20)).await;
        Ok(start.elapsed())
    }

    /// The pool's memory cgroup (every session of the pool is below it).
    pub fn pool_memory_cgroup(&self, pool: &str) -> PathBuf {
        Path::new("/sys/fs/cgroup/memory").join(&self.instance).join(pool)
    }

    /// Pool cgroup plus the server's cgroup (server, zygote, fork-time charges).
    pub fn memory(&self, pool: &str) -> anyhow::Result<(MemoryReading, MemoryReading)> {
        Ok((MemoryReading::read(&self.pool_memory_cgroup(pool))?, self.cgroup.memory()?))
    }

    /// The zygote processes (children of the server started as `sandpool __zygote`).
    pub fn zygotes(&self) -> Vec<i32> {
        host::children(self.pid).into_iter().filter(|&p| host::cmdline(p).contains("__zygote")).collect()
    }

    /// CPU seconds so far: (everything in the server's cpuacct group, the server process, the
    /// zygotes). Sessions are the rest: they stay in the group the zygote forked them in.
    pub fn cpu_split(&self) -> CpuSplit {
        let zygote = self.zygotes().iter().map(|p| host::process_cpu_seconds(&p.to_string())).filter(|v| v.is_finite()).sum();
        CpuSplit { total: self.cgroup.cpu_seconds(), server: host::process_cpu_seconds(&self.pid.to_string()), zygote }
    }

    /// Log lines about host limits the server checked or raised at start.
    pub fn log_limits(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("raised") || l.contains("may need"))
            .map(strip_ansi)
            .collect()
    }

    /// Warnings and errors the server logged.
    pub fn log_problems(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .map(strip_ansi)
            .collect()
    }

    /// SIGTERM, then waits for the server to finish (it deletes every session). Returns how
    /// long shutting down took.
    pub async fn stop(mut self) -> Duration {
        let start = Instant::now();
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(120), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
        let took = start.elapsed();
        self.cgroup.remove();
        took
    }
}

/// CPU seconds used so far, split by process.
#[derive(Debug, Clone, Copy)]
pub struct CpuSplit {
    pub total: f64,
    pub server: f64,
    pub zygote: f64,
}

impl CpuSplit {
    /// Records the CPU used since `before`, per `units`, in ms, as `<key>_{total,server,zygote,sessions}_cpu_ms`.
    pub fn record_since(self, before: CpuSplit, units: f64, key: &str, result: &mut Round) {
        let per = |a: f64, b: f64| (a - b) * 1000.0 / units.max(1.0);
        let total = per(self.total, before.total);
        let server = per(self.server, before.server);
        let zygote = per(self.zygote, before.zygote);
        result.set(&format!("{key}_server_cpu_ms"), server);
        result.set(&format!("{key}_zygote_cpu_ms"), zygote);
        result.set(&format!("{key}_sessions_cpu_ms"), total - server - zygote);
    }
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The server's cgroup subtree name, as `sandpool serve` derives it from the state directory.
fn instance_name(state_dir: &Path) -> String {
    use sha2::Digest;
    let canonical = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    let digest = sha2::Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    format!("sandpool-{}", hex::encode(&digest[..4]))
}

/// The client side of a sandpool pool.
pub struct Sandpool {
    addr: SocketAddr,
    token: String,
    pool: String,
    cold_pool: String,
}

impl Sandpool {
    fn path(pool: &str, id: &str) -> String {
        format!("/pools/{pool}/executions?{API_VERSION}&identifier={id}")
    }
}

async fn execute(conn: &mut Conn, path: &str, code: &Code) -> anyhow::Result<()> {
    let (status, body) = conn.post(path, code.sandpool_body.clone()).await?;
    if status != hyper::StatusCode::OK || !contains(&body, b"\"status\":\"Succeeded\"") {
        bail!("{status}: {}", String::from_utf8_lossy(&body[..body.len().min(400)]));
    }
    Ok(())
}

impl System for Sandpool {
    type Client = Conn;
    type Session = String;

    async fn client(&self) -> anyhow::Result<Conn> {
        Conn::open(self.addr, Some(&self.token)).await
    }

    async fn first(&self, client: &mut Conn, id: &str, code: &Code, cold: bool) -> anyhow::Result<String> {
        let path = Sandpool::path(if cold { &self.cold_pool } else { &self.pool }, id);
        execute(client, &path, code).await?;
        Ok(path)
    }

    async fn exec(&self, client: &mut Conn, session: &mut String, code: &Code) -> anyhow::Result<()> {
        execute(client, session, code).await
    }
}

fn latency_config(settings: &Settings) -> String {
    format!(
        r#"# sandpool-bench: latency, throughput and refill
[runtime]
dir = "{runtime}"

[[pools]]
name = "bench"
max_concurrent_sessions = {max}
ready_session_instances = {ready}
cooldown_period_in_seconds = 3600

[[pools]]
name = "cold"
max_concurrent_sessions = 1000
ready_session_instances = 0
cooldown_period_in_seconds = 3600
"#,
        runtime = settings.runtime_dir.display(),
        max = settings.ready + settings.first_1c + settings.clients * settings.first_per_client + settings.repeat_sessions + 100,
        ready = settings.ready,
    )
}

/// A server with one pool `dense` of `max` sessions keeping `ready` warm.
fn single_pool_config(settings: &Settings, max: usize, ready: usize) -> String {
    format!(
        r#"# sandpool-bench: density or scale
[runtime]
dir = "{runtime}"

[[pools]]
name = "dense"
max_concurrent_sessions = {max}
ready_session_instances = {ready}
cooldown_period_in_seconds = 3600
"#,
        runtime = settings.runtime_dir.display(),
    )
}

/// Ready sessions seen over time while a pool fills.
struct Fill {
    per_second: f64,
    seconds_to_full: f64,
    cpu_ms_per_session: f64,
}

/// Watches `pool` fill from its start to `target` ready sessions, polling `/readyz` every
/// 20 ms. The rate is taken between 10 % and 90 % of the target.
async fn watch_fill(server: &Server, conn: &mut Conn, pool: &str, target: usize, result: &mut Round) -> anyhow::Result<Fill> {
    let start = Instant::now();
    let (lo, hi) = ((target / 10).max(1), (target * 9 / 10).max(2));
    let mut running_at = None;
    let mut low: Option<(Instant, usize, CpuSplit)> = None;
    loop {
        let counts = server.pool(conn, pool).await?;
        let now = Instant::now();
        if counts.status.starts_with("Failed") {
            bail!("pool {pool} failed: {}", counts.status);
        }
        if counts.status == "Running" && running_at.is_none() {
            running_at = Some(now);
        }
        if low.is_none() && counts.ready >= lo {
            low = Some((now, counts.ready, server.cpu_split()));
        }
        if counts.ready >= hi {
            if let Some((t0, r0, cpu0)) = low {
                let sessions = (counts.ready - r0).max(1) as f64;
                let seconds = now.duration_since(t0).as_secs_f64().max(1e-3);
                let split = server.cpu_split();
                let cpu = split.total - cpu0.total;
                split.record_since(cpu0, sessions, "refill", result);
                // Time to full: keep polling until the target.
                let full = loop {
                    let c = server.pool(conn, pool).await?;
                    if c.ready >= target || start.elapsed() > Duration::from_secs(300) {
                        break Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                let from = running_at.unwrap_or(start);
                return Ok(Fill {
                    per_second: sessions / seconds,
                    seconds_to_full: full.duration_since(from).as_secs_f64(),
                    cpu_ms_per_session: cpu * 1000.0 / sessions,
                });
            }
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!("pool {pool} reached only {} of {target} ready sessions in 300 s", counts.ready);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One round of the latency server: refill, first executions, repeat executions.
pub async fn latency_round(settings: &Settings, round: usize, cells: &Cells) -> Round {
    let mut result = Round::new("sandpool", round);
    let label = format!("sandpool-lat-r{round}");
    let server = match Server::start(settings, &label, &latency_config(settings)).await {
        Ok(server) => server,
        Err(err) => {
            result.note(format!("the server did not start: {err:#}"));
            return result;
        }
    };
    if let Err(err) = latency_phases(settings, round, cells, &server, &mut result).await {
        result.note(format!("latency round stopped: {err:#}"));
        for line in server.log_problems().into_iter().take(10) {
            result.note(format!("server log: {line}"));
        }
    }
    let took = server.stop().await;
    result.set("shutdown_seconds", took.as_secs_f64());
    result
}

async fn latency_phases(settings: &Settings, round: usize, cells: &Cells, server: &Server, result: &mut Round) -> anyhow::Result<()> {
    let mut conn = Conn::open(server.addr, None).await?;
    let sys = Arc::new(Sandpool { addr: server.addr, token: server.token.clone(), pool: "bench".into(), cold_pool: "cold".into() });

    // Refill: the ready queue filling from empty after the zygote started.
    let fill = watch_fill(server, &mut conn, "bench", settings.ready, result).await?;
    result.set("refill_per_s", fill.per_second);
    result.set("refill_seconds_to_full", fill.seconds_to_full);
    result.set("refill_cpu_ms_per_session", fill.cpu_ms_per_session);
    result.set("refill_n", settings.ready as f64);
    server.wait_ready(&mut conn, "bench", settings.ready, Duration::from_secs(120)).await?;
    let idle_ready = server.memory("bench")?;
    result.set("ready_session_pool_cgroup_mib", mib(idle_ready.0.usage as f64 / settings.ready as f64));

    // First execution, one client.
    let (outcome, _held) = workload::first_sequential(&sys, settings.first_1c, &format!("r{round}-one"), &cells.first, false).await?;
    result.latencies("first_1c", &outcome);
    server.wait_ready(&mut conn, "bench", settings.ready, Duration::from_secs(120)).await?;

    // The same, paced: a pause after each request lets the refiller replace the session
    // before the next one, so the figure shows allocation without refill work beside it.
    {
        let mut client = sys.client().await?;
        let mut outcome = workload::Outcome::default();
        for i in 0..settings.paced {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let t = Instant::now();
            match sys.first(&mut client, &format!("r{round}-paced-{i:05}"), &cells.first, false).await {
                Ok(_) => outcome.samples.push(t.elapsed()),
                Err(err) => {
                    outcome.errors += 1;
                    outcome.first_error.get_or_insert_with(|| format!("{err:#}"));
                }
            }
        }
        result.latencies("first_paced", &outcome);
    }
    server.wait_ready(&mut conn, "bench", settings.ready, Duration::from_secs(120)).await?;

    // First execution, many clients at once; watch the ready queue meanwhile.
    let watching = Arc::new(AtomicBool::new(true));
    let min_ready = Arc::new(AtomicUsize::new(usize::MAX));
    let watcher = {
        let (watching, min_ready) = (watching.clone(), min_ready.clone());
        let mut conn = Conn::open(server.addr, None).await?;
        let addr = server.addr;
        tokio::spawn(async move {
            while watching.load(Ordering::Relaxed) {
                if let Ok((_, body)) = conn.get("/readyz").await {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                        if let Some(p) = v["pools"].as_array().and_then(|a| a.iter().find(|p| p["name"] == "bench")) {
                            min_ready.fetch_min(p["readySessions"].as_u64().unwrap_or(0) as usize, Ordering::Relaxed);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            let _ = addr;
        })
    };
    let cpu0 = server.cpu_split();
    let machine0 = host::cpu_jiffies();
    let (outcome, _held) =
        workload::first_concurrent(&sys, settings.clients, settings.first_per_client, &format!("r{round}-many"), &cells.first).await?;
    result.set("first_50c_machine_busy_cores", host::busy_cores(machine0, host::cpu_jiffies()));
    let cpu = server.cgroup.cpu_seconds() - cpu0.total;
    server.cpu_split().record_since(cpu0, outcome.samples.len() as f64, "first_50c", result);
    watching.store(false, Ordering::Relaxed);
    let _ = watcher.await;
    let after = server.pool(&mut conn, "bench").await?;
    result.latencies("first_50c", &outcome);
    result.set("first_50c_clients", settings.clients as f64);
    result.set("first_50c_per_s", outcome.samples.len() as f64 / outcome.elapsed.as_secs_f64());
    result.set("first_50c_min_ready", min_ready.load(Ordering::Relaxed).min(after.ready) as f64);
    result.set("first_50c_server_cpu_ms_per_alloc", cpu * 1000.0 / outcome.samples.len().max(1) as f64);
    server.wait_ready(&mut conn, "bench", settings.ready, Duration::from_secs(120)).await?;

    // First execution with an empty ready queue (a pool that keeps none warm).
    let (outcome, _held) = workload::first_sequential(&sys, settings.cold, &format!("r{round}-cold"), &cells.first, true).await?;
    result.latencies("first_cold", &outcome);

    // Repeat executions: one client, one session.
    let (outcome, (mut client, mut sessions)) = workload::first_sequential(&sys, 1, &format!("r{round}-rep1"), &cells.init, false).await?;
    if outcome.errors > 0 || sessions.is_empty() {
        bail!("cannot start the repeat session: {:?}", outcome.first_error);
    }
    let outcome = workload::repeat_sequential(&sys, &mut client, &mut sessions[0], settings.repeat_1c, &cells.repeat).await;
    result.latencies("repeat_1c", &outcome);

    // Repeat executions: one client per session, all at once, for a fixed time.
    let (outcome, held) = workload::first_concurrent(&sys, settings.repeat_sessions, 1, &format!("r{round}-tput"), &cells.init).await?;
    if outcome.errors > 0 {
        bail!("cannot start the throughput sessions: {:?}", outcome.first_error);
    }
    let pairs: Vec<(Conn, String)> = held.into_iter().filter_map(|(c, mut s)| s.pop().map(|s| (c, s))).collect();
    server.wait_ready(&mut conn, "bench", settings.ready, Duration::from_secs(120)).await?;
    let before = server.cpu_split();
    throughput(result, &sys, pairs, settings, &server.cgroup, cells).await?;
    server.cpu_split().record_since(before, result.get("repeat_load_n"), "repeat", result);
    Ok(())
}

/// Runs the repeat workload across every pair and records throughput, latency under load and
/// CPU per execution (the system's, from cpuacct, and the load generator's own).
pub async fn throughput<S: System>(
    result: &mut Round,
    sys: &Arc<S>,
    pairs: Vec<(S::Client, S::Session)>,
    settings: &Settings,
    cgroup: &Cgroup,
    cells: &Cells,
) -> anyhow::Result<Vec<(S::Client, S::Session)>> {
    let sessions = pairs.len();
    let cpu0 = cgroup.cpu_seconds();
    let self0 = host::self_cpu_seconds();
    let machine0 = host::cpu_jiffies();
    let (outcome, pairs) = workload::repeat_for(sys, pairs, settings.repeat_seconds, &cells.repeat).await?;
    result.set("repeat_machine_busy_cores", host::busy_cores(machine0, host::cpu_jiffies()));
    let cpu = cgroup.cpu_seconds() - cpu0;
    let own = host::self_cpu_seconds() - self0;
    let secs = outcome.elapsed.as_secs_f64();
    let count = outcome.samples.len() as f64;
    result.latencies("repeat_load", &outcome);
    result.set("repeat_sessions", sessions as f64);
    result.set("repeat_per_s", count / secs);
    result.set("repeat_system_cpu_ms_per_exec", cpu * 1000.0 / count.max(1.0));
    result.set("repeat_system_cpu_cores", cpu / secs);
    result.set("repeat_loadgen_cpu_cores", own / secs);
    result.set("repeat_loadgen_cpu_us_per_exec", own * 1e6 / count.max(1.0));
    Ok(pairs)
}

/// Starts a single-pool server, runs `phases` on it, records its log findings and stops it.
async fn with_server<F>(settings: &Settings, label: &str, max: usize, ready: usize, key: &str, result: &mut Round, phases: F)
where
    F: AsyncFnOnce(&Server, &mut Round) -> anyhow::Result<()>,
{
    let server = match Server::start(settings, label, &single_pool_config(settings, max, ready)).await {
        Ok(server) => server,
        Err(err) => {
            result.note(format!("the {key} server did not start: {err:#}"));
            return;
        }
    };
    if let Err(err) = phases(&server, result).await {
        result.note(format!("{key} run stopped: {err:#}"));
    }
    for line in server.log_limits() {
        result.note(format!("{key} server log: {line}"));
    }
    let problems = server.log_problems();
    result.set(&format!("{key}_server_log_warnings"), problems.len() as f64);
    for line in problems.iter().take(8) {
        result.note(format!("{key} server log: {line}"));
    }
    let took = server.stop().await;
    result.set(&format!("{key}_shutdown_seconds"), took.as_secs_f64());
}

/// Density: a server whose pool holds the density sessions plus its ready queue.
pub async fn density_round(settings: &Settings, round: usize, cells: &Cells, result: &mut Round) {
    let max = settings.density_sessions + settings.density_ready;
    with_server(settings, &format!("sandpool-dense-r{round}"), max, settings.density_ready, "density", result, async |server, result| {
        density_phases(settings, round, cells, server, result).await
    })
    .await;
}

/// Scale: a server whose pool holds `scale_sessions`, all allocated at once.
pub async fn scale_round(settings: &Settings, round: usize, cells: &Cells, result: &mut Round) {
    with_server(
        settings,
        &format!("sandpool-scale-r{round}"),
        settings.scale_sessions,
        settings.density_ready,
        "scale",
        result,
        async |server, result| scale_phases(settings, round, cells, server, result).await,
    )
    .await;
}

/// Allocates `count` new sessions, `clients` at a time, running `code` as their first cell,
/// unless memory gets short. Returns (allocated, failures, first error, elapsed, sessions).
async fn allocate(
    sys: &Arc<Sandpool>,
    count: usize,
    clients: usize,
    prefix: &str,
    code: &Arc<Code>,
    reserve: u64,
) -> anyhow::Result<(usize, usize, Option<String>, Duration, Vec<String>, bool)> {
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients.min(count).max(1) {
        let (sys, next, stop, code) = (sys.clone(), next.clone(), stop.clone(), code.clone());
        let prefix = prefix.to_owned();
        let mut client = sys.client().await?;
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut first_error, mut sessions) = (0usize, 0usize, None, Vec::new());
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || stop.load(Ordering::Relaxed) {
                    break;
                }
                if i % 25 == 0 && host::mem_available() < reserve {
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
                match sys.first(&mut client, &format!("{prefix}-{i:05}"), &code, false).await {
                    Ok(s) => {
                        ok += 1;
                        sessions.push(s);
                    }
                    Err(err) => {
                        failed += 1;
                        first_error.get_or_insert_with(|| format!("{err:#}"));
                    }
                }
            }
            (ok, failed, first_error, sessions)
        }));
    }
    let (mut ok, mut failed, mut first_error, mut sessions) = (0, 0, None, Vec::new());
    for task in tasks {
        let (o, f, e, s) = task.await?;
        ok += o;
        failed += f;
        if first_error.is_none() {
            first_error = e;
        }
        sessions.extend(s);
    }
    Ok((ok, failed, first_error, start.elapsed(), sessions, stop.load(Ordering::Relaxed)))
}

async fn density_phases(settings: &Settings, round: usize, cells: &Cells, server: &Server, result: &mut Round) -> anyhow::Result<()> {
    let mut conn = Conn::open(server.addr, None).await?;
    let sys = Arc::new(Sandpool { addr: server.addr, token: server.token.clone(), pool: "dense".into(), cold_pool: "dense".into() });
    let ready = settings.density_ready;
    server.wait_ready(&mut conn, "dense", ready, Duration::from_secs(120)).await?;
    let (pool0, server0) = server.memory("dense")?;
    let before = pool0.plus(server0);
    result.set("idle_total_gib", gib(before.usage as f64));

    // Density: N sessions that each ran a numpy + pandas cell.
    let n = settings.density_sessions;
    let (ok, failed, err, took, _sessions, short) =
        allocate(&sys, n, 16, &format!("r{round}-dense"), &cells.density, settings.memory_reserve).await?;
    if let Some(err) = err {
        result.note(format!("density: {failed} of {n} allocations failed, first: {err}"));
    }
    if short {
        result.note(format!("density: stopped at {ok} sessions because MemAvailable fell below the reserve"));
    }
    result.set("density_n", ok as f64);
    result.set("density_alloc_seconds", took.as_secs_f64());
    server.wait_ready(&mut conn, "dense", ready, Duration::from_secs(180)).await?;
    let (pool1, server1) = server.memory("dense")?;
    let after = pool1.plus(server1);
    let per = after.growth_per(before, ok);
    result.set("density_mib_per_session", mib(per.usage));
    result.set("density_rss_mib_per_session", mib(per.rss));
    result.set("density_cache_mib_per_session", mib(per.cache));
    result.set("density_kmem_mib_per_session", mib(per.kmem));
    result.set("density_pool_cgroup_mib_per_session", mib(pool1.growth_per(pool0, ok).usage));
    result.set("density_server_cgroup_mib_per_session", mib(server1.growth_per(server0, ok).usage));
    result.set("density_total_gib", gib(after.usage as f64));
    result.set("density_total_gib_per_1000", gib(after.usage as f64) * 1000.0 / ok.max(1) as f64);
    if let Some(&zygote) = server.zygotes().first() {
        if let Some(m) = host::process_memory(zygote) {
            result.set("zygote_rss_mib", mib(m.rss as f64));
            result.set("zygote_pss_mib", mib(m.pss as f64));
            result.set("zygote_uss_mib", mib(m.uss as f64));
        }
    }
    if let Some(m) = host::process_memory(server.pid) {
        result.set("server_rss_mib", mib(m.rss as f64));
    }
    result.set("server_cgroup_mib", mib(server1.usage as f64));

    Ok(())
}

async fn scale_phases(settings: &Settings, round: usize, cells: &Cells, server: &Server, result: &mut Round) -> anyhow::Result<()> {
    let mut conn = Conn::open(server.addr, None).await?;
    let sys = Arc::new(Sandpool { addr: server.addr, token: server.token.clone(), pool: "dense".into(), cold_pool: "dense".into() });
    server.wait_ready(&mut conn, "dense", settings.density_ready, Duration::from_secs(120)).await?;
    // Every session of the pool, as fast as the clients can ask.
    let n = settings.scale_sessions;
    let (ok, failed, err, took, _s, short) =
        allocate(&sys, n, settings.clients, &format!("r{round}-scale"), &cells.first, settings.memory_reserve).await?;
    if let Some(err) = err {
        result.note(format!("scale: {failed} of {n} allocations failed, first: {err}"));
    }
    if short {
        result.note(format!("scale: stopped at {ok} sessions because MemAvailable fell below the reserve"));
    }
    result.set("scale_alloc_seconds", took.as_secs_f64());
    result.set("scale_alloc_per_s", ok as f64 / took.as_secs_f64());
    server.cgroup.wait_quiet(0.05, Duration::from_secs(30)).await;
    let counts = server.pool(&mut conn, "dense").await?;
    result.set("scale_allocated", counts.allocated as f64);
    // Does every session still answer?
    let ids: Vec<String> = (0..n).map(|i| format!("r{round}-scale-{i:05}")).collect();
    let probe_start = Instant::now();
    let answered = probe_all(&sys, ids, settings.clients, &cells.probe).await?;
    result.set("scale_probe_ok", answered.0 as f64);
    result.set("scale_probe_seconds", probe_start.elapsed().as_secs_f64());
    if let Some(err) = answered.1 {
        result.note(format!("scale probe: first failure: {err}"));
    }
    // One more identifier than the pool holds: Azure's capacity error, or a session?
    let mut client = sys.client().await?;
    let (status, body) = client.post(&Sandpool::path("dense", &format!("r{round}-overflow")), cells.first.sandpool_body.clone()).await?;
    result.set("scale_overflow_status", status.as_u16() as f64);
    if status != hyper::StatusCode::NOT_FOUND || !contains(&body, b"SessionPoolCapacityExceeded") {
        result.note(format!("one session beyond capacity answered {status}: {}", String::from_utf8_lossy(&body[..body.len().min(200)])));
    }
    let (pool, server_mem) = server.memory("dense")?;
    result.set("scale_total_gib", gib(pool.plus(server_mem).usage as f64));
    let (fds, fd_limit) = host::open_files(server.pid);
    result.set("scale_server_open_files", fds as f64);
    result.set("scale_server_open_files_limit", fd_limit.map(|l| l as f64).unwrap_or(f64::NAN));
    let pids_current = std::fs::read_to_string(Path::new("/sys/fs/cgroup/pids").join(&server.instance).join("dense").join("pids.current"))
        .ok()
        .and_then(|t| t.trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    result.set("scale_pool_tasks", pids_current);
    result.set(
        "scale_pid_max",
        std::fs::read_to_string("/proc/sys/kernel/pid_max").ok().and_then(|t| t.trim().parse().ok()).unwrap_or(f64::NAN),
    );
    Ok(())
}

/// Runs `code` once in each identified session; returns how many succeeded and the first error.
async fn probe_all(sys: &Arc<Sandpool>, ids: Vec<String>, clients: usize, code: &Arc<Code>) -> anyhow::Result<(usize, Option<String>)> {
    let ids = Arc::new(ids);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let (sys, ids, next, code) = (sys.clone(), ids.clone(), next.clone(), code.clone());
        let mut client = sys.client().await?;
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut first_error) = (0, None);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else { break };
                let mut path = Sandpool::path(&sys.pool, id);
                match sys.exec(&mut client, &mut path, &code).await {
                    Ok(()) => ok += 1,
                    Err(err) => {
                        first_error.get_or_insert_with(|| format!("{err:#}"));
                    }
                }
            }
            (ok, first_error)
        }));
    }
    let (mut ok, mut first_error) = (0, None);
    for task in tasks {
        let (o, e) = task.await?;
        ok += o;
        if first_error.is_none() {
            first_error = e;
        }
    }
    Ok((ok, first_error))
}
