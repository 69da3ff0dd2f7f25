//! A module binary in a dozen lines: the echo module on the runtime, with the common flags.
//! `cargo run -p marchproxy-runtime --example echo -- --nlb http://127.0.0.1:50050 --listen 127.0.0.1:7007`

use clap::Parser;
use marchproxy::names::ModuleKind;
use marchproxy_runtime::{CommonArgs, RuntimeConfig, echo::EchoModule};

#[derive(Parser)]
#[command(
    name = "echo",
    about = "A TCP echo module on the MarchProxy runtime",
    disable_version_flag = true
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = RuntimeConfig::from_args(ModuleKind::Alb, Args::parse().common)?;
    marchproxy::telemetry::init(config.log_format);
    marchproxy_runtime::run(
        EchoModule::new(ModuleKind::Alb),
        config,
        marchproxy::signal::shutdown(),
    )
    .await?;
    Ok(())
}
