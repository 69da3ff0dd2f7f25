//! Ollama's native API behind OpenAI's: chat to `/api/chat`, completions to `/api/generate`,
//! embeddings to `/api/embed`; sampling settings go into `options`. Streams are
//! newline-delimited JSON there and become OpenAI's server-sent events here.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::{
    Answer, Ask, Endpoint, LineReader, Translator, Usage, answer_id, chunk, completion,
    error_event, sse, usage_chunk,
};

fn options(body: &Value) -> Map<String, Value> {
    let mut options = Map::new();
    for (ours, theirs) in [
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("seed", "seed"),
        ("max_tokens", "num_predict"),
        ("max_completion_tokens", "num_predict"),
        ("presence_penalty", "presence_penalty"),
        ("frequency_penalty", "frequency_penalty"),
    ] {
        if let Some(value) = body.get(ours).filter(|v| !v.is_null()) {
            options.insert(theirs.into(), value.clone());
        }
    }
    match &body["stop"] {
        Value::String(stop) => {
            options.insert("stop".into(), json!([stop]));
        }
        Value::Array(stops) => {
            options.insert("stop".into(), Value::Array(stops.clone()));
        }
        _ => {}
    }
    options
}

fn message(message: &Value) -> Result<Value, String> {
    let role = message["role"].as_str().unwrap_or("user");
    let (mut text, mut images) = (Vec::new(), Vec::new());
    match &message["content"] {
        Value::String(content) => text.push(content.clone()),
        Value::Array(parts) => {
            for part in parts {
                match part["type"].as_str() {
                    Some("text") => text.push(part["text"].as_str().unwrap_or_default().to_owned()),
                    Some("image_url") => {
                        let url = part["image_url"]["url"].as_str().unwrap_or_default();
                        let data = url
                            .split_once(";base64,")
                            .map(|(_, data)| data)
                            .ok_or("Ollama providers take images as data: URLs only")?;
                        images.push(Value::String(data.to_owned()));
                    }
                    other => {
                        return Err(format!(
                            "content parts of type {} are not translated for Ollama providers",
                            other.unwrap_or("(none)")
                        ));
                    }
                }
            }
        }
        _ => {}
    }
    let mut out = json!({"role": role, "content": text.join("\n")});
    if !images.is_empty() {
        out["images"] = Value::Array(images);
    }
    Ok(out)
}

/// The path and body for `ask`.
pub fn request(ask: &Ask, model: &str) -> Result<(&'static str, Value), String> {
    let body = &ask.body;
    Ok(match ask.endpoint {
        Endpoint::Chat => {
            let messages = body["messages"]
                .as_array()
                .ok_or("`messages` must be an array")?
                .iter()
                .map(message)
                .collect::<Result<Vec<_>, _>>()?;
            (
                "/api/chat",
                json!({"model": model, "messages": messages, "stream": ask.stream, "options": options(body)}),
            )
        }
        Endpoint::Completions => {
            let prompt = match &body["prompt"] {
                Value::String(prompt) => prompt.clone(),
                Value::Array(prompts) if prompts.len() == 1 => {
                    prompts[0].as_str().unwrap_or_default().to_owned()
                }
                _ => return Err("Ollama providers take one prompt, as a string".into()),
            };
            (
                "/api/generate",
                json!({"model": model, "prompt": prompt, "stream": ask.stream, "options": options(body)}),
            )
        }
        Endpoint::Embeddings => (
            "/api/embed",
            json!({"model": model, "input": body["input"]}),
        ),
    })
}

fn text_of(value: &Value) -> &str {
    value["message"]["content"]
        .as_str()
        .or_else(|| value["response"].as_str())
        .unwrap_or_default()
}

fn finish_reason(value: &Value) -> &'static str {
    match value["done_reason"].as_str() {
        Some("length") => "length",
        _ => "stop",
    }
}

fn usage(value: &Value) -> Usage {
    Usage {
        prompt: value["prompt_eval_count"].as_u64().unwrap_or(0),
        completion: value["eval_count"].as_u64().unwrap_or(0),
    }
}

