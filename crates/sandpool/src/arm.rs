//! `Microsoft.App/sessionPools` resources (contract §5.2) ↔ pool definitions.
//!
//! The management API speaks Azure's resource shape; the database and the config file use
//! sandpool's own (`config::PoolDefinition`). Both directions go through JSON: the resource's
//! parts are moved to where the config file keeps them and their camelCase keys become
//! snake_case, and the result is parsed as a definition, so an unknown or misspelt key is an
//! error that names it. What Azure has and sandpool does not use (location, tags, the
//! environment id, read-only status fields) is accepted and ignored; settings only sandpool
//! has (the Python sandbox, limits of Python sessions, preloaded modules) live under
//! `properties.sandpoolSettings`.
//!
//! Secrets are write-only: a resource read back lists their names, never their values.

use serde_json::{json, Map, Value};

use crate::config::PoolDefinition;

/// Resource properties that are accepted and ignored (Azure-only or read-only).
const IGNORED_PROPERTIES: &[&str] = &[
    "environmentId",
    "nodeCount",
    "poolManagementEndpoint",
    "provisioningState",
    "templateUpdateStatus",
    "managedIdentitySettings",
    "mcpServerSettings",
];
/// Top-level resource keys that are accepted and ignored.
const IGNORED_TOP_LEVEL: &[&str] = &["id", "type", "location", "tags", "identity", "systemData"];

/// The definition a `PUT` of `resource` under `name` asks for.
pub fn definition_from_resource(name: &str, resource: &Value) -> Result<PoolDefinition, String> {
    let top = resource.as_object().ok_or("the body must be a JSON object (a sessionPools resource)")?;
    for key in top.keys() {
        if key != "name" && key != "properties" && !IGNORED_TOP_LEVEL.contains(&key.as_str()) {
            return Err(format!("unknown key {key:?}; a sessionPools resource has \"properties\""));
        }
    }
    if let Some(given) = top.get("name").and_then(Value::as_str) {
        if given != name {
            return Err(format!("the body names pool {given:?} but the path names {name:?}"));
        }
    }
    let empty = Map::new();
    let properties = match top.get("properties") {
        None => &empty,
        Some(Value::Object(properties)) => properties,
        Some(_) => return Err("\"properties\" must be an object".into()),
    };
    let mut definition = Map::new();
    definition.insert("name".into(), json!(name));
    let mut container = Map::new();
    let mut resources = Map::new();
    for (key, value) in properties {
        match key.as_str() {
            "containerType" => put(&mut definition, "container_type", value),
            "poolManagementType" => {
                if value.as_str().is_some_and(|kind| !kind.eq_ignore_ascii_case("Dynamic")) {
                    return Err(format!("poolManagementType {value} is not supported; sandpool pools are \"Dynamic\""));
                }
            }
            "scaleConfiguration" => {
                let scale = object(value, key)?;
                for (inner, value) in scale {
                    match inner.as_str() {
                        "maxConcurrentSessions" => put(&mut definition, "max_concurrent_sessions", value),
                        "readySessionInstances" => put(&mut definition, "ready_session_instances", value),
                        other => return Err(format!("unknown key scaleConfiguration.{other}")),
                    }
                }
            }
            "dynamicPoolConfiguration" => {
                for (inner, value) in object(value, key)? {
                    match inner.as_str() {
                        "lifecycleConfiguration" => {
                            for (field, value) in object(value, "dynamicPoolConfiguration.lifecycleConfiguration")? {
                                match field.as_str() {
                                    "lifecycleType" => put(&mut definition, "lifecycle_type", value),
                                    "cooldownPeriodInSeconds" => put(&mut definition, "cooldown_period_in_seconds", value),
                                    "maxAlivePeriodInSeconds" => put(&mut definition, "max_alive_period_in_seconds", value),
                                    other => return Err(format!("unknown key dynamicPoolConfiguration.lifecycleConfiguration.{other}")),
                                }
                            }
                        }
                        // The 2024 shape: `executionType: Timed` beside the cooldown.
                        "cooldownPeriodInSeconds" => put(&mut definition, "cooldown_period_in_seconds", value),
                        "executionType" => {}
                        other => return Err(format!("unknown key dynamicPoolConfiguration.{other}")),
                    }
                }
            }
            "sessionNetworkConfiguration" => {
                for (inner, value) in object(value, key)? {
                    match inner.as_str() {
                        "status" => put(&mut definition, "network_status", value),
                        other => return Err(format!("unknown key sessionNetworkConfiguration.{other}")),
                    }
                }
            }
            "secrets" => put(&mut definition, "secrets", &snake_keys(value)),
            "customContainerTemplate" => custom_container(value, &mut container, &mut resources)?,
            "sandpoolSettings" => {
                for (inner, value) in object(value, key)? {
                    match inner.as_str() {
                        "runtime" => put(&mut definition, "runtime", value),
                        "executionTimeoutInSeconds" => put(&mut definition, "execution_timeout_in_seconds", value),
                        "preloadModules" => put(&mut definition, "preload_modules", value),
                        "insecureRegistry" => put(&mut container, "insecure_registry", value),
                        "resources" => {
                            for (field, value) in object(value, "sandpoolSettings.resources")? {
                                resources.insert(snake(field), value.clone());
                            }
                        }
                        other => return Err(format!("unknown key sandpoolSettings.{other}")),
                    }
                }
            }
            other if IGNORED_PROPERTIES.contains(&other) => {}
            other => return Err(format!("unknown property {other:?}")),
        }
    }
    if !container.is_empty() {
        definition.insert("container".into(), Value::Object(container));
    }
    if !resources.is_empty() {
        definition.insert("resources".into(), Value::Object(resources));
    }
    PoolDefinition::from_json(Value::Object(definition)).map(PoolDefinition::normalized)
}

