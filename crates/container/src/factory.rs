//! The engine's [`SandboxFactory`] and [`Sandbox`] for custom container pools.
//!
//! At pool start the runtime is located and the image fetched and unpacked (so a missing
//! runtime or image is an error at pool creation, not at the first request). Each session
//! then gets, under `<run dir>/containers/<id>/`:
//! * `scratch/`: a tmpfs of the pool's writable-layer size holding the overlay's upper and
//!   work directories and the container's console log; its pages are charged to whoever
//!   writes them, so the container pays for its own files;
//! * `bundle/rootfs`: an overlay of the unpacked image (read-only lower) and that upper;
//! * `bundle/config.json`: the runtime spec (see `spec`);
//! * a network namespace with only loopback, where the proxy and the probes connect; in an
//!   egress-enabled pool also a veth to the host (see `egress`).
//!
//! A session is ready when its startup probe passes (or, without one, when its target port
//! accepts a connection). Its main process is watched through a pidfd; a liveness probe
//! that fails too often stops it. Either way the engine sees a dead sandbox and replaces it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use async_trait::async_trait;
use sandpool_engine::backend::{
    Cell, CellOutcome, DeathCause, FileStore, Purpose, RuntimeInfo, Sandbox, SandboxError, SandboxFactory, Upstream,
};
use sandpool_sandbox::netns::NetNamespace;
use sandpool_sandbox::pidfd::ProcessWatch;

use crate::egress::{EgressAttachment, EgressNetwork};
use crate::image::{ImageSource, ImageStore, RegistryAuth};
use crate::probe::{Probe, ProbeKind};
use crate::runtime::{OciRuntime, RuntimeKind};
use crate::spec::{ContainerSpec, Mount, RootFs};

/// The console log's name in a session's directory (inside the scratch tmpfs).
pub const CONSOLE_LOG: &str = "scratch/console.log";
/// How long a session may take to open its port when no startup probe says otherwise.
const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the proxy waits for a connection to a session's port.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A container pool's settings, validated by the caller.
#[derive(Debug, Clone)]
pub struct ContainerPoolSettings {
    pub pool: String,
    pub image: ImageSource,
    pub registry_auth: Option<RegistryAuth>,
    /// Registries reached over plain HTTP (besides loopback ones).
    pub insecure_registries: Vec<String>,
    pub runtime: RuntimeKind,
    /// Replaces the image's entrypoint when not empty.
    pub command: Vec<String>,
    /// Replaces the image's cmd when not empty (or when `command` is given).
    pub args: Vec<String>,
    /// Set after the image's environment (secrets included, already resolved).
    pub env: Vec<(String, String)>,
    pub target_port: u16,
    pub memory_bytes: u64,
    pub cpus: f64,
    pub max_processes: u64,
    pub max_open_files: u64,
    /// Size of each session's writable layer (its overlay upper and console log).
    pub writable_layer_bytes: u64,
    pub probes: Vec<Probe>,
    /// `<state>/run/<pool>`: bundles and the runtime's state.
    pub run_dir: PathBuf,
    /// `<state>/images`: the image store, shared by every pool.
    pub images_dir: PathBuf,
    /// Host id of container root, for crun pools: sessions run in a user namespace mapping
    /// `0..65536` there, and the image is unpacked with its owners shifted to match. `None`
    /// runs container root as host root (minus capabilities); runsc pools ignore it.
    pub user_namespace: Option<u32>,
    /// The cgroup under which each session's cgroup is created, e.g. `/sandpool-1234abcd-containers/web`.
    pub cgroup_parent: String,
    /// Set for `EgressEnabled` pools: the server's egress network, shared by its pools.
    pub egress: Option<Arc<EgressNetwork>>,
    /// Remove what an earlier run left in the pool's directories and cgroups at start.
    /// Off when the pool's previous template still has live sessions there.
    pub clean_up_leftovers: bool,
}

/// What `start` resolved once for every session.
struct Prepared {
    runtime: OciRuntime,
    /// The spec every session starts from (`start_container` fills in the per-session parts).
    template: ContainerSpec,
    root: SessionRoot,
}

