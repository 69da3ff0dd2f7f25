//! Providers: where deployments send requests, and the translation between the OpenAI wire
//! format clients speak and each provider's own.
//!
//! - [`openai`]: any OpenAI-compatible API (OpenAI, vLLM, llama.cpp's server, Ollama's `/v1`):
//!   the body passes through with the provider's model name, answers unchanged;
//! - [`anthropic`]: the Messages API, translated both ways, streams included;
//! - [`ollama`]: Ollama's native API (`/api/chat`, `/api/generate`, `/api/embed`).
//!
//! A streamed answer goes through a [`Translator`] that turns the provider's events into
//! OpenAI's server-sent events as they arrive, and notes the token usage on the way.

pub mod anthropic;
pub mod ollama;
pub mod openai;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request,
    header::{CONTENT_TYPE, HeaderName, HeaderValue},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Openai,
    Anthropic,
    Ollama,
}

/// The OpenAI endpoints the gateway serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }
}

/// Tokens a request used, from the provider's `usage` or estimated when it gave none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

impl Usage {
    pub fn total(self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }

    /// About four characters a token, the rule of thumb for English text.
    pub fn estimate(prompt_chars: usize, completion_chars: usize) -> Usage {
        Usage {
            prompt: prompt_chars.div_ceil(4) as u64,
            completion: completion_chars.div_ceil(4) as u64,
        }
    }

    fn openai(self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.total(),
        })
    }
}

/// What the client asked for, as translations need it.
#[derive(Clone, Debug)]
pub struct Ask {
    pub endpoint: Endpoint,
    /// The client's JSON body.
    pub body: Value,
    pub stream: bool,
    /// The client asked for a usage chunk at the end of a stream.
    pub include_usage: bool,
}

impl Ask {
    pub fn new(endpoint: Endpoint, body: Value) -> Ask {
        // Embeddings have no streamed form; a `stream` flag there is ignored, as OpenAI does.
        let stream = endpoint != Endpoint::Embeddings && body["stream"].as_bool().unwrap_or(false);
        let include_usage = body["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false);
        Ask {
            endpoint,
            body,
            stream,
            include_usage,
        }
    }

    /// Characters of prompt text, for estimating tokens when a provider gives no usage.
    pub fn prompt_chars(&self) -> usize {
        fn chars(value: &Value) -> usize {
            match value {
                Value::String(text) => text.chars().count(),
                Value::Array(items) => items.iter().map(chars).sum(),
                Value::Object(map) => map
                    .iter()
                    .filter(|(k, _)| matches!(k.as_str(), "content" | "text"))
                    .map(|(_, v)| chars(v))
                    .sum(),
                _ => 0,
            }
        }
        match self.endpoint {
            Endpoint::Chat => chars(&self.body["messages"]),
            Endpoint::Completions => chars(&self.body["prompt"]),
            Endpoint::Embeddings => chars(&self.body["input"]),
        }
    }
}

/// A non-streamed answer in OpenAI's format.
pub struct Answer {
    pub body: Bytes,
    pub usage: Usage,
}

/// Turns a provider's streamed answer into OpenAI's server-sent events.
pub trait Translator: Send + Sync {
    /// Takes the next bytes from the provider; appends the events for the client to `out`.
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<Bytes>) -> Result<(), String>;
    /// True once the provider said the stream is over (successfully or with an error event).
    fn complete(&self) -> bool;
    /// True when the answer is whole, so the provider closing the stream now is no failure
    /// (some OpenAI-compatible servers end after the finish chunk without `[DONE]`).
    fn finished(&self) -> bool {
        self.complete() && !self.failed()
    }
    /// True when the provider reported an error inside the stream.
    fn failed(&self) -> bool;
    /// True once some generated content went out (time to first token).
    fn content_started(&self) -> bool;
    /// The usage so far: the provider's, or an estimate from the text that went out.
    fn usage(&self, prompt_chars: usize) -> Usage;
}

