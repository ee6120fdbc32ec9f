//! Custom container sessions: each session runs the operator's own OCI image under an OCI
//! runtime (`crun` by default, `runsc` for gVisor), and the API forwards requests to it.
//!
//! Layout:
//! * [`image`]: image references (registry, OCI layout directory, docker-archive tarball),
//!   fetching with digests verified, and unpacking each image once per digest into a
//!   read-only root filesystem.
//! * `spec`: the OCI runtime spec (`config.json`) of one session's bundle.
//! * `netns`: the network namespace of one session, and connections into it.
//! * `runtime`: driving `crun` and `runsc` (create, kill, delete), including this host's
//!   hybrid cgroup layout.
//! * `probe`: liveness and startup probes (HTTP and TCP).
//! * `factory`: the engine's `SandboxFactory` and `Sandbox` for container pools.
//! * `egress`: outbound access for `EgressEnabled` pools: a veth per session, nftables rules.
//! * `python`: Python code-interpreter pools under gVisor: each session a `runsc` container
//!   with a read-only skeleton root, running the same runner as zygote sessions.
//!
//! Architecture invariant: nothing a session writes reaches the unpacked image or another
//! session: every session gets its own overlay whose upper layer is private to it.

pub mod egress;
pub mod factory;
pub mod image;
pub mod probe;
pub mod python;
pub mod runtime;
pub mod spec;
