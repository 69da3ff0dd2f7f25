use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    marchproxy_rtmp::run(marchproxy_rtmp::config::Cli::parse()).await
}
