//! `sandpool serve`: the composition root.
//!
//! Loads the configuration, opens the state directory and the token issuer, builds one engine
//! pool per configured pool on the zygote backend, binds the listener, and serves until SIGTERM
//! or Ctrl-C. The listener comes up before the pools are warm, so `/healthz` answers at once
//! and `/readyz` reports progress while the Python runtime is built on first start.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use sandpool_api::AppState;
use sandpool_auth::{ApiKeys, Authenticator, LocalIssuer, OidcIssuer};
use sandpool_container::egress::EgressNetwork;
use sandpool_container::factory::{ContainerFactory, ContainerPoolSettings};
use sandpool_container::image::ImageSource;
use sandpool_container::python::{GvisorPythonFactory, GvisorPythonSettings};
use sandpool_engine::pool::{Pool, PoolSettings};
use sandpool_engine::Engine;
use sandpool_engine::PoolKind;
use sandpool_sandbox::cgroup::{CgroupLayout, SessionLimits};
use sandpool_sandbox::driver::{ZygoteFactory, ZygotePoolSettings};
use sandpool_sandbox::runtime::{RuntimeSpec, SharedRuntime};
use sandpool_sandbox::uids::{UidAllocator, UidRange};
use sandpool_telemetry::Telemetry;

use crate::config::{Config, ContainerConfig, Overrides, PoolConfig, PythonSandbox};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); without it the embedded default is used
    #[arg(long, env = "SANDPOOL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8642]
    #[arg(long, env = "SANDPOOL_LISTEN")]
    pub listen: Option<String>,
    /// Directory for keys, the Python runtime and run-time files [default: /var/lib/sandpool]
    #[arg(long, env = "SANDPOOL_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Log format on stderr: `text` for people, `json` (one object per line) for log pipelines
    #[arg(long, env = "SANDPOOL_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides { listen: args.listen, state_dir: args.state_dir };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    // After the configuration, which says where traces go; flushed when `run` returns.
    let _telemetry = crate::logging::init(args.log_format == "json", config.telemetry.otlp.as_ref())?;
    if !nix::unistd::geteuid().is_root() {
        bail!("sandpool serve must run as root: it creates namespaces, cgroups and a user id per session");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sandpool")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config))
}

/// The server's own issuer (unless disabled), the configured OIDC issuers and API keys.
fn build_authenticator(config: &Config) -> anyhow::Result<Authenticator> {
    let local = if config.auth.local_issuer {
        Some(
            LocalIssuer::load_or_create(&config.state_dir.join("keys"), &config.auth.audiences)
                .context("cannot load the token signing key")?,
        )
    } else {
        None
    };
    let oidc = config
        .auth
        .oidc
        .iter()
        .map(|settings| OidcIssuer::new(settings.clone()).map_err(|e| anyhow::anyhow!("[[auth.oidc]] issuer {:?}: {e}", settings.issuer)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let api_keys = ApiKeys::new(config.auth.api_keys.clone())?;
    Ok(Authenticator::new(local, oidc, api_keys))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM at any point after this stops the server gracefully.
    let signals = shutdown_signal()?;
    prepare_state_dir(&config.state_dir)?;
    let _instance_lock = lock_state_dir(&config.state_dir).await?;
    let sessions: u64 = config.pools.iter().map(|p| (p.max_concurrent_sessions + p.ready_session_instances) as u64).sum();
    crate::host_limits::report(&crate::host_limits::prepare(sessions));
    let auth = Arc::new(build_authenticator(&config)?);
    let telemetry = Telemetry::new(config.telemetry.event_retention, config.telemetry.max_events);
    let (engine, egress) = build_engine(&config, &telemetry)?;
    let engine = Arc::new(engine);

    let listener = tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
    let address = listener.local_addr().context("cannot read the listening address")?;
    print_banner(&config, address);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    for index in 0..auth.oidc_issuers().len() {
        let auth = auth.clone();
        // Fetch each issuer's keys now so the first request does not wait; a failure is
        // logged and retried when a token arrives.
        tokio::spawn(async move {
            let _ = auth.oidc_issuers()[index].prefetch().await;
        });
    }
    let state = AppState { engine: engine.clone(), auth, telemetry };
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(sandpool_api::serve(listener, state, async move {
        let _ = server_stop.wait_for(|stop| *stop).await;
    }));

    let mut starting = tokio::task::JoinSet::new();
    for pool in engine.pools() {
        let pool = pool.clone();
        starting.spawn(async move { (pool.name().to_owned(), pool.start().await) });
    }
    let mut failures = Vec::new();
    let mut running = 0;
    tokio::pin!(signals);
    loop {
        tokio::select! {
            joined = starting.join_next(), if !starting.is_empty() => {
                match joined {
                    Some(Ok((name, Ok(())))) => { running += 1; tracing::info!(pool = %name, "pool started; filling its ready sessions"); }
                    Some(Ok((name, Err(err)))) => { tracing::error!(pool = %name, "pool failed to start: {err}"); failures.push(format!("pool '{name}': {err}")); }
                    Some(Err(err)) => failures.push(format!("a pool start task failed: {err}")),
                    None => {}
                }
                if starting.is_empty() && running == 0 {
                    let _ = stop_tx.send(true);
                    let _ = server.await;
                    egress.iter().for_each(|network| network.teardown());
                    bail!("no pool could start:\n  {}", failures.join("\n  "));
                }
            }
            _ = &mut signals => break,
        }
    }
    tracing::info!("shutting down: finishing requests, then stopping every session");
    let _ = stop_tx.send(true);
    match tokio::time::timeout(std::time::Duration::from_secs(30), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(err))) => tracing::error!(error = %err, "the HTTP server failed"),
        Ok(Err(err)) => tracing::error!(error = %err, "the HTTP server task failed"),
        Err(_) => tracing::warn!("requests still running after 30 s; stopping anyway"),
    }
    engine.shutdown().await;
    // After the sessions, whose veths the rules cover.
    egress.iter().for_each(|network| network.teardown());
    tracing::info!("stopped");
    Ok(())
}

