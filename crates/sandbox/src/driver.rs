//! Host side of a zygote pool: starts the zygote, asks it for sessions, talks to each
//! session's runner, and cleans up.
//!
//! One reader task per zygote owns the receiving side of the control channel. It routes
//! `Spawned` events to the `create` call waiting for them and `Exited` events to the sandbox
//! whose process ended. If the zygote dies, every session it forked is gone too (they carry a
//! parent-death signal); they are all marked lost, and the next `create` starts a new zygote.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use nix::fcntl::OFlag;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::stat::Mode;
use nix::unistd::Pid;
use sandpool_engine::backend::{Cell, CellOutcome, DeathCause, FileStore, Purpose, RuntimeInfo, Sandbox, SandboxError, SandboxFactory};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, watch};

use crate::cgroup::{PoolCgroups, SessionLimits};
use crate::files::DataDirStore;
use crate::protocol::{PythonLaunch, SessionPlan, ZygoteCommand, ZygoteConfig, ZygoteEvent, MAX_CONTROL_MESSAGE};
use crate::runner_link::{RunnerConnection, RunnerProcess};
use crate::runtime::{PythonRuntime, SharedRuntime};
use crate::uids::UidAllocator;

/// Zygote sockets are `<run dir>/zygote-<backend id>.sock`.
const ADOPT_SOCKET_PREFIX: &str = "zygote-";
/// How long the zygote may take to import the pool's libraries.
const ZYGOTE_START_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a fork plus lock-down may take before the session counts as failed.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(30);
/// `/etc` entries sessions can see; the rest of the host's `/etc` stays hidden.
pub const ETC_ENTRIES: &[&str] = &[
    "alternatives",
    "ca-certificates",
    "ca-certificates.conf",
    "fonts",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "nsswitch.conf",
    "ssl",
    "timezone",
    "protocols",
    "services",
    "matplotlibrc",
];

/// Everything a zygote pool needs besides the runtime.
#[derive(Debug, Clone)]
pub struct ZygotePoolSettings {
    pub pool: String,
    pub limits: SessionLimits,
    pub data_dir_bytes: u64,
    pub tmp_dir_bytes: u64,
    pub max_open_files: u64,
    pub max_cpu_seconds: u64,
    /// Cap on each captured output stream, in characters.
    pub output_cap: usize,
    pub preload_modules: Vec<String>,
    /// A directory of the server's own (under the state directory) for the zygote's root
    /// mount point.
    pub run_dir: PathBuf,
    /// The sandpool binary, started with `__zygote` to become the zygote.
    pub zygote_exe: PathBuf,
    /// Remove session cgroups an earlier run left (except those of adopted sessions) at
    /// start. Off when the pool's previous template still has live sessions there.
    pub clean_up_leftovers: bool,
}