/// How a session's root filesystem is made.
#[derive(Debug, Clone)]
pub(crate) enum SessionRoot {
    /// An overlay of an unpacked image (`lower`) over a private upper layer on a tmpfs of
    /// `writable_bytes`; with a user namespace, the upper directory belongs to its root.
    ImageOverlay { lower: PathBuf, writable_bytes: u64, user_namespace: Option<u32> },
    /// The spec's own read-only root, plus a private data tmpfs of `bytes`, owned by
    /// `owner`, at `/mnt/data` (gVisor Python sessions). The host reaches it at
    /// [`ContainerSandbox::data_dir`].
    SharedWithData { bytes: u64, owner: u32 },
}

pub struct ContainerFactory {
    settings: ContainerPoolSettings,
    prepared: OnceLock<Arc<Prepared>>,
    /// Containers a previous server left running, found by `start`.
    survivors: Mutex<Vec<Arc<ContainerSandbox>>>,
}

impl ContainerFactory {
    pub fn new(settings: ContainerPoolSettings) -> ContainerFactory {
        ContainerFactory { settings, prepared: OnceLock::new(), survivors: Mutex::new(Vec::new()) }
    }

    /// The user namespace's host id, where it applies (crun; gVisor has its own user model).
    fn user_namespace(&self) -> Option<u32> {
        self.settings.user_namespace.filter(|_| self.settings.runtime == RuntimeKind::Crun)
    }

    fn containers_dir(&self) -> PathBuf {
        self.settings.run_dir.join("containers")
    }

    /// The containers a previous server of this state directory left running (it crashed),
    /// taken over: their namespace, exit watch and liveness probe. Egress-enabled sessions
    /// are not adopted (their veth belongs to the old server's network): the caller removes
    /// them with the other leftovers.
    async fn adopt_survivors(&self, runtime: &OciRuntime) -> Vec<Arc<ContainerSandbox>> {
        if self.settings.egress.is_some() {
            return Vec::new();
        }
        let mut adopted = Vec::new();
        for id in runtime.known_containers() {
            let adopting =
                ContainerSandbox::adopt(&id, &self.containers_dir(), &self.settings.cgroup_parent, self.settings.target_port, runtime);
            let sandbox = match adopting {
                Ok(Some(sandbox)) => sandbox,
                Ok(None) => continue,
                Err(err) => {
                    tracing::warn!(pool = %self.settings.pool, container = %id, "cannot adopt a surviving container: {err}");
                    continue;
                }
            };
            if let Some(liveness) = self.settings.probes.iter().find(|p| p.kind == ProbeKind::Liveness).cloned() {
                let task = tokio::spawn(sandbox.clone().watch_liveness(liveness));
                sandbox.tasks.lock().expect("tasks lock").push(task);
            }
            adopted.push(sandbox);
        }
        if !adopted.is_empty() {
            tracing::info!(pool = %self.settings.pool, containers = adopted.len(), "adopted the containers a previous server left running");
        }
        adopted
    }
}

#[async_trait]
impl SandboxFactory for ContainerFactory {
    async fn start(&self) -> Result<RuntimeInfo, SandboxError> {
        let settings = &self.settings;
        let runtime = OciRuntime::locate(settings.runtime, settings.run_dir.join("runtime")).await.map_err(SandboxError::Unavailable)?;
        if settings.clean_up_leftovers {
            let adopted = self.adopt_survivors(&runtime).await;
            let keep = adopted.iter().map(|sandbox| sandbox.id.clone()).collect();
            clean_up_leftovers(&settings.pool, &runtime, &self.containers_dir(), &settings.cgroup_parent, &keep).await;
            *self.survivors.lock().expect("survivors lock") = adopted;
        }
        std::fs::create_dir_all(self.containers_dir())
            .map_err(|e| SandboxError::Internal(format!("cannot create {}: {e}", self.containers_dir().display())))?;
        tracing::info!(pool = %settings.pool, image = %settings.image, runtime = runtime.version(), "preparing the pool's image");
        let store = match self.user_namespace() {
            Some(host_id) => ImageStore::with_owner_offset(settings.images_dir.clone(), host_id),
            None => ImageStore::new(settings.images_dir.clone()),
        };
        let image = store
            .prepare(&settings.image, settings.registry_auth.as_ref(), &settings.insecure_registries)
            .await
            .map_err(|e| SandboxError::Unavailable(e.to_string()))?;
        let args = container_args(&settings.command, &settings.args, &image.config.entrypoint, &image.config.cmd).ok_or_else(|| {
            SandboxError::Unavailable(format!("image {} has no entrypoint or cmd, and the pool sets no command", settings.image))
        })?;
        let env = merge_env(&image.config.env, &settings.env);
        let (uid, gid) = resolve_user(&image.rootfs, image.config.user.as_deref()).map_err(SandboxError::Unavailable)?;
        let cwd = image.config.working_dir.clone().filter(|dir| !dir.is_empty()).unwrap_or_else(|| "/".into());
        tracing::info!(pool = %settings.pool, digest = %image.digest, "image ready");
        let info = RuntimeInfo {
            language: "container".into(),
            language_version: format!("{} ({})", image.digest, runtime.version()),
            packages: Vec::new(),
            started_at: SystemTime::now(),
        };
        let user_namespace = self.user_namespace();
        let template = ContainerSpec {
            args,
            env,
            cwd,
            uid,
            gid,
            hostname: String::new(),
            memory_bytes: settings.memory_bytes,
            cpus: settings.cpus,
            max_processes: settings.max_processes,
            max_open_files: settings.max_open_files,
            netns_path: String::new(),
            cgroups_path: String::new(),
            filter_clone_flags: runtime.kind() == RuntimeKind::Crun,
            user_namespace,
            root: RootFs::Bundle,
            extra_mounts: Vec::new(),
            capabilities: true,
        };
        let root = SessionRoot::ImageOverlay { lower: image.rootfs.clone(), writable_bytes: settings.writable_layer_bytes, user_namespace };
        let _ = self.prepared.set(Arc::new(Prepared { runtime, template, root }));
        Ok(info)
    }

