//! `sandpool-bench`: sandpool side by side with what a user would pick instead on one machine:
//! Jupyter Kernel Gateway (one kernel per identifier, pre-spawned, seeded with the imports) and a
//! fresh bubblewrap-sandboxed python3 per session. Same workload, same Python libraries,
//! repeated rounds with the systems interleaved; medians go to a table, JSON and Markdown.
//!
//! Run it through `scripts/bench`, which installs what it needs and builds it; as root.

mod bwrap;
mod heavy;
mod host;
mod http;
mod jkg;
mod report;
mod results;
mod sandpool;
mod stats;
mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

/// Sizes and paths of one run.
#[derive(Debug, Clone, Parser, serde::Serialize)]
#[command(name = "sandpool-bench", about = "Benchmark sandpool against Jupyter Kernel Gateway and bwrap + python3")]
pub struct Settings {
    /// The sandpool binary (release build)
    #[arg(long, default_value = "target/release/sandpool")]
    pub sandpool_bin: PathBuf,
    /// Directory of sandpool's Python runtimes (`[runtime] dir`), already prepared
    #[arg(long)]
    pub runtime_dir: PathBuf,
    /// The session venv inside it (what `sandpool prepare` printed); bwrap uses its python
    #[arg(long)]
    pub venv: PathBuf,
    /// The venv with jupyter-kernel-gateway, ipykernel and the same numpy, pandas, matplotlib
    #[arg(long)]
    pub jkg_venv: PathBuf,
    /// The bwrap binary
    #[arg(long, default_value = "/usr/bin/bwrap")]
    pub bwrap: PathBuf,
    /// Scratch space (state directories, logs)
    #[arg(long, default_value = "target/bench/work")]
    pub work_dir: PathBuf,
    /// Where latest.json and latest.md go
    #[arg(long, default_value = "bench/results")]
    pub out_dir: PathBuf,
    /// Systems to run, comma-separated
    #[arg(long, default_value = "sandpool,jkg,jkg-nodelay,bwrap", value_delimiter = ',')]
    pub systems: Vec<String>,
    /// Quick mode: one round, fewer sessions (for development)
    #[arg(long)]
    pub quick: bool,
    /// Rounds (each runs every system once, in rotating order)
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// sandpool: first executions from one client, per round
    #[arg(long, default_value_t = 200)]
    pub first_1c: usize,
    /// Concurrent clients for the many-clients first-execution phase and the scale run
    #[arg(long, default_value_t = 50)]
    pub clients: usize,
    /// sandpool: first executions per client in the many-clients phase
    #[arg(long, default_value_t = 8)]
    pub first_per_client: usize,
    /// sandpool: ready_session_instances of the latency pool (also the refill measurement)
    #[arg(long, default_value_t = 600)]
    pub ready: usize,
    /// sandpool: first executions from one client with a 50 ms pause before each (no refill work beside them)
    #[arg(long, default_value_t = 50)]
    pub paced: usize,
    /// First executions on a pool with nothing pre-started (sandpool)
    #[arg(long, default_value_t = 20)]
    pub cold: usize,
    /// Executions of `x += 1` by one client in one session
    #[arg(long, default_value_t = 200)]
    pub repeat_1c: usize,
    /// sandpool: sessions (one client each) in the throughput run
    #[arg(long, default_value_t = 100)]
    pub repeat_sessions: usize,
    /// Length of the throughput run
    #[arg(long, default_value = "5", value_parser = parse_seconds)]
    pub repeat_seconds: Duration,
    /// sandpool: live sessions for the density figure
    #[arg(long, default_value_t = 1000)]
    pub density_sessions: usize,
    /// sandpool: ready_session_instances of the density pool
    #[arg(long, default_value_t = 100)]
    pub density_ready: usize,
    /// sandpool: sessions allocated at once in one pool (its max_concurrent_sessions)
    #[arg(long, default_value_t = 2000)]
    pub scale_sessions: usize,
    /// JKG and bwrap: first executions from one client (the many-clients phase uses one per client)
    #[arg(long, default_value_t = 10)]
    pub heavy_first_1c: usize,
    /// JKG and bwrap: sessions started at once for the refill figure
    #[arg(long, default_value_t = 12)]
    pub heavy_refill: usize,
    /// JKG and bwrap: cold first executions
    #[arg(long, default_value_t = 3)]
    pub heavy_cold: usize,
    /// Stop allocating when MemAvailable falls below this many bytes
    #[arg(long, default_value_t = 11 << 29)]
    pub memory_reserve: u64,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    text.parse::<f64>().map(Duration::from_secs_f64).map_err(|e| e.to_string())
}

