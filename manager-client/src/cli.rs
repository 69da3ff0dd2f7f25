//! `marchctl`: the operator's command line for the NLB. Every command is one typed RPC (or a
//! stream of them with `--watch`); `-o json` prints the response as protobuf JSON, `-o table`
//! a human summary.

use std::{collections::HashMap, path::PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use marchproxy::{
    names::{self, ModuleKind},
    pb,
};
use tokio_stream::StreamExt;

use crate::{NlbClient, json, table};

#[derive(Parser, Debug)]
#[command(
    name = "marchctl",
    version,
    about = "Operate MarchProxy's NLB: modules, routes, health, metrics, config, scaling, load"
)]
pub struct Cli {
    /// The NLB's gRPC endpoint.
    #[arg(
        long,
        env = "MARCHPROXY_NLB",
        default_value = "http://127.0.0.1:50050",
        global = true
    )]
    pub nlb: String,
    /// Cluster API key, sent as `authorization: Bearer <key>`.
    #[arg(
        long,
        env = "MARCHPROXY_API_KEY",
        hide_env_values = true,
        global = true
    )]
    pub api_key: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Registered module instances.
    #[command(subcommand)]
    Modules(ModulesCommand),
    /// The routing table.
    #[command(subcommand)]
    Routes(RoutesCommand),
    /// The NLB's health, optionally asking every module.
    Health {
        /// Also probe the state directory.
        #[arg(long)]
        deep: bool,
        /// Call each module's HealthCheck.
        #[arg(long)]
        modules: bool,
    },
    /// NLB status summary.
    Status {
        /// List the modules too.
        #[arg(long)]
        modules: bool,
    },
    /// NLB and module metrics, once or continuously.
    Metrics(MetricsArgs),
    /// Live config sections (heartbeat, scaling, balancing, rollout).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Ask for more or fewer instances of a module kind.
    Scale(ScaleArgs),
    /// Load per instance and the balance score.
    Load {
        /// Only this module kind (alb, dblb, ...).
        #[arg(long = "type")]
        kind: Option<ModuleKind>,
        /// Average over the last five minutes of heartbeats.
        #[arg(long)]
        historical: bool,
    },
    /// Blue/green: the split of a module kind's traffic between versions.
    #[command(subcommand)]
    Bluegreen(BluegreenCommand),
    /// Gradual promotions: status (with --watch), pause and resume.
    #[command(subcommand)]
    Rollout(crate::rollout::RolloutCommand),
    /// Even out load: set the balancing strategy and ask overloaded instances to shed.
    Rebalance {
        /// least_connections, round_robin or random.
        #[arg(long)]
        strategy: Option<String>,
        /// Act even when the balance score is good.
        #[arg(long)]
        force: bool,
        /// Only these instances (comma-separated).
        #[arg(long, value_delimiter = ',')]
        instances: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ModulesCommand {
    /// List instances.
    List {
        #[arg(long = "type")]
        kind: Option<ModuleKind>,
        /// healthy, degraded, unhealthy, starting, stopping ...
        #[arg(long)]
        status: Option<String>,
        /// FIELD=VALUE (or FIELD<op>VALUE with op one of != >= <= > <), repeatable.
        #[arg(long = "filter")]
        filters: Vec<String>,
        #[arg(long)]
        sort: Option<String>,
        #[arg(long)]
        desc: bool,
        #[arg(long, default_value_t = 0)]
        page: i32,
        #[arg(long, default_value_t = 0)]
        page_size: i32,
    },
    /// One instance with its routes, stats and deployment.
    Info { instance_id: String },
    /// Register an instance by hand (modules normally register themselves).
    Register {
        #[arg(long)]
        id: String,
        #[arg(long = "type")]
        kind: ModuleKind,
        /// The module's gRPC host:port.
        #[arg(long)]
        address: String,
        #[arg(long, default_value = "")]
        version: String,
        /// Where data connections go (host:port), if not the gRPC host.
        #[arg(long)]
        data_address: Option<String>,
        #[arg(long, default_value_t = 0)]
        max_connections: i32,
    },
    /// Send one heartbeat for an instance.
    Heartbeat {
        instance_id: String,
        #[arg(long)]
        registration_id: String,
        #[arg(long, default_value = "healthy")]
        status: String,
        #[arg(long, default_value_t = 0)]
        active_connections: i64,
    },
    /// Remove an instance (needs its registration id).
    Unregister {
        instance_id: String,
        #[arg(long)]
        registration_id: String,
        /// Stop new traffic and wait for open connections first.
        #[arg(long)]
        graceful: bool,
        #[arg(long, default_value_t = 0)]
        drain_timeout: i32,
    },
    /// Report metric data points for an instance (NAME=VALUE ...).
    ReportMetrics {
        instance_id: String,
        #[arg(required = true)]
        points: Vec<String>,
    },
    /// An instance's metrics.
    Metrics {
        instance_id: String,
        #[arg(long, value_delimiter = ',')]
        names: Vec<String>,
    },
}

#[derive(Args, Debug, Clone)]
pub struct RouteArgs {
    #[arg(long)]
    pub id: String,
    /// http, https, postgres, mysql, rtmp, tcp ...
    #[arg(long, default_value = "unspecified")]
    pub protocol: String,
    /// Host glob (SNI/Host), IP or CIDR; empty for any.
    #[arg(long, default_value = "")]
    pub source: String,
    /// Module kind or instance id (operator routes).
    #[arg(long, default_value = "")]
    pub destination: String,
    #[arg(long, default_value_t = 0)]
    pub source_port: i32,
    #[arg(long, default_value_t = 0)]
    pub destination_port: i32,
    #[arg(long, default_value = "")]
    pub path: String,
    #[arg(long, default_value_t = 0)]
    pub priority: i32,
}

#[derive(Subcommand, Debug)]
pub enum RoutesCommand {
    /// Show the routing table.
    List {
        #[arg(long)]
        protocol: Option<String>,
        /// Target instance id, module kind or destination text.
        #[arg(long)]
        destination: Option<String>,
    },
    /// Add or replace one operator route.
    Add {
        #[command(flatten)]
        route: RouteArgs,
        #[arg(long)]
        validate_only: bool,
    },
    /// Write routes from a JSON file (an array of Route objects).
    Apply {
        #[arg(long)]
        file: PathBuf,
        /// The file becomes the whole operator table.
        #[arg(long)]
        replace_all: bool,
        #[arg(long)]
        validate_only: bool,
        /// Write them as this module instance's routes instead of operator routes.
        #[arg(long)]
        instance: Option<String>,
    },
    /// Check a route and ask the modules that would serve it whether they can.
    Validate {
        #[command(flatten)]
        route: RouteArgs,
    },
    /// Where would this flow go? (RouteRequest)
    Resolve {
        #[arg(long, default_value = "unspecified")]
        protocol: String,
        /// Host name (SNI/Host) or client IP.
        #[arg(long, default_value = "")]
        source: String,
        /// The listener port the client connected to.
        #[arg(long, default_value_t = 0)]
        port: i32,
        #[arg(long)]
        client_ip: Option<String>,
        /// Predict only; count nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum BluegreenCommand {
    /// The active version and every version's weight.
    Active {
        /// Module kind (alb, dblb, ...) or an instance id.
        target: String,
    },
    /// Give a version a share of new connections (the others share the rest).
    Weight {
        target: String,
        version: String,
        percent: i32,
    },
    /// Move all traffic to a version: at once, or step by step while watching it.
    Promote {
        target: String,
        version: String,
        #[arg(long)]
        immediate: bool,
        /// Percent added per step [default: the rollout section's]
        #[arg(long, default_value_t = 0)]
        rate: i32,
    },
    /// Undo a promotion, or return to the previous (or named) version.
    Rollback {
        target: String,
        #[arg(long = "to", default_value = "")]
        to: String,
    },
}

#[derive(Args, Debug)]
pub struct MetricsArgs {
    /// Only these metric names (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub names: Vec<String>,
    /// Sum module metrics by name and kind.
    #[arg(long)]
    pub aggregate: bool,
    /// Keep printing every --interval seconds (StreamNLBMetrics).
    #[arg(long)]
    pub watch: bool,
    #[arg(long, default_value_t = 5)]
    pub interval: i32,
    /// With --watch: include module metrics.
    #[arg(long)]
    pub modules: bool,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Show one section or all.
    Get { section: Option<String> },
    /// Change a section: JSON object with the keys to change.
    Set {
        section: String,
        /// Inline JSON, e.g. '{"unhealthy_after_ms": 10000}'.
        #[arg(long, conflicts_with = "file")]
        data: Option<String>,
        #[arg(long)]
        file: Option<PathBuf>,
        #[arg(long)]
        validate_only: bool,
    },
}

#[derive(Args, Debug)]
pub struct ScaleArgs {
    /// Module kind (alb, dblb, ...); or use --instance.
    pub kind: Option<ModuleKind>,
    #[arg(long)]
    pub instance: Option<String>,
    /// scale-up, scale-down or auto.
    #[arg(long)]
    pub action: String,
    #[arg(long, default_value_t = 0)]
    pub target: i32,
    #[arg(long, default_value_t = 0)]
    pub min: i32,
    #[arg(long, default_value_t = 0)]
    pub max: i32,
    /// auto: connections one instance should carry.
    #[arg(long, default_value_t = 0)]
    pub target_connections: i32,
    /// auto: CPU percent one instance should run at.
    #[arg(long, default_value_t = 0)]
    pub target_cpu: i32,
    #[arg(long, default_value_t = 0)]
    pub cooldown: i32,
}

/// Runs one command against the NLB.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let crate::Clients {
        nlb: mut client,
        modules: mut gateway,
    } = crate::connect(&cli.nlb, cli.api_key.as_deref()).await?;
    let out = Printer { output: cli.output };
    match cli.command {
        Command::Modules(command) => modules(&mut client, &out, command).await,
        Command::Routes(command) => routes(&mut client, &out, command).await,
        Command::Health { deep, modules } => {
            let answer = call(client.check_health(pb::CheckHealthRequest {
                deep_check: deep,
                check_modules: modules,
            }))
            .await?;
            out.show(&answer, "CheckHealthResponse", |a| {
                println!("{}: {}", health(a.status), a.message);
                let rows: Vec<Vec<String>> = sorted(&a.module_health)
                    .into_iter()
                    .map(|(id, h)| vec![id.clone(), health(*h)])
                    .collect();
                if !rows.is_empty() {
                    table::print(&["INSTANCE", "HEALTH"], &rows);
                }
                table::print_pairs(&a.checks);
            })
        }
        Command::Status { modules } => {
            let answer = call(client.get_nlb_status(pb::GetNlbStatusRequest {
                include_modules: modules,
            }))
            .await?;
            out.show(&answer, "GetNLBStatusResponse", |a| {
                println!(
                    "status: {}  version: {}  modules: {}  route requests: {}",
                    health(a.status),
                    a.version,
                    a.registered_modules,
                    a.total_requests
                );
                table::print_pairs(&a.details);
                if modules {
                    print_modules(&a.modules);
                }
            })
        }
        Command::Metrics(args) => metrics(&mut client, &out, args).await,
        Command::Config(command) => config(&mut client, &out, command).await,
        Command::Rollout(command) => crate::rollout::run(&mut client, &out, command).await,
        Command::Scale(args) => scale(&mut client, &out, args).await,
        Command::Load { kind, historical } => {
            let answer = call(
                client.get_load_distribution(pb::GetLoadDistributionRequest {
                    module_type_filter: kind.map_or(0, |k| k.module_type() as i32),
                    include_historical: historical,
                }),
            )
            .await?;
            out.show(&answer, "GetLoadDistributionResponse", |a| {
                let rows = sorted(&a.distribution)
                    .into_iter()
                    .map(|(id, l)| {
                        vec![
                            id.clone(),
                            l.active_connections.to_string(),
                            format!("{:.1}", l.cpu_usage_percent),
                            format!("{:.1}", l.memory_usage_mb),
                            l.requests_per_second.to_string(),
                            format!("{:.1}", l.load_score),
                        ]
                    })
                    .collect::<Vec<_>>();
                table::print(
                    &["INSTANCE", "CONNECTIONS", "CPU%", "MEM_MB", "RPS", "LOAD"],
                    &rows,
                );
                println!("balance score: {:.2}", a.balance_score);
            })
        }
        Command::Bluegreen(command) => bluegreen(&mut gateway, &out, command).await,
        Command::Rebalance {
            strategy,
            force,
            instances,
        } => {
            let answer = call(client.rebalance_load(pb::RebalanceLoadRequest {
                force,
                target_instances: instances,
                strategy: strategy.unwrap_or_default(),
            }))
            .await?;
            out.show(&answer, "RebalanceLoadResponse", |a| {
                println!("{}", a.message);
                let rows = sorted(&a.previous_distribution)
                    .into_iter()
                    .map(|(id, before)| {
                        vec![
                            id.clone(),
                            before.to_string(),
                            a.new_distribution
                                .get(id)
                                .copied()
                                .unwrap_or_default()
                                .to_string(),
                        ]
                    })
                    .collect::<Vec<_>>();
                table::print(&["INSTANCE", "BEFORE", "TARGET"], &rows);
            })
        }
    }
}

