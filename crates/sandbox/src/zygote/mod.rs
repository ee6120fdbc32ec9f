//! The zygote: one long-lived process per Python pool that holds a warm interpreter and forks
//! one locked-down child per session.
//!
//! It is the `sandpool` binary itself, started by the server with the hidden `__zygote`
//! subcommand, so it is a fresh single-threaded process (the multi-threaded server is never
//! forked). Start-up: read the config from the control socket, enter a private mount namespace
//! and root ([`rootfs`]), load libpython ([`python`]) and import the pool's libraries. Then it
//! serves [`ZygoteCommand`]s: each `Spawn` forks a child that locks itself down
//! ([`lockdown`]) and only then becomes the session's Python runner.
//!
//! Architecture invariant: the zygote never runs user code, and a child runs user code only
//! after every step of [`lockdown::lock_down`] succeeded.
#![allow(unsafe_code)]

mod lockdown;
mod python;
mod rootfs;
mod seccomp;

use std::collections::HashSet;
use std::io::{Read, Seek};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};

use crate::protocol::{ZygoteCommand, ZygoteConfig, ZygoteEvent, MAX_CONTROL_MESSAGE};
use lockdown::{SessionIdentity, SESSION_SOCKET_FD};
use python::EmbeddedPython;

/// Niceness of the zygote and of sessions while they start (see `run`).
const REFILL_NICENESS: libc::c_int = 10;

/// Python source of the in-session runner; also defines the zygote's warm-up.
const RUNNER_SOURCE: &str = include_str!("../runner.py");

/// Entry point of `sandpool __zygote`: the server passes the control socket as stdin.
/// Must be called before any other thread exists.
pub fn main_on_stdin() -> i32 {
    // SAFETY: descriptor 0 is the control socket the server set up as our stdin; nothing else
    // in this fresh process owns it.
    let control = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(0) };
    main(control)
}

