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

use std::collections::HashMap;
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

/// How eagerly the zygote works. Refilling the ready queue is background work: the zygote
/// and each warming session (until it joins its cgroup, whose `cpu.idle` takes over) run
/// SCHED_IDLE. A spawn a request waits for runs at the normal priority. (Which CPUs the zygote
/// may use is the server's business: see `cpu_gate`.)
struct Scheduling;

impl Scheduling {
    /// For refilling (the zygote's resting state).
    fn background(&self) -> Result<(), nix::Error> {
        set_scheduling_policy(libc::SCHED_IDLE)
    }

    /// For a spawn a request waits for.
    fn foreground(&self) -> Result<(), nix::Error> {
        set_scheduling_policy(libc::SCHED_OTHER)
    }
}

/// Sets the calling thread's scheduling policy (SCHED_IDLE or SCHED_OTHER, priority 0).
fn set_scheduling_policy(policy: libc::c_int) -> Result<(), nix::Error> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the duration of the call.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        return Err(nix::Error::last());
    }
    Ok(())
}

/// Python source of the in-session runner; also defines the zygote's warm-up.
use crate::runner_link::RUNNER_SOURCE;

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
    // The zygote outlives a server that crashes (its sessions are adopted by the next one),
    // so no parent-death signal; a server that stops on purpose kills it.
    let config: ZygoteConfig = match receive(&control)? {
        Some((bytes, _)) => serde_json::from_slice(&bytes).map_err(|e| ZygoteError::Control(format!("bad config: {e}")))?,
        None => return Err(ZygoteError::Control("closed before the config arrived".into())),
    };
    // Bound while the host's filesystem is still visible (the private root hides it).
    let listener = listen_for_adoption(&config)?;
    // Our stderr is a pipe to the server: once it is gone, a write must fail, not kill us.
    // (Sessions inherit this, as Python itself would set it; `subprocess` restores it.)
    // SAFETY: single-threaded; SIG_IGN installs no handler code.
    unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigIgn) }.map_err(sys("ignore SIGPIPE"))?;

    // Adopt orphaned grandchildren (processes a session started) so they are reaped here.
    nix::sys::prctl::set_child_subreaper(true).map_err(sys("become a subreaper"))?;
    // Refilling the ready queue must not slow down requests being served (see `Scheduling`).
    let scheduling = Scheduling;
    scheduling.background().map_err(sys("lower the zygote's CPU priority"))?;
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
    let ready = ZygoteEvent::Ready { python_version, packages };
    send(&control, &ready, None)?;

    let filters = seccomp::build().map_err(|e| ZygoteError::Control(e.to_string()))?;
    let mut controller = Controller { control: Some(control), listener, ready, fingerprint: config.fingerprint() };
    serve(&mut controller, &config, &python, &cgroup_parents, &filters, &scheduling)
}

/// The server's side of the zygote: the current control channel (none while no server is
/// connected) and the socket a restarted server connects to.
struct Controller {
    control: Option<OwnedFd>,
    listener: OwnedFd,
    /// Sent again to an adopting server.
    ready: ZygoteEvent,
    fingerprint: String,
}

impl Controller {
    /// Sends an event to the server, if one is connected; a failed send means it went away.
    fn send(&mut self, event: &ZygoteEvent, pass: Option<i32>) {
        if let Some(control) = &self.control {
            if let Err(err) = send(control, event, pass) {
                note(&format!("the server went away ({err}); keeping the sessions for the next one"));
                self.control = None;
            }
        }
    }

    /// Accepts a restarted server: reports every live session to it (with a duplicate of its
    /// socket) and makes it the controller. A second server while one is connected is
    /// turned away (the state directory's lock makes that a stale leftover).
    fn accept(&mut self, sessions: &Sessions) -> Result<(), ZygoteError> {
        let fd = nix::sys::socket::accept4(self.listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC).map_err(sys("accept a server"))?;
        // SAFETY: accept4 returned a fresh descriptor that nothing else owns.
        let connection = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        if self.control.is_some() {
            return Ok(());
        }
        match receive(&connection)? {
            Some((bytes, _)) if matches!(serde_json::from_slice(&bytes), Ok(ZygoteCommand::Adopt)) => {}
            _ => return Ok(()),
        }
        send(&connection, &self.ready, None)?;
        for (pid, survivor) in &sessions.survivors {
            let event = ZygoteEvent::Survivor { sandbox_id: survivor.sandbox_id.clone(), pid: *pid, uid: survivor.uid };
            send(&connection, &event, Some(survivor.socket.as_raw_fd()))?;
        }
        let done = ZygoteEvent::AdoptionDone { fingerprint: self.fingerprint.clone(), zygote_pid: nix::unistd::getpid().as_raw() };
        send(&connection, &done, None)?;
        note(&format!("adopted by a restarted server with {} live session(s)", sessions.survivors.len()));
        self.control = Some(connection);
        Ok(())
    }
}

