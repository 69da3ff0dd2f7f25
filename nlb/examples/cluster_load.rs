//! Control-plane load for `bench/cluster.sh`: registers many simulated modules (spread over the
//! NLB endpoints given), heartbeats all of them for a while, then measures how long a blue/green
//! weight written on the first endpoint takes to be in effect on the last (from sending the
//! write; the write's own round trip is reported beside). Prints one line of JSON.
//!
//! `cargo run --release -p marchproxy-nlb --features etcd --example cluster_load -- --nlb
//! http://127.0.0.1:50050,http://127.0.0.1:50060 --modules 1000`

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use marchproxy::pb;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// NLB gRPC URLs; modules are spread over them, weights are written on the first and read
    /// on the last.
    #[arg(long, value_delimiter = ',', required = true)]
    nlb: Vec<String>,
    #[arg(long, default_value_t = 1000)]
    modules: usize,
    /// How long every module heartbeats, in seconds.
    #[arg(long, default_value_t = 10)]
    heartbeat_seconds: u64,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Weight changes timed from write to effect.
    #[arg(long, default_value_t = 200)]
    samples: usize,
}

type Nlb = pb::nlb_service_client::NlbServiceClient<Channel>;
type Modules = pb::module_service_client::ModuleServiceClient<Channel>;

fn module(id: &str, kind: pb::ModuleType, version: &str) -> pb::RegisterModuleRequest {
    pb::RegisterModuleRequest {
        instance: Some(pb::ModuleInstance {
            instance_id: id.to_owned(),
            module_type: kind as i32,
            address: "127.0.0.1:9".to_owned(),
            version: version.to_owned(),
            metadata: [("data_address".to_owned(), "127.0.0.1:9".to_owned())].into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Runs `work(i)` for every i below `count`, `concurrency` at a time.
async fn spread<F, Fut>(count: usize, concurrency: usize, work: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let work = Arc::new(work);
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (work, next) = (Arc::clone(&work), Arc::clone(&next));
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= count {
                        return Ok::<(), anyhow::Error>(());
                    }
                    work(i).await?;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut channels = Vec::new();
    for url in &args.nlb {
        channels.push(
            Channel::from_shared(url.clone())?
                .connect()
                .await
                .with_context(|| format!("cannot reach {url}"))?,
        );
    }
    let channels = Arc::new(channels);

    // Registrations, spread over the endpoints.
    let registrations = Arc::new(std::sync::Mutex::new(vec![String::new(); args.modules]));
    let started = Instant::now();
    {
        let (channels, registrations) = (Arc::clone(&channels), Arc::clone(&registrations));
        spread(args.modules, args.concurrency, move |i| {
            let mut nlb = Nlb::new(channels[i % channels.len()].clone());
            let registrations = Arc::clone(&registrations);
            async move {
                // As modules do: a registration that lost a race is sent again.
                let mut attempts = 0;
                let answer = loop {
                    attempts += 1;
                    match nlb
                        .register_module(module(&format!("sim-{i}"), pb::ModuleType::Alb, "v1"))
                        .await
                    {
                        Err(status) if status.code() == tonic::Code::Aborted && attempts < 5 => {}
                        answer => break answer?.into_inner(),
                    }
                };
                registrations.lock().expect("not poisoned")[i] = answer.registration_id;
                Ok(())
            }
        })
        .await?;
    }
    let registrations_per_second = args.modules as f64 / started.elapsed().as_secs_f64();

    // Heartbeats from every module, round after round, for the set time.
    let beats = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs(args.heartbeat_seconds);
    while Instant::now() < until {
        let (channels, registrations, beats) = (
            Arc::clone(&channels),
            Arc::clone(&registrations),
            Arc::clone(&beats),
        );
        spread(args.modules, args.concurrency, move |i| {
            let mut nlb = Nlb::new(channels[i % channels.len()].clone());
            let registration = registrations.lock().expect("not poisoned")[i].clone();
            let beats = Arc::clone(&beats);
            async move {
                let answer = nlb
                    .heartbeat(pb::HeartbeatRequest {
                        instance_id: format!("sim-{i}"),
                        registration_id: registration,
                        status: pb::HealthStatus::Healthy as i32,
                        current_stats: Some(pb::ModuleStats::default()),
                        timestamp: None,
                    })
                    .await?
                    .into_inner();
                if !answer.acknowledged {
                    bail!("heartbeat of sim-{i} not acknowledged: {}", answer.message);
                }
                beats.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        })
        .await?;
    }
    let heartbeats_per_second =
        beats.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();

    // Propagation: a weight written on the first endpoint, polled on the last.
    let (first, last) = (channels[0].clone(), channels[channels.len() - 1].clone());
    let mut writer = Nlb::new(first.clone());
    for version in ["v1", "v2"] {
        writer
            .register_module(module(
                &format!("probe-{version}"),
                pb::ModuleType::Ailb,
                version,
            ))
            .await?;
    }
    let (mut setter, mut reader) = (Modules::new(first), Modules::new(last));
    let weight_on_last = |reader: &mut Modules| {
        let mut reader = reader.clone();
        async move {
            Ok::<i32, anyhow::Error>(
                reader
                    .get_active_version(pb::GetActiveVersionRequest {
                        instance_id: "ailb".into(),
                    })
                    .await?
                    .into_inner()
                    .version_weights
                    .get("v2")
                    .copied()
                    .unwrap_or(-1),
            )
        }
    };
    let (mut delays, mut writes) = (Vec::new(), Vec::new());
    for sample in 0..args.samples {
        let weight = 10 + (sample % 2) as i32 * 10;
        let started = Instant::now();
        setter
            .set_traffic_weight(pb::SetTrafficWeightRequest {
                instance_id: "ailb".into(),
                version: "v2".into(),
                weight,
            })
            .await?;
        writes.push(started.elapsed().as_secs_f64() * 1000.0);
        loop {
            if weight_on_last(&mut reader).await? == weight {
                break;
            }
            if started.elapsed() > Duration::from_secs(5) {
                bail!("weight {weight} not in effect on the last endpoint within 5 s");
            }
        }
        delays.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    delays.sort_by(f64::total_cmp);
    writes.sort_by(f64::total_cmp);
    let ms = |sorted: &[f64], p: f64| (percentile(sorted, p) * 100.0).round() / 100.0;
    println!(
        "{}",
        serde_json::json!({
            "endpoints": args.nlb.len(),
            "modules": args.modules,
            "registrations_per_second": registrations_per_second.round(),
            "heartbeats_per_second": heartbeats_per_second.round(),
            "write_ms_p50": ms(&writes, 0.5),
            "write_ms_p99": ms(&writes, 0.99),
            "propagation_ms_p50": ms(&delays, 0.5),
            "propagation_ms_p99": ms(&delays, 0.99),
        })
    );
    Ok(())
}