    async fn create(&self, _purpose: Purpose) -> Result<Arc<dyn Sandbox>, SandboxError> {
        let prepared = self.prepared.get().cloned().ok_or_else(|| SandboxError::Internal("the container pool has not started".into()))?;
        let sandbox = ContainerSandbox::new(
            &self.containers_dir(),
            &self.settings.cgroup_parent,
            self.settings.target_port,
            prepared.runtime.clone(),
        );
        if let Err(err) = sandbox.clone().launch(&self.settings, &prepared).await {
            sandbox.destroy().await;
            tracing::warn!(pool = %self.settings.pool, "a session could not start: {err}");
            return Err(SandboxError::Unavailable(format!("the session's container could not start: {err}")));
        }
        Ok(sandbox)
    }

    fn adopted(&self) -> Vec<Arc<dyn Sandbox>> {
        std::mem::take(&mut *self.survivors.lock().expect("survivors lock"))
            .into_iter()
            .map(|sandbox| sandbox as Arc<dyn Sandbox>)
            .collect()
    }

    /// Called after the pool destroyed its sandboxes: removes the pool's (now empty) cgroups.
    async fn shutdown(&self) {
        remove_pool_cgroups(&self.settings.cgroup_parent).await;
    }
}

/// Removes what a previous run of the server left for a pool: containers, mounts,
/// directories and cgroups, except the sessions in `keep` (adopted).
pub(crate) async fn clean_up_leftovers(
    pool: &str,
    runtime: &OciRuntime,
    containers_dir: &Path,
    cgroup_parent: &str,
    keep: &std::collections::HashSet<String>,
) {
    for id in runtime.known_containers().into_iter().filter(|id| !keep.contains(id)) {
        tracing::info!(pool, container = %id, "removing a container left by a previous run");
        runtime.remove(&id).await;
    }
    if let Ok(entries) = std::fs::read_dir(containers_dir) {
        for entry in entries.flatten().filter(|entry| !keep.contains(&*entry.file_name().to_string_lossy())) {
            remove_session_dir(&entry.path());
        }
    }
    // Cgroups that still hold processes (the adopted sessions') are not removed.
    remove_cgroups(cgroup_parent, true);
}

/// Removes a pool's cgroups once its sessions are gone: the pool level, then the server's
/// `<instance>-containers` level too, once its last pool is gone (removing a non-empty
/// cgroup fails harmlessly).
pub(crate) async fn remove_pool_cgroups(cgroup_parent: &str) {
    let parent = cgroup_parent.to_owned();
    let _ = tokio::task::spawn_blocking(move || {
        remove_cgroups(&parent, true);
        remove_cgroups(&parent, false);
        if let Some((instance_level, _)) = parent.rsplit_once('/').filter(|(level, _)| !level.is_empty()) {
            remove_cgroups(instance_level, false);
        }
    })
    .await;
}