/// `customContainerTemplate`: one container, its ingress and registry credentials.
fn custom_container(value: &Value, container: &mut Map<String, Value>, resources: &mut Map<String, Value>) -> Result<(), String> {
    for (key, value) in object(value, "customContainerTemplate")? {
        match key.as_str() {
            "containers" => {
                let list = value.as_array().ok_or("customContainerTemplate.containers must be an array")?;
                let [only] = list.as_slice() else {
                    return Err(format!("customContainerTemplate.containers must hold exactly one container (it has {})", list.len()));
                };
                for (field, value) in object(only, "customContainerTemplate.containers[0]")? {
                    match field.as_str() {
                        "image" | "command" | "args" => put(container, field, value),
                        "env" | "probes" => put(container, field, &snake_keys(value)),
                        "resources" => {
                            for (resource, value) in object(value, "customContainerTemplate.containers[0].resources")? {
                                match resource.as_str() {
                                    "cpu" | "memory" => put(resources, resource, value),
                                    // Azure reports it; sandpool has no separate ephemeral storage.
                                    "ephemeralStorage" => {}
                                    other => return Err(format!("unknown key customContainerTemplate.containers[0].resources.{other}")),
                                }
                            }
                        }
                        // A name is required by Azure and means nothing here.
                        "name" => {}
                        other => return Err(format!("unknown key customContainerTemplate.containers[0].{other}")),
                    }
                }
            }
            "ingress" => {
                for (field, value) in object(value, "customContainerTemplate.ingress")? {
                    match field.as_str() {
                        "targetPort" => put(container, "target_port", value),
                        other => return Err(format!("unknown key customContainerTemplate.ingress.{other}")),
                    }
                }
            }
            "registryCredentials" => {
                let mut credentials = snake_keys(value);
                if let Some(credentials) = credentials.as_object_mut() {
                    if credentials.get("identity").is_some_and(|identity| !identity.is_null()) {
                        return Err(
                            "registryCredentials.identity (a managed identity) is not supported; use username and passwordSecretRef".into(),
                        );
                    }
                    credentials.remove("identity");
                }
                put(container, "registry_credentials", &credentials);
            }
            other => return Err(format!("unknown key customContainerTemplate.{other}")),
        }
    }
    Ok(())
}

