//! Python code-interpreter pools under gVisor (`runtime = "runsc"` on a PythonLTS pool).
//!
//! The zygote backend forks sessions from a warm interpreter and confines them with the
//! host kernel's own mechanisms; gVisor instead puts a user-space kernel between the code and
//! the host, for operators who want that stronger boundary and can pay its price (each
//! session is a `runsc` sandbox of its own, and imports its libraries itself, which the ready
//! queue hides).
//!
//! A session is a container (see `factory::ContainerSandbox`) whose root is a read-only
//! skeleton shared by the pool's sessions (`<run dir>/gvisor-root-<generation>`: each
//! template's backend has its own): the host's `/usr` and the Python runtime bound
//! read-only, a curated `/etc`, and the runner. Its `/mnt/data` is a private tmpfs on the
//! host, bound in, so the files API works on it from the host exactly as for zygote
//! sessions; `/tmp` is a tmpfs inside gVisor. The runner (`container_serve` in `runner.py`)
//! imports the pool's modules, then serves TCP connections one at a time on loopback in the
//! session's own network namespace, where only the server (and the session itself) can
//! connect, speaking the same protocol as a zygote session (`sandpool_sandbox::runner_link`).
//! After a server crash it waits for the next connection: the restarted server adopts the
//! running containers and reconnects (`adopt_survivors`).

use std::net::SocketAddr;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use sandpool_engine::backend::{Cell, CellOutcome, DeathCause, FileStore, Purpose, RuntimeInfo, Sandbox, SandboxError, SandboxFactory};
use sandpool_sandbox::driver::{session_env, ETC_ENTRIES};
use sandpool_sandbox::files::DataDirStore;
use sandpool_sandbox::runner_link::{RunnerConnection, RunnerProcess, RUNNER_SOURCE};
use sandpool_sandbox::runtime::{PythonRuntime, SharedRuntime};
use sandpool_sandbox::uids::UidAllocator;
use tokio::net::TcpStream;

use crate::factory::{clean_up_leftovers, remove_pool_cgroups, ContainerSandbox, SessionRoot};
use crate::runtime::{OciRuntime, RuntimeKind};
use crate::spec::{ContainerSpec, Mount, RootFs};

/// The runner's port on the session's own loopback (closed again once the server is in).
const RUNNER_PORT: u16 = 49_999;
/// Where the runner's source sits in the skeleton.
const RUNNER_PATH: &str = "opt/sandpool/runner.py";
/// How long a session may take to import its libraries and accept the server. Imports run
/// several times slower under gVisor's ptrace platform than natively.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(180);
/// Skeleton directories are `<run dir>/gvisor-root-<generation>`.
const SKELETON_PREFIX: &str = "gvisor-root-";
/// Top-level entries of the host root that merged-usr systems make links into `/usr`.
const TOP_LEVEL: &[&str] = &["bin", "lib", "lib32", "lib64", "libx32", "sbin"];

/// A gVisor Python pool's settings, validated by the caller.
#[derive(Debug, Clone)]
pub struct GvisorPythonSettings {
    pub pool: String,
    pub memory_bytes: u64,
    pub cpus: f64,
    pub max_processes: u64,
    pub max_open_files: u64,
    pub data_dir_bytes: u64,
    pub tmp_dir_bytes: u64,
    /// Modules every session imports before it is ready.
    pub preload_modules: Vec<String>,
    /// Cap on each captured output stream, in characters.
    pub output_cap: usize,
    /// `<state>/run/<pool>`: the skeleton root, bundles and the runtime's state.
    pub run_dir: PathBuf,
    /// The cgroup under which each session's cgroup is created.
    pub cgroup_parent: String,
    /// Remove what an earlier run left (containers, skeletons, cgroups) at start. Off when
    /// the pool's previous template still has live sessions there.
    pub clean_up_leftovers: bool,
}

/// What `start` resolved once for every session.
struct Prepared {
    runtime: OciRuntime,
    template: ContainerSpec,
}

pub struct GvisorPythonFactory {
    settings: GvisorPythonSettings,
    python: Arc<SharedRuntime>,
    uids: Arc<UidAllocator>,
    prepared: OnceLock<Prepared>,
    /// The session `start` made to learn the runtime's versions (and to prove the pool
    /// works), handed to the first `create`.
    spare: Mutex<Option<GvisorPythonSandbox>>,
    /// Names this backend's skeleton directory.
    generation: String,
    /// Sessions a previous server left running, found by `start`.
    survivors: Mutex<Vec<GvisorPythonSandbox>>,
}

