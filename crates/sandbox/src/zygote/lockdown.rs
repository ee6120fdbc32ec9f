//! Locks a new session process down before it runs any Python.
//!
//! Runs in the session's runner right after the zygote forked it into the session's PID
//! namespace (whose PID 1 only reaps): single-threaded, still root. Each step either succeeds
//! or the process reports the failed step and exits; a half-isolated session never runs user
//! code. The order matters and is commented where it does.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use landlock::{
    path_beneath_rules, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    Scope, ABI,
};
use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};

use super::seccomp::SessionFilters;
use crate::protocol::{CgroupWrite, SessionPlan};

/// The step of the lock-down that failed.
#[derive(Debug, thiserror::Error)]
pub enum LockdownError {
    #[error("cannot {step}")]
    Step { step: &'static str, source: nix::Error },
    #[error("cannot {step} {path}")]
    Cgroup { step: &'static str, path: String, source: std::io::Error },
    #[error("cannot {step}: {detail}")]
    Other { step: &'static str, detail: String },
    #[error("parent zygote exited during start-up")]
    Orphaned,
}

fn step(step: &'static str) -> impl FnOnce(nix::Error) -> LockdownError {
    move |source| LockdownError::Step { step, source }
}

fn other(step: &'static str) -> impl FnOnce(String) -> LockdownError {
    move |detail| LockdownError::Other { step, detail }
}

/// Who the session runs as.
pub struct SessionIdentity<'a> {
    pub sandbox_id: &'a str,
    pub uid: u32,
    pub gid: u32,
    /// Started for the ready queue: its cgroup starts at idle CPU priority.
    pub warming: bool,
}

/// File descriptor number the session socket is moved to; the runner is told this number.
pub const SESSION_SOCKET_FD: RawFd = 3;

/// The Landlock ABI whose rights the ruleset asks for. Newer kernels enforce all of them;
/// older ones enforce what they know (best effort), and the zygote reports how much.
const LANDLOCK_ABI: ABI = ABI::V6;

/// Character devices a session may write to (and use ioctls on).
const WRITABLE_DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty"];

/// Applies every isolation step. `cgroup_parents` are directory fds opened by the zygote
/// before it pivoted into its root; `socket` is the session's end of its socket pair.
pub fn lock_down(
    plan: &SessionPlan,
    who: &SessionIdentity<'_>,
    cgroup_parents: &[OwnedFd],
    socket: OwnedFd,
    zygote_pid: i32,
    filters: &SessionFilters,
) -> Result<(), LockdownError> {
    // Enter the session's cgroups first: from here on, every page this process copies from
    // the zygote and every kernel object it creates is charged to the session, not to the
    // server. (Joining needs privilege, and the limits must hold before user code runs.)
    join_cgroups(plan, who, cgroup_parents)?;

    // Own mount, network, IPC and UTS namespaces (the PID namespace was made by the zygote).
    let namespaces = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    nix::sched::unshare(namespaces).map_err(step("create namespaces"))?;

    // A new session and process group, so job-control signals aimed at the zygote (or the
    // server's terminal) never reach user code.
    nix::unistd::setsid().map_err(step("start a new session"))?;
    nix::unistd::sethostname("sandbox").map_err(step("set the hostname"))?;
    // The network namespace starts with only a down loopback device: no route anywhere,
    // not even to the host. Loopback is brought up for local servers inside the session.
    crate::netns::loopback_up().map_err(step("bring up loopback"))?;

    // A /proc of the session's own PID namespace: it lists the session's processes only.
    // The zygote's /proc (the host's PID namespace) is detached, not just covered.
    umount2("/proc", MntFlags::MNT_DETACH).map_err(step("detach the zygote's /proc"))?;
    let proc_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), "/proc", Some("proc"), proc_flags, Some("hidepid=invisible")).map_err(step("mount /proc"))?;

    // Private, size-limited, session-owned scratch space. Mounted in the session's own mount
    // namespace, so it disappears with the session's last process.
    let data_opts = format!("size={},mode=0700,uid={},gid={}", plan.data_dir_bytes, who.uid, who.gid);
    let fs_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(Some("tmpfs"), "/mnt/data", Some("tmpfs"), fs_flags, Some(data_opts.as_str())).map_err(step("mount /mnt/data"))?;
    let tmp_opts = format!("size={},mode=1777", plan.tmp_dir_bytes);
    mount(Some("tmpfs"), "/tmp", Some("tmpfs"), fs_flags, Some(tmp_opts.as_str())).map_err(step("mount /tmp"))?;

