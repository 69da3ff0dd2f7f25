//! Client authentication in the DBLB, for PostgreSQL (`module.auth_type`): the DBLB checks
//! each client's password itself, against an auth file in PgBouncer's `userlist.txt` format,
//! so it can hand a client a server connection that is already logged in instead of making
//! the server fork and authenticate a backend for every client.
//!
//! SCRAM-SHA-256 both ways (RFC 5802/7677, as PostgreSQL speaks it): towards clients the DBLB
//! is the server; towards servers it is the client, with the plain password when the file
//! holds one, or with the client key a client's proof revealed when the file holds the
//! server's own SCRAM secret (`SELECT rolpassword FROM pg_authid`), as PgBouncer does.

use std::{collections::HashMap, path::Path, sync::OnceLock};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::{Digest, Sha256};

/// Iterations for secrets the DBLB derives from plain passwords (PostgreSQL's default).
const ITERATIONS: u32 = 4096;
/// The most iterations a server may ask the DBLB to compute for one login.
pub const MAX_ITERATIONS: u32 = 1_000_000;
/// The SASL mechanism the DBLB speaks, both ways.
pub const MECHANISM: &str = "SCRAM-SHA-256";

/// How PostgreSQL clients are authenticated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AuthType {
    /// The server checks every client, each on a login of its own (the default).
    #[default]
    #[serde(rename = "passthrough")]
    Passthrough,
    /// The DBLB lets in any user named in the auth file without a password.
    #[serde(rename = "trust")]
    Trust,
    /// The DBLB checks the client's SCRAM-SHA-256 proof against the auth file.
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

/// A user's SCRAM-SHA-256 secret: what a server stores, enough to check a client's proof.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Secret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

/// What the DBLB knows of a user's password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// The plain password, when the auth file holds it (then servers can ask for any method).
    pub password: Option<String>,
    /// Set from the file for a SCRAM secret; derived from the plain password at its first use
    /// (thousands of hashes a user: not all at once when a long file is read).
    secret: OnceLock<Secret>,
}

impl Credentials {
    pub fn secret(&self) -> &Secret {
        self.secret.get_or_init(|| {
            let salt: [u8; 16] = rand::rng().random();
            Secret::derive(
                self.password.as_deref().unwrap_or_default(),
                &salt,
                ITERATIONS,
            )
        })
    }
}

/// A stand-in secret for a user the file does not name, so a client cannot tell unknown users
/// from wrong passwords (the same salt for the same name, as PostgreSQL's mock exchange).
pub fn mock_secret(user: &str) -> Secret {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    let key = KEY.get_or_init(|| rand::rng().random());
    let salt = hmac(key, &[user.as_bytes()]);
    Secret {
        iterations: ITERATIONS,
        salt: salt[..16].to_vec(),
        stored_key: rand::rng().random(),
        server_key: rand::rng().random(),
    }
}

/// How the DBLB logs in to a server as a client's user, learnt from that client's login.
#[derive(Clone, Debug, Default)]
pub enum ServerPassword {
    /// The server must not ask for a password (trust).
    #[default]
    None,
    Plain(String),
    /// The client key from a client's proof, and the secret it belongs to: enough for a SCRAM
    /// login to a server that stores the same secret.
    ScramKey {
        client_key: [u8; 32],
        secret: Secret,
    },
}

/// The users of an auth file.
#[derive(Clone, Debug, Default)]
pub struct AuthFile {
    users: HashMap<String, Credentials>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    #[error("cannot read the auth file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "auth file line {0}: expected \"user\" \"password\" (a plain password or a SCRAM-SHA-256$ secret from pg_authid)"
    )]
    Syntax(usize),
    #[error("auth file line {0}: {1}")]
    Secret(usize, &'static str),
}

