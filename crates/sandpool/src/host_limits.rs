//! Host limits that a full server would run into, checked (and raised where root may) at
//! start, so that a pool of thousands of sessions fails loudly now instead of at session
//! 1,900 later.
//!
//! What each session costs the host: two processes (its PID 1 and its runner, more if the
//! user starts some), five namespaces, and two descriptors in the server (its socket and its
//! data directory). One kernel setting is tuned rather than raised: `favordynmods` (see
//! [`favor_dynamic_cgroups`]).

use std::path::Path;

/// Processes a session is expected to need on average, with room for user subprocesses.
const PIDS_PER_SESSION: u64 = 8;
/// Descriptors the server holds per session, with room for requests in flight.
const FDS_PER_SESSION: u64 = 4;
/// Headroom for everything else on the host.
const PID_HEADROOM: u64 = 32_768;
const FD_HEADROOM: u64 = 4_096;

/// One adjustment or problem, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    Raised { what: String, from: u64, to: u64 },
    TooLow { what: String, have: u64, need: u64, how: String },
    Tuned { what: String },
}

/// Checks and raises the limits for `sessions` sessions (all pools, ready ones included).
pub fn prepare(sessions: u64) -> Vec<Finding> {
    let mut findings = Vec::new();
    let pids = sessions * PIDS_PER_SESSION + PID_HEADROOM;
    raise_sysctl(Path::new("/proc/sys/kernel/pid_max"), "kernel.pid_max", pids, 4_194_304, &mut findings);
    raise_sysctl(Path::new("/proc/sys/kernel/threads-max"), "kernel.threads-max", pids, u64::MAX, &mut findings);
    for kind in ["mnt", "net", "ipc", "uts", "pid"] {
        let path = format!("/proc/sys/user/max_{kind}_namespaces");
        raise_sysctl(Path::new(&path), &format!("user.max_{kind}_namespaces"), sessions + 1_024, u64::MAX, &mut findings);
    }
    raise_open_files(sessions * FDS_PER_SESSION + FD_HEADROOM, &mut findings);
    favor_dynamic_cgroups(&mut findings);
    findings
}

/// Moving a process into a cgroup takes a global lock whose default (reader-optimised) mode
/// makes each move wait for an RCU grace period, about 10 ms under load, while every fork on
/// the host waits behind it. Every new session moves into its cgroups, so sandpool switches
/// the lock to its writer-friendly mode (`favordynmods`, set through any cgroup2 mount),
/// keeping every other option of the mount.
fn favor_dynamic_cgroups(findings: &mut Vec<Finding>) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let Some((target, options)) = mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(2) == Some(&"cgroup2")).then(|| (fields[1].to_owned(), fields[3].to_owned()))
    }) else {
        return;
    };
    let Some((flags, data)) = favordynmods_remount(&options) else { return };
    match nix::mount::mount(None::<&str>, target.as_str(), None::<&str>, flags, Some(data.as_str())) {
        Ok(()) => findings
            .push(Finding::Tuned { what: format!("favordynmods on {target} (new sessions join their cgroups without 10 ms stalls)") }),
        Err(err) => tracing::debug!(%err, "could not set favordynmods on {target}"),
    }
}

/// The flags and data of a cgroup2 remount that adds `favordynmods` to a mount with the
/// given options, or `None` when it is already set.
fn favordynmods_remount(options: &str) -> Option<(nix::mount::MsFlags, String)> {
    use nix::mount::MsFlags;
    let options: Vec<&str> = options.split(',').collect();
    if options.contains(&"favordynmods") {
        return None;
    }
    let mut flags = MsFlags::MS_REMOUNT;
    for (name, flag) in [
        ("nosuid", MsFlags::MS_NOSUID),
        ("nodev", MsFlags::MS_NODEV),
        ("noexec", MsFlags::MS_NOEXEC),
        ("relatime", MsFlags::MS_RELATIME),
        ("ro", MsFlags::MS_RDONLY),
    ] {
        if options.contains(&name) {
            flags |= flag;
        }
    }
    // Options of the cgroup2 superblock that a remount would otherwise switch off.
    let kept = options
        .iter()
        .copied()
        .filter(|o| matches!(*o, "nsdelegate" | "memory_recursiveprot" | "memory_localevents" | "memory_hugetlb_accounting"));
    Some((flags, kept.chain(["favordynmods"]).collect::<Vec<_>>().join(",")))
}

