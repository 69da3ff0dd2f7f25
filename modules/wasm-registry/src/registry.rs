//! Pulls a WebAssembly module from an OCI registry (the distribution API): the manifest for a
//! tag or digest (an image index picks the `wasi/wasm` platform, else its first entry), then the
//! wasm layer (a wasm media type, else the largest layer), whose sha256 is checked.
//!
//! Plain HTTP for the registries listed as insecure, HTTPS otherwise. Auth follows the
//! registry's challenge: the anonymous token flow by default; with credentials (only ever sent
//! to the configured registry host) basic auth or a token exchange, or a static bearer token.
//! 408, 429, 5xx and network errors are retried with backoff (5 attempts, 200 ms to 3 s).

use std::{collections::HashMap, sync::Mutex, time::Duration};

use base64::Engine;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode, body::Bytes, header};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use crate::reference::Reference;

const ATTEMPTS: u32 = 5;
/// Longest wait for a response's headers, and for a whole body (a stalled blob must not hold
/// its fetch slot for ever).
const HEADERS_WITHIN: Duration = Duration::from_secs(30);
const BODY_WITHIN: Duration = Duration::from_secs(600);
const MANIFEST_LIMIT: usize = 4 * 1024 * 1024;
const WASM_TYPES: [&str; 3] = [
    "application/wasm",
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/vnd.module.wasm.content.layer.v1+wasm",
];
const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0} not found in the registry")]
    NotFound(String),
    #[error("the registry refused access to {0}: {1}")]
    Denied(String, String),
    #[error("registry unreachable: {0}")]
    Unreachable(String),
    #[error("registry answered {0}")]
    Status(u16),
    #[error("bad manifest: {0}")]
    BadManifest(String),
    #[error("the module is larger than the {0}-byte limit")]
    TooLarge(usize),
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
}

/// Credentials and where they may go.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// The registry host the credentials belong to; never sent elsewhere.
    pub host: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
}

pub struct Registry {
    client: marchproxy_runtime::http::Client,
    insecure: Vec<String>,
    credentials: Option<Credentials>,
    max_module: usize,
    /// Bearer tokens by registry and scope, from the token flow.
    tokens: Mutex<HashMap<(String, String), String>>,
}

/// A pulled module.
#[derive(Clone, Debug)]
pub struct Module {
    /// `sha256:...` of the bytes.
    pub digest: String,
    pub bytes: Bytes,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut hex = String::with_capacity(71);
    hex.push_str("sha256:");
    for byte in hash {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// `host[:port]` of an absolute URL.
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split(['/', '?', '#']).next().unwrap_or(rest)
}

/// `location` made absolute against `base` (registries answer with relative redirects too).
fn absolute(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_owned();
    }
    let (scheme, rest) = base.split_once("://").unwrap_or(("https", base));
    let host = rest.split('/').next().unwrap_or(rest);
    if location.starts_with('/') {
        format!("{scheme}://{host}{location}")
    } else {
        format!("{scheme}://{host}/{location}")
    }
}

/// The parameters of a `WWW-Authenticate` challenge (`Bearer realm="...",service="..."`).
fn challenge(value: &str) -> (String, HashMap<String, String>) {
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.split_once('"') {
                Some((value, next)) => (value, next),
                None => (quoted, ""),
            }
        } else {
            after.split_once(',').unwrap_or((after, ""))
        };
        params.insert(key, value.to_owned());
        rest = next.trim_start_matches(',').trim();
    }
    (scheme.to_ascii_lowercase(), params)
}

