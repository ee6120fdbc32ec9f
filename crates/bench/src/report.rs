//! The report: medians over rounds per system, the comparison table with ratios and the
//! issue's targets, written as JSON and Markdown.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::host::Machine;
use crate::results::Round;
use crate::stats::median;

/// A target from the issue, checked against sandpool's median.
#[derive(Clone, Copy)]
enum Target {
    None,
    AtMost(f64),
    AtLeast(f64),
}

struct Row {
    key: &'static str,
    label: &'static str,
    target: Target,
    decimals: usize,
}

const fn row(key: &'static str, label: &'static str, target: Target, decimals: usize) -> Row {
    Row { key, label, target, decimals }
}

const ROWS: &[Row] = &[
    row("first_1c_p50_ms", "First execution, new identifier, 1 client: p50 (ms)", Target::AtMost(5.0), 2),
    row("first_1c_p99_ms", "First execution, new identifier, 1 client: p99 (ms)", Target::AtMost(25.0), 2),
    row("first_50c_p50_ms", "First execution, new identifiers, {clients} concurrent clients: p50 (ms)", Target::AtMost(5.0), 2),
    row("first_50c_p99_ms", "First execution, new identifiers, {clients} concurrent clients: p99 (ms)", Target::AtMost(25.0), 2),
    row("first_50c_per_s", "… allocations per second during that run", Target::None, 0),
    row("first_50c_min_ready", "… fewest ready sessions seen during that run (sandpool)", Target::AtLeast(1.0), 0),
    row("first_cold_p50_ms", "First execution with nothing pre-started (cold), 1 client: p50 (ms)", Target::None, 1),
    row("repeat_1c_p50_ms", "Repeat execution `x += 1`, 1 client: p50 (ms)", Target::AtMost(2.0), 2),
    row("repeat_1c_p99_ms", "Repeat execution `x += 1`, 1 client: p99 (ms)", Target::None, 2),
    row("repeat_per_s", "Repeat executions per second, one client per session, all at once", Target::AtLeast(2000.0), 0),
    row("repeat_sessions", "… sessions (= concurrent clients) in that run", Target::None, 0),
    row("repeat_load_p50_ms", "… latency under that load: p50 (ms)", Target::None, 2),
    row("repeat_load_p99_ms", "… latency under that load: p99 (ms)", Target::None, 2),
    row("repeat_system_cpu_ms_per_exec", "… CPU of the system per execution (ms, cpuacct)", Target::None, 3),
    row("repeat_loadgen_cpu_cores", "… CPU of the load generator (cores)", Target::None, 2),
    row("repeat_machine_busy_cores", "… CPU of the whole machine (cores of 2, /proc/stat)", Target::None, 2),
    row("refill_per_s", "Refill: new ready sessions per second", Target::AtLeast(100.0), 1),
    row("refill_cpu_ms_per_session", "… CPU per new ready session (ms, cpuacct)", Target::None, 1),
    row("density_mib_per_session", "Memory per live session after a numpy + pandas cell (MiB, cgroup)", Target::AtMost(8.0), 2),
    row("density_total_gib_per_1000", "Memory for 1,000 such sessions, everything included (GiB, cgroup)", Target::AtMost(8.0), 2),
    row("density_n", "… sessions measured (heavy systems: extrapolated to 1,000)", Target::None, 0),
    row("scale_allocated", "Scale: sessions allocated at once in one pool (sandpool only)", Target::AtLeast(2000.0), 0),
    row("scale_probe_ok", "… of which answered a probe cell afterwards", Target::AtLeast(2000.0), 0),
    row("scale_total_gib", "… total memory at that point (GiB, cgroup)", Target::None, 2),
];

/// Medians of every metric, per system.
pub fn medians(rounds: &[Round]) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut by_system: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for round in rounds {
        let metrics = by_system.entry(round.system.clone()).or_default();
        for (key, value) in &round.metrics {
            metrics.entry(key.clone()).or_default().push(*value);
        }
    }
    by_system.into_iter().map(|(system, metrics)| (system, metrics.into_iter().map(|(k, v)| (k, median(&v))).collect())).collect()
}

