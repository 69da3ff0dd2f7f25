//! The AILB binary between real clients (the official `openai` Python client and curl) and mock
//! providers written here: OpenAI-shaped, Anthropic-shaped and Ollama-shaped, streaming and not,
//! with modes that fail, rate-limit or break a stream off.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    http::{HeaderMap, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use marchproxy_testkit::external::{Process, free_port, require};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Answer,
    Fail,
    RateLimit,
    /// 401 with OpenAI's text, which echoes the end of the key it was given.
    WrongKey,
    /// Takes the request and never answers.
    Hang,
    /// Streams two events, then fails the connection.
    BreakStream,
    /// Streams two events, then goes silent.
    StallStream,
}

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    OpenAi,
    Anthropic,
    Ollama,
}

/// A provider written for the tests: answers "<name> says hi" in its shape and records what it
/// was sent.
struct Mock {
    addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    seen: Arc<Mutex<Vec<(HeaderMap, Value)>>>,
}

impl Mock {
    async fn start(name: &'static str, shape: Shape, mode: Mode) -> Mock {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, seen) = (Arc::new(Mutex::new(mode)), Arc::new(Mutex::new(Vec::new())));
        let (current, record) = (Arc::clone(&mode), Arc::clone(&seen));
        let app = Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let (current, record) = (Arc::clone(&current), Arc::clone(&record));
            async move {
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                record.lock().unwrap().push((headers, body.clone()));
                let mode = *current.lock().unwrap();
                answer(name, shape, mode, uri.path(), &body).await
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        Mock { addr, mode, seen }
    }

    fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn last(&self) -> (HeaderMap, Value) {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request")
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

/// A streamed body: every event, or (BreakStream, StallStream) two events, a pause long
/// enough for them to reach the gateway, then a failed connection or silence.
fn sse_body(events: Vec<String>, mode: Mode) -> Body {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let cut = matches!(mode, Mode::BreakStream | Mode::StallStream);
        let count = if cut { 2 } else { events.len() };
        for event in events.into_iter().take(count) {
            if sender.send(Ok(Bytes::from(event))).await.is_err() {
                return;
            }
        }
        if mode == Mode::BreakStream {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = sender
                .send(Err(std::io::Error::other("the provider fell over")))
                .await;
        }
        if mode == Mode::StallStream {
            sender.closed().await;
        }
    });
    Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(receiver))
}

async fn answer(name: &str, shape: Shape, mode: Mode, path: &str, body: &Value) -> Response {
    match mode {
        Mode::Fail => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"error":{"message":"boom"}}"#,
            )
                .into_response();
        }
        Mode::WrongKey => {
            let body = r#"{"error":{"message":"Incorrect API key provided: sk-...cret","type":"invalid_request_error","code":"invalid_api_key"}}"#;
            return (StatusCode::UNAUTHORIZED, body).into_response();
        }
        Mode::Hang => {
            return std::future::pending::<Response>().await;
        }
        Mode::RateLimit => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "1")],
                "slow down",
            )
                .into_response();
        }
        _ => {}
    }
    let text = format!("{name} says hi");
    let stream = body["stream"].as_bool() == Some(true);
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    match shape {
        Shape::OpenAi if path.ends_with("/embeddings") => axum::Json(json!({
            "object": "list", "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.25, 0.5]}],
            "usage": {"prompt_tokens": 3, "total_tokens": 3}
        }))
        .into_response(),
        Shape::OpenAi if !stream => axum::Json(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        }))
        .into_response(),
        Shape::OpenAi => {
            let chunk = |delta: Value, finish: Value| {
                format!(
                    "data: {}\n\n",
                    json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
                )
            };
            let mut events = vec![
                chunk(json!({"role": "assistant", "content": ""}), Value::Null),
                chunk(json!({"content": format!("{name} ")}), Value::Null),
                chunk(json!({"content": "says hi"}), Value::Null),
                chunk(json!({}), json!("stop")),
            ];
            if body["stream_options"]["include_usage"] == true {
                events.push(format!(
                    "data: {}\n\n",
                    json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [],
                           "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})
                ));
            }
            events.push("data: [DONE]\n\n".into());
            sse_response(sse_body(events, mode))
        }
        Shape::Anthropic if !stream => axum::Json(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 12, "output_tokens": 4}
        }))
        .into_response(),
        Shape::Anthropic => {
            let event = |kind: &str, data: Value| format!("event: {kind}\ndata: {data}\n\n");
            let events = vec![
                event("message_start", json!({"type": "message_start", "message": {"id": "msg_2", "model": model, "usage": {"input_tokens": 12, "output_tokens": 1}}})),
                event("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
                event("ping", json!({"type": "ping"})),
                event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": format!("{name} ")}})),
                event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "says hi"}})),
                event("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
                event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}})),
                event("message_stop", json!({"type": "message_stop"})),
            ];
            sse_response(sse_body(events, mode))
        }
        Shape::Ollama => {
            let line = |content: &str, done: bool| {
                let mut line = json!({"model": model, "created_at": "2026-11-23T00:00:00Z",
                    "message": {"role": "assistant", "content": content}, "done": done});
                if done {
                    line["done_reason"] = "stop".into();
                    line["prompt_eval_count"] = 9.into();
                    line["eval_count"] = 3.into();
                }
                line
            };
            if !stream {
                return axum::Json(line(&text, true)).into_response();
            }
            let lines = [line(&format!("{name} "), false), line("says hi", false), line("", true)]
                .iter()
                .map(|l| format!("{l}\n"))
                .collect();
            (
                [("content-type", "application/x-ndjson")],
                sse_body(lines, mode),
            )
                .into_response()
        }
    }
}