impl Registry {
    pub fn new(
        insecure: Vec<String>,
        credentials: Option<Credentials>,
        max_module: usize,
    ) -> Result<Self, std::io::Error> {
        Ok(Registry {
            client: marchproxy_runtime::http::client()?,
            insecure,
            credentials,
            max_module,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    fn scheme(&self, registry: &str) -> &'static str {
        let host = registry.split(':').next().unwrap_or(registry);
        if self.insecure.iter().any(|i| i == registry || i == host) {
            "http"
        } else {
            "https"
        }
    }

    /// Credentials for `registry`, if it is the one they belong to.
    fn credentials_for(&self, registry: &str) -> Option<&Credentials> {
        self.credentials.as_ref().filter(|c| {
            c.host
                .as_deref()
                .is_some_and(|host| host == registry || registry.split(':').next() == Some(host))
        })
    }

    fn basic(credentials: &Credentials) -> Option<String> {
        let user = credentials.username.as_deref()?;
        let password = credentials.password.as_deref().unwrap_or_default();
        Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        ))
    }

    /// Pulls the module `reference` names.
    pub async fn fetch(&self, reference: &Reference) -> Result<Module, FetchError> {
        let mut version = reference.version.as_str().to_owned();
        let mut accept = MANIFEST_TYPES.to_owned();
        // An index leads to a manifest: at most one hop.
        for _ in 0..2 {
            let url = format!(
                "{}://{}/v2/{}/manifests/{version}",
                self.scheme(&reference.registry),
                reference.registry,
                reference.repository
            );
            let body = self.get(reference, &url, &accept, MANIFEST_LIMIT).await?;
            // Whatever is asked for by digest (the reference's, or an index entry's) must match.
            if version.starts_with("sha256:") {
                let actual = digest_of(&body);
                if actual != version {
                    return Err(FetchError::DigestMismatch {
                        expected: version,
                        actual,
                    });
                }
            }
            let manifest: Manifest = serde_json::from_slice(&body)
                .map_err(|e| FetchError::BadManifest(e.to_string()))?;
            if !manifest.manifests.is_empty() {
                let chosen = manifest
                    .manifests
                    .iter()
                    .find(|m| {
                        m.platform
                            .as_ref()
                            .is_some_and(|p| p.os == "wasi" || p.architecture == "wasm")
                    })
                    .or_else(|| manifest.manifests.first())
                    .ok_or_else(|| FetchError::BadManifest("an empty image index".into()))?;
                version = chosen.digest.clone();
                accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json".into();
                continue;
            }
            debug!(reference = %reference, media_type = %manifest.media_type, layers = manifest.layers.len(), "manifest");
            let layer = manifest
                .layers
                .iter()
                .find(|l| WASM_TYPES.contains(&l.media_type.as_str()))
                .or_else(|| manifest.layers.iter().max_by_key(|l| l.size))
                .ok_or_else(|| FetchError::BadManifest("no layers".into()))?;
            if layer.size as usize > self.max_module {
                return Err(FetchError::TooLarge(self.max_module));
            }
            let url = format!(
                "{}://{}/v2/{}/blobs/{}",
                self.scheme(&reference.registry),
                reference.registry,
                reference.repository,
                layer.digest
            );
            let bytes = self
                .get(reference, &url, "application/octet-stream", self.max_module)
                .await?;
            let actual = digest_of(&bytes);
            if actual != layer.digest {
                return Err(FetchError::DigestMismatch {
                    expected: layer.digest.clone(),
                    actual,
                });
            }
            return Ok(Module {
                digest: actual,
                bytes,
            });
        }
        Err(FetchError::BadManifest(
            "an image index inside an image index".into(),
        ))
    }