pub(crate) struct Printer {
    pub(crate) output: Output,
}

impl Printer {
    /// Prints `message` as JSON, or with `human` for tables.
    fn show<M: prost::Message>(
        &self,
        message: &M,
        type_name: &str,
        human: impl FnOnce(&M),
    ) -> anyhow::Result<()> {
        match self.output {
            Output::Json => {
                let value = json::to_json(message, type_name)?;
                println!("{}", serde_json::to_string_pretty(&value)?);
            }
            Output::Table => human(message),
        }
        Ok(())
    }
}

/// Awaits an RPC; a failure becomes an error that names the gRPC code and says what went wrong.
pub(crate) async fn call<T>(
    future: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match future.await {
        Ok(response) => Ok(response.into_inner()),
        Err(status) => bail!("{:?}: {}", status.code(), status.message()),
    }
}

fn sorted<K: Ord, V>(map: &HashMap<K, V>) -> Vec<(&K, &V)> {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    entries
}

fn health(value: i32) -> String {
    pb::HealthStatus::try_from(value).map_or_else(|_| value.to_string(), names::health_name)
}

fn kind(value: i32) -> String {
    ModuleKind::from_module_type(value).map_or_else(|| value.to_string(), |k| k.name().to_owned())
}

fn protocol(value: i32) -> String {
    pb::Protocol::try_from(value).map_or_else(|_| value.to_string(), names::protocol_name)
}

