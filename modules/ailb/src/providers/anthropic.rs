//! Anthropic's Messages API behind OpenAI's chat completions: system messages become `system`,
//! text and image parts become content blocks, `max_tokens` (required there) defaults to 4096,
//! `stop` becomes `stop_sequences`; answers and stream events come back as OpenAI's. Tool calls
//! are not translated: such requests are refused with a message saying so.

use bytes::Bytes;
use serde_json::{Value, json};

use super::{
    Answer, Ask, SseReader, Translator, Usage, chunk, completion, error_event, sse, usage_chunk,
};

/// The `anthropic-version` header sent.
pub const VERSION: &str = "2023-06-01";
const DEFAULT_MAX_TOKENS: u64 = 4096;

fn text_of(content: &Value) -> Result<String, String> {
    match content {
        Value::String(text) => Ok(text.clone()),
        Value::Array(parts) => Ok(parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n")),
        Value::Null => Ok(String::new()),
        _ => Err("a message's content must be a string or an array of parts".into()),
    }
}

fn content_of(content: &Value) -> Result<Value, String> {
    let Value::Array(parts) = content else {
        return text_of(content).map(Value::String);
    };
    parts
        .iter()
        .map(|part| match part["type"].as_str() {
            Some("text") => Ok(json!({"type": "text", "text": part["text"]})),
            Some("image_url") => {
                let url = part["image_url"]["url"]
                    .as_str()
                    .or_else(|| part["image_url"].as_str())
                    .ok_or("an image_url part needs a url")?;
                Ok(match url.strip_prefix("data:").and_then(|d| d.split_once(";base64,")) {
                    Some((media_type, data)) => json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}),
                    None => json!({"type": "image", "source": {"type": "url", "url": url}}),
                })
            }
            other => Err(format!(
                "content parts of type {} are not translated for Anthropic providers",
                other.unwrap_or("(none)")
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

pub fn request(ask: &Ask, model: &str) -> Result<Value, String> {
    let body = &ask.body;
    if body.get("tools").is_some_and(|t| !t.is_null()) {
        return Err("tools are not translated for Anthropic providers; use an OpenAI-compatible deployment for tool calls".into());
    }
    let messages = body["messages"]
        .as_array()
        .ok_or("`messages` must be an array")?;
    let (mut system, mut turns) = (Vec::new(), Vec::new());
    for message in messages {
        match message["role"].as_str() {
            Some("system" | "developer") => system.push(text_of(&message["content"])?),
            Some(role @ ("user" | "assistant")) => {
                if message.get("tool_calls").is_some_and(|t| !t.is_null()) {
                    return Err("tool calls are not translated for Anthropic providers".into());
                }
                turns.push(json!({"role": role, "content": content_of(&message["content"])?}));
            }
            other => {
                return Err(format!(
                    "messages with role {} are not translated for Anthropic providers",
                    other.unwrap_or("(none)")
                ));
            }
        }
    }
    let max_tokens = body["max_completion_tokens"]
        .as_u64()
        .or_else(|| body["max_tokens"].as_u64())
        .unwrap_or(DEFAULT_MAX_TOKENS);
    let mut out = json!({"model": model, "messages": turns, "max_tokens": max_tokens});
    if !system.is_empty() {
        out["system"] = system.join("\n\n").into();
    }
    for field in ["temperature", "top_p"] {
        if let Some(value) = body.get(field).filter(|v| !v.is_null()) {
            out[field] = value.clone();
        }
    }
    match &body["stop"] {
        Value::String(stop) => out["stop_sequences"] = json!([stop]),
        Value::Array(stops) => out["stop_sequences"] = Value::Array(stops.clone()),
        _ => {}
    }
    if let Some(user) = body["user"].as_str() {
        out["metadata"] = json!({"user_id": user});
    }
    if ask.stream {
        out["stream"] = true.into();
    }
    Ok(out)
}

/// Prompt tokens: the uncached input plus what was read from or written to the prompt cache.
fn input_tokens(usage: &Value) -> u64 {
    [
        "input_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
    ]
    .iter()
    .filter_map(|field| usage[*field].as_u64())
    .fold(0, u64::saturating_add)
}

fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

pub fn answer(body: &[u8]) -> Result<Answer, String> {
    let message: Value =
        serde_json::from_slice(body).map_err(|e| format!("the answer is not JSON: {e}"))?;
    let blocks = message["content"]
        .as_array()
        .ok_or("the answer has no content array")?;
    let text: String = blocks.iter().filter_map(|b| b["text"].as_str()).collect();
    let usage = Usage {
        prompt: input_tokens(&message["usage"]),
        completion: message["usage"]["output_tokens"].as_u64().unwrap_or(0),
    };
    let ask = Ask::new(super::Endpoint::Chat, Value::Null);
    let id = message["id"].as_str().unwrap_or("msg");
    let model = message["model"].as_str().unwrap_or_default();
    Ok(Answer {
        body: completion(
            &ask,
            id,
            model,
            &text,
            finish_reason(message["stop_reason"].as_str()),
            usage,
        ),
        usage,
    })
}

/// Anthropic's stream events as OpenAI chunks.
pub struct Stream {
    reader: SseReader,
    ask: Ask,
    id: String,
    model: String,
    usage: Usage,
    generated: usize,
    finish: &'static str,
    done: bool,
    failed: bool,
}

impl Stream {
    pub fn new(ask: &Ask, model: &str) -> Stream {
        Stream {
            reader: SseReader::default(),
            ask: ask.clone(),
            id: "msg".into(),
            model: model.to_owned(),
            usage: Usage::default(),
            generated: 0,
            finish: "stop",
            done: false,
            failed: false,
        }
    }
}

impl Translator for Stream {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<Bytes>) -> Result<(), String> {
        for (name, data) in self.reader.feed(bytes)? {
            if self.done {
                break;
            }
            let event: Value = serde_json::from_str(&data)
                .map_err(|e| format!("a stream event is not JSON: {e}"))?;
            let kind = event["type"].as_str().unwrap_or(&name).to_owned();
            match kind.as_str() {
                "message_start" => {
                    let message = &event["message"];
                    if let Some(id) = message["id"].as_str() {
                        self.id = id.to_owned();
                    }
                    if let Some(model) = message["model"].as_str() {
                        self.model = model.to_owned();
                    }
                    self.usage.prompt = input_tokens(&message["usage"]);
                    out.push(chunk(
                        &self.ask,
                        &self.id,
                        &self.model,
                        true,
                        Some(""),
                        None,
                    ));
                }
                "content_block_start" | "content_block_delta" => {
                    let text = event["delta"]["text"]
                        .as_str()
                        .or_else(|| event["content_block"]["text"].as_str())
                        .unwrap_or_default();
                    if !text.is_empty() {
                        self.generated += text.chars().count();
                        out.push(chunk(
                            &self.ask,
                            &self.id,
                            &self.model,
                            false,
                            Some(text),
                            None,
                        ));
                    }
                }
                "message_delta" => {
                    if let Some(reason) = event["delta"]["stop_reason"].as_str() {
                        self.finish = finish_reason(Some(reason));
                    }
                    if let Some(tokens) = event["usage"]["output_tokens"].as_u64() {
                        self.usage.completion = tokens;
                    }
                }
                "message_stop" => {
                    self.done = true;
                    out.push(chunk(
                        &self.ask,
                        &self.id,
                        &self.model,
                        false,
                        None,
                        Some(self.finish),
                    ));
                    if self.ask.include_usage {
                        out.push(usage_chunk(&self.ask, &self.id, &self.model, self.usage(0)));
                    }
                    out.push(sse("[DONE]"));
                }
                "error" => {
                    self.done = true;
                    self.failed = true;
                    let message = event["error"]["message"].as_str().unwrap_or("stream error");
                    let kind = event["error"]["type"].as_str().unwrap_or("api_error");
                    out.push(error_event(
                        &format!("the Anthropic provider failed mid-stream: {message}"),
                        kind,
                        None,
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn complete(&self) -> bool {
        self.done
    }

    fn failed(&self) -> bool {
        self.failed
    }

    fn content_started(&self) -> bool {
        self.generated > 0
    }

    fn usage(&self, prompt_chars: usize) -> Usage {
        let mut usage = self.usage;
        if usage.prompt == 0 {
            usage.prompt = Usage::estimate(prompt_chars, 0).prompt;
        }
        if usage.completion == 0 {
            usage.completion = Usage::estimate(0, self.generated).completion;
        }
        usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Endpoint;

    #[test]
    fn chat_requests_become_messages() {
        let ask = Ask::new(
            Endpoint::Chat,
            json!({"model": "c", "stop": "END", "temperature": 0.5, "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
            ]}),
        );
        let out = request(&ask, "claude-x").unwrap();
        assert_eq!(out["system"], "Be brief.");
        assert_eq!(out["max_tokens"], 4096);
        assert_eq!(out["stop_sequences"], json!(["END"]));
        assert_eq!(
            out["messages"][0]["content"][1]["source"]["media_type"],
            "image/png"
        );
        let tools = Ask::new(Endpoint::Chat, json!({"messages": [], "tools": [{}]}));
        assert!(request(&tools, "c").unwrap_err().contains("tools"));
    }

    #[test]
    fn answers_become_chat_completions() {
        let body = br#"{"id":"msg_1","type":"message","model":"claude-x","content":[{"type":"text","text":"Hi"}],"stop_reason":"max_tokens","usage":{"input_tokens":7,"output_tokens":2}}"#;
        let answer = answer(body).unwrap();
        let value: Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(value["choices"][0]["message"]["content"], "Hi");
        assert_eq!(value["choices"][0]["finish_reason"], "length");
        assert_eq!(value["usage"]["total_tokens"], 9);
    }

    #[test]
    fn stream_events_become_chunks() {
        let ask = Ask::new(
            Endpoint::Chat,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        );
        let mut stream = Stream::new(&ask, "claude-x");
        let mut out = Vec::new();
        stream.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m1\",\"model\":\"claude-x\",\"usage\":{\"input_tokens\":5}}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n", &mut out).unwrap();
        let text: Vec<String> = out
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        assert_eq!(text.len(), 5, "{text:?}");
        assert!(text[1].contains("\"content\":\"Hel\""));
        assert!(text[2].contains("\"finish_reason\":\"stop\""));
        assert!(text[3].contains("\"total_tokens\":7"));
        assert_eq!(text[4], "data: [DONE]\n\n");
        assert!(stream.complete());
    }
}
