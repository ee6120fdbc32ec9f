//! The host: machine facts for the report, load average, the load generator's own CPU time,
//! available memory, and the cgroup-v1 memory and cpuacct groups each system runs in.
//!
//! Every system under test is started inside a pair of fresh cgroups (`memory` and `cpuacct`)
//! of its own, by a `sh` wrapper that writes its pid to `cgroup.procs` and then `exec`s the real
//! program, so every child it forks is charged there from its first page.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

const MEMORY_ROOT: &str = "/sys/fs/cgroup/memory";
const CPUACCT_ROOT: &str = "/sys/fs/cgroup/cpuacct";

/// A memory cgroup and a cpuacct cgroup of the same name, created by the benchmark.
#[derive(Debug, Clone)]
pub struct Cgroup {
    pub memory: PathBuf,
    pub cpuacct: PathBuf,
}

/// The memory counters of a cgroup-v1 memory group (hierarchical totals).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MemoryReading {
    /// `memory.usage_in_bytes`: user pages, page cache, shared memory and kernel memory.
    pub usage: u64,
    /// `total_rss` from `memory.stat`: anonymous memory.
    pub rss: u64,
    /// `total_cache` from `memory.stat`: page cache and shared memory (tmpfs).
    pub cache: u64,
    /// `total_shmem` from `memory.stat`.
    pub shmem: u64,
    /// `memory.kmem.usage_in_bytes`: page tables, task structs, sockets, namespaces.
    pub kmem: u64,
}

impl MemoryReading {
    pub fn read(dir: &Path) -> anyhow::Result<MemoryReading> {
        let usage = read_u64(&dir.join("memory.usage_in_bytes"))?;
        let kmem = read_u64(&dir.join("memory.kmem.usage_in_bytes")).unwrap_or(0);
        let stat =
            std::fs::read_to_string(dir.join("memory.stat")).with_context(|| format!("cannot read {}/memory.stat", dir.display()))?;
        let field = |name: &str| {
            stat.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
                .unwrap_or(0)
        };
        Ok(MemoryReading { usage, rss: field("total_rss"), cache: field("total_cache"), shmem: field("total_shmem"), kmem })
    }

    pub fn plus(self, other: MemoryReading) -> MemoryReading {
        MemoryReading {
            usage: self.usage + other.usage,
            rss: self.rss + other.rss,
            cache: self.cache + other.cache,
            shmem: self.shmem + other.shmem,
            kmem: self.kmem + other.kmem,
        }
    }

    /// Growth from `before` to `self`, per unit, in bytes (can be negative).
    pub fn growth_per(self, before: MemoryReading, units: usize) -> MemoryGrowth {
        let per = |a: u64, b: u64| (a as f64 - b as f64) / units.max(1) as f64;
        MemoryGrowth {
            usage: per(self.usage, before.usage),
            rss: per(self.rss, before.rss),
            cache: per(self.cache, before.cache),
            kmem: per(self.kmem, before.kmem),
        }
    }
}

/// Memory growth per session, in bytes.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MemoryGrowth {
    pub usage: f64,
    pub rss: f64,
    pub cache: f64,
    pub kmem: f64,
}

impl Cgroup {
    /// Creates (fresh) `bench-<name>` in the memory and cpuacct hierarchies.
    pub fn create(name: &str) -> anyhow::Result<Cgroup> {
        let group = Cgroup { memory: Path::new(MEMORY_ROOT).join(name), cpuacct: Path::new(CPUACCT_ROOT).join(name) };
        group.remove();
        for dir in [&group.memory, &group.cpuacct] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the cgroup {} (are you root, on cgroup v1?)", dir.display()))?;
        }
        Ok(group)
    }

    /// Wraps `program args…` so that it enters this cgroup before it starts.
    pub fn command(&self, program: &Path, args: &[String]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(r#"echo $$ > "$CG_MEMORY/cgroup.procs" && echo $$ > "$CG_CPUACCT/cgroup.procs" && exec "$0" "$@""#)
            .arg(program)
            .args(args)
            .env("CG_MEMORY", &self.memory)
            .env("CG_CPUACCT", &self.cpuacct);
        command
    }

    pub fn memory(&self) -> anyhow::Result<MemoryReading> {
        MemoryReading::read(&self.memory)
    }

    /// CPU time used by every process that ever ran in the group, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        read_u64(&self.cpuacct.join("cpuacct.usage")).map(|ns| ns as f64 / 1e9).unwrap_or(f64::NAN)
    }

    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.memory.join("cgroup.procs"))
            .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Kills every process left in the group.
    pub fn kill_all(&self) {
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills what is left and removes both directories.
    pub fn remove(&self) {
        self.kill_all();
        for dir in [&self.memory, &self.cpuacct] {
            if dir.exists() {
                for _ in 0..50 {
                    if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Waits until the group's processes use less than `fraction` of one core over 500 ms, for
    /// at most `limit`. Returns how long it waited.
    pub async fn wait_quiet(&self, fraction: f64, limit: Duration) -> Duration {
        let start = Instant::now();
        let mut last = self.cpu_seconds();
        while start.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = self.cpu_seconds();
            if now - last < fraction * 0.5 {
                break;
            }
            last = now;
        }
        start.elapsed()
    }
}

/// Kills and removes every `bench-*` cgroup (after an interruption).
pub fn remove_bench_cgroups() {
    let Ok(entries) = std::fs::read_dir(MEMORY_ROOT) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("bench-") {
            Cgroup { memory: entry.path(), cpuacct: Path::new(CPUACCT_ROOT).join(&name) }.remove();
        }
    }
}

fn read_u64(path: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.trim().parse().with_context(|| format!("{} does not hold a number", path.display()))
}

/// Busy and total jiffies of all CPUs, from `/proc/stat`.
pub fn cpu_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else { return (0, 0) };
    let values: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Cores the whole machine kept busy between two `cpu_jiffies` readings.
pub fn busy_cores(before: (u64, u64), after: (u64, u64)) -> f64 {
    let total = after.1.saturating_sub(before.1) as f64;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    if total == 0.0 {
        f64::NAN
    } else {
        after.0.saturating_sub(before.0) as f64 / total * cores
    }
}

/// Waits until the machine's CPUs are busy less than `fraction` of the time over one second
/// (what is left of an earlier system: exiting processes, namespace clean-up), for at most
/// `limit`. Returns how long it waited.
pub async fn wait_machine_idle(fraction: f64, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut last = cpu_jiffies();
    while start.elapsed() < limit {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = cpu_jiffies();
        let (busy, total) = (now.0 - last.0, now.1 - last.1);
        if total > 0 && (busy as f64) < fraction * total as f64 {
            break;
        }
        last = now;
    }
    start.elapsed()
}

/// Tasks (threads) in uninterruptible sleep (`D`) right now: they count in the load average
/// without using CPU (for example processes waiting while their namespaces are torn down).
pub fn uninterruptible_tasks() -> usize {
    let mut count = 0;
    let Ok(procs) = std::fs::read_dir("/proc") else { return 0 };
    for proc in procs.flatten() {
        if !proc.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(proc.path().join("task")) else { continue };
        for task in tasks.flatten() {
            if let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) {
                if stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()) == Some("D") {
                    count += 1;
                }
            }
        }
    }
    count
}

