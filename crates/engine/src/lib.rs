//! The session engine: pools of ready sandboxes, sessions bound to identifiers, and their
//! lifecycle (allocation, cooldown, deletion, death).
//!
//! Layout:
//! * [`backend`]: the traits a sandbox backend implements ([`backend::SandboxFactory`],
//!   [`backend::Sandbox`], [`backend::FileStore`]) and the values that cross them.
//! * [`pool`]: one [`pool::Pool`] per configured pool: its ready queue, its session table,
//!   the refill and cooldown tasks.
//! * [`session`]: a [`session::Session`] and the [`session::SessionLease`] a request holds
//!   while it uses one; executions and their history.
//! * [`events`]: what happens to sessions and pools, reported to an [`events::EventSink`]
//!   (metrics, the session event log).
//! * [`identifier`] and [`path`]: validated newtypes for what clients send.
//!
//! Architecture invariant: this crate knows nothing about HTTP, JSON wire shapes, tokens or
//! Linux. The API crate translates requests into calls here; backends live in other crates.

pub mod backend;
pub mod events;
pub mod identifier;
pub mod path;
pub mod pool;
pub mod session;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

pub use identifier::Identifier;
pub use pool::{Lifecycle, Pool, PoolKind, PoolSettings};

/// All pools of one server, by name. Pools come and go at run time (the management API);
/// callers hold an `Arc<Pool>` for as long as a request needs it.
pub struct Engine {
    pools: RwLock<BTreeMap<String, Arc<Pool>>>,
}

impl Engine {
    pub fn new(pools: Vec<Arc<Pool>>) -> Engine {
        Engine { pools: RwLock::new(pools.into_iter().map(|pool| (pool.name().to_owned(), pool)).collect()) }
    }

    pub fn pool(&self, name: &str) -> Option<Arc<Pool>> {
        self.pools.read().expect("pools lock").get(name).cloned()
    }

    /// Every pool, by name.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.pools.read().expect("pools lock").values().cloned().collect()
    }

    /// True once every pool is running and has a ready session (or needs none).
    pub fn is_ready(&self) -> bool {
        self.pools().iter().all(|pool| pool.is_ready())
    }

    /// Adds a pool (started by the caller), or replaces the pool of the same name: the old
    /// one hands its sessions over to the new one ([`Pool::hand_over`]).
    pub async fn install(&self, pool: Arc<Pool>) {
        let previous = self.pools.write().expect("pools lock").insert(pool.name().to_owned(), pool.clone());
        if let Some(previous) = previous {
            previous.hand_over(&pool).await;
        }
    }

    /// Removes a pool and stops it (every session deleted); false if there was none.
    pub async fn remove(&self, name: &str) -> bool {
        let removed = self.pools.write().expect("pools lock").remove(name);
        match removed {
            Some(pool) => {
                pool.shutdown().await;
                true
            }
            None => false,
        }
    }

    /// Stops every pool: no more refills, every sandbox destroyed.
    pub async fn shutdown(&self) {
        for pool in self.pools() {
            pool.shutdown().await;
        }
    }
}
