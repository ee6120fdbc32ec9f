//! The configuration file: parsing, defaults and validation.
//!
//! Two stages, as in the style guide: [`RawConfig`] mirrors the TOML file (snake_case forms of
//! the Azure pool property names, unknown keys refused with their name), and [`Config`] is the
//! validated result with real types (durations, byte counts) that the rest of the binary
//! passes to each library's own settings type.
//!
//! With no file, [`DEFAULT_CONFIG`] is used: it is itself a config file, printed by
//! `sandpool default-config`, so the embedded default and a user's file cannot drift apart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use sandpool_auth::{oidc, ApiKeyEntry, ApiKeys, AuthSettings, OidcSettings, Role};
use sandpool_container::image::{ImageSource, RegistryAuth};
use sandpool_container::probe::{Probe, ProbeCheck, ProbeKind};
use sandpool_container::runtime::RuntimeKind;
use sandpool_engine::Lifecycle;
use serde::{Deserialize, Serialize};

/// The embedded default configuration.
pub const DEFAULT_CONFIG: &str = r#"# sandpool configuration: the embedded default.
# Every key is optional except each pool's `name`; see the README for all of them.

# listen = "127.0.0.1:8642"         # --listen overrides
# state_dir = "/var/lib/sandpool"   # --state-dir overrides

[auth]
# Bearer tokens from the server's own issuer (`sandpool token issue`) are accepted unless
# local_issuer = false. OpenID Connect issuers and API keys are added below.
local_issuer = true
audiences = ["https://dynamicsessions.io", "https://acasessions.io"]
# [[auth.oidc]]
# issuer = "https://login.example.com/realms/main"   # the tokens' exact `iss`
# roles_claim = "roles"                              # dotted path, e.g. "realm_access.roles"
# role_map = { "Sessions.Execute" = "executor" }     # claim values -> sandpool roles
# [[auth.api_keys]]
# name = "ci"
# sha256 = "..."                                     # from `sandpool api-key create`
# roles = ["executor"]

[telemetry]
event_retention = "24h"    # how long the per-session event log keeps events (in memory)
max_events = 100000        # and at most this many
# otlp_endpoint = "http://127.0.0.1:4318"   # send OpenTelemetry traces (OTLP/HTTP) to a collector
# service_name = "sandpool"

[runtime]
# python = "/usr/bin/python3"       # base interpreter; must have a shared libpython
packages = ["numpy==2.4.6", "pandas==3.1.1", "matplotlib==3.11.2", "pytz==2026.6", "setuptools==81.0.0"]

[[pools]]
name = "default"
container_type = "PythonLTS"
max_concurrent_sessions = 100
ready_session_instances = 4
cooldown_period_in_seconds = 300
network_status = "EgressDisabled"
execution_timeout_in_seconds = 220
preload_modules = ["numpy", "pandas", "matplotlib", "matplotlib.pyplot"]

[pools.resources]
cpu = 1.0
memory = "2Gi"
max_processes = 256
max_open_files = 4096
max_cpu_seconds = 3600
data_dir_size = "1Gi"
tmp_dir_size = "1Gi"
max_output_characters = 262144
"#;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8642";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sandpool";

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    listen: Option<String>,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    telemetry: RawTelemetry,
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    pools: Vec<RawPool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    event_retention: Option<String>,
    max_events: Option<u64>,
    otlp_endpoint: Option<String>,
    service_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    local_issuer: Option<bool>,
    audiences: Option<Vec<String>>,
    #[serde(default)]
    oidc: Vec<RawOidc>,
    #[serde(default)]
    api_keys: Vec<RawApiKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOidc {
    issuer: String,
    jwks_uri: Option<String>,
    audiences: Option<Vec<String>>,
    roles_claim: Option<String>,
    #[serde(default)]
    role_map: std::collections::HashMap<String, String>,
    refresh_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApiKey {
    name: String,
    sha256: String,
    roles: Vec<String>,
    identifier: Option<String>,
    identifier_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    python: Option<PathBuf>,
    packages: Option<Vec<String>>,
    index_url: Option<String>,
    dir: Option<PathBuf>,
}

/// A pool as declared: a `[[pools]]` table of the config file, or a `sessionPools` resource
/// of the management API translated to the same shape (see `arm`). This is what the
/// database stores; [`validate_definition`] turns it into a [`PoolConfig`].
pub type PoolDefinition = RawPool;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    name: String,
    container_type: Option<String>,
    max_concurrent_sessions: Option<u64>,
    ready_session_instances: Option<u64>,
    cooldown_period_in_seconds: Option<u64>,
    network_status: Option<String>,
    execution_timeout_in_seconds: Option<u64>,
    preload_modules: Option<Vec<String>>,
    lifecycle_type: Option<String>,
    max_alive_period_in_seconds: Option<u64>,
    /// Custom container pools: "crun" (default) or "runsc" (gVisor). PythonLTS pools:
    /// "zygote" (default, sandpool's own sandbox) or "runsc" (each session in gVisor).
    runtime: Option<String>,
    container: Option<RawContainer>,
    #[serde(default)]
    secrets: Vec<RawSecret>,
    #[serde(default)]
    resources: RawResources,
}

