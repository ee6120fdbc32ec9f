//! The boundary between the engine and a sandbox backend.
//!
//! API boundary: a backend (the Linux zygote backend, the OCI container backend)
//! implements [`SandboxFactory`] for a pool and [`Sandbox`] for each sandbox it creates. The
//! engine never learns how a sandbox is built; the backend never learns about identifiers,
//! pools' capacity or cooldowns.

use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::path::DataPath;

/// Creates the sandboxes of one pool.
#[async_trait]
pub trait SandboxFactory: Send + Sync + 'static {
    /// Prepares the backend (for the zygote backend: start the zygote and wait until its
    /// libraries are imported). Called once before the first [`SandboxFactory::create`].
    async fn start(&self) -> Result<RuntimeInfo, SandboxError>;

    /// Creates one sandbox, ready to execute code. `purpose` says whether a request waits
    /// for it or it goes to the ready queue (and may start up at a lower priority).
    async fn create(&self, purpose: Purpose) -> Result<Arc<dyn Sandbox>, SandboxError>;

    /// Stops the backend; sandboxes it created may be gone afterwards.
    async fn shutdown(&self);

    /// Sandboxes that outlived the previous server process and were found again by `start`
    /// (for the zygote backend: the sessions of a zygote that survived a crash). Taken once,
    /// right after `start`.
    fn adopted(&self) -> Vec<Arc<dyn Sandbox>> {
        Vec::new()
    }

    /// Stops what the backend runs for itself (a zygote, a spare sandbox) without touching
    /// what it shares with the pool's next backend (cgroups, directories). Called after a
    /// template change, once the last session this backend created is gone.
    async fn retire(&self) {}
}

/// Why a sandbox is being created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// For the ready queue: nobody waits for it, so it must not slow down requests.
    ReadyQueue,
    /// For a session a request is waiting on (the ready queue was empty).
    Waiting,
}

/// What a pool's runtime offers, for the `metadata` route.
#[derive(Debug, Clone)]
pub struct RuntimeInfo {
    pub language: String,
    pub language_version: String,
    pub packages: Vec<(String, String)>,
    pub started_at: SystemTime,
}

/// One sandbox. Methods take `&self`: the engine serialises executions per session itself.
#[async_trait]
pub trait Sandbox: Send + Sync + 'static {
    /// A unique id, stable for the sandbox's life (reported as the session GUID and etag).
    fn id(&self) -> &str;

    /// False once the sandbox's process is known to have ended.
    fn is_alive(&self) -> bool;

    /// Called on every lease: the sandbox now serves an identifier (it may have been warming
    /// up for the ready queue at a lower priority until now). Cheap after the first call.
    fn claim(&self) {}

    /// Runs one cell of code.
    async fn execute(&self, cell: Cell) -> Result<CellOutcome, SandboxError>;

    /// The sandbox's data directory, if it has one.
    fn files(&self) -> Option<&dyn FileStore>;

    /// The sandbox's own network service, for pools that forward requests to it (custom
    /// containers).
    fn upstream(&self) -> Option<&dyn Upstream> {
        None
    }

    /// Why the sandbox ended, once it has (and the backend knows).
    fn death(&self) -> Option<(DeathCause, String)> {
        None
    }

    /// Stops the sandbox and frees everything it holds. Idempotent.
    async fn destroy(&self);
}

/// The network service inside a sandbox: the target port of a custom container.
#[async_trait]
pub trait Upstream: Send + Sync {
    /// Opens a new TCP connection to the service.
    async fn connect(&self) -> Result<tokio::net::TcpStream, SandboxError>;
}

/// A request to run code.
#[derive(Debug, Clone)]
pub struct Cell {
    pub code: String,
    pub timeout: Duration,
    /// Cap on each of stdout and stderr, in characters.
    pub output_cap: usize,
}

/// How a cell ended, when the sandbox survived it.
#[derive(Debug, Clone, PartialEq)]
pub struct CellOutcome {
    pub status: CellStatus,
    pub stdout: String,
    pub stderr: String,
    pub result: CellResult,
    /// `(exception type, message)` when the code raised or timed out.
    pub error: Option<(String, String)>,
    pub duration: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellStatus {
    Success,
    /// The code raised an exception.
    Error,
    /// The code ran past its timeout and was interrupted; the session lives on.
    Timeout,
}

/// The value of a cell's last expression.
#[derive(Debug, Clone, PartialEq)]
pub enum CellResult {
    None,
    /// A JSON value (the expression was JSON-serialisable), as JSON text.
    Json(String),
    /// The text representation of a value that is not JSON-serialisable.
    Repr(String),
    /// A rendered figure.
    Image {
        format: String,
        base64_data: String,
    },
}

/// Why a sandbox operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SandboxError {
    /// The sandbox ended (crash, `os._exit`, out of memory, killed after a timeout). The
    /// session is gone; the message says why in words a user understands.
    #[error("{message}")]
    Died { cause: DeathCause, message: String },
    /// The backend cannot create sandboxes right now.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else; a bug or a host problem.
    #[error("{0}")]
    Internal(String),
}

/// Why a sandbox ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathCause {
    OutOfMemory,
    Exited,
    Crashed,
    /// Killed by sandpool because an execution did not stop at its timeout.
    Unresponsive,
    /// Its backend (for example the zygote) went away.
    BackendLost,
    /// It failed its liveness or startup probe and was stopped.
    Unhealthy,
}

/// A file or directory in a sandbox's data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Path relative to the data directory.
    pub path: DataPath,
    pub kind: FileKind,
    pub size: u64,
    pub modified: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Directory,
}

/// Blocking file operations on a sandbox's data directory. Implementations must never read
/// or write outside it, whatever links the sandbox created. Call from blocking threads.
pub trait FileStore: Send + Sync {
    /// Entries of the directory `dir`; with `recursive`, of its whole subtree.
    fn list(&self, dir: &DataPath, recursive: bool) -> Result<Vec<FileEntry>, FileError>;
    fn stat(&self, path: &DataPath) -> Result<FileEntry, FileError>;
    /// Opens a regular file for reading.
    fn open_read(&self, path: &DataPath) -> Result<(File, FileEntry), FileError>;
    /// Creates or truncates a regular file (and its parent directories), owned by the
    /// sandbox's user, and opens it for writing.
    fn create(&self, path: &DataPath) -> Result<File, FileError>;
    /// Removes a file, or a directory with everything in it.
    fn delete(&self, path: &DataPath) -> Result<(), FileError>;
}

/// Why a file operation failed; messages are safe to show to the client.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("file {0:?} was not found in /mnt/data")]
    NotFound(String),
    #[error("{0:?} is a directory")]
    IsDirectory(String),
    #[error("{0:?} is not a directory")]
    NotDirectory(String),
    #[error("{0:?} is not a regular file")]
    NotRegular(String),
    #[error("{0:?} leads outside /mnt/data (through a symbolic link or mount)")]
    Escapes(String),
    #[error("the session's /mnt/data is full")]
    NoSpace,
    #[error("file operation failed: {0}")]
    Io(#[from] std::io::Error),
}
