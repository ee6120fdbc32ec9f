//! End-to-end tests of the real `sandpool` binary over real HTTP, with real sandboxes.
//!
//! One test binary (ripgrep's layout); each module covers one area:
//! * `routes`: every data-plane route of both API generations and their response shapes;
//! * `errors`: authentication, identifier validation and every client error case;
//! * `auth`: roles, identifier-scoped tokens and API keys;
//! * `files`: the files API, its limits and its confinement to `/mnt/data`;
//! * `lifecycle`: allocation, cooldown, deletion, timeouts, session death, refill;
//! * `isolation`: what a session can and cannot see or do;
//! * `attacks`: hostile code trying to get out, denied or contained;
//! * `telemetry`: metrics, the session event log, timing headers;
//! * `cli`: `sandpool token issue`, `sandpool exec` and configuration errors;
//! * `tidy`: repository hygiene (module docs on every file, no hidden tests).
//!
//! These tests need root, cgroups and a Python 3 with a shared libpython, as the server does.

mod attacks;
mod auth;
mod cli;
mod errors;
mod files;
mod isolation;
mod lifecycle;
mod routes;
mod support;
mod telemetry;
mod tidy;