/// Azure's `customContainerTemplate`: the container and its ingress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContainer {
    image: String,
    target_port: u16,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<RawEnv>,
    #[serde(default)]
    probes: Vec<RawProbe>,
    registry_credentials: Option<RawRegistryCredentials>,
    /// Reach the image's registry over plain HTTP (always the case for loopback registries).
    #[serde(default)]
    insecure_registry: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnv {
    name: String,
    value: Option<String>,
    secret_ref: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    name: String,
    value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistryCredentials {
    server: Option<String>,
    username: String,
    password_secret_ref: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    #[serde(rename = "type")]
    kind: String,
    http_get: Option<RawHttpGet>,
    tcp_socket: Option<RawTcpSocket>,
    failure_threshold: Option<u32>,
    initial_delay_seconds: Option<u64>,
    period_seconds: Option<u64>,
    success_threshold: Option<u32>,
    timeout_seconds: Option<u64>,
    termination_grace_period_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpGet {
    path: Option<String>,
    port: u16,
    host: Option<String>,
    scheme: Option<String>,
    #[serde(default)]
    http_headers: Vec<RawHeader>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    name: String,
    value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTcpSocket {
    port: u16,
    host: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    cpu: Option<f64>,
    memory: Option<String>,
    max_processes: Option<u64>,
    max_open_files: Option<u64>,
    max_cpu_seconds: Option<u64>,
    data_dir_size: Option<String>,
    tmp_dir_size: Option<String>,
    max_output_characters: Option<u64>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub auth: AuthSettings,
    pub telemetry: TelemetryConfig,
    pub runtime: RuntimeConfig,
    pub pools: Vec<PoolConfig>,
    /// The pools as written in the file (what the database stores for them).
    pub definitions: Vec<PoolDefinition>,
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub event_retention: Duration,
    pub max_events: usize,
    /// Where OpenTelemetry traces go; none by default.
    pub otlp: Option<crate::logging::OtlpSettings>,
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub python: Option<PathBuf>,
    pub packages: Vec<String>,
    pub index_url: Option<String>,
    pub dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    pub max_concurrent_sessions: usize,
    pub ready_session_instances: usize,
    pub lifecycle: Lifecycle,
    /// Set for custom container pools; `None` for Python pools.
    pub container: Option<ContainerConfig>,
    /// How a Python pool's sessions are isolated (ignored by container pools).
    pub python_sandbox: PythonSandbox,
    pub execution_timeout: Duration,
    pub preload_modules: Vec<String>,
    pub cpus: f64,
    pub memory_bytes: u64,
    pub max_processes: u64,
    pub max_open_files: u64,
    pub max_cpu_seconds: u64,
    pub data_dir_bytes: u64,
    pub tmp_dir_bytes: u64,
    pub max_output_characters: usize,
}

/// The sandbox of a PythonLTS pool's sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PythonSandbox {
    /// Forked from the pool's zygote and confined by namespaces, Landlock, seccomp and
    /// cgroups (`runtime = "zygote"`, the default).
    Zygote,
    /// Each session a gVisor sandbox of its own (`runtime = "runsc"`).
    Gvisor,
}

/// A custom container pool's container, validated.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    pub image: ImageSource,
    pub registry_auth: Option<RegistryAuth>,
    pub insecure_registry: bool,
    pub runtime: RuntimeKind,
    pub target_port: u16,
    pub command: Vec<String>,
    pub args: Vec<String>,
    /// Secrets already resolved: secret values live only here and in the sessions.
    pub env: Vec<(String, String)>,
    pub probes: Vec<Probe>,
    /// `network_status = "EgressEnabled"`: sessions may open connections to public addresses.
    pub egress: bool,
}

/// Command-line values that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub state_dir: Option<PathBuf>,
}