fn sse_response(body: Body) -> Response {
    ([("content-type", "text/event-stream")], body).into_response()
}

/// The gateway binary with a config file.
struct Gateway {
    data: SocketAddr,
    admin: SocketAddr,
    _process: Process,
}

impl Gateway {
    async fn start(dir: &Path, module: &str) -> Gateway {
        let [data, grpc, admin] = [(); 3].map(|()| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let config = dir.join("ailb.toml");
        std::fs::write(&config, module).unwrap();
        let log = dir.join("ailb.log");
        let mut process = Process::spawn(
            "marchproxy-ailb",
            Command::new(env!("CARGO_BIN_EXE_marchproxy-ailb"))
                .arg("--config")
                .arg(&config)
                .arg("--listen")
                .arg(data.to_string())
                .arg("--grpc-listen")
                .arg(grpc.to_string())
                .arg("--admin-listen")
                .arg(admin.to_string())
                .env_remove("MARCHPROXY_NLB")
                .env("PROVIDER_KEY", "provider-secret")
                .env("TEAM_A_KEY", "key-a")
                .env("TEAM_B_KEY", "key-b")
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap()),
        );
        process.wait_listening(data, DEADLINE, &log).await;
        Gateway {
            data,
            admin,
            _process: process,
        }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.data)
    }

    /// Runs tests/client.py (the official openai client) and returns its JSON.
    async fn client(&self, key: &str, args: &[&str]) -> Value {
        require(
            "the openai Python client",
            "python3 -c 'import openai'",
            "python3 -m pip install openai",
        );
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/client.py");
        let output = tokio::process::Command::new("python3")
            .arg(script)
            .arg(self.base_url())
            .arg(key)
            .args(args)
            .output()
            .await
            .expect("python3 runs");
        assert!(
            output.status.success(),
            "client.py {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "client.py printed no JSON ({e}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// curl with `args`; returns (status, headers and body as text).
    async fn curl(&self, path: &str, args: &[&str]) -> (u16, String) {
        require("curl", "command -v curl", "sudo apt-get install -y curl");
        let output = tokio::process::Command::new("curl")
            .args(["-s", "-i", "--max-time", "30"])
            .args(args)
            .arg(format!("http://{}{path}", self.data))
            .output()
            .await
            .expect("curl runs");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("curl got no HTTP answer: {text}"));
        (status, text)
    }

    async fn metric(&self, name: &str, labels: &str) -> f64 {
        marchproxy_testkit::metric(self.admin, name, labels).await
    }
}

fn provider(name: &str, kind: &str, mock: &Mock) -> String {
    let base = match kind {
        "openai" => format!("http://{}/v1", mock.addr),
        _ => format!("http://{}", mock.addr),
    };
    format!(
        "[module.providers.{name}]\nkind = \"{kind}\"\nbase_url = \"{base}\"\napi_key_env = \"PROVIDER_KEY\"\n"
    )
}

#[tokio::test]
async fn routing_weights_failover_and_streams() {
    let heavy = Mock::start("heavy", Shape::OpenAi, Mode::Answer).await;
    let light = Mock::start("light", Shape::OpenAi, Mode::Answer).await;
    let failing = Mock::start("failing", Shape::OpenAi, Mode::Fail).await;
    let backup = Mock::start("backup", Shape::OpenAi, Mode::Answer).await;
    let breaking = Mock::start("breaking", Shape::OpenAi, Mode::BreakStream).await;
    let down = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[module]\nallowed_fails = 1\ncooldown_ms = 60000\nrequest_timeout_ms = 20000\n{}{}{}{}{}\
         [module.providers.down]\nkind = \"openai\"\nbase_url = \"http://{down}/v1\"\n\
         [module.models.gpt]\naliases = [\"gpt-latest\"]\ndeployments = [{{provider = \"heavy\", model = \"gpt-heavy\", weight = 3}}, {{provider = \"light\", weight = 1}}]\n\
         [module.models.resilient]\ndeployments = [{{provider = \"failing\", weight = 100}}, {{provider = \"down\", weight = 100}}, {{provider = \"backup\", weight = 1}}]\n\
         [module.models.brittle]\ndeployments = [{{provider = \"breaking\", weight = 1000000}}, {{provider = \"backup\", weight = 1}}]\n",
        provider("heavy", "openai", &heavy),
        provider("light", "openai", &light),
        provider("failing", "openai", &failing),
        provider("backup", "openai", &backup),
        provider("breaking", "openai", &breaking),
    );
    let gateway = Gateway::start(dir.path(), &config).await;

    // Routing by model and alias, with the provider's model name and key.
    let answer = gateway.client("any", &["chat", "gpt-latest"]).await;
    assert!(
        answer["content"].as_str().unwrap().ends_with("says hi"),
        "{answer}"
    );
    let (headers, body) = heavy.last_or(&light);
    assert_eq!(headers["authorization"], "Bearer provider-secret");
    assert!(
        ["gpt-heavy", "gpt"].contains(&body["model"].as_str().unwrap()),
        "{body}"
    );

    // Weights: 3 to 1.
    let spread = gateway.client("any", &["many", "gpt", "200"]).await;
    let heavy_answers = spread["contents"]["heavy says hi"].as_u64().unwrap_or(0);
    let light_answers = spread["contents"]["light says hi"].as_u64().unwrap_or(0);
    assert_eq!(heavy_answers + light_answers, 200, "{spread}");
    // 150 expected; the bounds are over 4 standard deviations (~6) wide.
    assert!((120..=180).contains(&heavy_answers), "{spread}");

    // Failover: a 500 and a refused connection are skipped; the client never sees them.
    for _ in 0..10 {
        let answer = gateway.client("any", &["chat", "resilient"]).await;
        assert_eq!(answer["content"], "backup says hi", "{answer}");
    }
    assert!(failing.requests() >= 1);
    assert!(
        gateway
            .metric("ailb_failovers_total", "model=\"resilient\"")
            .await
            >= 1.0
    );
    assert!(
        gateway
            .metric(
                "ailb_provider_errors_total",
                "provider=\"failing\",reason=\"server_error\""
            )
            .await
            >= 1.0
    );
    assert!(
        gateway
            .metric(
                "ailb_provider_errors_total",
                "provider=\"down\",reason=\"connect\""
            )
            .await
            >= 1.0
    );
    // Cooled down after one failure each: the last requests went straight to the backup.
    let failed_before = failing.requests();
    gateway.client("any", &["chat", "resilient"]).await;
    assert_eq!(
        failing.requests(),
        failed_before,
        "a cooling deployment is not tried first"
    );

    // Streaming passes through, with usage when asked.
    let streamed = gateway.client("any", &["stream", "gpt"]).await;
    assert!(
        streamed["content"].as_str().unwrap().ends_with("says hi"),
        "{streamed}"
    );
    assert_eq!(streamed["finish_reason"], "stop");
    assert_eq!(streamed["usage"]["total_tokens"], 15);

    // A stream that breaks after it began is not retried elsewhere: the client gets an error.
    let backup_before = backup.requests();
    let broken = gateway.client("any", &["stream", "brittle"]).await;
    assert_eq!(broken["content"], "breaking ", "{broken}");
    assert!(
        broken["message"]
            .as_str()
            .unwrap_or_default()
            .contains("stream ended before the answer was complete"),
        "{broken}"
    );
    assert_eq!(
        backup.requests(),
        backup_before,
        "no failover after the first byte"
    );
    breaking.set(Mode::Fail);
    let retried = gateway.client("any", &["stream", "brittle"]).await;
    assert_eq!(
        retried["content"], "backup says hi",
        "a failure before the stream began fails over: {retried}"
    );

    // Usage metrics: tokens from the providers' usage, by model.
    let prompt = gateway
        .metric(
            "ailb_tokens_processed_total",
            "model=\"gpt\",provider=\"heavy\",direction=\"prompt\"",
        )
        .await
        + gateway
            .metric(
                "ailb_tokens_processed_total",
                "model=\"gpt\",provider=\"light\",direction=\"prompt\"",
            )
            .await;
    assert_eq!(
        prompt,
        10.0 * 202.0,
        "201 chats and 1 stream of 10 prompt tokens each"
    );
    assert!(
        gateway
            .metric(
                "ailb_requests_total",
                "model=\"gpt\",provider=\"heavy\",status=\"200\""
            )
            .await
            >= 120.0
    );
    assert!(
        gateway
            .metric(
                "ailb_request_duration_seconds_count",
                "model=\"gpt\",provider=\"light\""
            )
            .await
            >= 20.0
    );

    // Providers that ask to slow down are skipped; when all of them do, the client is told so.
    heavy.set(Mode::RateLimit);
    light.set(Mode::RateLimit);
    let limited = gateway.client("any", &["chat", "gpt"]).await;
    assert_eq!(limited["error"], "RateLimitError", "{limited}");
    assert!(
        limited["message"]
            .as_str()
            .unwrap()
            .contains("every provider of model `gpt` is rate limiting"),
        "{limited}"
    );
    assert!(
        gateway
            .metric(
                "ailb_provider_errors_total",
                "provider=\"heavy\",reason=\"rate_limited\""
            )
            .await
            >= 1.0
    );
}

