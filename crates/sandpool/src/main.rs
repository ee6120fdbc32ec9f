//! `sandpool`: the server (`sandpool serve`) and its command-line tools, in one binary.
//!
//! This file only parses arguments and dispatches. The hidden `__zygote` subcommand is how
//! the server starts a pool's zygote: it must be handled before any thread or async runtime
//! exists, because the zygote forks.

mod apply;
mod arm;
mod cli;
mod config;
mod host_limits;
mod logging;
mod pools;
mod serve;
mod session_table;

use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|arg| arg == "__zygote") {
        return ExitCode::from(sandpool_sandbox::zygote::main_on_stdin() as u8);
    }
    sandpool_auth::install_tls_provider();
    cli::main()
}
