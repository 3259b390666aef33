//! OpenAI chat completions, and every OpenAI-compatible service through `base_url` (Groq,
//! Mistral, DeepSeek, Together, OpenRouter, vLLM, Ollama, …), non-streaming and streaming.

use super::transport::{Endpoint, Transport};
use super::{Answer, EXCERPT_BYTES, send};
use futures::StreamExt;
use reqwest::header::HeaderMap;
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::sse::SseParser;
use super::{
    Call, Completion, ErrorClass, ProviderError, chat_completion, excerpt, finish,
    parse_go_duration, retry_after_from_headers,
};
use crate::config::MaxTokensField;
use crate::messages::{ChatRequest, Usage};

/// Wire-format name used in errors and attempts.
pub const PROVIDER_TYPE: &str = "openai";

/// Request fields a strict service (Mistral) accepts; everything else is dropped for it.
const STRICT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "stream_options",
    "response_format",
    "tools",
    "tool_choice",
    "random_seed",
    "presence_penalty",
    "frequency_penalty",
    "safe_prompt",
];

/// Where compatible services differ.
#[derive(Debug, Clone, Copy)]
pub struct OpenAiOptions {
    pub max_tokens_field: MaxTokensField,
    /// Send only standard fields and no nulls.
    pub strict_fields: bool,
}

/// A client for one OpenAI-compatible base URL.
#[derive(Debug)]
pub struct OpenAiProvider {
    http: Transport,
    /// `{base_url}/chat/completions` (`base_url` is `…/v1`), as the official SDK builds it.
    endpoint: Endpoint,
    options: OpenAiOptions,
}

#[derive(Deserialize)]
struct OpenAiResponse {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    choices: Vec<OpenAiChoice>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
    /// A 200 that carries an error (some gateways answer so); anything but null is refused.
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct OpenAiChoice {
    #[serde(default)]
    message: Option<OpenAiMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct OpenAiMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Value>,
}

#[derive(Deserialize, Clone)]
struct OpenAiUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<OpenAiPromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<OpenAiCompletionDetails>,
    /// DeepSeek's cache accounting.
    #[serde(default)]
    prompt_cache_hit_tokens: Option<u64>,
}

#[derive(Deserialize, Clone)]
struct OpenAiPromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    cache_write_tokens: Option<u64>,
}

#[derive(Deserialize, Clone)]
struct OpenAiCompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl From<OpenAiUsage> for Usage {
    fn from(usage: OpenAiUsage) -> Self {
        let prompt = usage.prompt_tokens_details.as_ref();
        let reasoning = usage
            .completion_tokens_details
            .as_ref()
            .and_then(|c| c.reasoning_tokens)
            .unwrap_or(0);
        // xAI reports reasoning outside `completion_tokens` but inside `total_tokens`.
        let reasoning_outside = reasoning > 0
            && usage.total_tokens
                == Some(usage.prompt_tokens + usage.completion_tokens + reasoning);
        Usage {
            input_tokens: usage.prompt_tokens,
            cached_input_tokens: prompt
                .and_then(|p| p.cached_tokens)
                .or(usage.prompt_cache_hit_tokens)
                .unwrap_or(0),
            cache_write_tokens: prompt.and_then(|p| p.cache_write_tokens).unwrap_or(0),
            output_tokens: usage.completion_tokens + if reasoning_outside { reasoning } else { 0 },
            reasoning_tokens: reasoning,
        }
    }
}

/// The canonical finish reason for an OpenAI-style value.
fn canonical_finish(native: Option<&str>, has_tool_calls: bool, refused: bool) -> &'static str {
    match native {
        _ if refused => finish::CONTENT_FILTER,
        Some("stop") => finish::STOP,
        Some("length") => finish::LENGTH,
        Some("tool_calls" | "function_call") => finish::TOOL_CALLS,
        Some("content_filter") => finish::CONTENT_FILTER,
        // xAI may send "" with tool calls.
        _ if has_tool_calls => finish::TOOL_CALLS,
        _ => finish::OTHER,
    }
}

impl OpenAiProvider {
    pub fn new(http: impl Into<Transport>, base_url: String, options: OpenAiOptions) -> Self {
        Self {
            http: http.into(),
            endpoint: Endpoint::under(&base_url, "/chat/completions"),
            options,
        }
    }

