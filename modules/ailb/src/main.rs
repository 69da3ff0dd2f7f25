use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    marchproxy_ailb::run(marchproxy_ailb::config::Cli::parse()).await
}