impl AuthFile {
    /// Reads a PgBouncer-style user list: `"user" "password"` per line, `;` starts a comment,
    /// `""` inside quotes is a quote. The password is plain text or a `SCRAM-SHA-256$` secret;
    /// md5 hashes are refused (SCRAM cannot be spoken with them).
    pub fn load(path: &Path) -> Result<AuthFile, AuthFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        AuthFile::parse(&text)
    }

    pub fn parse(text: &str) -> Result<AuthFile, AuthFileError> {
        let mut users = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with(';') {
                continue;
            }
            let mut rest = line;
            let user = quoted(&mut rest).ok_or(AuthFileError::Syntax(number))?;
            rest = rest.trim_start();
            let password = quoted(&mut rest).ok_or(AuthFileError::Syntax(number))?;
            let credentials = if password.starts_with("SCRAM-SHA-256$") {
                Credentials {
                    password: None,
                    secret: OnceLock::from(
                        Secret::parse(&password).map_err(|e| AuthFileError::Secret(number, e))?,
                    ),
                }
            } else if password.starts_with("md5") && password.len() == 35 {
                return Err(AuthFileError::Secret(
                    number,
                    "md5 hashes cannot be used: give the plain password or the user's SCRAM-SHA-256 secret",
                ));
            } else {
                Credentials {
                    password: Some(password),
                    secret: OnceLock::new(),
                }
            };
            users.insert(user, credentials);
        }
        Ok(AuthFile { users })
    }

    pub fn get(&self, user: &str) -> Option<&Credentials> {
        self.users.get(user)
    }
}

/// One `"..."` field, `""` standing for a quote; advances `rest` past it.
fn quoted(rest: &mut &str) -> Option<String> {
    let mut chars = rest.strip_prefix('"')?.char_indices().peekable();
    let mut value = String::new();
    while let Some((at, c)) = chars.next() {
        if c != '"' {
            value.push(c);
        } else if chars.peek().is_some_and(|&(_, next)| next == '"') {
            chars.next();
            value.push('"');
        } else {
            *rest = &rest[at + 2..];
            return Some(value);
        }
    }
    None
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA-256 with one block: SCRAM's `Hi()`.
fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    // The keyed state is computed once and copied for each iteration.
    let keyed =
        Hmac::<Sha256>::new_from_slice(password.as_bytes()).expect("HMAC accepts any key length");
    let mut block: [u8; 32] = keyed
        .clone()
        .chain_update(salt)
        .chain_update(1u32.to_be_bytes())
        .finalize()
        .into_bytes()
        .into();
    let mut result = block;
    for _ in 1..iterations {
        block = keyed
            .clone()
            .chain_update(block)
            .finalize()
            .into_bytes()
            .into();
        result.iter_mut().zip(block).for_each(|(r, b)| *r ^= b);
    }
    result
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

impl Secret {
    pub fn derive(password: &str, salt: &[u8], iterations: u32) -> Secret {
        let salted = salted_password(password, salt, iterations);
        let client_key = hmac(&salted, &[b"Client Key"]);
        Secret {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, &[b"Server Key"]),
        }
    }

    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, as `pg_authid` holds it.
    pub fn parse(text: &str) -> Result<Secret, &'static str> {
        let malformed =
            "a SCRAM secret reads SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>";
        let rest = text.strip_prefix("SCRAM-SHA-256$").ok_or(malformed)?;
        let (params, keys) = rest.split_once('$').ok_or(malformed)?;
        let (iterations, salt) = params.split_once(':').ok_or(malformed)?;
        let (stored_key, server_key) = keys.split_once(':').ok_or(malformed)?;
        let key = |b64: &str| -> Result<[u8; 32], &'static str> {
            STANDARD
                .decode(b64)
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or("a SCRAM key is not 32 bytes of base64")
        };
        Ok(Secret {
            iterations: iterations
                .parse()
                .ok()
                .filter(|&i| i > 0)
                .ok_or("SCRAM iterations must be a positive number")?,
            salt: STANDARD
                .decode(salt)
                .map_err(|_| "the SCRAM salt is not base64")?,
            stored_key: key(stored_key)?,
            server_key: key(server_key)?,
        })
    }
}

/// Why a SCRAM exchange failed.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error(
        "channel binding is not supported here; connect with channel_binding=disable or prefer"
    )]
    ChannelBinding,
    #[error("the SCRAM nonce does not continue ours")]
    Nonce,
    #[error("wrong password")]
    Proof,
    #[error("the server's SCRAM signature does not match: it does not know this password")]
    ServerSignature,
}

/// The DBLB as a SCRAM server, checking one client.
pub struct ScramServer {
    secret: Secret,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    /// The `c=` the client must send back: its GS2 header in base64.
    channel_binding: &'static str,
}

fn nonce() -> String {
    let bytes: [u8; 18] = rand::rng().random();
    STANDARD.encode(bytes)
}

