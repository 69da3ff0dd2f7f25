//! `marchproxy-nlb`: parses flags, sets up logging, runs the NLB until SIGINT or SIGTERM.

use anyhow::Context;
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = marchproxy_nlb::Args::parse();
    let config = marchproxy_nlb::Config::from_args(args)?;
    marchproxy::telemetry::init(config.log_format);
    marchproxy_nlb::run(config, marchproxy::signal::shutdown())
        .await
        .context("the NLB stopped with an error")
}