    /// GET with auth, redirects (one) and retries; the body up to `limit` bytes.
    async fn get(
        &self,
        reference: &Reference,
        url: &str,
        accept: &str,
        limit: usize,
    ) -> Result<Bytes, FetchError> {
        let scope = format!("repository:{}:pull", reference.repository);
        let key = (reference.registry.clone(), scope.clone());
        let mut backoff = Duration::from_millis(200);
        let mut challenged: Option<String> = None;
        let mut url = url.to_owned();
        let mut attempt = 0;
        loop {
            attempt += 1;
            // Credentials and tokens go to the registry only, never to where it redirects.
            let to_registry = host_of(&url) == reference.registry;
            let authorization = if to_registry {
                challenged
                    .clone()
                    .or_else(|| {
                        self.tokens
                            .lock()
                            .ok()
                            .and_then(|t| t.get(&key).cloned())
                            .map(|token| format!("Bearer {token}"))
                    })
                    .or_else(|| self.static_authorization(&reference.registry))
            } else {
                None
            };
            let outcome = self
                .once(&url, accept, authorization.as_deref(), limit)
                .await;
            let retry = match outcome {
                Ok(Answer::Body(bytes)) => return Ok(bytes),
                Ok(Answer::Redirect(location)) if attempt < ATTEMPTS => {
                    url = absolute(&url, &location);
                    continue;
                }
                Ok(Answer::Redirect(_)) => return Err(FetchError::Status(307)),
                Ok(Answer::Challenge(value)) if attempt < ATTEMPTS && to_registry => {
                    match self.answer(reference, &value, &scope).await {
                        Ok(answer) => {
                            challenged = Some(answer);
                            continue;
                        }
                        Err(error @ FetchError::Unreachable(_)) => error,
                        Err(error) => return Err(error),
                    }
                }
                Ok(Answer::Challenge(value)) => {
                    return Err(FetchError::Denied(reference.to_string(), value));
                }
                Ok(Answer::Status(StatusCode::NOT_FOUND)) => {
                    return Err(FetchError::NotFound(reference.to_string()));
                }
                Ok(Answer::Status(status))
                    if status == StatusCode::REQUEST_TIMEOUT
                        || status == StatusCode::TOO_MANY_REQUESTS
                        || status.is_server_error() =>
                {
                    FetchError::Status(status.as_u16())
                }
                Ok(Answer::Status(status)) if status == StatusCode::FORBIDDEN => {
                    return Err(FetchError::Denied(
                        reference.to_string(),
                        "403 Forbidden".into(),
                    ));
                }
                Ok(Answer::Status(status)) => return Err(FetchError::Status(status.as_u16())),
                Err(error @ FetchError::TooLarge(_)) => return Err(error),
                Err(error) => error,
            };
            if attempt >= ATTEMPTS {
                return Err(retry);
            }
            warn!(%url, error = %retry, attempt, retry_in_ms = backoff.as_millis() as u64, "registry request failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(3));
        }
    }

    fn static_authorization(&self, registry: &str) -> Option<String> {
        let credentials = self.credentials_for(registry)?;
        credentials
            .token
            .as_ref()
            .map(|token| format!("Bearer {token}"))
    }

    /// Answers a 401 challenge: basic credentials, or a token from the realm.
    async fn answer(
        &self,
        reference: &Reference,
        value: &str,
        scope: &str,
    ) -> Result<String, FetchError> {
        let (scheme, params) = challenge(value);
        let credentials = self.credentials_for(&reference.registry);
        let denied = |why: &str| FetchError::Denied(reference.to_string(), why.to_owned());
        if scheme == "basic" {
            return credentials
                .and_then(Self::basic)
                .ok_or_else(|| denied("the registry wants a user name and password; set PROXY_AUTHENTICATE=true with PROXY_REGISTRY_URL, PROXY_REGISTRY_USERNAME and PROXY_REGISTRY_PASSWORD"));
        }
        let realm = params
            .get("realm")
            .ok_or_else(|| denied("a bearer challenge without a realm"))?;
        let separator = if realm.contains('?') { '&' } else { '?' };
        let mut token_url = format!(
            "{realm}{separator}scope={}",
            marchproxy_runtime::http::percent_encode(scope)
        );
        if let Some(service) = params.get("service") {
            token_url.push_str(&format!(
                "&service={}",
                marchproxy_runtime::http::percent_encode(service)
            ));
        }
        // Credentials go to a token service over HTTPS, or to the registry's own host.
        let basic = credentials
            .filter(|_| realm.starts_with("https://") || host_of(realm) == reference.registry)
            .and_then(Self::basic);
        let body = match self
            .once(&token_url, "application/json", basic.as_deref(), 64 * 1024)
            .await
        {
            Ok(Answer::Body(body)) => body,
            Ok(Answer::Status(status))
                if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS =>
            {
                return Err(FetchError::Unreachable(format!(
                    "the token service answered {status}"
                )));
            }
            Ok(Answer::Status(status)) => {
                return Err(denied(&format!("the token service answered {status}")));
            }
            Ok(_) => return Err(denied("the token service wants credentials")),
            Err(error) => return Err(error),
        };
        #[derive(Deserialize)]
        struct TokenAnswer {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
        }
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|e| denied(&format!("the token service answered no JSON: {e}")))?;
        let token = answer
            .token
            .or(answer.access_token)
            .ok_or_else(|| denied("the token service answered no token"))?;
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(
                (reference.registry.clone(), scope.to_owned()),
                token.clone(),
            );
        }
        Ok(format!("Bearer {token}"))
    }

    async fn once(
        &self,
        url: &str,
        accept: &str,
        authorization: Option<&str>,
        limit: usize,
    ) -> Result<Answer, FetchError> {
        let mut request = Request::get(url).header(header::ACCEPT, accept);
        if let Some(authorization) = authorization {
            request = request.header(header::AUTHORIZATION, authorization);
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| FetchError::Unreachable(format!("bad request to {url}: {e}")))?;
        let response = tokio::time::timeout(HEADERS_WITHIN, self.client.request(request))
            .await
            .map_err(|_| FetchError::Unreachable(format!("{url}: no answer within 30 s")))?
            .map_err(|e| FetchError::Unreachable(format!("{url}: {e}")))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED {
            let value = response
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("Basic")
                .to_owned();
            return Ok(Answer::Challenge(value));
        }
        if status.is_redirection()
            && let Some(location) = response
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
        {
            return Ok(Answer::Redirect(location.to_owned()));
        }
        if !status.is_success() {
            return Ok(Answer::Status(status));
        }
        let collected = Limited::new(response.into_body(), limit).collect();
        let body = tokio::time::timeout(BODY_WITHIN, collected)
            .await
            .map_err(|_| {
                FetchError::Unreachable(format!(
                    "{url}: body not received within {} s",
                    BODY_WITHIN.as_secs()
                ))
            })?
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    FetchError::TooLarge(limit)
                } else {
                    FetchError::Unreachable(format!("{url}: body cut: {e}"))
                }
            })?
            .to_bytes();
        Ok(Answer::Body(body))
    }
}

enum Answer {
    Body(Bytes),
    Challenge(String),
    Redirect(String),
    Status(StatusCode),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let (scheme, params) = challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/x:pull""#,
        );
        assert_eq!(scheme, "bearer");
        assert_eq!(params["realm"], "https://auth.docker.io/token");
        assert_eq!(params["service"], "registry.docker.io");
        assert_eq!(params["scope"], "repository:library/x:pull");
        assert_eq!(challenge(r#"Basic realm="Registry Realm""#).0, "basic");
        assert!(challenge("garbage").1.is_empty());
    }

    #[test]
    fn urls() {
        assert_eq!(host_of("https://reg.example:5000/v2/x"), "reg.example:5000");
        assert_eq!(
            absolute(
                "https://reg.example/v2/x/blobs/sha256:1",
                "/storage/abc?sig=1"
            ),
            "https://reg.example/storage/abc?sig=1"
        );
        assert_eq!(
            absolute("http://a/b", "https://s3.example/x"),
            "https://s3.example/x"
        );
        assert_eq!(
            marchproxy_runtime::http::percent_encode("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }

    #[test]
    fn digests() {
        assert_eq!(
            digest_of(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
