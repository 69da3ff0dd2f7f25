//! `marchctl`: parses the command line and runs it against the NLB.

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    marchproxy_manager_client::cli::run(marchproxy_manager_client::cli::Cli::parse()).await
}
