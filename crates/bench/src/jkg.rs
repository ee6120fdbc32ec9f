//! Jupyter Kernel Gateway under test: one kernel per identifier, taken from the gateway's
//! pre-spawned kernels while there are any (`prespawn_count`), else started with
//! `POST /api/kernels`. Kernels import numpy, pandas and matplotlib through the gateway's seed
//! notebook (`seed_uri`), which runs in every kernel before it is handed out, so the import is
//! part of kernel start-up, not of the first execution. A session's first execution includes
//! opening the kernel's websocket; cells go over the Jupyter messaging protocol
//! (`execute_request` on the shell channel, done at `execute_reply` plus the idle status).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::heavy::{self, Heavy};
use crate::host::Cgroup;
use crate::http::Conn;
use crate::results::{mib, Round};
use crate::workload::{Cells, Code, System};
use crate::Settings;

const SEED_CELL: &str = "import numpy, pandas, matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot";
const EXECUTE_TIMEOUT: Duration = Duration::from_secs(120);
/// Limit for one gateway request (a kernel start included): a kernel that dies at start can
/// leave a request unanswered.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// A gateway config file (Python) that sets TCP_NODELAY on every websocket once it is open
/// (tornado 6.6's protocol class; tornado's HTTP layer turns Nagle back on after each request).
const NODELAY_CONFIG: &str = r#"# sandpool-bench: TCP_NODELAY for kernel websockets
import tornado.websocket as _ws

_receive_frame_loop = _ws.WebSocketProtocol13._receive_frame_loop


async def _nodelay_receive_frame_loop(self):
    self.stream.set_nodelay(True)
    await _receive_frame_loop(self)


_ws.WebSocketProtocol13._receive_frame_loop = _nodelay_receive_frame_loop
"#;

/// A running gateway.
pub struct Gateway {
    child: tokio::process::Child,
    pid: i32,
    pub addr: SocketAddr,
    pub cgroup: Cgroup,
}

/// The seed notebook: one cell with the imports sandpool's zygote does.
fn write_seed(settings: &Settings) -> anyhow::Result<PathBuf> {
    let path = settings.work_dir.join("jkg-seed.ipynb");
    let notebook = serde_json::json!({
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "cells": [{"cell_type": "code", "id": "seed", "metadata": {}, "execution_count": null, "outputs": [], "source": SEED_CELL}],
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&notebook)?)?;
    Ok(path)
}