pub fn answer(ask: &Ask, body: &[u8]) -> Result<Answer, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the answer is not JSON: {e}"))?;
    let model = value["model"].as_str().unwrap_or_default();
    let id = answer_id();
    if ask.endpoint == Endpoint::Embeddings {
        let embeddings = value["embeddings"]
            .as_array()
            .ok_or("the answer has no embeddings")?;
        let data: Vec<Value> = embeddings
            .iter()
            .enumerate()
            .map(|(index, e)| json!({"object": "embedding", "index": index, "embedding": e}))
            .collect();
        let prompt = value["prompt_eval_count"]
            .as_u64()
            .unwrap_or_else(|| Usage::estimate(ask.prompt_chars(), 0).prompt);
        let usage = Usage {
            prompt,
            completion: 0,
        };
        let body = json!({"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt}});
        return Ok(Answer {
            body: Bytes::from(body.to_string()),
            usage,
        });
    }
    let text = text_of(&value);
    let mut usage = usage(&value);
    if usage.total() == 0 {
        usage = Usage::estimate(ask.prompt_chars(), text.chars().count());
    }
    Ok(Answer {
        body: completion(ask, &id, model, text, finish_reason(&value), usage),
        usage,
    })
}

/// Ollama's JSON lines as OpenAI chunks.
pub struct Stream {
    reader: LineReader,
    ask: Ask,
    id: String,
    model: String,
    usage: Usage,
    generated: usize,
    started: bool,
    done: bool,
    failed: bool,
}

impl Stream {
    pub fn new(ask: &Ask, model: &str) -> Stream {
        Stream {
            reader: LineReader::default(),
            ask: ask.clone(),
            id: answer_id(),
            model: model.to_owned(),
            usage: Usage::default(),
            generated: 0,
            started: false,
            done: false,
            failed: false,
        }
    }
}

impl Translator for Stream {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<Bytes>) -> Result<(), String> {
        for line in self.reader.feed(bytes)? {
            if self.done {
                break;
            }
            let value: Value = serde_json::from_str(&line)
                .map_err(|e| format!("a stream line is not JSON: {e}"))?;
            if let Some(error) = value["error"].as_str() {
                self.done = true;
                self.failed = true;
                out.push(error_event(
                    &format!("the Ollama provider failed mid-stream: {error}"),
                    "api_error",
                    None,
                ));
                continue;
            }
            let text = text_of(&value);
            if !text.is_empty() || !self.started {
                self.generated += text.chars().count();
                out.push(chunk(
                    &self.ask,
                    &self.id,
                    &self.model,
                    !self.started,
                    Some(text),
                    None,
                ));
                self.started = true;
            }
            if value["done"].as_bool() == Some(true) {
                self.done = true;
                self.usage = usage(&value);
                out.push(chunk(
                    &self.ask,
                    &self.id,
                    &self.model,
                    false,
                    None,
                    Some(finish_reason(&value)),
                ));
                if self.ask.include_usage {
                    out.push(usage_chunk(
                        &self.ask,
                        &self.id,
                        &self.model,
                        self.usage(self.ask.prompt_chars()),
                    ));
                }
                out.push(sse("[DONE]"));
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
        if self.usage.total() > 0 {
            return self.usage;
        }
        Usage::estimate(prompt_chars, self.generated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_goes_to_api_chat_with_options() {
        let ask = Ask::new(
            Endpoint::Chat,
            json!({"model": "m", "max_tokens": 9, "stop": "x", "messages": [{"role": "user", "content": "hi"}]}),
        );
        let (path, body) = request(&ask, "llama3").unwrap();
        assert_eq!(path, "/api/chat");
        assert_eq!(body["options"]["num_predict"], 9);
        assert_eq!(body["options"]["stop"], json!(["x"]));
        assert_eq!(body["stream"], false);
    }

    #[test]
    fn streamed_lines_become_chunks() {
        let ask = Ask::new(Endpoint::Chat, json!({"stream": true}));
        let mut stream = Stream::new(&ask, "llama3");
        let mut out = Vec::new();
        stream
            .feed(
                b"{\"message\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"done\":false}\n\
                  {\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true,\"done_reason\":\"stop\",\"prompt_eval_count\":4,\"eval_count\":1}\n",
                &mut out,
            )
            .unwrap();
        assert_eq!(out.len(), 3);
        assert!(stream.complete());
        assert_eq!(
            stream.usage(0),
            Usage {
                prompt: 4,
                completion: 1
            }
        );
    }
}
