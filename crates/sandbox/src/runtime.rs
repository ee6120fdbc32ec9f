//! Provisioning of the Python runtime that sessions run on.
//!
//! A runtime is a virtual environment built from a base interpreter with a pinned package set,
//! stored under `<runtime dir>/python<version>-<hash>` where the hash covers everything that
//! shapes it (interpreter, packages, index). It is built on the first start that needs it,
//! with pip's progress in the log, and reused afterwards. A `.complete` marker written last
//! makes an interrupted build visible: it is deleted and redone, never used half-built.
//!
//! The zygote embeds the base interpreter's shared libpython, so the base interpreter must be
//! built with `--enable-shared` (Debian's `python3` is; so is pyenv's default here).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;

use crate::protocol::Bind;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Bump when the layout of a runtime directory changes, so old ones are rebuilt.
const LAYOUT_VERSION: &str = "1";
const MARKER: &str = ".complete";

/// Where sessions see the venv, whatever the host path: it keeps the state directory's
/// location out of sessions and away from their own `/tmp`.
pub const VENV_IN_SANDBOX: &str = "/opt/sandpool/venv";

/// Host directories that sessions replace with their own; a runtime cannot live there.
const SHADOWED: &[&str] = &["/tmp", "/mnt/data", "/proc", "/dev", "/etc", "/opt/sandpool"];

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct RuntimeSpec {
    /// Base interpreter; `None` searches `/usr/bin/python3`, then `python3` on `PATH`.
    pub python: Option<PathBuf>,
    /// pip requirement specifiers.
    pub packages: Vec<String>,
    /// Extra pip index URL, if any (`PIP_INDEX_URL` and pip's config are honoured anyway).
    pub index_url: Option<String>,
    /// Directory holding built runtimes.
    pub dir: PathBuf,
}

/// A ready runtime.
#[derive(Debug, Clone)]
pub struct PythonRuntime {
    pub version: String,
    /// `sys.base_prefix` of the base interpreter.
    pub home: PathBuf,
    pub libpython: PathBuf,
    pub venv: PathBuf,
    pub venv_python: PathBuf,
    pub site_packages: PathBuf,
    /// matplotlib's configuration and font cache, built at provisioning time.
    pub mpl_config: PathBuf,
}

impl PythonRuntime {
    /// The runtime's directories as a session sees them.
    pub fn binds(&self) -> Vec<Bind> {
        let mut binds = vec![
            Bind { host: self.venv.clone(), inside: VENV_IN_SANDBOX.into(), writable_during_warm_up: false },
            Bind { host: self.mpl_config.clone(), inside: self.in_sandbox(&self.mpl_config), writable_during_warm_up: true },
        ];
        let mut same_path = vec![self.home.clone()];
        if let Some(dir) = self.libpython.parent() {
            if !dir.starts_with(&self.home) {
                same_path.push(dir.to_owned());
            }
        }
        for path in same_path {
            if !path.starts_with("/usr") {
                binds.push(Bind { host: path.clone(), inside: path, writable_during_warm_up: false });
            }
        }
        binds
    }

    /// A path under the venv, as a session sees it.
    pub fn in_sandbox(&self, host_path: &Path) -> PathBuf {
        let relative = host_path.strip_prefix(&self.venv).expect("path inside the venv");
        Path::new(VENV_IN_SANDBOX).join(relative)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no Python 3 interpreter found (looked for {0}); install one (Debian: apt-get install python3 python3-venv libpython3-dev) or set [runtime] python in the config file")]
    NoPython(String),
    #[error("{python} cannot be used for sessions: {reason}")]
    Unusable { python: PathBuf, reason: String },
    #[error("installing the session packages failed (is the package index reachable?); last pip output:\n{0}")]
    Pip(String),
    #[error("building the runtime in {path} failed: {reason}")]
    Build { path: PathBuf, reason: String },
}

#[derive(Debug, Deserialize)]
struct Probe {
    version: String,
    base_prefix: PathBuf,
    enable_shared: Option<i64>,
    libdir: Option<PathBuf>,
    instsoname: Option<String>,
    ldlibrary: Option<String>,
    multiarch: Option<String>,
    has_venv: bool,
}

const PROBE: &str = r#"
import json, sys, sysconfig
try:
    import venv, ensurepip
    has_venv = True
except ImportError:
    has_venv = False
v = sysconfig.get_config_var
print(json.dumps({"version": "%d.%d.%d" % sys.version_info[:3], "base_prefix": sys.base_prefix,
  "enable_shared": v("Py_ENABLE_SHARED"), "libdir": v("LIBDIR"), "instsoname": v("INSTSONAME"),
  "ldlibrary": v("LDLIBRARY"), "multiarch": v("MULTIARCH"), "has_venv": has_venv}))
"#;

/// One runtime shared by every pool of a server: the first pool to start builds it, the
/// others wait for that build instead of starting their own.
pub struct SharedRuntime {
    spec: RuntimeSpec,
    cell: tokio::sync::OnceCell<Result<std::sync::Arc<PythonRuntime>, String>>,
}

impl SharedRuntime {
    pub fn new(spec: RuntimeSpec) -> SharedRuntime {
        SharedRuntime { spec, cell: tokio::sync::OnceCell::new() }
    }

