//! The Linux sandbox backend for Python code-interpreter pools.
//!
//! Each pool has a **zygote** ([`zygote`]): a process started from this same binary that
//! builds a private read-only root, loads libpython and imports the pool's libraries once,
//! then forks one child per session. The child locks itself down (namespaces, its own uid,
//! cgroup limits, private `/mnt/data` and `/tmp`) before any Python runs, and then serves
//! executions over a socket with the embedded runner (`runner.py`).
//!
//! Host side:
//! * [`runtime`]: builds the Python runtime (a venv with the pinned packages) on first start.
//! * [`cgroup`]: cgroup v1/v2 detection, per-pool parents, per-session limits and clean-up.
//! * [`driver`]: starts and supervises a pool's zygote and implements the engine's
//!   [`SandboxFactory`](sandpool_engine::backend::SandboxFactory) and
//!   [`Sandbox`](sandpool_engine::backend::Sandbox) traits on top of it.
//! * [`files`]: the files API's operations on a session's `/mnt/data`, confined with
//!   `openat2(RESOLVE_BENEATH)`.
//! * [`protocol`] and [`fdpass`]: the wire between server, zygote and runner;
//!   [`runner_link`]: the server's end of a runner connection (any stream).
//! * [`netns`]: network namespaces with only loopback, and connections into them (used by
//!   the container backend to reach a session's port).
//! * [`pidfd`]: watching a process that is not our child until it ends.
//!
//! Architecture invariant: `unsafe` code in the workspace lives in this crate only, in the
//! modules that talk to the kernel or to libpython directly.

pub mod cgroup;
pub mod cpu_gate;
pub mod driver;
pub mod fdpass;
pub mod files;
pub mod netns;
pub mod pidfd;
pub mod protocol;
pub mod runner_link;
pub mod runtime;
pub mod uids;
pub mod zygote;
