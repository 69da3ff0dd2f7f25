use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    marchproxy_alb::run(marchproxy_alb::config::Cli::parse()).await
}