impl GvisorPythonFactory {
    pub fn new(settings: GvisorPythonSettings, python: Arc<SharedRuntime>, uids: Arc<UidAllocator>) -> GvisorPythonFactory {
        let generation = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        GvisorPythonFactory {
            settings,
            python,
            uids,
            prepared: OnceLock::new(),
            spare: Mutex::new(None),
            generation,
            survivors: Mutex::new(Vec::new()),
        }
    }

    fn containers_dir(&self) -> PathBuf {
        self.settings.run_dir.join("containers")
    }

    /// This backend's own skeleton: a pool whose template changes runs two backends for a
    /// while, each with its sessions' root.
    fn skeleton_dir(&self) -> PathBuf {
        self.settings.run_dir.join(format!("{SKELETON_PREFIX}{}", self.generation))
    }

    /// The spec every session starts from: the skeleton as a read-only root, the runtime's
    /// binds, `/tmp`, no capabilities, and the runner as the process.
    fn template(&self, python: &PythonRuntime, binds: Vec<Mount>) -> ContainerSpec {
        let args = serde_json::json!({
            "port": RUNNER_PORT,
            "output_cap": self.settings.output_cap,
            "preload": self.settings.preload_modules,
        });
        let bootstrap = format!(
            "import sys, types\n\
             _m = types.ModuleType('_sandpool_runner')\n\
             exec(compile(open('/{RUNNER_PATH}').read(), '<sandpool-runner>', 'exec'), _m.__dict__)\n\
             sys.modules['_sandpool_runner'] = _m\n\
             _m.container_serve({args})\n",
            args = serde_json::Value::String(args.to_string()),
        );
        let mut extra_mounts = binds;
        extra_mounts.push(Mount::Tmpfs { destination: "/tmp".into(), bytes: self.settings.tmp_dir_bytes });
        ContainerSpec {
            args: vec![python.in_sandbox(&python.venv_python).display().to_string(), "-c".into(), bootstrap],
            env: session_env(python).into_iter().map(|(name, value)| format!("{name}={value}")).collect(),
            cwd: "/mnt/data".into(),
            uid: 0,
            gid: 0,
            hostname: String::new(),
            memory_bytes: self.settings.memory_bytes,
            cpus: self.settings.cpus,
            max_processes: self.settings.max_processes,
            max_open_files: self.settings.max_open_files,
            netns_path: String::new(),
            cgroups_path: String::new(),
            filter_clone_flags: false,
            user_namespace: None,
            root: RootFs::SharedReadOnly(self.skeleton_dir()),
            extra_mounts,
            capabilities: false,
        }
    }

    /// Takes over the sessions a previous server of this state directory left running: their
    /// runners wait for a new connection. Returns them and the skeleton directories they run
    /// on (to keep).
    async fn adopt_survivors(&self, runtime: &OciRuntime) -> (Vec<GvisorPythonSandbox>, Vec<PathBuf>) {
        let mut adopted = Vec::new();
        let mut skeletons = Vec::new();
        for id in runtime.known_containers() {
            let container = match ContainerSandbox::adopt(&id, &self.containers_dir(), &self.settings.cgroup_parent, RUNNER_PORT, runtime) {
                Ok(Some(container)) => container,
                Ok(None) => continue,
                Err(err) => {
                    tracing::warn!(pool = %self.settings.pool, container = %id, "cannot adopt a surviving session: {err}");
                    continue;
                }
            };
            let spec = container.bundle_spec().unwrap_or_default();
            let uid = spec.pointer("/process/user/uid").and_then(serde_json::Value::as_u64).map(|uid| uid as u32);
            let Some(uid) = uid.filter(|uid| self.uids.adopt(*uid)) else {
                tracing::warn!(pool = %self.settings.pool, container = %id, "a surviving session's user is not this server's; not adopting it");
                container.destroy().await;
                continue;
            };
            let attached = async {
                let (conn, _) = connect_runner(&container, Duration::from_secs(10)).await?;
                Ok::<_, String>((conn, data_store(&container, uid)?))
            };
            match attached.await {
                Ok((conn, files)) => {
                    if let Some(root) = spec.pointer("/root/path").and_then(serde_json::Value::as_str) {
                        skeletons.push(PathBuf::from(root));
                    }
                    let inner = Arc::new(Inner {
                        container,
                        conn: tokio::sync::Mutex::new(conn),
                        memory_bytes: self.settings.memory_bytes,
                        uid,
                        uids: self.uids.clone(),
                        released: AtomicBool::new(false),
                    });
                    adopted.push(GvisorPythonSandbox { inner, files });
                }
                Err(err) => {
                    tracing::warn!(pool = %self.settings.pool, container = %id, "cannot reconnect to a surviving session: {err}");
                    container.destroy().await;
                    self.uids.release(uid);
                }
            }
        }
        if !adopted.is_empty() {
            tracing::info!(pool = %self.settings.pool, sessions = adopted.len(), "adopted the gVisor sessions a previous server left running");
        }
        (adopted, skeletons)
    }

