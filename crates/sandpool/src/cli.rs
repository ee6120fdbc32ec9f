//! Command-line interface: argument definitions and the small subcommands (`token issue`,
//! `api-key create`, `exec`, `default-config`). `serve` lives in its own module.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use sandpool_auth::{Grant, IdentifierScope, LocalIssuer, Role, DEFAULT_AUDIENCES};
use serde_json::Value;

use crate::config::{DEFAULT_LISTEN, DEFAULT_STATE_DIR};

#[derive(Debug, Parser)]
#[command(name = "sandpool", version, about = "Pools of pre-warmed, isolated Python sandboxes behind the Azure dynamic sessions API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server
    Serve(crate::serve::ServeArgs),
    /// Bearer tokens for the API
    #[command(subcommand)]
    Token(TokenCommand),
    /// Static API keys (for setups without an identity provider)
    #[command(subcommand, name = "api-key")]
    ApiKey(ApiKeyCommand),
    /// Run Python code in a session and print the outcome like a REPL
    Exec(ExecArgs),
    /// Build the Python runtime for sessions now (as the first `serve` would) and exit
    Prepare(PrepareArgs),
    /// Print the embedded default configuration (a valid config file to start from)
    DefaultConfig,
    /// Make a running server's pools match a file: show the plan (created, changed, deleted),
    /// then apply it
    Apply(crate::apply::ApplyArgs),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a new bearer token signed by the server's key (and nothing else) on stdout
    Issue(IssueArgs),
}

#[derive(Debug, Subcommand)]
enum ApiKeyCommand {
    /// Print a new random API key on stdout, and on stderr the [[auth.api_keys]] entry (with
    /// its hash, not the key) to add to the configuration file
    Create(ApiKeyArgs),
}

/// What a token or key may do.
#[derive(Debug, clap::Args)]
struct Permissions {
    /// A role: executor (code and files), contributor (pools, session lists, events), reader
    /// (metrics, dashboard) or admin (everything); repeat for several
    #[arg(long = "role", default_value = "executor", value_parser = parse_role)]
    roles: Vec<Role>,
    /// Make it work only for this session identifier (to hand to one end user)
    #[arg(long, conflicts_with = "identifier_prefix")]
    identifier: Option<String>,
    /// Make it work only for session identifiers starting with this prefix
    #[arg(long)]
    identifier_prefix: Option<String>,
}

impl Permissions {
    fn scope(&self) -> IdentifierScope {
        sandpool_auth::local::scope_of(self.identifier.clone(), self.identifier_prefix.clone())
    }
}

fn parse_role(text: &str) -> Result<Role, String> {
    text.parse()
}

#[derive(Debug, clap::Args)]
struct IssueArgs {
    /// The server's state directory, which holds the signing key
    #[arg(long, env = "SANDPOOL_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// How long the token is valid, e.g. 30m, 12h, 7d
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Who the token is for (its `sub` claim)
    #[arg(long, default_value = "sandpool-cli")]
    subject: String,
    /// The token's audience; must be one of the server's `[auth] audiences`
    #[arg(long, default_value = DEFAULT_AUDIENCES[0])]
    audience: String,
    #[command(flatten)]
    permissions: Permissions,
}

#[derive(Debug, clap::Args)]
struct ApiKeyArgs {
    /// A name for the key, shown in logs instead of the key
    #[arg(long)]
    name: String,
    #[command(flatten)]
    permissions: Permissions,
}