/// A line for the server's log, on stderr; lost (not fatal) once the server is gone.
fn note(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "zygote: {message}");
}

/// The socket a restarted server connects to, at `config.adopt_socket` (root only).
fn listen_for_adoption(config: &ZygoteConfig) -> Result<OwnedFd, ZygoteError> {
    use nix::sys::socket::{bind, listen, socket, Backlog, UnixAddr};
    let path = &config.adopt_socket;
    let _ = std::fs::remove_file(path);
    let listener =
        socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).map_err(sys("create the adopt socket"))?;
    let address = UnixAddr::new(path).map_err(sys("name the adopt socket"))?;
    bind(listener.as_raw_fd(), &address).map_err(sys("bind the adopt socket"))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| ZygoteError::Control(format!("cannot restrict {}: {e}", path.display())))?;
    listen(&listener, Backlog::new(4).map_err(sys("size the adopt backlog"))?).map_err(sys("listen on the adopt socket"))?;
    Ok(listener)
}

/// The fork loop: spawn sessions on request, report every session exit, and wait for a
/// restarted server while none is connected.
fn serve(
    controller: &mut Controller,
    config: &ZygoteConfig,
    python: &EmbeddedPython,
    cgroup_parents: &[OwnedFd],
    filters: &seccomp::SessionFilters,
    scheduling: &Scheduling,
) -> Result<(), ZygoteError> {
    let mut child_signals = SigSet::empty();
    child_signals.add(Signal::SIGCHLD);
    let previous_mask = child_signals.thread_swap_mask(SigmaskHow::SIG_BLOCK).map_err(sys("block SIGCHLD"))?;
    let sigchld = SignalFd::with_flags(&child_signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK).map_err(sys("create a signalfd"))?;
    let zygote_pid = nix::unistd::getpid().as_raw();
    let own_pid_namespace = nix::fcntl::open("/proc/self/ns/pid", OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(sys("open the zygote's PID namespace"))?;
    let mut sessions = Sessions::default();

    loop {
        let (control_ready, child_ready, adopt_ready) = {
            let listener = controller.listener.as_fd();
            let mut fds = vec![PollFd::new(sigchld.as_fd(), PollFlags::POLLIN), PollFd::new(listener, PollFlags::POLLIN)];
            if let Some(control) = &controller.control {
                fds.push(PollFd::new(control.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(source) => return Err(ZygoteError::Sys { step: "poll", source }),
            }
            let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            (fds.get(2).is_some_and(ready), ready(&fds[0]), ready(&fds[1]))
        };
        if child_ready {
            while sigchld.read_signal().ok().flatten().is_some() {}
            reap(controller, &mut sessions)?;
        }
        if adopt_ready {
            if let Err(err) = controller.accept(&sessions) {
                note(&format!("a server could not adopt this zygote: {err}"));
            }
        }
        if !control_ready {
            continue;
        }
        let received = match &controller.control {
            Some(control) => receive(control),
            None => continue,
        };
        let Ok(Some((bytes, _))) = received else {
            // The server went away (a crash, or a stop that is about to kill us): keep the
            // sessions alive for a restarted server.
            note(&format!("the server went away; keeping {} session(s) for the next one", sessions.survivors.len()));
            controller.control = None;
            continue;
        };
        let command: ZygoteCommand = serde_json::from_slice(&bytes).map_err(|e| ZygoteError::Control(format!("bad command: {e}")))?;
        match command {
            ZygoteCommand::Spawn { sandbox_id, uid, gid, warming } => {
                if !warming {
                    scheduling.foreground().map_err(sys("raise the zygote's CPU priority"))?;
                }
                let who = SessionIdentity { sandbox_id: &sandbox_id, uid, gid, warming };
                let spawned = spawn(config, python, cgroup_parents, filters, &own_pid_namespace, &previous_mask, zygote_pid, &who);
                if !warming {
                    scheduling.background().map_err(sys("lower the zygote's CPU priority"))?;
                }
                match spawned {
                    Ok((runner, init, stack, server_end)) => {
                        sessions.runners.insert(runner, init);
                        sessions.init_stacks.insert(init, stack);
                        controller
                            .send(&ZygoteEvent::Spawned { sandbox_id: sandbox_id.clone(), pid: runner }, Some(server_end.as_raw_fd()));
                        // Kept for a restarted server; the runner still ends when its cgroup is
                        // killed, which is how the server deletes sessions.
                        sessions.survivors.insert(runner, Survivor { sandbox_id, uid, socket: server_end });
                    }
                    Err(source) => {
                        let error = format!("cannot start a session: {source}");
                        controller.send(&ZygoteEvent::SpawnFailed { sandbox_id, error }, None);
                    }
                }
            }
            // Only meaningful on the adopt socket.
            ZygoteCommand::Adopt => {}
        }
    }
}

/// Live sessions: each runner's PID 1, the stack of each PID 1, and what a restarted server
/// needs to adopt each runner.
#[derive(Default)]
struct Sessions {
    /// runner pid → its PID namespace's init pid.
    runners: HashMap<i32, i32>,
    /// init pid → its stack.
    init_stacks: HashMap<i32, InitStack>,
    /// runner pid → the session as a restarted server adopts it.
    survivors: HashMap<i32, Survivor>,
}

/// A live session, with a duplicate of the server's end of its socket.
struct Survivor {
    sandbox_id: String,
    uid: u32,
    socket: OwnedFd,
}

/// Starts one session: its PID 1 (sharing the zygote's memory), then its runner, forked from
/// the zygote into that PID namespace. Returns the runner's pid, PID 1's pid and stack, and
/// the server's end of the session socket.
#[allow(clippy::too_many_arguments)]
fn spawn(
    config: &ZygoteConfig,
    python: &EmbeddedPython,
    cgroup_parents: &[OwnedFd],
    filters: &seccomp::SessionFilters,
    own_pid_namespace: &OwnedFd,
    previous_mask: &SigSet,
    zygote_pid: i32,
    who: &SessionIdentity<'_>,
) -> Result<(i32, i32, InitStack, OwnedFd), nix::Error> {
    let (server_end, session_end) = socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)?;
    let stack = InitStack::new()?;
    let init = stack.start_init()?;
    // From here on a failure must not leave the PID 1 behind.
    let kill_init = |err: nix::Error| {
        let _ = nix::sys::signal::kill(Pid::from_raw(init), Signal::SIGKILL);
        err
    };
    let init_namespace =
        nix::fcntl::open(format!("/proc/{init}/ns/pid").as_str(), OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).map_err(kill_init)?;
    nix::sched::setns(&init_namespace, nix::sched::CloneFlags::CLONE_NEWPID).map_err(kill_init)?;
    python.before_fork();
    // SAFETY: the zygote is single-threaded (PID 1 shares its memory but only makes raw system
    // calls on its own stack), so the child may run arbitrary code after fork.
    let forked = unsafe { nix::unistd::fork() };
    match forked {
        Ok(ForkResult::Child) => {
            drop(server_end);
            let _ = previous_mask.thread_set_mask();
            let code = run_session(config, who, cgroup_parents, session_end, zygote_pid, python, filters);
            // SAFETY: leave without running atexit handlers or destructors that belong to the
            // zygote.
            unsafe { libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => {
            python.after_fork_parent();
            // Later children are the zygote's own again.
            nix::sched::setns(own_pid_namespace, nix::sched::CloneFlags::CLONE_NEWPID).map_err(kill_init)?;
            drop(session_end);
            Ok((child.as_raw(), init, stack, server_end))
        }
        Err(err) => {
            python.after_fork_parent();
            let _ = nix::sched::setns(own_pid_namespace, nix::sched::CloneFlags::CLONE_NEWPID);
            Err(kill_init(err))
        }
    }
}

/// Size of a PID 1's stack: it only makes a few raw system calls.
const INIT_STACK_BYTES: usize = 64 * 1024;

/// The stack of a session's PID 1, in the zygote's address space.
struct InitStack {
    base: *mut libc::c_void,
}

impl InitStack {
    fn new() -> Result<InitStack, nix::Error> {
        // SAFETY: an anonymous private mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                INIT_STACK_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(nix::Error::last());
        }
        Ok(InitStack { base })
    }

    /// Starts the session's PID 1 in a new PID namespace. It shares the zygote's memory
    /// (`CLONE_VM`), so creating it copies no page tables: it costs the kernel a task and a
    /// namespace, not a copy of a 100 MB address space.
    fn start_init(&self) -> Result<i32, nix::Error> {
        // SAFETY: the stack is ours and outlives the child (it is unmapped only after the
        // child is reaped); `session_pid1` makes raw system calls only (no allocation, no
        // thread-local state, not even errno), so sharing memory with the zygote is sound.
        let pid = unsafe {
            let top = (self.base as *mut u8).add(INIT_STACK_BYTES) as *mut libc::c_void;
            libc::clone(session_pid1, top, libc::CLONE_VM | libc::CLONE_NEWPID | libc::SIGCHLD, std::ptr::null_mut())
        };
        if pid < 0 {
            Err(nix::Error::last())
        } else {
            Ok(pid)
        }
    }
}

impl Drop for InitStack {
    fn drop(&mut self) {
        // SAFETY: mapped in `new`, and the PID 1 using it has been reaped.
        unsafe { libc::munmap(self.base, INIT_STACK_BYTES) };
    }
}

/// A session's PID 1: it dies with the zygote and reaps the processes orphaned in its PID
/// namespace until the zygote kills it (when the runner ends; the kernel then kills whatever
/// else is left in the namespace). Signals from inside the namespace cannot reach it: PID 1
/// ignores every signal it has no handler for.
extern "C" fn session_pid1(_: *mut libc::c_void) -> libc::c_int {
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    loop {
        if rustix::process::wait(rustix::process::WaitOptions::empty()).is_err() {
            // No children yet (the runner belongs to the zygote): wait for one to be orphaned.
            let _ = rustix::thread::nanosleep(&rustix::thread::Timespec { tv_sec: 3600, tv_nsec: 0 });
        }
    }
}

/// The runner: locks the session down, then becomes the Python session.
fn run_session(
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
    // with an error (EPIPE, EFBIG) instead of killing the process.
    for signal in [Signal::SIGPIPE, Signal::SIGXFSZ] {
        // SAFETY: installing SIG_IGN runs no handler code.
        let _ = unsafe { nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigIgn) };
    }
    python.after_fork_child();
    let serve = format!("import _sandpool_runner\n_sandpool_runner.serve({SESSION_SOCKET_FD}, {})\n", config.session.output_cap_bytes);
    match python.run(&serve) {
        Ok(()) => 0,
        Err(_) => 70,
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

fn reap(controller: &mut Controller, sessions: &mut Sessions) -> Result<(), ZygoteError> {
    loop {
        let (pid, code, signal) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid.as_raw(), Some(code), None),
            Ok(WaitStatus::Signaled(pid, signal, _)) => (pid.as_raw(), None, Some(signal as i32)),
            Ok(WaitStatus::StillAlive) | Err(nix::Error::ECHILD) => return Ok(()),
            Ok(_) | Err(nix::Error::EINTR) => continue,
            Err(source) => return Err(ZygoteError::Sys { step: "reap children", source }),
        };
        if let Some(init) = sessions.runners.remove(&pid) {
            // The runner ended: end its PID namespace, and with it whatever it left running.
            let _ = nix::sys::signal::kill(Pid::from_raw(init), Signal::SIGKILL);
            sessions.survivors.remove(&pid);
            controller.send(&ZygoteEvent::Exited { pid, code, signal }, None);
        } else {
            // A PID 1 (or an orphan adopted by the zygote): free a PID 1's stack.
            sessions.init_stacks.remove(&pid);
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