    /// The JSON body sent for `request` on `model`.
    fn body(
        &self,
        request: &ChatRequest,
        model: &str,
        stream: bool,
    ) -> Result<Value, ProviderError> {
        let mut body = serde_json::to_value(request).map_err(|e| {
            ProviderError::new(
                PROVIDER_TYPE,
                ErrorClass::InvalidRequest,
                format!("cannot encode request: {e}"),
            )
        })?;
        let Some(object) = body.as_object_mut() else {
            return Err(ProviderError::new(
                PROVIDER_TYPE,
                ErrorClass::InvalidRequest,
                "request is not an object",
            ));
        };
        object.insert("model".to_owned(), Value::from(model));
        let cap = object
            .remove("max_completion_tokens")
            .filter(|v| !v.is_null())
            .or_else(|| object.remove("max_tokens"));
        object.remove("max_tokens");
        if let Some(cap) = cap.filter(|v| !v.is_null()) {
            let field = match self.options.max_tokens_field {
                MaxTokensField::MaxCompletionTokens => "max_completion_tokens",
                MaxTokensField::MaxTokens => "max_tokens",
            };
            object.insert(field.to_owned(), cap);
        }
        object.remove("stream_options");
        if stream {
            object.insert("stream".to_owned(), Value::Bool(true));
            object.insert(
                "stream_options".to_owned(),
                serde_json::json!({ "include_usage": true }),
            );
        } else {
            object.remove("stream");
        }
        if self.options.strict_fields {
            object.retain(|key, _| STRICT_FIELDS.contains(&key.as_str()));
            if let Some(Value::Array(messages)) = object.get_mut("messages") {
                for message in messages.iter_mut().filter_map(Value::as_object_mut) {
                    message.remove("name");
                }
            }
            strip_nulls(&mut body);
        }
        Ok(body)
    }

    /// One chat completion, streamed when the call has a delta receiver.
    pub async fn complete(
        &self,
        request: &ChatRequest,
        model: &str,
        call: &Call<'_>,
    ) -> Result<Completion, ProviderError> {
        let key = call.require_key(PROVIDER_TYPE)?;
        let body = self.body(request, model, call.streaming())?;
        let http = self.http.lease();
        let builder = self
            .endpoint
            .post(&http)
            .bearer_auth(key.secret.expose_secret())
            .json(&body);
        // The builder holds the serialized bytes: the body is not kept while the call is out.
        drop(body);
        match send(builder, call, PROVIDER_TYPE, handle_openai_error).await? {
            Answer::Stream(response) => read_openai_stream(response, model, call).await,
            Answer::Body(text) => parse_openai_response(&text, model),
        }
    }
}

fn strip_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

fn malformed(text: &str, reason: String) -> ProviderError {
    ProviderError::malformed(PROVIDER_TYPE, text, reason)
}

/// Parses a 2xx body into a normalised completion; an unusable body is a server error.
pub(crate) fn parse_openai_response(text: &str, model: &str) -> Result<Completion, ProviderError> {
    let text_json = text.trim_start();
    // One pass into the typed shape; only a body that does not fit it is parsed again as a
    // plain value, to say precisely what is wrong with it.
    let parsed: OpenAiResponse = match serde_json::from_str(text_json) {
        Ok(parsed) => parsed,
        Err(error) => {
            let value: Value = serde_json::from_str(text_json)
                .map_err(|e| malformed(text, format!("response body is not JSON: {e}")))?;
            if let Some(carried) = value.get("error").filter(|e| !e.is_null()) {
                return Err(malformed(
                    text,
                    format!("200 response carries an error: {carried}"),
                ));
            }
            return Err(malformed(
                text,
                format!("response is not a chat.completion: {error}"),
            ));
        }
    };
    if let Some(error) = parsed.error.as_ref().filter(|e| !e.is_null()) {
        return Err(malformed(
            text,
            format!("200 response carries an error: {error}"),
        ));
    }
    let Some(choice) = parsed.choices.into_iter().next() else {
        return Err(malformed(text, "response has no choices".to_owned()));
    };
    let usage = parsed.usage.map(Usage::from).unwrap_or_default();
    let message = choice.message.unwrap_or(OpenAiMessage {
        content: None,
        refusal: None,
        tool_calls: None,
    });
    let tool_calls = message
        .tool_calls
        .filter(|c| c.as_array().is_some_and(|a| !a.is_empty()));
    let refused = message.content.is_none() && message.refusal.is_some();
    let native = choice.finish_reason.as_deref();
    let finish_reason = canonical_finish(native, tool_calls.is_some(), refused);
    let text = message.content.or(message.refusal);
    let response = chat_completion(
        parsed.id.as_deref().unwrap_or("chatcmpl"),
        parsed.model.as_deref().unwrap_or(model),
        text.as_deref(),
        tool_calls,
        finish_reason,
        native,
        &usage,
    );
    Ok(Completion { response, usage })
}