impl Mock {
    /// The last request of whichever of two mocks got the most recent one.
    fn last_or(&self, other: &Mock) -> (HeaderMap, Value) {
        if self.requests() > 0 {
            self.last()
        } else {
            other.last()
        }
    }
}

#[tokio::test]
async fn anthropic_and_ollama_translation() {
    let claude = Mock::start("claude", Shape::Anthropic, Mode::Answer).await;
    let llama = Mock::start("llama", Shape::Ollama, Mode::Answer).await;
    let embedder = Mock::start("embedder", Shape::OpenAi, Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[module]\n{}{}{}\
         [module.models.claude]\ndeployments = [{{provider = \"anthropic\", model = \"claude-3-5-haiku\"}}]\n\
         [module.models.local]\ndeployments = [{{provider = \"ollama\", model = \"llama3\"}}]\n\
         [module.models.embed]\ndeployments = [{{provider = \"anthropic\"}}, {{provider = \"embedder\", model = \"text-embedding-3-small\"}}]\n",
        provider("anthropic", "anthropic", &claude),
        provider("ollama", "ollama", &llama),
        provider("embedder", "openai", &embedder),
    );
    let gateway = Gateway::start(dir.path(), &config).await;

    let answer = gateway.client("any", &["chat", "claude"]).await;
    assert_eq!(answer["content"], "claude says hi", "{answer}");
    assert_eq!(answer["finish_reason"], "stop");
    assert_eq!(answer["usage"]["prompt_tokens"], 12);
    assert_eq!(answer["usage"]["total_tokens"], 16);
    let (headers, sent) = claude.last();
    assert_eq!(headers["x-api-key"], "provider-secret");
    assert_eq!(headers["anthropic-version"], "2023-06-01");
    assert_eq!(sent["model"], "claude-3-5-haiku");
    assert_eq!(sent["system"], "Be brief.");
    assert_eq!(sent["max_tokens"], 50);
    assert_eq!(
        sent["messages"],
        json!([{"role": "user", "content": "Say hi."}])
    );

    let streamed = gateway.client("any", &["stream", "claude"]).await;
    assert_eq!(streamed["content"], "claude says hi", "{streamed}");
    assert_eq!(streamed["finish_reason"], "stop");
    assert_eq!(streamed["usage"]["completion_tokens"], 4);
    assert_eq!(claude.last().1["stream"], true);

    let answer = gateway.client("any", &["chat", "local"]).await;
    assert_eq!(answer["content"], "llama says hi", "{answer}");
    assert_eq!(answer["usage"]["total_tokens"], 12);
    let (_, sent) = llama.last();
    assert_eq!(sent["options"]["num_predict"], 50);
    let streamed = gateway.client("any", &["stream", "local"]).await;
    assert_eq!(streamed["content"], "llama says hi", "{streamed}");
    assert_eq!(streamed["usage"]["prompt_tokens"], 9);

    // Anthropic has no embeddings: the OpenAI-compatible deployment of the model takes them.
    let embedded = gateway.client("any", &["embed", "embed"]).await;
    assert_eq!(embedded["embedding"], json!([0.25, 0.5]), "{embedded}");
    assert_eq!(embedder.last().1["model"], "text-embedding-3-small");
    // And completions of a model served only by Anthropic are refused with the reason.
    let refused = gateway.client("any", &["complete", "claude"]).await;
    assert_eq!(refused["status"], 400, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("no deployment serving /v1/completions")
    );
    assert_eq!(
        gateway
            .metric(
                "ailb_tokens_processed_total",
                "model=\"claude\",provider=\"anthropic\",direction=\"completion\""
            )
            .await,
        8.0
    );
}

#[tokio::test]
async fn keys_and_limits() {
    let mock = Mock::start("mock", Shape::OpenAi, Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[module]\n{}\
         [module.models.gpt]\ndeployments = [{{provider = \"main\"}}]\n\
         [module.models.claude]\ndeployments = [{{provider = \"main\"}}]\n\
         [[module.keys]]\nname = \"team-a\"\nkey_env = \"TEAM_A_KEY\"\n\
         [[module.keys]]\nname = \"team-b\"\nkey_env = \"TEAM_B_KEY\"\nmodels = [\"claude\"]\nrpm = 2\n\
         [[module.keys]]\nname = \"thrifty\"\nkey = \"key-thrifty\"\ntpm = 20\n",
        provider("main", "openai", &mock),
    );
    let gateway = Gateway::start(dir.path(), &config).await;

    let chat = r#"{"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}"#;
    let (status, text) = gateway.curl("/v1/chat/completions", &["-d", chat]).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("invalid_api_key"), "{text}");
    let (status, _) = gateway
        .curl(
            "/v1/chat/completions",
            &["-H", "Authorization: Bearer wrong", "-d", chat],
        )
        .await;
    assert_eq!(status, 401);
    let wrong = gateway.client("wrong", &["chat", "gpt"]).await;
    assert_eq!(wrong["error"], "AuthenticationError", "{wrong}");

    let answer = gateway.client("key-a", &["chat", "gpt"]).await;
    assert_eq!(answer["content"], "mock says hi", "{answer}");
    assert_eq!(
        mock.last().0["authorization"],
        "Bearer provider-secret",
        "the provider gets its own key, never the client's"
    );

    // team-b may use claude only, twice a minute.
    let denied = gateway.client("key-b", &["chat", "gpt"]).await;
    assert_eq!(
        (denied["error"].as_str(), denied["status"].as_u64()),
        (Some("PermissionDeniedError"), Some(403)),
        "{denied}"
    );
    let models = gateway.client("key-b", &["models"]).await;
    assert_eq!(models["models"], json!(["claude"]));
    for _ in 0..2 {
        assert_eq!(
            gateway.client("key-b", &["chat", "claude"]).await["content"],
            "mock says hi"
        );
    }
    let (status, text) = gateway
        .curl(
            "/v1/chat/completions",
            &[
                "-H",
                "Authorization: Bearer key-b",
                "-d",
                &chat.replace("gpt", "claude"),
            ],
        )
        .await;
    assert_eq!(status, 429, "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after:"), "{text}");
    assert!(text.contains("requests-per-minute"), "{text}");

    // thrifty has 20 tokens a minute; each answer costs 15: the third request waits.
    for _ in 0..2 {
        assert_eq!(
            gateway.client("key-thrifty", &["chat", "gpt"]).await["content"],
            "mock says hi"
        );
    }
    let limited = gateway.client("key-thrifty", &["chat", "gpt"]).await;
    assert_eq!(limited["error"], "RateLimitError", "{limited}");
    assert!(
        limited["message"]
            .as_str()
            .unwrap()
            .contains("tokens-per-minute"),
        "{limited}"
    );
    assert_eq!(
        gateway
            .metric("ailb_key_limited_total", "key=\"thrifty\",limit=\"tpm\"")
            .await,
        1.0
    );
    assert_eq!(
        gateway
            .metric("ailb_key_limited_total", "key=\"team-b\",limit=\"rpm\"")
            .await,
        1.0
    );

    // Unknown models and bad bodies get OpenAI-shaped errors.
    let unknown = gateway.client("key-a", &["chat", "nope"]).await;
    assert_eq!(unknown["status"], 404, "{unknown}");
    let (status, text) = gateway
        .curl(
            "/v1/chat/completions",
            &["-H", "Authorization: Bearer key-a", "-d", "not json"],
        )
        .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("invalid_request_error"), "{text}");
    let (status, text) = gateway.curl("/health", &[]).await;
    assert_eq!(status, 200, "{text}");
}

#[tokio::test]
async fn timeouts_and_provider_refusals() {
    let hanging = Mock::start("hanging", Shape::OpenAi, Mode::Hang).await;
    let stalling = Mock::start("stalling", Shape::OpenAi, Mode::StallStream).await;
    let wrong_key = Mock::start("wrong-key", Shape::OpenAi, Mode::WrongKey).await;
    let backup = Mock::start("backup", Shape::OpenAi, Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[module]\nrequest_timeout_ms = 1500\nstream_idle_timeout_ms = 500\n{}{}{}{}\
         [module.models.slow]\ndeployments = [{{provider = \"hanging\"}}]\n\
         [module.models.stalled]\ndeployments = [{{provider = \"stalling\"}}]\n\
         [module.models.guarded]\ndeployments = [{{provider = \"wrong-key\", weight = 1000000}}, {{provider = \"backup\", weight = 1}}]\n",
        provider("hanging", "openai", &hanging),
        provider("stalling", "openai", &stalling),
        provider("wrong-key", "openai", &wrong_key),
        provider("backup", "openai", &backup),
    );
    let gateway = Gateway::start(dir.path(), &config).await;

    // A provider that never answers: 504 at the request timeout, not a hang.
    let slow = gateway.client("any", &["chat", "slow"]).await;
    assert_eq!(slow["status"], 504, "{slow}");
    assert!(
        slow["message"]
            .as_str()
            .unwrap()
            .contains("no answer in time"),
        "{slow}"
    );

    // A stream that goes silent after it began: an error event after the idle timeout.
    let stalled = gateway.client("any", &["stream", "stalled"]).await;
    assert_eq!(stalled["content"], "stalling ", "{stalled}");
    assert!(
        stalled["message"].as_str().unwrap().contains("(timeout)"),
        "{stalled}"
    );

    // A provider refusing the gateway's own key is a deployment failure, not the client's
    // problem: the request moves on, and the provider's text (which echoes the key) stays out.
    let guarded = gateway.client("any", &["chat", "guarded"]).await;
    assert_eq!(guarded["content"], "backup says hi", "{guarded}");
    assert_eq!(wrong_key.requests(), 1);
    wrong_key.set(Mode::WrongKey);
    backup.set(Mode::Fail);
    let failed = gateway.client("any", &["chat", "guarded"]).await;
    assert_eq!(failed["status"], 502, "{failed}");
    let message = failed["message"].as_str().unwrap();
    assert!(
        !message.contains("sk-"),
        "the provider's key stays hidden: {message}"
    );
    assert!(
        message.contains("refused the gateway's credentials"),
        "{message}"
    );
    assert!(
        gateway
            .metric(
                "ailb_provider_errors_total",
                "provider=\"wrong-key\",reason=\"refused\""
            )
            .await
            >= 1.0
    );
}