/// Runs the zygote on the control socket inherited from the server. Returns the process exit
/// code; errors are printed to stderr, which the server forwards to its log.
pub fn main(control: OwnedFd) -> i32 {
    match run(control) {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("zygote: {err:#}");
            1
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ZygoteError {
    #[error("control channel: {0}")]
    Control(String),
    #[error("building the session root failed")]
    Rootfs(#[from] rootfs::RootfsError),
    #[error("embedded python failed")]
    Python(#[from] python::PythonError),
    #[error("cannot {step}")]
    Sys { step: &'static str, source: nix::Error },
}

fn sys(step: &'static str) -> impl FnOnce(nix::Error) -> ZygoteError {
    move |source| ZygoteError::Sys { step, source }
}

fn run(control: OwnedFd) -> Result<(), ZygoteError> {
    // Die with the server; re-check the parent to close the race with a server that already died.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(sys("arm the parent-death signal"))?;
    let server_pid = nix::unistd::getppid();
    if server_pid.as_raw() == 1 {
        return Err(ZygoteError::Control("server exited before the zygote started".into()));
    }
    let config: ZygoteConfig = match receive(&control)? {
        Some((bytes, _)) => serde_json::from_slice(&bytes).map_err(|e| ZygoteError::Control(format!("bad config: {e}")))?,
        None => return Err(ZygoteError::Control("closed before the config arrived".into())),
    };

    // Adopt orphaned grandchildren (processes a session started) so they are reaped here.
    nix::sys::prctl::set_child_subreaper(true).map_err(sys("become a subreaper"))?;
    // Refilling the ready queue must not slow down requests being served: the zygote, and
    // each new session until it is locked down, run at a lower priority.
    // SAFETY: setpriority has no memory-safety preconditions.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, REFILL_NICENESS) };
    // SAFETY: single-threaded process; nothing else reads the environment concurrently.
    for (key, _) in std::env::vars_os() {
        std::env::remove_var(key);
    }
    for (key, value) in &config.env {
        std::env::set_var(key, value);
    }
    std::env::set_var("PYTHONHOME", &config.python.home);

    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(sys("create a mount namespace"))?;
    let mut cgroup_parents = Vec::new();
    for path in &config.session.cgroup_parents {
        let fd = nix::fcntl::open(path, OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_RDONLY, Mode::empty()).map_err(|e| {
            ZygoteError::Control(format!("cannot open the pool cgroup {}: {e} (was it removed by another server?)", path.display()))
        })?;
        cgroup_parents.push(fd);
    }
    rootfs::build_and_enter(&config)?;

    let python = EmbeddedPython::load(&config.python.libpython)?;
    python.initialize();
    let report = nix::sys::memfd::memfd_create("zygote-report", nix::sys::memfd::MFdFlags::empty()).map_err(sys("create a memfd"))?;
    let init_args = serde_json::json!({
        "site_packages": config.python.site_packages,
        "executable": config.python.executable,
        "preload": config.python.preload_modules,
        "report_fd": report.as_raw_fd(),
    });
    let bootstrap = format!(
        "import sys, types\n\
         _m = types.ModuleType('_sandpool_runner')\n\
         exec(compile({source}, '<sandpool-runner>', 'exec'), _m.__dict__)\n\
         sys.modules['_sandpool_runner'] = _m\n\
         _m.zygote_init({args})\n\
         del _m\n",
        source = serde_json::Value::String(RUNNER_SOURCE.to_owned()),
        args = serde_json::Value::String(init_args.to_string()),
    );
    python.run(&bootstrap)?;
    for bind in config.binds.iter().filter(|b| b.writable_during_warm_up) {
        rootfs::remount_read_only(&bind.inside)?;
    }
    let (python_version, packages) = read_report(report)?;
    send(&control, &ZygoteEvent::Ready { python_version, packages }, None)?;

    let filters = seccomp::build().map_err(|e| ZygoteError::Control(e.to_string()))?;
    serve(&control, &config, &python, &cgroup_parents, &filters)
}

/// The fork loop: spawn sessions on request, report every session exit.
fn serve(
    control: &OwnedFd,
    config: &ZygoteConfig,
    python: &EmbeddedPython,
    cgroup_parents: &[OwnedFd],
    filters: &seccomp::SessionFilters,
) -> Result<(), ZygoteError> {
    let mut child_signals = SigSet::empty();
    child_signals.add(Signal::SIGCHLD);
    let previous_mask = child_signals.thread_swap_mask(SigmaskHow::SIG_BLOCK).map_err(sys("block SIGCHLD"))?;
    let sigchld = SignalFd::with_flags(&child_signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK).map_err(sys("create a signalfd"))?;
    let zygote_pid = nix::unistd::getpid().as_raw();
    let mut sessions: HashSet<i32> = HashSet::new();

    loop {
        let mut fds = [PollFd::new(control.as_fd(), PollFlags::POLLIN), PollFd::new(sigchld.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(source) => return Err(ZygoteError::Sys { step: "poll", source }),
        }
        let control_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        let child_ready = fds[1].revents().is_some_and(|r| !r.is_empty());
        if child_ready {
            while sigchld.read_signal().ok().flatten().is_some() {}
            reap(control, &mut sessions)?;
        }
        if !control_ready {
            continue;
        }
        let Some((bytes, _)) = receive(control)? else {
            // The server closed the channel: stop. Sessions die with us (parent-death signal).
            return Ok(());
        };
        let command: ZygoteCommand = serde_json::from_slice(&bytes).map_err(|e| ZygoteError::Control(format!("bad command: {e}")))?;
        match command {
            ZygoteCommand::Spawn { sandbox_id, uid, gid } => {
                let (server_end, session_end) =
                    socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC).map_err(sys("create a socket pair"))?;
                python.before_fork();
                match clone_session() {
                    Ok(0) => {
                        drop(server_end);
                        let _ = previous_mask.thread_set_mask();
                        let who = SessionIdentity { sandbox_id: &sandbox_id, uid, gid };
                        let code = session_init(config, &who, cgroup_parents, session_end, zygote_pid, python, filters);
                        // SAFETY: leave without running atexit handlers or destructors that
                        // belong to the zygote.
                        unsafe { libc::_exit(code) }
                    }
                    Ok(child) => {
                        python.after_fork_parent();
                        drop(session_end);
                        sessions.insert(child);
                        send(control, &ZygoteEvent::Spawned { sandbox_id, pid: child }, Some(server_end.as_raw_fd()))?;
                    }
                    Err(source) => {
                        python.after_fork_parent();
                        let error = format!("cannot start a session process: {source}");
                        send(control, &ZygoteEvent::SpawnFailed { sandbox_id, error }, None)?;
                    }
                }
            }
        }
    }
}

/// Namespaces every session gets, created by the clone itself.
const SESSION_NAMESPACES: libc::c_ulong =
    (libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) as libc::c_ulong;

/// Forks the session's first process straight into its new namespaces; it becomes PID 1 of
/// its PID namespace. Returns 0 in the child and the child's pid in the zygote.
///
/// A raw `clone` (as bubblewrap does), since glibc's `fork` cannot create namespaces. The
/// zygote is single-threaded, so no lock can be held across it; the child never calls
/// functions that rely on glibc's cached thread id (`raise`, `pthread_kill`): it only sets
/// itself up and forks the runner with glibc's `fork`, which gives the runner a correct one.
fn clone_session() -> Result<i32, nix::Error> {
    // SAFETY: with a null stack pointer `clone` behaves like `fork` (the child continues on a
    // copy of this stack); the flags create namespaces and request SIGCHLD on exit.
    let pid =
        unsafe { libc::syscall(libc::SYS_clone, SESSION_NAMESPACES | libc::SIGCHLD as libc::c_ulong, 0usize, 0usize, 0usize, 0usize) };
    if pid < 0 {
        Err(nix::Error::last())
    } else {
        Ok(pid as i32)
    }
}

/// The session's PID 1: locks the session down, forks the runner (which becomes the Python
/// session), then only reaps processes until the runner ends, and exits with the runner's
/// status (128 + signal when a signal killed it, as shells report it). When PID 1 exits, the
/// kernel kills every other process of the namespace: nothing of the session survives it.
fn session_init(
    config: &ZygoteConfig,
    who: &SessionIdentity<'_>,
    cgroup_parents: &[OwnedFd],
    session_end: OwnedFd,
    zygote_pid: i32,
    python: &EmbeddedPython,
    filters: &seccomp::SessionFilters,
) -> i32 {
    if let Err(err) = lockdown::lock_down(&config.session, who, cgroup_parents, session_end, zygote_pid, filters) {
        // The socket may already sit on fd 3 or still be the original descriptor; the
        // lock-down keeps it open in both cases.
        lockdown_failure(&err);
        return 71;
    }
    // As CPython does at start-up: a write to a closed pipe or past the file-size limit fails
    // with an error (EPIPE, EFBIG) instead of killing the process. Inherited by the runner.
    for signal in [Signal::SIGPIPE, Signal::SIGXFSZ] {
        // SAFETY: installing SIG_IGN runs no handler code.
        let _ = unsafe { nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigIgn) };
    }
    // SAFETY: PID 1 is single-threaded; the runner child gets a correct glibc thread state.
    let runner = match unsafe { nix::unistd::fork() } {
        Ok(ForkResult::Child) => {
            python.after_fork_child();
            // The runner is not PID 1: signals (including its own SIGKILL) work normally.
            let serve =
                format!("import _sandpool_runner\n_sandpool_runner.serve({SESSION_SOCKET_FD}, {})\n", config.session.output_cap_bytes);
            let code = match python.run(&serve) {
                Ok(()) => 0,
                Err(_) => 70,
            };
            // SAFETY: as for the zygote's children.
            unsafe { libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(err) => {
            lockdown_failure(&lockdown::LockdownError::Step { step: "start the runner", source: err });
            return 72;
        }
    };
    // PID 1 keeps no descriptor of the session: the runner owns the socket.
    // SAFETY: closes descriptors no Rust value owns (they were moved into place by lock_down).
    unsafe { libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0) };
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == runner => return code,
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == runner => return 128 + signal as i32,
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(_) => return 73,
        }
    }
}

/// In the child, after a failed lock-down: tell the server why, on whatever descriptor
/// carries the session socket.
fn lockdown_failure(err: &lockdown::LockdownError) {
    let message = format!("session lock-down failed: {err}: {}", std::error::Error::source(err).map(|s| s.to_string()).unwrap_or_default());
    // SAFETY: fd 3 is either the session socket (after the move) or, before it, some other
    // inherited descriptor; writing a frame to a wrong descriptor is harmless because the
    // child exits right after.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(SESSION_SOCKET_FD) };
    lockdown::report_failure(fd, &message);
}

fn reap(control: &OwnedFd, sessions: &mut HashSet<i32>) -> Result<(), ZygoteError> {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                if sessions.remove(&pid.as_raw()) {
                    send(control, &ZygoteEvent::Exited { pid: pid.as_raw(), code: Some(code), signal: None }, None)?;
                }
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) => {
                if sessions.remove(&pid.as_raw()) {
                    send(control, &ZygoteEvent::Exited { pid: pid.as_raw(), code: None, signal: Some(signal as i32) }, None)?;
                }
            }
            Ok(WaitStatus::StillAlive) | Err(nix::Error::ECHILD) => return Ok(()),
            Ok(_) => {}
            Err(nix::Error::EINTR) => {}
            Err(source) => return Err(ZygoteError::Sys { step: "reap children", source }),
        }
    }
}

