//! bubblewrap + python3 under test: a fresh sandboxed interpreter per session, started as
//! `bwrap … python -u -c <repl.py>` from the same venv as sandpool's sessions, importing numpy,
//! pandas and matplotlib before it says it is ready. The benchmark keeps pre-started
//! interpreters (a client-side ready queue) for first executions, and starts one on demand
//! when asked for a cold allocation. Cells go over stdin/stdout as length-prefixed frames.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::heavy::{self, Heavy};
use crate::host::Cgroup;
use crate::results::Round;
use crate::workload::{Cells, Code, System};
use crate::Settings;

const REPL: &str = include_str!("repl.py");
const START_TIMEOUT: Duration = Duration::from_secs(180);
const EXECUTE_TIMEOUT: Duration = Duration::from_secs(120);

/// One sandboxed interpreter.
pub struct Interp {
    _child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
}

/// The `bwrap` command line for the venv at `venv`.
fn bwrap_args(venv: &Path) -> anyhow::Result<Vec<String>> {
    let mut args: Vec<String> = [
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--ro-bind",
        "/",
        "/",
        "--tmpfs",
        "/tmp",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--dir",
        "/tmp/mpl",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // matplotlib's font cache, read-only, in a writable directory (matplotlib insists on one).
    let mpl = venv.join("mplconfig");
    for entry in std::fs::read_dir(&mpl).with_context(|| format!("cannot read {}", mpl.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        args.extend(["--ro-bind".into(), entry.path().display().to_string(), format!("/tmp/mpl/{name}")]);
    }
    args.extend(
        [
            "--uid",
            "65534",
            "--gid",
            "65534",
            "--cap-drop",
            "ALL",
            "--chdir",
            "/tmp",
            "--clearenv",
            "--setenv",
            "PATH",
            "/usr/bin:/bin",
            "--setenv",
            "HOME",
            "/tmp",
            "--setenv",
            "MPLCONFIGDIR",
            "/tmp/mpl",
            "--setenv",
            "MPLBACKEND",
            "Agg",
            "--setenv",
            "OPENBLAS_NUM_THREADS",
            "1",
            "--setenv",
            "OMP_NUM_THREADS",
            "1",
            "--setenv",
            "MKL_NUM_THREADS",
            "1",
            "--",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.extend([venv.join("bin/python").display().to_string(), "-u".into(), "-c".into(), REPL.into()]);
    Ok(args)
}

impl Interp {
    pub async fn spawn(bwrap: &Path, args: &[String], cgroup: &Cgroup, log: &Path) -> anyhow::Result<Interp> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut child = cgroup
            .command(bwrap, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("cannot start bwrap")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut interp = Interp { _child: child, stdin, stdout };
        let hello = tokio::time::timeout(START_TIMEOUT, interp.read_frame()).await.context("the interpreter did not start in time")??;
        if !crate::http::contains(&hello, b"\"ready\": true") {
            bail!("unexpected hello: {}", String::from_utf8_lossy(&hello));
        }
        Ok(interp)
    }

    async fn read_frame(&mut self) -> anyhow::Result<Vec<u8>> {
        let length = self.stdout.read_u32().await.context("the interpreter exited")? as usize;
        let mut buf = vec![0; length];
        self.stdout.read_exact(&mut buf).await.context("the interpreter exited mid-reply")?;
        Ok(buf)
    }

    pub async fn execute(&mut self, code: &str) -> anyhow::Result<()> {
        let mut frame = Vec::with_capacity(code.len() + 4);
        frame.extend_from_slice(&(code.len() as u32).to_be_bytes());
        frame.extend_from_slice(code.as_bytes());
        self.stdin.write_all(&frame).await.context("the interpreter exited")?;
        self.stdin.flush().await?;
        let reply = tokio::time::timeout(EXECUTE_TIMEOUT, self.read_frame()).await.context("no reply in time")??;
        if !crate::http::contains(&reply, b"\"ok\": true") {
            bail!("the cell failed: {}", String::from_utf8_lossy(&reply[..reply.len().min(400)]));
        }
        Ok(())
    }
}

/// The bwrap system: pre-started interpreters and the means to start more.
pub struct Bwrap {
    bwrap: PathBuf,
    args: Vec<String>,
    cgroup: Cgroup,
    log: PathBuf,
    prestarted: Mutex<VecDeque<Interp>>,
    spare: tokio::sync::Mutex<Vec<Interp>>,
}

impl Bwrap {
    /// Starts `n` interpreters, at most `concurrency` at a time.
    async fn start_many(&self, n: usize, concurrency: usize) -> anyhow::Result<Vec<Interp>> {
        let mut out = Vec::with_capacity(n);
        let mut running = tokio::task::JoinSet::new();
        let mut started = 0;
        while out.len() < n {
            while started < n && running.len() < concurrency {
                let (bwrap, args, cgroup, log) = (self.bwrap.clone(), self.args.clone(), self.cgroup.clone(), self.log.clone());
                running.spawn(async move { Interp::spawn(&bwrap, &args, &cgroup, &log).await });
                started += 1;
            }
            match running.join_next().await {
                Some(joined) => out.push(joined??),
                None => break,
            }
        }
        Ok(out)
    }
}

impl System for Bwrap {
    type Client = ();
    type Session = Interp;

    async fn client(&self) -> anyhow::Result<()> {
        Ok(())
    }

    async fn first(&self, _: &mut (), _id: &str, code: &Code, cold: bool) -> anyhow::Result<Interp> {
        let taken = if cold { None } else { self.prestarted.lock().expect("lock").pop_front() };
        let mut interp = match taken {
            Some(interp) => interp,
            None => Interp::spawn(&self.bwrap, &self.args, &self.cgroup, &self.log).await?,
        };
        interp.execute(&code.text).await?;
        Ok(interp)
    }

    async fn exec(&self, _: &mut (), session: &mut Interp, code: &Code) -> anyhow::Result<()> {
        session.execute(&code.text).await
    }
}

impl Heavy for Bwrap {
    fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    fn baseline(&self) -> u64 {
        0
    }

    async fn burst(&self, n: usize) -> anyhow::Result<()> {
        let started = self.start_many(n, n).await?;
        self.spare.lock().await.extend(started);
        Ok(())
    }
}

pub async fn round(settings: &Settings, round: usize, cells: &Cells) -> Round {
    let mut result = Round::new("bwrap", round);
    if let Err(err) = run(settings, round, cells, &mut result).await {
        result.note(format!("round stopped: {err:#}"));
    }
    result
}

async fn run(settings: &Settings, round: usize, cells: &Cells, result: &mut Round) -> anyhow::Result<()> {
    let cgroup = Cgroup::create(&format!("bench-bwrap-r{round}"))?;
    let empty = cgroup.memory()?.usage;
    if empty > 16 << 20 {
        result.note(format!("the fresh cgroup already holds {empty} bytes"));
    }
    let sys = Arc::new(Bwrap {
        bwrap: settings.bwrap.clone(),
        args: bwrap_args(&settings.venv)?,
        cgroup: cgroup.clone(),
        log: settings.work_dir.join("bwrap.log"),
        prestarted: Mutex::new(VecDeque::new()),
        spare: tokio::sync::Mutex::new(Vec::new()),
    });
    let n = heavy::prestart_count(settings);
    let start = Instant::now();
    let outcome = async {
        let interps = sys.start_many(n, 8).await?;
        result.set("prestart_seconds", start.elapsed().as_secs_f64());
        result.set("prestart_n", interps.len() as f64);
        sys.prestarted.lock().expect("lock").extend(interps);
        heavy::phases(&sys, settings, round, cells, result).await
    }
    .await;
    drop(sys);
    cgroup.remove();
    outcome
}