impl Settings {
    fn apply_quick(&mut self) {
        if !self.quick {
            return;
        }
        self.rounds = 1;
        self.first_1c = self.first_1c.min(50);
        self.clients = self.clients.min(10);
        self.first_per_client = self.first_per_client.min(3);
        self.ready = self.ready.min(150);
        self.cold = self.cold.min(5);
        self.paced = self.paced.min(10);
        self.repeat_1c = self.repeat_1c.min(50);
        self.repeat_seconds = self.repeat_seconds.min(Duration::from_secs(2));
        self.density_sessions = self.density_sessions.min(200);
        self.density_ready = self.density_ready.min(20);
        self.scale_sessions = self.scale_sessions.min(300);
        self.heavy_first_1c = self.heavy_first_1c.min(3);
        self.heavy_refill = self.heavy_refill.min(4);
        self.heavy_cold = self.heavy_cold.min(1);
    }

    fn runs(&self, system: &str) -> bool {
        self.systems.iter().any(|s| s == system)
    }
}

fn main() -> std::process::ExitCode {
    let mut settings = Settings::parse();
    settings.apply_quick();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = run(settings) => outcome,
            signal = interrupted() => {
                host::remove_bench_cgroups();
                Err(anyhow::anyhow!("stopped by {signal}; every process the benchmark started was killed"))
            }
        }
    });
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sandpool-bench: {err:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("run as root: sandpool needs it, and the benchmark creates cgroups");
    }
    host::check_cgroup_v1()?;
    let settings = absolute(settings)?;
    std::fs::create_dir_all(&settings.work_dir)?;
    std::fs::create_dir_all(&settings.out_dir)?;
    let started = Instant::now();
    let load_before = host::load_average();
    let machine = host::machine();
    eprintln!(
        "machine: {} × {} cores, {:.1} GiB, {}; load {:?}",
        machine.cpu_model, machine.cores, machine.memory_gib, machine.kernel, load_before
    );
    let versions = versions(&settings);
    for (k, v) in &versions {
        eprintln!("  {k}: {v}");
    }
    warm_up(&settings)?;

    let cells = workload::Cells::new();
    let mut notes = method_notes(&settings);
    let jkg_baseline = if settings.runs("jkg") || settings.runs("jkg-nodelay") {
        let b = jkg::measure_baseline(&settings).await.context("cannot measure the gateway's own memory")?;
        eprintln!("jkg: gateway alone uses {:.1} MiB", results::mib(b as f64));
        b
    } else {
        0
    };

    let order = ["sandpool", "jkg", "jkg-nodelay", "bwrap"];
    let mut rounds = Vec::new();
    let mut load_per_round = Vec::new();
    for round in 1..=settings.rounds {
        load_per_round.push((round, host::load_average()));
        for k in 0..order.len() {
            let system = order[(k + round - 1) % order.len()];
            if !settings.runs(system) {
                continue;
            }
            let settled = host::wait_machine_idle(0.2, Duration::from_secs(30)).await;
            let (load, stuck) = (host::load_average()[0], host::uninterruptible_tasks());
            let t = Instant::now();
            eprintln!(
                "round {round}: {system} (load {:?}, waited {:.1} s for the CPUs to settle)",
                host::load_average(),
                settled.as_secs_f64()
            );
            let result = match system {
                "sandpool" => {
                    let mut r = sandpool::latency_round(&settings, round, &cells).await;
                    sandpool::density_round(&settings, round, &cells, &mut r).await;
                    host::wait_machine_idle(0.2, Duration::from_secs(30)).await;
                    sandpool::scale_round(&settings, round, &cells, &mut r).await;
                    r
                }
                "jkg" => jkg::round(&settings, round, &cells, jkg_baseline, false).await,
                "jkg-nodelay" => jkg::round(&settings, round, &cells, jkg_baseline, true).await,
                _ => bwrap::round(&settings, round, &cells).await,
            };
            eprintln!(
                "round {round}: {system} done in {:.0} s: first p50 {:.2} ms (50 clients p50 {:.2} / p99 {:.2}), repeat p50 {:.2} ms, {:.0}/s, refill {:.1}/s, {:.2} MiB/session",
                t.elapsed().as_secs_f64(),
                result.get("first_1c_p50_ms"),
                result.get("first_50c_p50_ms"),
                result.get("first_50c_p99_ms"),
                result.get("repeat_1c_p50_ms"),
                result.get("repeat_per_s"),
                result.get("refill_per_s"),
                result.get("density_mib_per_session"),
            );
            let mut result = result;
            result.set("load_1min_at_start", load);
            result.set("uninterruptible_tasks_at_start", stuck as f64);
            rounds.push(result);
            // Partial results, in case the run is interrupted.
            let _ = std::fs::write(settings.work_dir.join("partial-rounds.json"), serde_json::to_vec_pretty(&rounds)?);
        }
    }
    let load_after = host::load_average();
    if load_before[0] > 1.5 || load_after[0] > (settings.clients as f64).max(4.0) {
        notes.push(format!("the machine was busy: load average {load_before:?} before and {load_after:?} after the run"));
    }
    let medians = report::medians(&rounds);
    let table = report::table(&medians);
    let report = report::Report {
        generated_at: host::output_of("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        command: std::env::var("SANDPOOL_BENCH_COMMAND").unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" ")),
        quick: settings.quick,
        duration_seconds: started.elapsed().as_secs_f64(),
        machine,
        load_before,
        load_after,
        load_per_round,
        loadgen_cpu_seconds: host::self_cpu_seconds(),
        versions,
        settings: serde_json::to_value(&settings)?,
        medians,
        table,
        rounds,
        notes,
    };
    let markdown = report::markdown(&report);
    std::fs::write(settings.out_dir.join("latest.json"), serde_json::to_vec_pretty(&report)?)?;
    std::fs::write(settings.out_dir.join("latest.md"), &markdown)?;
    println!("{markdown}");
    eprintln!("wrote {} and {}", settings.out_dir.join("latest.json").display(), settings.out_dir.join("latest.md").display());
    Ok(())
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

fn absolute(mut s: Settings) -> anyhow::Result<Settings> {
    let cwd = std::env::current_dir()?;
    for path in [&mut s.sandpool_bin, &mut s.runtime_dir, &mut s.venv, &mut s.jkg_venv, &mut s.work_dir, &mut s.out_dir] {
        if path.is_relative() {
            *path = cwd.join(&*path);
        }
    }
    Ok(s)
}

/// Loads every library once, outside any measured cgroup, so that the page cache of the
/// venvs is already charged elsewhere and no round pays for reading them from disk.
fn warm_up(settings: &Settings) -> anyhow::Result<()> {
    let imports = "import numpy, pandas, matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot";
    let status = std::process::Command::new(settings.venv.join("bin/python"))
        .args(["-c", imports])
        .env("MPLCONFIGDIR", settings.venv.join("mplconfig"))
        .status()
        .context("cannot run the session venv's python")?;
    if !status.success() {
        bail!("the session venv cannot import numpy, pandas and matplotlib");
    }
    if settings.runs("jkg") || settings.runs("jkg-nodelay") {
        let mpl = settings.work_dir.join("jkg-mplconfig");
        std::fs::create_dir_all(&mpl)?;
        let status = std::process::Command::new(settings.jkg_venv.join("bin/python"))
            .args(["-c", &format!("{imports}; import ipykernel.kernelapp, kernel_gateway.gatewayapp, jupyter_server")])
            .env("MPLCONFIGDIR", &mpl)
            .status()
            .context("cannot run the JKG venv's python")?;
        if !status.success() {
            bail!("the JKG venv is incomplete");
        }
    }
    Ok(())
}

const VERSION_SCRIPT: &str = r#"
import importlib.metadata as m, json, sys
out = {"python": sys.version.split()[0]}
for name in sys.argv[1:]:
    try:
        out[name] = m.version(name)
    except m.PackageNotFoundError:
        out[name] = "not installed"
print(json.dumps(out))
"#;

fn python_versions(python: &Path, packages: &[&str], prefix: &str, into: &mut BTreeMap<String, String>) {
    let mut args = vec!["-c", VERSION_SCRIPT];
    args.extend(packages);
    let out = host::output_of(&python.display().to_string(), &args);
    match serde_json::from_str::<BTreeMap<String, String>>(&out) {
        Ok(map) => into.extend(map.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v))),
        Err(_) => {
            into.insert(format!("{prefix}error"), out);
        }
    }
}