#[derive(Serialize)]
pub struct Report {
    pub generated_at: String,
    pub command: String,
    pub quick: bool,
    pub duration_seconds: f64,
    pub machine: Machine,
    pub load_before: [f64; 3],
    pub load_after: [f64; 3],
    pub load_per_round: Vec<(usize, [f64; 3])>,
    pub loadgen_cpu_seconds: f64,
    pub versions: BTreeMap<String, String>,
    pub settings: serde_json::Value,
    pub medians: BTreeMap<String, BTreeMap<String, f64>>,
    pub table: Vec<serde_json::Value>,
    pub rounds: Vec<Round>,
    pub notes: Vec<String>,
}

fn fmt(value: f64, decimals: usize) -> String {
    if value.is_finite() {
        format!("{value:.decimals$}")
    } else {
        "—".into()
    }
}

fn ratio(other: f64, sandpool: f64) -> String {
    if other.is_finite() && sandpool.is_finite() && sandpool != 0.0 {
        let r = other / sandpool;
        if r >= 10.0 {
            format!("{r:.0}×")
        } else {
            format!("{r:.2}×")
        }
    } else {
        "—".into()
    }
}

fn verdict(target: Target, value: f64) -> (String, &'static str) {
    match target {
        Target::None => (String::new(), ""),
        Target::AtMost(t) => (
            format!("≤ {t}"),
            if !value.is_finite() {
                "?"
            } else if value <= t {
                "met"
            } else {
                "**missed**"
            },
        ),
        Target::AtLeast(t) => (
            format!("≥ {t}"),
            if !value.is_finite() {
                "?"
            } else if value >= t {
                "met"
            } else {
                "**missed**"
            },
        ),
    }
}

/// The comparison as JSON rows.
pub fn table(medians: &BTreeMap<String, BTreeMap<String, f64>>) -> Vec<serde_json::Value> {
    let get = |system: &str, key: &str| medians.get(system).and_then(|m| m.get(key)).copied().unwrap_or(f64::NAN);
    ROWS.iter()
        .map(|r| {
            let (target, met) = verdict(r.target, get("sandpool", r.key));
            let value = |s: &str| {
                let v = get(s, r.key);
                if v.is_finite() {
                    serde_json::json!(v)
                } else {
                    serde_json::Value::Null
                }
            };
            serde_json::json!({
                "metric": r.key, "label": r.label, "target": target, "sandpool_target": met,
                "sandpool": value("sandpool"), "jkg": value("jkg"), "jkg-nodelay": value("jkg-nodelay"), "bwrap": value("bwrap"),
            })
        })
        .collect()
}