/// One session's container.
pub struct ContainerSandbox {
    id: String,
    dir: PathBuf,
    cgroups_path: String,
    target_port: u16,
    runtime: OciRuntime,
    netns: OnceLock<NetNamespace>,
    /// The session's veth, in an egress-enabled pool; released by `destroy`.
    egress: Mutex<Option<EgressAttachment>>,
    /// Becomes true once the container has ended (or was stopped for failing its probe).
    exited: Arc<watch::Sender<bool>>,
    death: Arc<Mutex<Option<(DeathCause, String)>>>,
    destroyed: AtomicBool,
    /// The exit watcher and the liveness prober.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl ContainerSandbox {
    /// A session not started yet, with a fresh id; its files go to `containers_dir/<id>`.
    pub(crate) fn new(containers_dir: &Path, cgroup_parent: &str, target_port: u16, runtime: OciRuntime) -> Arc<ContainerSandbox> {
        let id = format!("sp{}", &uuid::Uuid::new_v4().simple().to_string()[..20]);
        Arc::new(ContainerSandbox {
            dir: containers_dir.join(&id),
            cgroups_path: format!("{cgroup_parent}/{id}"),
            id,
            target_port,
            runtime,
            netns: OnceLock::new(),
            egress: Mutex::new(None),
            exited: Arc::new(watch::channel(false).0),
            death: Arc::new(Mutex::new(None)),
            destroyed: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
        })
    }

    /// Takes over container `id` that a previous server started and left running: its
    /// network namespace and an exit watch. `None` if it is not running any more.
    pub(crate) fn adopt(
        id: &str,
        containers_dir: &Path,
        cgroup_parent: &str,
        target_port: u16,
        runtime: &OciRuntime,
    ) -> Result<Option<Arc<ContainerSandbox>>, String> {
        let dir = containers_dir.join(id);
        let pid = std::fs::read_to_string(dir.join("pid")).ok().and_then(|text| text.trim().parse::<u32>().ok());
        let Some(pid) = pid.filter(|pid| Path::new(&format!("/proc/{pid}")).exists()) else { return Ok(None) };
        let netns = NetNamespace::of_process(pid).map_err(|e| format!("cannot open its network namespace: {e}"))?;
        let sandbox = Arc::new(ContainerSandbox {
            id: id.to_owned(),
            dir,
            cgroups_path: format!("{cgroup_parent}/{id}"),
            target_port,
            runtime: runtime.clone(),
            netns: OnceLock::from(netns),
            egress: Mutex::new(None),
            exited: Arc::new(watch::channel(false).0),
            death: Arc::new(Mutex::new(None)),
            destroyed: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
        });
        sandbox.watch_exit(pid)?;
        Ok(Some(sandbox))
    }

