//! Pools as code: building pools from their definitions, keeping the definitions in the
//! database, and the management API's operations ([`PoolManager`] implements
//! `sandpool_api::pool_admin::PoolAdmin`).
//!
//! Where a pool comes from is recorded with it ([`ManagedBy`]): pools of the config file
//! are applied at every start (created or updated; a config pool removed from the file is
//! deleted), pools created through the API or `sandpool apply` persist across restarts
//! until deleted.
//!
//! Every change is decided before anything runs: a definition is validated, then its pool is
//! built and started (so a missing image or runtime is an error and nothing changes), then
//! the database records it, and only then does the engine switch to it. A template change
//! replaces the pool's ready sessions and keeps its allocated ones (`Pool::hand_over`).

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use async_trait::async_trait;
use sandpool_api::pool_admin::{AdminError, PoolAdmin};
use sandpool_container::egress::EgressNetwork;
use sandpool_container::factory::{ContainerFactory, ContainerPoolSettings};
use sandpool_container::image::ImageSource;
use sandpool_container::python::{GvisorPythonFactory, GvisorPythonSettings};
use sandpool_engine::events::EventSink;
use sandpool_engine::pool::{Pool, PoolSettings};
use sandpool_engine::{Engine, PoolKind};
use sandpool_sandbox::cgroup::{CgroupLayout, SessionLimits};
use sandpool_sandbox::driver::{ZygoteFactory, ZygotePoolSettings};
use sandpool_sandbox::runtime::{RuntimeSpec, SharedRuntime};
use sandpool_sandbox::uids::{UidAllocator, UidRange};
use sandpool_store::{Store, Table};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{validate_definition, Config, ContainerConfig, PoolConfig, PoolDefinition, PythonSandbox};

/// Host-wide lock files (uid reservations) shared by every sandpool server on the host.
pub const HOST_LOCK_DIR: &str = "/run/sandpool";

/// Where a stored pool came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ManagedBy {
    /// The server's config file: re-applied at every start.
    Config,
    /// The management API (or `sandpool apply`): kept until deleted.
    Api,
}

/// A pool's row in the database.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredPool {
    /// The definition in the config file's shape (`PoolDefinition::to_json`).
    definition: Value,
    managed_by: ManagedBy,
}

impl StoredPool {
    fn definition(&self) -> Result<PoolDefinition, String> {
        PoolDefinition::from_json(self.definition.clone())
    }
}

/// Everything needed to turn a validated pool into a running `Pool`.
pub struct PoolBuilder {
    layout: CgroupLayout,
    runtime: Arc<SharedRuntime>,
    uids: Arc<UidAllocator>,
    container_root_uid: u32,
    instance: String,
    zygote_exe: std::path::PathBuf,
    state_dir: std::path::PathBuf,
    /// Where pools report what happens to sessions (the session table, then telemetry).
    events: Arc<dyn EventSink>,
    /// Set up when the first `EgressEnabled` pool is built.
    egress: Mutex<Option<Arc<EgressNetwork>>>,
}

impl PoolBuilder {
    pub fn new(config: &Config, events: Arc<dyn EventSink>) -> anyhow::Result<PoolBuilder> {
        let layout = CgroupLayout::detect().context("cannot set up session resource limits")?;
        tracing::info!(?layout, "using cgroups");
        let runtime = Arc::new(SharedRuntime::new(RuntimeSpec {
            python: config.runtime.python.clone(),
            packages: config.runtime.packages.clone(),
            index_url: config.runtime.index_url.clone(),
            dir: config.runtime.dir.clone(),
        }));
        let mut range =
            UidRange::claim(Path::new(HOST_LOCK_DIR)).with_context(|| format!("cannot reserve session user ids in {HOST_LOCK_DIR}"))?;
        // The top of the block is the user namespace of this server's crun containers.
        let container_root_uid = range.split_off_top(sandpool_container::spec::USER_NAMESPACE_IDS);
        tracing::info!(first = range.first, count = range.count, "session user ids reserved");
        Ok(PoolBuilder {
            layout,
            runtime,
            uids: Arc::new(UidAllocator::new(range)),
            container_root_uid,
            instance: instance_name(&config.state_dir),
            zygote_exe: std::env::current_exe().context("cannot locate the sandpool binary (needed to start zygotes)")?,
            state_dir: config.state_dir.clone(),
            events,
            egress: Mutex::new(None),
        })
    }