    /// The runtime, built on first call. A failure is remembered: it needs the operator.
    pub async fn get(&self) -> Result<std::sync::Arc<PythonRuntime>, String> {
        self.cell.get_or_init(|| async { provision(&self.spec).await.map(std::sync::Arc::new).map_err(|e| e.to_string()) }).await.clone()
    }
}

/// Finds or builds the runtime described by `spec`.
pub async fn provision(spec: &RuntimeSpec) -> Result<PythonRuntime, RuntimeError> {
    let (python, probe) = find_python(spec.python.as_deref()).await?;
    let libpython = libpython_of(&python, &probe)?;
    for path in [&probe.base_prefix, &libpython] {
        if let Some(shadowed) = SHADOWED.iter().find(|dir| path.starts_with(dir)) {
            return Err(RuntimeError::Unusable {
                python,
                reason: format!("it lives under {shadowed}, which sessions replace with their own; install Python elsewhere"),
            });
        }
    }
    if !probe.has_venv {
        return Err(RuntimeError::Unusable {
            python,
            reason: "its venv or ensurepip module is missing (Debian: apt-get install python3-venv)".into(),
        });
    }
    let mut hasher = Sha256::new();
    for part in [LAYOUT_VERSION, &python.display().to_string(), &probe.version, spec.index_url.as_deref().unwrap_or("")] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    for package in &spec.packages {
        hasher.update(package.as_bytes());
        hasher.update([0]);
    }
    let hash = hex::encode(&hasher.finalize()[..6]);
    let minor = probe.version.rsplit_once('.').map(|(mm, _)| mm.to_owned()).unwrap_or_else(|| probe.version.clone());
    let venv = spec.dir.join(format!("python{minor}-{hash}"));
    let runtime = PythonRuntime {
        version: probe.version.clone(),
        home: probe.base_prefix.clone(),
        libpython,
        venv_python: venv.join("bin/python"),
        site_packages: venv.join(format!("lib/python{minor}/site-packages")),
        mpl_config: venv.join("mplconfig"),
        venv,
    };
    if runtime.venv.join(MARKER).exists() {
        tracing::info!(path = %runtime.venv.display(), "using the Python runtime built earlier");
        return Ok(runtime);
    }
    build(spec, &python, &runtime).await?;
    Ok(runtime)
}

async fn find_python(explicit: Option<&Path>) -> Result<(PathBuf, Probe), RuntimeError> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(path) => vec![path.to_owned()],
        None => {
            let mut found = vec![PathBuf::from("/usr/bin/python3")];
            if let Some(path) = std::env::var_os("PATH") {
                found.extend(std::env::split_paths(&path).map(|dir| dir.join("python3")));
            }
            found
        }
    };
    let mut last_error = None;
    for candidate in &candidates {
        if !candidate.exists() {
            continue;
        }
        match probe(candidate).await {
            Ok(probe) => match libpython_of(candidate, &probe) {
                Ok(_) => return Ok((candidate.clone(), probe)),
                Err(err) => last_error = Some(err),
            },
            Err(err) => last_error = Some(err),
        }
    }
    Err(last_error
        .unwrap_or_else(|| RuntimeError::NoPython(candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))))
}

async fn probe(python: &Path) -> Result<Probe, RuntimeError> {
    let unusable = |reason: String| RuntimeError::Unusable { python: python.to_owned(), reason };
    let output = Command::new(python)
        .args(["-I", "-c", PROBE])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| unusable(format!("cannot run it: {e}")))?;
    if !output.status.success() {
        return Err(unusable(format!("it failed: {}", String::from_utf8_lossy(&output.stderr).trim())));
    }
    let probe: Probe = serde_json::from_slice(&output.stdout).map_err(|e| unusable(format!("unexpected probe output: {e}")))?;
    if !probe.version.starts_with("3.") {
        return Err(unusable(format!("it is Python {}, sessions need Python 3", probe.version)));
    }
    Ok(probe)
}