    /// The bundle's spec (to learn an adopted session's user and root).
    pub(crate) fn bundle_spec(&self) -> Option<serde_json::Value> {
        let text = std::fs::read(self.dir.join("bundle/config.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// An image pool's session: the container, then its startup probe and liveness watch.
    async fn launch(self: Arc<Self>, settings: &ContainerPoolSettings, prepared: &Prepared) -> Result<(), String> {
        self.start_container(&prepared.template, &prepared.root, settings.egress.as_ref()).await?;
        self.wait_until_started(settings).await?;
        if let Some(liveness) = settings.probes.iter().find(|p| p.kind == ProbeKind::Liveness).cloned() {
            let task = tokio::spawn(self.clone().watch_liveness(liveness));
            self.tasks.lock().expect("tasks lock").push(task);
        }
        Ok(())
    }

    /// Mounts the session's root, creates its network namespace and starts the container
    /// from `template` (with this session's hostname, namespace and cgroup filled in). Does
    /// not wait for the app inside.
    pub(crate) async fn start_container(
        self: &Arc<Self>,
        template: &ContainerSpec,
        root: &SessionRoot,
        egress: Option<&Arc<EgressNetwork>>,
    ) -> Result<(), String> {
        let bundle = self.dir.join("bundle");
        let scratch = self.dir.join("scratch");
        let mut spec = template.clone();
        std::fs::create_dir_all(&scratch).map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
        match root {
            SessionRoot::ImageOverlay { lower, writable_bytes, user_namespace } => {
                let rootfs = bundle.join("rootfs");
                std::fs::create_dir_all(&rootfs).map_err(|e| format!("cannot create {}: {e}", rootfs.display()))?;
                mount_scratch(&scratch, *writable_bytes, *user_namespace)?;
                mount_overlay(lower, &scratch, &rootfs)?;
            }
            SessionRoot::SharedWithData { bytes, owner } => {
                std::fs::create_dir_all(&bundle).map_err(|e| format!("cannot create {}: {e}", bundle.display()))?;
                mount_scratch(&scratch, *bytes, None)?;
                let data = self.data_dir();
                std::fs::create_dir(&data).map_err(|e| format!("cannot create the session's data directory: {e}"))?;
                std::os::unix::fs::chown(&data, Some(*owner), Some(*owner))
                    .map_err(|e| format!("cannot give the data directory to the session's user: {e}"))?;
                spec.extra_mounts.push(Mount::Bind { source: data, destination: "/mnt/data".into(), writable: true });
            }
        }
        let netns = NetNamespace::create().map_err(|e| format!("cannot create the session's network namespace: {e}"))?;
        if let Some(network) = egress {
            *self.egress.lock().expect("egress lock") = Some(network.attach(&netns, &self.id)?);
        }
        spec.hostname = self.id.clone();
        spec.netns_path = netns.path().to_string_lossy().into_owned();
        spec.cgroups_path = self.cgroups_path.clone();
        spec.write(&bundle)?;
        let console_path = self.dir.join(CONSOLE_LOG);
        let console = std::fs::File::create(&console_path).map_err(|e| format!("cannot create the console log: {e}"))?;
        let pid = self.runtime.run_detached(&self.id, &bundle, &self.dir.join("pid"), console, &console_path).await?;
        let _ = self.netns.set(netns);
        self.watch_exit(pid)
    }

    /// The host side of a `SharedWithData` session's `/mnt/data` (on its scratch tmpfs).
    pub(crate) fn data_dir(&self) -> PathBuf {
        self.dir.join("scratch/data")
    }

    /// The session's network namespace, once its container was started.
    pub(crate) fn netns(&self) -> Option<&NetNamespace> {
        self.netns.get()
    }

    /// Resolves once the container has ended.
    pub(crate) async fn ended(&self) {
        let mut exited = self.exited.subscribe();
        let _ = exited.wait_for(|ended| *ended).await;
    }

    /// Stops the container, recording `cause` as the reason unless one is known already.
    pub(crate) async fn stop(&self, cause: DeathCause, message: String) {
        self.death.lock().expect("death lock").get_or_insert((cause, message));
        self.exited.send_replace(true);
        self.runtime.remove(&self.id).await;
    }

    /// Marks the sandbox dead when its main process ends (crun: the container's init;
    /// runsc: the sandbox process, which lives exactly as long as the container).
    fn watch_exit(self: &Arc<Self>, pid: u32) -> Result<(), String> {
        let watcher =
            ProcessWatch::open(pid).map_err(|e| format!("cannot watch the container's process {pid} (it may have ended at once): {e}"))?;
        let exited = self.exited.clone();
        let death = self.death.clone();
        let memory_cgroup = PathBuf::from("/sys/fs/cgroup/memory").join(self.cgroups_path.trim_start_matches('/'));
        let task = tokio::spawn(async move {
            watcher.exited().await;
            // Read before the runtime removes the cgroup.
            let cause = if oom_kills(&memory_cgroup) > 0 {
                (DeathCause::OutOfMemory, "the session's container ran out of memory and was stopped".to_owned())
            } else {
                (DeathCause::Exited, "the session's container exited".to_owned())
            };
            death.lock().expect("death lock").get_or_insert(cause);
            exited.send_replace(true);
        });
        self.tasks.lock().expect("tasks lock").push(task);
        Ok(())
    }

    /// Waits for the startup probe (or, without one, for the target port to accept).
    async fn wait_until_started(&self, settings: &ContainerPoolSettings) -> Result<(), String> {
        let netns = self.netns.get().expect("set before");
        let startup = settings.probes.iter().find(|p| p.kind == ProbeKind::Startup);
        let (initial_delay, period, deadline, what) = match startup {
            Some(probe) => {
                (probe.initial_delay, probe.period, probe.initial_delay + probe.period * probe.failure_threshold, "its startup probe")
            }
            None => (Duration::ZERO, Duration::from_millis(20), DEFAULT_STARTUP_TIMEOUT, "a connection to its target port"),
        };
        let started = tokio::time::Instant::now();
        tokio::time::sleep(initial_delay).await;
        let mut last_error;
        loop {
            if *self.exited.borrow() {
                return Err(format!("the container exited during start-up; its output ends with: {}", self.console_tail()));
            }
            let result = match startup {
                Some(probe) => probe.check_once(netns).await,
                None => netns
                    .connect_async(SocketAddr::from(([127, 0, 0, 1], self.target_port)), Duration::from_secs(1))
                    .await
                    .map(drop)
                    .map_err(|e| format!("port {} does not accept connections ({e})", self.target_port)),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(err) => last_error = err,
            }
            if started.elapsed() >= deadline {
                return Err(format!("the container did not pass {what} within {} s: {last_error}", deadline.as_secs()));
            }
            tokio::time::sleep(period).await;
        }
    }

    async fn watch_liveness(self: Arc<Self>, probe: Probe) {
        tokio::time::sleep(probe.initial_delay).await;
        let mut failures = 0;
        loop {
            tokio::time::sleep(probe.period).await;
            if *self.exited.borrow() || self.destroyed.load(Ordering::SeqCst) {
                return;
            }
            let Some(netns) = self.netns.get() else { return };
            match probe.check_once(netns).await {
                Ok(()) => failures = 0,
                Err(err) => {
                    failures += 1;
                    tracing::debug!(container = %self.id, failures, "liveness probe failed: {err}");
                    if failures >= probe.failure_threshold {
                        let message =
                            format!("the session's container failed its liveness probe {failures} times in a row ({err}) and was stopped");
                        tracing::warn!(container = %self.id, "{message}");
                        self.stop(DeathCause::Unhealthy, message).await;
                        return;
                    }
                }
            }
        }
    }

    pub(crate) fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join(CONSOLE_LOG)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        let tail = lines.into_iter().rev().collect::<Vec<_>>().join(" | ");
        if tail.is_empty() {
            "(no output)".into()
        } else {
            tail
        }
    }
}

#[async_trait]
impl Sandbox for ContainerSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    fn is_alive(&self) -> bool {
        !*self.exited.borrow() && !self.destroyed.load(Ordering::SeqCst)
    }

    async fn execute(&self, _cell: Cell) -> Result<CellOutcome, SandboxError> {
        Err(SandboxError::Internal("custom container sessions do not run code cells; requests are forwarded to the container".into()))
    }

    fn files(&self) -> Option<&dyn FileStore> {
        None
    }

    fn upstream(&self) -> Option<&dyn Upstream> {
        Some(self)
    }

    fn death(&self) -> Option<(DeathCause, String)> {
        self.death.lock().expect("death lock").clone()
    }

    async fn destroy(&self) {
        if self.destroyed.swap(true, Ordering::SeqCst) {
            return;
        }
        for task in self.tasks.lock().expect("tasks lock").drain(..) {
            task.abort();
        }
        self.runtime.remove(&self.id).await;
        let dir = self.dir.clone();
        let cgroups_path = self.cgroups_path.clone();
        // Deleting a veth waits for the kernel (tens of ms): off the async threads too.
        let egress = self.egress.lock().expect("egress lock").take();
        let _ = tokio::task::spawn_blocking(move || {
            remove_session_dir(&dir);
            remove_cgroups(&cgroups_path, false);
            drop(egress);
        })
        .await;
    }
}

#[async_trait]
impl Upstream for ContainerSandbox {
    async fn connect(&self) -> Result<tokio::net::TcpStream, SandboxError> {
        let netns = self.netns.get().ok_or_else(|| SandboxError::Unavailable("the session's container is not running".into()))?;
        let address = SocketAddr::from(([127, 0, 0, 1], self.target_port));
        netns.connect_async(address, CONNECT_TIMEOUT).await.map_err(|e| {
            if !self.is_alive() {
                let why = self.death().map(|(_, message)| message).unwrap_or_else(|| "the session's container has stopped".into());
                return SandboxError::Died { cause: self.death().map(|(cause, _)| cause).unwrap_or(DeathCause::Exited), message: why };
            }
            SandboxError::Unavailable(format!(
                "the session's container does not accept connections on its target port {}: {e}",
                self.target_port
            ))
        })
    }
}

/// The container's argv: Azure's `command` replaces the image's entrypoint and `args` its
/// cmd, as in Kubernetes.
fn container_args(command: &[String], args: &[String], entrypoint: &[String], cmd: &[String]) -> Option<Vec<String>> {
    let argv: Vec<String> = match (command.is_empty(), args.is_empty()) {
        (false, _) => command.iter().chain(args).cloned().collect(),
        (true, false) => entrypoint.iter().chain(args).cloned().collect(),
        (true, true) => entrypoint.iter().chain(cmd).cloned().collect(),
    };
    (!argv.is_empty()).then_some(argv)
}

/// The image's environment with the pool's on top (same name: the pool wins), and a `PATH`
/// if neither sets one.
fn merge_env(image: &[String], pool: &[(String, String)]) -> Vec<String> {
    let mut merged: Vec<(String, String)> = Vec::new();
    let pairs = image.iter().filter_map(|entry| entry.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned()));
    for (name, value) in pairs.chain(pool.iter().cloned()) {
        match merged.iter_mut().find(|(existing, _)| *existing == name) {
            Some(slot) => slot.1 = value,
            None => merged.push((name, value)),
        }
    }
    if !merged.iter().any(|(name, _)| name == "PATH") {
        merged.insert(0, ("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()));
    }
    merged.into_iter().map(|(name, value)| format!("{name}={value}")).collect()
}

/// The image's `User` as numeric ids: `uid`, `uid:gid`, or names looked up in the image's
/// own `/etc/passwd` and `/etc/group`.
fn resolve_user(rootfs: &Path, user: Option<&str>) -> Result<(u32, u32), String> {
    let Some(user) = user.filter(|u| !u.is_empty()) else { return Ok((0, 0)) };
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = read_image_file(rootfs, "etc/passwd");
    let (uid, primary_gid) = match user_part.parse::<u32>() {
        Ok(uid) => (uid, lookup(&passwd, |fields| fields[2] == user_part).and_then(|f| f[3].parse().ok()).unwrap_or(uid)),
        Err(_) => {
            let fields = lookup(&passwd, |fields| fields[0] == user_part)
                .ok_or_else(|| format!("the image's user {user_part:?} is not in its /etc/passwd"))?;
            (
                fields[2].parse().map_err(|_| "the image's /etc/passwd is malformed")?,
                fields[3].parse().map_err(|_| "the image's /etc/passwd is malformed")?,
            )
        }
    };
    let gid = match group_part {
        None => primary_gid,
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let groups = read_image_file(rootfs, "etc/group");
                let fields = lookup(&groups, |fields| fields[0] == group)
                    .ok_or_else(|| format!("the image's group {group:?} is not in its /etc/group"))?;
                fields[2].parse().map_err(|_| "the image's /etc/group is malformed")?
            }
        },
    };
    Ok((uid, gid))
}