    /// The pool object for `pool` (not started). `replacing`: the pool runs already, with
    /// another template whose sessions live on, so nothing of it may be cleaned up.
    pub fn build(&self, pool: &PoolConfig, replacing: bool) -> anyhow::Result<Arc<Pool>> {
        let events = self.events.clone();
        let run_dir = self.state_dir.join("run").join(&pool.name);
        if let Some(container) = &pool.container {
            let egress = if container.egress { Some(self.egress()?) } else { None };
            let factory = Arc::new(self.container_factory(pool, container, egress, !replacing));
            return Ok(Pool::with_events(pool_settings(pool), factory, events));
        }
        if pool.python_sandbox == PythonSandbox::Gvisor {
            let settings = GvisorPythonSettings {
                pool: pool.name.clone(),
                memory_bytes: pool.memory_bytes,
                cpus: pool.cpus,
                max_processes: pool.max_processes,
                max_open_files: pool.max_open_files,
                data_dir_bytes: pool.data_dir_bytes,
                tmp_dir_bytes: pool.tmp_dir_bytes,
                preload_modules: pool.preload_modules.clone(),
                output_cap: pool.max_output_characters,
                run_dir,
                cgroup_parent: format!("/{}-containers/{}", self.instance, pool.name),
                clean_up_leftovers: !replacing,
            };
            let factory = Arc::new(GvisorPythonFactory::new(settings, self.runtime.clone(), self.uids.clone()));
            return Ok(Pool::with_events(pool_settings(pool), factory, events));
        }
        let limits = SessionLimits { memory_bytes: pool.memory_bytes, cpus: pool.cpus, max_processes: pool.max_processes };
        let cgroups = self
            .layout
            // Leftovers are removed by the factory once it knows which sessions it adopted.
            .prepare_pool(&self.instance, &pool.name, limits, false)
            .with_context(|| format!("cannot prepare the cgroups of pool '{}'", pool.name))?;
        let backend = ZygotePoolSettings {
            pool: pool.name.clone(),
            limits,
            data_dir_bytes: pool.data_dir_bytes,
            tmp_dir_bytes: pool.tmp_dir_bytes,
            max_open_files: pool.max_open_files,
            max_cpu_seconds: pool.max_cpu_seconds,
            output_cap: pool.max_output_characters,
            preload_modules: pool.preload_modules.clone(),
            run_dir,
            zygote_exe: self.zygote_exe.clone(),
            clean_up_leftovers: !replacing,
        };
        let factory = Arc::new(ZygoteFactory::new(backend, self.runtime.clone(), self.uids.clone(), cgroups));
        Ok(Pool::with_events(pool_settings(pool), factory, events))
    }

    fn egress(&self) -> anyhow::Result<Arc<EgressNetwork>> {
        let mut egress = self.egress.lock().expect("egress lock");
        if let Some(network) = egress.as_ref() {
            return Ok(network.clone());
        }
        let network = EgressNetwork::setup(&self.instance, Path::new(HOST_LOCK_DIR))
            .map_err(|e| anyhow::anyhow!("cannot set up the network of EgressEnabled pools: {e}"))?;
        let network = Arc::new(network);
        *egress = Some(network.clone());
        Ok(network)
    }

    /// Removes the egress network's rules, after the last session using it is gone.
    pub fn teardown(&self) {
        if let Some(network) = self.egress.lock().expect("egress lock").take() {
            network.teardown();
        }
    }

    fn container_factory(
        &self,
        pool: &PoolConfig,
        container: &ContainerConfig,
        egress: Option<Arc<EgressNetwork>>,
        clean_up_leftovers: bool,
    ) -> ContainerFactory {
        let insecure_registries = match (&container.image, container.insecure_registry) {
            (ImageSource::Registry { reference }, true) => vec![reference.split('/').next().unwrap_or_default().to_owned()],
            _ => Vec::new(),
        };
        ContainerFactory::new(ContainerPoolSettings {
            pool: pool.name.clone(),
            image: container.image.clone(),
            registry_auth: container.registry_auth.clone(),
            insecure_registries,
            runtime: container.runtime,
            command: container.command.clone(),
            args: container.args.clone(),
            env: container.env.clone(),
            target_port: container.target_port,
            memory_bytes: pool.memory_bytes,
            cpus: pool.cpus,
            max_processes: pool.max_processes,
            max_open_files: pool.max_open_files,
            writable_layer_bytes: pool.data_dir_bytes,
            probes: container.probes.clone(),
            run_dir: self.state_dir.join("run").join(&pool.name),
            images_dir: self.state_dir.join("images"),
            cgroup_parent: format!("/{}-containers/{}", self.instance, pool.name),
            egress,
            user_namespace: Some(self.container_root_uid),
            clean_up_leftovers,
        })
    }
}

