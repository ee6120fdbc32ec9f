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
use sandpool_engine::Engine;
use sandpool_telemetry::Telemetry;

use crate::config::{Config, Overrides};
use crate::pools::{reconcile_at_start, PoolBuilder, PoolManager};
use crate::session_table::SessionTable;

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
    let reload = args.config.map(|path| (path, overrides));
    runtime.block_on(serve(config, reload))
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

/// Runs the server. `reload` is the config file and overrides to read again on SIGHUP.
async fn serve(config: Config, reload: Option<(PathBuf, Overrides)>) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM at any point after this stops the server gracefully.
    let signals = shutdown_signal()?;
    prepare_state_dir(&config.state_dir)?;
    let _instance_lock = lock_state_dir(&config.state_dir).await?;
    let sessions: u64 = config.pools.iter().map(|p| (p.max_concurrent_sessions + p.ready_session_instances) as u64).sum();
    crate::host_limits::report(&crate::host_limits::prepare(sessions));
    let auth = Arc::new(build_authenticator(&config)?);
    let telemetry = Telemetry::new(config.telemetry.event_retention, config.telemetry.max_events);
    let store = Arc::new(sandpool_store::Store::open(&config.state_dir).context("cannot open the server's database")?);
    let sessions = Arc::new(SessionTable::open(store.clone(), &config.state_dir, telemetry.clone(), config.telemetry.max_events)?);
    let builder = Arc::new(PoolBuilder::new(&config, sessions.clone())?);
    let mut pools = Vec::new();
    for (_, pool) in reconcile_at_start(&store, &config)? {
        pools.push(builder.build(&pool, false)?);
    }
    let engine = Arc::new(Engine::new(pools));
    sessions.watch(engine.clone());

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
    let admin = Arc::new(PoolManager::new(store.clone(), engine.clone(), builder.clone(), format!("http://{address}/pools")));
    let state = AppState { engine: engine.clone(), auth, telemetry, pool_admin: Some(admin.clone()) };
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(sandpool_api::serve(listener, state, async move {
        let _ = server_stop.wait_for(|stop| *stop).await;
    }));

    let mut starting = tokio::task::JoinSet::new();
    for pool in engine.pools() {
        // Sessions that outlived the previous server process come back before any request
        // is served.
        let records = sessions.records(pool.name());
        starting.spawn(async move { (pool.name().to_owned(), pool.start_restoring(records).await) });
    }
    let folding = sessions.spawn_folding();
    let mut failures = Vec::new();
    let mut running = 0;
    tokio::pin!(signals);
    let stop = loop {
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
                    builder.teardown();
                    bail!("no pool could start:\n  {}", failures.join("\n  "));
                }
            }
            stop = &mut signals => break stop,
            _ = hangup.recv() => reload_pools(reload.as_ref(), &admin).await,
        }
    };
    let keep_sessions = stop == Stop::KeepSessions;
    if keep_sessions {
        tracing::info!("stopping: finishing requests, then exiting with every session left running for the next start");
    } else {
        tracing::info!("shutting down: finishing requests, then stopping every session");
    }
    let _ = stop_tx.send(true);
    match tokio::time::timeout(std::time::Duration::from_secs(30), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(err))) => tracing::error!(error = %err, "the HTTP server failed"),
        Ok(Err(err)) => tracing::error!(error = %err, "the HTTP server task failed"),
        Err(_) => tracing::warn!("requests still running after 30 s; stopping anyway"),
    }
    folding.abort();
    if keep_sessions {
        if let Err(err) = sessions.fold() {
            tracing::error!("cannot write the session table (the journal keeps it): {err:#}");
        }
        tracing::info!("stopped; sessions keep running and the next start adopts them");
        // Exit here: dropping the engine would stop the zygotes and delete the sessions.
        std::process::exit(0);
    }
    engine.shutdown().await;
    if let Err(err) = sessions.fold() {
        tracing::error!("cannot write the session table: {err:#}");
    }
    // After the sessions, whose veths the rules cover.
    builder.teardown();
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: reads the config file again and applies its pools. A broken file changes
/// nothing: the error names the problem and the running pools stay as they are.
async fn reload_pools(reload: Option<&(PathBuf, Overrides)>, admin: &PoolManager) {
    let Some((path, overrides)) = reload else {
        tracing::warn!("SIGHUP: the server runs the embedded default configuration; there is no file to read again");
        return;
    };
    match Config::load(Some(path), overrides) {
        Err(err) => tracing::error!("SIGHUP: the config file is not valid, so nothing changed: {err:#}"),
        Ok(config) => {
            let report = admin.apply_config(&config.definitions).await;
            if report.is_empty() {
                tracing::info!(file = %path.display(), "SIGHUP: the pools already match the config file");
            }
            for line in report {
                tracing::info!(file = %path.display(), "SIGHUP: {line}");
            }
            tracing::info!("SIGHUP: only [[pools]] are applied on reload; other settings take effect at the next start");
        }
    }
}

/// How the server was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGTERM or SIGINT: finish requests, then delete every session.
    Everything,
    /// SIGQUIT: finish requests, then exit leaving the sessions running for the next start
    /// (a restart or an upgrade that users do not notice).
    KeepSessions,
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
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = Stop>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut quit = signal(SignalKind::quit()).context("cannot handle SIGQUIT")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => Stop::Everything,
            _ = interrupt.recv() => Stop::Everything,
            _ = quit.recv() => Stop::KeepSessions,
        }
    })
}