pub fn markdown(report: &Report) -> String {
    let m = &report.medians;
    let get = |system: &str, key: &str| m.get(system).and_then(|x| x.get(key)).copied().unwrap_or(f64::NAN);
    let mut out = String::new();
    let rounds = report.rounds.iter().filter(|r| r.system == "sandpool").count();
    let _ = writeln!(out, "# sandpool benchmark{}\n", if report.quick { " (quick mode: fewer sessions and repetitions)" } else { "" });
    let _ = writeln!(
        out,
        "Medians over {rounds} round(s), systems interleaved in each round; generated {} in {:.0} s by `{}`.\n",
        report.generated_at, report.duration_seconds, report.command
    );
    let clients = report.settings["clients"].as_u64().unwrap_or(50).to_string();
    let _ = writeln!(
        out,
        "| Figure | Target | sandpool | met? | JKG | JKG, TCP_NODELAY | bwrap + python3 | JKG ÷ sandpool | JKG, TCP_NODELAY ÷ sandpool | bwrap ÷ sandpool |"
    );
    let _ = writeln!(out, "|---|---|---:|---|---:|---:|---:|---:|---:|---:|");
    for r in ROWS {
        let (s, j, n, b) = (get("sandpool", r.key), get("jkg", r.key), get("jkg-nodelay", r.key), get("bwrap", r.key));
        let compare = !matches!(r.key, "repeat_sessions" | "density_n" | "first_50c_min_ready");
        let ratio = |other: f64, sandpool: f64| if compare { ratio(other, sandpool) } else { "—".into() };
        let (target, met) = verdict(r.target, s);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.label.replace("{clients}", &clients),
            target,
            fmt(s, r.decimals),
            met,
            fmt(j, r.decimals),
            fmt(n, r.decimals),
            fmt(b, r.decimals),
            ratio(j, s),
            ratio(n, s),
            ratio(b, s)
        );
    }
    let _ = writeln!(
        out,
        "\nJKG = Jupyter Kernel Gateway as installed; JKG, TCP_NODELAY = the same with a config file that turns on TCP_NODELAY for kernel websockets (see Notes). \
         Ratios are the other system's figure divided by sandpool's (for latency, CPU and memory, above 1 means sandpool is better; for rates, below 1).\n"
    );

    let _ = writeln!(out, "## sandpool details\n");
    let details = [
        ("ready_session_pool_cgroup_mib", "idle ready session, pool cgroup only (MiB)"),
        ("density_pool_cgroup_mib_per_session", "per live session: growth of the pool cgroup (MiB)"),
        ("density_server_cgroup_mib_per_session", "per live session: growth of the server's cgroup (fork-time charges, MiB)"),
        ("density_rss_mib_per_session", "per live session: anonymous memory (total_rss, MiB)"),
        ("density_kmem_mib_per_session", "per live session: kernel memory (kmem, MiB)"),
        ("density_total_gib", "total at the density point, server + zygote + ready queue included (GiB)"),
        ("zygote_rss_mib", "zygote RSS (MiB)"),
        ("zygote_pss_mib", "zygote PSS (MiB)"),
        ("zygote_uss_mib", "zygote USS (MiB)"),
        ("server_rss_mib", "server RSS at the density point (MiB)"),
        ("first_paced_p50_ms", "first execution, 1 client, 50 ms pause before each (refill idle meanwhile): p50 (ms)"),
        ("first_paced_p99_ms", "… p99 (ms)"),
        ("first_50c_server_cpu_ms_per_alloc", "CPU per allocation + first cell under {clients} clients (ms, server + zygote + sessions)"),
        ("first_50c_machine_busy_cores", "… whole machine busy during that run (cores of 2)"),
        ("first_50c_server_cpu_ms", "… of which the server process (ms)"),
        ("first_50c_zygote_cpu_ms", "… of which the zygote (ms; refill forks during the run)"),
        ("first_50c_sessions_cpu_ms", "… of which session processes (ms)"),
        ("refill_server_cpu_ms", "CPU per new ready session: server process (ms)"),
        ("refill_zygote_cpu_ms", "CPU per new ready session: zygote, i.e. the fork (ms)"),
        ("refill_sessions_cpu_ms", "CPU per new ready session: the session's own processes (lock-down, runner start; ms)"),
        ("repeat_server_cpu_ms", "CPU per repeat execution under load: server process (ms)"),
        ("repeat_sessions_cpu_ms", "CPU per repeat execution under load: session processes (ms)"),
        ("repeat_loadgen_cpu_us_per_exec", "CPU per repeat execution: load generator (µs)"),
        ("refill_seconds_to_full", "time for the ready queue to fill after start (s)"),
        ("density_alloc_seconds", "time to allocate the density sessions, 16 clients (s)"),
        ("scale_alloc_seconds", "scale: time to allocate every session of the pool, {clients} clients (s)"),
        ("scale_alloc_per_s", "… allocations per second (s⁻¹)"),
        ("scale_probe_seconds", "time for one probe cell in every session, {clients} clients (s)"),
        ("scale_overflow_status", "HTTP status for one identifier beyond max_concurrent_sessions"),
        ("scale_server_open_files", "server's open descriptors at scale"),
        ("scale_server_open_files_limit", "server's open-files limit (soft)"),
        ("scale_pool_tasks", "tasks in the pool's pids cgroup at scale"),
        ("scale_pid_max", "kernel.pid_max at scale (sandpool raises it at start)"),
        ("density_server_log_warnings", "WARN/ERROR lines in the density server's log"),
        ("scale_server_log_warnings", "WARN/ERROR lines in the scale server's log"),
        ("shutdown_seconds", "latency server shutdown (s)"),
        ("density_shutdown_seconds", "density server shutdown with every session (s)"),
        ("scale_shutdown_seconds", "scale server shutdown with every session (s)"),
    ];
    let _ = writeln!(out, "| Figure | median |\n|---|---:|");
    for (key, label) in details {
        let _ = writeln!(out, "| {} | {} |", label.replace("{clients}", &clients), fmt(get("sandpool", key), 2));
    }
    let _ = writeln!(out, "\n## Alternatives: details\n");
    let _ = writeln!(out, "| Figure | JKG | JKG, TCP_NODELAY | bwrap + python3 |\n|---|---:|---:|---:|");
    for (key, label) in [
        ("prestart_seconds", "time to pre-start the sessions of the first-execution phases (s)"),
        ("prestart_n", "… how many"),
        ("density_baseline_mib", "memory of the system with no session, subtracted (MiB)"),
        ("density_total_gib", "total for the measured sessions (GiB)"),
        ("refill_n", "sessions in the refill burst (all started at once)"),
        ("refill_seconds_to_full", "time for the whole burst (s)"),
    ] {
        let _ = writeln!(
            out,
            "| {label} | {} | {} | {} |",
            fmt(get("jkg", key), 2),
            fmt(get("jkg-nodelay", key), 2),
            fmt(get("bwrap", key), 2)
        );
    }

    let _ = writeln!(out, "\n## Per round\n");
    let keys = [
        "first_1c_p50_ms",
        "first_50c_p50_ms",
        "first_50c_p99_ms",
        "repeat_1c_p50_ms",
        "repeat_per_s",
        "refill_per_s",
        "density_mib_per_session",
    ];
    let _ = writeln!(
        out,
        "Load average at each system's start, and tasks in uninterruptible sleep (D) then: they count in the load average without using CPU (mostly processes of an earlier system still being torn down); every system starts once the CPUs are less than 20 % busy over a second (at most 30 s of waiting).\n"
    );
    let _ = writeln!(out, "| system | round | load (1 min) | D tasks | {} |", keys.join(" | "));
    let _ = writeln!(out, "|---|---|---:|---:|{}|", keys.iter().map(|_| "---:").collect::<Vec<_>>().join("|"));
    for r in &report.rounds {
        let values: Vec<String> = keys.iter().map(|k| fmt(r.get(k), 2)).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.system,
            r.round,
            fmt(r.get("load_1min_at_start"), 2),
            fmt(r.get("uninterruptible_tasks_at_start"), 0),
            values.join(" | ")
        );
    }

    let _ = writeln!(out, "\n## Machine and load\n");
    let mc = &report.machine;
    let _ = writeln!(out, "- CPU: {} × {} cores; memory {:.1} GiB; kernel {}", mc.cpu_model, mc.cores, mc.memory_gib, mc.kernel);
    let _ = writeln!(
        out,
        "- host limits: kernel.pid_max {}, kernel.threads-max {}, benchmark's open-files limit {}; cgroups {}",
        mc.pid_max,
        mc.threads_max,
        mc.open_files_limit_of_bench.map(|l| l.to_string()).unwrap_or_else(|| "?".into()),
        mc.cgroup
    );
    let _ = writeln!(
        out,
        "- load average before: {:.2} {:.2} {:.2}; after: {:.2} {:.2} {:.2}; load generator CPU over the whole run: {:.1} s",
        report.load_before[0],
        report.load_before[1],
        report.load_before[2],
        report.load_after[0],
        report.load_after[1],
        report.load_after[2],
        report.loadgen_cpu_seconds
    );
    let _ = writeln!(out, "\n## Versions\n");
    for (name, version) in &report.versions {
        let _ = writeln!(out, "- {name}: {version}");
    }
    let _ = writeln!(out, "\n## Notes\n");
    for note in &report.notes {
        let _ = writeln!(out, "- {note}");
    }
    for r in &report.rounds {
        for note in &r.notes {
            let _ = writeln!(out, "- [{} round {}] {note}", r.system, r.round);
        }
    }
    out
}