    /// Starts one session and waits until its runner is connected.
    async fn launch(&self) -> Result<(GvisorPythonSandbox, RuntimeInfo), SandboxError> {
        let prepared = self.prepared.get().ok_or_else(|| SandboxError::Internal("the gVisor Python pool has not started".into()))?;
        let uid = self.uids.allocate().ok_or_else(|| SandboxError::Unavailable("every session user id is in use".into()))?;
        let container = ContainerSandbox::new(&self.containers_dir(), &self.settings.cgroup_parent, RUNNER_PORT, prepared.runtime.clone());
        let mut template = prepared.template.clone();
        (template.uid, template.gid) = (uid, uid);
        let root = SessionRoot::SharedWithData { bytes: self.settings.data_dir_bytes, owner: uid };
        let started = async {
            container.start_container(&template, &root, None).await?;
            let (conn, hello) = connect_runner(&container, STARTUP_TIMEOUT).await?;
            Ok::<_, String>((conn, hello, data_store(&container, uid)?))
        };
        match started.await {
            Ok((conn, hello, files)) => {
                let info = RuntimeInfo {
                    language: "python".into(),
                    language_version: hello.python_version.unwrap_or_default(),
                    packages: hello.packages,
                    started_at: SystemTime::now(),
                };
                let inner = Arc::new(Inner {
                    container,
                    conn: tokio::sync::Mutex::new(conn),
                    memory_bytes: self.settings.memory_bytes,
                    uid,
                    uids: self.uids.clone(),
                    released: AtomicBool::new(false),
                });
                Ok((GvisorPythonSandbox { inner, files }, info))
            }
            Err(err) => {
                container.destroy().await;
                self.uids.release(uid);
                tracing::warn!(pool = %self.settings.pool, "a gVisor Python session could not start: {err}");
                Err(SandboxError::Unavailable(format!("the session's gVisor sandbox could not start: {err}")))
            }
        }
    }
}

/// The files API's view of a session's `/mnt/data` (the host tmpfs bound into it).
fn data_store(container: &ContainerSandbox, uid: u32) -> Result<DataDirStore, String> {
    let data = nix::fcntl::open(&container.data_dir(), OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| format!("cannot open the session's data directory: {e}"))?;
    Ok(DataDirStore::new(data, uid, uid))
}

