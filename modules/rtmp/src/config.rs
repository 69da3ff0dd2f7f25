//! The RTMP module's flags and its `[module]` settings (also `UpdateConfig` `module`, merged key
//! by key): who may publish, how far a player may fall behind, where streams are re-sent.

use clap::Parser;
use marchproxy_runtime::CommonArgs;
use serde::{Deserialize, Serialize};

#[derive(Debug, Parser)]
#[command(
    name = "marchproxy-rtmp",
    about = "MarchProxy's RTMP module: publishers push rtmp://host/app/key, any number of players pull it; GOP cache, publish authorisation, re-streaming",
    disable_version_flag = true
)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Stream keys allowed to publish; empty for any key (then `on_publish`, if set, decides).
    pub allowed_keys: Vec<String>,
    /// Asked before each publish, like nginx-rtmp's `on_publish`: a form POST with `call`,
    /// `app`, `name`, `addr`; a 2xx answer allows it.
    pub on_publish: Option<String>,
    /// Messages queued per player before it skips ahead to the next keyframe.
    pub player_queue: usize,
    /// Streams pushed on to other RTMP servers while they are published.
    pub restream: Vec<Restream>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            allowed_keys: Vec::new(),
            on_publish: None,
            player_queue: 1024,
            restream: Vec::new(),
        }
    }
}

/// A re-streaming destination.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restream {
    /// The application whose streams go there (`*` for any).
    #[serde(default = "any")]
    pub app: String,
    /// The stream key that goes there (`*` for any).
    #[serde(default = "any")]
    pub key: String,
    /// `rtmp://host[:port]/app/key`; `{app}` and `{key}` are replaced by the stream's.
    pub url: String,
}

fn any() -> String {
    "*".into()
}

/// Where a re-streaming destination points, parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct Destination {
    pub address: String,
    pub app: String,
    pub key: String,
}

impl Restream {
    pub fn matches(&self, app: &str, key: &str) -> bool {
        (self.app == "*" || self.app == app) && (self.key == "*" || self.key == key)
    }

    /// The destination for the stream `app/key`.
    pub fn destination(&self, app: &str, key: &str) -> Result<Destination, String> {
        let url = self.url.replace("{app}", app).replace("{key}", key);
        let rest = url
            .strip_prefix("rtmp://")
            .ok_or_else(|| format!("restream url `{}` must start with rtmp://", self.url))?;
        let (host, path) = rest
            .split_once('/')
            .ok_or_else(|| format!("restream url `{}` must name /app/key", self.url))?;
        let (dest_app, dest_key) = path
            .rsplit_once('/')
            .filter(|(a, k)| !a.is_empty() && !k.is_empty())
            .ok_or_else(|| format!("restream url `{}` must name /app/key", self.url))?;
        let address = if host.contains(':') {
            host.to_owned()
        } else {
            format!("{host}:1935")
        };
        Ok(Destination {
            address,
            app: dest_app.to_owned(),
            key: dest_key.to_owned(),
        })
    }
}

impl Settings {
    /// `self` with `update`'s keys, checked.
    pub fn merged(&self, update: &serde_json::Value) -> Result<Settings, Vec<String>> {
        let settings: Settings = marchproxy_runtime::config::merge_section("module", self, update)?;
        let mut problems = Vec::new();
        if !(16..=1_000_000).contains(&settings.player_queue) {
            problems.push("module.player_queue must be from 16 to 1000000".to_owned());
        }
        if let Some(url) = &settings.on_publish {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                problems.push(format!(
                    "module.on_publish `{url}` must be an http:// or https:// URL"
                ));
            }
        }
        for (index, restream) in settings.restream.iter().enumerate() {
            if let Err(problem) = restream.destination("app", "key") {
                problems.push(format!("module.restream[{index}]: {problem}"));
            }
        }
        if problems.is_empty() {
            Ok(settings)
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restream_urls() {
        let restream = Restream {
            app: "*".into(),
            key: "*".into(),
            url: "rtmp://backup.example/{app}/{key}".into(),
        };
        assert_eq!(
            restream.destination("live", "cam1").unwrap(),
            Destination {
                address: "backup.example:1935".into(),
                app: "live".into(),
                key: "cam1".into()
            }
        );
        let bad = Settings::default().merged(&serde_json::json!({
            "restream": [{"url": "http://x/a/b"}], "player_queue": 1, "on_publish": "ftp://x"
        }));
        assert_eq!(bad.unwrap_err().len(), 3);
    }
}