fn pool_settings(pool: &PoolConfig) -> PoolSettings {
    PoolSettings {
        name: pool.name.clone(),
        max_concurrent_sessions: pool.max_concurrent_sessions,
        ready_session_instances: pool.ready_session_instances,
        lifecycle: pool.lifecycle,
        kind: if pool.container.is_some() { PoolKind::CustomContainer } else { PoolKind::CodeInterpreter },
        default_timeout: pool.execution_timeout,
        max_timeout: pool.execution_timeout,
        output_cap: pool.max_output_characters,
    }
}

/// A name for this server's cgroup subtree, stable for a state directory: a restarted server
/// finds (and cleans up) what its previous run left, and other servers' sessions are never
/// touched.
pub fn instance_name(state_dir: &Path) -> String {
    use sha2::Digest;
    let canonical = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    let digest = sha2::Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    format!("sandpool-{}", hex::encode(&digest[..4]))
}

/// Brings the database's pools in line with the config file (see the module doc) and returns
/// every pool to run, validated. A stored pool that no longer validates is reported and
/// skipped, not fatal: the others still start.
pub fn reconcile_at_start(store: &Store, config: &Config) -> anyhow::Result<Vec<(PoolDefinition, PoolConfig)>> {
    let stored: Vec<(String, StoredPool)> = store.list(Table::Pools).context("cannot read the pools from the database")?;
    let mut changes = Vec::new();
    for definition in &config.definitions {
        let definition = definition.clone().normalized();
        let row = StoredPool { definition: definition.to_json(), managed_by: ManagedBy::Config };
        changes.push(sandpool_store::Change::put(Table::Pools, definition.name(), &row));
    }
    for (name, row) in &stored {
        if row.managed_by == ManagedBy::Config && !config.definitions.iter().any(|d| d.name() == name) {
            tracing::info!(pool = %name, "pool removed from the config file; deleting it");
            changes.push(sandpool_store::Change::delete(Table::Pools, name));
        }
    }
    store.apply(&changes).context("cannot record the config file's pools in the database")?;
    let mut pools = Vec::new();
    for (name, row) in store.list::<StoredPool>(Table::Pools).context("cannot read the pools from the database")? {
        let checked = row.definition().map_err(anyhow::Error::msg).and_then(|definition| {
            let config = validate_definition(&definition)?;
            Ok((definition, config))
        });
        match checked {
            Ok(pool) => pools.push(pool),
            Err(err) => tracing::error!(pool = %name, "the stored pool is invalid and does not run: {err:#}"),
        }
    }
    Ok(pools)
}

/// What applying a definition did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    Created,
    Updated,
    Unchanged,
}

/// The management API's backend.
pub struct PoolManager {
    store: Arc<Store>,
    engine: Arc<Engine>,
    builder: Arc<PoolBuilder>,
    /// The pools' data-plane base, e.g. `http://127.0.0.1:8642/pools`.
    endpoint_base: String,
    /// One change at a time: each one checks, builds, records and switches.
    changes: tokio::sync::Mutex<()>,
}

impl PoolManager {
    pub fn new(store: Arc<Store>, engine: Arc<Engine>, builder: Arc<PoolBuilder>, endpoint_base: String) -> PoolManager {
        PoolManager { store, engine, builder, endpoint_base, changes: tokio::sync::Mutex::new(()) }
    }

    fn stored(&self, name: &str) -> Result<Option<StoredPool>, AdminError> {
        self.store.get(Table::Pools, name).map_err(storage)
    }

    fn resource(&self, definition: &PoolDefinition) -> Value {
        let state = match self.engine.pool(definition.name()).map(|pool| pool.status()) {
            Some(sandpool_engine::pool::PoolStatus::Running) => "Succeeded",
            Some(sandpool_engine::pool::PoolStatus::Starting) => "InProgress",
            Some(sandpool_engine::pool::PoolStatus::Failed(_)) | None => "Failed",
            Some(sandpool_engine::pool::PoolStatus::Stopped) => "Deleting",
        };
        crate::arm::resource_from_definition(definition, &format!("{}/{}", self.endpoint_base, definition.name()), state)
    }

