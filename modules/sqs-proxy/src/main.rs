use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    marchproxy_sqs_proxy::run(marchproxy_sqs_proxy::config::Cli::parse()).await
}