/// The resource of a stored definition, as `GET` shows it. `endpoint` is the pool's data-plane
/// URL (`poolManagementEndpoint`); `state` its `provisioningState`.
pub fn resource_from_definition(definition: &PoolDefinition, endpoint: &str, state: &str) -> Value {
    let raw = definition.to_json();
    let get = |key: &str| raw.get(key).cloned();
    let name = definition.name();
    let mut properties = Map::new();
    properties.insert("containerType".into(), get("container_type").unwrap_or_else(|| json!("PythonLTS")));
    properties.insert("poolManagementType".into(), json!("Dynamic"));
    let mut scale = Map::new();
    for (from, to) in [("max_concurrent_sessions", "maxConcurrentSessions"), ("ready_session_instances", "readySessionInstances")] {
        if let Some(value) = get(from) {
            scale.insert(to.into(), value);
        }
    }
    properties.insert("scaleConfiguration".into(), Value::Object(scale));
    let mut lifecycle = Map::new();
    lifecycle.insert("lifecycleType".into(), get("lifecycle_type").unwrap_or_else(|| json!("Timed")));
    for (from, to) in
        [("cooldown_period_in_seconds", "cooldownPeriodInSeconds"), ("max_alive_period_in_seconds", "maxAlivePeriodInSeconds")]
    {
        if let Some(value) = get(from) {
            lifecycle.insert(to.into(), value);
        }
    }
    properties.insert("dynamicPoolConfiguration".into(), json!({ "lifecycleConfiguration": lifecycle }));
    properties.insert(
        "sessionNetworkConfiguration".into(),
        json!({ "status": get("network_status").unwrap_or_else(|| json!("EgressDisabled")) }),
    );
    if let Some(Value::Array(secrets)) = get("secrets") {
        // Write-only: names only.
        let names: Vec<Value> = secrets.iter().filter_map(|secret| secret.get("name")).map(|name| json!({ "name": name })).collect();
        properties.insert("secrets".into(), Value::Array(names));
    }
    let resources = get("resources").unwrap_or_else(|| json!({}));
    let mut sandpool = Map::new();
    if let Some(Value::Object(container)) = get("container") {
        let mut spec = Map::new();
        spec.insert("name".into(), json!(name));
        for key in ["image", "command", "args", "env", "probes"] {
            if let Some(value) = container.get(key) {
                spec.insert(key.into(), camel_keys(value));
            }
        }
        let mut container_resources = Map::new();
        for key in ["cpu", "memory"] {
            if let Some(value) = resources.get(key) {
                container_resources.insert(key.into(), value.clone());
            }
        }
        if !container_resources.is_empty() {
            spec.insert("resources".into(), Value::Object(container_resources));
        }
        let mut template = json!({ "containers": [spec], "ingress": { "targetPort": container.get("target_port") } });
        if let Some(credentials) = container.get("registry_credentials") {
            template["registryCredentials"] = camel_keys(credentials);
        }
        properties.insert("customContainerTemplate".into(), template);
        if let Some(insecure) = container.get("insecure_registry") {
            sandpool.insert("insecureRegistry".into(), insecure.clone());
        }
    }
    for (from, to) in
        [("runtime", "runtime"), ("execution_timeout_in_seconds", "executionTimeoutInSeconds"), ("preload_modules", "preloadModules")]
    {
        if let Some(value) = get(from) {
            sandpool.insert(to.into(), value);
        }
    }
    let sandpool_resources: Map<String, Value> = resources
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(key, _)| get("container").is_none() || !matches!(key.as_str(), "cpu" | "memory"))
        .map(|(key, value)| (camel(key), value.clone()))
        .collect();
    if !sandpool_resources.is_empty() {
        sandpool.insert("resources".into(), Value::Object(sandpool_resources));
    }
    if !sandpool.is_empty() {
        properties.insert("sandpoolSettings".into(), Value::Object(sandpool));
    }
    properties.insert("poolManagementEndpoint".into(), json!(endpoint));
    properties.insert("provisioningState".into(), json!(state));
    json!({
        "id": format!("/subscriptions/local/resourceGroups/local/providers/Microsoft.App/sessionPools/{name}"),
        "name": name,
        "type": "Microsoft.App/sessionPools",
        "location": "local",
        "properties": properties,
    })
}

/// The resource `sandpool apply` sends for a definition: what `GET` shows, plus the secret
/// values (write-only, so they must be sent), minus the read-only fields.
pub fn resource_to_apply(definition: &PoolDefinition) -> Value {
    let mut resource = resource_from_definition(definition, "", "");
    let properties = resource["properties"].as_object_mut().expect("properties is an object");
    properties.remove("poolManagementEndpoint");
    properties.remove("provisioningState");
    if let Some(secrets) = definition.to_json().get("secrets") {
        properties.insert("secrets".into(), secrets.clone());
    }
    resource
}

fn object<'a>(value: &'a Value, what: &str) -> Result<&'a Map<String, Value>, String> {
    value.as_object().ok_or_else(|| format!("{what} must be an object"))
}

fn put(map: &mut Map<String, Value>, key: &str, value: &Value) {
    map.insert(key.to_owned(), value.clone());
}