fn raise_sysctl(path: &Path, name: &str, need: u64, ceiling: u64, findings: &mut Vec<Finding>) {
    let Some(have) = std::fs::read_to_string(path).ok().and_then(|t| t.trim().parse::<u64>().ok()) else { return };
    if have >= need {
        return;
    }
    let target = need.min(ceiling);
    if target > have && std::fs::write(path, target.to_string()).is_ok() {
        findings.push(Finding::Raised { what: name.to_owned(), from: have, to: target });
        if target >= need {
            return;
        }
    }
    findings.push(Finding::TooLow { what: name.to_owned(), have: target.max(have), need, how: format!("sysctl -w {name}={need}") });
}

fn raise_open_files(need: u64, findings: &mut Vec<Finding>) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|t| t.trim().parse::<u64>().ok()).unwrap_or(hard);
    // Root may raise the hard limit up to fs.nr_open.
    let target = need.max(soft).min(nr_open.max(hard));
    let new_hard = hard.max(target);
    if target > soft && setrlimit(Resource::RLIMIT_NOFILE, target, new_hard).is_ok() {
        findings.push(Finding::Raised { what: "open files (RLIMIT_NOFILE)".to_owned(), from: soft, to: target });
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((soft, hard));
    if soft < need {
        findings.push(Finding::TooLow {
            what: "open files (RLIMIT_NOFILE)".to_owned(),
            have: soft,
            need,
            how: format!("ulimit -n {need} (or raise fs.nr_open)"),
        });
    }
}

/// Logs the findings: raised limits at info, limits still too low as warnings.
pub fn report(findings: &[Finding]) {
    for finding in findings {
        match finding {
            Finding::Raised { what, from, to } => tracing::info!("raised {what} from {from} to {to} for the configured pools"),
            Finding::Tuned { what } => tracing::info!("enabled {what}"),
            Finding::TooLow { what, have, need, how } => {
                tracing::warn!("{what} is {have}, but the configured pools may need {need}; sessions may fail to start when the pools are full. Fix: {how}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_favordynmods_remount_keeps_the_mounts_other_options() {
        use nix::mount::MsFlags;
        let (flags, data) = favordynmods_remount("rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot").unwrap();
        assert_eq!(flags, MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RELATIME);
        assert_eq!(data, "nsdelegate,memory_recursiveprot,favordynmods");
        assert!(favordynmods_remount("rw,relatime,favordynmods").is_none());
    }

    #[test]
    fn a_low_sysctl_is_raised_and_a_high_one_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let low = dir.path().join("low");
        let high = dir.path().join("high");
        std::fs::write(&low, "100\n").unwrap();
        std::fs::write(&high, "5000\n").unwrap();
        let mut findings = Vec::new();
        raise_sysctl(&low, "test.low", 1000, u64::MAX, &mut findings);
        raise_sysctl(&high, "test.high", 1000, u64::MAX, &mut findings);
        assert_eq!(findings, vec![Finding::Raised { what: "test.low".into(), from: 100, to: 1000 }]);
        assert_eq!(std::fs::read_to_string(&low).unwrap(), "1000");
        assert_eq!(std::fs::read_to_string(&high).unwrap(), "5000\n");
    }

    #[test]
    fn a_limit_above_its_ceiling_is_reported_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("capped");
        std::fs::write(&path, "10").unwrap();
        let mut findings = Vec::new();
        raise_sysctl(&path, "test.capped", 1000, 500, &mut findings);
        assert_eq!(findings[0], Finding::Raised { what: "test.capped".into(), from: 10, to: 500 });
        assert!(matches!(&findings[1], Finding::TooLow { need: 1000, how, .. } if how == "sysctl -w test.capped=1000"));
    }
}
