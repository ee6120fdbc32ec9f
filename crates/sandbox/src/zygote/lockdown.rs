//! Locks a freshly forked session process down before it runs any Python.
//!
//! Runs in the child right after `fork`, single-threaded, still root. Each step either
//! succeeds or the child reports the failed step and exits; a half-isolated session never
//! runs user code. The order matters and is commented where it does.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::OFlag;
use nix::mount::{mount, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};

use crate::protocol::SessionPlan;

/// The step of the lock-down that failed.
#[derive(Debug, thiserror::Error)]
pub enum LockdownError {
    #[error("cannot {step}")]
    Step { step: &'static str, source: nix::Error },
    #[error("cannot {step} {path}")]
    Cgroup { step: &'static str, path: String, source: std::io::Error },
    #[error("parent zygote exited during start-up")]
    Orphaned,
}

fn step(step: &'static str) -> impl FnOnce(nix::Error) -> LockdownError {
    move |source| LockdownError::Step { step, source }
}

/// Who the session runs as.
pub struct SessionIdentity<'a> {
    pub sandbox_id: &'a str,
    pub uid: u32,
    pub gid: u32,
}

/// File descriptor number the session socket is moved to; the runner is told this number.
pub const SESSION_SOCKET_FD: RawFd = 3;

/// Applies every isolation step. `cgroup_parents` are directory fds opened by the zygote
/// before it pivoted into its root; `socket` is the session's end of its socket pair.
pub fn lock_down(
    plan: &SessionPlan,
    who: &SessionIdentity<'_>,
    cgroup_parents: &[OwnedFd],
    socket: OwnedFd,
    zygote_pid: i32,
) -> Result<(), LockdownError> {
    // A new session and process group, so job-control signals aimed at the zygote (or the
    // server's terminal) never reach user code.
    nix::unistd::setsid().map_err(step("start a new session"))?;

    // Own mount, network, IPC and UTS namespaces. The network namespace starts with only a
    // down loopback device: no route anywhere, not even to the host.
    let namespaces = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    nix::sched::unshare(namespaces).map_err(step("create namespaces"))?;
    nix::unistd::sethostname("sandbox").map_err(step("set the hostname"))?;
    loopback_up().map_err(step("bring up loopback"))?;

    // Private, size-limited, session-owned scratch space. Mounted in the session's own mount
    // namespace, so it disappears with the session's last process.
    let data_opts = format!("size={},mode=0700,uid={},gid={}", plan.data_dir_bytes, who.uid, who.gid);
    let fs_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(Some("tmpfs"), "/mnt/data", Some("tmpfs"), fs_flags, Some(data_opts.as_str())).map_err(step("mount /mnt/data"))?;
    let tmp_opts = format!("size={},mode=1777", plan.tmp_dir_bytes);
    mount(Some("tmpfs"), "/tmp", Some("tmpfs"), fs_flags, Some(tmp_opts.as_str())).map_err(step("mount /tmp"))?;

    // Enter the session's cgroups before dropping root: creating and joining them needs
    // privilege, and the limits must hold before any user code allocates.
    join_cgroups(plan, who.sandbox_id, cgroup_parents)?;

    // Per-uid and per-process limits, a second line of defence behind the cgroup limits.
    setrlimit(Resource::RLIMIT_NOFILE, plan.max_open_files, plan.max_open_files).map_err(step("limit open files"))?;
    setrlimit(Resource::RLIMIT_NPROC, plan.max_processes, plan.max_processes).map_err(step("limit processes"))?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(step("disable core dumps"))?;

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

    // Drop root for good: no supplementary groups, then gid, then uid (the uid last, since
    // changing the gid needs privilege). Leaving uid 0 clears every capability.
    nix::unistd::setgroups(&[]).map_err(step("clear supplementary groups"))?;
    let gid = Gid::from_raw(who.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(step("set the group id"))?;
    let uid = Uid::from_raw(who.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(step("set the user id"))?;
    nix::sys::prctl::set_no_new_privs().map_err(step("set no_new_privs"))?;

    // The parent-death signal is reset by credential changes, so it is set after them. A
    // session never outlives its zygote; the check closes the race with a zygote that died
    // before the signal was armed.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(step("arm the parent-death signal"))?;
    if nix::unistd::getppid().as_raw() != zygote_pid {
        return Err(LockdownError::Orphaned);
    }
    Ok(())
}

/// Creates `<parent>/<sandbox_id>` under every cgroup hierarchy, writes the pool's limits and
/// moves this process in.
fn join_cgroups(plan: &SessionPlan, sandbox_id: &str, parents: &[OwnedFd]) -> Result<(), LockdownError> {
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
    for limit in &plan.cgroup_limits {
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

/// Sets IFF_UP on `lo` in the (new) network namespace, so local servers inside the session
/// (for example a multiprocessing manager) work. Nothing outside is reachable.
fn loopback_up() -> Result<(), nix::Error> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: `ifreq` is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write `req`, which outlives both calls.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(nix::Error::last());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(nix::Error::last());
        }
    }
    Ok(())
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