/// Tool-call fragments of a stream, merged by index.
#[derive(Default)]
struct ToolCallParts {
    calls: Vec<Map<String, Value>>,
}

impl ToolCallParts {
    fn add(&mut self, deltas: &[Value]) {
        for delta in deltas {
            let index = delta.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
            if index >= 64 {
                continue;
            }
            while self.calls.len() <= index {
                let mut call = Map::new();
                call.insert("type".to_owned(), Value::from("function"));
                call.insert(
                    "function".to_owned(),
                    serde_json::json!({ "name": "", "arguments": "" }),
                );
                self.calls.push(call);
            }
            let call = &mut self.calls[index];
            if let Some(id) = delta.get("id").and_then(Value::as_str) {
                call.insert("id".to_owned(), Value::from(id));
            }
            if let Some(function) = delta.get("function")
                && let Some(Value::Object(target)) = call.get_mut("function")
            {
                for field in ["name", "arguments"] {
                    if let Some(part) = function.get(field).and_then(Value::as_str) {
                        let joined = format!(
                            "{}{part}",
                            target.get(field).and_then(Value::as_str).unwrap_or("")
                        );
                        target.insert(field.to_owned(), Value::from(joined));
                    }
                }
            }
        }
    }

    fn into_value(self) -> Option<Value> {
        (!self.calls.is_empty())
            .then(|| Value::Array(self.calls.into_iter().map(Value::Object).collect()))
    }
}

/// Reads an SSE chat-completions stream. EOF before `[DONE]`, an `error` chunk after HTTP 200,
/// or silence longer than the idle timeout is a failed attempt, never a partial success.
async fn read_openai_stream(
    response: reqwest::Response,
    model: &str,
    call: &Call<'_>,
) -> Result<Completion, ProviderError> {
    let mut bytes = response.bytes_stream();
    let mut parser = SseParser::new();
    let mut text = String::new();
    let mut tools = ToolCallParts::default();
    let mut native_finish: Option<String> = None;
    let mut usage: Option<Usage> = None;
    let mut id: Option<String> = None;
    let mut response_model: Option<String> = None;
    let interrupted = |usage: Option<Usage>, message: String| ProviderError {
        usage,
        ..ProviderError::new(PROVIDER_TYPE, ErrorClass::StreamInterrupted, message)
    };
    loop {
        let next = tokio::time::timeout(call.idle_timeout, bytes.next())
            .await
            .map_err(|_| {
                interrupted(usage, format!("stream stalled for {:?}", call.idle_timeout))
            })?;
        let events = match next {
            Some(Ok(chunk)) => parser.feed(&chunk),
            Some(Err(e)) => {
                return Err(interrupted(
                    usage,
                    format!(
                        "stream broke: {}",
                        ProviderError::transport(PROVIDER_TYPE, &e).message
                    ),
                ));
            }
            None => {
                if parser.finish().is_some_and(|e| e.data.trim() == "[DONE]") {
                    break;
                }
                return Err(interrupted(usage, "stream ended without [DONE]".to_owned()));
            }
        };
        if parser.too_long() {
            return Err(ProviderError {
                usage,
                ..ProviderError::too_large(PROVIDER_TYPE)
            });
        }
        let mut done = false;
        for event in events {
            let data = event.data.trim();
            if data.is_empty() {
                continue;
            }
            if data == "[DONE]" {
                done = true;
                break;
            }
            let Ok(chunk) = serde_json::from_str::<Value>(data) else {
                return Err(ProviderError {
                    raw_response: Some(excerpt(data, EXCERPT_BYTES)),
                    ..interrupted(usage, "stream chunk is not JSON".to_owned())
                });
            };
            if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
                return Err(stream_error(error, usage));
            }
            if id.is_none() {
                id = chunk.get("id").and_then(Value::as_str).map(str::to_owned);
                response_model = chunk
                    .get("model")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
            }
            // Usage may come on any chunk (DeepSeek, xAI) or in `x_groq.usage`: keep the last.
            for found in [chunk.get("usage"), chunk.pointer("/x_groq/usage")]
                .into_iter()
                .flatten()
            {
                if let Ok(parsed) = serde_json::from_value::<OpenAiUsage>(found.clone())
                    && !found.is_null()
                {
                    usage = Some(parsed.into());
                }
            }
            let Some(choice) = chunk.pointer("/choices/0") else {
                continue;
            };
            if let Some(delta) = choice.pointer("/delta/content").and_then(Value::as_str)
                && !delta.is_empty()
            {
                text.push_str(delta);
                if let Some(on_delta) = call.on_delta {
                    on_delta(delta);
                }
            }
            if let Some(Value::Array(parts)) = choice.pointer("/delta/tool_calls") {
                tools.add(parts);
            }
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                if reason == "error" {
                    return Err(interrupted(
                        usage,
                        "stream finished with finish_reason \"error\"".to_owned(),
                    ));
                }
                native_finish = Some(reason.to_owned());
            }
        }
        if done {
            break;
        }
    }
    let usage = usage.unwrap_or_default();
    let tool_calls = tools.into_value();
    let finish_reason = canonical_finish(native_finish.as_deref(), tool_calls.is_some(), false);
    let response = chat_completion(
        id.as_deref().unwrap_or("chatcmpl"),
        response_model.as_deref().unwrap_or(model),
        (!text.is_empty() || tool_calls.is_none()).then_some(text.as_str()),
        tool_calls,
        finish_reason,
        native_finish.as_deref(),
        &usage,
    );
    Ok(Completion { response, usage })
}