/// The three load averages.
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut fields = text.split_whitespace().map(|f| f.parse().unwrap_or(f64::NAN));
    [fields.next().unwrap_or(f64::NAN), fields.next().unwrap_or(f64::NAN), fields.next().unwrap_or(f64::NAN)]
}

/// `MemAvailable` in bytes.
pub fn mem_available() -> u64 {
    meminfo_field("MemAvailable:")
}

fn meminfo_field(name: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())))
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// CPU seconds (user + system) this process has used so far.
pub fn self_cpu_seconds() -> f64 {
    process_cpu_seconds("self")
}

/// CPU seconds (user + system, every thread) a process has used so far; NaN if it is gone.
pub fn process_cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return f64::NAN };
    // The command name may contain spaces; fields restart after its closing parenthesis.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { return f64::NAN };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 =
        fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0) + fields.get(12).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    ticks as f64 / clock_ticks()
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Resident memory of one process from `/proc/PID/smaps_rollup`, in bytes.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcessMemory {
    pub rss: u64,
    pub pss: u64,
    /// Private clean + private dirty: what this process alone holds.
    pub uss: u64,
}

pub fn process_memory(pid: i32) -> Option<ProcessMemory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok()))
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    Some(ProcessMemory { rss: field("Rss:"), pss: field("Pss:"), uss: field("Private_Clean:") + field("Private_Dirty:") })
}

/// The command line of a process, arguments joined by spaces.
pub fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").trim().to_owned())
        .unwrap_or_default()
}

/// Children of `pid` (from `/proc/PID/task/*/children`).
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                out.extend(text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    out
}

/// How many descriptors a process has open, and its open-files limit (soft).
pub fn open_files(pid: i32) -> (usize, Option<u64>) {
    let count = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    let limit = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("Max open files")).and_then(|l| l.split_whitespace().nth(3)?.parse().ok()));
    (count, limit)
}

/// The machine, as the report states it.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub pid_max: u64,
    pub threads_max: u64,
    pub open_files_limit_of_bench: Option<u64>,
    pub cgroup: String,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned()))
        .unwrap_or_else(|| "unknown".into());
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default().trim().to_owned();
    Machine {
        cpu_model,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        memory_gib: meminfo_field("MemTotal:") as f64 / (1u64 << 30) as f64,
        kernel: format!("{} {}", read("/proc/sys/kernel/ostype"), read("/proc/sys/kernel/osrelease")),
        pid_max: read("/proc/sys/kernel/pid_max").parse().unwrap_or(0),
        threads_max: read("/proc/sys/kernel/threads-max").parse().unwrap_or(0),
        open_files_limit_of_bench: open_files(std::process::id() as i32).1,
        cgroup: if Path::new("/sys/fs/cgroup/memory/memory.usage_in_bytes").exists() {
            "v1 (memory, cpuacct controllers used for accounting)".into()
        } else {
            "not v1".into()
        },
    }
}

/// Checks that the memory cgroup-v1 hierarchy this benchmark relies on is there.
pub fn check_cgroup_v1() -> anyhow::Result<()> {
    if !Path::new(MEMORY_ROOT).join("memory.usage_in_bytes").exists() || !Path::new(CPUACCT_ROOT).join("cpuacct.usage").exists() {
        bail!("this benchmark measures memory with cgroup v1 (memory and cpuacct hierarchies under /sys/fs/cgroup); they are not mounted here");
    }
    Ok(())
}

/// Output of a command, trimmed, or a placeholder if it failed.
pub fn output_of(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if text.is_empty() {
                String::from_utf8_lossy(&out.stderr).trim().to_owned()
            } else {
                text
            }
        }
        Ok(out) => format!("unknown ({})", String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => format!("unknown ({e})"),
    }
}
