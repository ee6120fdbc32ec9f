//! Messages between the server and a pool's zygote, and between the server and a session's
//! runner.
//!
//! * Zygote control channel: a `SOCK_SEQPACKET` socket pair, one JSON document per datagram.
//!   [`Spawned`](ZygoteEvent::Spawned) carries the server's end of the new session's socket as
//!   `SCM_RIGHTS`.
//! * Session channel: a `SOCK_STREAM` socket pair, frames of a 4-byte big-endian length then
//!   JSON. The runner (`runner.py`) speaks the other end; keep the two in step.
//!
//! These types cross a process boundary but never a version boundary: the zygote is the same
//! binary as the server, so there is no version negotiation.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Largest control datagram we read; the zygote's init config is the biggest message.
pub const MAX_CONTROL_MESSAGE: usize = 1 << 20;

/// Largest runner frame the server accepts. A reply holds at most two capped output streams,
/// a capped result and one PNG, so this is generous; a bigger frame means a broken runner.
pub const MAX_RUNNER_FRAME: usize = 256 << 20;

/// Everything the zygote needs to build its root, start Python and lock sessions down.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZygoteConfig {
    pub pool: String,
    /// Empty host directory on which the zygote mounts its private root (in its own mount
    /// namespace, so the host never sees the mounts).
    pub root_dir: PathBuf,
    /// Host directories exposed inside sessions (the runtime, the venv).
    pub binds: Vec<Bind>,
    /// Host `/etc` entries exposed read-only; everything else in `/etc` is hidden.
    pub etc_entries: Vec<String>,
    pub python: PythonLaunch,
    /// Environment of the zygote and thus of every session.
    pub env: Vec<(String, String)>,
    pub session: SessionPlan,
    /// Where the zygote listens for a restarted server (a `SOCK_SEQPACKET` Unix socket, root
    /// only): it outlives the server that started it, with its sessions, so that the next
    /// server can adopt them ([`ZygoteCommand::Adopt`]).
    pub adopt_socket: PathBuf,
}

impl ZygoteConfig {
    /// Identifies what the zygote was started with: a restarted server adopts a zygote only
    /// when its own config for the pool is the same.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        // Each zygote has a socket of its own; the rest is what makes zygotes alike.
        let comparable = ZygoteConfig { adopt_socket: PathBuf::new(), ..self.clone() };
        let bytes = serde_json::to_vec(&comparable).expect("the config serialises");
        hex::encode(sha2::Sha256::digest(bytes))
    }
}

/// A host directory made visible inside the zygote's root.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Bind {
    pub host: PathBuf,
    /// Where it appears inside the root.
    pub inside: PathBuf,
    /// Writable while the zygote warms up (matplotlib's cache), read-only before the first
    /// session is forked. Every other bind is read-only from the start.
    pub writable_during_warm_up: bool,
}

/// How to start the embedded interpreter inside the zygote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PythonLaunch {
    pub libpython: PathBuf,
    /// `sys.base_prefix` of the base interpreter, exported as `PYTHONHOME`.
    pub home: PathBuf,
    /// Inside the root.
    pub site_packages: PathBuf,
    /// The venv's `python` (inside the root), reported as `sys.executable` so `subprocess`
    /// and pip work.
    pub executable: PathBuf,
    /// Modules imported once in the zygote and shared copy-on-write by every session.
    pub preload_modules: Vec<String>,
}

/// Per-session resources, identical for every session of a pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionPlan {
    pub data_dir_bytes: u64,
    pub tmp_dir_bytes: u64,
    pub max_open_files: u64,
    pub max_processes: u64,
    /// CPU time a session process may use in its life (RLIMIT_CPU), in seconds.
    pub max_cpu_seconds: u64,
    /// cgroup directories (host paths) under which each session gets a child cgroup.
    pub cgroup_parents: Vec<PathBuf>,
    /// Files to write in each new session cgroup: (index into `cgroup_parents`, file, value).
    pub cgroup_limits: Vec<CgroupWrite>,
    /// Extra files to write in the cgroup of a warming session (the idle CPU priority); the
    /// server undoes them when the session is claimed.
    pub cgroup_warming: Vec<CgroupWrite>,
    /// Cap on each captured output stream, in bytes.
    pub output_cap_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CgroupWrite {
    pub parent: usize,
    pub file: String,
    pub value: String,
}

/// Server → zygote.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ZygoteCommand {
    /// Fork a new locked-down session. A `warming` session is for the ready queue: it starts
    /// at idle CPU priority (see [`SessionPlan::cgroup_warming`]) until it is claimed.
    Spawn { sandbox_id: String, uid: u32, gid: u32, warming: bool },
    /// Sent by a restarted server on the adopt socket: the zygote answers with `Ready`, one
    /// `Survivor` per live session (with a duplicate of its socket) and `AdoptionDone`.
    Adopt,
}

/// Zygote → server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum ZygoteEvent {
    /// The interpreter is warm; sessions can be forked.
    Ready {
        python_version: String,
        packages: Vec<(String, String)>,
    },
    /// A session process exists; its socket travels with this message.
    Spawned {
        sandbox_id: String,
        pid: i32,
    },
    SpawnFailed {
        sandbox_id: String,
        error: String,
    },
    /// A live session, reported to a server adopting the zygote; its socket travels with it.
    Survivor {
        sandbox_id: String,
        pid: i32,
        uid: u32,
    },
    /// Every survivor was reported; `fingerprint` is the zygote's config's
    /// ([`ZygoteConfig::fingerprint`]).
    AdoptionDone {
        fingerprint: String,
        zygote_pid: i32,
    },
    /// A direct child of the zygote (a session's main process) ended.
    Exited {
        pid: i32,
        code: Option<i32>,
        signal: Option<i32>,
    },
}

/// Server → runner.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RunnerRequest {
    /// `id` comes back in the reply: a server that adopted the session after a crash skips
    /// the reply to a request its predecessor sent.
    Execute { id: u64, code: String, timeout_ms: u64, output_cap: u64 },
}

/// Runner → server: the first frame after the session starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnerHello {
    pub ready: bool,
    #[serde(default)]
    pub error: Option<String>,
    /// Sent by gVisor sessions, which have no zygote to report the runtime.
    #[serde(default)]
    pub python_version: Option<String>,
    #[serde(default)]
    pub packages: Vec<(String, String)>,
}

/// Runner → server: the outcome of one execution.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnerReply {
    /// The request's `id`.
    #[serde(default)]
    pub id: u64,
    /// `success`, `error` (the code raised) or `timeout`.
    pub status: String,
    pub stdout: String,
    pub stderr: String,
    /// JSON value of the last expression, `null` when there is none.
    #[serde(default)]
    pub result: serde_json::Value,
    /// `none`, `json`, `repr` or `image`.
    pub result_kind: String,
    #[serde(default)]
    pub error_name: Option<String>,
    #[serde(default)]
    pub error_message: Option<String>,
    pub duration_ms: u64,
}
