//! What every ALB test file uses: the ALB binary started on free ports with a config file.
#![allow(dead_code)] // Each test file uses its own part of this.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use marchproxy::pb;
use marchproxy_testkit::{
    external::{Process, free_port},
    http_get, metric_value,
};

pub const DEADLINE: Duration = Duration::from_secs(30);

/// A cache budget far above what a test stores: without one, the cache's limits are shares of
/// the filesystem, and the tests would depend on how full this machine's disk is.
pub const ROOMY_CACHE: &str = "1073741824";

/// The ALB binary on free ports: `http+proxy=` when it sits behind the NLB, plain `http=`
/// otherwise, and `https=` when certificates are given.
pub struct Alb {
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    _process: Process,
}

impl Alb {
    pub async fn start(
        dir: &Path,
        config: &str,
        args: &[&str],
        tls: Option<(&Path, &Path)>,
    ) -> Alb {
        let [http, https, grpc, admin] =
            [(); 4].map(|()| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let file = dir.join("alb.toml");
        std::fs::write(&file, config).unwrap();
        let log = dir.join("alb.log");
        let behind_nlb = args.contains(&"--nlb");
        let mut command = Command::new(env!("CARGO_BIN_EXE_marchproxy-alb"));
        command
            .arg("--config")
            .arg(&file)
            .arg("--listen")
            .arg(format!(
                "{}={http}",
                if behind_nlb { "http+proxy" } else { "http" }
            ))
            .arg("--grpc-listen")
            .arg(grpc.to_string())
            .arg("--admin-listen")
            .arg(admin.to_string())
            .arg("--instance-id")
            .arg("alb-test")
            .args(args)
            .env_remove("MARCHPROXY_NLB")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some((cert, key)) = tls {
            command
                .arg("--listen")
                .arg(format!("https={https}"))
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
        }
        let mut process = Process::spawn("marchproxy-alb", &mut command);
        process.wait_listening(http, DEADLINE, &log).await;
        process.wait_listening(admin, DEADLINE, &log).await;
        Alb {
            http,
            https: tls.map(|_| https),
            grpc,
            admin,
            _process: process,
        }
    }

    pub async fn metric(&self, name: &str, labels: &str) -> Option<f64> {
        let (_, page) = http_get(self.admin, "/metrics").await;
        metric_value(&page, name, labels)
    }

    pub async fn module_client(
        &self,
    ) -> pb::module_service_client::ModuleServiceClient<tonic::transport::Channel> {
        pb::module_service_client::ModuleServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }
}