    // Per-uid and per-process limits, a second line of defence behind the cgroup limits.
    setrlimit(Resource::RLIMIT_NOFILE, plan.max_open_files, plan.max_open_files).map_err(step("limit open files"))?;
    setrlimit(Resource::RLIMIT_NPROC, plan.max_processes, plan.max_processes).map_err(step("limit processes"))?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(step("disable core dumps"))?;
    let max_file = plan.data_dir_bytes.max(plan.tmp_dir_bytes);
    setrlimit(Resource::RLIMIT_FSIZE, max_file, max_file).map_err(step("limit file sizes"))?;
    // SIGXCPU at the limit (reported as such), SIGKILL a little later if it is ignored.
    setrlimit(Resource::RLIMIT_CPU, plan.max_cpu_seconds, plan.max_cpu_seconds + 5).map_err(step("limit CPU time"))?;

    // Standard streams go nowhere (output is captured at the Python level), the session
    // socket moves to a fixed number, and every other inherited descriptor (the zygote's
    // control socket, cgroup directories, the signalfd) is closed.
    let devnull = nix::fcntl::open("/dev/null", OFlag::O_RDWR, Mode::empty()).map_err(step("open /dev/null"))?;
    for target in 0..3 {
        // SAFETY: dup2 onto the standard descriptors; the returned fd is the target number,
        // which we deliberately leave open (it is owned by the process, not by a Rust value).
        if unsafe { libc::dup2(devnull.as_raw_fd(), target) } < 0 {
            return Err(LockdownError::Step { step: "redirect standard streams", source: nix::Error::last() });
        }
    }
    drop(devnull);
    // SAFETY: as above; fd 3 becomes the session socket, owned by the runner from now on.
    if unsafe { libc::dup2(socket.as_raw_fd(), SESSION_SOCKET_FD) } < 0 {
        return Err(LockdownError::Step { step: "move the session socket", source: nix::Error::last() });
    }
    drop(socket);
    // SAFETY: closes every descriptor above the session socket; no Rust value owns any of them
    // any more (the zygote's OwnedFds are never dropped in the child: it exits with `_exit`).
    if unsafe { libc::syscall(libc::SYS_close_range, (SESSION_SOCKET_FD + 1) as u32, u32::MAX, 0) } < 0 {
        return Err(LockdownError::Step { step: "close inherited descriptors", source: nix::Error::last() });
    }

    nix::unistd::chdir("/mnt/data").map_err(step("enter /mnt/data"))?;

    // Sessions are forked with the zygote's SCHED_IDLE policy; within its cgroup a session
    // runs at the normal one (the cgroup's `cpu.idle` holds a warming session back until it is
    // claimed). Done before the uid change, while leaving SCHED_IDLE is still allowed.
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the duration of the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) } != 0 {
        return Err(LockdownError::Step { step: "restore the normal priority", source: nix::Error::last() });
    }

    // Capabilities: empty the bounding set while we still may (CAP_SETPCAP), so no later
    // exec can regain any; the uid change below clears the rest.
    caps::clear(None, caps::CapSet::Bounding).map_err(|e| other("drop capabilities")(e.to_string()))?;
    caps::clear(None, caps::CapSet::Ambient).map_err(|e| other("drop capabilities")(e.to_string()))?;
    caps::clear(None, caps::CapSet::Inheritable).map_err(|e| other("drop capabilities")(e.to_string()))?;

    // Drop root for good: no supplementary groups, then gid, then uid (the uid last, since
    // changing the gid needs privilege). Leaving uid 0 clears every capability.
    nix::unistd::setgroups(&[]).map_err(step("clear supplementary groups"))?;
    let gid = Gid::from_raw(who.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(step("set the group id"))?;
    let uid = Uid::from_raw(who.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(step("set the user id"))?;
    let left = caps::read(None, caps::CapSet::Permitted).map_err(|e| other("check capabilities")(e.to_string()))?;
    if !left.is_empty() {
        return Err(LockdownError::Other { step: "drop capabilities", detail: format!("still holding {left:?}") });
    }
    nix::sys::prctl::set_no_new_privs().map_err(step("set no_new_privs"))?;

    // The parent-death signal is reset by credential changes, so it is set after them. A
    // session never outlives its zygote; the check closes the race with a zygote that died
    // before the signal was armed. (The zygote is outside the session's PID namespace, so
    // the parent shows as pid 0.)
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(step("arm the parent-death signal"))?;
    if nix::unistd::getppid().as_raw() != 0 {
        return Err(LockdownError::Orphaned);
    }
    if zygote_pid != 1 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(zygote_pid), None).is_ok() {
        // Still visible means we are not in our own PID namespace: refuse to continue.
        return Err(LockdownError::Other { step: "check the PID namespace", detail: "the zygote is visible".into() });
    }

    // Landlock, then seccomp (which forbids the mount and namespace calls used above).
    restrict_filesystem_and_network()?;
    filters.apply().map_err(|e| other("load the seccomp filter")(e.to_string()))?;
    Ok(())
}

