//! OpenAI-compatible providers: the client's body goes through with the provider's model name,
//! and answers come back unchanged. For streams the gateway asks for the usage chunk (it needs
//! the token counts) and drops that chunk again when the client did not ask for it.

use bytes::Bytes;
use serde_json::{Value, json};

use super::{Answer, Ask, SseReader, Translator, Usage, sse};

/// The client's body with the provider's model name; `stream_usage` asks for the usage chunk
/// of a stream when the client did not.
pub fn request(ask: &Ask, model: &str, stream_usage: bool) -> Value {
    let mut body = ask.body.clone();
    let Some(fields) = body.as_object_mut() else {
        return body;
    };
    fields.insert("model".into(), model.into());
    if ask.stream && stream_usage && !ask.include_usage {
        match fields.get_mut("stream_options") {
            Some(Value::Object(options)) => {
                options.insert("include_usage".into(), true.into());
            }
            _ => {
                fields.insert("stream_options".into(), json!({"include_usage": true}));
            }
        }
    }
    body
}

fn usage(value: &Value) -> Option<Usage> {
    let usage = value.get("usage").filter(|u| u.is_object())?;
    let prompt = usage["prompt_tokens"].as_u64().unwrap_or(0);
    let completion = usage["completion_tokens"]
        .as_u64()
        .or_else(|| {
            usage["total_tokens"]
                .as_u64()
                .map(|t| t.saturating_sub(prompt))
        })
        .unwrap_or(0);
    Some(Usage { prompt, completion })
}

fn generated_chars(value: &Value) -> usize {
    value["choices"]
        .as_array()
        .map(|choices| {
            choices
                .iter()
                .map(|c| {
                    [&c["message"]["content"], &c["delta"]["content"], &c["text"]]
                        .iter()
                        .filter_map(|t| t.as_str())
                        .map(|t| t.chars().count())
                        .sum::<usize>()
                })
                .sum()
        })
        .unwrap_or(0)
}

pub fn answer(ask: &Ask, body: &[u8]) -> Result<Answer, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the answer is not JSON: {e}"))?;
    if !value.is_object() {
        return Err("the answer is not a JSON object".into());
    }
    let usage = usage(&value)
        .unwrap_or_else(|| Usage::estimate(ask.prompt_chars(), generated_chars(&value)));
    Ok(Answer {
        body: Bytes::copy_from_slice(body),
        usage,
    })
}

/// Passes events through as they come, noting usage and content.
pub struct Stream {
    reader: SseReader,
    strip_usage: bool,
    usage: Option<Usage>,
    generated: usize,
    done: bool,
    failed: bool,
    /// A choice carried a `finish_reason`: the answer is whole.
    finished: bool,
}

impl Stream {
    pub fn new(ask: &Ask) -> Stream {
        Stream {
            reader: SseReader::default(),
            strip_usage: !ask.include_usage,
            usage: None,
            generated: 0,
            done: false,
            failed: false,
            finished: false,
        }
    }
}

impl Translator for Stream {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<Bytes>) -> Result<(), String> {
        for (_, data) in self.reader.feed(bytes)? {
            if data == "[DONE]" {
                self.done = true;
                out.push(sse(&data));
                continue;
            }
            let Ok(value) = serde_json::from_str::<Value>(&data) else {
                out.push(sse(&data));
                continue;
            };
            if value["error"].is_object() {
                self.done = true;
                self.failed = true;
                out.push(sse(&data));
                continue;
            }
            self.generated += generated_chars(&value);
            self.finished |= value["choices"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| !c["finish_reason"].is_null()));
            if let Some(usage) = usage(&value) {
                self.usage = Some(usage);
                let usage_only = value["choices"].as_array().is_none_or(|c| c.is_empty());
                if self.strip_usage && usage_only {
                    continue;
                }
                if self.strip_usage {
                    let mut trimmed = value;
                    trimmed["usage"] = json!(null);
                    out.push(sse(&trimmed.to_string()));
                    continue;
                }
            }
            out.push(sse(&data));
        }
        Ok(())
    }

    fn complete(&self) -> bool {
        self.done
    }

    fn finished(&self) -> bool {
        !self.failed && (self.done || self.finished)
    }

    fn failed(&self) -> bool {
        self.failed
    }

    fn content_started(&self) -> bool {
        self.generated > 0
    }

    fn usage(&self, prompt_chars: usize) -> Usage {
        self.usage
            .unwrap_or_else(|| Usage::estimate(prompt_chars, self.generated))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Endpoint;

    #[test]
    fn the_usage_chunk_asked_for_by_the_gateway_is_dropped() {
        let ask = Ask::new(
            Endpoint::Chat,
            json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        );
        assert_eq!(
            request(&ask, "real", true)["stream_options"]["include_usage"],
            true
        );
        assert_eq!(request(&ask, "real", true)["model"], "real");
        assert!(request(&ask, "real", false).get("stream_options").is_none());
        let odd = Ask::new(
            Endpoint::Chat,
            json!({"stream": true, "stream_options": "x"}),
        );
        assert_eq!(
            request(&odd, "real", true)["stream_options"],
            json!({"include_usage": true})
        );
        let mut stream = Stream::new(&ask);
        let mut out = Vec::new();
        stream
            .feed(
                b"data: {\"choices\":[{\"delta\":{\"content\":\"Hello\"}}]}\n\n\
                  data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n",
                &mut out,
            )
            .unwrap();
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(stream.complete() && stream.content_started());
        assert_eq!(
            stream.usage(0),
            Usage {
                prompt: 3,
                completion: 1
            }
        );
    }
}