/// An `error` object inside a 200 stream.
fn stream_error(error: &Value, usage: Option<Usage>) -> ProviderError {
    let kind = error.get("type").and_then(Value::as_str).unwrap_or("");
    let code = error.get("code").map(|c| c.to_string()).unwrap_or_default();
    let class = if kind.contains("overloaded")
        || code.contains("overloaded")
        || code == "503"
        || code == "529"
    {
        ErrorClass::Overloaded
    } else {
        ErrorClass::StreamInterrupted
    };
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("error event in stream");
    ProviderError {
        usage,
        raw_response: Some(excerpt(&error.to_string(), EXCERPT_BYTES)),
        ..ProviderError::new(
            PROVIDER_TYPE,
            class,
            format!("error after HTTP 200: {message}"),
        )
    }
}

/// The `error` object of any of the compatible services' error bodies: OpenAI
/// `{"error":{…}}`, OpenRouter `{"error":{"code":429,…}}`, Mistral's top-level
/// `{"object":"error","message":…}` (message may be an object).
fn error_object(body: &str) -> Option<Map<String, Value>> {
    match serde_json::from_str::<Value>(body.trim_start()).ok()? {
        Value::Object(mut top) => match top.remove("error") {
            Some(Value::Object(inner)) => Some(inner),
            Some(Value::String(message)) => {
                let mut inner = Map::new();
                inner.insert("message".to_owned(), Value::from(message));
                Some(inner)
            }
            _ if top.contains_key("message") => Some(top),
            _ => None,
        },
        // A one-element array wrapper.
        Value::Array(items) => items
            .into_iter()
            .next()
            .and_then(|v| v.get("error").cloned())
            .and_then(|v| match v {
                Value::Object(inner) => Some(inner),
                _ => None,
            }),
        _ => None,
    }
}

/// The retry delay of a 429: `retry-after(-ms)`, else the reset header of the exhausted limit.
fn retry_delay(headers: &HeaderMap) -> Option<std::time::Duration> {
    let reset = || {
        ["requests", "tokens"]
            .into_iter()
            .filter(|kind| {
                headers
                    .get(format!("x-ratelimit-remaining-{kind}"))
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.trim() == "0")
            })
            .filter_map(|kind| {
                let reset = headers
                    .get(format!("x-ratelimit-reset-{kind}"))?
                    .to_str()
                    .ok()?;
                parse_go_duration(reset)
            })
            .max()
    };
    retry_after_from_headers(headers).or_else(|| super::plausible_retry_after(reset()))
}