/// Providers compare equal when every setting is the same, so a rebuilt catalog can keep the
/// deployments (and their load, latency and cooldowns) whose provider did not change.
#[derive(PartialEq, Eq)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    base: String,
    api_key: Option<String>,
    /// Ask OpenAI-compatible servers for the usage chunk of streams (`stream_options`).
    stream_usage: bool,
}

impl Provider {
    pub fn new(
        name: &str,
        kind: ProviderKind,
        base_url: &str,
        api_key: Option<String>,
    ) -> Result<Provider, String> {
        let base = base_url.trim().trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(format!("`{base_url}` must start with http:// or https://"));
        }
        base.parse::<hyper::Uri>()
            .map_err(|e| format!("`{base_url}` is not a URL: {e}"))?;
        Ok(Provider {
            name: name.to_owned(),
            kind,
            base,
            api_key,
            stream_usage: true,
        })
    }

    /// Whether streams ask an OpenAI-compatible server for usage (`stream_options`, which a
    /// few servers refuse); without it tokens are estimated.
    pub fn with_stream_usage(mut self, on: bool) -> Provider {
        self.stream_usage = on;
        self
    }

    fn bearer(&self) -> Vec<(HeaderName, String)> {
        self.api_key
            .iter()
            .map(|key| (hyper::header::AUTHORIZATION, format!("Bearer {key}")))
            .collect()
    }

    pub fn serves(&self, endpoint: Endpoint) -> bool {
        match self.kind {
            ProviderKind::Openai | ProviderKind::Ollama => true,
            ProviderKind::Anthropic => endpoint == Endpoint::Chat,
        }
    }

    /// The provider's request for `ask`, with its model name; an error says why this request
    /// cannot be translated for this kind of provider.
    pub fn request(&self, ask: &Ask, model: &str) -> Result<Request<Full<Bytes>>, String> {
        let (path, body, headers): (String, Value, Vec<(HeaderName, String)>) = match self.kind {
            ProviderKind::Openai => {
                let path = match ask.endpoint {
                    Endpoint::Chat => "/chat/completions",
                    Endpoint::Completions => "/completions",
                    Endpoint::Embeddings => "/embeddings",
                };
                (
                    path.to_owned(),
                    openai::request(ask, model, self.stream_usage),
                    self.bearer(),
                )
            }
            ProviderKind::Anthropic => {
                let path = if self.base.ends_with("/v1") {
                    "/messages"
                } else {
                    "/v1/messages"
                };
                let mut headers = vec![(
                    HeaderName::from_static("anthropic-version"),
                    anthropic::VERSION.to_owned(),
                )];
                if let Some(key) = &self.api_key {
                    headers.push((HeaderName::from_static("x-api-key"), key.clone()));
                }
                (path.to_owned(), anthropic::request(ask, model)?, headers)
            }
            ProviderKind::Ollama => {
                let (path, body) = ollama::request(ask, model)?;
                (path.to_owned(), body, self.bearer())
            }
        };
        let mut builder =
            Request::post(format!("{}{path}", self.base)).header(CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            let value = HeaderValue::from_str(&value).map_err(|_| {
                format!(
                    "provider `{}`: its API key is not a valid header",
                    self.name
                )
            })?;
            builder = builder.header(name, value);
        }
        let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("provider `{}`: {e}", self.name))
    }

    /// A successful non-streamed answer, in OpenAI's format.
    pub fn answer(&self, ask: &Ask, body: &[u8]) -> Result<Answer, String> {
        match self.kind {
            ProviderKind::Openai => openai::answer(ask, body),
            ProviderKind::Anthropic => anthropic::answer(body),
            ProviderKind::Ollama => ollama::answer(ask, body),
        }
    }

    /// A provider's error body (a non-2xx answer passed on to the client) in OpenAI's shape.
    pub fn error_body(&self, status: u16, body: &[u8]) -> Bytes {
        if self.kind == ProviderKind::Openai
            && serde_json::from_slice::<Value>(body).is_ok_and(|v| v["error"].is_object())
        {
            return Bytes::copy_from_slice(body);
        }
        let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let message = parsed["error"]["message"]
            .as_str()
            .or_else(|| parsed["error"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(500).collect());
        let kind = parsed["error"]["type"]
            .as_str()
            .unwrap_or(if status == 429 {
                "rate_limit_error"
            } else if status >= 500 {
                "api_error"
            } else {
                "invalid_request_error"
            })
            .to_owned();
        error_json(
            &format!("provider `{}` answered {status}: {message}", self.name),
            &kind,
            None,
        )
    }

    /// Whether a 2xx answer to a streamed request is a stream this provider kind sends (a JSON
    /// body there means the server ignored `stream`; relaying it would never complete).
    pub fn is_stream(&self, headers: &hyper::HeaderMap) -> bool {
        let content_type = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        match self.kind {
            ProviderKind::Openai | ProviderKind::Anthropic => {
                content_type.starts_with("text/event-stream")
            }
            ProviderKind::Ollama => !content_type.starts_with("text/html"),
        }
    }

    /// The translator for a streamed answer to `ask`.
    pub fn translator(&self, ask: &Ask, model: &str) -> Box<dyn Translator> {
        match self.kind {
            ProviderKind::Openai => Box::new(openai::Stream::new(ask)),
            ProviderKind::Anthropic => Box::new(anthropic::Stream::new(ask, model)),
            ProviderKind::Ollama => Box::new(ollama::Stream::new(ask, model)),
        }
    }
}

/// OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`.
pub fn error_json(message: &str, kind: &str, code: Option<&str>) -> Bytes {
    Bytes::from(
        json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
            .to_string(),
    )
}

/// An error event ending a stream, in OpenAI's error shape.
pub fn error_event(message: &str, kind: &str, code: Option<&str>) -> Bytes {
    sse(&String::from_utf8_lossy(&error_json(message, kind, code)))
}

/// One server-sent event carrying `data`.
pub fn sse(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// The longest event (or line) a stream may send; beyond it the stream counts as broken.
const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// Splits server-sent events out of a byte stream: `(event name, data)` per complete event.
#[derive(Default)]
pub struct SseReader {
    pending: Vec<u8>,
    /// Bytes of `pending` already searched for an event's end.
    scanned: usize,
}

impl SseReader {
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<(String, String)>, String> {
        // Carriage returns only ever end lines in SSE (JSON escapes its own), so dropping them
        // turns CRLF streams into LF ones.
        self.pending.extend(bytes.iter().filter(|b| **b != b'\r'));
        let mut events = Vec::new();
        loop {
            let from = self.scanned.saturating_sub(1);
            let Some(end) = self.pending[from..]
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|at| from + at)
            else {
                self.scanned = self.pending.len();
                break;
            };
            let block: Vec<u8> = self.pending.drain(..end + 2).collect();
            self.scanned = 0;
            let text = String::from_utf8_lossy(&block);
            let (mut name, mut data) = (String::new(), Vec::new());
            for line in text.lines() {
                if let Some(value) = line.strip_prefix("data:") {
                    data.push(value.strip_prefix(' ').unwrap_or(value).to_owned());
                } else if let Some(value) = line.strip_prefix("event:") {
                    name = value.trim().to_owned();
                }
            }
            if !data.is_empty() || !name.is_empty() {
                events.push((name, data.join("\n")));
            }
        }
        if self.pending.len() > MAX_EVENT_BYTES {
            return Err(format!("an event is over {MAX_EVENT_BYTES} bytes"));
        }
        Ok(events)
    }
}

/// Splits newline-delimited JSON (Ollama's streams) into complete lines.
#[derive(Default)]
pub struct LineReader {
    pending: Vec<u8>,
}

impl LineReader {
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<String>, String> {
        let mut lines = Vec::new();
        // Only the new bytes can hold a line's end: the pending ones were searched before.
        let mut start = 0;
        for (at, byte) in bytes.iter().enumerate() {
            if *byte == b'\n' {
                self.pending.extend_from_slice(&bytes[start..at]);
                start = at + 1;
                let line = String::from_utf8_lossy(&self.pending).trim().to_owned();
                self.pending.clear();
                if !line.is_empty() {
                    lines.push(line);
                }
            }
        }
        self.pending.extend_from_slice(&bytes[start..]);
        if self.pending.len() > MAX_EVENT_BYTES {
            return Err(format!("a line is over {MAX_EVENT_BYTES} bytes"));
        }
        Ok(lines)
    }
}