/// Connects to the runner once it listens (it first imports the pool's modules) and reads
/// its hello.
async fn connect_runner(
    container: &ContainerSandbox,
    timeout: Duration,
) -> Result<(RunnerConnection<TcpStream>, sandpool_sandbox::protocol::RunnerHello), String> {
    let netns = container.netns().ok_or("the session's container has no network namespace")?;
    let address = SocketAddr::from(([127, 0, 0, 1], RUNNER_PORT));
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !container.is_alive() {
            return Err(format!("the session's Python process exited during start-up; its output ends with: {}", container.console_tail()));
        }
        match netns.connect_async(address, Duration::from_secs(1)).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                let left = deadline.saturating_duration_since(tokio::time::Instant::now()).max(Duration::from_secs(5));
                return RunnerConnection::open(stream, left, container.id())
                    .await
                    .map_err(|err| format!("{err}; the session's output ends with: {}", container.console_tail()));
            }
            Err(err) if tokio::time::Instant::now() >= deadline => {
                return Err(format!(
                    "the session's runner did not accept a connection within {} s ({err}); its output ends with: {}",
                    timeout.as_secs(),
                    container.console_tail()
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[async_trait]
impl SandboxFactory for GvisorPythonFactory {
    async fn start(&self) -> Result<RuntimeInfo, SandboxError> {
        let settings = &self.settings;
        let runtime = OciRuntime::locate(RuntimeKind::Runsc, settings.run_dir.join("runtime")).await.map_err(SandboxError::Unavailable)?;
        if settings.clean_up_leftovers {
            // Sessions a crashed server left running wait for a new connection: adopt them,
            // and keep the skeletons they run on.
            let (adopted, skeletons) = self.adopt_survivors(&runtime).await;
            let keep = adopted.iter().map(|sandbox| sandbox.id().to_owned()).collect();
            clean_up_leftovers(&settings.pool, &runtime, &self.containers_dir(), &settings.cgroup_parent, &keep).await;
            remove_skeletons(&settings.run_dir, &skeletons);
            *self.survivors.lock().expect("survivors lock") = adopted;
        }
        let python = self
            .python
            .get()
            .await
            .map_err(|e| SandboxError::Unavailable(format!("the Python runtime for pool '{}' is not available: {e}", settings.pool)))?;
        let skeleton = self.skeleton_dir();
        let python_for_build = python.clone();
        let binds = tokio::task::spawn_blocking(move || build_skeleton(&skeleton, &python_for_build))
            .await
            .map_err(|e| SandboxError::Internal(e.to_string()))?
            .map_err(|e| SandboxError::Unavailable(format!("cannot build the root of pool '{}': {e}", settings.pool)))?;
        std::fs::create_dir_all(self.containers_dir())
            .map_err(|e| SandboxError::Internal(format!("cannot create {}: {e}", self.containers_dir().display())))?;
        let template = self.template(&python, binds);
        let _ = self.prepared.set(Prepared { runtime, template });
        tracing::info!(pool = %settings.pool, "starting a first gVisor Python session (it imports the pool's modules)");
        let (sandbox, info) = self.launch().await?;
        tracing::info!(pool = %settings.pool, python = %info.language_version, "gVisor Python pool ready");
        *self.spare.lock().expect("spare lock") = Some(sandbox);
        Ok(info)
    }

    async fn create(&self, _purpose: Purpose) -> Result<Arc<dyn Sandbox>, SandboxError> {
        let spare = self.spare.lock().expect("spare lock").take();
        if let Some(sandbox) = spare {
            if sandbox.is_alive() {
                return Ok(Arc::new(sandbox));
            }
            sandbox.destroy().await;
        }
        Ok(Arc::new(self.launch().await?.0))
    }

    fn adopted(&self) -> Vec<Arc<dyn Sandbox>> {
        let survivors = std::mem::take(&mut *self.survivors.lock().expect("survivors lock"));
        survivors.into_iter().map(|sandbox| Arc::new(sandbox) as Arc<dyn Sandbox>).collect()
    }

    async fn shutdown(&self) {
        self.retire().await;
        remove_pool_cgroups(&self.settings.cgroup_parent).await;
        // Skeletons of adopted sessions (an earlier backend's) are not needed any more.
        remove_skeletons(&self.settings.run_dir, &[]);
    }

    async fn retire(&self) {
        let spare = self.spare.lock().expect("spare lock").take();
        if let Some(sandbox) = spare {
            sandbox.destroy().await;
        }
        let skeleton = self.skeleton_dir();
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(skeleton)).await;
    }
}

/// Builds the pool's read-only root: mount points for the host's `/usr` (and its top-level
/// links), the runtime, `/etc` entries, `/tmp` and `/mnt/data`, and the runner itself.
/// Returns the bind mounts that fill it.
fn build_skeleton(root: &Path, python: &PythonRuntime) -> std::io::Result<Vec<Mount>> {
    if root.exists() {
        std::fs::remove_dir_all(root).map_err(annotate(root))?;
    }
    let mut binds = vec![Mount::Bind { source: "/usr".into(), destination: "/usr".into(), writable: false }];
    for dir in ["usr", "etc", "tmp", "mnt/data", "proc", "dev", "sys", "opt/sandpool"] {
        std::fs::create_dir_all(root.join(dir)).map_err(annotate(&root.join(dir)))?;
    }
    for name in TOP_LEVEL {
        let host = Path::new("/").join(name);
        match std::fs::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() => symlink(std::fs::read_link(&host)?, root.join(name)).map_err(annotate(&host))?,
            Ok(meta) if meta.is_dir() => {
                std::fs::create_dir(root.join(name)).map_err(annotate(&host))?;
                binds.push(Mount::Bind { source: host.clone(), destination: format!("/{name}"), writable: false });
            }
            _ => {}
        }
    }
    for bind in python.binds() {
        // Under /usr, the /usr bind has it already.
        if bind.host == bind.inside && bind.inside.starts_with("/usr") {
            continue;
        }
        let point = root.join(bind.inside.strip_prefix("/").unwrap_or(&bind.inside));
        std::fs::create_dir_all(&point).map_err(annotate(&point))?;
        binds.push(Mount::Bind { source: bind.host.clone(), destination: bind.inside.display().to_string(), writable: false });
    }
    for name in ETC_ENTRIES {
        let host = Path::new("/etc").join(name);
        // Follows links: the mount point must match what the bind will show.
        let Ok(meta) = std::fs::metadata(&host) else { continue };
        let point = root.join("etc").join(name);
        if meta.is_dir() {
            std::fs::create_dir(&point).map_err(annotate(&point))?;
        } else {
            std::fs::File::create(&point).map_err(annotate(&point))?;
        }
        binds.push(Mount::Bind { source: host, destination: format!("/etc/{name}"), writable: false });
    }
    std::fs::write(root.join(RUNNER_PATH), RUNNER_SOURCE).map_err(annotate(&root.join(RUNNER_PATH)))?;
    Ok(binds)
}

/// Removes every skeleton an earlier run left in `run_dir`, except those adopted sessions run on.
fn remove_skeletons(run_dir: &Path, keep: &[PathBuf]) {
    for entry in std::fs::read_dir(run_dir).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(SKELETON_PREFIX) && !keep.contains(&entry.path()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Adds the path to an I/O error's message.
fn annotate(path: &Path) -> impl FnOnce(std::io::Error) -> std::io::Error + '_ {
    move |err| std::io::Error::new(err.kind(), format!("{}: {err}", path.display()))
}

/// State shared with the execution task.
struct Inner {
    container: Arc<ContainerSandbox>,
    conn: tokio::sync::Mutex<RunnerConnection<TcpStream>>,
    memory_bytes: u64,
    uid: u32,
    uids: Arc<UidAllocator>,
    released: AtomicBool,
}

/// One gVisor Python session.
pub struct GvisorPythonSandbox {
    inner: Arc<Inner>,
    files: DataDirStore,
}

#[async_trait]
impl RunnerProcess for Inner {
    fn is_alive(&self) -> bool {
        self.container.is_alive()
    }

    async fn ended(&self) {
        self.container.ended().await
    }

    async fn kill(&self) {
        self.container.stop(DeathCause::Crashed, "the session was stopped by sandpool".into()).await;
    }

    async fn death(&self) -> SandboxError {
        // The stream may break a moment before the exit watcher reports the end.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.container.ended()).await;
        let (cause, message) = match self.container.death() {
            Some((DeathCause::OutOfMemory, _)) => {
                (DeathCause::OutOfMemory, format!("the session ran out of memory (limit {} MiB) and was stopped", self.memory_bytes >> 20))
            }
            Some((DeathCause::Exited, _)) => (DeathCause::Exited, "the session's Python process exited".to_owned()),
            Some(other) => other,
            None => (DeathCause::Crashed, "the session's Python process stopped responding".to_owned()),
        };
        SandboxError::Died { cause, message }
    }
}

#[async_trait]
impl Sandbox for GvisorPythonSandbox {
    fn id(&self) -> &str {
        self.inner.container.id()
    }

    fn is_alive(&self) -> bool {
        self.inner.container.is_alive()
    }

    async fn execute(&self, cell: Cell) -> Result<CellOutcome, SandboxError> {
        // On its own task: a caller that goes away mid-execution must not leave the
        // session's stream half-read.
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut conn = inner.conn.lock().await;
            conn.execute(cell, inner.as_ref()).await
        })
        .await
        .unwrap_or_else(|e| Err(SandboxError::Internal(format!("execution task failed: {e}"))))
    }

    fn files(&self) -> Option<&dyn FileStore> {
        Some(&self.files)
    }

    fn death(&self) -> Option<(DeathCause, String)> {
        self.inner.container.death()
    }

    async fn destroy(&self) {
        self.inner.container.destroy().await;
        // Only now does nothing run under the uid any more.
        if !self.inner.released.swap(true, Ordering::SeqCst) {
            self.inner.uids.release(self.inner.uid);
        }
    }
}