/// Maps an error status (then the body's discriminator) to an error class. Never fails:
/// a body that is not JSON (an HTML page from a proxy) still classifies by status.
pub fn handle_openai_error(status: u16, headers: &HeaderMap, body: &str) -> ProviderError {
    let detail = error_object(body);
    let field = |name: &str| -> String {
        match detail.as_ref().and_then(|d| d.get(name)) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        }
    };
    let (kind, code) = (field("type"), field("code"));
    let said = |needle: &str| kind.contains(needle) || code.contains(needle);
    let class = match status {
        400 | 413 if said("context_length") || said("too_long") => ErrorClass::ContextLength,
        400 if said("content_filter") || said("content_policy") => ErrorClass::ContentFiltered,
        401 | 403 => ErrorClass::Auth,
        402 => ErrorClass::QuotaExhausted,
        408 => ErrorClass::Timeout,
        409 => ErrorClass::Conflict,
        429 if said("insufficient_quota") || said("billing") => ErrorClass::QuotaExhausted,
        429 if never_fits(&field("message")) => ErrorClass::InvalidRequest,
        429 => ErrorClass::RateLimited,
        503 | 529 => ErrorClass::Overloaded,
        504 => ErrorClass::Timeout,
        500..=599 => ErrorClass::ServerError,
        _ => ErrorClass::InvalidRequest,
    };
    let message = match field("message") {
        m if m.is_empty() => format!("HTTP {status}: {}", excerpt(body.trim(), 200)),
        m => format!("HTTP {status}: {}", excerpt(&m, 400)),
    };
    ProviderError {
        status: Some(status),
        raw_response: Some(excerpt(body, EXCERPT_BYTES)),
        retry_after: retry_delay(headers),
        ..ProviderError::new(PROVIDER_TYPE, class, message)
    }
}