/// `httpGet` → `http_get`.
fn snake(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `http_get` → `httpGet`.
fn camel(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut upper = false;
    for c in key.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn snake_keys(value: &Value) -> Value {
    map_keys(value, &snake)
}

fn camel_keys(value: &Value) -> Value {
    map_keys(value, &camel)
}

fn map_keys(value: &Value, rename: &dyn Fn(&str) -> String) -> Value {
    match value {
        Value::Object(map) => Value::Object(map.iter().map(|(k, v)| (rename(k), map_keys(v, rename))).collect()),
        Value::Array(items) => Value::Array(items.iter().map(|v| map_keys(v, rename)).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn custom_resource() -> Value {
        json!({
            "location": "westus",
            "properties": {
                "containerType": "CustomContainer",
                "poolManagementType": "Dynamic",
                "scaleConfiguration": { "maxConcurrentSessions": 20, "readySessionInstances": 2 },
                "dynamicPoolConfiguration": { "lifecycleConfiguration": { "lifecycleType": "Timed", "cooldownPeriodInSeconds": 600 } },
                "sessionNetworkConfiguration": { "status": "EgressDisabled" },
                "secrets": [{ "name": "regpass", "value": "hunter2" }, { "name": "token", "value": "t0k" }],
                "customContainerTemplate": {
                    "registryCredentials": { "server": "registry.local:5000", "username": "puller", "passwordSecretRef": "regpass" },
                    "containers": [{
                        "name": "app", "image": "registry.local:5000/app:v1", "command": ["/app"], "args": ["--port", "8080"],
                        "env": [{ "name": "MODE", "value": "web" }, { "name": "TOKEN", "secretRef": "token" }],
                        "resources": { "cpu": 0.5, "memory": "512Mi" },
                        "probes": [{ "type": "Liveness", "httpGet": { "path": "/health", "port": 8080 }, "periodSeconds": 5 }]
                    }],
                    "ingress": { "targetPort": 8080 }
                }
            }
        })
    }

    #[test]
    fn a_custom_container_resource_becomes_a_valid_definition_and_reads_back_without_secret_values() {
        let definition = definition_from_resource("web", &custom_resource()).unwrap();
        let config = crate::config::validate_definition(&definition).unwrap();
        let container = config.container.as_ref().unwrap();
        assert_eq!((config.max_concurrent_sessions, config.ready_session_instances, container.target_port), (20, 2, 8080));
        assert_eq!(config.memory_bytes, 512 << 20);
        assert!(container.env.contains(&("TOKEN".into(), "t0k".into())), "secret references resolve: {:?}", container.env);
        assert_eq!(container.probes.len(), 1);

        let resource = resource_from_definition(&definition, "http://127.0.0.1:8642/pools/web", "Succeeded");
        assert_eq!(resource["properties"]["secrets"], json!([{ "name": "regpass" }, { "name": "token" }]));
        assert!(!resource.to_string().contains("hunter2"), "secret values are never read back");
        let template = &resource["properties"]["customContainerTemplate"];
        assert_eq!(template["containers"][0]["env"][1], json!({ "name": "TOKEN", "secretRef": "token" }));
        assert_eq!(template["containers"][0]["probes"][0]["httpGet"]["path"], "/health");
        assert_eq!(template["registryCredentials"]["passwordSecretRef"], "regpass");
        assert_eq!(resource["properties"]["provisioningState"], "Succeeded");

        // Sending back what was read (plus the secret values) gives the same definition.
        let mut again = resource.clone();
        again["properties"]["secrets"] = custom_resource()["properties"]["secrets"].clone();
        assert_eq!(definition_from_resource("web", &again).unwrap(), definition);
    }

    #[test]
    fn python_pools_keep_sandpool_settings() {
        let resource = json!({ "properties": {
            "containerType": "PythonLTS",
            "scaleConfiguration": { "maxConcurrentSessions": 5, "readySessionInstances": 1 },
            "sandpoolSettings": { "runtime": "runsc", "preloadModules": ["numpy"], "resources": { "memory": "1Gi", "maxProcesses": 64 } }
        }});
        let definition = definition_from_resource("strong", &resource).unwrap();
        let config = crate::config::validate_definition(&definition).unwrap();
        assert_eq!(config.python_sandbox, crate::config::PythonSandbox::Gvisor);
        assert_eq!((config.memory_bytes, config.max_processes), (1 << 30, 64));
        let back = resource_from_definition(&definition, "http://x/pools/strong", "Succeeded");
        assert_eq!(back["properties"]["sandpoolSettings"]["resources"], json!({ "memory": "1Gi", "maxProcesses": 64 }));
        assert_eq!(definition_from_resource("strong", &back).unwrap(), definition);
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (json!({ "properties": { "scaleConfiguration": { "maxSessions": 3 } } }), "scaleConfiguration.maxSessions"),
            (json!({ "properties": { "colour": "red" } }), "unknown property \"colour\""),
            (json!({ "name": "other", "properties": {} }), "names pool \"other\""),
            (json!({ "properties": { "poolManagementType": "Manual" } }), "Manual"),
            (json!([1, 2]), "JSON object"),
            (
                json!({ "properties": { "customContainerTemplate": { "containers": [{ "image": "a" }, { "image": "b" }] } } }),
                "exactly one container",
            ),
        ];
        for (resource, expected) in cases {
            let err = definition_from_resource("web", &resource).unwrap_err();
            assert!(err.contains(expected), "{resource}: {err}");
        }
    }
}