fn versions(settings: &Settings) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    let commit = host::output_of("git", &["rev-parse", "HEAD"]);
    // Changes to the benchmark itself do not change what is measured.
    let dirty = !host::output_of(
        "git",
        &["status", "--porcelain", "--untracked-files=no", "--", ".", ":!crates/bench", ":!bench", ":!scripts/bench"],
    )
    .is_empty();
    v.insert(
        "sandpool git commit".into(),
        if dirty { format!("{commit} (with uncommitted changes outside the benchmark)") } else { commit },
    );
    v.insert("sandpool binary".into(), host::output_of(&settings.sandpool_bin.display().to_string(), &["--version"]));
    python_versions(&settings.venv.join("bin/python"), &["numpy", "pandas", "matplotlib"], "sessions (sandpool, bwrap): ", &mut v);
    if settings.runs("jkg") || settings.runs("jkg-nodelay") {
        python_versions(
            &settings.jkg_venv.join("bin/python"),
            &[
                "jupyter-kernel-gateway",
                "ipykernel",
                "jupyter_client",
                "jupyter_server",
                "tornado",
                "pyzmq",
                "numpy",
                "pandas",
                "matplotlib",
            ],
            "JKG venv: ",
            &mut v,
        );
    }
    v.insert("bubblewrap".into(), host::output_of(&settings.bwrap.display().to_string(), &["--version"]));
    v.insert("rustc".into(), host::output_of("rustc", &["--version"]));
    v
}

