use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    marchproxy_wasm_registry::run(marchproxy_wasm_registry::config::Cli::parse()).await
}
