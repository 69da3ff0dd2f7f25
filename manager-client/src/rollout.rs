//! `marchctl rollout`: where a kind's gradual promotion stands (step, weights, each analysis,
//! recent events), optionally followed until it ends, and pause/resume.
//!
//! The status is the NLB's `rollout.<kind>` entry in GetNLBStatus details (JSON); pause and
//! resume set the kind's `paused` key in the `rollout` config section.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use marchproxy::{names::ModuleKind, pb};
use serde_json::{Value, json};

use crate::{
    NlbClient,
    cli::{Output, Printer, call},
    table,
};

#[derive(Subcommand, Debug)]
pub enum RolloutCommand {
    /// The rollout of a module kind: step, weights, analyses and events.
    Status {
        kind: ModuleKind,
        /// Print again every --interval until the rollout ends; exits 0 when the new version
        /// was promoted, 1 when it was rolled back or ended otherwise.
        #[arg(long)]
        watch: bool,
        /// Seconds between two prints with --watch.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
    },
    /// Hold the kind's rollouts where they stand: no analysis, no step.
    Pause { kind: ModuleKind },
    /// Let the kind's rollouts go on.
    Resume { kind: ModuleKind },
}

pub async fn run(
    client: &mut NlbClient,
    out: &Printer,
    command: RolloutCommand,
) -> anyhow::Result<()> {
    match command {
        RolloutCommand::Status {
            kind,
            watch,
            interval,
        } => {
            if !(0.1..=3600.0).contains(&interval) {
                bail!("--interval must be from 0.1 to 3600 seconds");
            }
            // The rollout being watched: its version and start.
            let mut watched: Option<(Value, u64)> = None;
            loop {
                let status = fetch(client, kind).await?;
                print(out, &status)?;
                if !watch {
                    return Ok(());
                }
                let rollout = &status["rollout"];
                if !rollout.is_null() {
                    watched = Some((
                        rollout["version"].clone(),
                        rollout["started_unix_ms"].as_u64().unwrap_or(0),
                    ));
                } else {
                    let Some((version, started)) = watched else {
                        bail!(
                            "{kind} has no rollout running; start one with marchctl bluegreen promote"
                        );
                    };
                    let end = &status["last_end"];
                    let ours = end["version"] == version
                        && end["at_unix_ms"].as_u64().unwrap_or(0) >= started;
                    let message = end["message"].as_str().unwrap_or("");
                    return match (ours, end["end"].as_str()) {
                        (true, Some("promoted")) => Ok(()),
                        (true, Some("rolled_back")) => {
                            bail!("the rollout of {kind} was rolled back: {message}")
                        }
                        (true, _) => bail!("the rollout of {kind} did not complete: {message}"),
                        (false, _) => bail!("the rollout of {kind} ended without a word on how"),
                    };
                }
                if out.output == Output::Table {
                    println!();
                }
                tokio::time::sleep(Duration::from_secs_f64(interval)).await;
            }
        }
        RolloutCommand::Pause { kind } => set_paused(client, kind, true).await,
        RolloutCommand::Resume { kind } => set_paused(client, kind, false).await,
    }
}

async fn fetch(client: &mut NlbClient, kind: ModuleKind) -> anyhow::Result<Value> {
    let answer = call(client.get_nlb_status(pb::GetNlbStatusRequest::default())).await?;
    match answer.details.get(&format!("rollout.{kind}")) {
        Some(text) => serde_json::from_str(text)
            .with_context(|| format!("the NLB's rollout.{kind} status is not JSON: {text}")),
        None => Ok(json!({"kind": kind.name(), "weights": {}, "rollout": null, "events": []})),
    }
}

async fn set_paused(client: &mut NlbClient, kind: ModuleKind, paused: bool) -> anyhow::Result<()> {
    let update = json!({"kinds": {kind.name(): {"paused": paused}}});
    let answer = call(client.update_nlb_config(pb::UpdateNlbConfigRequest {
        config: Some(pb::ConfigUpdate {
            config_type: "rollout".into(),
            config_data: update.to_string().into_bytes(),
            ..Default::default()
        }),
        validate_only: false,
        restart_required: false,
    }))
    .await?;
    if !answer.success {
        bail!(
            "{}: {}",
            answer.message,
            answer.validation_errors.join("; ")
        );
    }
    println!(
        "{kind} rollouts {}",
        if paused {
            "paused: no analysis and no step until resumed"
        } else {
            "resumed"
        }
    );
    Ok(())
}

/// `HH:MM:SS` (UTC) of a Unix time in milliseconds.
fn clock(unix_ms: u64) -> String {
    let seconds = unix_ms / 1000 % 86_400;
    format!(
        "{:02}:{:02}:{:02}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

fn print(out: &Printer, status: &Value) -> anyhow::Result<()> {
    if out.output == Output::Json {
        println!("{}", serde_json::to_string(status)?);
        return Ok(());
    }
    let weights: Vec<String> = status["weights"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(version, weight)| format!("{version} {weight}%"))
        .collect();
    println!(
        "{}: {}",
        status["kind"].as_str().unwrap_or("?"),
        weights.join(", ")
    );
    let rollout = &status["rollout"];
    if rollout.is_null() {
        println!("no rollout running");
    } else {
        println!(
            "rollout: {} -> {}, step {} at {}% (+{}% per step), {}{}",
            rollout["stable_version"].as_str().unwrap_or("?"),
            rollout["version"].as_str().unwrap_or("?"),
            rollout["step"],
            rollout["weight"],
            rollout["step_percent"],
            rollout["phase"].as_str().unwrap_or("?").replace('_', " "),
            if rollout["affinity"] == true {
                ", clients keep their version"
            } else {
                ""
            }
        );
        println!(
            "failed analyses: {} of {} tolerated; next analysis in {:.1} s",
            rollout["failed_checks"],
            rollout["failed_checks_tolerated"],
            rollout["next_check_in_ms"].as_f64().unwrap_or(0.0) / 1000.0
        );
        let analysis = &rollout["last_analysis"];
        if !analysis.is_null() {
            let ratio = analysis["success_ratio"]
                .as_f64()
                .map_or("-".to_owned(), |r| format!("{r:.3}"));
            let latency = |key: &str| {
                analysis[key]
                    .as_f64()
                    .map_or("-".to_owned(), |ms| format!("{ms:.1} ms"))
            };
            println!(
                "last analysis at {}: {}{} (requests {}, failed {}, connections {}, connect failures {}, success ratio {ratio}, p99 {} vs stable {})",
                clock(analysis["at_unix_ms"].as_u64().unwrap_or(0)),
                analysis["result"].as_str().unwrap_or("?"),
                analysis["reason"]
                    .as_str()
                    .map_or(String::new(), |r| format!(": {r}")),
                analysis["requests"],
                analysis["failed_requests"],
                analysis["connections"],
                analysis["connect_failures"],
                latency("p99_latency_ms"),
                latency("stable_p99_latency_ms"),
            );
        }
    }
    let events: Vec<&Value> = status["events"].as_array().into_iter().flatten().collect();
    if !events.is_empty() {
        println!("recent events:");
        let rows: Vec<Vec<String>> = events
            .iter()
            .rev()
            .take(10)
            .rev()
            .map(|e| {
                vec![
                    clock(e["at_unix_ms"].as_u64().unwrap_or(0)),
                    e["version"].as_str().unwrap_or("?").to_owned(),
                    e["step"].to_string(),
                    e["message"].as_str().unwrap_or("").to_owned(),
                ]
            })
            .collect();
        table::print(&["TIME", "VERSION", "STEP", "EVENT"], &rows);
    }
    Ok(())
}