impl Config {
    /// Loads `path`, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Config> {
        let (text, origin) = match path {
            Some(path) => (
                std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?,
                path.display().to_string(),
            ),
            None => (DEFAULT_CONFIG.to_owned(), "the embedded default configuration".to_owned()),
        };
        Config::parse(&text, overrides).with_context(|| format!("invalid configuration in {origin}"))
    }

    pub fn parse(text: &str, overrides: &Overrides) -> anyhow::Result<Config> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
        let defaults: RawConfig = toml::from_str(DEFAULT_CONFIG).expect("the default config parses");
        let listen_text = overrides.listen.clone().or(raw.listen).unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen_text.parse().with_context(|| format!("listen address {listen_text:?} is not IP:PORT"))?;
        let state_dir = overrides.state_dir.clone().or(raw.state_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let runtime = RuntimeConfig {
            python: raw.runtime.python,
            packages: raw.runtime.packages.or(defaults.runtime.packages).unwrap_or_default(),
            index_url: raw.runtime.index_url,
            dir: raw.runtime.dir.unwrap_or_else(|| state_dir.join("runtime")),
        };
        if raw.pools.is_empty() {
            bail!("no pools are configured; add at least one [[pools]] table");
        }
        let default_pool = &defaults.pools[0];
        let mut pools: Vec<PoolConfig> = Vec::new();
        let definitions = raw.pools.clone();
        for pool in raw.pools {
            let checked = validate_pool(pool, default_pool)?;
            if pools.iter().any(|p| p.name == checked.name) {
                bail!("pool {:?} is defined twice", checked.name);
            }
            pools.push(checked);
        }
        let auth = validate_auth(raw.auth, defaults.auth)?;
        let retention_text = raw.telemetry.event_retention.or(defaults.telemetry.event_retention).unwrap_or_else(|| "24h".into());
        let event_retention = humantime::parse_duration(&retention_text)
            .with_context(|| format!("[telemetry] event_retention {retention_text:?} is not a duration like \"24h\" or \"30m\""))?;
        let max_events = raw.telemetry.max_events.or(defaults.telemetry.max_events).unwrap_or(100_000);
        if max_events == 0 {
            bail!("[telemetry] max_events must be at least 1");
        }
        let otlp = match raw.telemetry.otlp_endpoint {
            None => None,
            Some(endpoint) => {
                let scheme_ok = endpoint.starts_with("http://") || endpoint.starts_with("https://");
                if !scheme_ok {
                    bail!("[telemetry] otlp_endpoint {endpoint:?} must be an http:// or https:// URL (the collector's OTLP/HTTP port, usually 4318)");
                }
                let service_name = raw.telemetry.service_name.unwrap_or_else(|| "sandpool".into());
                Some(crate::logging::OtlpSettings { endpoint, service_name })
            }
        };
        let telemetry = TelemetryConfig { event_retention, max_events: max_events as usize, otlp };
        Ok(Config { listen, state_dir, auth, telemetry, runtime, pools, definitions })
    }
}

fn validate_auth(auth: RawAuth, defaults: RawAuth) -> anyhow::Result<AuthSettings> {
    let audiences = auth.audiences.or(defaults.audiences).unwrap_or_default();
    if audiences.is_empty() {
        bail!("[auth] audiences must name at least one audience");
    }
    let roles = |list: Vec<String>, what: &str| -> anyhow::Result<Vec<Role>> {
        list.iter().map(|role| role.parse::<Role>().map_err(|e| anyhow::anyhow!("{what}: {e}"))).collect()
    };
    let mut oidc = Vec::new();
    for issuer in auth.oidc {
        let what = format!("[[auth.oidc]] issuer {:?}", issuer.issuer);
        let role_map = issuer
            .role_map
            .into_iter()
            .map(|(value, role)| Ok((value, role.parse::<Role>().map_err(|e| anyhow::anyhow!("{what}: role_map: {e}"))?)))
            .collect::<anyhow::Result<_>>()?;
        let refresh = Duration::from_secs(issuer.refresh_seconds.unwrap_or(3600));
        if refresh < oidc::MIN_REFETCH {
            bail!("{what}: refresh_seconds must be at least {}", oidc::MIN_REFETCH.as_secs());
        }
        oidc.push(OidcSettings {
            issuer: issuer.issuer,
            jwks_uri: issuer.jwks_uri,
            audiences: issuer.audiences.unwrap_or_else(|| audiences.clone()),
            roles_claim: issuer.roles_claim.unwrap_or_else(|| "roles".into()),
            role_map,
            refresh,
        });
    }
    let mut api_keys = Vec::new();
    for key in auth.api_keys {
        let what = format!("[[auth.api_keys]] {:?}", key.name);
        if key.identifier.is_some() && key.identifier_prefix.is_some() {
            bail!("{what}: set identifier or identifier_prefix, not both");
        }
        let scope = sandpool_auth::local::scope_of(key.identifier, key.identifier_prefix);
        api_keys.push(ApiKeyEntry { roles: roles(key.roles, &what)?, name: key.name, sha256: key.sha256, scope });
    }
    // Checks the hashes now, so a typo is a start-up error.
    ApiKeys::new(api_keys.clone())?;
    let local_issuer = auth.local_issuer.or(defaults.local_issuer).unwrap_or(true);
    if !local_issuer && oidc.is_empty() && api_keys.is_empty() {
        bail!("[auth] local_issuer = false with no [[auth.oidc]] issuer and no [[auth.api_keys]]: no request could ever be authenticated");
    }
    Ok(AuthSettings { audiences, local_issuer, oidc, api_keys })
}