/// Whether a 429's message says the request alone is over the per-minute token limit
/// ("Request too large for … tokens per min (TPM): Limit 30000, Requested 45000"): waiting
/// will never make it fit.
fn never_fits(message: &str) -> bool {
    let number_after = |label: &str| -> Option<u64> {
        let rest = &message[message.find(label)? + label.len()..];
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == ',')
            .filter(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    message.contains("Request too large")
        && matches!(
            (number_after("Limit "), number_after("Requested ")),
            (Some(limit), Some(requested)) if requested > limit
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::ChatMessage;
    use crate::providers::ApiKey;
    use crate::providers::test_support::serve;
    use reqwest::header::HeaderValue;
    use std::sync::Mutex;
    use std::time::Duration;
    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const COMPLETION: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-x",
        "choices":[{"index":0,"message":{"role":"assistant","content":"Hi.","refusal":null},"finish_reason":"stop"}],
        "usage":{"prompt_tokens":20,"completion_tokens":5,"total_tokens":25,
                 "prompt_tokens_details":{"cached_tokens":8},"completion_tokens_details":{"reasoning_tokens":2}}}"#;

    fn key() -> ApiKey {
        ApiKey {
            id: "main".to_owned(),
            secret: "sk-test".into(),
        }
    }

    fn provider(server: &MockServer, options: OpenAiOptions) -> OpenAiProvider {
        OpenAiProvider::new(
            reqwest::Client::new(),
            format!("{}/v1", server.uri()),
            options,
        )
    }

    fn compatible() -> OpenAiOptions {
        OpenAiOptions {
            max_tokens_field: MaxTokensField::MaxTokens,
            strict_fields: false,
        }
    }

    fn request() -> ChatRequest {
        ChatRequest {
            messages: vec![ChatMessage::text_message("user", "hello")],
            max_tokens: Some(50),
            ..ChatRequest::default()
        }
    }

    async fn call(
        server: &MockServer,
        options: OpenAiOptions,
        timeout: Duration,
    ) -> Result<Completion, ProviderError> {
        let key = key();
        let call = Call {
            key: Some(&key),
            timeout,
            idle_timeout: Duration::from_secs(2),
            on_delta: None,
        };
        provider(server, options)
            .complete(&request(), "gpt-x", &call)
            .await
    }

    #[tokio::test]
    async fn a_completion_is_parsed_with_cached_and_reasoning_usage() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/chat/completions"))
            .and(header("authorization", "Bearer sk-test"))
            .respond_with(ResponseTemplate::new(200).set_body_string(COMPLETION))
            .expect(1)
            .mount(&server)
            .await;
        let completion = call(&server, compatible(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            completion.response["choices"][0]["message"]["content"],
            "Hi."
        );
        assert_eq!(completion.response["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            completion.response["choices"][0]["native_finish_reason"],
            "stop"
        );
        assert_eq!(
            completion.usage,
            Usage {
                input_tokens: 20,
                cached_input_tokens: 8,
                cache_write_tokens: 0,
                output_tokens: 5,
                reasoning_tokens: 2
            }
        );
        let sent: Value =
            serde_json::from_slice(&server.received_requests().await.unwrap()[0].body).unwrap();
        assert_eq!(sent["model"], "gpt-x");
        assert_eq!(sent["max_tokens"], 50);
        assert!(sent.get("max_completion_tokens").is_none());
    }

    #[tokio::test]
    async fn openai_itself_gets_max_completion_tokens() {
        let server = serve(200, COMPLETION).await;
        let options = OpenAiOptions {
            max_tokens_field: MaxTokensField::MaxCompletionTokens,
            strict_fields: false,
        };
        call(&server, options, Duration::from_secs(5))
            .await
            .unwrap();
        let sent: Value =
            serde_json::from_slice(&server.received_requests().await.unwrap()[0].body).unwrap();
        assert_eq!(sent["max_completion_tokens"], 50);
        assert!(sent.get("max_tokens").is_none());
    }

    #[test]
    fn strict_services_get_no_unknown_fields_names_or_nulls() {
        let provider = OpenAiProvider::new(
            reqwest::Client::new(),
            "http://127.0.0.1:9/v1".to_owned(),
            OpenAiOptions {
                max_tokens_field: MaxTokensField::MaxTokens,
                strict_fields: true,
            },
        );
        let mut request: ChatRequest = serde_json::from_value(serde_json::json!({
            "messages": [{"role": "user", "content": "hi", "name": "bob", "tool_calls": null}],
            "n": 1, "logit_bias": {}, "temperature": null, "max_completion_tokens": 9
        }))
        .unwrap();
        request.temperature = None;
        let body = provider.body(&request, "mistral-small", false).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"model": "mistral-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9})
        );
    }

    #[tokio::test]
    async fn a_429_is_rate_limited_with_its_retry_delay() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(429)
                    .insert_header("retry-after", "3")
                    .set_body_string(r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#),
            )
            .expect(1)
            .mount(&server)
            .await;
        let err = call(&server, compatible(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::RateLimited);
        assert_eq!(err.status, Some(429));
        assert_eq!(err.retry_after, Some(Duration::from_secs(3)));
        assert!(
            err.message.contains("Rate limit reached"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn a_502_with_an_html_body_is_a_server_error() {
        let server = serve(502, "<html>Bad gateway</html>").await;
        let err = call(&server, compatible(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::ServerError);
        assert!(err.message.contains("Bad gateway"));
    }

    #[tokio::test]
    async fn a_malformed_200_body_is_a_server_error_that_keeps_the_body() {
        let server = serve(200, "{\"choices\": [tru").await;
        let err = call(&server, compatible(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::ServerError);
        assert_eq!(err.raw_response.as_deref(), Some("{\"choices\": [tru"));
    }

    #[tokio::test]
    async fn a_slow_provider_times_out() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_string(COMPLETION)
                    .set_delay(Duration::from_secs(5)),
            )
            .mount(&server)
            .await;
        let err = call(&server, compatible(), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Timeout);
    }

    #[test]
    fn every_row_of_the_classification_table_maps_to_its_class() {
        let none = HeaderMap::new();
        let cases: &[(u16, &str, ErrorClass)] = &[
            (
                400,
                r#"{"error":{"message":"bad","type":"invalid_request_error","param":null,"code":null}}"#,
                ErrorClass::InvalidRequest,
            ),
            (
                400,
                r#"{"error":{"message":"too long","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#,
                ErrorClass::ContextLength,
            ),
            (
                400,
                r#"{"error":{"message":"filtered","type":null,"param":"prompt","code":"content_filter"}}"#,
                ErrorClass::ContentFiltered,
            ),
            (
                401,
                r#"{"error":{"message":"Incorrect API key","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
                ErrorClass::Auth,
            ),
            (
                402,
                r#"{"error":{"message":"Insufficient Balance","type":"unknown_error"}}"#,
                ErrorClass::QuotaExhausted,
            ),
            (
                403,
                r#"{"error":{"message":"Country not supported","type":"request_forbidden"}}"#,
                ErrorClass::Auth,
            ),
            (
                404,
                r#"{"error":{"message":"model not found","type":"invalid_request_error","code":"model_not_found"}}"#,
                ErrorClass::InvalidRequest,
            ),
            (408, "", ErrorClass::Timeout),
            (409, "", ErrorClass::Conflict),
            (
                422,
                r#"{"object":"error","message":{"detail":[{"type":"extra_forbidden"}]},"type":"invalid_request_error"}"#,
                ErrorClass::InvalidRequest,
            ),
            (
                429,
                r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
                ErrorClass::QuotaExhausted,
            ),
            (
                429,
                r#"{"error":{"message":"Rate limit","type":"tokens","code":"rate_limit_exceeded"}}"#,
                ErrorClass::RateLimited,
            ),
            (
                429,
                r#"{"error":{"code":429,"message":"Rate limit exceeded: free-models-per-min"}}"#,
                ErrorClass::RateLimited,
            ),
            (
                500,
                r#"{"error":{"message":"The server had an error","type":"server_error","param":null,"code":null}}"#,
                ErrorClass::ServerError,
            ),
            (
                502,
                "<html><body>502 Bad Gateway</body></html>",
                ErrorClass::ServerError,
            ),
            (
                503,
                r#"{"error":{"message":"The engine is currently overloaded","type":"server_error"}}"#,
                ErrorClass::Overloaded,
            ),
            (504, "<html>Gateway Timeout</html>", ErrorClass::Timeout),
            (529, "", ErrorClass::Overloaded),
            (
                429,
                r#"{"error":{"message":"Request too large for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Requested 45000. The input or output tokens must be reduced in order to run successfully.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#,
                ErrorClass::InvalidRequest,
            ),
            (
                429,
                r#"{"error":{"message":"Rate limit reached for gpt-4o on tokens per min (TPM): Limit 30000, Used 29000, Requested 2000.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#,
                ErrorClass::RateLimited,
            ),
        ];
        for (status, body, class) in cases {
            let err = handle_openai_error(*status, &none, body);
            assert_eq!(err.class, *class, "HTTP {status} {body}");
            assert_eq!(err.status, Some(*status));
        }
        let mistral = handle_openai_error(422, &none, cases[9].1);
        assert!(
            mistral.message.contains("extra_forbidden"),
            "{}",
            mistral.message
        );
    }

    #[test]
    fn a_429_without_retry_after_uses_the_exhausted_limits_reset() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("0"),
        );
        headers.insert(
            "x-ratelimit-reset-requests",
            HeaderValue::from_static("1.5s"),
        );
        headers.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("900"),
        );
        headers.insert("x-ratelimit-reset-tokens", HeaderValue::from_static("6m0s"));
        let err = handle_openai_error(429, &headers, "");
        assert_eq!(err.retry_after, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn usage_of_compatible_services_is_normalised() {
        let deepseek: OpenAiUsage = serde_json::from_str(
            r#"{"prompt_tokens":100,"completion_tokens":10,"total_tokens":110,"prompt_cache_hit_tokens":60,"prompt_cache_miss_tokens":40}"#,
        )
        .unwrap();
        assert_eq!(Usage::from(deepseek).cached_input_tokens, 60);
        let xai: OpenAiUsage = serde_json::from_str(
            r#"{"prompt_tokens":100,"completion_tokens":10,"total_tokens":140,"completion_tokens_details":{"reasoning_tokens":30}}"#,
        )
        .unwrap();
        let usage = Usage::from(xai);
        assert_eq!((usage.output_tokens, usage.reasoning_tokens), (40, 30));
        let openai: OpenAiUsage = serde_json::from_str(
            r#"{"prompt_tokens":100,"completion_tokens":40,"total_tokens":140,"completion_tokens_details":{"reasoning_tokens":30}}"#,
        )
        .unwrap();
        assert_eq!(Usage::from(openai).output_tokens, 40);
    }

    #[test]
    fn a_refusal_is_a_content_filter_finish_and_tool_calls_infer_their_finish() {
        let refusal = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":null,"refusal":"I can't help with that."},"finish_reason":"stop"}]}"#;
        let completion = parse_openai_response(refusal, "m").unwrap();
        assert_eq!(
            completion.response["choices"][0]["finish_reason"],
            "content_filter"
        );
        assert_eq!(
            completion.response["choices"][0]["native_finish_reason"],
            "stop"
        );
        let tools = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":""}]}"#;
        let completion = parse_openai_response(tools, "m").unwrap();
        assert_eq!(
            completion.response["choices"][0]["finish_reason"],
            "tool_calls"
        );
        assert_eq!(
            completion.response["choices"][0]["message"]["tool_calls"][0]["id"],
            "c1"
        );
    }

    async fn stream(body: &str) -> (Result<Completion, ProviderError>, Vec<String>) {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(200)
                    .insert_header("content-type", "text/event-stream")
                    .set_body_string(body),
            )
            .mount(&server)
            .await;
        let deltas = Mutex::new(Vec::new());
        let on_delta = |d: &str| deltas.lock().unwrap().push(d.to_owned());
        let key = key();
        let call = Call {
            key: Some(&key),
            timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(2),
            on_delta: Some(&on_delta),
        };
        let result = provider(&server, compatible())
            .complete(&request(), "gpt-x", &call)
            .await;
        let sent: Value =
            serde_json::from_slice(&server.received_requests().await.unwrap()[0].body).unwrap();
        assert_eq!(sent["stream"], true);
        assert_eq!(sent["stream_options"]["include_usage"], true);
        (result, deltas.into_inner().unwrap())
    }

    #[tokio::test]
    async fn a_stream_is_assembled_in_order_with_its_final_usage() {
        let body = concat!(
            ": keep-alive\n\n",
            "data: {\"id\":\"c1\",\"model\":\"gpt-x\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"},\"finish_reason\":null}],\"usage\":null}\n\n",
            "data:{\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}],\"usage\":null}\r\n\r\n",
            "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n",
            "data: [DONE]\n\n"
        );
        let (result, deltas) = stream(body).await;
        let completion = result.unwrap();
        assert_eq!(deltas, ["Hel", "lo"]);
        assert_eq!(
            completion.response["choices"][0]["message"]["content"],
            "Hello"
        );
        assert_eq!(completion.response["choices"][0]["finish_reason"], "stop");
        assert_eq!(completion.usage.input_tokens, 9);
        assert_eq!(completion.usage.output_tokens, 2);
    }

    #[tokio::test]
    async fn a_stream_cut_before_done_is_interrupted_not_a_partial_success() {
        let body = "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hal\"},\"finish_reason\":null}]}\n\n";
        let (result, deltas) = stream(body).await;
        assert_eq!(deltas, ["Hal"]);
        let err = result.unwrap_err();
        assert_eq!(err.class, ErrorClass::StreamInterrupted);
        assert!(err.is_retryable());
    }

    #[tokio::test]
    async fn an_error_chunk_after_200_fails_the_attempt() {
        let body = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\ndata: {\"error\":{\"message\":\"Overloaded\",\"type\":\"overloaded_error\"}}\n\n";
        let (result, _) = stream(body).await;
        assert_eq!(result.unwrap_err().class, ErrorClass::Overloaded);
    }

    #[tokio::test]
    async fn streamed_tool_call_fragments_are_merged() {
        let body = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"{\\\"ci\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"ty\\\":\\\"Oslo\\\"}\"}}]},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: [DONE]\n\n"
        );
        let (result, _) = stream(body).await;
        let completion = result.unwrap();
        let call = &completion.response["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["id"], "call_1");
        assert_eq!(call["function"]["arguments"], "{\"city\":\"Oslo\"}");
        assert_eq!(
            completion.response["choices"][0]["finish_reason"],
            "tool_calls"
        );
    }
}