fn method_notes(s: &Settings) -> Vec<String> {
    vec![
        format!(
            "sandpool: one server per round for latency (pool `bench`, ready_session_instances = {}, plus pool `cold` with none ready), one for density and one for scale (pool `dense`, max_concurrent_sessions = {} and the scale target, ready_session_instances = {}); cooldown 3600 s; requests over HTTP/1.1 keep-alive connections, one per client, opened before the clock starts.",
            s.ready,
            s.density_sessions + s.density_ready,
            s.density_ready
        ),
        format!(
            "First execution = allocation + `print(1)` for a never-seen identifier, timed at the client. sandpool: {} from 1 client, then {} clients × {} at once. JKG and bwrap: {} from 1 client, then {} clients × 1 at once, each from a pre-started instance (JKG's prespawn_count; a client-side queue of started bwrap interpreters); for JKG this includes opening the kernel's websocket.",
            s.first_1c, s.clients, s.first_per_client, s.heavy_first_1c, s.clients
        ),
        "JKG kernels import numpy, pandas and matplotlib through the gateway's seed notebook (seed_uri), which runs in every kernel, pre-spawned or not, before the gateway hands it out: the imports count as kernel start-up (refill, cold start), not as first execution.".into(),
        format!(
            "Repeat execution = `x += 1` in a live session: {} times from 1 client, then one client per session, all at once, for {:?}: sandpool over {} sessions, JKG and bwrap over their {} sessions (each costs ~100 MB). CPU per execution comes from a cpuacct cgroup around each system (sandpool: server, zygote and every session).",
            s.repeat_1c,
            s.repeat_seconds,
            s.repeat_sessions,
            heavy::prestart_count(s)
        ),
        format!(
            "Refill: sandpool = ready sessions per second while the ready queue fills after start (between 10 % and 90 % of {}, polling /readyz every 20 ms; its refiller starts 8 at a time); JKG = {} kernels requested at once with POST /api/kernels (each returns after its seed cell), per second until the last returns; bwrap = {} interpreters started at once, per second until the last says ready.",
            s.ready, s.heavy_refill, s.heavy_refill
        ),
        format!(
            "Memory: cgroup v1 memory.usage_in_bytes (user pages, page cache, tmpfs, kernel memory), not RSS. sandpool: growth of the pool's cgroup plus the benchmark's cgroup around the server (server, zygote and what sessions charge before they enter their own cgroup) from an idle pool to {} live sessions that each ran a numpy + pandas cell, divided by {}; the ready queue is full at both points. JKG and bwrap: each system's cgroup with its {} sessions after the same cell, minus the system alone (the gateway with no kernel, measured once; 0 for bwrap), divided by the sessions, then extrapolated to 1,000. Libraries are loaded once before the rounds so no round pays for reading them into the page cache.",
            s.density_sessions,
            s.density_sessions,
            heavy::prestart_count(s)
        ),
        format!(
            "Scale (sandpool only): a third server whose pool has max_concurrent_sessions = {}; {} clients allocate all of them at once with `print(1)`, then every session runs a probe cell `1`, and one more identifier is tried beyond capacity. Allocation stops early if MemAvailable falls below {:.1} GiB.",
            s.scale_sessions,
            s.clients,
            s.memory_reserve as f64 / (1u64 << 30) as f64
        ),
        "bwrap: `bwrap --unshare-all --die-with-parent --new-session --ro-bind / / --tmpfs /tmp --proc /proc --dev /dev --uid 65534 --gid 65534 --cap-drop ALL --clearenv …` then the session venv's `python -u -c <repl>`; the REPL imports numpy, pandas, matplotlib, then serves length-prefixed frames on stdin/stdout, evaluating a trailing expression and closing figures like sandpool's runner. Every interpreter (JKG kernels, bwrap, sandpool sessions) runs with one BLAS thread.".into(),
        "bwrap's repeat-execution and first-execution figures have no HTTP, JSON-over-HTTP or authentication layer in them (the benchmark writes frames straight into each interpreter's stdin), so they are a floor for any server built that way, not a like-for-like service.".into(),
        "JKG as installed (jupyter-kernel-gateway 3.0.1 on jupyter_server 2.x, tornado 6.6) leaves Nagle's algorithm on for kernel websockets: after the `busy` status, the next messages of a reply wait for the client's delayed ACK (~40 ms). The Rust client sets TCP_NODELAY on its side, which cannot help. The `JKG, TCP_NODELAY` column loads a gateway config file that sets TCP_NODELAY on every kernel websocket (tornado's WebSocketProtocol13), everything else equal; the kernel alone answers `x += 1` in ~3 ms through jupyter_client.".into(),
        "The load generator shares the 2 cores with the systems; its CPU is reported for the throughput run. Wall-clock figures depend on the load average shown below.".into(),
    ]
}