impl RawPool {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The same definition with the defaults a management resource always shows filled in
    /// (container type, lifecycle, network status), so that a definition read back and sent
    /// again compares equal to the stored one.
    pub fn normalized(mut self) -> RawPool {
        self.container_type.get_or_insert_with(|| "PythonLTS".into());
        self.lifecycle_type.get_or_insert_with(|| "Timed".into());
        self.network_status.get_or_insert_with(|| "EgressDisabled".into());
        self
    }

    /// The definition as JSON in the config file's shape (snake_case keys), unset keys left
    /// out.
    pub fn to_json(&self) -> serde_json::Value {
        strip_nulls(serde_json::to_value(self).expect("definitions serialise"))
    }

    /// A definition from JSON in the config file's shape; the error names the bad key.
    pub fn from_json(value: serde_json::Value) -> Result<RawPool, String> {
        // The path says where the bad value is (`container.env[0]: unknown field ...`).
        serde_path_to_error::deserialize(value).map_err(|e| match e.path().to_string().as_str() {
            "." | "" => e.inner().to_string(),
            path => format!("{path}: {}", e.inner()),
        })
    }
}

fn strip_nulls(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            serde_json::Value::Object(map.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, strip_nulls(v))).collect())
        }
        serde_json::Value::Array(items) => serde_json::Value::Array(items.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

/// Checks a pool definition as the config file's pools are checked (the embedded default's
/// pool supplies what it leaves out).
pub fn validate_definition(definition: &PoolDefinition) -> anyhow::Result<PoolConfig> {
    let defaults: RawConfig = toml::from_str(DEFAULT_CONFIG).expect("the default config parses");
    validate_pool(definition.clone(), &defaults.pools[0])
}

fn validate_pool(pool: RawPool, default: &RawPool) -> anyhow::Result<PoolConfig> {
    let name = pool.name;
    let context = |what: &str| format!("pool {name:?}: {what}");
    let valid_name = (3..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !valid_name {
        bail!(
            "pool name {name:?} is invalid: use 3 to 63 lowercase letters and digits, starting with a letter (as Azure session pool names)"
        );
    }
    let container_type = pool.container_type.or(default.container_type.clone()).unwrap_or_default();
    let is_container = match container_type.as_str() {
        "PythonLTS" => false,
        "CustomContainer" => true,
        other => bail!(context(&format!("container_type {other:?} is not supported; use \"PythonLTS\" or \"CustomContainer\""))),
    };
    let network_status = pool.network_status.or(default.network_status.clone()).unwrap_or_default();
    let egress = match network_status.as_str() {
        "EgressDisabled" => false,
        "EgressEnabled" if is_container => true,
        "EgressEnabled" => bail!(context(
            "network_status \"EgressEnabled\" is only available for CustomContainer pools; PythonLTS sessions run with \"EgressDisabled\""
        )),
        other => bail!(context(&format!(
            "network_status {other:?} is unknown; use \"EgressDisabled\" (sessions reach nothing but their own loopback) or, for CustomContainer pools, \"EgressEnabled\""
        ))),
    };
    let container = match (is_container, pool.container) {
        (true, Some(container)) => Some(
            validate_container(container, &pool.secrets, pool.runtime.as_deref(), egress)
                .map_err(|e| anyhow::anyhow!(context(&format!("{e:#}"))))?,
        ),
        (true, None) => bail!(context("a CustomContainer pool needs a [pools.container] table with at least image and target_port")),
        (false, Some(_)) => bail!(context("[pools.container] is only for container_type = \"CustomContainer\"")),
        (false, None) => None,
    };
    let python_sandbox = match (is_container, pool.runtime.as_deref()) {
        (true, _) | (false, None | Some("zygote")) => PythonSandbox::Zygote,
        (false, Some("runsc")) => PythonSandbox::Gvisor,
        (false, Some(other)) => bail!(context(&format!(
            "runtime {other:?} is unknown for PythonLTS pools; use \"zygote\" (the default: sandpool's own sandbox, fastest) or \"runsc\" (each session in gVisor)"
        ))),
    };
    if !is_container && !pool.secrets.is_empty() {
        bail!(context("secrets are only used by CustomContainer pools"));
    }
    let max = pool.max_concurrent_sessions.or(default.max_concurrent_sessions).unwrap_or(1);
    if max == 0 || max > 100_000 {
        bail!(context("max_concurrent_sessions must be between 1 and 100000"));
    }
    let ready = pool.ready_session_instances.or(default.ready_session_instances).unwrap_or(0);
    if ready > max {
        bail!(context(&format!("ready_session_instances ({ready}) cannot exceed max_concurrent_sessions ({max})")));
    }
    let lifecycle_type = pool.lifecycle_type.unwrap_or_else(|| "Timed".into());
    let lifecycle = match lifecycle_type.as_str() {
        "Timed" => {
            if pool.max_alive_period_in_seconds.is_some() {
                bail!(context("max_alive_period_in_seconds applies only to lifecycle_type = \"OnContainerExit\""));
            }
            let cooldown = pool.cooldown_period_in_seconds.or(default.cooldown_period_in_seconds).unwrap_or(300);
            if cooldown == 0 {
                bail!(context("cooldown_period_in_seconds must be at least 1"));
            }
            Lifecycle::Timed { cooldown: Duration::from_secs(cooldown) }
        }
        "OnContainerExit" => {
            if !is_container {
                bail!(context("lifecycle_type \"OnContainerExit\" is only for CustomContainer pools"));
            }
            if pool.cooldown_period_in_seconds.is_some() {
                bail!(context(
                    "cooldown_period_in_seconds does not apply to lifecycle_type = \"OnContainerExit\"; use max_alive_period_in_seconds"
                ));
            }
            let max_alive = pool.max_alive_period_in_seconds.unwrap_or(86_400);
            if max_alive == 0 {
                bail!(context("max_alive_period_in_seconds must be at least 1"));
            }
            Lifecycle::OnContainerExit { max_alive: Duration::from_secs(max_alive) }
        }
        other => bail!(context(&format!("lifecycle_type {other:?} is unknown; use \"Timed\" or \"OnContainerExit\""))),
    };
    let timeout = pool.execution_timeout_in_seconds.or(default.execution_timeout_in_seconds).unwrap_or(220);
    if !(1..=86_400).contains(&timeout) {
        bail!(context("execution_timeout_in_seconds must be between 1 and 86400"));
    }
    let d = &default.resources;
    let r = pool.resources;
    let size = |key: &str, value: Option<String>, fallback: &Option<String>| -> anyhow::Result<u64> {
        let text = value.or_else(|| fallback.clone()).unwrap_or_default();
        parse_size(&text).with_context(|| context(&format!("resources.{key}")))
    };
    let memory_bytes = size("memory", r.memory, &d.memory)?;
    if memory_bytes < 64 << 20 {
        bail!(context("resources.memory must be at least 64Mi (the Python runtime needs it)"));
    }
    let cpus = r.cpu.or(d.cpu).unwrap_or(1.0);
    if !(0.01..=1024.0).contains(&cpus) {
        bail!(context("resources.cpu must be between 0.01 and 1024"));
    }
    let max_processes = r.max_processes.or(d.max_processes).unwrap_or(256);
    if max_processes < 4 {
        bail!(context("resources.max_processes must be at least 4"));
    }
    let max_open_files = r.max_open_files.or(d.max_open_files).unwrap_or(4096);
    if max_open_files < 64 {
        bail!(context("resources.max_open_files must be at least 64"));
    }
    let max_cpu_seconds = r.max_cpu_seconds.or(d.max_cpu_seconds).unwrap_or(3600);
    if max_cpu_seconds < 1 {
        bail!(context("resources.max_cpu_seconds must be at least 1"));
    }
    let data_dir_bytes = size("data_dir_size", r.data_dir_size, &d.data_dir_size)?;
    let tmp_dir_bytes = size("tmp_dir_size", r.tmp_dir_size, &d.tmp_dir_size)?;
    if data_dir_bytes < 1 << 20 || tmp_dir_bytes < 1 << 20 {
        bail!(context("resources.data_dir_size and resources.tmp_dir_size must be at least 1Mi"));
    }
    let max_output_characters = r.max_output_characters.or(d.max_output_characters).unwrap_or(262_144);
    if !(1_024..=64 << 20).contains(&max_output_characters) {
        bail!(context("resources.max_output_characters must be between 1024 and 67108864"));
    }
    let preload_modules = pool.preload_modules.or(default.preload_modules.clone()).unwrap_or_default();
    if let Some(bad) = preload_modules
        .iter()
        .find(|m| m.is_empty() || !m.split('.').all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')))
    {
        bail!(context(&format!("preload_modules entry {bad:?} is not a module name")));
    }
    Ok(PoolConfig {
        name,
        max_concurrent_sessions: max as usize,
        ready_session_instances: ready as usize,
        lifecycle,
        container,
        python_sandbox,
        execution_timeout: Duration::from_secs(timeout),
        preload_modules,
        cpus,
        memory_bytes,
        max_processes,
        max_open_files,
        max_cpu_seconds,
        data_dir_bytes,
        tmp_dir_bytes,
        max_output_characters: max_output_characters as usize,
    })
}

fn validate_container(raw: RawContainer, secrets: &[RawSecret], runtime: Option<&str>, egress: bool) -> anyhow::Result<ContainerConfig> {
    let image = ImageSource::parse(&raw.image).map_err(|e| anyhow::anyhow!("container.image {:?}: {e}", raw.image))?;
    let runtime_name = runtime.unwrap_or("crun");
    let runtime = RuntimeKind::parse(runtime_name)
        .ok_or_else(|| anyhow::anyhow!("runtime {runtime_name:?} is unknown; use \"crun\" (the default) or \"runsc\" (gVisor)"))?;
    if raw.target_port == 0 {
        bail!("container.target_port must be a port number (1 to 65535)");
    }
    let mut names = std::collections::HashSet::new();
    for secret in secrets {
        if secret.name.is_empty() || !names.insert(secret.name.as_str()) {
            bail!("secret names must be unique and not empty ({:?})", secret.name);
        }
    }
    let secret = |name: &str, what: &str| -> anyhow::Result<String> {
        secrets
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.value.clone())
            .ok_or_else(|| anyhow::anyhow!("{what} refers to secret {name:?}, which is not in [[pools.secrets]]"))
    };
    let mut env = Vec::new();
    for entry in raw.env {
        let valid_name = !entry.name.is_empty() && !entry.name.contains('=') && !entry.name.contains('\0');
        if !valid_name {
            bail!("container.env name {:?} is not a valid environment variable name", entry.name);
        }
        let value = match (entry.value, entry.secret_ref) {
            (Some(value), None) => value,
            (None, Some(reference)) => secret(&reference, &format!("container.env {:?}", entry.name))?,
            _ => bail!("container.env {:?} needs exactly one of value or secret_ref", entry.name),
        };
        env.push((entry.name, value));
    }
    let registry_auth = match raw.registry_credentials {
        None => None,
        Some(credentials) => {
            let password = secret(&credentials.password_secret_ref, "container.registry_credentials.password_secret_ref")?;
            let _ = credentials.server;
            Some(RegistryAuth { username: credentials.username, password })
        }
    };
    let mut probes: Vec<Probe> = Vec::new();
    for probe in raw.probes {
        let probe = validate_probe(probe)?;
        if probes.iter().any(|p| p.kind == probe.kind) {
            bail!("container.probes has two {:?} probes; each type may appear once", probe.kind);
        }
        probes.push(probe);
    }
    Ok(ContainerConfig {
        image,
        registry_auth,
        insecure_registry: raw.insecure_registry,
        runtime,
        target_port: raw.target_port,
        command: raw.command,
        args: raw.args,
        env,
        probes,
        egress,
    })
}

/// Azure's probe rules: `Liveness` or `Startup`, HTTP or TCP, thresholds in range.
fn validate_probe(raw: RawProbe) -> anyhow::Result<Probe> {
    let kind = match raw.kind.as_str() {
        "Liveness" => ProbeKind::Liveness,
        "Startup" => ProbeKind::Startup,
        "Readiness" => bail!("Readiness probes are not supported (as in Azure); use Startup or Liveness"),
        other => bail!("probe type {other:?} is unknown; use \"Liveness\" or \"Startup\""),
    };
    let check = match (raw.http_get, raw.tcp_socket) {
        (Some(http), None) => {
            if let Some(scheme) = http.scheme.as_deref() {
                if !scheme.eq_ignore_ascii_case("HTTP") {
                    bail!("probe scheme {scheme:?} is not supported; sessions are probed over plain HTTP on their loopback");
                }
            }
            let path = http.path.unwrap_or_else(|| "/".into());
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                bail!("probe http_get.path {path:?} must start with '/' and contain no spaces");
            }
            let headers = http.http_headers.into_iter().map(|h| (h.name, h.value)).collect::<Vec<_>>();
            if headers.iter().any(|(n, v)| n.is_empty() || n.contains([':', '\r', '\n']) || v.contains(['\r', '\n'])) {
                bail!("probe http_get.http_headers contains an invalid header");
            }
            ProbeCheck::Http { path, port: http.port, host: http.host, headers }
        }
        (None, Some(tcp)) => {
            let _ = tcp.host;
            ProbeCheck::Tcp { port: tcp.port }
        }
        _ => bail!("a {} probe needs exactly one of http_get or tcp_socket", raw.kind),
    };
    let failure_threshold = raw.failure_threshold.unwrap_or(3);
    if !(1..=10).contains(&failure_threshold) {
        bail!("probe failure_threshold must be between 1 and 10");
    }
    if raw.success_threshold.is_some_and(|n| n != 1) {
        bail!("probe success_threshold must be 1");
    }
    let initial_delay = raw.initial_delay_seconds.unwrap_or(0);
    if initial_delay > 60 {
        bail!("probe initial_delay_seconds must be between 0 and 60");
    }
    let period = raw.period_seconds.unwrap_or(10);
    let timeout = raw.timeout_seconds.unwrap_or(1);
    if !(1..=240).contains(&period) || !(1..=240).contains(&timeout) {
        bail!("probe period_seconds and timeout_seconds must be between 1 and 240");
    }
    if raw.termination_grace_period_seconds.is_some_and(|n| n > 3600) {
        bail!("probe termination_grace_period_seconds must be at most 3600");
    }
    Ok(Probe {
        kind,
        check,
        initial_delay: Duration::from_secs(initial_delay),
        period: Duration::from_secs(period),
        timeout: Duration::from_secs(timeout),
        failure_threshold,
    })
}

/// Parses sizes such as `512Mi`, `2Gi`, `1G`, `100M`, `64k` or a plain byte count.
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().with_context(|| format!("{text:?} is not a size; write e.g. \"512Mi\" or \"2Gi\""))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "k" | "K" | "kB" | "KB" => 1_000,
        "Ki" | "KiB" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "Mi" | "MiB" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "Gi" | "GiB" => 1 << 30,
        "T" | "TB" => 1_000_000_000_000,
        "Ti" | "TiB" => 1 << 40,
        other => {
            bail!("unknown size unit {other:?} in {text:?}; use Ki, Mi, Gi, Ti (or k, M, G, T)")
        }
    };
    Ok((number * factor as f64).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<Config> {
        Config::parse(text, &Overrides::default())
    }

    #[test]
    fn the_embedded_default_is_valid() {
        let config = parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(config.runtime.dir, PathBuf::from("/var/lib/sandpool/runtime"));
        let pool = &config.pools[0];
        assert_eq!((pool.name.as_str(), pool.max_concurrent_sessions, pool.ready_session_instances), ("default", 100, 4));
        assert_eq!(pool.lifecycle, Lifecycle::Timed { cooldown: Duration::from_secs(300) });
        assert_eq!(pool.memory_bytes, 2 << 30);
        assert!(config.runtime.packages.iter().any(|p| p.starts_with("setuptools==81")));
    }

    #[test]
    fn a_minimal_file_inherits_the_defaults() {
        let config = parse(
            "[[pools]]\nname = \"small\"\nmax_concurrent_sessions = 5\nready_session_instances = 1\ncooldown_period_in_seconds = 2\n",
        )
        .unwrap();
        let pool = &config.pools[0];
        assert_eq!((pool.max_concurrent_sessions, pool.ready_session_instances), (5, 1));
        assert_eq!(pool.lifecycle, Lifecycle::Timed { cooldown: Duration::from_secs(2) });
        assert_eq!(pool.execution_timeout, Duration::from_secs(220));
        assert_eq!(pool.preload_modules, vec!["numpy", "pandas", "matplotlib", "matplotlib.pyplot"]);
        assert_eq!(pool.python_sandbox, PythonSandbox::Zygote);
    }

    #[test]
    fn a_python_pool_can_run_its_sessions_under_gvisor() {
        let config = parse("[[pools]]\nname = \"strong\"\nruntime = \"runsc\"\n").unwrap();
        assert_eq!(config.pools[0].python_sandbox, PythonSandbox::Gvisor);
        let config = parse("[[pools]]\nname = \"fast\"\nruntime = \"zygote\"\n").unwrap();
        assert_eq!(config.pools[0].python_sandbox, PythonSandbox::Zygote);
    }

    #[test]
    fn overrides_win_over_the_file() {
        let overrides = Overrides { listen: Some("127.0.0.1:9999".into()), state_dir: Some("/tmp/x".into()) };
        let config = Config::parse("listen = \"0.0.0.0:1\"\n[[pools]]\nname = \"abc\"\n", &overrides).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:9999");
        assert_eq!(config.runtime.dir, PathBuf::from("/tmp/x/runtime"));
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let err = format!("{:#}", parse("[[pools]]\nname = \"abc\"\nmax_sessions = 3\n").unwrap_err());
        assert!(err.contains("max_sessions"), "{err}");
        let err = format!("{:#}", parse("colour = 1\n[[pools]]\nname = \"abc\"\n").unwrap_err());
        assert!(err.contains("colour"), "{err}");
        let err = format!("{:#}", parse("[[pools]]\nname = \"abc\"\n[pools.resources]\nram = \"1Gi\"\n").unwrap_err());
        assert!(err.contains("ram"), "{err}");
    }

    #[test]
    fn invalid_values_are_explained() {
        let cases = [
            ("[[pools]]\nname = \"Bad_Name\"\n", "pool name"),
            ("[[pools]]\nname = \"abc\"\ncontainer_type = \"NodeLTS\"\n", "container_type"),
            ("[[pools]]\nname = \"abc\"\ncontainer_type = \"CustomContainer\"\n", "needs a [pools.container]"),
            ("[[pools]]\nname = \"abc\"\nlifecycle_type = \"OnContainerExit\"\n", "only for CustomContainer"),
            ("[[pools]]\nname = \"abc\"\nlifecycle_type = \"Forever\"\n", "lifecycle_type"),
            ("[[pools]]\nname = \"abc\"\nruntime = \"crun\"\n", "unknown for PythonLTS pools"),
            ("[[pools]]\nname = \"abc\"\nnetwork_status = \"EgressEnabled\"\n", "only available for CustomContainer"),
            ("[[pools]]\nname = \"abc\"\nnetwork_status = \"Open\"\n", "network_status \"Open\" is unknown"),
            ("[[pools]]\nname = \"abc\"\nmax_concurrent_sessions = 2\nready_session_instances = 3\n", "cannot exceed"),
            ("[[pools]]\nname = \"abc\"\ncooldown_period_in_seconds = 0\n", "cooldown"),
            ("[[pools]]\nname = \"abc\"\n[pools.resources]\nmemory = \"lots\"\n", "resources.memory"),
            ("[[pools]]\nname = \"abc\"\n[pools.resources]\nmemory = \"1Mi\"\n", "at least 64Mi"),
            ("[[pools]]\nname = \"abc\"\n[[pools]]\nname = \"abc\"\n", "defined twice"),
            ("listen = \"nowhere\"\n[[pools]]\nname = \"abc\"\n", "listen address"),
            ("pools = []\n", "no pools"),
        ];
        for (text, expected) in cases {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(expected), "{text:?} gave {err:?}");
        }
    }

    const CONTAINER_POOL: &str = r#"