#[derive(Debug, clap::Args)]
struct PrepareArgs {
    /// Configuration file (TOML); without it the embedded default is used
    #[arg(long, env = "SANDPOOL_CONFIG")]
    config: Option<PathBuf>,
    /// The server's state directory [default: /var/lib/sandpool]
    #[arg(long, env = "SANDPOOL_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Where to build the runtime, overriding the configuration's [runtime] dir
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ExecArgs {
    /// Pool endpoint
    #[arg(long, env = "SANDPOOL_ENDPOINT", default_value_t = format!("http://{DEFAULT_LISTEN}/pools/default"))]
    endpoint: String,
    /// Session identifier; reuse one to keep state between calls [default: a new one, printed on stderr]
    #[arg(long, env = "SANDPOOL_IDENTIFIER")]
    identifier: Option<String>,
    /// Bearer token [default: one minted with the key in --state-dir]
    #[arg(long, env = "SANDPOOL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// State directory whose key mints a token when --token is not given
    #[arg(long, env = "SANDPOOL_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Execution timeout in seconds [default: the pool's]
    #[arg(long)]
    timeout: Option<u64>,
    /// Python code to run; `-` reads it from stdin
    code: String,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => crate::serve::run(args).map(|()| ExitCode::SUCCESS),
        Command::Token(TokenCommand::Issue(args)) => issue(args).map(|()| ExitCode::SUCCESS),
        Command::ApiKey(ApiKeyCommand::Create(args)) => create_api_key(args).map(|()| ExitCode::SUCCESS),
        Command::Exec(args) => exec(args),
        Command::Prepare(args) => prepare(args).map(|()| ExitCode::SUCCESS),
        Command::Apply(args) => crate::apply::run(args, |state_dir| {
            Ok(load_issuer(state_dir, DEFAULT_AUDIENCES[0])?.issue(&Grant {
                subject: "sandpool-apply".into(),
                ttl: Duration::from_secs(3600),
                roles: vec![Role::Contributor],
                scope: IdentifierScope::Any,
            }))
        })
        .map(|()| ExitCode::SUCCESS),
        Command::DefaultConfig => {
            print!("{}", crate::config::DEFAULT_CONFIG);
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// Logs to stderr as text; `SANDPOOL_LOG` (or `RUST_LOG`) sets the filter, `info` by default.
pub fn init_logging() {
    // Without traces nothing can fail and there is nothing to flush.
    let _ = crate::logging::init(false, None).map(std::mem::forget);
}

fn load_issuer(state_dir: &std::path::Path, audience: &str) -> anyhow::Result<LocalIssuer> {
    let keys = state_dir.join("keys");
    if !state_dir.exists() {
        bail!(
            "state directory {} does not exist; start `sandpool serve --state-dir {}` once, or pass --state-dir",
            state_dir.display(),
            state_dir.display()
        );
    }
    LocalIssuer::load_or_create(&keys, &[audience.to_owned()])
        .with_context(|| format!("cannot load the signing key from {} (are you root?)", keys.display()))
}

fn issue(args: IssueArgs) -> anyhow::Result<()> {
    let issuer = load_issuer(&args.state_dir, &args.audience)?;
    let grant = Grant { subject: args.subject, ttl: args.ttl, roles: args.permissions.roles.clone(), scope: args.permissions.scope() };
    println!("{}", issuer.issue(&grant));
    Ok(())
}

fn create_api_key(args: ApiKeyArgs) -> anyhow::Result<()> {
    let (key, hash) = sandpool_auth::api_key::generate().map_err(anyhow::Error::msg)?;
    let roles: Vec<String> = args.permissions.roles.iter().map(|role| format!("{:?}", role.as_str())).collect();
    let mut entry = format!("[[auth.api_keys]]\nname = {:?}\nsha256 = \"{hash}\"\nroles = [{}]\n", args.name, roles.join(", "));
    match args.permissions.scope() {
        IdentifierScope::Any => {}
        IdentifierScope::Exactly(id) => entry.push_str(&format!("identifier = {id:?}\n")),
        IdentifierScope::StartingWith(prefix) => entry.push_str(&format!("identifier_prefix = {prefix:?}\n")),
    }
    eprintln!(
        "Add this entry to the server's configuration file (it holds the key's hash, not the key), then restart the server:\n\n{entry}"
    );
    println!("{key}");
    Ok(())
}

fn prepare(args: PrepareArgs) -> anyhow::Result<()> {
    init_logging();
    let overrides = crate::config::Overrides { listen: None, state_dir: args.state_dir };
    let mut config = crate::config::Config::load(args.config.as_deref(), &overrides)?;
    if let Some(dir) = args.runtime_dir {
        config.runtime.dir = dir;
    }
    let spec = sandpool_sandbox::runtime::RuntimeSpec {
        python: config.runtime.python,
        packages: config.runtime.packages,
        index_url: config.runtime.index_url,
        dir: config.runtime.dir,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
    let built = runtime.block_on(sandpool_sandbox::runtime::provision(&spec))?;
    println!("{}", built.venv.display());
    Ok(())
}

fn exec(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let code = if args.code == "-" {
        let mut code = String::new();
        std::io::stdin().read_to_string(&mut code).context("cannot read code from stdin")?;
        code
    } else {
        args.code
    };
    let token = match args.token {
        Some(token) => token,
        None => load_issuer(&args.state_dir, DEFAULT_AUDIENCES[0])?.issue(&Grant {
            subject: "sandpool-exec".into(),
            ttl: Duration::from_secs(3600),
            roles: vec![Role::Executor],
            scope: IdentifierScope::Any,
        }),
    };
    let identifier = match args.identifier {
        Some(id) => id,
        None => {
            let id = format!("cli-{}", uuid::Uuid::new_v4());
            eprintln!("session identifier: {id}  (pass --identifier {id} to keep using this session)");
            id
        }
    };
    let mut body = serde_json::json!({ "codeInputType": "Inline", "executionType": "Synchronous", "code": code });
    if let Some(timeout) = args.timeout {
        body["timeoutInSeconds"] = timeout.into();
    }
    let endpoint = args.endpoint.trim_end_matches('/');
    let encoded: String = percent_encoding::utf8_percent_encode(&identifier, sandpool_api::routing::QUERY_VALUE).to_string();
    let url = format!("{endpoint}/executions?api-version=2025-10-02-preview&identifier={encoded}");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
    let (status, reply) = runtime.block_on(async {
        let client = reqwest::Client::new();
        let response = client.post(&url).bearer_auth(token).json(&body).send().await.with_context(|| format!("cannot reach {endpoint}"))?;
        let status = response.status();
        let text = response.text().await.context("cannot read the response")?;
        anyhow::Ok((status, text))
    })?;
    let reply: Value = serde_json::from_str(&reply).unwrap_or(Value::String(reply));
    if !status.is_success() {
        let message = reply["error"]["message"].as_str().map(str::to_owned).unwrap_or_else(|| reply.to_string());
        bail!("the server answered {status}: {message}");
    }
    let result = &reply["result"];
    print!("{}", result["stdout"].as_str().unwrap_or_default());
    eprint!("{}", result["stderr"].as_str().unwrap_or_default());
    match &result["executionResult"] {
        Value::Null => {}
        Value::String(text) if text.is_empty() => {}
        Value::Object(image) if image.get("type").and_then(Value::as_str) == Some("image") => {
            let size = image.get("base64_data").and_then(Value::as_str).map(|d| d.len() * 3 / 4).unwrap_or(0);
            println!("[{} image, {} bytes]", image.get("format").and_then(Value::as_str).unwrap_or("png"), size);
        }
        Value::String(text) => println!("{text}"),
        other => println!("{other}"),
    }
    if reply["status"] == "Succeeded" {
        Ok(ExitCode::SUCCESS)
    } else {
        if let Some(message) = reply["error"]["message"].as_str() {
            if result["stderr"].as_str().is_none_or(str::is_empty) {
                eprintln!("{message}");
            }
        }
        Ok(ExitCode::FAILURE)
    }
}
