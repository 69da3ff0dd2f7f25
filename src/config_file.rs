//! What every server's configuration shares: reading its TOML file, and the cluster key from
//! the flag, the file or the environment.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// The config file could not be used; names the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// Reads and parses a TOML config file (unknown keys are the parser's to refuse).
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| FileError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// The cluster key: the flag (or `MARCHPROXY_API_KEY`), else the file's, else
/// `MARCHPROXY_CLUSTER_API_KEY`; empty means none. Refused when it cannot travel in a header.
pub fn api_key(
    flag: Option<String>,
    file: Option<String>,
) -> Result<Option<String>, crate::auth::InvalidApiKey> {
    let key = flag
        .or(file)
        .or_else(|| std::env::var("MARCHPROXY_CLUSTER_API_KEY").ok())
        .filter(|k| !k.is_empty());
    if let Some(key) = &key {
        crate::auth::AttachApiKey::new(Some(key))?;
    }
    Ok(key)
}

/// The JSON object a `ConfigUpdate` carries, after its `checksum` (when given: SHA-256 of
/// `config_data` in hex) is checked; every problem found otherwise.
pub fn update_data(config: &crate::pb::ConfigUpdate) -> Result<serde_json::Value, Vec<String>> {
    let mut errors = Vec::new();
    if !config.checksum.is_empty()
        && !config
            .checksum
            .eq_ignore_ascii_case(&crate::checksum::sha256_hex(&config.config_data))
    {
        errors.push(
            "checksum does not match config_data (expected the SHA-256 of config_data in hex)"
                .to_owned(),
        );
    }
    match serde_json::from_slice(&config.config_data) {
        Ok(data) if errors.is_empty() => Ok(data),
        Ok(_) => Err(errors),
        Err(error) => {
            errors.push(format!("config_data is not JSON: {error}"));
            Err(errors)
        }
    }
}
