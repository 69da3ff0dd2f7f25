//! `marchproxy up`: MarchProxy on one machine, in one process. Today that is the NLB with a
//! state directory in the working directory; the modules join here as their crates land.
//! Prints what listens where, and stops everything on Ctrl-C or SIGTERM.

use std::{future::Future, path::PathBuf};

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "marchproxy", version, about = "Run MarchProxy on one machine")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start the NLB (and, as they land, every module) in this process.
    Up(UpArgs),
}

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// TOML file with the NLB's settings (the keys of `marchproxy-nlb --help`).
    #[arg(long, env = "MARCHPROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where operator state is kept.
    #[arg(
        long,
        env = "MARCHPROXY_STATE_DIR",
        default_value = ".marchproxy/state"
    )]
    pub state_dir: PathBuf,
    /// Log format.
    #[arg(long, env = "MARCHPROXY_LOG_FORMAT", value_enum, default_value_t = marchproxy::telemetry::LogFormat::Text)]
    pub log_format: marchproxy::telemetry::LogFormat,
}

/// Runs the command until `shutdown` completes.
pub async fn run(
    cli: Cli,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Command::Up(args) = cli.command;
    marchproxy::telemetry::init(args.log_format);
    let nlb_args = marchproxy_nlb::Args {
        config: args.config,
        state_dir: Some(args.state_dir),
        log_format: Some(args.log_format),
        ..marchproxy_nlb::Args::default()
    };
    let config = marchproxy_nlb::Config::from_args(nlb_args)?;
    let state_dir = config.state_dir.clone().unwrap_or_default();
    let listeners: Vec<String> = config
        .listen
        .iter()
        .map(|spec| {
            spec.protocol
                .map_or_else(|| "auto".to_owned(), marchproxy::names::protocol_name)
        })
        .collect();
    let nlb = marchproxy_nlb::Server::bind(config).await?;
    let (grpc, admin) = (nlb.grpc_addr(), nlb.admin_addr());
    let mut rows = vec![
        ("component", "listens on".to_owned(), "what".to_owned()),
        (
            "nlb",
            grpc.to_string(),
            "gRPC NLBService and ModuleService, grpc.health.v1, reflection".to_owned(),
        ),
        (
            "nlb",
            admin.to_string(),
            "admin HTTP: /metrics /healthz /readyz /status".to_owned(),
        ),
    ];
    for (addr, protocol) in nlb.listen_addrs().into_iter().zip(listeners) {
        rows.push(("nlb", addr.to_string(), format!("data plane ({protocol})")));
    }
    println!("MarchProxy is up:");
    for (component, address, what) in rows {
        println!("  {component:<10} {address:<28} {what}");
    }
    println!("  state in {}", state_dir.display());
    let reachable = if grpc.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], grpc.port()))
    } else {
        grpc
    };
    println!("  try: marchctl --nlb http://{reachable} status");
    nlb.run(shutdown).await?;
    println!("MarchProxy stopped");
    Ok(())
}