    /// The definition a resource asks for, with write-only secret values the resource left
    /// out taken from the stored definition.
    fn requested(&self, name: &str, resource: &Value) -> Result<PoolDefinition, AdminError> {
        let mut resource = resource.clone();
        if let Some(stored) = self.stored(name)? {
            let stored = stored.definition().map_err(AdminError::Storage)?.to_json();
            if let (Some(secrets), Some(Value::Array(known))) =
                (resource.pointer_mut("/properties/secrets").and_then(Value::as_array_mut), stored.get("secrets"))
            {
                for secret in secrets.iter_mut().filter(|secret| secret.get("value").is_none()) {
                    let same = known.iter().find(|known| known.get("name") == secret.get("name"));
                    if let (Some(object), Some(value)) = (secret.as_object_mut(), same.and_then(|known| known.get("value"))) {
                        object.insert("value".into(), value.clone());
                    }
                }
            }
        }
        crate::arm::definition_from_resource(name, &resource).map_err(AdminError::Invalid)
    }

    /// What applying `resource` would change, without changing anything: `create`, `update`
    /// (with the top-level settings that differ) or `none`.
    pub fn plan(&self, name: &str, resource: &Value) -> Result<Value, AdminError> {
        let definition = self.requested(name, resource)?;
        validate_definition(&definition).map_err(|e| AdminError::Invalid(format!("{e:#}")))?;
        let Some(stored) = self.stored(name)? else { return Ok(serde_json::json!({ "change": "create" })) };
        let before = stored.definition().map_err(AdminError::Storage)?.to_json();
        let after = definition.to_json();
        let mut fields: Vec<String> = Vec::new();
        let keys: std::collections::BTreeSet<&String> =
            before.as_object().into_iter().flatten().chain(after.as_object().into_iter().flatten()).map(|(key, _)| key).collect();
        for key in keys {
            if before.get(key) != after.get(key) {
                fields.push(key.clone());
            }
        }
        Ok(if fields.is_empty() {
            serde_json::json!({ "change": "none" })
        } else {
            serde_json::json!({ "change": "update", "fields": fields })
        })
    }
}

impl PoolManager {
    /// `put`, with `changes` held. A pool that came from the config file stays the config
    /// file's (the next start or SIGHUP applies the file's version again).
    async fn put_locked(&self, name: &str, resource: Value) -> Result<(Value, bool), AdminError> {
        let definition = self.requested(name, &resource)?;
        let managed_by = match self.stored(name)? {
            Some(row) if row.managed_by == ManagedBy::Config => ManagedBy::Config,
            _ => ManagedBy::Api,
        };
        let applied = self.apply_definition(definition.clone(), managed_by).await?;
        Ok((self.resource(&definition), applied == Applied::Created))
    }

    /// Validates, builds and starts the pool, records it, and switches the engine to it;
    /// nothing changes if any step fails. True if the pool is new. Call with `changes` held.
    async fn apply_definition(&self, definition: PoolDefinition, managed_by: ManagedBy) -> Result<Applied, AdminError> {
        let name = definition.name().to_owned();
        let config = validate_definition(&definition).map_err(|e| AdminError::Invalid(format!("{e:#}")))?;
        let stored = self.stored(&name)?;
        let created = stored.is_none();
        if let Some(Ok(before)) = stored.as_ref().map(StoredPool::definition) {
            let kind = |d: &PoolDefinition| d.to_json().get("container_type").and_then(Value::as_str).unwrap_or("PythonLTS").to_owned();
            let (was, now) = (kind(&before), kind(&definition));
            if was != now {
                // Its allocated sessions are of the old kind and could not serve the new one.
                return Err(AdminError::Invalid(format!(
                    "containerType cannot change from {was} to {now}; delete pool '{name}' and create it again"
                )));
            }
        }
        let unchanged = stored.as_ref().is_some_and(|row| row.definition() == Ok(definition.clone()));
        if unchanged && self.engine.pool(&name).is_some() {
            return Ok(Applied::Unchanged);
        }
        let replacing = self.engine.pool(&name).is_some();
        let pool = self.builder.build(&config, replacing).map_err(|e| AdminError::CannotStart(format!("{e:#}")))?;
        if let Err(err) = pool.start().await {
            pool.shutdown().await;
            return Err(AdminError::CannotStart(format!("pool '{name}' cannot start: {err}")));
        }
        let row = StoredPool { definition: definition.to_json(), managed_by };
        if let Err(err) = self.store.put(Table::Pools, &name, &row) {
            pool.shutdown().await;
            return Err(storage(err));
        }
        tracing::info!(pool = %name, created, "pool definition applied");
        self.engine.install(pool).await;
        Ok(if created { Applied::Created } else { Applied::Updated })
    }