fn libpython_of(python: &Path, probe: &Probe) -> Result<PathBuf, RuntimeError> {
    if probe.enable_shared != Some(1) {
        return Err(RuntimeError::Unusable {
            python: python.to_owned(),
            reason: "it was built without --enable-shared, so there is no libpython to embed (Debian's /usr/bin/python3 works)".into(),
        });
    }
    let mut dirs = Vec::new();
    if let Some(libdir) = &probe.libdir {
        dirs.push(libdir.clone());
        if let Some(multiarch) = &probe.multiarch {
            dirs.push(libdir.join(multiarch));
        }
    }
    for dir in &dirs {
        for name in [&probe.instsoname, &probe.ldlibrary].into_iter().flatten() {
            let candidate = dir.join(name);
            if candidate.exists() {
                return Ok(candidate);
            }
        }
    }
    Err(RuntimeError::Unusable {
        python: python.to_owned(),
        reason: format!("its shared libpython was not found in {dirs:?} (Debian: apt-get install libpython3-dev)"),
    })
}

async fn build(spec: &RuntimeSpec, python: &Path, runtime: &PythonRuntime) -> Result<(), RuntimeError> {
    let build_err = |reason: String| RuntimeError::Build { path: runtime.venv.clone(), reason };
    std::fs::create_dir_all(&spec.dir).map_err(|e| build_err(format!("cannot create {}: {e}", spec.dir.display())))?;
    // One builder at a time per runtime directory (tests start several servers at once).
    let lock_path = spec.dir.join(".lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| build_err(format!("cannot open {}: {e}", lock_path.display())))?;
    let _lock = tokio::task::spawn_blocking(move || nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive))
        .await
        .expect("lock task")
        .map_err(|(_, e)| build_err(format!("cannot lock {}: {e}", lock_path.display())))?;
    if runtime.venv.join(MARKER).exists() {
        return Ok(());
    }
    if runtime.venv.exists() {
        tracing::warn!(path = %runtime.venv.display(), "removing an incomplete Python runtime from an interrupted build");
        std::fs::remove_dir_all(&runtime.venv).map_err(|e| build_err(format!("cannot remove the incomplete build: {e}")))?;
    }
    tracing::info!(python = %python.display(), path = %runtime.venv.display(), packages = %spec.packages.join(" "), "building the Python runtime for sessions (first start only; this takes a minute)");
    run_logged(Command::new(python).args(["-m", "venv"]).arg(&runtime.venv), "venv").await.map_err(build_err)?;

    let mut pip = Command::new(&runtime.venv_python);
    pip.args(["-m", "pip", "install", "--no-input", "--progress-bar", "off", "--disable-pip-version-check"]);
    if let Some(index) = &spec.index_url {
        pip.args(["--index-url", index]);
    }
    pip.args(&spec.packages);
    run_logged(&mut pip, "pip").await.map_err(RuntimeError::Pip)?;

    // matplotlib builds its font cache on first import; do it now, once, into a directory
    // the zygote later mounts read-only.
    std::fs::create_dir_all(&runtime.mpl_config).map_err(|e| build_err(format!("cannot create the matplotlib cache: {e}")))?;
    let mut warm = Command::new(&runtime.venv_python);
    warm.args(["-c", "import importlib.util, sys\nif importlib.util.find_spec('matplotlib'):\n    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot\n"]);
    warm.env("MPLCONFIGDIR", &runtime.mpl_config);
    run_logged(&mut warm, "matplotlib").await.map_err(build_err)?;

    std::fs::write(runtime.venv.join(MARKER), b"").map_err(|e| build_err(format!("cannot write the completion marker: {e}")))?;
    tracing::info!(path = %runtime.venv.display(), "the Python runtime is ready");
    Ok(())
}

/// Runs a command, logging each output line as progress. On failure returns the last lines.
async fn run_logged(command: &mut Command, what: &'static str) -> Result<(), String> {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| format!("cannot start {what}: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for stream in [Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Unpin + Send>, Box::new(stderr)] {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let mut last_progress = tokio::time::Instant::now() - Duration::from_secs(60);
    while let Some(line) = rx.recv().await {
        let line = line.trim_end().to_owned();
        if line.is_empty() {
            continue;
        }
        // pip is chatty; show the lines that tell a human where it is.
        let notable = !line.starts_with(' ') || last_progress.elapsed() > Duration::from_secs(5);
        if notable {
            tracing::info!("{what}: {line}");
            last_progress = tokio::time::Instant::now();
        }
        tail.push_back(line);
        if tail.len() > 20 {
            tail.pop_front();
        }
    }
    let status = child.wait().await.map_err(|e| format!("{what} failed: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} exited with {status}:\n{}", Vec::from(tail).join("\n")))
    }
}