[[pools]]
name = "web"
container_type = "CustomContainer"
runtime = "runsc"
lifecycle_type = "OnContainerExit"
max_alive_period_in_seconds = 600
[pools.container]
image = "oci:/srv/images/app:v2"
target_port = 8080
args = ["--verbose"]
env = [{ name = "MODE", value = "demo" }, { name = "TOKEN", secret_ref = "tok" }]
[pools.container.registry_credentials]
username = "u"
password_secret_ref = "tok"
[[pools.container.probes]]
type = "Liveness"
tcp_socket = { port = 8080 }
[[pools.secrets]]
name = "tok"
value = "s3cret"
"#;

    #[test]
    fn a_custom_container_pool_is_read_with_its_secrets_resolved() {
        let config = parse(CONTAINER_POOL).unwrap();
        let pool = &config.pools[0];
        assert_eq!(pool.lifecycle, Lifecycle::OnContainerExit { max_alive: Duration::from_secs(600) });
        let container = pool.container.as_ref().unwrap();
        assert_eq!(container.runtime, RuntimeKind::Runsc);
        assert_eq!(container.image, ImageSource::OciLayout { path: "/srv/images/app".into(), tag: Some("v2".into()) });
        assert_eq!(container.env, vec![("MODE".to_owned(), "demo".to_owned()), ("TOKEN".to_owned(), "s3cret".to_owned())]);
        assert_eq!(container.registry_auth.as_ref().unwrap().password, "s3cret");
        let probe = &container.probes[0];
        assert_eq!((probe.kind, &probe.check), (ProbeKind::Liveness, &ProbeCheck::Tcp { port: 8080 }));
        assert_eq!((probe.period, probe.timeout, probe.failure_threshold), (Duration::from_secs(10), Duration::from_secs(1), 3));
        // The registry password is kept out of debug output.
        assert!(!format!("{:?}", container.registry_auth).contains("s3cret"));
        assert!(!container.egress, "egress stays disabled unless asked for");
    }

    #[test]
    fn egress_is_enabled_only_for_container_pools_that_ask() {
        let enabled = CONTAINER_POOL.replace("runtime = \"runsc\"", "runtime = \"runsc\"\nnetwork_status = \"EgressEnabled\"");
        assert!(parse(&enabled).unwrap().pools[0].container.as_ref().unwrap().egress);
        let disabled = CONTAINER_POOL.replace("runtime = \"runsc\"", "runtime = \"runsc\"\nnetwork_status = \"EgressDisabled\"");
        assert!(!parse(&disabled).unwrap().pools[0].container.as_ref().unwrap().egress);
    }

    #[test]
    fn invalid_container_pools_are_explained() {
        let cases = [
            (CONTAINER_POOL.replace("secret_ref = \"tok\" }]", "secret_ref = \"nope\" }]"), "secret \"nope\""),
            (CONTAINER_POOL.replace("runtime = \"runsc\"", "runtime = \"runc\""), "runtime \"runc\" is unknown"),
            (CONTAINER_POOL.replace("image = \"oci:/srv/images/app:v2\"", "image = \"oci:relative\""), "container.image"),
            (CONTAINER_POOL.replace("tcp_socket = { port = 8080 }", ""), "exactly one of http_get or tcp_socket"),
            (CONTAINER_POOL.replace("type = \"Liveness\"", "type = \"Readiness\""), "Readiness probes are not supported"),
            (CONTAINER_POOL.replace("max_alive_period_in_seconds = 600", "cooldown_period_in_seconds = 60"), "does not apply"),
            (CONTAINER_POOL.replace("target_port = 8080", "target_port = 0"), "target_port"),
            (
                CONTAINER_POOL.replace("tcp_socket = { port = 8080 }", "tcp_socket = { port = 8080 }\nfailure_threshold = 11"),
                "failure_threshold",
            ),
        ];
        for (text, expected) in cases {
            let err = format!("{:#}", parse(&text).unwrap_err());
            assert!(err.contains(expected), "expected {expected:?}, got {err:?}");
            assert!(err.contains("pool \"web\""), "{err}");
        }
    }

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_size("2Gi").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_size("100M").unwrap(), 100_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
    }
}