/// Reads a file of the unpacked image, refusing symbolic links on the way (an image could
/// point `/etc/passwd` at a host file).
fn read_image_file(rootfs: &Path, relative: &str) -> String {
    let mut path = rootfs.to_owned();
    for component in relative.split('/') {
        path.push(component);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if !meta.file_type().is_symlink() => {}
            _ => return String::new(),
        }
    }
    std::fs::read_to_string(path).unwrap_or_default()
}

fn lookup(table: &str, matches: impl Fn(&[&str]) -> bool) -> Option<Vec<String>> {
    table
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .filter(|fields| fields.len() >= 4)
        .find(|fields| matches(fields))
        .map(|fields| fields.into_iter().map(str::to_owned).collect())
}

/// Mounts the session's writable layer. With a user namespace, the upper directory belongs
/// to the namespace's root: overlayfs takes the merged root directory's owner from it, and the
/// runtime (already inside the namespace) must create mount points such as `/proc` there.
fn mount_scratch(scratch: &Path, bytes: u64, user_namespace: Option<u32>) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    let options = format!("size={bytes},mode=0700");
    mount(Some("tmpfs"), scratch, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some(options.as_str()))
        .map_err(|e| format!("cannot mount the session's writable layer: {e}"))?;
    for dir in ["upper", "work"] {
        std::fs::create_dir(scratch.join(dir)).map_err(|e| format!("cannot create the overlay's {dir} directory: {e}"))?;
    }
    if let Some(root) = user_namespace {
        std::os::unix::fs::chown(scratch.join("upper"), Some(root), Some(root))
            .map_err(|e| format!("cannot give the overlay's upper directory to the container's root: {e}"))?;
    }
    Ok(())
}

