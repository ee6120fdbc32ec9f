//! `sandpool apply -f FILE`: make a running server's pools match a file, like an
//! infrastructure-as-code tool.
//!
//! The file is a config file (only its `[[pools]]` tables are used), checked locally first:
//! a broken file is reported with the key or value at fault and nothing is sent. Then the
//! server is asked what each pool would change (`PUT …?whatIf=true`, so write-only secrets
//! are compared by the server, which knows them), pools on the server that the file does
//! not name are marked for deletion, and the plan is printed. Without `--dry-run` the plan
//! is carried out: creations and updates first, deletions last, stopping at the first
//! failure with what was done so far. Running it again with the same file changes nothing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::config::{Config, Overrides, PoolDefinition};

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// The file whose [[pools]] the server should have (a sandpool config file)
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// The server's base URL
    #[arg(long, env = "SANDPOOL_URL", default_value_t = format!("http://{}", crate::config::DEFAULT_LISTEN))]
    pub server: String,
    /// Bearer token with the contributor role [default: one minted with the key in --state-dir]
    #[arg(long, env = "SANDPOOL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// State directory whose key mints a token when --token is not given
    #[arg(long, env = "SANDPOOL_STATE_DIR", default_value = crate::config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Show the plan and change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Leave pools the file does not name alone instead of deleting them
    #[arg(long)]
    pub keep_others: bool,
}

/// One line of the plan.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Create(PoolDefinition),
    Update(PoolDefinition, Vec<String>),
    Unchanged(String),
    Delete(String),
}

impl Step {
    fn name(&self) -> &str {
        match self {
            Step::Create(definition) | Step::Update(definition, _) => definition.name(),
            Step::Unchanged(name) | Step::Delete(name) => name,
        }
    }
}

pub fn run(args: ApplyArgs, token: impl FnOnce(&std::path::Path) -> anyhow::Result<String>) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    let config = Config::parse(&text, &Overrides::default()).with_context(|| format!("invalid pools in {}", args.file.display()))?;
    let token = match args.token.clone() {
        Some(token) => token,
        None => token(&args.state_dir)?,
    };
    let server = args.server.trim_end_matches('/').to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(apply(args, server, token, config.definitions))
}

async fn apply(args: ApplyArgs, server: String, token: String, definitions: Vec<PoolDefinition>) -> anyhow::Result<()> {
    let client = Client { http: reqwest::Client::new(), server: server.clone(), token };
    let listed = client.send(reqwest::Method::GET, "/pools", None).await?;
    let existing: Vec<String> =
        listed["value"].as_array().into_iter().flatten().filter_map(|pool| pool["name"].as_str().map(str::to_owned)).collect();
    let mut plan = Vec::new();
    for definition in definitions {
        let definition = definition.normalized();
        let resource = crate::arm::resource_to_apply(&definition);
        let answer = client.send(reqwest::Method::PUT, &format!("/pools/{}?whatIf=true", definition.name()), Some(&resource)).await?;
        plan.push(match answer["change"].as_str() {
            Some("create") => Step::Create(definition),
            Some("none") => Step::Unchanged(definition.name().to_owned()),
            _ => {
                let fields = answer["fields"].as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect();
                Step::Update(definition, fields)
            }
        });
    }
    if !args.keep_others {
        let named: Vec<String> = plan.iter().map(|step| step.name().to_owned()).collect();
        for name in existing.into_iter().filter(|name| !named.contains(name)) {
            plan.push(Step::Delete(name));
        }
    }
    print_plan(&server, &plan);
    let changes: Vec<&Step> = plan.iter().filter(|step| !matches!(step, Step::Unchanged(_))).collect();
    if changes.is_empty() || args.dry_run {
        if args.dry_run && !changes.is_empty() {
            println!("Dry run: nothing was changed.");
        }
        return Ok(());
    }
    // Creations and updates first, so a failure never leaves the server with fewer pools.
    let ordered =
        changes.iter().filter(|step| !matches!(step, Step::Delete(_))).chain(changes.iter().filter(|step| matches!(step, Step::Delete(_))));
    let mut done = 0;
    for step in ordered {
        let started = Instant::now();
        let (verb, result) = match step {
            Step::Create(definition) | Step::Update(definition, _) => {
                let verb = if matches!(step, Step::Create(_)) { "creating" } else { "updating" };
                print_progress(verb, definition.name());
                let resource = crate::arm::resource_to_apply(definition);
                (verb, client.send(reqwest::Method::PUT, &format!("/pools/{}", definition.name()), Some(&resource)).await.map(drop))
            }
            Step::Delete(name) => {
                print_progress("deleting", name);
                ("deleting", client.send(reqwest::Method::DELETE, &format!("/pools/{name}"), None).await.map(drop))
            }
            Step::Unchanged(_) => continue,
        };
        match result {
            Ok(()) => {
                println!("done ({:.1} s)", started.elapsed().as_secs_f64());
                done += 1;
            }
            Err(err) => {
                println!("failed");
                bail!("{verb} pool '{}' failed after {done} of {} changes: {err:#}", step.name(), changes.len());
            }
        }
    }
    println!("Applied: {done} change(s).");
    Ok(())
}

fn print_progress(verb: &str, name: &str) {
    use std::io::Write;
    print!("{verb} pool '{name}'... ");
    let _ = std::io::stdout().flush();
}

fn print_plan(server: &str, plan: &[Step]) {
    let count = |matches: fn(&Step) -> bool| plan.iter().filter(|step| matches(step)).count();
    let (create, update, delete) =
        (count(|s| matches!(s, Step::Create(_))), count(|s| matches!(s, Step::Update(..))), count(|s| matches!(s, Step::Delete(_))));
    if create + update + delete == 0 {
        println!("No changes: the pools of {server} match the file ({} pool(s)).", plan.len());
        return;
    }
    println!("Plan for {server}: {create} to create, {update} to change, {delete} to delete.");
    for step in plan {
        match step {
            Step::Create(definition) => println!("  + {:<24} create", definition.name()),
            Step::Update(definition, fields) => println!(
                "  ~ {:<24} change {} (ready sessions are replaced; allocated sessions keep running)",
                definition.name(),
                fields.join(", ")
            ),
            Step::Delete(name) => println!("  - {name:<24} delete (its sessions are deleted)"),
            Step::Unchanged(name) => println!("    {name:<24} unchanged"),
        }
    }
}

/// The server's management API.
struct Client {
    http: reqwest::Client,
    server: String,
    token: String,
}

impl Client {
    async fn send(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.server);
        let mut request = self.http.request(method, &url).bearer_auth(&self.token).timeout(Duration::from_secs(900));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.with_context(|| format!("cannot reach {}", self.server))?;
        let status = response.status();
        let text = response.text().await.context("cannot read the server's answer")?;
        let value: Value = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        if !status.is_success() {
            let message = value["error"]["message"].as_str().map(str::to_owned).unwrap_or_else(|| value.to_string());
            bail!("the server answered {status}: {message}");
        }
        Ok(value)
    }
}