/// The `attribute=value` fields of a SCRAM message.
fn field(message: &str, name: char) -> Option<&str> {
    message.split(',').find_map(|part| {
        part.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
    })
}

impl ScramServer {
    /// Takes the client-first message; returns the exchange and the server-first message.
    pub fn start(
        secret: &Secret,
        client_first: &[u8],
    ) -> Result<(ScramServer, String), ScramError> {
        let client_first =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // "y": the client could bind but thinks we cannot; "n": it does not bind. An
        // authorisation identity is refused, as PostgreSQL does.
        let (bare, channel_binding) = if let Some(bare) = client_first.strip_prefix("n,,") {
            (bare, "biws")
        } else if let Some(bare) = client_first.strip_prefix("y,,") {
            (bare, "eSws")
        } else if client_first.starts_with("p=") {
            return Err(ScramError::ChannelBinding);
        } else {
            return Err(ScramError::Malformed(
                "the GS2 header must be n,, or y,, (no authorisation identity)",
            ));
        };
        let client_nonce = field(bare, 'r').ok_or(ScramError::Malformed("no client nonce"))?;
        let nonce = format!("{client_nonce}{}", self::nonce());
        let server_first = format!(
            "r={nonce},s={},i={}",
            STANDARD.encode(&secret.salt),
            secret.iterations
        );
        Ok((
            ScramServer {
                secret: secret.clone(),
                client_first_bare: bare.to_owned(),
                server_first: server_first.clone(),
                nonce,
                channel_binding,
            },
            server_first,
        ))
    }

    /// Checks the client-final message; returns the client key its proof reveals and the
    /// server-final message.
    pub fn finish(self, client_final: &[u8]) -> Result<([u8; 32], String), ScramError> {
        let client_final =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = client_final
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        if field(without_proof, 'r') != Some(self.nonce.as_str()) {
            return Err(ScramError::Nonce);
        }
        if field(without_proof, 'c') != Some(self.channel_binding) {
            return Err(ScramError::Malformed(
                "the channel binding data does not repeat the GS2 header",
            ));
        }
        let proof: [u8; 32] = STANDARD
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("the proof is not 32 bytes of base64"))?;
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let client_signature = hmac(&self.secret.stored_key, &[auth_message.as_bytes()]);
        let client_key = xor(&proof, &client_signature);
        if <[u8; 32]>::from(Sha256::digest(client_key)) != self.secret.stored_key {
            return Err(ScramError::Proof);
        }
        let server_signature = hmac(&self.secret.server_key, &[auth_message.as_bytes()]);
        Ok((
            client_key,
            format!("v={}", STANDARD.encode(server_signature)),
        ))
    }
}

/// The DBLB as a SCRAM client, logging in to a server.
pub struct ScramClient {
    password: ServerPassword,
    client_first_bare: String,
    nonce: String,
}

/// What the client needs to check the server's last message.
pub struct ScramClientFinal {
    server_key: [u8; 32],
    auth_message: String,
}

impl ScramClient {
    /// The exchange and the client-first message (no channel binding).
    pub fn start(password: &ServerPassword) -> (ScramClient, String) {
        let nonce = nonce();
        let client_first_bare = format!("n=,r={nonce}");
        let message = format!("n,,{client_first_bare}");
        (
            ScramClient {
                password: password.clone(),
                client_first_bare,
                nonce,
            },
            message,
        )
    }

