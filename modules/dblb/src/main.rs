use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    marchproxy_dblb::run(marchproxy_dblb::config::Cli::parse()).await
}