/// The engine, and the egress network when some pool has `network_status = "EgressEnabled"`.
fn build_engine(config: &Config, telemetry: &Arc<Telemetry>) -> anyhow::Result<(Engine, Option<Arc<EgressNetwork>>)> {
    let layout = CgroupLayout::detect().context("cannot set up session resource limits")?;
    tracing::info!(?layout, "using cgroups");
    let runtime = Arc::new(SharedRuntime::new(RuntimeSpec {
        python: config.runtime.python.clone(),
        packages: config.runtime.packages.clone(),
        index_url: config.runtime.index_url.clone(),
        dir: config.runtime.dir.clone(),
    }));
    let mut range =
        UidRange::claim(Path::new(HOST_LOCK_DIR)).with_context(|| format!("cannot reserve session user ids in {HOST_LOCK_DIR}"))?;
    // The top of the block is the user namespace of this server's crun containers.
    let container_root_uid = range.split_off_top(sandpool_container::spec::USER_NAMESPACE_IDS);
    tracing::info!(first = range.first, count = range.count, "session user ids reserved");
    let uids = Arc::new(UidAllocator::new(range));
    let instance = instance_name(&config.state_dir);
    let zygote_exe = std::env::current_exe().context("cannot locate the sandpool binary (needed to start zygotes)")?;
    let egress = if config.pools.iter().any(|pool| pool.container.as_ref().is_some_and(|container| container.egress)) {
        let network = EgressNetwork::setup(&instance, Path::new(HOST_LOCK_DIR))
            .map_err(|e| anyhow::anyhow!("cannot set up the network of EgressEnabled pools: {e}"))?;
        Some(Arc::new(network))
    } else {
        None
    };
    let mut pools = Vec::new();
    for pool in &config.pools {
        if let Some(container) = &pool.container {
            let egress = egress.clone().filter(|_| container.egress);
            let factory = Arc::new(container_factory(config, pool, container, &instance, egress, container_root_uid));
            pools.push(Pool::with_events(pool_settings(pool), factory, telemetry.clone()));
            continue;
        }
        if pool.python_sandbox == PythonSandbox::Gvisor {
            let factory = Arc::new(GvisorPythonFactory::new(
                GvisorPythonSettings {
                    pool: pool.name.clone(),
                    memory_bytes: pool.memory_bytes,
                    cpus: pool.cpus,
                    max_processes: pool.max_processes,
                    max_open_files: pool.max_open_files,
                    data_dir_bytes: pool.data_dir_bytes,
                    tmp_dir_bytes: pool.tmp_dir_bytes,
                    preload_modules: pool.preload_modules.clone(),
                    output_cap: pool.max_output_characters,
                    run_dir: config.state_dir.join("run").join(&pool.name),
                    cgroup_parent: format!("/{instance}-containers/{}", pool.name),
                },
                runtime.clone(),
                uids.clone(),
            ));
            pools.push(Pool::with_events(pool_settings(pool), factory, telemetry.clone()));
            continue;
        }
        let limits = SessionLimits { memory_bytes: pool.memory_bytes, cpus: pool.cpus, max_processes: pool.max_processes };
        let cgroups = layout
            .prepare_pool(&instance, &pool.name, limits)
            .with_context(|| format!("cannot prepare the cgroups of pool '{}'", pool.name))?;
        let backend = ZygotePoolSettings {
            pool: pool.name.clone(),
            limits,
            data_dir_bytes: pool.data_dir_bytes,
            tmp_dir_bytes: pool.tmp_dir_bytes,
            max_open_files: pool.max_open_files,
            max_cpu_seconds: pool.max_cpu_seconds,
            output_cap: pool.max_output_characters,
            preload_modules: pool.preload_modules.clone(),
            run_dir: config.state_dir.join("run").join(&pool.name),
            zygote_exe: zygote_exe.clone(),
        };
        let factory = Arc::new(ZygoteFactory::new(backend, runtime.clone(), uids.clone(), cgroups));
        pools.push(Pool::with_events(pool_settings(pool), factory, telemetry.clone()));
    }
    Ok((Engine::new(pools), egress))
}

