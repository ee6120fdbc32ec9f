//! cgroup management for session limits, on cgroup v1 (this host) and v2 (most hosts).
//!
//! The server owns one subtree, `<instance>/<pool>/`, in each hierarchy it uses; the instance
//! name is derived from the state directory, so servers on one host never touch each other's
//! sessions. Each session
//! gets `sandpool/<pool>/<sandbox id>`, created by the session process itself before it drops
//! root (see `zygote::lockdown`); the limits to write there are computed here. Deleting a
//! session kills every process left in its cgroup and removes the directory.
//!
//! On v1 the limits live in three hierarchies (memory, pids, cpu). On v2 they all live in
//! one, and the controllers must be enabled down the path (`cgroup.subtree_control`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::protocol::CgroupWrite;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Which cgroup hierarchies this host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupLayout {
    /// Separate v1 hierarchies for each controller.
    V1 { memory: PathBuf, pids: PathBuf, cpu: PathBuf },
    /// The unified v2 hierarchy.
    V2 { root: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy: need cgroup v2 with the memory, pids and cpu controllers, or the v1 memory, pids and cpu hierarchies under {CGROUP_ROOT}")]
    Unavailable,
    #[error("cannot {step} {path}")]
    Io { step: &'static str, path: PathBuf, source: io::Error },
}

/// Resource limits for every session of a pool.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SessionLimits {
    pub memory_bytes: u64,
    /// CPUs worth of time, e.g. 0.5 or 2.0.
    pub cpus: f64,
    pub max_processes: u64,
}

/// The cgroup parents of one pool and the limits every session cgroup gets.
#[derive(Debug, Clone)]
pub struct PoolCgroups {
    layout: CgroupLayout,
    pub parents: Vec<PathBuf>,
    pub limits: Vec<CgroupWrite>,
    /// Written in a warming session's cgroup (one started for the ready queue): the lowest
    /// CPU priority, so refilling never slows down requests. Each session is a scheduling
    /// group of its own, so the nice value of its processes could not do this.
    pub warming: Vec<CgroupWrite>,
    /// Written when a warming session is claimed: the normal CPU priority again.
    pub serving: Vec<CgroupWrite>,
}

impl CgroupLayout {
    /// Finds the hierarchies from the mount table: a v2 mount whose `cgroup.controllers`
    /// offers memory, pids and cpu wins; otherwise the v1 mounts of those three controllers.
    pub fn detect() -> Result<CgroupLayout, CgroupError> {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        CgroupLayout::from_mounts(&mounts, |path| fs::read_to_string(path.join("cgroup.controllers")).ok())
    }

