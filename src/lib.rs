//! MarchProxy's control-plane API and the few helpers every component shares.
//!
//! - [`pb`]: the generated code of package `marchproxy` (NLBService, ModuleService and their
//!   messages), wire-compatible with MarchProxy's interface.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz` for every server.
//! - [`auth`]: the cluster API key, checked by servers and attached by clients.
//! - `http_client` (feature `http-client`): the outbound HTTP/HTTPS client.
//! - [`proxy_protocol`]: the PROXY v2 header the NLB writes and modules read.
//! - [`query`]: the `Query` message (filters, sort, pagination) applied to any listing.
//! - [`status`]: errors that travel both as a gRPC status and as the response body.
//! - [`telemetry`], [`time`]: logging set-up, timestamps and durations.

pub mod admin;
pub mod auth;
pub mod checksum;
pub mod config_file;
#[cfg(feature = "http-client")]
pub mod http_client;
pub mod limiter;
pub mod listen;
pub mod mqtt_topic;
pub mod names;
pub mod proxy_protocol;
pub mod query;
pub mod route;
pub mod serve;
pub mod signal;
pub mod stats;
pub mod status;
pub mod telemetry;
pub mod time;

pub mod pb {
    //! Generated from `proto/marchproxy/{types,module,nlb}.proto`.
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("marchproxy");

    /// The encoded `FileDescriptorSet` of the three proto files (and their imports), for gRPC
    /// reflection and for rendering messages as canonical protobuf JSON.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/marchproxy_descriptor.bin"));

    /// The gRPC service names, as health checks and reflection know them.
    pub const NLB_SERVICE_NAME: &str = "marchproxy.NLBService";
    pub const MODULE_SERVICE_NAME: &str = "marchproxy.ModuleService";
}
