//! `sandpool serve`: the composition root. Loads the configuration, provisions the Python
//! runtime, builds one engine pool per configured pool on the zygote backend, and serves the
//! HTTP API until SIGTERM or Ctrl-C.

use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); without it the embedded default is used
    #[arg(long, env = "SANDPOOL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8642]
    #[arg(long, env = "SANDPOOL_LISTEN")]
    pub listen: Option<String>,
    /// Directory for keys, the Python runtime and run-time files [default: /var/lib/sandpool]
    #[arg(long, env = "SANDPOOL_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

pub fn run(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
