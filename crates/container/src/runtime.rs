//! Driving an OCI runtime: `crun` (the default) or `runsc` (gVisor, the strong-isolation
//! option). Each call is one short command; containers run detached and outlive the call.
//!
//! This host's cgroup layout is hybrid: the v1 controllers are mounted under `/sys/fs/cgroup`
//! and a nearly empty cgroup2 hierarchy at `/sys/fs/cgroup/unified`. crun 1.8 refuses hybrid
//! layouts, so on such hosts every crun call runs in a private mount namespace where that
//! cgroup2 mount is hidden; crun then uses the v1 controllers ("legacy" mode) and applies
//! the limits. runsc copes with the hybrid layout by itself.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// Which OCI runtime a pool uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    Crun,
    Runsc,
}

impl RuntimeKind {
    pub fn parse(text: &str) -> Option<RuntimeKind> {
        match text {
            "crun" => Some(RuntimeKind::Crun),
            "runsc" | "gvisor" => Some(RuntimeKind::Runsc),
            _ => None,
        }
    }

    pub fn binary_name(self) -> &'static str {
        match self {
            RuntimeKind::Crun => "crun",
            RuntimeKind::Runsc => "runsc",
        }
    }
}

/// How long a runtime command may take before it is considered stuck.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A located runtime binary and its state directory.
#[derive(Debug, Clone)]
pub struct OciRuntime {
    kind: RuntimeKind,
    binary: PathBuf,
    /// The runtime's own state (`--root`), one per pool.
    root: PathBuf,
    /// The cgroup2 mount to hide from crun on a hybrid host.
    hybrid_cgroup2: Option<PathBuf>,
    version: String,
}

impl OciRuntime {
    /// Finds the runtime on `PATH` (or in `/usr/bin`, `/usr/sbin`) and checks that it runs.
    /// The error says how to install it.
    pub async fn locate(kind: RuntimeKind, root: PathBuf) -> Result<OciRuntime, String> {
        OciRuntime::locate_in(kind, root, &search_path()).await
    }

    async fn locate_in(kind: RuntimeKind, root: PathBuf, dirs: &[PathBuf]) -> Result<OciRuntime, String> {
        let name = kind.binary_name();
        let binary = dirs.iter().map(|dir| dir.join(name)).find(|candidate| candidate.is_file()).ok_or_else(|| {
            format!("the OCI runtime '{name}' is not installed (it is needed by this pool); on Debian: apt-get install {name}")
        })?;
        let output = Command::new(&binary)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
        if !output.status.success() {
            return Err(format!("{} --version failed: {}", binary.display(), String::from_utf8_lossy(&output.stderr).trim()));
        }
        let version = String::from_utf8_lossy(&output.stdout).lines().next().unwrap_or_default().trim().to_owned();
        std::fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        let hybrid_cgroup2 = if kind == RuntimeKind::Crun { hybrid_cgroup2_mount() } else { None };
        Ok(OciRuntime { kind, binary, root, hybrid_cgroup2, version })
    }

    pub fn kind(&self) -> RuntimeKind {
        self.kind
    }

    /// The runtime's `--version` line, e.g. "crun version 1.8.1".
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Starts the container of `bundle` detached, writes its pid to `pid_file`, and sends its
    /// stdout and stderr to `console`. Returns the pid: crun's is the container's main
    /// process, runsc's the sandbox process that lives exactly as long as the container.
    pub async fn run_detached(
        &self,
        id: &str,
        bundle: &Path,
        pid_file: &Path,
        console: std::fs::File,
        console_path: &Path,
    ) -> Result<u32, String> {
        let mut args: Vec<String> = Vec::new();
        args.extend([
            "run".into(),
            "--detach".into(),
            "--pid-file".into(),
            path_arg(pid_file),
            "--bundle".into(),
            path_arg(bundle),
            id.into(),
        ]);
        let console_err = console.try_clone().map_err(|e| format!("cannot open the console log: {e}"))?;
        let mut command = self.command(&args);
        // The container inherits these as its stdout and stderr; crun's own messages go there
        // too, so an error is read back from the file below.
        command.stdout(Stdio::from(console)).stderr(Stdio::from(console_err));
        let status = run_with_timeout(command, &format!("{} run", self.kind.binary_name())).await?;
        if !status.success() {
            let log = std::fs::read_to_string(console_path).unwrap_or_default();
            let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("; ");
            return Err(format!("{} could not start the container ({status}): {tail}", self.kind.binary_name()));
        }
        let text = std::fs::read_to_string(pid_file).map_err(|e| format!("the runtime wrote no pid file: {e}"))?;
        text.trim().parse().map_err(|_| format!("the runtime's pid file holds {text:?}, not a pid"))
    }