fn parse_protocol(text: &str) -> anyhow::Result<pb::Protocol> {
    names::parse_protocol(text).with_context(|| {
        format!("unknown protocol `{text}`; use e.g. http, https, postgres, mysql, rtmp, tcp")
    })
}

fn print_modules(modules: &[pb::ModuleInstance]) {
    let rows = modules
        .iter()
        .map(|m| {
            vec![
                m.instance_id.clone(),
                kind(m.module_type),
                m.version.clone(),
                health(m.health_status),
                m.address.clone(),
                m.current_connections.to_string(),
                format!("{}%", m.traffic_weight),
            ]
        })
        .collect::<Vec<_>>();
    table::print(
        &[
            "INSTANCE",
            "TYPE",
            "VERSION",
            "HEALTH",
            "ADDRESS",
            "CONNECTIONS",
            "WEIGHT",
        ],
        &rows,
    );
}

fn filter(text: &str) -> anyhow::Result<pb::Filter> {
    for operator in ["!=", ">=", "<=", "=", ">", "<"] {
        if let Some((field, value)) = text.split_once(operator) {
            return Ok(pb::Filter {
                field: field.trim().into(),
                operator: operator.into(),
                value: value.trim().into(),
            });
        }
    }
    bail!("filter `{text}` needs an operator: FIELD=VALUE, FIELD!=VALUE, FIELD>VALUE ...")
}