/// The backend of a custom container pool.
fn container_factory(
    config: &Config,
    pool: &PoolConfig,
    container: &ContainerConfig,
    instance: &str,
    egress: Option<Arc<EgressNetwork>>,
    container_root_uid: u32,
) -> ContainerFactory {
    let insecure_registries = match (&container.image, container.insecure_registry) {
        (ImageSource::Registry { reference }, true) => vec![reference.split('/').next().unwrap_or_default().to_owned()],
        _ => Vec::new(),
    };
    ContainerFactory::new(ContainerPoolSettings {
        pool: pool.name.clone(),
        image: container.image.clone(),
        registry_auth: container.registry_auth.clone(),
        insecure_registries,
        runtime: container.runtime,
        command: container.command.clone(),
        args: container.args.clone(),
        env: container.env.clone(),
        target_port: container.target_port,
        memory_bytes: pool.memory_bytes,
        cpus: pool.cpus,
        max_processes: pool.max_processes,
        max_open_files: pool.max_open_files,
        writable_layer_bytes: pool.data_dir_bytes,
        probes: container.probes.clone(),
        run_dir: config.state_dir.join("run").join(&pool.name),
        images_dir: config.state_dir.join("images"),
        cgroup_parent: format!("/{instance}-containers/{}", pool.name),
        egress,
        user_namespace: Some(container_root_uid),
    })
}

/// Host-wide lock files (uid reservations) shared by every sandpool server on the host.
const HOST_LOCK_DIR: &str = "/run/sandpool";

/// A name for this server's cgroup subtree, stable for a state directory: a restarted server
/// finds (and cleans up) what its previous run left, and other servers' sessions are never
/// touched.
fn instance_name(state_dir: &Path) -> String {
    use sha2::Digest;
    let canonical = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    let digest = sha2::Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    format!("sandpool-{}", hex::encode(&digest[..4]))
}

fn pool_settings(pool: &PoolConfig) -> PoolSettings {
    PoolSettings {
        name: pool.name.clone(),
        max_concurrent_sessions: pool.max_concurrent_sessions,
        ready_session_instances: pool.ready_session_instances,
        lifecycle: pool.lifecycle,
        kind: if pool.container.is_some() { PoolKind::CustomContainer } else { PoolKind::CodeInterpreter },
        default_timeout: pool.execution_timeout,
        max_timeout: pool.execution_timeout,
        output_cap: pool.max_output_characters,
    }
}

/// One server per state directory: a second one would share (and, on shutdown, remove) the
/// first one's cgroups. A restarted server waits for its predecessor to finish stopping.
async fn lock_state_dir(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let path = dir.join("server.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut told = false;
    loop {
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((returned, nix::Error::EWOULDBLOCK)) => {
                if std::time::Instant::now() > deadline {
                    bail!(
                        "another sandpool server is using the state directory {} (it holds {}); stop it or use another --state-dir",
                        dir.display(),
                        path.display()
                    );
                }
                if !told {
                    tracing::info!(state_dir = %dir.display(), "another sandpool server is using this state directory; waiting up to 60 s for it to stop");
                    told = true;
                }
                file = returned;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err((_, err)) => return Err(err).with_context(|| format!("cannot lock {}", path.display())),
        }
    }
}

fn prepare_state_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the state directory {}", dir.display()))?;
    // Keys and run-time files live here; only root may look.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(|| format!("cannot restrict {}", dir.display()))?;
    Ok(())
}

fn print_banner(config: &Config, address: SocketAddr) {
    let state_dir = config.state_dir.display();
    println!("sandpool {} listening on http://{address}", env!("CARGO_PKG_VERSION"));
    for pool in &config.pools {
        println!("  pool '{}': http://{address}/pools/{}", pool.name, pool.name);
        println!("    (Azure-style endpoint: http://{address}/subscriptions/local/resourceGroups/local/sessionPools/{})", pool.name);
    }
    println!("  get a token:  sandpool token issue --state-dir {state_dir}");
    println!(
        "  run code:     sandpool exec --state-dir {state_dir} --endpoint http://{address}/pools/{} 'print(1 + 1)'",
        config.pools[0].name
    );
    println!("  readiness:    curl http://{address}/readyz");
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not when
/// the future is first polled.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}