fn read_report(report: OwnedFd) -> Result<(String, Vec<(String, String)>), ZygoteError> {
    let mut file = std::fs::File::from(report);
    let mut text = String::new();
    file.rewind()
        .and_then(|_| file.read_to_string(&mut text))
        .map_err(|e| ZygoteError::Control(format!("cannot read the warm-up report: {e}")))?;
    #[derive(serde::Deserialize)]
    struct Report {
        python_version: String,
        packages: Vec<(String, String)>,
    }
    let report: Report = serde_json::from_str(&text).map_err(|e| ZygoteError::Control(format!("bad warm-up report: {e}")))?;
    Ok((report.python_version, report.packages))
}

/// Receives one datagram (and any passed descriptors); `None` when the peer closed.
fn receive(fd: &OwnedFd) -> Result<Option<crate::fdpass::Datagram>, ZygoteError> {
    crate::fdpass::recv_datagram(fd.as_raw_fd(), MAX_CONTROL_MESSAGE).map_err(|e| ZygoteError::Control(format!("receive: {e}")))
}

fn send(fd: &OwnedFd, event: &ZygoteEvent, pass: Option<i32>) -> Result<(), ZygoteError> {
    let bytes = serde_json::to_vec(event).expect("events serialize");
    crate::fdpass::send_datagram(fd.as_raw_fd(), &bytes, pass).map_err(|e| ZygoteError::Control(format!("send: {e}")))
}
