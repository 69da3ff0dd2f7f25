//! `marchproxy`: parses the command line and runs it until Ctrl-C or SIGTERM.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    marchproxy_launcher::run(
        marchproxy_launcher::Cli::parse(),
        marchproxy::signal::shutdown(),
    )
    .await
}