/// The environment of a Python session (either backend).
pub fn session_env(runtime: &PythonRuntime) -> Vec<(String, String)> {
    let venv = PathBuf::from(crate::runtime::VENV_IN_SANDBOX);
    let venv_bin = venv.join("bin");
    vec![
        ("PATH".to_owned(), format!("{}:/usr/local/bin:/usr/bin:/bin", venv_bin.display())),
        ("HOME".to_owned(), "/tmp".to_owned()),
        ("USER".to_owned(), "sandbox".to_owned()),
        ("LOGNAME".to_owned(), "sandbox".to_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ("TMPDIR".to_owned(), "/tmp".to_owned()),
        ("VIRTUAL_ENV".to_owned(), venv.display().to_string()),
        ("PYTHONNOUSERSITE".to_owned(), "1".to_owned()),
        ("PYTHONDONTWRITEBYTECODE".to_owned(), "1".to_owned()),
        ("MPLBACKEND".to_owned(), "Agg".to_owned()),
        ("MPLCONFIGDIR".to_owned(), runtime.in_sandbox(&runtime.mpl_config).display().to_string()),
        // One BLAS thread: sessions fork from a single-threaded zygote, and per-session
        // thread pools would multiply across thousands of sessions.
        ("OPENBLAS_NUM_THREADS".to_owned(), "1".to_owned()),
        ("OMP_NUM_THREADS".to_owned(), "1".to_owned()),
        ("MKL_NUM_THREADS".to_owned(), "1".to_owned()),
    ]
}

/// The engine's view of one Python pool on this backend.
pub struct ZygoteFactory {
    settings: ZygotePoolSettings,
    runtime: Arc<SharedRuntime>,
    uids: Arc<UidAllocator>,
    cgroups: Arc<PoolCgroups>,
    /// The running zygote, replaced when it dies.
    link: tokio::sync::Mutex<Option<Arc<ZygoteLink>>>,
    /// Sessions of a zygote that outlived the previous server, found by `start`.
    survivors: Mutex<Vec<Arc<dyn Sandbox>>>,
    /// Names this backend's zygote socket.
    socket_id: String,
    /// Zygotes a previous server left are looked for once, at the first start.
    looked_for_survivors: AtomicBool,
}

/// The zygote process: our child, or one a previous server started and we adopted.
enum ZygoteProcess {
    Child(tokio::process::Child),
    Adopted(i32),
}

impl ZygoteProcess {
    fn kill(&mut self) {
        match self {
            ZygoteProcess::Child(child) => {
                let _ = child.start_kill();
            }
            ZygoteProcess::Adopted(pid) => {
                let _ = nix::sys::signal::kill(Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// How a session process ended, as reported by the zygote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExitStatus {
    Code(i32),
    Signal(i32),
    /// The zygote went away; the process died with it.
    Lost,
}

type SpawnReply = Result<(i32, OwnedFd, watch::Receiver<Option<ExitStatus>>), String>;

/// A running zygote and its control channel.
struct ZygoteLink {
    control: AsyncFd<OwnedFd>,
    /// `create` calls waiting for their `Spawned` event, by sandbox id.
    pending: Mutex<HashMap<String, oneshot::Sender<SpawnReply>>>,
    /// Live session processes, by pid, to deliver their exit.
    children: Mutex<HashMap<i32, watch::Sender<Option<ExitStatus>>>>,
    alive: AtomicBool,
    /// Killed when the pool stops or its template is retired.
    process: Mutex<ZygoteProcess>,
    /// Registers the zygote with the CPU gate while the link lives.
    _cpu_gate: Option<Arc<crate::cpu_gate::ZygoteHandle>>,
    info: RuntimeInfo,
}

impl ZygoteFactory {
    pub fn new(settings: ZygotePoolSettings, runtime: Arc<SharedRuntime>, uids: Arc<UidAllocator>, cgroups: PoolCgroups) -> ZygoteFactory {
        ZygoteFactory {
            settings,
            runtime,
            uids,
            cgroups: Arc::new(cgroups),
            link: tokio::sync::Mutex::new(None),
            survivors: Mutex::new(Vec::new()),
            socket_id: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            looked_for_survivors: AtomicBool::new(false),
        }
    }

    fn config(&self, runtime: &PythonRuntime) -> ZygoteConfig {
        let env = session_env(runtime);
        ZygoteConfig {
            pool: self.settings.pool.clone(),
            root_dir: self.settings.run_dir.join("root"),
            binds: runtime.binds(),
            etc_entries: ETC_ENTRIES.iter().map(|s| s.to_string()).collect(),
            python: PythonLaunch {
                libpython: runtime.libpython.clone(),
                home: runtime.home.clone(),
                site_packages: runtime.in_sandbox(&runtime.site_packages),
                executable: runtime.in_sandbox(&runtime.venv_python),
                preload_modules: self.settings.preload_modules.clone(),
            },
            env,
            session: SessionPlan {
                data_dir_bytes: self.settings.data_dir_bytes,
                tmp_dir_bytes: self.settings.tmp_dir_bytes,
                max_open_files: self.settings.max_open_files,
                max_processes: self.settings.limits.max_processes,
                max_cpu_seconds: self.settings.max_cpu_seconds,
                cgroup_parents: self.cgroups.parents.clone(),
                cgroup_limits: self.cgroups.limits.clone(),
                cgroup_warming: self.cgroups.warming.clone(),
                output_cap_bytes: self.settings.output_cap as u64,
            },
            adopt_socket: self.adopt_socket(),
        }
    }

    /// This backend's zygote's socket: one per backend, so that the zygote of an earlier
    /// template (still serving its sessions after a template change) keeps its own.
    fn adopt_socket(&self) -> PathBuf {
        self.settings.run_dir.join(format!("{ADOPT_SOCKET_PREFIX}{}.sock", self.socket_id))
    }

    /// The running zygote, starting one if there is none or the last one died.
    async fn link(&self) -> Result<Arc<ZygoteLink>, SandboxError> {
        let mut guard = self.link.lock().await;
        if let Some(link) = guard.as_ref() {
            if link.alive.load(Ordering::SeqCst) {
                return Ok(link.clone());
            }
            tracing::warn!(pool = %self.settings.pool, "the zygote exited; starting a new one");
        }
        let link = self.launch().await?;
        *guard = Some(link.clone());
        Ok(link)
    }

    async fn launch(&self) -> Result<Arc<ZygoteLink>, SandboxError> {
        let pool = self.settings.pool.clone();
        let runtime = self
            .runtime
            .get()
            .await
            .map_err(|e| SandboxError::Unavailable(format!("the Python runtime for pool '{pool}' is not available: {e}")))?;
        match self.adopt(&self.config(&runtime)).await {
            Ok(Some(link)) => return Ok(link),
            Ok(None) => {}
            Err(err) => tracing::warn!(pool = %pool, "could not adopt the zygote a previous server left: {err}; starting a new one"),
        }
        let fail = |what: String| SandboxError::Unavailable(format!("cannot start the zygote of pool '{pool}': {what}"));
        let root = self.settings.run_dir.join("root");
        std::fs::create_dir_all(&root).map_err(|e| fail(format!("cannot create {}: {e}", root.display())))?;
        let (server_end, zygote_end) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK)
                .map_err(|e| fail(e.to_string()))?;
        // The zygote end becomes the zygote's stdin (blocking mode there).
        nix::fcntl::fcntl(&zygote_end, nix::fcntl::FcntlArg::F_SETFL(OFlag::empty())).map_err(|e| fail(e.to_string()))?;
        let mut process = tokio::process::Command::new(&self.settings.zygote_exe)
            .arg("__zygote")
            .env_clear()
            // Fixed malloc thresholds: glibc otherwise raises them after the first large
            // frees, and a session then keeps every freed large buffer (a numpy array, say) in
            // its heap for good. With them fixed, large blocks go back to the kernel when freed.
            // Read by the dynamic loader, so it must be in the zygote's initial environment.
            .env("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072")
            .stdin(Stdio::from(zygote_end))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(e.to_string()))?;
        for stream in [
            process.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            process.stderr.take().map(|s| Box::new(s) as _),
        ]
        .into_iter()
        .flatten()
        {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::warn!(pool = %pool, "zygote: {line}");
                }
            });
        }
        // SAFETY: an OwnedFd stays open and keeps its descriptor number until the AsyncFd drops it.
        let control = unsafe { AsyncFd::register(server_end) }.map_err(|e| fail(e.to_string()))?;
        let config = serde_json::to_vec(&self.config(&runtime)).expect("config serializes");
        send_control(&control, &config, None).await.map_err(|e| fail(format!("cannot send the config: {e}")))?;
        let first = tokio::time::timeout(ZYGOTE_START_TIMEOUT, recv_control(&control))
            .await
            .map_err(|_| fail(format!("it did not finish importing within {ZYGOTE_START_TIMEOUT:?}")))?
            .map_err(|e| fail(e.to_string()))?;
        let info = match first {
            Some((bytes, _)) => match serde_json::from_slice::<ZygoteEvent>(&bytes) {
                Ok(ZygoteEvent::Ready { python_version, packages }) => {
                    RuntimeInfo { language: "python".into(), language_version: python_version, packages, started_at: SystemTime::now() }
                }
                Ok(other) => return Err(fail(format!("unexpected first event {other:?}"))),
                Err(e) => return Err(fail(format!("bad event: {e}"))),
            },
            None => {
                let status = process.wait().await.map(|s| s.to_string()).unwrap_or_default();
                return Err(fail(format!("it exited during start-up ({status}); its output is in the log above")));
            }
        };
        tracing::info!(pool = %pool, python = %info.language_version, packages = info.packages.len(), "zygote ready");
        // No pid means the zygote already exited (and was reaped): nothing to confine.
        let cpu_gate = process.id().and_then(|pid| crate::cpu_gate::register(pid as i32));
        let link = Arc::new(ZygoteLink {
            control,
            pending: Mutex::new(HashMap::new()),
            children: Mutex::new(HashMap::new()),
            alive: AtomicBool::new(true),
            process: Mutex::new(ZygoteProcess::Child(process)),
            _cpu_gate: cpu_gate,
            info,
        });
        tokio::spawn(read_events(link.clone(), self.cgroups.clone(), self.uids.clone(), pool));
        Ok(link)
    }

    /// At the first start after a crash: connects to the zygotes a previous server of this
    /// state directory left (one socket each in the run dir) and takes over the one started
    /// with this config, with its sessions (they become [`SandboxFactory::adopted`]). The
    /// others (another config: the pool changed while the server was down, or an earlier
    /// template's zygote) are stopped, and their sessions with them. `None` when none fits.
    async fn adopt(&self, config: &ZygoteConfig) -> Result<Option<Arc<ZygoteLink>>, String> {
        // Later launches (a zygote that died) must not touch other backends' zygotes.
        if !self.settings.clean_up_leftovers || self.looked_for_survivors.swap(true, Ordering::SeqCst) {
            return Ok(None);
        }
        let mut sockets: Vec<PathBuf> = std::fs::read_dir(&self.settings.run_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().starts_with(ADOPT_SOCKET_PREFIX))
            .map(|entry| entry.path())
            .collect();
        sockets.sort();
        let mut adopted = None;
        for path in sockets {
            match self.adopt_at(&path, config, adopted.is_none()).await {
                Ok(Some(link)) => adopted = Some(link),
                Ok(None) => {}
                Err(err) => tracing::warn!(pool = %self.settings.pool, path = %path.display(), "could not take over a zygote: {err}"),
            }
        }
        Ok(adopted)
    }

    /// Adopts (if `take` and its config is ours) or stops the zygote listening on `path`.
    async fn adopt_at(&self, path: &Path, config: &ZygoteConfig, take: bool) -> Result<Option<Arc<ZygoteLink>>, String> {
        let path = path.to_owned();
        let socket = nix::sys::socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
            .map_err(|e| format!("socket: {e}"))?;
        let address = nix::sys::socket::UnixAddr::new(&path).map_err(|e| e.to_string())?;
        if let Err(err) = nix::sys::socket::connect(socket.as_raw_fd(), &address) {
            // Nobody listens: the zygote is gone (its sessions died with it).
            tracing::debug!(path = %path.display(), error = %err, "no zygote to adopt");
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        nix::fcntl::fcntl(&socket, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(|e| e.to_string())?;
        // SAFETY: an OwnedFd stays open and keeps its descriptor number until the AsyncFd drops it.
        let control = unsafe { AsyncFd::register(socket) }.map_err(|e| e.to_string())?;
        let command = serde_json::to_vec(&ZygoteCommand::Adopt).expect("command serializes");
        send_control(&control, &command, None).await.map_err(|e| format!("cannot ask the zygote: {e}"))?;
        let mut info = None;
        let mut survivors = Vec::new();
        let (fingerprint, zygote_pid) = loop {
            let received = tokio::time::timeout(Duration::from_secs(10), recv_control(&control))
                .await
                .map_err(|_| "the zygote did not answer within 10 s".to_owned())?
                .map_err(|e| e.to_string())?;
            let Some((bytes, mut fds)) = received else { return Err("the zygote hung up during adoption".into()) };
            match serde_json::from_slice::<ZygoteEvent>(&bytes).map_err(|e| format!("bad event: {e}"))? {
                ZygoteEvent::Ready { python_version, packages } => {
                    info = Some(RuntimeInfo {
                        language: "python".into(),
                        language_version: python_version,
                        packages,
                        started_at: SystemTime::now(),
                    });
                }
                ZygoteEvent::Survivor { sandbox_id, pid, uid } => {
                    if let Some(fd) = fds.pop() {
                        survivors.push((sandbox_id, pid, uid, fd));
                    }
                }
                ZygoteEvent::AdoptionDone { fingerprint, zygote_pid } => break (fingerprint, zygote_pid),
                other => return Err(format!("unexpected event during adoption: {other:?}")),
            }
        };
        if !take || fingerprint != config.fingerprint() {
            tracing::warn!(
                pool = %self.settings.pool,
                sessions = survivors.len(),
                "a zygote a previous server left runs other settings (the pool changed, or an earlier template): stopping it and its sessions"
            );
            let _ = nix::sys::signal::kill(Pid::from_raw(zygote_pid), nix::sys::signal::Signal::SIGKILL);
            for (sandbox_id, ..) in &survivors {
                let _ = self.cgroups.destroy_session(sandbox_id);
            }
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        let info = info.ok_or("the zygote did not report its runtime")?;
        let link = Arc::new(ZygoteLink {
            control,
            pending: Mutex::new(HashMap::new()),
            children: Mutex::new(HashMap::new()),
            alive: AtomicBool::new(true),
            process: Mutex::new(ZygoteProcess::Adopted(zygote_pid)),
            _cpu_gate: crate::cpu_gate::register(zygote_pid),
            info,
        });
        let mut adopted: Vec<Arc<dyn Sandbox>> = Vec::new();
        for (sandbox_id, pid, uid, fd) in survivors {
            let cleanup = Cleanup {
                sandbox_id: sandbox_id.clone(),
                uid,
                cgroups: self.cgroups.clone(),
                uids: self.uids.clone(),
                done: AtomicBool::new(false),
            };
            if !self.uids.adopt(uid) {
                tracing::warn!(pool = %self.settings.pool, sandbox = %sandbox_id, "a surviving session's uid is outside this server's block; stopping it");
                let _ = tokio::task::spawn_blocking(move || {
                    let _ = cleanup.cgroups.destroy_session(&cleanup.sandbox_id);
                })
                .await;
                continue;
            }
            let (exit_tx, exit_rx) = watch::channel(None);
            link.children.lock().expect("children lock").insert(pid, exit_tx);
            match reattach(pid, fd, uid, &sandbox_id) {
                Ok((conn, files)) => adopted.push(Arc::new(ZygoteSandbox {
                    inner: Arc::new(SandboxInner {
                        id: sandbox_id,
                        runner_pid: pid,
                        memory_limit: self.settings.limits.memory_bytes,
                        warming: false,
                        claimed: AtomicBool::new(true),
                        conn: tokio::sync::Mutex::new(conn),
                        exit: exit_rx,
                        cleanup,
                    }),
                    files,
                })),
                Err(err) => {
                    tracing::warn!(pool = %self.settings.pool, sandbox = %sandbox_id, "cannot adopt a surviving session: {err}");
                    cleanup.run_now().await;
                }
            }
        }
        tracing::info!(pool = %self.settings.pool, sessions = adopted.len(), "adopted the zygote a previous server left, with its sessions");
        *self.survivors.lock().expect("survivors lock") = adopted;
        tokio::spawn(read_events(link.clone(), self.cgroups.clone(), self.uids.clone(), self.settings.pool.clone()));
        Ok(Some(link))
    }
}

/// Takes over a surviving session's socket (its hello was read by the previous server) and
/// opens its data directory.
fn reattach(pid: i32, fd: OwnedFd, uid: u32, sandbox_id: &str) -> Result<(RunnerConnection<UnixStream>, DataDirStore), String> {
    let std_stream = std::os::unix::net::UnixStream::from(fd);
    std_stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    let stream = UnixStream::from_std(std_stream).map_err(|e| e.to_string())?;
    Ok((RunnerConnection::resume(stream), open_data_dir(pid, uid, sandbox_id)?))
}

#[async_trait]
impl SandboxFactory for ZygoteFactory {
    async fn start(&self) -> Result<RuntimeInfo, SandboxError> {
        let info = self.link().await?.info.clone();
        if self.settings.clean_up_leftovers {
            // Every session cgroup but the adopted sessions' is a leftover of a dead session.
            let keep: std::collections::HashSet<String> =
                self.survivors.lock().expect("survivors lock").iter().map(|sandbox| sandbox.id().to_owned()).collect();
            let cgroups = self.cgroups.clone();
            let removed = tokio::task::spawn_blocking(move || cgroups.remove_sessions_except(&keep)).await;
            if let Ok(Err(err)) = removed {
                tracing::warn!(pool = %self.settings.pool, error = %err, "could not remove session cgroups left by an earlier run");
            }
        }
        Ok(info)
    }

    fn adopted(&self) -> Vec<Arc<dyn Sandbox>> {
        std::mem::take(&mut *self.survivors.lock().expect("survivors lock"))
    }

    async fn create(&self, purpose: Purpose) -> Result<Arc<dyn Sandbox>, SandboxError> {
        let warming = purpose == Purpose::ReadyQueue;
        let link = self.link().await?;
        let uid = self.uids.allocate().ok_or_else(|| SandboxError::Unavailable("every session user id is in use".into()))?;
        let sandbox_id = format!("sb-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let cleanup = Cleanup {
            sandbox_id: sandbox_id.clone(),
            uid,
            cgroups: self.cgroups.clone(),
            uids: self.uids.clone(),
            done: AtomicBool::new(false),
        };
        let (tx, rx) = oneshot::channel();
        link.pending.lock().expect("pending lock").insert(sandbox_id.clone(), tx);
        let command = serde_json::to_vec(&ZygoteCommand::Spawn { sandbox_id: sandbox_id.clone(), uid, gid: uid, warming })
            .expect("command serializes");
        if let Err(e) = send_control(&link.control, &command, None).await {
            link.pending.lock().expect("pending lock").remove(&sandbox_id);
            cleanup.run_now().await;
            return Err(SandboxError::Unavailable(format!("cannot reach the zygote: {e}")));
        }
        let spawned = match tokio::time::timeout(SPAWN_TIMEOUT, rx).await {
            Ok(Ok(Ok(spawned))) => spawned,
            Ok(Ok(Err(message))) => {
                cleanup.run_now().await;
                return Err(SandboxError::Unavailable(message));
            }
            Ok(Err(_)) | Err(_) => {
                link.pending.lock().expect("pending lock").remove(&sandbox_id);
                cleanup.run_now().await;
                return Err(SandboxError::Unavailable("the zygote did not start the session in time".into()));
            }
        };
        let (pid, fd, exit) = spawned;
        match connect(pid, fd, uid, &sandbox_id).await {
            Ok((conn, files)) => Ok(Arc::new(ZygoteSandbox {
                inner: Arc::new(SandboxInner {
                    id: sandbox_id,
                    runner_pid: pid,
                    memory_limit: self.settings.limits.memory_bytes,
                    warming,
                    claimed: AtomicBool::new(false),
                    conn: tokio::sync::Mutex::new(conn),
                    exit,
                    cleanup,
                }),
                files,
            })),
            Err(message) => {
                cleanup.run_now().await;
                Err(SandboxError::Unavailable(message))
            }
        }
    }

    async fn shutdown(&self) {
        self.retire().await;
        let cgroups = self.cgroups.clone();
        let _ = tokio::task::spawn_blocking(move || cgroups.remove_pool()).await;
    }

    /// Stops the zygote only: the pool's cgroups now hold the next template's sessions.
    async fn retire(&self) {
        if let Some(link) = self.link.lock().await.take() {
            link.alive.store(false, Ordering::SeqCst);
            if let Ok(mut process) = link.process.lock() {
                process.kill();
            }
        }
    }
}

/// Waits for the runner's hello and opens the session's data directory.
async fn connect(pid: i32, fd: OwnedFd, uid: u32, sandbox_id: &str) -> Result<(RunnerConnection<UnixStream>, DataDirStore), String> {
    let std_stream = std::os::unix::net::UnixStream::from(fd);
    std_stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    let stream = UnixStream::from_std(std_stream).map_err(|e| e.to_string())?;
    let (conn, _) = RunnerConnection::open(stream, SPAWN_TIMEOUT, sandbox_id).await?;
    Ok((conn, open_data_dir(pid, uid, sandbox_id)?))
}

/// The data tmpfs lives in the session's own mount namespace; reach it through the session's
/// root. Checking the owner makes sure the pid still is our session.
fn open_data_dir(pid: i32, uid: u32, sandbox_id: &str) -> Result<DataDirStore, String> {
    let path = format!("/proc/{pid}/root/mnt/data");
    let dir = nix::fcntl::open(path.as_str(), OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| format!("cannot open the data directory of session {sandbox_id}: {e}"))?;
    let owner = nix::sys::stat::fstat(&dir).map_err(|e| e.to_string())?.st_uid;
    if owner != uid {
        return Err(format!("the data directory of session {sandbox_id} has the wrong owner"));
    }
    Ok(DataDirStore::new(dir, uid, uid))
}

/// Lets every thread of `pid` run on every CPU the server may use.
fn allow_every_cpu(pid: i32) -> nix::Result<()> {
    let every_cpu = crate::cpu_gate::every_cpu();
    let threads =
        std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    for thread in threads.flatten() {
        if let Some(tid) = thread.file_name().to_str().and_then(|name| name.parse().ok()) {
            // A thread may have exited meanwhile.
            match nix::sched::sched_setaffinity(Pid::from_raw(tid), &every_cpu) {
                Ok(()) | Err(nix::Error::ESRCH) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Routes zygote events until the control channel closes.
async fn read_events(link: Arc<ZygoteLink>, cgroups: Arc<PoolCgroups>, uids: Arc<UidAllocator>, pool: String) {
    loop {
        let event = match recv_control(&link.control).await {
            Ok(Some((bytes, mut fds))) => match serde_json::from_slice::<ZygoteEvent>(&bytes) {
                Ok(event) => (event, fds.pop()),
                Err(e) => {
                    tracing::error!(pool = %pool, error = %e, "bad event from the zygote");
                    continue;
                }
            },
            Ok(None) => break,
            Err(e) => {
                tracing::error!(pool = %pool, error = %e, "zygote control channel failed");
                break;
            }
        };
        match event {
            (ZygoteEvent::Spawned { sandbox_id, pid }, Some(fd)) => {
                let (exit_tx, exit_rx) = watch::channel(None);
                link.children.lock().expect("children lock").insert(pid, exit_tx);
                let waiter = link.pending.lock().expect("pending lock").remove(&sandbox_id);
                let delivered = waiter.is_some_and(|waiter| waiter.send(Ok((pid, fd, exit_rx))).is_ok());
                if !delivered {
                    // Nobody waits any more (timed out or cancelled): do not leak the session.
                    let cleanup =
                        Cleanup { sandbox_id, uid: u32::MAX, cgroups: cgroups.clone(), uids: uids.clone(), done: AtomicBool::new(false) };
                    tokio::task::spawn_blocking(move || cleanup.kill_processes());
                }
            }
            (ZygoteEvent::Spawned { sandbox_id, .. }, None) => {
                tracing::error!(pool = %pool, %sandbox_id, "zygote reported a session without its socket");
            }
            (ZygoteEvent::SpawnFailed { sandbox_id, error }, _) => {
                if let Some(waiter) = link.pending.lock().expect("pending lock").remove(&sandbox_id) {
                    let _ = waiter.send(Err(error));
                }
            }
            (ZygoteEvent::Exited { pid, code, signal }, _) => {
                if let Some(exit) = link.children.lock().expect("children lock").remove(&pid) {
                    let status = match (code, signal) {
                        (_, Some(signal)) => ExitStatus::Signal(signal),
                        (Some(code), None) => ExitStatus::Code(code),
                        (None, None) => ExitStatus::Lost,
                    };
                    exit.send_replace(Some(status));
                }
            }
            (ZygoteEvent::Ready { .. } | ZygoteEvent::Survivor { .. } | ZygoteEvent::AdoptionDone { .. }, _) => {}
        }
    }
    // Stopped on purpose (`alive` already false: shutdown or retire) or died on its own.
    if link.alive.swap(false, Ordering::SeqCst) {
        tracing::error!(pool = %pool, "the zygote exited; its sessions are gone");
    } else {
        tracing::debug!(pool = %pool, "the zygote stopped");
    }
    for (_, exit) in link.children.lock().expect("children lock").drain() {
        exit.send_replace(Some(ExitStatus::Lost));
    }
    for (_, waiter) in link.pending.lock().expect("pending lock").drain() {
        let _ = waiter.send(Err("the zygote exited".into()));
    }
}

async fn send_control(control: &AsyncFd<OwnedFd>, bytes: &[u8], fd: Option<i32>) -> std::io::Result<()> {
    loop {
        let mut guard = control.writable().await?;
        match guard.try_io(|inner| crate::fdpass::send_datagram(inner.get_ref().as_raw_fd(), bytes, fd).map_err(std::io::Error::from)) {
            Ok(res) => return res,
            Err(_would_block) => continue,
        }
    }
}

async fn recv_control(control: &AsyncFd<OwnedFd>) -> std::io::Result<Option<crate::fdpass::Datagram>> {
    loop {
        let mut guard = control.readable().await?;
        match guard
            .try_io(|inner| crate::fdpass::recv_datagram(inner.get_ref().as_raw_fd(), MAX_CONTROL_MESSAGE).map_err(std::io::Error::from))
        {
            Ok(res) => return res,
            Err(_would_block) => continue,
        }
    }
}

/// Releases what a sandbox holds on the host: its cgroups (killing whatever still runs in
/// them) and its uid. Runs once.
struct Cleanup {
    sandbox_id: String,
    uid: u32,
    cgroups: Arc<PoolCgroups>,
    uids: Arc<UidAllocator>,
    done: AtomicBool,
}

impl Cleanup {
    fn kill_processes(&self) {
        if let Err(err) = self.cgroups.destroy_session(&self.sandbox_id) {
            tracing::error!(sandbox = %self.sandbox_id, error = %err, "could not clean up a session's cgroups");
            return;
        }
        // Only now is no process left running under the uid.
        if self.uid != u32::MAX {
            self.uids.release(self.uid);
        }
    }

    fn run_blocking(&self) {
        if !self.done.swap(true, Ordering::SeqCst) {
            self.kill_processes();
        }
    }

    async fn run_now(self) {
        let _ = tokio::task::spawn_blocking(move || self.run_blocking()).await;
    }
}

struct SandboxInner {
    id: String,
    /// The runner's pid on the host.
    runner_pid: i32,
    memory_limit: u64,
    /// Made for the ready queue: its cgroup starts at idle CPU priority.
    warming: bool,
    /// Set once the session serves an identifier, at the normal priority on every CPU.
    claimed: AtomicBool,
    conn: tokio::sync::Mutex<RunnerConnection<UnixStream>>,
    exit: watch::Receiver<Option<ExitStatus>>,
    cleanup: Cleanup,
}

/// One session process forked by the zygote.
pub struct ZygoteSandbox {
    inner: Arc<SandboxInner>,
    files: DataDirStore,
}

#[async_trait]
impl RunnerProcess for SandboxInner {
    fn is_alive(&self) -> bool {
        self.exit.borrow().is_none() && !self.cleanup.done.load(Ordering::SeqCst)
    }

    async fn ended(&self) {
        let mut exit = self.exit.clone();
        let _ = exit.wait_for(Option::is_some).await;
    }

    /// Works out why the session process is gone (waiting briefly for the zygote's report)
    /// and makes sure nothing of it keeps running.
    async fn death(&self) -> SandboxError {
        let mut exit = self.exit.clone();
        let status = match tokio::time::timeout(Duration::from_secs(2), exit.wait_for(Option::is_some)).await {
            Ok(Ok(status)) => *status,
            _ => None,
        };
        let oom = {
            let cgroups = self.cleanup.cgroups.clone();
            let id = self.id.clone();
            tokio::task::spawn_blocking(move || cgroups.oom_killed(&id)).await.unwrap_or(false)
        };
        let (cause, message) = match status {
            _ if oom => (
                DeathCause::OutOfMemory,
                format!("the session ran out of memory (limit {}) and was stopped", human_bytes(self.memory_limit)),
            ),
            Some(ExitStatus::Code(code)) => (DeathCause::Exited, format!("the session's Python process exited with code {code}")),
            Some(ExitStatus::Signal(signal)) => signal_death(signal),
            Some(ExitStatus::Lost) => (DeathCause::BackendLost, "the pool's zygote exited and took the session with it".to_owned()),
            None => (DeathCause::Crashed, "the session's Python process stopped responding".to_owned()),
        };
        SandboxError::Died { cause, message }
    }

    async fn kill(&self) {
        let cgroups = self.cleanup.cgroups.clone();
        let id = self.id.clone();
        // Kill only: the cgroup directories and the uid are released by `destroy`.
        let _ = tokio::task::spawn_blocking(move || cgroups.kill_session_processes(&id)).await;
    }
}

#[async_trait]
impl Sandbox for ZygoteSandbox {
    fn id(&self) -> &str {
        &self.inner.id
    }

    fn is_alive(&self) -> bool {
        self.inner.is_alive()
    }

    fn claim(&self) {
        if self.inner.claimed.swap(true, Ordering::Relaxed) {
            return;
        }
        // A few system calls: cheap enough to do inline on the request path.
        if self.inner.warming {
            if let Err(err) = self.inner.cleanup.cgroups.claim_session(&self.inner.id) {
                tracing::warn!(sandbox = %self.inner.id, error = %err, "could not raise a session's CPU priority");
            }
        }
        // Sessions inherit the zygote's CPUs, which the CPU gate may have narrowed.
        if let Err(err) = allow_every_cpu(self.inner.runner_pid) {
            tracing::warn!(sandbox = %self.inner.id, error = %err, "could not let a session use every CPU");
        }
    }

    async fn execute(&self, cell: Cell) -> Result<CellOutcome, SandboxError> {
        // Run the exchange on its own task: a caller that goes away mid-execution must not
        // leave the session's stream half-read.
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let _executing = crate::cpu_gate::executing();
            let mut conn = inner.conn.lock().await;
            conn.execute(cell, inner.as_ref()).await
        })
        .await
        .unwrap_or_else(|e| Err(SandboxError::Internal(format!("execution task failed: {e}"))))
    }

    fn files(&self) -> Option<&dyn FileStore> {
        Some(&self.files)
    }

    /// Why the session ended, from the zygote's report (for sessions that died while idle;
    /// an execution learns it in more detail, out-of-memory included).
    fn death(&self) -> Option<(DeathCause, String)> {
        let status = *self.inner.exit.borrow();
        status.map(|status| match status {
            ExitStatus::Code(code) => (DeathCause::Exited, format!("the session's Python process exited with code {code}")),
            ExitStatus::Signal(signal) => signal_death(signal),
            ExitStatus::Lost => (DeathCause::BackendLost, "the pool's zygote exited and took the session with it".to_owned()),
        })
    }

    async fn destroy(&self) {
        let inner = self.inner.clone();
        let _ = tokio::task::spawn_blocking(move || inner.cleanup.run_blocking()).await;
    }
}

impl Drop for SandboxInner {
    fn drop(&mut self) {
        if !self.cleanup.done.load(Ordering::SeqCst) {
            // Dropped without `destroy` (for example a ready sandbox at shutdown): clean up
            // on a plain thread, since there may be no runtime to spawn on.
            let cleanup = Cleanup {
                sandbox_id: self.cleanup.sandbox_id.clone(),
                uid: self.cleanup.uid,
                cgroups: self.cleanup.cgroups.clone(),
                uids: self.cleanup.uids.clone(),
                done: AtomicBool::new(false),
            };
            self.cleanup.done.store(true, Ordering::SeqCst);
            std::thread::spawn(move || cleanup.run_blocking());
        }
    }
}

fn human_bytes(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    if bytes >= GIB && bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

fn signal_death(signal: i32) -> (DeathCause, String) {
    if signal == libc::SIGXCPU {
        return (DeathCause::Crashed, "the session used up its CPU time limit (max_cpu_seconds) and was stopped".to_owned());
    }
    (DeathCause::Crashed, format!("the session's Python process was killed by signal {}", signal_name(signal)))
}

fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal).map(|s| s.as_str().to_owned()).unwrap_or_else(|_| signal.to_string())
}