impl Gateway {
    /// Starts a gateway with `prespawn` kernels. `nodelay` loads a config file that turns on
    /// TCP_NODELAY for the kernel websockets (jupyter_server leaves Nagle's algorithm on, and
    /// every small message then waits for the client's delayed ACK, ~40 ms).
    pub async fn start(settings: &Settings, label: &str, prespawn: usize, nodelay: bool) -> anyhow::Result<Gateway> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let cgroup = Cgroup::create(&format!("bench-{label}"))?;
        let seed = write_seed(settings)?;
        let runtime_dir = settings.work_dir.join("jkg-runtime");
        std::fs::create_dir_all(&runtime_dir)?;
        let mut args: Vec<String> = vec![
            "kernelgateway".into(),
            "--ip=127.0.0.1".into(),
            format!("--port={port}"),
            "--port_retries=0".into(),
            format!("--KernelGatewayApp.seed_uri={}", seed.display()),
            "--JupyterWebsocketPersonality.list_kernels=True".into(),
            "--KernelGatewayApp.log_level=WARN".into(),
        ];
        if prespawn > 0 {
            args.push(format!("--KernelGatewayApp.prespawn_count={prespawn}"));
        }
        if nodelay {
            let config = settings.work_dir.join("jkg_nodelay_config.py");
            std::fs::write(&config, NODELAY_CONFIG)?;
            args.push(format!("--config={}", config.display()));
        }
        let venv_bin = settings.jkg_venv.join("bin");
        let log = std::fs::File::create(settings.work_dir.join(format!("{label}.log")))?;
        let mut command = cgroup.command(&venv_bin.join("jupyter"), &args);
        command
            .env("PATH", format!("{}:/usr/local/bin:/usr/bin:/bin", venv_bin.display()))
            .env("MPLBACKEND", "Agg")
            .env("MPLCONFIGDIR", settings.work_dir.join("jkg-mplconfig"))
            // As in sandpool's sessions: one BLAS thread per interpreter.
            .env("OPENBLAS_NUM_THREADS", "1")
            .env("OMP_NUM_THREADS", "1")
            .env("MKL_NUM_THREADS", "1")
            .env("JUPYTER_RUNTIME_DIR", &runtime_dir)
            .env("JUPYTER_PLATFORM_DIRS", "1")
            .env_remove("PYTHONPATH")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        let child = command.spawn().context("cannot start jupyter kernelgateway")?;
        let pid = child.id().context("the gateway exited at once")? as i32;
        let gateway = Gateway { child, pid, addr, cgroup };
        let start = Instant::now();
        loop {
            if let Ok(mut conn) = Conn::open(addr, None).await {
                if let Ok(Ok((status, _))) = tokio::time::timeout(Duration::from_secs(5), conn.get("/api/kernels")).await {
                    if status.is_success() {
                        break;
                    }
                }
            }
            if start.elapsed() > Duration::from_secs(90) {
                bail!("the gateway did not answer within 90 s; see {}/{label}.log", settings.work_dir.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(gateway)
    }

    /// The kernels the gateway lists: (id, execution_state).
    pub async fn kernels(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut conn = Conn::open(self.addr, None).await?;
        let (status, body) =
            tokio::time::timeout(REQUEST_TIMEOUT, conn.get("/api/kernels")).await.context("GET /api/kernels timed out")??;
        if !status.is_success() {
            bail!("GET /api/kernels answered {status}");
        }
        let list: serde_json::Value = serde_json::from_slice(&body)?;
        Ok(list
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|k| {
                        (k["id"].as_str().unwrap_or_default().to_owned(), k["execution_state"].as_str().unwrap_or_default().to_owned())
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Waits until `n` kernels are listed, all idle, and the gateway's cgroup is quiet (the
    /// seed cells have run).
    /// If the listed kernels stop changing before `n` are there (a kernel died at start: with
    /// many kernels starting at once, jupyter_client's port picking races and a kernel fails
    /// with "Address already in use"), the missing ones are started with POST /api/kernels.
    pub async fn wait_prespawned(&self, n: usize, limit: Duration, notes: &mut Vec<String>) -> anyhow::Result<Vec<String>> {
        let start = Instant::now();
        let mut stable_since = ((0usize, 0usize), Instant::now());
        let mut topped_up = false;
        // While kernels start, JKG 3.0.1 with jupyter_server 2.x answers GET /api/kernels with
        // 500 (a starting kernel has no `last_activity` yet): retry until it lists them all.
        let mut last_error = None;
        loop {
            match self.kernels().await {
                Ok(kernels) if kernels.len() >= n && kernels.iter().all(|(_, state)| state == "idle") => {
                    self.cgroup.wait_quiet(0.05, Duration::from_secs(60)).await;
                    if let Ok(kernels) = self.kernels().await {
                        if kernels.iter().all(|(_, state)| state == "idle") {
                            return Ok(kernels.into_iter().map(|(id, _)| id).collect());
                        }
                    }
                }
                Ok(kernels) => {
                    // A kernel that died at start may stay listed (restarting, dead) for good:
                    // once the listing stops changing, go on with the idle kernels.
                    let idle: Vec<String> = kernels.iter().filter(|(_, state)| state == "idle").map(|(id, _)| id.clone()).collect();
                    if (kernels.len(), idle.len()) != stable_since.0 {
                        stable_since = ((kernels.len(), idle.len()), Instant::now());
                    } else if stable_since.1.elapsed() > Duration::from_secs(20) {
                        if topped_up || idle.len() >= n {
                            notes.push(format!("JKG: going on with the {} idle kernels of {} listed", idle.len(), kernels.len()));
                            return Ok(idle);
                        }
                        let missing = n - idle.len();
                        notes.push(format!(
                            "JKG pre-spawned {} idle kernels of {n} ({} listed; see the gateway log: a kernel died at start); started {missing} more with POST /api/kernels",
                            idle.len(),
                            kernels.len()
                        ));
                        for _ in 0..missing {
                            if let Err(err) = create_kernel(self.addr).await {
                                notes.push(format!("JKG: a kernel of the top-up failed: {err:#}"));
                            }
                        }
                        topped_up = true;
                        stable_since = ((0, 0), Instant::now());
                    }
                    last_error = Some(format!("{} of {n} kernels listed, {} idle", kernels.len(), idle.len()));
                }
                Err(err) => last_error = Some(format!("{err:#}")),
            }
            if start.elapsed() > limit {
                bail!("the pre-spawned kernels were not ready after {limit:?}: {}", last_error.unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn stop(mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
        self.cgroup.remove();
    }
}

/// A kernel's websocket, with the Jupyter session it speaks as.
pub struct KernelWs {
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    session: String,
    counter: u64,
}

impl KernelWs {
    pub async fn connect(addr: SocketAddr, kernel: &str, session: String) -> anyhow::Result<KernelWs> {
        let url = format!("ws://{addr}/api/kernels/{kernel}/channels");
        // TCP_NODELAY: otherwise Nagle's algorithm and the server's delayed ACK add ~40 ms to
        // every small request.
        let (ws, _) = tokio::time::timeout(REQUEST_TIMEOUT, tokio_tungstenite::connect_async_with_config(url.as_str(), None, true))
            .await
            .with_context(|| format!("{url} did not open within {REQUEST_TIMEOUT:?}"))?
            .with_context(|| format!("cannot open {url}"))?;
        Ok(KernelWs { ws, session, counter: 0 })
    }

    /// Sends an `execute_request` and waits for its `execute_reply` and the idle status.
    pub async fn execute(&mut self, code: &str) -> anyhow::Result<()> {
        self.counter += 1;
        let msg_id = format!("{}-{}", self.session, self.counter);
        let message = serde_json::json!({
            "header": {
                "msg_id": msg_id, "username": "bench", "session": self.session,
                "msg_type": "execute_request", "version": "5.3", "date": "2026-01-01T00:00:00.000000Z",
            },
            "parent_header": {}, "metadata": {}, "buffers": [], "channel": "shell",
            "content": {"code": code, "silent": false, "store_history": true, "user_expressions": {}, "allow_stdin": false, "stop_on_error": true},
        });
        self.ws.send(Message::Text(message.to_string().into())).await.context("cannot send to the kernel")?;
        let wait = async {
            let (mut replied, mut idle) = (false, false);
            while !(replied && idle) {
                let frame = self.ws.next().await.context("the kernel's websocket closed")??;
                let text = match frame {
                    Message::Text(text) => text,
                    Message::Close(_) => bail!("the kernel's websocket closed"),
                    _ => continue,
                };
                let msg: serde_json::Value = serde_json::from_str(&text)?;
                if msg["parent_header"]["msg_id"] != msg_id.as_str() {
                    continue;
                }
                match msg["msg_type"].as_str() {
                    Some("execute_reply") => {
                        if msg["content"]["status"] != "ok" {
                            bail!("the cell failed: {} {}", msg["content"]["ename"], msg["content"]["evalue"]);
                        }
                        replied = true;
                    }
                    Some("status") if msg["content"]["execution_state"] == "idle" => idle = true,
                    _ => {}
                }
            }
            Ok(())
        };
        tokio::time::timeout(EXECUTE_TIMEOUT, wait).await.context("no reply from the kernel in time")?
    }
}

/// The client side of the gateway.
pub struct Jkg {
    gateway: Gateway,
    prespawned: Mutex<VecDeque<String>>,
    baseline: u64,
    sessions: AtomicU64,
}

/// Starts a kernel with POST /api/kernels; the gateway answers once its seed cell ran.
async fn create_kernel(addr: SocketAddr) -> anyhow::Result<String> {
    let mut conn = Conn::open(addr, None).await?;
    let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, conn.post("/api/kernels", Bytes::from_static(br#"{"name": "python3"}"#)))
        .await
        .with_context(|| format!("POST /api/kernels did not answer within {REQUEST_TIMEOUT:?}"))??;
    if !status.is_success() {
        bail!("POST /api/kernels answered {status}: {}", String::from_utf8_lossy(&body));
    }
    let value: serde_json::Value = serde_json::from_slice(&body)?;
    value["id"].as_str().map(str::to_owned).context("no kernel id in the answer")
}

impl Jkg {
    async fn create_kernel(&self) -> anyhow::Result<String> {
        create_kernel(self.gateway.addr).await
    }
}

impl System for Jkg {
    type Client = ();
    type Session = KernelWs;

    async fn client(&self) -> anyhow::Result<()> {
        Ok(())
    }

    async fn first(&self, _: &mut (), _id: &str, code: &Code, cold: bool) -> anyhow::Result<KernelWs> {
        let taken = if cold { None } else { self.prespawned.lock().expect("lock").pop_front() };
        let kernel = match taken {
            Some(kernel) => kernel,
            None => self.create_kernel().await?,
        };
        let session = format!("bench-{}", self.sessions.fetch_add(1, Ordering::Relaxed));
        let mut ws = KernelWs::connect(self.gateway.addr, &kernel, session).await?;
        ws.execute(&code.text).await?;
        Ok(ws)
    }

    async fn exec(&self, _: &mut (), session: &mut KernelWs, code: &Code) -> anyhow::Result<()> {
        session.execute(&code.text).await
    }
}

impl Heavy for Jkg {
    fn cgroup(&self) -> &Cgroup {
        &self.gateway.cgroup
    }

    fn baseline(&self) -> u64 {
        self.baseline
    }

    async fn burst(&self, n: usize) -> anyhow::Result<()> {
        let starts = (0..n).map(|_| self.create_kernel());
        for result in futures_util::future::join_all(starts).await {
            result?;
        }
        Ok(())
    }
}

/// The memory of a gateway without kernels, in its own cgroup (measured once per run).
pub async fn measure_baseline(settings: &Settings) -> anyhow::Result<u64> {
    let gateway = Gateway::start(settings, "jkg-baseline", 0, false).await?;
    gateway.cgroup.wait_quiet(0.02, Duration::from_secs(20)).await;
    let usage = gateway.cgroup.memory()?.usage;
    gateway.stop().await;
    Ok(usage)
}

/// One round; `nodelay` runs the variant with TCP_NODELAY on the kernel websockets.
pub async fn round(settings: &Settings, round: usize, cells: &Cells, baseline: u64, nodelay: bool) -> Round {
    let name = if nodelay { "jkg-nodelay" } else { "jkg" };
    let mut result = Round::new(name, round);
    let n = heavy::prestart_count(settings);
    let start = Instant::now();
    let gateway = match Gateway::start(settings, &format!("{name}-r{round}"), n, nodelay).await {
        Ok(g) => g,
        Err(err) => {
            result.note(format!("the gateway did not start: {err:#}"));
            return result;
        }
    };
    let mut notes = Vec::new();
    let waited = gateway.wait_prespawned(n, Duration::from_secs(400), &mut notes).await;
    for note in notes {
        result.note(note);
    }
    match waited {
        Ok(kernels) => {
            result.set("prestart_seconds", start.elapsed().as_secs_f64());
            result.set("prestart_n", kernels.len() as f64);
            let sys = Arc::new(Jkg { gateway, prespawned: Mutex::new(kernels.into()), baseline, sessions: AtomicU64::new(0) });
            if let Err(err) = heavy::phases(&sys, settings, round, cells, &mut result).await {
                result.note(format!("round stopped: {err:#}"));
            }
            result.set("baseline_mib", mib(baseline as f64));
            match Arc::try_unwrap(sys) {
                Ok(sys) => sys.gateway.stop().await,
                Err(sys) => sys.gateway.cgroup.remove(),
            }
        }
        Err(err) => {
            result.note(format!("pre-spawn failed: {err:#}"));
            gateway.stop().await;
        }
    }
    result
}