fn route_of(args: RouteArgs) -> anyhow::Result<pb::Route> {
    Ok(pb::Route {
        route_id: args.id,
        protocol: parse_protocol(&args.protocol)? as i32,
        source_pattern: args.source,
        destination_pattern: args.destination,
        source_port: args.source_port,
        destination_port: args.destination_port,
        path_pattern: args.path,
        priority: args.priority,
        ..Default::default()
    })
}

async fn modules(
    client: &mut NlbClient,
    out: &Printer,
    command: ModulesCommand,
) -> anyhow::Result<()> {
    match command {
        ModulesCommand::List {
            kind: module_kind,
            status,
            filters,
            sort,
            desc,
            page,
            page_size,
        } => {
            let status_filter = match status {
                Some(text) => names::parse_health(&text).with_context(|| format!("unknown status `{text}`; use healthy, degraded, unhealthy, starting, stopping, stopped"))? as i32,
                None => 0,
            };
            let query = pb::Query {
                filters: filters
                    .iter()
                    .map(|f| filter(f))
                    .collect::<anyhow::Result<_>>()?,
                sort_by: sort.unwrap_or_default(),
                sort_desc: desc,
                pagination: Some(pb::Pagination {
                    page,
                    page_size,
                    ..Default::default()
                }),
            };
            let answer = call(client.list_modules(pb::ListModulesRequest {
                module_type_filter: module_kind.map_or(0, |k| k.module_type() as i32),
                status_filter,
                query: Some(query),
            }))
            .await?;
            out.show(&answer, "ListModulesResponse", |a| {
                print_modules(&a.modules);
                if let Some(p) = &a.pagination {
                    if p.total_pages > 1 {
                        println!(
                            "page {} of {} ({} instances)",
                            p.page, p.total_pages, p.total_items
                        );
                    }
                }
            })
        }
        ModulesCommand::Info { instance_id } => {
            let answer =
                call(client.get_module_info(pb::GetModuleInfoRequest { instance_id })).await?;
            out.show(&answer, "GetModuleInfoResponse", |a| {
                print_modules(a.instance.as_slice());
                if let Some(d) = &a.deployment_config {
                    println!("deployment: active {} (blue {} {}%, green {} {}%)", d.active_version, d.blue_version, d.blue_weight, d.green_version, d.green_weight);
                }
                if let Some(s) = &a.stats {
                    println!(
                        "stats: {} requests ({} failed), {} active connections, p99 {:.1} ms, cpu {:.1}%, {:.1} MB",
                        s.total_requests, s.failed_requests, s.active_connections, s.p99_latency_ms, s.cpu_usage_percent, s.memory_usage_mb
                    );
                }
                print_routes(a.routes.iter().map(|r| (r, String::new())));
                table::print_pairs(&a.details);
            })
        }
        ModulesCommand::Register {
            id,
            kind: module_kind,
            address,
            version,
            data_address,
            max_connections,
        } => {
            let mut metadata = HashMap::new();
            if let Some(data) = data_address {
                metadata.insert("data_address".to_owned(), data);
            }
            let answer = call(client.register_module(pb::RegisterModuleRequest {
                instance: Some(pb::ModuleInstance {
                    instance_id: id,
                    module_type: module_kind.module_type() as i32,
                    address,
                    version,
                    max_connections,
                    metadata,
                    ..Default::default()
                }),
                ..Default::default()
            }))
            .await?;
            out.show(&answer, "RegisterModuleResponse", |a| {
                println!("{}\nregistration id: {}", a.message, a.registration_id)
            })
        }
        ModulesCommand::Heartbeat {
            instance_id,
            registration_id,
            status,
            active_connections,
        } => {
            let status = names::parse_health(&status)
                .with_context(|| format!("unknown status `{status}`"))?;
            let answer = call(client.heartbeat(pb::HeartbeatRequest {
                instance_id,
                registration_id,
                status: status as i32,
                current_stats: Some(pb::ModuleStats {
                    active_connections,
                    ..Default::default()
                }),
                timestamp: Some(marchproxy::time::now()),
            }))
            .await?;
            out.show(&answer, "HeartbeatResponse", |a| {
                println!("acknowledged: {} ({})", a.acknowledged, a.message);
                table::print_pairs(&a.instructions);
            })
        }
        ModulesCommand::Unregister {
            instance_id,
            registration_id,
            graceful,
            drain_timeout,
        } => {
            let answer = call(client.unregister_module(pb::UnregisterModuleRequest {
                instance_id,
                registration_id,
                graceful,
                drain_timeout_seconds: drain_timeout,
            }))
            .await?;
            out.show(&answer, "UnregisterModuleResponse", |a| {
                println!("{}", a.message)
            })
        }
        ModulesCommand::ReportMetrics {
            instance_id,
            points,
        } => {
            let metrics = points
                .iter()
                .map(|p| {
                    let (name, value) = p
                        .split_once('=')
                        .with_context(|| format!("`{p}` is not NAME=VALUE"))?;
                    let value: f64 = value
                        .parse()
                        .with_context(|| format!("`{value}` in `{p}` is not a number"))?;
                    Ok(pb::MetricDataPoint {
                        name: name.into(),
                        value,
                        ..Default::default()
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let answer = call(client.report_metrics(pb::ReportMetricsRequest {
                instance_id,
                metrics: Some(pb::ModuleMetrics {
                    metrics,
                    ..Default::default()
                }),
                reported_at: Some(marchproxy::time::now()),
            }))
            .await?;
            out.show(&answer, "ReportMetricsResponse", |a| {
                println!("{}", a.message)
            })
        }
        ModulesCommand::Metrics { instance_id, names } => {
            let answer = call(client.get_module_metrics(pb::GetModuleMetricsRequest {
                instance_id,
                metric_names: names,
                ..Default::default()
            }))
            .await?;
            out.show(&answer, "GetModuleMetricsResponse", |a| {
                print_points(a.metrics.iter().flat_map(|m| &m.metrics))
            })
        }
    }
}

fn print_routes<'a>(routes: impl Iterator<Item = (&'a pb::Route, String)>) {
    let rows = routes
        .map(|(r, target)| {
            vec![
                r.route_id.clone(),
                protocol(r.protocol),
                if r.source_pattern.is_empty() {
                    "*".into()
                } else {
                    r.source_pattern.clone()
                },
                if r.source_port == 0 {
                    "any".into()
                } else {
                    r.source_port.to_string()
                },
                r.destination_pattern.clone(),
                r.priority.to_string(),
                r.metadata.get("source").cloned().unwrap_or_default(),
                target,
            ]
        })
        .collect::<Vec<_>>();
    table::print(
        &[
            "ROUTE",
            "PROTOCOL",
            "SOURCE",
            "PORT",
            "DESTINATION",
            "PRIORITY",
            "FROM",
            "TARGET",
        ],
        &rows,
    );
}

fn print_points<'a>(points: impl Iterator<Item = &'a pb::MetricDataPoint>) {
    let rows = points
        .map(|p| {
            let labels = sorted(&p.labels)
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            vec![p.name.clone(), labels, format!("{}", p.value)]
        })
        .collect::<Vec<_>>();
    table::print(&["METRIC", "LABELS", "VALUE"], &rows);
}

async fn routes(
    client: &mut NlbClient,
    out: &Printer,
    command: RoutesCommand,
) -> anyhow::Result<()> {
    match command {
        RoutesCommand::List {
            protocol: wanted,
            destination,
        } => {
            let protocol_filter = match wanted {
                Some(text) => parse_protocol(&text)? as i32,
                None => 0,
            };
            let answer = call(client.get_routing_table(pb::GetRoutingTableRequest {
                protocol_filter,
                destination_filter: destination.unwrap_or_default(),
                query: None,
            }))
            .await?;
            out.show(&answer, "GetRoutingTableResponse", |a| {
                print_routes(
                    a.entries
                        .iter()
                        .filter_map(|e| Some((e.route.as_ref()?, e.target_instance_id.clone()))),
                );
            })
        }
        RoutesCommand::Add {
            route,
            validate_only,
        } => {
            let answer = call(client.update_routing(pb::UpdateRoutingRequest {
                routes: vec![route_of(route)?],
                replace_all: false,
                source_instance_id: String::new(),
                validate_only,
            }))
            .await?;
            show_routing(out, &answer)
        }
        RoutesCommand::Apply {
            file,
            replace_all,
            validate_only,
            instance,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let routes =
                json::routes_from_json(&text).with_context(|| format!("{}", file.display()))?;
            let answer = call(client.update_routing(pb::UpdateRoutingRequest {
                routes,
                replace_all,
                source_instance_id: instance.unwrap_or_default(),
                validate_only,
            }))
            .await?;
            show_routing(out, &answer)
        }
        RoutesCommand::Validate { route } => {
            let answer = call(client.validate_route(pb::ValidateRouteRequest {
                route: Some(route_of(route)?),
            }))
            .await?;
            out.show(&answer, "ValidateRouteResponse", |a| {
                println!(
                    "valid: {}  has handler: {}  capable: {}",
                    a.valid,
                    a.has_handler,
                    a.capable_instances.join(", ")
                );
                for error in &a.validation_errors {
                    println!("  error: {error}");
                }
                table::print_pairs(&a.details);
            })
        }
        RoutesCommand::Resolve {
            protocol: wanted,
            source,
            port,
            client_ip,
            dry_run,
        } => {
            let mut context = HashMap::new();
            if let Some(ip) = client_ip {
                context.insert("client_ip".to_owned(), ip);
            }
            let answer = call(client.route_request(pb::RouteRequestRequest {
                route: Some(pb::Route {
                    protocol: parse_protocol(&wanted)? as i32,
                    source_pattern: source,
                    source_port: port,
                    ..Default::default()
                }),
                context,
                dry_run,
            }))
            .await?;
            out.show(&answer, "RouteRequestResponse", |a| {
                if a.routed {
                    println!(
                        "-> {} ({}) at {}: {}",
                        a.target_instance_id,
                        kind(a.target_module_type),
                        a.target_address,
                        a.message
                    );
                } else {
                    println!("not routed: {}", a.message);
                }
            })?;
            if !answer.routed {
                bail!("no target: {}", answer.message);
            }
            Ok(())
        }
    }
}

fn show_routing(out: &Printer, answer: &pb::UpdateRoutingResponse) -> anyhow::Result<()> {
    out.show(answer, "UpdateRoutingResponse", |a| {
        println!("{}", a.message);
        for error in &a.validation_errors {
            println!("  error: {error}");
        }
    })?;
    if !answer.success {
        bail!("routes rejected");
    }
    Ok(())
}

async fn metrics(client: &mut NlbClient, out: &Printer, args: MetricsArgs) -> anyhow::Result<()> {
    if !args.watch {
        let answer = call(client.get_nlb_metrics(pb::GetNlbMetricsRequest {
            metric_names: args.names,
            aggregate: args.aggregate,
            ..Default::default()
        }))
        .await?;
        return out.show(&answer, "GetNLBMetricsResponse", |a| {
            print_points(a.metrics.iter());
            for (id, m) in sorted(&a.module_metrics) {
                println!("\n{id}:");
                print_points(m.metrics.iter());
            }
        });
    }
    let mut stream = call(client.stream_nlb_metrics(pb::StreamNlbMetricsRequest {
        interval_seconds: args.interval,
        metric_names: args.names,
        include_modules: args.modules,
    }))
    .await?;
    while let Some(message) = stream.next().await {
        let message = message.map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?;
        match out.output {
            Output::Json => println!(
                "{}",
                serde_json::to_string(&json::to_json(&message, "StreamNLBMetricsResponse")?)?
            ),
            Output::Table => {
                print_points(message.metrics.iter());
                for (id, m) in sorted(&message.module_metrics) {
                    println!("{id}:");
                    print_points(m.metrics.iter());
                }
                println!();
            }
        }
    }
    Ok(())
}

async fn config(
    client: &mut NlbClient,
    out: &Printer,
    command: ConfigCommand,
) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Get { section } => {
            let answer = call(client.get_nlb_config(pb::GetNlbConfigRequest {
                config_type: section.unwrap_or_default(),
            }))
            .await?;
            out.show(&answer, "GetNLBConfigResponse", |a| {
                for c in &a.configs {
                    println!(
                        "{}: {}",
                        c.config_type,
                        String::from_utf8_lossy(&c.config_data)
                    );
                }
            })
        }
        ConfigCommand::Set {
            section,
            data,
            file,
            validate_only,
        } => {
            let data = match (data, file) {
                (Some(data), _) => data.into_bytes(),
                (None, Some(file)) => std::fs::read(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?,
                (None, None) => bail!("give the new values with --data '{{...}}' or --file FILE"),
            };
            let answer = call(client.update_nlb_config(pb::UpdateNlbConfigRequest {
                config: Some(pb::ConfigUpdate {
                    config_type: section,
                    config_data: data,
                    ..Default::default()
                }),
                validate_only,
                restart_required: false,
            }))
            .await?;
            out.show(&answer, "UpdateNLBConfigResponse", |a| {
                println!("{}", a.message);
                for error in &a.validation_errors {
                    println!("  error: {error}");
                }
            })?;
            if !answer.success {
                bail!("config rejected");
            }
            Ok(())
        }
    }
}