fn mount_overlay(lower: &Path, scratch: &Path, target: &Path) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    let options =
        format!("lowerdir={},upperdir={},workdir={}", lower.display(), scratch.join("upper").display(), scratch.join("work").display());
    mount(Some("overlay"), target, Some("overlay"), MsFlags::empty(), Some(options.as_str()))
        .map_err(|e| format!("cannot mount the session's root filesystem (overlay): {e}"))
}

/// Unmounts and removes a session directory. Best effort: failures are logged.
fn remove_session_dir(dir: &Path) {
    use nix::mount::{umount2, MntFlags};
    for mount_point in [dir.join("bundle/rootfs"), dir.join("scratch")] {
        // Lazy: a process of the runtime that still holds it must not block the clean-up.
        let _ = umount2(&mount_point, MntFlags::MNT_DETACH);
    }
    if let Err(err) = std::fs::remove_dir_all(dir) {
        if err.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), "cannot remove a session directory: {err}");
        }
    }
}

/// Removes the session cgroups the runtime left (runsc leaks them when killed), or with
/// `children` every cgroup under the pool's parent.
fn remove_cgroups(path: &str, children: bool) {
    let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") else { return };
    for controller in controllers.flatten() {
        let dir = controller.path().join(path.trim_start_matches('/'));
        if children {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten().filter(|e| e.path().is_dir()) {
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        } else {
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

/// How many processes the kernel's OOM killer stopped in a v1 memory cgroup.
fn oom_kills(memory_cgroup: &Path) -> u64 {
    std::fs::read_to_string(memory_cgroup.join("memory.oom_control"))
        .ok()
        .and_then(|text| text.lines().find_map(|line| line.strip_prefix("oom_kill ").and_then(|n| n.trim().parse().ok())))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn command_and_args_override_entrypoint_and_cmd_as_in_kubernetes() {
        let (entry, cmd) = (strings(&["/entry"]), strings(&["--default"]));
        assert_eq!(container_args(&[], &[], &entry, &cmd).unwrap(), strings(&["/entry", "--default"]));
        assert_eq!(container_args(&[], &strings(&["--mine"]), &entry, &cmd).unwrap(), strings(&["/entry", "--mine"]));
        assert_eq!(container_args(&strings(&["/other"]), &[], &entry, &cmd).unwrap(), strings(&["/other"]));
        assert_eq!(container_args(&strings(&["/other"]), &strings(&["-x"]), &entry, &cmd).unwrap(), strings(&["/other", "-x"]));
        assert!(container_args(&[], &[], &[], &[]).is_none());
    }

    #[test]
    fn pool_environment_wins_and_path_is_always_set() {
        let merged = merge_env(&strings(&["A=image", "B=image"]), &[("B".into(), "pool".into()), ("C".into(), "x=y".into())]);
        assert_eq!(merged[0], "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        assert_eq!(&merged[1..], &strings(&["A=image", "B=pool", "C=x=y"]));
        assert_eq!(merge_env(&strings(&["PATH=/app"]), &[]), strings(&["PATH=/app"]));
    }

    #[test]
    fn users_resolve_through_the_image_and_never_through_links() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/passwd"), "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/app:/bin/sh\n").unwrap();
        std::fs::write(root.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(resolve_user(root.path(), None).unwrap(), (0, 0));
        assert_eq!(resolve_user(root.path(), Some("app")).unwrap(), (1000, 1001));
        assert_eq!(resolve_user(root.path(), Some("1000")).unwrap(), (1000, 1001));
        assert_eq!(resolve_user(root.path(), Some("4242")).unwrap(), (4242, 4242));
        assert_eq!(resolve_user(root.path(), Some("app:staff")).unwrap(), (1000, 50));
        assert!(resolve_user(root.path(), Some("nobody")).unwrap_err().contains("not in its /etc/passwd"));
        // A link out of the image is not followed.
        std::fs::remove_file(root.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.path().join("etc/passwd")).unwrap();
        assert!(resolve_user(root.path(), Some("root")).is_err());
    }
}