/// An id for a translated answer whose provider gives none: unique within this process.
pub fn answer_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("chatcmpl-{}-{n}", now())
}

/// Seconds since the epoch, for the `created` field of translated answers.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// A chat completion chunk (or, for `/v1/completions`, a text completion chunk) carrying `text`
/// and/or a finish reason; `role` on the first one.
pub fn chunk(
    ask: &Ask,
    id: &str,
    model: &str,
    role: bool,
    text: Option<&str>,
    finish: Option<&str>,
) -> Bytes {
    let choice = match ask.endpoint {
        Endpoint::Completions => {
            json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
        }
        _ => {
            let mut delta = serde_json::Map::new();
            if role {
                delta.insert("role".into(), "assistant".into());
            }
            if let Some(text) = text {
                delta.insert("content".into(), text.into());
            }
            json!({"index": 0, "delta": delta, "finish_reason": finish})
        }
    };
    let object = match ask.endpoint {
        Endpoint::Completions => "text_completion",
        _ => "chat.completion.chunk",
    };
    sse(
        &json!({"id": id, "object": object, "created": now(), "model": model, "choices": [choice]})
            .to_string(),
    )
}

/// The `object` of a streamed chunk: text completions stream `text_completion` objects.
fn chunk_object(ask: &Ask) -> &'static str {
    match ask.endpoint {
        Endpoint::Completions => "text_completion",
        _ => "chat.completion.chunk",
    }
}

/// The usage chunk that ends a stream when the client asked for `include_usage`.
pub fn usage_chunk(ask: &Ask, id: &str, model: &str, usage: Usage) -> Bytes {
    sse(&json!({"id": id, "object": chunk_object(ask), "created": now(), "model": model, "choices": [], "usage": usage.openai()})
        .to_string())
}

/// A non-streamed chat or text completion holding `text`.
pub fn completion(
    ask: &Ask,
    id: &str,
    model: &str,
    text: &str,
    finish: &str,
    usage: Usage,
) -> Bytes {
    let (object, choice) = match ask.endpoint {
        Endpoint::Completions => (
            "text_completion",
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
        ),
        _ => (
            "chat.completion",
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}),
        ),
    };
    Bytes::from(
        json!({"id": id, "object": object, "created": now(), "model": model, "choices": [choice], "usage": usage.openai()})
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_across_reads() {
        let mut reader = SseReader::default();
        assert!(
            reader
                .feed(b"event: ping\r\ndata: {\"a\"")
                .unwrap()
                .is_empty()
        );
        let events = reader.feed(b": 1}\r").unwrap();
        assert!(events.is_empty());
        let events = reader.feed(b"\n\r\ndata: [DONE]\n\n").unwrap();
        assert_eq!(
            events,
            vec![
                ("ping".to_owned(), "{\"a\": 1}".to_owned()),
                (String::new(), "[DONE]".to_owned())
            ]
        );
    }

    #[test]
    fn lines_split_across_reads() {
        let mut reader = LineReader::default();
        assert!(reader.feed(b"{\"a\":").unwrap().is_empty());
        assert_eq!(
            reader.feed(b"1}\n\n{\"b\":2}\n").unwrap(),
            vec!["{\"a\":1}", "{\"b\":2}"]
        );
    }

    #[test]
    fn provider_urls_are_checked() {
        assert!(Provider::new("p", ProviderKind::Openai, "localhost:8000", None).is_err());
        let provider = Provider::new(
            "p",
            ProviderKind::Anthropic,
            "https://api.anthropic.com/v1/",
            None,
        )
        .unwrap();
        let ask = Ask::new(Endpoint::Chat, json!({"model": "c", "messages": []}));
        let request = provider.request(&ask, "claude").unwrap();
        assert_eq!(request.uri(), "https://api.anthropic.com/v1/messages");
    }
}