/// Landlock: read (and execute) everything in the session's root, write only to `/mnt/data`,
/// `/tmp` and a few character devices, no TCP bind or connect at all, and no signals or
/// abstract-socket connections out of the session.
fn restrict_filesystem_and_network() -> Result<(), LockdownError> {
    let fail = |e: landlock::RulesetError| LockdownError::Other { step: "apply the Landlock ruleset", detail: e.to_string() };
    let abi = LANDLOCK_ABI;
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(fail)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(fail)?
        .scope(Scope::from_all(abi))
        .map_err(fail)?
        .create()
        .map_err(fail)?
        .add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi)))
        .map_err(fail)?
        .add_rules(path_beneath_rules(["/mnt/data", "/tmp"], AccessFs::from_all(abi)))
        .map_err(fail)?
        .add_rules(path_beneath_rules(WRITABLE_DEVICES.iter().filter(|d| Path::new(d).exists()), AccessFs::from_file(abi)))
        .map_err(fail)?
        .restrict_self()
        .map_err(fail)?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(LockdownError::Other { step: "apply the Landlock ruleset", detail: "this kernel does not enforce Landlock".into() });
    }
    Ok(())
}

/// Creates `<parent>/<sandbox_id>` under every cgroup hierarchy, writes the pool's limits (and
/// the idle CPU priority of a warming session) and moves this process in.
fn join_cgroups(plan: &SessionPlan, who: &SessionIdentity<'_>, parents: &[OwnedFd]) -> Result<(), LockdownError> {
    let sandbox_id = who.sandbox_id;
    let mut dirs = Vec::with_capacity(parents.len());
    for (idx, parent) in parents.iter().enumerate() {
        let path = format!("{}/{}", plan.cgroup_parents[idx].display(), sandbox_id);
        let io_err = |step: &'static str, source: std::io::Error| LockdownError::Cgroup { step, path: path.clone(), source };
        match nix::sys::stat::mkdirat(parent, sandbox_id, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(nix::Error::EEXIST) => {}
            Err(e) => return Err(io_err("create cgroup", e.into())),
        }
        let dir = nix::fcntl::openat(parent, sandbox_id, OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| io_err("open cgroup", e.into()))?;
        dirs.push(dir);
    }
    let warming: &[CgroupWrite] = if who.warming { &plan.cgroup_warming } else { &[] };
    for limit in plan.cgroup_limits.iter().chain(warming) {
        let dir = &dirs[limit.parent];
        write_at(dir, &limit.file, &limit.value).map_err(|source| LockdownError::Cgroup {
            step: "write cgroup limit",
            path: format!("{}/{}/{}", plan.cgroup_parents[limit.parent].display(), sandbox_id, limit.file),
            source,
        })?;
    }
    for (idx, dir) in dirs.iter().enumerate() {
        write_at(dir, "cgroup.procs", "0").map_err(|source| LockdownError::Cgroup {
            step: "join cgroup",
            path: format!("{}/{}", plan.cgroup_parents[idx].display(), sandbox_id),
            source,
        })?;
    }
    Ok(())
}

fn write_at(dir: &OwnedFd, file: &str, value: &str) -> std::io::Result<()> {
    let fd = nix::fcntl::openat(dir, file, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    let mut file = File::from(fd);
    file.write_all(value.as_bytes())
}

/// Writes an error frame (`{"ready": false, "error": ...}`) on a session socket, in the
/// runner's framing, so the server learns why a session could not start.
pub fn report_failure(socket: BorrowedFd<'_>, message: &str) {
    let body = serde_json::json!({ "ready": false, "error": message }).to_string();
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body.as_bytes());
    // SAFETY: we borrow the fd for the duration of the write only.
    let mut file = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(socket.as_raw_fd()) });
    let _ = file.write_all(&frame);
}