    fn from_mounts(mounts: &str, controllers_of: impl Fn(&Path) -> Option<String>) -> Result<CgroupLayout, CgroupError> {
        let (mut memory, mut pids, mut cpu) = (None, None, None);
        for line in mounts.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [_, target, fstype, options, ..] = fields[..] else {
                continue;
            };
            let target = PathBuf::from(target.replace("\\040", " "));
            match fstype {
                "cgroup2" => {
                    if let Some(controllers) = controllers_of(&target) {
                        let has = |name: &str| controllers.split_whitespace().any(|c| c == name);
                        if has("memory") && has("pids") && has("cpu") {
                            return Ok(CgroupLayout::V2 { root: target });
                        }
                    }
                }
                "cgroup" => {
                    for option in options.split(',') {
                        match option {
                            "memory" => memory = Some(target.clone()),
                            "pids" => pids = Some(target.clone()),
                            "cpu" => cpu = Some(target.clone()),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        match (memory, pids, cpu) {
            (Some(memory), Some(pids), Some(cpu)) => Ok(CgroupLayout::V1 { memory, pids, cpu }),
            _ => Err(CgroupError::Unavailable),
        }
    }

    /// Creates (or reuses) `<instance>/<pool>` in every hierarchy and computes the limits.
    /// With `remove_leftovers`, kills and removes session cgroups left behind by an earlier
    /// run of the same instance (never while the pool's previous template still has live
    /// sessions there).
    pub fn prepare_pool(
        &self,
        instance: &str,
        pool: &str,
        limits: SessionLimits,
        remove_leftovers: bool,
    ) -> Result<PoolCgroups, CgroupError> {
        let parents: Vec<PathBuf> = match self {
            CgroupLayout::V1 { memory, pids, cpu } => [memory, pids, cpu].iter().map(|h| h.join(instance).join(pool)).collect(),
            CgroupLayout::V2 { root } => {
                let top = root.join(instance);
                create_dir(&top)?;
                enable_controllers(root)?;
                enable_controllers(&top)?;
                let pool_dir = top.join(pool);
                create_dir(&pool_dir)?;
                enable_controllers(&pool_dir)?;
                vec![pool_dir]
            }
        };
        for parent in &parents {
            create_dir(parent)?;
            if remove_leftovers {
                remove_stale_children(parent)?;
            }
        }
        let period: u64 = 100_000;
        let quota = ((limits.cpus * period as f64).round() as u64).max(1_000);
        let write = |parent: usize, file: &str, value: String| CgroupWrite { parent, file: file.to_owned(), value };
        let writes = match self {
            CgroupLayout::V1 { .. } => vec![
                write(0, "memory.limit_in_bytes", limits.memory_bytes.to_string()),
                write(1, "pids.max", limits.max_processes.to_string()),
                write(2, "cpu.cfs_period_us", period.to_string()),
                write(2, "cpu.cfs_quota_us", quota.to_string()),
            ],
            CgroupLayout::V2 { .. } => vec![
                write(0, "memory.max", limits.memory_bytes.to_string()),
                write(0, "memory.swap.max", "0".into()),
                write(0, "pids.max", limits.max_processes.to_string()),
                write(0, "cpu.max", format!("{quota} {period}")),
            ],
        };
        // `cpu.idle` (Linux 5.15+) makes the group SCHED_IDLE: it runs only on CPU time nobody
        // else wants. Older kernels get a tenth of the default weight (like nice 10).
        let cpu = match self {
            CgroupLayout::V1 { .. } => 2,
            CgroupLayout::V2 { .. } => 0,
        };
        let (warming, serving) = if parents[cpu].join("cpu.idle").exists() {
            (vec![write(cpu, "cpu.idle", "1".into())], vec![write(cpu, "cpu.idle", "0".into())])
        } else {
            match self {
                CgroupLayout::V1 { .. } => (vec![write(cpu, "cpu.shares", "102".into())], vec![write(cpu, "cpu.shares", "1024".into())]),
                CgroupLayout::V2 { .. } => (vec![write(cpu, "cpu.weight", "10".into())], vec![write(cpu, "cpu.weight", "100".into())]),
            }
        };
        Ok(PoolCgroups { layout: self.clone(), parents, limits: writes, warming, serving })
    }
}

impl PoolCgroups {
    /// Kills every process in the session's cgroups and removes them. Blocking; returns once
    /// the cgroups are gone (or after a few seconds, with an error, if they cannot be).
    pub fn destroy_session(&self, sandbox_id: &str) -> Result<(), CgroupError> {
        for parent in &self.parents {
            kill_and_remove(&parent.join(sandbox_id))?;
        }
        Ok(())
    }

    /// Removes the pool's cgroups (and the instance's, once its last pool is gone), killing
    /// anything still in them. Called when the server stops.
    pub fn remove_pool(&self) {
        for parent in &self.parents {
            if let Err(err) = remove_stale_children(parent).and_then(|()| kill_and_remove(parent)) {
                tracing::warn!(error = %err, "could not remove a pool cgroup");
            }
            if let Some(instance) = parent.parent() {
                // Fails harmlessly while another pool of this server still has its cgroup.
                let _ = fs::remove_dir(instance);
            }
        }
    }

    /// Kills and removes every session cgroup of the pool except those in `keep` (sessions
    /// adopted after a restart): what is left is a leftover of a session that died.
    pub fn remove_sessions_except(&self, keep: &std::collections::HashSet<String>) -> Result<(), CgroupError> {
        for parent in &self.parents {
            let entries = fs::read_dir(parent).map_err(|source| CgroupError::Io { step: "list", path: parent.to_owned(), source })?;
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if entry.file_type().is_ok_and(|t| t.is_dir()) && !keep.contains(&name) {
                    tracing::info!(cgroup = %entry.path().display(), "removing a session cgroup left by an earlier run");
                    kill_and_remove(&entry.path())?;
                }
            }
        }
        Ok(())
    }

    /// Kills every process of the session but leaves its cgroups in place.
    pub fn kill_session_processes(&self, sandbox_id: &str) {
        for parent in &self.parents {
            let dir = parent.join(sandbox_id);
            let kill_file = dir.join("cgroup.kill");
            if kill_file.exists() {
                let _ = fs::write(&kill_file, "1");
            }
            for _ in 0..100 {
                let pids = read_pids(&dir);
                if pids.is_empty() {
                    break;
                }
                for pid in pids {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Lifts a warming session to the normal CPU priority (undoes [`PoolCgroups::warming`]).
    pub fn claim_session(&self, sandbox_id: &str) -> Result<(), CgroupError> {
        for write in &self.serving {
            let path = self.parents[write.parent].join(sandbox_id).join(&write.file);
            fs::write(&path, &write.value).map_err(|source| CgroupError::Io { step: "write", path, source })?;
        }
        Ok(())
    }

    /// True when the kernel's OOM killer killed a process of this session.
    pub fn oom_killed(&self, sandbox_id: &str) -> bool {
        let (dir, file) = match &self.layout {
            CgroupLayout::V1 { .. } => (self.parents[0].join(sandbox_id), "memory.oom_control"),
            CgroupLayout::V2 { .. } => (self.parents[0].join(sandbox_id), "memory.events"),
        };
        let Ok(text) = fs::read_to_string(dir.join(file)) else {
            return false;
        };
        text.lines().filter_map(|line| line.strip_prefix("oom_kill ")).any(|count| count.trim().parse::<u64>().is_ok_and(|n| n > 0))
    }

    /// Memory charged to the session, in bytes.
    pub fn memory_usage(&self, sandbox_id: &str) -> Option<u64> {
        let file = match &self.layout {
            CgroupLayout::V1 { .. } => "memory.usage_in_bytes",
            CgroupLayout::V2 { .. } => "memory.current",
        };
        fs::read_to_string(self.parents[0].join(sandbox_id).join(file)).ok()?.trim().parse().ok()
    }
}

fn create_dir(path: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(path).map_err(|source| CgroupError::Io { step: "create cgroup", path: path.to_owned(), source })
}

fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let file = dir.join("cgroup.subtree_control");
    fs::write(&file, "+memory +pids +cpu").map_err(|source| CgroupError::Io { step: "enable controllers in", path: file, source })
}

fn remove_stale_children(parent: &Path) -> Result<(), CgroupError> {
    let entries = fs::read_dir(parent).map_err(|source| CgroupError::Io { step: "list", path: parent.to_owned(), source })?;
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            tracing::info!(cgroup = %entry.path().display(), "removing a session cgroup left by an earlier run");
            kill_and_remove(&entry.path())?;
        }
    }
    Ok(())
}

/// Kills everything in `dir` and removes it. Processes cannot leave a cgroup without
/// privilege, so looping until `cgroup.procs` is empty catches forks made while killing.
fn kill_and_remove(dir: &Path) -> Result<(), CgroupError> {
    if !dir.exists() {
        return Ok(());
    }
    let kill_file = dir.join("cgroup.kill");
    if kill_file.exists() {
        let _ = fs::write(&kill_file, "1");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = read_pids(dir);
        for pid in &pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
        }
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) if Instant::now() > deadline => return Err(CgroupError::Io { step: "remove", path: dir.to_owned(), source }),
            Err(_) => std::thread::sleep(Duration::from_millis(if pids.is_empty() { 5 } else { 20 })),
        }
    }
}

fn read_pids(dir: &Path) -> Vec<i32> {
    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    procs.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_this_hosts_hybrid_layout_as_v1() {
        let mounts = "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
                      cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
                      cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        let layout = CgroupLayout::from_mounts(mounts, |_| Some("hugetlb".into())).unwrap();
        assert_eq!(
            layout,
            CgroupLayout::V1 {
                memory: "/sys/fs/cgroup/memory".into(),
                pids: "/sys/fs/cgroup/pids".into(),
                cpu: "/sys/fs/cgroup/cpu".into()
            }
        );
    }

    #[test]
    fn prefers_a_capable_unified_hierarchy() {
        let mounts = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        let layout = CgroupLayout::from_mounts(mounts, |_| Some("cpuset cpu io memory pids".into())).unwrap();
        assert_eq!(layout, CgroupLayout::V2 { root: "/sys/fs/cgroup".into() });
        assert!(CgroupLayout::from_mounts(mounts, |_| Some("cpu io".into())).is_err());
    }
}