    /// Applies the config file's pools again (SIGHUP): new and changed pools are applied,
    /// config pools the file no longer has are deleted, pools of the API are left alone.
    /// Returns one line per change or failure.
    pub async fn apply_config(&self, definitions: &[PoolDefinition]) -> Vec<String> {
        let _one_at_a_time = self.changes.lock().await;
        let mut report = Vec::new();
        for definition in definitions {
            let definition = definition.clone().normalized();
            let name = definition.name().to_owned();
            match self.apply_definition(definition, ManagedBy::Config).await {
                Ok(Applied::Created) => report.push(format!("pool '{name}' created")),
                Ok(Applied::Updated) => report.push(format!("pool '{name}' updated")),
                Ok(Applied::Unchanged) => {}
                Err(err) => report.push(format!("pool '{name}' not applied: {err}")),
            }
        }
        let stored: Vec<(String, StoredPool)> = match self.store.list(Table::Pools) {
            Ok(stored) => stored,
            Err(err) => {
                report.push(format!("cannot read the pools: {err}"));
                return report;
            }
        };
        for (name, row) in stored {
            if row.managed_by == ManagedBy::Config && !definitions.iter().any(|d| d.name() == name) {
                match self.store.delete(Table::Pools, &name) {
                    Ok(_) => {
                        self.engine.remove(&name).await;
                        report.push(format!("pool '{name}' deleted (no longer in the config file)"));
                    }
                    Err(err) => report.push(format!("pool '{name}' not deleted: {err}")),
                }
            }
        }
        report
    }
}

fn storage(err: sandpool_store::StoreError) -> AdminError {
    AdminError::Storage(err.to_string())
}

#[async_trait]
impl PoolAdmin for PoolManager {
    async fn list(&self) -> Result<Vec<Value>, AdminError> {
        let rows: Vec<(String, StoredPool)> = self.store.list(Table::Pools).map_err(storage)?;
        rows.into_iter().map(|(_, row)| row.definition().map(|d| self.resource(&d)).map_err(AdminError::Storage)).collect()
    }

    async fn get(&self, name: &str) -> Result<Option<Value>, AdminError> {
        match self.stored(name)? {
            Some(row) => Ok(Some(self.resource(&row.definition().map_err(AdminError::Storage)?))),
            None => Ok(None),
        }
    }

    async fn put(&self, name: &str, resource: Value) -> Result<(Value, bool), AdminError> {
        let _one_at_a_time = self.changes.lock().await;
        self.put_locked(name, resource).await
    }

    async fn patch(&self, name: &str, patch: Value) -> Result<Value, AdminError> {
        // Read and write under one lock, so concurrent patches do not lose each other.
        let _one_at_a_time = self.changes.lock().await;
        let current = self.get(name).await?.ok_or_else(|| AdminError::NotFound(name.to_owned()))?;
        let mut merged = current;
        json_merge_patch(&mut merged, &patch);
        // Read-only fields the resource shows are ignored on the way back in.
        self.put_locked(name, merged).await.map(|(resource, _)| resource)
    }

    async fn delete(&self, name: &str) -> Result<bool, AdminError> {
        let _one_at_a_time = self.changes.lock().await;
        let existed = self.store.delete(Table::Pools, name).map_err(storage)?;
        let running = self.engine.remove(name).await;
        if existed || running {
            tracing::info!(pool = %name, "pool deleted");
        }
        Ok(existed || running)
    }

    async fn plan(&self, name: &str, resource: Value) -> Result<Value, AdminError> {
        PoolManager::plan(self, name, &resource)
    }
}

/// RFC 7396: objects merge key by key, `null` removes, anything else replaces.
fn json_merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(changes) => {
            if !target.is_object() {
                *target = Value::Object(serde_json::Map::new());
            }
            let object = target.as_object_mut().expect("made an object above");
            for (key, value) in changes {
                if value.is_null() {
                    object.remove(key);
                } else {
                    json_merge_patch(object.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut target = serde_json::json!({ "a": 1, "b": { "c": 2, "d": 3 }, "e": [1] });
        json_merge_patch(&mut target, &serde_json::json!({ "a": null, "b": { "c": 5 }, "e": [2, 3], "f": "new" }));
        assert_eq!(target, serde_json::json!({ "b": { "c": 5, "d": 3 }, "e": [2, 3], "f": "new" }));
    }
}