    /// Kills the container and deletes the runtime's record of it. Never fails: what cannot
    /// be removed is logged.
    pub async fn remove(&self, id: &str) {
        let args: Vec<String> = vec!["delete".into(), "--force".into(), id.into()];
        let mut command = self.command(&args);
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        match tokio::time::timeout(COMMAND_TIMEOUT, command.output()).await {
            Ok(Ok(output)) if output.status.success() => {}
            Ok(Ok(output)) => {
                let stderr = String::from_utf8_lossy(&output.stderr);
                // Already gone is fine (a container that exited and was cleaned up).
                if !stderr.contains("does not exist") && !stderr.contains("not exist") {
                    tracing::warn!(container = id, "{} delete failed: {}", self.kind.binary_name(), stderr.trim());
                }
            }
            Ok(Err(err)) => tracing::warn!(container = id, "cannot run {}: {err}", self.binary.display()),
            Err(_) => tracing::warn!(container = id, "{} delete timed out", self.kind.binary_name()),
        }
    }

    /// The ids of the containers in this runtime's state directory (for clean-up at start).
    pub fn known_containers(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Vec::new() };
        let mut ids: Vec<String> = entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                if entry.path().is_dir() {
                    // crun: a directory per container.
                    return Some(name);
                }
                // runsc: `<id>_sandbox:<sandbox id>.state` (and a `.lock` beside it).
                name.strip_suffix(".state").and_then(|stem| stem.split_once("_sandbox:")).map(|(id, _)| id.to_owned())
            })
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    fn command(&self, args: &[String]) -> Command {
        let mut global = vec![format!("--root={}", path_arg(&self.root))];
        if self.kind == RuntimeKind::Runsc {
            // ptrace is the only platform this host's 2022 runsc offers without KVM; the
            // sandbox uses the network namespace named in the spec through host sockets, and
            // that namespace holds only loopback (see `netns`).
            // `--oci-seccomp` applies the spec's filter inside the sandbox too; without it
            // runsc ignores it (and its Sentry implements io_uring, for one).
            global.extend(["--platform=ptrace".into(), "--network=host".into(), "--oci-seccomp".into()]);
        }
        let mut command = match &self.hybrid_cgroup2 {
            Some(mount) => {
                let mut command = Command::new("unshare");
                command
                    .args(["--mount", "--propagation", "private", "--", "sh", "-c", r#"umount -l "$0" && exec "$@""#])
                    .arg(mount)
                    .arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        };
        command.args(&global).args(args).stdin(Stdio::null()).kill_on_drop(true);
        command
    }
}

async fn run_with_timeout(mut command: Command, what: &str) -> Result<std::process::ExitStatus, String> {
    let mut child = command.spawn().map_err(|e| format!("cannot start {what}: {e}"))?;
    match tokio::time::timeout(COMMAND_TIMEOUT, child.wait()).await {
        Ok(status) => status.map_err(|e| format!("{what} failed: {e}")),
        Err(_) => {
            let _ = child.kill().await;
            Err(format!("{what} did not finish within {COMMAND_TIMEOUT:?}"))
        }
    }
}

fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// `PATH`, then the usual system directories (a service's `PATH` is often minimal).
fn search_path() -> Vec<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain(["/usr/bin", "/usr/sbin", "/usr/local/bin"].map(PathBuf::from)).collect()
}

/// The cgroup2 mount point when the host also has v1 controllers mounted (a hybrid layout).
fn hybrid_cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut cgroup2 = None;
    let mut has_v1 = false;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let mount_point = left.split(' ').nth(4).unwrap_or_default();
        match right.split(' ').next() {
            Some("cgroup2") => cgroup2 = Some(PathBuf::from(mount_point)),
            Some("cgroup") => has_v1 = true,
            _ => {}
        }
    }
    cgroup2.filter(|_| has_v1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_names_parse() {
        assert_eq!(RuntimeKind::parse("crun"), Some(RuntimeKind::Crun));
        assert_eq!(RuntimeKind::parse("runsc"), Some(RuntimeKind::Runsc));
        assert_eq!(RuntimeKind::parse("gvisor"), Some(RuntimeKind::Runsc));
        assert_eq!(RuntimeKind::parse("runc"), None);
    }

    #[test]
    fn containers_left_in_the_state_directory_are_found_for_both_runtimes() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("spcrun1")).unwrap();
        for file in ["sprunsc2_sandbox:sprunsc2.state", "sprunsc2_sandbox:sprunsc2.lock", "stray.txt"] {
            std::fs::write(root.path().join(file), b"").unwrap();
        }
        let runtime = OciRuntime {
            kind: RuntimeKind::Runsc,
            binary: "/bin/true".into(),
            root: root.path().to_owned(),
            hybrid_cgroup2: None,
            version: String::new(),
        };
        assert_eq!(runtime.known_containers(), vec!["spcrun1".to_owned(), "sprunsc2".to_owned()]);
    }

    #[tokio::test]
    async fn a_missing_runtime_is_explained() {
        let empty = tempfile::tempdir().unwrap();
        let err = OciRuntime::locate_in(RuntimeKind::Runsc, empty.path().join("state"), &[empty.path().to_owned()]).await.unwrap_err();
        assert!(err.contains("'runsc' is not installed") && err.contains("apt-get install runsc"), "{err}");
    }
}