async fn scale(client: &mut NlbClient, out: &Printer, args: ScaleArgs) -> anyhow::Result<()> {
    if args.kind.is_none() && args.instance.is_none() {
        bail!("name a module kind (marchctl scale alb --action scale-up) or --instance ID");
    }
    let answer = call(client.trigger_scaling(pb::TriggerScalingRequest {
        instance_id: args.instance.unwrap_or_default(),
        module_type: args.kind.map_or(0, |k| k.module_type() as i32),
        scaling_action: args.action,
        target_instances: args.target,
        config: Some(pb::ScalingConfig {
            min_instances: args.min,
            max_instances: args.max,
            target_cpu_percent: args.target_cpu,
            target_connections: args.target_connections,
            cooldown_seconds: args.cooldown,
            ..Default::default()
        }),
    }))
    .await?;
    out.show(&answer, "TriggerScalingResponse", |a| {
        println!("{}", a.message)
    })?;
    if !answer.success {
        bail!("scaling incomplete");
    }
    Ok(())
}

fn print_split(config: Option<&pb::BlueGreenConfig>, weights: &HashMap<String, i32>) {
    if let Some(c) = config {
        println!("active: {}", c.active_version);
    }
    let rows = sorted(weights)
        .into_iter()
        .map(|(v, w)| vec![v.clone(), format!("{w}%")])
        .collect::<Vec<_>>();
    table::print(&["VERSION", "WEIGHT"], &rows);
}

