//! Image references as proplets write them (`docker.io/org/add.wasm`,
//! `localhost:5000/demo/addition.wasm:v2`, `ghcr.io/org/app@sha256:...`), resolved the way
//! container tools do: no registry means Docker Hub, whose API host is `registry-1.docker.io`
//! and whose one-part repositories live under `library/`; no tag means `latest`.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// The registry host (and port) the API is called on.
    pub registry: String,
    pub repository: String,
    /// A tag, or a digest (`sha256:...`).
    pub version: Version,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    Tag(String),
    Digest(String),
}

impl Version {
    pub fn as_str(&self) -> &str {
        match self {
            Version::Tag(tag) => tag,
            Version::Digest(digest) => digest,
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.version {
            Version::Tag(tag) => write!(f, "{}/{}:{tag}", self.registry, self.repository),
            Version::Digest(digest) => write!(f, "{}/{}@{digest}", self.registry, self.repository),
        }
    }
}

fn valid_component(part: &str) -> bool {
    !part.is_empty()
        && part
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

impl std::str::FromStr for Reference {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bad = |why: &str| Err(format!("`{text}` is not an image reference: {why}"));
        if text.is_empty() || text.len() > 512 {
            return bad("empty or too long");
        }
        let (name, digest) = match text.split_once('@') {
            Some((name, digest)) => (name, Some(digest)),
            None => (text, None),
        };
        let (first, rest) = name.split_once('/').unwrap_or(("", name));
        let explicit_registry = !first.is_empty()
            && (first.contains('.') || first.contains(':') || first == "localhost");
        let (registry, path) = if explicit_registry {
            let (host, port) = first.split_once(':').unwrap_or((first, "0"));
            let host_ok = !host.is_empty()
                && !host.starts_with(['.', '-'])
                && !host.contains("..")
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-".contains(&b));
            if !host_ok || port.parse::<u16>().is_err() {
                return bad("the registry is a host name or address with an optional port");
            }
            (first.to_owned(), rest)
        } else {
            ("docker.io".to_owned(), name)
        };
        let last = path.rsplit('/').next().unwrap_or(path);
        let (path, tag) = match last.split_once(':') {
            Some((_, tag)) => (&path[..path.len() - tag.len() - 1], Some(tag)),
            None => (path, None),
        };
        if !path.split('/').all(valid_component) {
            return bad("repository names are lowercase letters, digits, `.`, `_`, `-` and `/`");
        }
        let version = match (digest, tag) {
            (Some(digest), _) => {
                let hex = digest.strip_prefix("sha256:").unwrap_or_default();
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return bad("digests are sha256: and 64 hex digits");
                }
                Version::Digest(digest.to_ascii_lowercase())
            }
            (None, Some(tag)) => {
                if tag.is_empty()
                    || tag.len() > 128
                    || !tag
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                {
                    return bad("tags are letters, digits, `.`, `_` and `-`");
                }
                Version::Tag(tag.to_owned())
            }
            (None, None) => Version::Tag("latest".to_owned()),
        };
        let (registry, repository) = if registry == "docker.io" || registry == "index.docker.io" {
            let repository = if path.contains('/') {
                path.to_owned()
            } else {
                format!("library/{path}")
            };
            ("registry-1.docker.io".to_owned(), repository)
        } else {
            (registry, path.to_owned())
        };
        Ok(Reference {
            registry,
            repository,
            version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Reference {
        text.parse().unwrap()
    }

    #[test]
    fn resolves_like_container_tools() {
        let hub = parse("docker.io/mrstevenyaga/add.wasm");
        assert_eq!(hub.registry, "registry-1.docker.io");
        assert_eq!(hub.repository, "mrstevenyaga/add.wasm");
        assert_eq!(hub.version, Version::Tag("latest".into()));
        assert_eq!(parse("add.wasm").repository, "library/add.wasm");
        let local = parse("localhost:5000/demo/addition.wasm:v2");
        assert_eq!(
            (local.registry.as_str(), local.repository.as_str()),
            ("localhost:5000", "demo/addition.wasm")
        );
        assert_eq!(local.version, Version::Tag("v2".into()));
        let digest = format!("sha256:{}", "a".repeat(64));
        let pinned = parse(&format!("ghcr.io/org/app@{digest}"));
        assert_eq!(pinned.version, Version::Digest(digest.clone()));
        assert_eq!(pinned.to_string(), format!("ghcr.io/org/app@{digest}"));
        assert_eq!(parse("127.0.0.1:5000/x/y.wasm").registry, "127.0.0.1:5000");
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "UPPER/case",
            "a//b",
            "x@sha256:zz",
            "x:tag with space",
            "x:",
            "../etc/passwd",
        ] {
            assert!(bad.parse::<Reference>().is_err(), "{bad}");
        }
    }
}