    /// Takes the server-first message; returns the client-final message.
    pub fn answer(self, server_first: &[u8]) -> Result<(ScramClientFinal, String), ScramError> {
        let server_first =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let nonce = field(server_first, 'r').ok_or(ScramError::Malformed("no nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() <= self.nonce.len() {
            return Err(ScramError::Nonce);
        }
        let salt = field(server_first, 's')
            .and_then(|s| STANDARD.decode(s).ok())
            .ok_or(ScramError::Malformed("no salt"))?;
        let iterations: u32 = field(server_first, 'i')
            .and_then(|i| i.parse().ok())
            .filter(|i| (1..=MAX_ITERATIONS).contains(i))
            .ok_or(ScramError::Malformed(
                "the iteration count is missing or outside 1 to 1000000",
            ))?;
        let (client_key, server_key) = match &self.password {
            ServerPassword::Plain(password) => {
                let salted = salted_password(password, &salt, iterations);
                (
                    hmac(&salted, &[b"Client Key"]),
                    hmac(&salted, &[b"Server Key"]),
                )
            }
            ServerPassword::ScramKey { client_key, secret } => {
                if secret.salt != salt || secret.iterations != iterations {
                    // The server stores another secret than the auth file: the key is useless.
                    return Err(ScramError::ServerSignature);
                }
                (*client_key, secret.server_key)
            }
            ServerPassword::None => return Err(ScramError::Proof),
        };
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let proof = xor(&client_key, &hmac(&stored_key, &[auth_message.as_bytes()]));
        Ok((
            ScramClientFinal {
                server_key,
                auth_message,
            },
            format!("{without_proof},p={}", STANDARD.encode(proof)),
        ))
    }
}

impl ScramClientFinal {
    /// Checks the server-final message: the server knows the password too.
    pub fn verify(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let server_final =
            std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let expected = hmac(&self.server_key, &[self.auth_message.as_bytes()]);
        match field(server_final, 'v').and_then(|v| STANDARD.decode(v).ok()) {
            Some(signature) if signature == expected => Ok(()),
            _ => Err(ScramError::ServerSignature),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_files_read_like_pgbouncer_userlists() {
        let file = AuthFile::parse(
            "; users\n\"ann\" \"s3cret\"\n\"bo\"\"b\" \"SCRAM-SHA-256$4096:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"\n",
        )
        .unwrap();
        assert_eq!(file.get("ann").unwrap().password.as_deref(), Some("s3cret"));
        let bob = file.get("bo\"b").unwrap();
        assert_eq!(bob.password, None);
        assert_eq!(bob.secret().iterations, 4096);
        assert_eq!(bob.secret().salt, b"salt");
        for bad in [
            "ann s3cret",
            "\"ann\"",
            "\"ann\" \"md5d41d8cd98f00b204e9800998ecf8427e\"",
            "\"ann\" \"SCRAM-SHA-256$x:c2FsdA==$AA==:AA==\"",
        ] {
            assert!(AuthFile::parse(bad).is_err(), "{bad} accepted");
        }
    }

    /// Both ends of an exchange, the client with the plain password; then the DBLB logging in
    /// to a server with the client key that exchange revealed.
    #[test]
    fn scram_exchanges_check_the_password_and_carry_the_client_key() {
        let secret = Secret::derive("pencil", b"saltsaltsalt", 4096);
        let exchange = |password: ServerPassword| {
            let (client, first) = ScramClient::start(&password);
            let (server, server_first) = ScramServer::start(&secret, first.as_bytes())?;
            let (client, last) = client.answer(server_first.as_bytes())?;
            let (client_key, server_final) = server.finish(last.as_bytes())?;
            client.verify(server_final.as_bytes())?;
            Ok::<_, ScramError>(client_key)
        };
        let client_key = exchange(ServerPassword::Plain("pencil".into())).unwrap();
        assert_eq!(
            exchange(ServerPassword::Plain("crayon".into())).unwrap_err(),
            ScramError::Proof
        );
        let again = exchange(ServerPassword::ScramKey {
            client_key,
            secret: secret.clone(),
        })
        .unwrap();
        assert_eq!(again, client_key);
        let (_, first) = ScramClient::start(&ServerPassword::None);
        let (_, server_first) = ScramServer::start(&secret, first.as_bytes()).unwrap();
        assert!(server_first.contains(",i=4096"));
        assert_eq!(
            ScramServer::start(&secret, b"p=tls-server-end-point,,n=,r=abc").err(),
            Some(ScramError::ChannelBinding)
        );
        assert!(ScramServer::start(&secret, b"n,a=admin,n=,r=abc").is_err());
        // A client that said "y" must say so again in its channel binding data.
        let (server, server_first) = ScramServer::start(&secret, b"y,,n=,r=abc").unwrap();
        let nonce = field(&server_first, 'r').unwrap();
        let wrong = format!("c=biws,r={nonce},p={}", STANDARD.encode([0u8; 32]));
        assert!(matches!(
            server.finish(wrong.as_bytes()),
            Err(ScramError::Malformed(_))
        ));
        // The same stand-in salt for the same unknown user.
        assert_eq!(mock_secret("eve").salt, mock_secret("eve").salt);
        assert_ne!(mock_secret("eve").salt, mock_secret("mallory").salt);
    }
}