async fn bluegreen(
    gateway: &mut crate::ModuleClient,
    out: &Printer,
    command: BluegreenCommand,
) -> anyhow::Result<()> {
    match command {
        BluegreenCommand::Active { target } => {
            let answer = call(gateway.get_active_version(pb::GetActiveVersionRequest {
                instance_id: target,
            }))
            .await?;
            out.show(&answer, "GetActiveVersionResponse", |a| {
                print_split(a.config.as_ref(), &a.version_weights)
            })
        }
        BluegreenCommand::Weight {
            target,
            version,
            percent,
        } => {
            let answer = call(gateway.set_traffic_weight(pb::SetTrafficWeightRequest {
                instance_id: target,
                version,
                weight: percent,
            }))
            .await?;
            out.show(&answer, "SetTrafficWeightResponse", |a| {
                println!("{}", a.message)
            })
        }
        BluegreenCommand::Promote {
            target,
            version,
            immediate,
            rate,
        } => {
            let answer = call(gateway.promote_version(pb::PromoteVersionRequest {
                instance_id: target,
                version,
                immediate,
                promotion_rate: rate,
            }))
            .await?;
            out.show(&answer, "PromoteVersionResponse", |a| {
                println!("{}", a.message)
            })
        }
        BluegreenCommand::Rollback { target, to } => {
            let answer = call(gateway.rollback(pb::RollbackRequest {
                instance_id: target,
                target_version: to,
            }))
            .await?;
            out.show(&answer, "RollbackResponse", |a| {
                println!("{} (was {})", a.message, a.previous_version)
            })
        }
    }
}
