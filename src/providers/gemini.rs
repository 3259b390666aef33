//! Google Gemini `generateContent` / `streamGenerateContent?alt=sse` (providers-wire.md §4):
//! OpenAI-shaped requests translated to `contents`/`systemInstruction`/`generationConfig`,
//! responses and SSE streams folded back into a normalised `chat.completion`, and Google RPC
//! error bodies classified per §6.

use super::transport::Transport;
use super::{Answer, EXCERPT_BYTES, send};
use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::images::{self, ImageFetcher, InlineImage};
use super::sse::{SseEvent, SseParser};
use super::{
    Call, Completion, ErrorClass, ProviderError, chat_completion, excerpt, finish,
    parse_go_duration, plausible_retry_after as plausible, retry_after_from_headers,
};
use crate::messages::{ChatMessage, ChatRequest, Usage};

/// Wire-format name used in errors and attempts.
pub const PROVIDER_TYPE: &str = "gemini";

/// `generationConfig.stopSequences` holds at most this many entries (GEM-PROTO).
const MAX_STOP_SEQUENCES: usize = 5;

/// The API version path segment every endpoint lives under.
const API_VERSION: &str = "v1beta";

/// Raw non-SSE text buffered while waiting for it to become a whole JSON error. A stream that
/// sends more than this without it parsing is broken, not slow.
const MAX_STRAY_BYTES: usize = 64 * 1024;

/// A client for one Gemini base URL (`https://generativelanguage.googleapis.com` or a proxy
/// prefix in front of it).
#[derive(Debug)]
pub struct GeminiProvider {
    http: Transport,
    /// `{base_url}/v1beta`, without a trailing `/`.
    api_root: String,
    /// Fetches `image_url`s, which Gemini takes only as bytes.
    images: ImageFetcher,
}

// ---------------------------------------------------------------------------------------------
// Request wire types (borrow from the job's `ChatRequest`).
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GeminiRequestBody<'a> {
    contents: Vec<GeminiContent<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<GeminiSystemInstruction<'a>>,
    #[serde(skip_serializing_if = "GeminiGenerationConfig::is_empty")]
    generation_config: GeminiGenerationConfig<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<GeminiTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<GeminiToolConfig<'a>>,
}

#[derive(Debug, Serialize)]
struct GeminiContent<'a> {
    /// `user` or `model`.
    role: &'static str,
    parts: Vec<GeminiPart<'a>>,
}

#[derive(Debug, Serialize)]
struct GeminiSystemInstruction<'a> {
    parts: Vec<GeminiPart<'a>>,
}

/// One `Part`: exactly one of the data fields is set; `thoughtSignature` is metadata that
/// travels next to a `functionCall`.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct GeminiPart<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inline_data: Option<GeminiBlob>,
    #[serde(skip_serializing_if = "Option::is_none")]
    function_call: Option<GeminiFunctionCallOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    function_response: Option<GeminiFunctionResponse<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thought_signature: Option<&'a str>,
}

impl<'a> GeminiPart<'a> {
    fn text(text: &'a str) -> Self {
        Self {
            text: Some(text),
            ..Self::default()
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GeminiBlob {
    mime_type: String,
    /// Base64, without a `data:` prefix.
    data: String,
}

#[derive(Debug, Serialize)]
struct GeminiFunctionCallOut<'a> {
    name: &'a str,
    args: Value,
}

#[derive(Debug, Serialize)]
struct GeminiFunctionResponse<'a> {
    name: &'a str,
    /// A protobuf `Struct`, so always a JSON object.
    response: Value,
}

#[derive(Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct GeminiGenerationConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop_sequences: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_mime_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_json_schema: Option<&'a Value>,
}

impl GeminiGenerationConfig<'_> {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GeminiTool<'a> {
    function_declarations: Vec<GeminiFunctionDeclaration<'a>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GeminiFunctionDeclaration<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    /// OpenAI tool parameters are arbitrary JSON Schema. Gemini's older `parameters` field
    /// is an OpenAPI subset that answers 400 "Unknown name \"additionalProperties\"" (also
    /// `$schema`, `const`, `propertyNames`) for schemas OpenAI accepts, so the schema goes
    /// into `parametersJsonSchema`, the JSON Schema twin of `responseJsonSchema` (the two
    /// fields are mutually exclusive).
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters_json_schema: Option<&'a Value>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GeminiToolConfig<'a> {
    function_calling_config: GeminiFunctionCallingConfig<'a>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GeminiFunctionCallingConfig<'a> {
    /// `AUTO`, `ANY` or `NONE`.
    mode: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allowed_function_names: Vec<&'a str>,
}

// ---------------------------------------------------------------------------------------------
// Response wire types (lenient: every field optional, unknown fields ignored).
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeminiResponse {
    #[serde(default)]
    candidates: Option<Vec<GeminiCandidate>>,
    #[serde(default)]
    prompt_feedback: Option<GeminiPromptFeedback>,
    #[serde(default)]
    usage_metadata: Option<GeminiUsage>,
    #[serde(default)]
    model_version: Option<String>,
    #[serde(default)]
    response_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeminiCandidate {
    #[serde(default)]
    content: Option<GeminiResponseContent>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct GeminiResponseContent {
    #[serde(default)]
    parts: Option<Vec<GeminiResponsePart>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeminiResponsePart {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thought: Option<bool>,
    #[serde(default)]
    function_call: Option<GeminiFunctionCallIn>,
    #[serde(default)]
    thought_signature: Option<String>,
}

#[derive(Debug, Deserialize)]
struct GeminiFunctionCallIn {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    args: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeminiPromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
}

/// `usageMetadata` (§4.4). Counts may be absent (a blocked prompt has only the prompt count).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeminiUsage {
    #[serde(default)]
    prompt_token_count: Option<u64>,
    #[serde(default)]
    candidates_token_count: Option<u64>,
    #[serde(default)]
    thoughts_token_count: Option<u64>,
    #[serde(default)]
    cached_content_token_count: Option<u64>,
    #[serde(default)]
    tool_use_prompt_token_count: Option<u64>,
}

impl From<GeminiUsage> for Usage {
    fn from(usage: GeminiUsage) -> Self {
        let count = |n: Option<u64>| n.unwrap_or(0);
        let thoughts = count(usage.thoughts_token_count);
        Usage {
            // `promptTokenCount` already includes cached-content tokens.
            input_tokens: count(usage.prompt_token_count)
                .saturating_add(count(usage.tool_use_prompt_token_count)),
            cached_input_tokens: count(usage.cached_content_token_count),
            cache_write_tokens: 0,
            // Thinking is billed as output.
            output_tokens: count(usage.candidates_token_count).saturating_add(thoughts),
            reasoning_tokens: thoughts,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Request translation.
// ---------------------------------------------------------------------------------------------

fn invalid(message: impl Into<String>) -> ProviderError {
    ProviderError::new(PROVIDER_TYPE, ErrorClass::InvalidRequest, message)
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so a model name can never
/// add path segments, a query or a fragment.
fn encode_path_segment(segment: &str) -> String {
    let mut encoded = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Appends parts to the conversation, merging into the previous turn when the role repeats
/// (Gemini wants strictly alternating turns). Empty turns are dropped: Gemini rejects them.
fn push_turn<'a>(
    contents: &mut Vec<GeminiContent<'a>>,
    role: &'static str,
    parts: Vec<GeminiPart<'a>>,
) {
    if parts.is_empty() {
        return;
    }
    match contents.last_mut() {
        Some(last) if last.role == role => last.parts.extend(parts),
        _ => contents.push(GeminiContent { role, parts }),
    }
}

/// The text parts of a system/developer message; Gemini's `systemInstruction` takes text only.
fn system_parts(message: &ChatMessage, at: usize) -> Result<Vec<GeminiPart<'_>>, String> {
    match &message.content {
        Value::Null => Ok(Vec::new()),
        Value::String(text) => Ok(non_empty_text(text).into_iter().collect()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| match item.get("type").and_then(Value::as_str) {
                Some("text") => match item.get("text").and_then(Value::as_str) {
                    Some(text) => non_empty_text(text).map(Ok),
                    None => Some(Err(format!(
                        "messages[{at}].content[{i}] is a text part without a text string"
                    ))),
                },
                other => Some(Err(format!(
                    "messages[{at}] is a {} message with a {} part; Gemini system instructions \
                     take text only",
                    message.role,
                    other.unwrap_or("typeless")
                ))),
            })
            .collect(),
        _ => Err(format!(
            "messages[{at}].content must be a string, null or an array of parts"
        )),
    }
}

/// Gemini rejects empty text parts; an empty string contributes nothing.
fn non_empty_text(text: &str) -> Option<GeminiPart<'_>> {
    (!text.is_empty()).then(|| GeminiPart::text(text))
}

/// Assistant `tool_calls` as `functionCall` parts, remembering each call id's function name
/// for the `tool` messages that answer it.
fn function_call_parts<'a>(
    message: &'a ChatMessage,
    at: usize,
    names: &mut HashMap<&'a str, &'a str>,
) -> Result<Vec<GeminiPart<'a>>, String> {
    let calls = match message.extra.get("tool_calls") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(calls)) => calls,
        Some(_) => {
            return Err(format!("messages[{at}].tool_calls must be an array"));
        }
    };
    let mut parts = Vec::with_capacity(calls.len());
    for (i, call) in calls.iter().enumerate() {
        let function = call.get("function");
        let name = function
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| format!("messages[{at}].tool_calls[{i}] has no function name"))?;
        let args = match function.and_then(|f| f.get("arguments")) {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(Value::String(text)) if text.trim().is_empty() => Value::Object(Map::new()),
            Some(Value::String(text)) => serde_json::from_str(text).map_err(|e| {
                format!("messages[{at}].tool_calls[{i}].function.arguments is not valid JSON: {e}")
            })?,
            Some(other) => other.clone(),
        };
        if !args.is_object() {
            return Err(format!(
                "messages[{at}].tool_calls[{i}].function.arguments must be a JSON object"
            ));
        }
        if let Some(id) = call.get("id").and_then(Value::as_str) {
            names.insert(id, name);
        }
        parts.push(GeminiPart {
            function_call: Some(GeminiFunctionCallOut { name, args }),
            // Gemini 3 rejects a replayed `functionCall` without the signature it was issued
            // with; completions carry it where Google's own OpenAI-compatible endpoint does.
            thought_signature: call
                .pointer("/extra_content/google/thought_signature")
                .and_then(Value::as_str),
            ..GeminiPart::default()
        });
    }
    Ok(parts)
}

/// A `tool` message as a `functionResponse` part. The function name comes from the earlier
/// assistant tool call with the same id (or the message's own `name`); the response is the
/// content when it is a JSON object, else `{"content": <text>}` (a `Struct` must be an object).
fn function_response_part<'a>(
    message: &'a ChatMessage,
    at: usize,
    names: &HashMap<&'a str, &'a str>,
) -> Result<GeminiPart<'a>, String> {
    let id = message.extra.get("tool_call_id").and_then(Value::as_str);
    let name = id
        .and_then(|id| names.get(id).copied())
        .or_else(|| message.extra.get("name").and_then(Value::as_str))
        .ok_or_else(|| {
            format!(
                "messages[{at}] answers tool call {:?}, which no earlier assistant message made",
                id.unwrap_or("")
            )
        })?;
    let text = message.text();
    let response = match serde_json::from_str::<Value>(&text) {
        Ok(object @ Value::Object(_)) => object,
        _ => json!({ "content": text }),
    };
    Ok(GeminiPart {
        function_response: Some(GeminiFunctionResponse { name, response }),
        ..GeminiPart::default()
    })
}

/// An optional numeric request field; a present non-number is the caller's mistake.
fn number_field(extra: &Map<String, Value>, name: &str) -> Result<Option<f64>, String> {
    match extra.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_f64()
            .map(Some)
            .ok_or_else(|| format!("{name} must be a number")),
    }
}

fn stop_sequences(extra: &Map<String, Value>) -> Result<Vec<&str>, String> {
    let stops: Vec<&str> = match extra.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(stop)) => vec![stop.as_str()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .ok_or_else(|| "stop must be a string or an array of strings".to_owned())
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("stop must be a string or an array of strings".to_owned()),
    };
    if stops.len() > MAX_STOP_SEQUENCES {
        return Err(format!(
            "Gemini accepts at most {MAX_STOP_SEQUENCES} stop sequences; the request has {}",
            stops.len()
        ));
    }
    Ok(stops)
}

/// `response_format` as `(responseMimeType, responseJsonSchema)`.
fn response_format(
    extra: &Map<String, Value>,
) -> Result<(Option<&'static str>, Option<&Value>), String> {
    let Some(format) = extra.get("response_format").filter(|f| !f.is_null()) else {
        return Ok((None, None));
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok((None, None)),
        Some("json_object") => Ok((Some("application/json"), None)),
        Some("json_schema") => Ok((
            Some("application/json"),
            format
                .pointer("/json_schema/schema")
                .filter(|s| !s.is_null()),
        )),
        other => Err(format!(
            "response_format type {:?} is not supported for Gemini",
            other.unwrap_or("")
        )),
    }
}

/// OpenAI function `tools` as one Gemini tool holding every declaration.
fn tools(extra: &Map<String, Value>) -> Result<Vec<GeminiTool<'_>>, String> {
    let tools = match extra.get("tools") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err("tools must be an array".to_owned()),
    };
    let mut declarations = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        match tool.get("type").and_then(Value::as_str) {
            Some("function") | None => {}
            Some(other) => {
                return Err(format!(
                    "tools[{i}] has type {other:?}; only function tools can be sent to Gemini"
                ));
            }
        }
        let function = tool.get("function");
        let name = function
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| format!("tools[{i}] has no function name"))?;
        declarations.push(GeminiFunctionDeclaration {
            name,
            description: function
                .and_then(|f| f.get("description"))
                .and_then(Value::as_str),
            parameters_json_schema: function
                .and_then(|f| f.get("parameters"))
                .filter(|p| !p.is_null()),
        });
    }
    Ok(if declarations.is_empty() {
        Vec::new()
    } else {
        vec![GeminiTool {
            function_declarations: declarations,
        }]
    })
}

fn tool_config(extra: &Map<String, Value>) -> Result<Option<GeminiToolConfig<'_>>, String> {
    let (mode, allowed) = match extra.get("tool_choice") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(choice)) => match choice.as_str() {
            "auto" => ("AUTO", Vec::new()),
            "required" => ("ANY", Vec::new()),
            "none" => ("NONE", Vec::new()),
            other => return Err(format!("tool_choice {other:?} is not supported")),
        },
        Some(choice) => {
            let name = choice
                .get("type")
                .and_then(Value::as_str)
                .filter(|t| *t == "function")
                .and_then(|_| choice.pointer("/function/name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    "tool_choice must be auto, required, none or a named function".to_owned()
                })?;
            ("ANY", vec![name])
        }
    };
    Ok(Some(GeminiToolConfig {
        function_calling_config: GeminiFunctionCallingConfig {
            mode,
            allowed_function_names: allowed,
        },
    }))
}

impl GeminiProvider {
    /// A client for `base_url`, which may carry a path prefix; `/v1beta` is appended unless
    /// the URL already ends with it. Its `image_url`s are fetched by `images`.
    pub fn new(http: impl Into<Transport>, base_url: String, images: ImageFetcher) -> Self {
        let base = base_url.trim_end_matches('/');
        let api_root = if base.ends_with(&format!("/{API_VERSION}")) {
            base.to_owned()
        } else {
            format!("{base}/{API_VERSION}")
        };
        Self {
            http: http.into(),
            api_root,
            images,
        }
    }

    /// `…/v1beta/models/{model}:generateContent` (or the SSE streaming method). A model given
    /// as `models/x` (or `tunedModels/x`) keeps its collection instead of doubling it.
    fn endpoint(&self, model: &str, stream: bool) -> Result<String, String> {
        let (collection, name) = match model.split_once('/') {
            Some((collection @ ("models" | "tunedModels"), name)) => (collection, name),
            _ => ("models", model),
        };
        if name.is_empty() {
            return Err("the model name is empty".to_owned());
        }
        let method = if stream {
            "streamGenerateContent?alt=sse"
        } else {
            "generateContent"
        };
        Ok(format!(
            "{}/{collection}/{}:{method}",
            self.api_root,
            encode_path_segment(name)
        ))
    }

    /// An `image_url` as inline bytes: `data:` URLs are decoded, http(s) URLs downloaded,
    /// because Gemini takes no arbitrary URLs.
    async fn inline_image(
        &self,
        url: &str,
        at: usize,
        timeout: Duration,
    ) -> Result<GeminiPart<'static>, String> {
        let image: Result<InlineImage, String> = if url.starts_with("data:") {
            images::parse_data_url(url)
        } else {
            images::fetch_inline(&self.images, url, timeout).await
        };
        let image = image.map_err(|e| format!("messages[{at}]: {e}"))?;
        Ok(GeminiPart {
            inline_data: Some(GeminiBlob {
                mime_type: image.mime,
                data: image.base64,
            }),
            ..GeminiPart::default()
        })
    }

    /// The parts of a user or assistant message's content.
    async fn content_parts<'a>(
        &self,
        message: &'a ChatMessage,
        at: usize,
        timeout: Duration,
    ) -> Result<Vec<GeminiPart<'a>>, String> {
        let items = match &message.content {
            Value::Null => return Ok(Vec::new()),
            Value::String(text) => return Ok(non_empty_text(text).into_iter().collect()),
            Value::Array(items) => items,
            _ => {
                return Err(format!(
                    "messages[{at}].content must be a string, null or an array of parts"
                ));
            }
        };
        let mut parts = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let kind = item.get("type").and_then(Value::as_str).unwrap_or("");
            match kind {
                "text" | "refusal" => {
                    let text = item.get(kind).and_then(Value::as_str).ok_or_else(|| {
                        format!(
                            "messages[{at}].content[{i}] is a {kind} part without a {kind} string"
                        )
                    })?;
                    parts.extend(non_empty_text(text));
                }
                "image_url" => {
                    let image = item.get("image_url");
                    let url = image
                        .and_then(|i| i.get("url"))
                        .or(image)
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            format!(
                                "messages[{at}].content[{i}] is an image_url part without a url"
                            )
                        })?;
                    parts.push(self.inline_image(url, at, timeout).await?);
                }
                other => {
                    return Err(format!(
                        "messages[{at}].content[{i}] is a {:?} part, which the Gemini adapter \
                         cannot send",
                        other
                    ));
                }
            }
        }
        Ok(parts)
    }

    /// The request body for `request`; anything Gemini cannot take is an `invalid_request`.
    async fn request_body<'a>(
        &self,
        request: &'a ChatRequest,
        timeout: Duration,
    ) -> Result<GeminiRequestBody<'a>, ProviderError> {
        self.translate(request, timeout).await.map_err(invalid)
    }

    /// Translates the OpenAI-shaped request. Images are fetched here (each within `timeout`).
    /// OpenAI fields without a Gemini equivalent (`n`, `user`, `logprobs`, …) are dropped:
    /// Gemini rejects unknown fields. Like `images`, translation errors are sentences; they
    /// become one `invalid_request` in [`Self::request_body`].
    async fn translate<'a>(
        &self,
        request: &'a ChatRequest,
        timeout: Duration,
    ) -> Result<GeminiRequestBody<'a>, String> {
        let mut system = Vec::new();
        let mut contents = Vec::new();
        let mut tool_names = HashMap::new();
        for (at, message) in request.messages.iter().enumerate() {
            match message.role.as_str() {
                // Gemini has one top-level instruction; system messages anywhere are hoisted
                // into it in order.
                "system" | "developer" => system.extend(system_parts(message, at)?),
                "user" => {
                    let parts = self.content_parts(message, at, timeout).await?;
                    push_turn(&mut contents, "user", parts);
                }
                "assistant" => {
                    let mut parts = self.content_parts(message, at, timeout).await?;
                    parts.extend(function_call_parts(message, at, &mut tool_names)?);
                    push_turn(&mut contents, "model", parts);
                }
                // Function results go back in a user turn; consecutive results (parallel
                // calls) merge into one turn, as Gemini expects.
                "tool" => {
                    let part = function_response_part(message, at, &tool_names)?;
                    push_turn(&mut contents, "user", vec![part]);
                }
                other => {
                    return Err(format!(
                        "messages[{at}] has role {other:?}, which Gemini cannot take"
                    ));
                }
            }
        }
        if contents.is_empty() {
            return Err(
                "the request has no user or assistant content to send to Gemini".to_owned(),
            );
        }
        let extra = &request.extra;
        let (response_mime_type, response_json_schema) = response_format(extra)?;
        let generation_config = GeminiGenerationConfig {
            max_output_tokens: request.output_cap(),
            // Gemini accepts 0..=2 like OpenAI, so the value passes through unchanged.
            temperature: request.temperature,
            top_p: number_field(extra, "top_p")?,
            seed: match extra.get("seed") {
                None | Some(Value::Null) => None,
                Some(seed) => Some(
                    seed.as_i64()
                        .ok_or_else(|| "seed must be an integer".to_owned())?,
                ),
            },
            presence_penalty: number_field(extra, "presence_penalty")?,
            frequency_penalty: number_field(extra, "frequency_penalty")?,
            stop_sequences: stop_sequences(extra)?,
            response_mime_type,
            response_json_schema,
        };
        Ok(GeminiRequestBody {
            contents,
            system_instruction: (!system.is_empty())
                .then_some(GeminiSystemInstruction { parts: system }),
            generation_config,
            tools: tools(extra)?,
            tool_config: tool_config(extra)?,
        })
    }

    /// One chat completion, streamed when the call has a delta receiver.
    pub async fn complete(
        &self,
        request: &ChatRequest,
        model: &str,
        call: &Call<'_>,
    ) -> Result<Completion, ProviderError> {
        let key = call.require_key(PROVIDER_TYPE)?;
        let mut key_header = HeaderValue::from_str(key.secret.expose_secret()).map_err(|_| {
            ProviderError::new(
                PROVIDER_TYPE,
                ErrorClass::Auth,
                "the API key is not a valid HTTP header value",
            )
        })?;
        key_header.set_sensitive(true);
        let url = self.endpoint(model, call.streaming()).map_err(invalid)?;
        // Boxed: building the body may fetch images, a large future a call waiting for its
        // answer need not hold. The images and the call share the call's timeout, so the whole
        // call ends within it (its leases and budget reservations are held that long).
        let started = std::time::Instant::now();
        let out_of_time = || {
            ProviderError::new(
                PROVIDER_TYPE,
                ErrorClass::Timeout,
                format!(
                    "fetching the request's images took the call's whole timeout ({:?})",
                    call.timeout
                ),
            )
        };
        let body = tokio::time::timeout(
            call.timeout,
            Box::pin(self.request_body(request, call.timeout)),
        )
        .await
        .map_err(|_| out_of_time())??;
        let left = call.timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(out_of_time());
        }
        let call = &Call {
            key: call.key,
            timeout: left,
            idle_timeout: call.idle_timeout,
            on_delta: call.on_delta,
        };
        // The key travels in a header, never in the URL (`?key=` would leak into logs).
        let http = self.http.lease();
        let builder = http
            .post(url)
            .header("x-goog-api-key", key_header)
            .json(&body);
        // The builder holds the serialized bytes: the body is not kept while the call is out.
        drop(body);
        match send(builder, call, PROVIDER_TYPE, handle_gemini_error).await? {
            Answer::Stream(response) => read_gemini_stream(response, model, call).await,
            Answer::Body(text) => parse_gemini_response(&text, model),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Response assembly (one body, or every chunk of a stream).
// ---------------------------------------------------------------------------------------------

/// The canonical finish reason for a Gemini `finishReason` (§6). Function calls end with
/// `STOP`, so tool use is detected from the parts.
fn canonical_finish(
    native: Option<&str>,
    has_tool_calls: bool,
    prompt_blocked: bool,
) -> &'static str {
    if prompt_blocked {
        return finish::CONTENT_FILTER;
    }
    match native {
        Some("STOP") | None if has_tool_calls => finish::TOOL_CALLS,
        Some("STOP") => finish::STOP,
        Some("MAX_TOKENS") => finish::LENGTH,
        Some(
            "SAFETY"
            | "RECITATION"
            | "BLOCKLIST"
            | "PROHIBITED_CONTENT"
            | "SPII"
            | "IMAGE_SAFETY"
            | "IMAGE_PROHIBITED_CONTENT"
            | "IMAGE_RECITATION",
        ) => finish::CONTENT_FILTER,
        _ => finish::OTHER,
    }
}

/// Everything a response contributes to the completion. Streaming folds every chunk in;
/// a plain response is a stream of one, so both paths share one set of rules.
#[derive(Debug, Default)]
struct GeminiAssembly {
    text: String,
    tool_calls: Vec<Value>,
    native_finish: Option<String>,
    /// `promptFeedback.blockReason` was set: the prompt itself was refused.
    prompt_blocked: bool,
    /// From the last chunk that carried `usageMetadata`.
    usage: Option<Usage>,
    id: Option<String>,
    model_version: Option<String>,
}

impl GeminiAssembly {
    /// Folds in one response; each non-empty, non-thought text part goes to `on_delta`.
    fn add(&mut self, chunk: GeminiResponse, on_delta: Option<&(dyn Fn(&str) + Send + Sync)>) {
        if self.id.is_none() {
            self.id = chunk.response_id.filter(|id| !id.is_empty());
        }
        if self.model_version.is_none() {
            self.model_version = chunk.model_version.filter(|m| !m.is_empty());
        }
        if let Some(usage) = chunk.usage_metadata {
            self.usage = Some(usage.into());
        }
        if let Some(reason) = chunk
            .prompt_feedback
            .and_then(|f| f.block_reason)
            .filter(|r| !r.is_empty())
        {
            self.prompt_blocked = true;
            self.native_finish = Some(reason);
        }
        let Some(candidate) = chunk.candidates.and_then(|c| c.into_iter().next()) else {
            return;
        };
        let parts = candidate.content.and_then(|c| c.parts).unwrap_or_default();
        for part in parts {
            if part.thought == Some(true) {
                continue;
            }
            if let Some(text) = part.text.filter(|t| !t.is_empty()) {
                if let Some(on_delta) = on_delta {
                    on_delta(&text);
                }
                self.text.push_str(&text);
            }
            if let Some(call) = part.function_call {
                self.push_tool_call(call, part.thought_signature);
            }
        }
        if let Some(reason) = candidate.finish_reason.filter(|r| !r.is_empty()) {
            self.native_finish = Some(reason);
        }
    }

    /// A `functionCall` as an OpenAI tool call. Gemini's id is kept when it sends one;
    /// otherwise ids are `call_<n>` in order, which is all a later `tool` message needs.
    fn push_tool_call(&mut self, call: GeminiFunctionCallIn, signature: Option<String>) {
        let id = call
            .id
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| format!("call_{}", self.tool_calls.len()));
        let arguments = match call.args {
            Some(args) if !args.is_null() => args.to_string(),
            _ => "{}".to_owned(),
        };
        let mut tool_call = Map::new();
        tool_call.insert("id".to_owned(), Value::from(id));
        tool_call.insert("type".to_owned(), Value::from("function"));
        tool_call.insert(
            "function".to_owned(),
            json!({ "name": call.name.unwrap_or_default(), "arguments": arguments }),
        );
        if let Some(signature) = signature.filter(|s| !s.is_empty()) {
            tool_call.insert(
                "extra_content".to_owned(),
                json!({ "google": { "thought_signature": signature } }),
            );
        }
        self.tool_calls.push(Value::Object(tool_call));
    }

    /// Whether the terminal marker (a `finishReason` or a prompt block) arrived.
    fn finished(&self) -> bool {
        self.native_finish.is_some()
    }

    fn into_completion(self, model: &str) -> Completion {
        let Self {
            text,
            tool_calls,
            native_finish,
            prompt_blocked,
            usage,
            id,
            model_version,
        } = self;
        let usage = usage.unwrap_or_default();
        let has_tool_calls = !tool_calls.is_empty();
        let finish_reason =
            canonical_finish(native_finish.as_deref(), has_tool_calls, prompt_blocked);
        // Content is null when the model produced no text and either only called tools or was
        // filtered; otherwise it is the (possibly empty) text.
        let content = (!text.is_empty()
            || !(has_tool_calls || finish_reason == finish::CONTENT_FILTER))
            .then_some(text.as_str());
        let id = id.unwrap_or_else(|| format!("chatcmpl-{}", uuid::Uuid::now_v7().simple()));
        let response = chat_completion(
            &id,
            model_version.as_deref().unwrap_or(model),
            content,
            has_tool_calls.then_some(Value::Array(tool_calls)),
            finish_reason,
            native_finish.as_deref(),
            &usage,
        );
        Completion { response, usage }
    }
}

fn malformed(text: &str, reason: String) -> ProviderError {
    ProviderError::malformed(PROVIDER_TYPE, text, reason)
}

/// Parses a 2xx body into a normalised completion; an unusable body is a server error.
///
/// A blocked prompt (HTTP 200, no candidates, `promptFeedback.blockReason`) is returned as a
/// completion with null content, finish `content_filter` and the block reason as native
/// finish, not as `ErrorClass::ContentFiltered`: the call succeeded and was billed
/// (`promptTokenCount`), a completion keeps that usage in cost accounting, and it is the same
/// shape as a blocked *output* (`finishReason: SAFETY`) and the OpenAI adapter's refusals, so
/// callers see one "the provider's filter said no" outcome for every provider.
pub(crate) fn parse_gemini_response(text: &str, model: &str) -> Result<Completion, ProviderError> {
    let value: Value = serde_json::from_str(text.trim_start())
        .map_err(|e| malformed(text, format!("response body is not JSON: {e}")))?;
    if let Some(error) = error_object(&value) {
        return Err(ProviderError {
            raw_response: Some(excerpt(text, EXCERPT_BYTES)),
            ..embedded_error(error, None, ErrorClass::ServerError)
        });
    }
    // Tolerate the one-element array wrapper the non-SSE streaming format uses.
    let value = match value {
        Value::Array(items) if items.len() == 1 => items.into_iter().next().unwrap_or_default(),
        other => other,
    };
    let parsed: GeminiResponse = serde_json::from_value(value).map_err(|e| {
        malformed(
            text,
            format!("response is not a GenerateContentResponse: {e}"),
        )
    })?;
    let has_candidate = parsed.candidates.as_ref().is_some_and(|c| !c.is_empty());
    let blocked = parsed
        .prompt_feedback
        .as_ref()
        .and_then(|f| f.block_reason.as_deref())
        .is_some_and(|r| !r.is_empty());
    if !has_candidate && !blocked {
        return Err(malformed(
            text,
            "response has no candidates and no block reason".to_owned(),
        ));
    }
    let mut assembly = GeminiAssembly::default();
    assembly.add(parsed, None);
    Ok(assembly.into_completion(model))
}

// ---------------------------------------------------------------------------------------------
// Streaming.
// ---------------------------------------------------------------------------------------------

fn interrupted(usage: Option<Usage>, message: impl Into<String>) -> ProviderError {
    ProviderError {
        usage,
        ..ProviderError::new(PROVIDER_TYPE, ErrorClass::StreamInterrupted, message)
    }
}

/// Reads an SSE `streamGenerateContent` response. Gemini sends no `[DONE]`: the stream is
/// complete once a chunk carries a `finishReason` (or a prompt block). EOF before that, a JSON
/// error after HTTP 200 (as `data:` or as raw text), or silence longer than the idle timeout
/// is a failed attempt, never a partial success.
async fn read_gemini_stream(
    response: reqwest::Response,
    model: &str,
    call: &Call<'_>,
) -> Result<Completion, ProviderError> {
    let mut bytes = response.bytes_stream();
    let mut parser = SseParser::new();
    let mut assembly = GeminiAssembly::default();
    let mut stray = String::new();
    loop {
        let next = match tokio::time::timeout(call.idle_timeout, bytes.next()).await {
            Ok(next) => next,
            // The terminal chunk already arrived; a connection left open adds nothing.
            Err(_) if assembly.finished() => break,
            Err(_) => {
                return Err(interrupted(
                    assembly.usage,
                    format!("stream stalled for {:?}", call.idle_timeout),
                ));
            }
        };
        let events = match next {
            Some(Ok(chunk)) => parser.feed(&chunk),
            Some(Err(_)) if assembly.finished() => break,
            Some(Err(e)) => {
                return Err(interrupted(
                    assembly.usage,
                    format!(
                        "stream broke: {}",
                        ProviderError::transport(PROVIDER_TYPE, &e).message
                    ),
                ));
            }
            None => {
                if let Some(event) = parser.finish() {
                    handle_stream_event(event, &mut assembly, &mut stray, call)?;
                }
                break;
            }
        };
        if parser.too_long() {
            return Err(ProviderError {
                usage: assembly.usage,
                ..ProviderError::too_large(PROVIDER_TYPE)
            });
        }
        for event in events {
            handle_stream_event(event, &mut assembly, &mut stray, call)?;
        }
    }
    if !assembly.finished() {
        let message = if stray.trim().is_empty() {
            "stream ended without a finishReason".to_owned()
        } else {
            "stream ended with text that is neither SSE nor a JSON error".to_owned()
        };
        return Err(ProviderError {
            raw_response: (!stray.trim().is_empty()).then(|| excerpt(&stray, EXCERPT_BYTES)),
            ..interrupted(assembly.usage, message)
        });
    }
    Ok(assembly.into_completion(model))
}

/// One SSE event: raw (non-SSE) text is buffered until it parses as JSON (a Google error may
/// arrive pretty-printed over many lines); `data:` is a `GenerateContentResponse` or an error.
fn handle_stream_event(
    event: SseEvent,
    assembly: &mut GeminiAssembly,
    stray: &mut String,
    call: &Call<'_>,
) -> Result<(), ProviderError> {
    if !event.stray.is_empty() {
        if !stray.is_empty() {
            stray.push('\n');
        }
        stray.push_str(&event.stray);
        if let Ok(value) = serde_json::from_str::<Value>(stray.trim()) {
            if let Some(error) = error_object(&value) {
                return Err(ProviderError {
                    raw_response: Some(excerpt(stray, EXCERPT_BYTES)),
                    ..embedded_error(error, assembly.usage, ErrorClass::StreamInterrupted)
                });
            }
            // Whole JSON that is not an error carries nothing for us.
            stray.clear();
        } else if stray.len() > MAX_STRAY_BYTES {
            return Err(ProviderError {
                raw_response: Some(excerpt(stray, EXCERPT_BYTES)),
                ..interrupted(assembly.usage, "stream carries text that is not SSE")
            });
        }
    }
    let data = event.data.trim();
    if data.is_empty() {
        return Ok(());
    }
    let value: Value = serde_json::from_str(data).map_err(|_| ProviderError {
        raw_response: Some(excerpt(data, EXCERPT_BYTES)),
        ..interrupted(assembly.usage, "stream chunk is not JSON")
    })?;
    if let Some(error) = error_object(&value) {
        return Err(ProviderError {
            raw_response: Some(excerpt(data, EXCERPT_BYTES)),
            ..embedded_error(error, assembly.usage, ErrorClass::StreamInterrupted)
        });
    }
    let chunk: GeminiResponse = serde_json::from_value(value).map_err(|e| ProviderError {
        raw_response: Some(excerpt(data, EXCERPT_BYTES)),
        ..interrupted(
            assembly.usage,
            format!("stream chunk is not a GenerateContentResponse: {e}"),
        )
    })?;
    assembly.add(chunk, call.on_delta);
    Ok(())
}

/// An `error` object that arrived after HTTP 200. Overload and rate/quota limits keep their
/// class (they steer backoff and key rotation); anything else is `fallback`, because the
/// request was accepted and may well succeed on another attempt.
fn embedded_error(error: &Value, usage: Option<Usage>, fallback: ErrorClass) -> ProviderError {
    let detail = GeminiErrorDetail::from_error(error);
    let class = match detail.http_status() {
        Some(status) => match classify(status, &detail) {
            class @ (ErrorClass::Overloaded
            | ErrorClass::RateLimited
            | ErrorClass::QuotaExhausted) => class,
            _ => fallback,
        },
        None => fallback,
    };
    let message = if detail.message.is_empty() {
        "error after HTTP 200".to_owned()
    } else {
        format!("error after HTTP 200: {}", excerpt(&detail.message, 400))
    };
    ProviderError {
        usage,
        retry_after: plausible(detail.retry_delay),
        raw_response: Some(excerpt(&error.to_string(), EXCERPT_BYTES)),
        ..ProviderError::new(PROVIDER_TYPE, class, message)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------------

/// The `error` object of a Google RPC error body, unwrapping the one-element array wrapper.
fn error_object(value: &Value) -> Option<&Value> {
    let top = match value {
        Value::Array(items) => items.first()?,
        other => other,
    };
    top.get("error").filter(|e| !e.is_null())
}

/// What a Google RPC `error` says, gathered leniently (wrong types are simply absent).
#[derive(Debug, Default)]
struct GeminiErrorDetail {
    /// `error.code`: the HTTP status the error stands for.
    code: Option<u16>,
    /// `error.status`: the RPC code name (`INVALID_ARGUMENT`, `RESOURCE_EXHAUSTED`, …).
    status: String,
    message: String,
    /// `google.rpc.ErrorInfo.reason` values (`API_KEY_INVALID`, …).
    reasons: Vec<String>,
    /// `google.rpc.QuotaFailure` violations' `quotaId` values.
    quota_ids: Vec<String>,
    /// A violation reports a quota value of zero (the free tier is not available at all).
    zero_quota: bool,
    /// `google.rpc.RetryInfo.retryDelay`.
    retry_delay: Option<Duration>,
}

impl GeminiErrorDetail {
    fn from_body(body: &str) -> Self {
        serde_json::from_str::<Value>(body.trim_start())
            .ok()
            .as_ref()
            .and_then(error_object)
            .map(Self::from_error)
            .unwrap_or_default()
    }

    fn from_error(error: &Value) -> Self {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_owned();
        if let Value::String(message) = error {
            return Self {
                message: message.clone(),
                ..Self::default()
            };
        }
        let mut detail = Self {
            code: error.get("code").and_then(|c| {
                c.as_u64()
                    .or_else(|| c.as_str().and_then(|s| s.trim().parse().ok()))
                    .and_then(|n| u16::try_from(n).ok())
            }),
            status: text(error.get("status")),
            message: text(error.get("message")),
            ..Self::default()
        };
        let details = error.get("details").and_then(Value::as_array);
        for item in details.into_iter().flatten() {
            let kind = item.get("@type").and_then(Value::as_str).unwrap_or("");
            if let Some(reason) = item.get("reason").and_then(Value::as_str) {
                detail.reasons.push(reason.to_owned());
            }
            if kind.ends_with("QuotaFailure") {
                let violations = item.get("violations").and_then(Value::as_array);
                for violation in violations.into_iter().flatten() {
                    if let Some(id) = violation.get("quotaId").and_then(Value::as_str) {
                        detail.quota_ids.push(id.to_owned());
                    }
                    let value = violation.get("quotaValue");
                    if value.and_then(Value::as_str).map(str::trim) == Some("0")
                        || value.and_then(Value::as_u64) == Some(0)
                    {
                        detail.zero_quota = true;
                    }
                }
            }
            if kind.ends_with("RetryInfo") {
                detail.retry_delay = match item.get("retryDelay") {
                    Some(Value::String(delay)) => retry_delay_text(delay),
                    // The proto-JSON object form, `{"seconds": …, "nanos": …}`.
                    Some(Value::Object(delay)) => {
                        let seconds = delay.get("seconds").and_then(|s| {
                            s.as_u64()
                                .or_else(|| s.as_str().and_then(|s| s.trim().parse().ok()))
                        });
                        let nanos = delay.get("nanos").and_then(Value::as_u64).unwrap_or(0);
                        seconds.and_then(|s| {
                            Duration::from_secs(s)
                                .checked_add(Duration::from_nanos(nanos.min(999_999_999)))
                        })
                    }
                    _ => None,
                };
            }
        }
        detail
    }

    /// The HTTP status this error stands for: `code`, else the RPC code name's mapping.
    fn http_status(&self) -> Option<u16> {
        self.code
            .filter(|c| (100..600).contains(c))
            .or(match self.status.as_str() {
                "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE" => Some(400),
                "UNAUTHENTICATED" => Some(401),
                "PERMISSION_DENIED" => Some(403),
                "NOT_FOUND" => Some(404),
                "ABORTED" | "ALREADY_EXISTS" => Some(409),
                "RESOURCE_EXHAUSTED" => Some(429),
                "CANCELLED" => Some(499),
                "INTERNAL" | "UNKNOWN" | "DATA_LOSS" => Some(500),
                "UNIMPLEMENTED" => Some(501),
                "UNAVAILABLE" => Some(503),
                "DEADLINE_EXCEEDED" => Some(504),
                _ => None,
            })
    }

    /// The key itself is bad: `ErrorInfo.reason` `API_KEY_INVALID` (also `API_KEY_EXPIRED`,
    /// `API_KEY_IP_ADDRESS_BLOCKED`, …), or the message says so when details are missing.
    fn bad_key(&self) -> bool {
        self.reasons.iter().any(|r| r.starts_with("API_KEY_"))
            || self.message.contains("API key not valid")
            || self.message.contains("API key expired")
    }

    fn context_too_long(&self) -> bool {
        let message = self.message.to_ascii_lowercase();
        message.contains("exceeds the maximum number of tokens")
            || message.contains("input context is too long")
    }

    /// A 429 that will not clear within seconds: a per-day quota or a zero free-tier limit.
    fn quota_exhausted(&self) -> bool {
        self.zero_quota
            || self.quota_ids.iter().any(|id| id.contains("PerDay"))
            || self.message.contains("limit: 0")
    }
}

/// `parse_go_duration` and `retry_after_from_headers` hand their numbers to
/// `Duration::from_secs_f64`, which panics on values past `u64::MAX` seconds. A broken or
/// hostile body or header must not take a worker down, so absurd values are refused here
/// before they reach those helpers: a delay string is at most 32 characters with no run of
/// more than 12 digits (at most ~7e15 s, far inside the limit).
fn retry_delay_text(delay: &str) -> Option<Duration> {
    let delay = delay.trim();
    let mut run = 0usize;
    let mut longest = 0usize;
    for c in delay.chars() {
        run = if c.is_ascii_digit() { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    (delay.len() <= 32 && longest <= 12)
        .then(|| parse_go_duration(delay))
        .flatten()
}

/// `retry_after_from_headers`, unless a numeric delay header is too large to be a
/// `Duration` (see [`retry_delay_text`]); such a header is ignored.
fn header_retry_delay(headers: &HeaderMap) -> Option<Duration> {
    let absurd = ["retry-after-ms", "retry-after"].into_iter().any(|name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .is_some_and(|v| v > 1e12)
    });
    if absurd {
        None
    } else {
        retry_after_from_headers(headers)
    }
}

/// §4.5/§6 classification: HTTP status first, refined by `error.status` and `details`.
fn classify(status: u16, detail: &GeminiErrorDetail) -> ErrorClass {
    match status {
        400 if detail.bad_key() => ErrorClass::Auth,
        // "User location is not supported" / "free tier not available, enable billing": the
        // request is fine but this account cannot use the API until an operator acts, which
        // is quota exhaustion (disable the key, fail over) rather than a bad payload.
        400 if detail.status == "FAILED_PRECONDITION" => ErrorClass::QuotaExhausted,
        400 if detail.context_too_long() => ErrorClass::ContextLength,
        401 | 403 => ErrorClass::Auth,
        402 => ErrorClass::QuotaExhausted,
        408 => ErrorClass::Timeout,
        409 => ErrorClass::Conflict,
        429 if detail.quota_exhausted() => ErrorClass::QuotaExhausted,
        429 => ErrorClass::RateLimited,
        // 499 `CANCELLED` means the connection was cancelled. If we had closed it we would not
        // be reading a response, so a 499 we receive comes from the server or a proxy giving
        // up on the request: nothing is wrong with the payload, and a retry may succeed.
        499 => ErrorClass::Timeout,
        503 => ErrorClass::Overloaded,
        504 => ErrorClass::Timeout,
        500..=599 => ErrorClass::ServerError,
        _ => ErrorClass::InvalidRequest,
    }
}

/// Maps an error status (then the body's `error.status` and `details`) to an error class.
/// Never fails: a body that is not JSON (an HTML page from a proxy) still classifies by status.
/// The retry delay comes from `google.rpc.RetryInfo`, else from `retry-after` headers.
pub fn handle_gemini_error(status: u16, headers: &HeaderMap, body: &str) -> ProviderError {
    let detail = GeminiErrorDetail::from_body(body);
    let class = classify(status, &detail);
    let message = if detail.message.is_empty() {
        format!("HTTP {status}: {}", excerpt(body.trim(), 200))
    } else {
        format!("HTTP {status}: {}", excerpt(&detail.message, 400))
    };
    ProviderError {
        status: Some(status),
        raw_response: Some(excerpt(body, EXCERPT_BYTES)),
        retry_after: plausible(detail.retry_delay)
            .or_else(|| plausible(header_retry_delay(headers))),
        ..ProviderError::new(PROVIDER_TYPE, class, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::ApiKey;
    use crate::providers::test_support::serve;
    use base64::Engine;
    use reqwest::header::HeaderValue;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use wiremock::matchers::{header, method, path, query_param};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const MODEL: &str = "gemini-2.5-flash";

    /// A thinking model's answer: a thought summary, a signature-only part, then the text.
    const COMPLETION: &str = r#"
    {
      "candidates": [
        {
          "content": {
            "parts": [
              {"text": "The user asks about Oslo weather.", "thought": true},
              {"thoughtSignature": "CiQB0e2Kb3mGkUu5Wp"},
              {"text": "Oslo is "},
              {"text": "cold today."}
            ],
            "role": "model"
          },
          "finishReason": "STOP",
          "index": 0,
          "safetyRatings": [{"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"}]
        }
      ],
      "usageMetadata": {
        "promptTokenCount": 120,
        "candidatesTokenCount": 7,
        "totalTokenCount": 177,
        "cachedContentTokenCount": 100,
        "toolUsePromptTokenCount": 10,
        "thoughtsTokenCount": 40,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 120}]
      },
      "modelVersion": "gemini-2.5-flash",
      "responseId": "mK3xaPq0Kf2x1MkP7o2gqAk"
    }"#;

    const RATE_LIMITED: &str = r#"{
      "error": {
        "code": 429,
        "message": "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.\n* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 10, model: gemini-2.5-flash\nPlease retry in 38.863719904s.",
        "status": "RESOURCE_EXHAUSTED",
        "details": [
          {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [
              {
                "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"},
                "quotaValue": "10"
              }
            ]
          },
          {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [{"description": "Learn more about Gemini API quotas", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]
          },
          {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "38.863719904s"}
        ]
      }
    }"#;

    const PER_DAY: &str = r#"{
      "error": {
        "code": 429,
        "message": "You exceeded your current quota, please check your plan and billing details.\n* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 250, model: gemini-2.5-flash",
        "status": "RESOURCE_EXHAUSTED",
        "details": [
          {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [
              {
                "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"},
                "quotaValue": "250"
              }
            ]
          },
          {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "17s"}
        ]
      }
    }"#;

    const API_KEY_INVALID: &str = r#"{
      "error": {
        "code": 400,
        "message": "API key not valid. Please pass a valid API key.",
        "status": "INVALID_ARGUMENT",
        "details": [
          {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "API_KEY_INVALID",
            "domain": "googleapis.com",
            "metadata": {"service": "generativelanguage.googleapis.com"}
          },
          {
            "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
            "locale": "en-US",
            "message": "API key not valid. Please pass a valid API key."
          }
        ]
      }
    }"#;

    const OVERLOADED: &str = r#"{
      "error": {
        "code": 503,
        "message": "The model is overloaded. Please try again later.",
        "status": "UNAVAILABLE"
      }
    }"#;

    fn key() -> ApiKey {
        ApiKey {
            id: "main".to_owned(),
            secret: "gm-test-key".into(),
        }
    }

    /// A provider at `base_url` that fetches images from any address: the tests serve them
    /// on 127.0.0.1.
    fn provider(base_url: &str) -> GeminiProvider {
        GeminiProvider::new(
            reqwest::Client::new(),
            base_url.to_owned(),
            ImageFetcher::new(true),
        )
    }

    fn chat(value: Value) -> ChatRequest {
        serde_json::from_value(value).unwrap()
    }

    fn hello() -> ChatRequest {
        chat(json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 50}))
    }

    /// The JSON body the adapter would send for `request`.
    async fn body_of(request: Value) -> Result<Value, ProviderError> {
        let request = chat(request);
        let body = provider("http://127.0.0.1:9")
            .request_body(&request, Duration::from_secs(2))
            .await?;
        Ok(serde_json::to_value(&body).unwrap())
    }

    fn parse(body: &str) -> Completion {
        parse_gemini_response(body, MODEL).unwrap()
    }

    fn choice(completion: &Completion) -> &Value {
        &completion.response["choices"][0]
    }

    async fn call(server: &MockServer, timeout: Duration) -> Result<Completion, ProviderError> {
        let key = key();
        let call = Call {
            key: Some(&key),
            timeout,
            idle_timeout: Duration::from_secs(2),
            on_delta: None,
        };
        provider(&server.uri())
            .complete(&hello(), MODEL, &call)
            .await
    }

    // ---- request translation ----------------------------------------------------------------

    #[tokio::test]
    async fn system_and_developer_messages_become_the_system_instruction_and_roles_are_renamed() {
        let body = body_of(json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Bonjour."},
            {"role": "user", "content": "Weather?"}
        ]}))
        .await
        .unwrap();
        assert_eq!(
            body["systemInstruction"],
            json!({"parts": [{"text": "Be brief."}, {"text": "Answer in French."}]})
        );
        assert_eq!(
            body["contents"],
            json!([
                {"role": "user", "parts": [{"text": "Hi"}]},
                {"role": "model", "parts": [{"text": "Bonjour."}]},
                {"role": "user", "parts": [{"text": "Weather?"}]}
            ])
        );
        assert!(body.get("generationConfig").is_none(), "{body}");
        assert!(body.get("tools").is_none() && body.get("toolConfig").is_none());
    }

    #[tokio::test]
    async fn consecutive_turns_of_the_same_role_are_merged_and_empty_ones_dropped() {
        let body = body_of(json!({"messages": [
            {"role": "user", "content": "first"},
            {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "text", "text": "third"}]},
            {"role": "assistant", "content": "a"},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": null}
        ]}))
        .await
        .unwrap();
        assert_eq!(
            body["contents"],
            json!([
                {"role": "user", "parts": [{"text": "first"}, {"text": "second"}, {"text": "third"}]},
                {"role": "model", "parts": [{"text": "a"}, {"text": "b"}]}
            ])
        );
    }

    #[tokio::test]
    async fn a_request_with_only_a_system_message_is_invalid() {
        let err = body_of(json!({"messages": [{"role": "system", "content": "x"}]}))
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidRequest);
        let err = body_of(json!({"messages": [{"role": "critic", "content": "x"}]}))
            .await
            .unwrap_err();
        assert!(err.message.contains("\"critic\""), "{}", err.message);
    }

    #[tokio::test]
    async fn a_data_url_image_becomes_inline_data() {
        let body = body_of(json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}
        ]}]}))
        .await
        .unwrap();
        assert_eq!(
            body["contents"][0]["parts"],
            json!([
                {"text": "What is this?"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}
            ])
        );
    }

    #[tokio::test]
    async fn an_http_image_is_downloaded_and_inlined() {
        let server = MockServer::start().await;
        let png: &[u8] = &[0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
        Mock::given(method("GET"))
            .and(path("/cat.png"))
            .respond_with(
                ResponseTemplate::new(200)
                    .insert_header("content-type", "image/png")
                    .set_body_bytes(png),
            )
            .expect(1)
            .mount(&server)
            .await;
        let url = format!("{}/cat.png", server.uri());
        let body = body_of(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}
        ]}]}))
        .await
        .unwrap();
        assert_eq!(
            body["contents"][0]["parts"][0]["inlineData"],
            json!({
                "mimeType": "image/png",
                "data": base64::engine::general_purpose::STANDARD.encode(png)
            })
        );
    }

    /// Where images may come from is the provider's setting: by default not from a private
    /// address such as the test server's.
    #[tokio::test]
    async fn images_on_private_addresses_are_fetched_only_when_the_provider_allows_it() {
        let server = images::serve_png().await;
        let request = chat(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": format!("{}/cat.png", server.uri())}}
        ]}]}));
        for (setting, allowed) in [("", false), ("allow_private_image_hosts = true\n", true)] {
            let settings = crate::config::Settings::from_toml(&format!(
                "[[providers]]\nname = \"g\"\nkind = \"gemini\"\nbase_url = \"http://127.0.0.1:9\"\n\
                 keys = [{{ id = \"k\", env = \"K\" }}]\n{setting}"
            ))
            .unwrap();
            let registry =
                crate::providers::Registry::from_settings(&settings, &reqwest::Client::new());
            let crate::providers::Provider::Gemini(gemini) = &registry.get("g").unwrap().client
            else {
                panic!("not a gemini provider");
            };
            match gemini.request_body(&request, Duration::from_secs(5)).await {
                Ok(_) => assert!(allowed, "fetched from a private address by default"),
                Err(error) => {
                    assert!(!allowed, "{setting:?}: {}", error.message);
                    assert!(
                        error.message.contains("allow_private_image_hosts"),
                        "{}",
                        error.message
                    );
                }
            }
        }
    }

    /// Fetching the images takes part of the call's timeout: an image that took 0.7 s of a 1 s
    /// timeout leaves the call 0.3 s, and a provider answering in 0.7 s is then too late. The
    /// whole call ends within its timeout, which its reservations are held for.
    #[tokio::test]
    async fn the_images_and_the_call_share_the_calls_timeout() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/cat.png"))
            .respond_with(
                ResponseTemplate::new(200)
                    .insert_header("content-type", "image/png")
                    .set_body_bytes(&b"png"[..])
                    .set_delay(Duration::from_millis(700)),
            )
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_string(COMPLETION)
                    .set_delay(Duration::from_millis(700)),
            )
            .mount(&server)
            .await;
        let request = chat(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": format!("{}/cat.png", server.uri())}}
        ]}]}));
        let key = key();
        let call = |timeout| Call {
            key: Some(&key),
            timeout,
            idle_timeout: Duration::from_secs(2),
            on_delta: None,
        };
        let err = provider(&server.uri())
            .complete(&request, MODEL, &call(Duration::from_secs(1)))
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Timeout, "{}", err.message);
        // Given the time for both, the same call succeeds.
        provider(&server.uri())
            .complete(&request, MODEL, &call(Duration::from_secs(5)))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_image_that_cannot_be_fetched_is_an_invalid_request() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(404))
            .expect(1)
            .mount(&server)
            .await;
        let url = format!("{}/gone.png", server.uri());
        let err = body_of(json!({"messages": [
            {"role": "user", "content": "look"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
        ]}))
        .await
        .unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidRequest);
        assert!(err.message.contains("messages[1]"), "{}", err.message);
        assert!(err.message.contains("HTTP 404"), "{}", err.message);
    }

    #[tokio::test]
    async fn a_broken_data_url_is_an_invalid_request_that_says_why() {
        let err = body_of(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}
        ]}]}))
        .await
        .unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidRequest);
        assert!(err.message.contains("not valid base64"), "{}", err.message);
    }

    #[tokio::test]
    async fn generation_config_carries_the_cap_sampling_and_stop_settings() {
        let body = body_of(json!({
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 10, "max_completion_tokens": 100, "temperature": 1.5,
            "top_p": 0.9, "seed": 7, "stop": "END", "n": 1, "user": "u-1"
        }))
        .await
        .unwrap();
        assert_eq!(
            body["generationConfig"],
            json!({"maxOutputTokens": 100, "temperature": 1.5, "topP": 0.9, "seed": 7, "stopSequences": ["END"]})
        );
        assert!(body.get("n").is_none() && body.get("user").is_none());
    }

    #[tokio::test]
    async fn more_than_five_stop_sequences_is_an_invalid_request_naming_the_limit() {
        let five = body_of(json!({"messages": [{"role": "user", "content": "hi"}],
            "stop": ["a", "b", "c", "d", "e"]}))
        .await
        .unwrap();
        assert_eq!(
            five["generationConfig"]["stopSequences"],
            json!(["a", "b", "c", "d", "e"])
        );
        let err = body_of(json!({"messages": [{"role": "user", "content": "hi"}],
            "stop": ["a", "b", "c", "d", "e", "f"]}))
        .await
        .unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidRequest);
        assert!(err.message.contains("at most 5"), "{}", err.message);
    }

    #[tokio::test]
    async fn json_response_formats_set_the_mime_type_and_schema() {
        let schema = json!({"type": "object", "properties": {"city": {"type": "string"}},
            "required": ["city"], "additionalProperties": false});
        let body = body_of(json!({"messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": true}}}))
        .await
        .unwrap();
        assert_eq!(
            body["generationConfig"],
            json!({"responseMimeType": "application/json", "responseJsonSchema": schema})
        );
        let body = body_of(json!({"messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"}}))
        .await
        .unwrap();
        assert_eq!(
            body["generationConfig"],
            json!({"responseMimeType": "application/json"})
        );
    }

    #[tokio::test]
    async fn function_tools_and_every_tool_choice_are_translated() {
        let parameters = json!({"type": "object", "properties": {"city": {"type": "string"}},
            "required": ["city"], "additionalProperties": false});
        let tools = json!([{"type": "function", "function": {"name": "get_weather",
            "description": "Current weather for a city", "parameters": parameters, "strict": true}}]);
        let cases = [
            (json!("auto"), json!({"mode": "AUTO"})),
            (json!("required"), json!({"mode": "ANY"})),
            (json!("none"), json!({"mode": "NONE"})),
            (
                json!({"type": "function", "function": {"name": "get_weather"}}),
                json!({"mode": "ANY", "allowedFunctionNames": ["get_weather"]}),
            ),
        ];
        for (choice, expected) in cases {
            let body = body_of(json!({"messages": [{"role": "user", "content": "hi"}],
                "tools": tools, "tool_choice": choice}))
            .await
            .unwrap();
            assert_eq!(
                body["tools"],
                json!([{"functionDeclarations": [{"name": "get_weather",
                    "description": "Current weather for a city", "parametersJsonSchema": parameters}]}])
            );
            assert_eq!(
                body["toolConfig"],
                json!({"functionCallingConfig": expected})
            );
        }
    }

    #[tokio::test]
    async fn tool_calls_and_tool_results_become_function_call_and_function_response_parts() {
        let body = body_of(json!({"messages": [
            {"role": "user", "content": "Weather in Oslo and Bergen?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"},
                 "extra_content": {"google": {"thought_signature": "sig-1"}}},
                {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{\"city\":\"Bergen\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_0", "content": "{\"temp_c\": 4}"},
            {"role": "tool", "tool_call_id": "call_1", "content": "14:05"}
        ]}))
        .await
        .unwrap();
        assert_eq!(
            body["contents"],
            json!([
                {"role": "user", "parts": [{"text": "Weather in Oslo and Bergen?"}]},
                {"role": "model", "parts": [
                    {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}, "thoughtSignature": "sig-1"},
                    {"functionCall": {"name": "get_time", "args": {"city": "Bergen"}}}
                ]},
                {"role": "user", "parts": [
                    {"functionResponse": {"name": "get_weather", "response": {"temp_c": 4}}},
                    {"functionResponse": {"name": "get_time", "response": {"content": "14:05"}}}
                ]}
            ])
        );
    }

    #[tokio::test]
    async fn bad_tool_call_arguments_and_unknown_tool_results_are_invalid_requests() {
        let err = body_of(json!({"messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                "function": {"name": "f", "arguments": "{\"city\":"}}]}
        ]}))
        .await
        .unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidRequest);
        assert!(err.message.contains("not valid JSON"), "{}", err.message);
        let err = body_of(json!({"messages": [
            {"role": "user", "content": "hi"},
            {"role": "tool", "tool_call_id": "call_9", "content": "x"}
        ]}))
        .await
        .unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidRequest);
        assert!(err.message.contains("call_9"), "{}", err.message);
    }

    #[test]
    fn endpoints_keep_the_prefix_never_double_models_and_encode_the_name() {
        let gemini = provider("https://proxy.example/gemini/");
        assert_eq!(
            gemini.endpoint("gemini-2.5-flash", false).unwrap(),
            "https://proxy.example/gemini/v1beta/models/gemini-2.5-flash:generateContent"
        );
        assert_eq!(
            gemini.endpoint("models/gemini-2.5-flash", true).unwrap(),
            "https://proxy.example/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        );
        assert_eq!(
            gemini.endpoint("../x?key=1#f y", false).unwrap(),
            "https://proxy.example/gemini/v1beta/models/..%2Fx%3Fkey%3D1%23f%20y:generateContent"
        );
        assert_eq!(
            provider("https://g.example/v1beta")
                .endpoint("m", false)
                .unwrap(),
            "https://g.example/v1beta/models/m:generateContent"
        );
        assert!(
            gemini
                .endpoint("models/", false)
                .unwrap_err()
                .contains("empty")
        );
    }

    // ---- responses --------------------------------------------------------------------------

    #[tokio::test]
    async fn a_completion_is_fetched_with_the_key_in_a_header_and_parsed() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1beta/models/gemini-2.5-flash:generateContent"))
            .and(header("x-goog-api-key", "gm-test-key"))
            .respond_with(ResponseTemplate::new(200).set_body_string(COMPLETION))
            .expect(1)
            .mount(&server)
            .await;
        let completion = call(&server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            choice(&completion)["message"]["content"],
            "Oslo is cold today."
        );
        assert_eq!(choice(&completion)["finish_reason"], "stop");
        assert_eq!(choice(&completion)["native_finish_reason"], "STOP");
        assert_eq!(completion.response["id"], "mK3xaPq0Kf2x1MkP7o2gqAk");
        assert_eq!(completion.response["model"], "gemini-2.5-flash");
        let requests = server.received_requests().await.unwrap();
        assert_eq!(
            requests[0].url.query(),
            None,
            "the key must not be in the URL"
        );
        let sent: Value = serde_json::from_slice(&requests[0].body).unwrap();
        assert_eq!(
            sent["contents"],
            json!([{"role": "user", "parts": [{"text": "hello"}]}])
        );
        assert_eq!(sent["generationConfig"]["maxOutputTokens"], 50);
    }

    #[test]
    fn thought_parts_are_excluded_and_parts_without_text_tolerated() {
        let completion = parse(COMPLETION);
        assert_eq!(
            choice(&completion)["message"]["content"],
            "Oslo is cold today."
        );
        assert!(choice(&completion)["message"].get("tool_calls").is_none());
    }

    #[test]
    fn usage_counts_tool_prompts_in_input_and_thoughts_in_output() {
        let completion = parse(COMPLETION);
        assert_eq!(
            completion.usage,
            Usage {
                input_tokens: 130,
                cached_input_tokens: 100,
                cache_write_tokens: 0,
                output_tokens: 47,
                reasoning_tokens: 40,
            }
        );
        assert_eq!(completion.response["usage"]["total_tokens"], 177);
    }

    #[test]
    fn function_call_parts_become_tool_calls_with_a_tool_calls_finish() {
        let body = r#"{"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}, "thoughtSignature": "sig-a"},
            {"functionCall": {"name": "get_weather", "args": {"city": "Bergen"}}}
          ]}, "finishReason": "STOP", "index": 0}],
          "usageMetadata": {"promptTokenCount": 50, "candidatesTokenCount": 12, "totalTokenCount": 62},
          "modelVersion": "gemini-2.5-flash", "responseId": "r1"}"#;
        let completion = parse(body);
        let message = &choice(&completion)["message"];
        assert_eq!(message["content"], Value::Null);
        assert_eq!(
            message["tool_calls"],
            json!([
                {"id": "call_0", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"},
                 "extra_content": {"google": {"thought_signature": "sig-a"}}},
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Bergen\"}"}}
            ])
        );
        assert_eq!(choice(&completion)["finish_reason"], "tool_calls");
        assert_eq!(choice(&completion)["native_finish_reason"], "STOP");
    }

    #[test]
    fn every_finish_reason_maps_to_its_canonical_value() {
        let rows = [
            ("STOP", "stop"),
            ("MAX_TOKENS", "length"),
            ("SAFETY", "content_filter"),
            ("RECITATION", "content_filter"),
            ("BLOCKLIST", "content_filter"),
            ("PROHIBITED_CONTENT", "content_filter"),
            ("SPII", "content_filter"),
            ("IMAGE_SAFETY", "content_filter"),
            ("IMAGE_PROHIBITED_CONTENT", "content_filter"),
            ("IMAGE_RECITATION", "content_filter"),
            ("LANGUAGE", "other"),
            ("OTHER", "other"),
            ("MALFORMED_FUNCTION_CALL", "other"),
            ("UNEXPECTED_TOOL_CALL", "other"),
            ("TOO_MANY_TOOL_CALLS", "other"),
            ("NO_IMAGE", "other"),
            ("FINISH_REASON_UNSPECIFIED", "other"),
            ("SOMETHING_NEW", "other"),
        ];
        for (native, canonical) in rows {
            let body =
                json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "x"}]},
                "finishReason": native, "index": 0}]})
                .to_string();
            let completion = parse(&body);
            assert_eq!(choice(&completion)["finish_reason"], canonical, "{native}");
            assert_eq!(choice(&completion)["native_finish_reason"], native);
        }
        // Blocked output usually has no content at all.
        let blocked = parse(
            r#"{"candidates": [{"finishReason": "SAFETY", "index": 0,
                "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": true}]}]}"#,
        );
        assert_eq!(choice(&blocked)["message"]["content"], Value::Null);
        assert_eq!(choice(&blocked)["finish_reason"], "content_filter");
    }

    #[test]
    fn a_blocked_prompt_is_a_content_filter_completion_without_content() {
        let body = r#"{
          "promptFeedback": {
            "blockReason": "PROHIBITED_CONTENT",
            "safetyRatings": [{"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "NEGLIGIBLE"}]
          },
          "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
          "modelVersion": "gemini-2.5-flash",
          "responseId": "b1"
        }"#;
        let completion = parse(body);
        assert_eq!(choice(&completion)["message"]["content"], Value::Null);
        assert_eq!(choice(&completion)["finish_reason"], "content_filter");
        assert_eq!(
            choice(&completion)["native_finish_reason"],
            "PROHIBITED_CONTENT"
        );
        assert_eq!(completion.usage.input_tokens, 9);
        assert_eq!(completion.usage.output_tokens, 0);
    }

    #[test]
    fn unusable_200_bodies_are_server_errors_that_keep_the_body() {
        let err = parse_gemini_response("{\"candidates\": [tru", MODEL).unwrap_err();
        assert_eq!(err.class, ErrorClass::ServerError);
        assert_eq!(err.raw_response.as_deref(), Some("{\"candidates\": [tru"));
        let err = parse_gemini_response(r#"{"usageMetadata": {}}"#, MODEL).unwrap_err();
        assert_eq!(err.class, ErrorClass::ServerError);
        assert!(err.message.contains("no candidates"), "{}", err.message);
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
        let err = call(&server, Duration::from_millis(100)).await.unwrap_err();
        assert_eq!(err.class, ErrorClass::Timeout);
    }

    #[tokio::test]
    async fn a_call_without_a_key_is_an_auth_error_and_sends_nothing() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_string(COMPLETION))
            .expect(0)
            .mount(&server)
            .await;
        let call = Call {
            key: None,
            timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            on_delta: None,
        };
        let err = provider(&server.uri())
            .complete(&hello(), MODEL, &call)
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Auth);
    }

    // ---- errors -----------------------------------------------------------------------------

    fn google_error(code: u16, status: &str, message: &str) -> String {
        json!({"error": {"code": code, "message": message, "status": status}}).to_string()
    }

    #[test]
    fn every_row_of_the_error_table_maps_to_its_class() {
        let none = HeaderMap::new();
        let limit_zero = r#"{"error": {"code": 429, "message": "You exceeded your current quota.\n* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_input_token_count, limit: 0, model: gemini-2.5-pro", "status": "RESOURCE_EXHAUSTED"}}"#;
        let cases: Vec<(u16, String, ErrorClass)> = vec![
            (
                400,
                google_error(
                    400,
                    "INVALID_ARGUMENT",
                    "* GenerateContentRequest.contents: contents is not specified\n",
                ),
                ErrorClass::InvalidRequest,
            ),
            (400, API_KEY_INVALID.to_owned(), ErrorClass::Auth),
            (
                400,
                google_error(
                    400,
                    "INVALID_ARGUMENT",
                    "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).",
                ),
                ErrorClass::ContextLength,
            ),
            (
                400,
                google_error(
                    400,
                    "FAILED_PRECONDITION",
                    "User location is not supported for the API use.",
                ),
                ErrorClass::QuotaExhausted,
            ),
            (
                401,
                google_error(
                    401,
                    "UNAUTHENTICATED",
                    "Request had invalid authentication credentials.",
                ),
                ErrorClass::Auth,
            ),
            (
                402,
                google_error(
                    402,
                    "RESOURCE_EXHAUSTED",
                    "Your prepaid credits are depleted.",
                ),
                ErrorClass::QuotaExhausted,
            ),
            (
                403,
                google_error(
                    403,
                    "PERMISSION_DENIED",
                    "Method doesn't allow unregistered callers (callers without established identity).",
                ),
                ErrorClass::Auth,
            ),
            (
                404,
                google_error(
                    404,
                    "NOT_FOUND",
                    "models/gemini-9 is not found for API version v1beta, or is not supported for generateContent.",
                ),
                ErrorClass::InvalidRequest,
            ),
            (408, String::new(), ErrorClass::Timeout),
            (
                409,
                google_error(409, "ABORTED", "Conflict."),
                ErrorClass::Conflict,
            ),
            (
                413,
                "<html>Request Entity Too Large</html>".to_owned(),
                ErrorClass::InvalidRequest,
            ),
            (429, RATE_LIMITED.to_owned(), ErrorClass::RateLimited),
            (429, PER_DAY.to_owned(), ErrorClass::QuotaExhausted),
            (429, limit_zero.to_owned(), ErrorClass::QuotaExhausted),
            (
                499,
                google_error(499, "CANCELLED", "The operation was cancelled."),
                ErrorClass::Timeout,
            ),
            (
                500,
                google_error(
                    500,
                    "INTERNAL",
                    "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
                ),
                ErrorClass::ServerError,
            ),
            (
                501,
                google_error(501, "UNIMPLEMENTED", "Not implemented."),
                ErrorClass::ServerError,
            ),
            (
                502,
                "<html><head><title>502 Bad Gateway</title></head><body>Bad Gateway</body></html>"
                    .to_owned(),
                ErrorClass::ServerError,
            ),
            (503, OVERLOADED.to_owned(), ErrorClass::Overloaded),
            (
                504,
                google_error(
                    504,
                    "DEADLINE_EXCEEDED",
                    "Deadline expired before operation could complete.",
                ),
                ErrorClass::Timeout,
            ),
            // Array-wrapped and whitespace-led bodies are still read: without the details these
            // would be invalid_request and rate_limited.
            (400, format!("[{API_KEY_INVALID}]"), ErrorClass::Auth),
            (
                429,
                format!("\n\n  [{PER_DAY}]"),
                ErrorClass::QuotaExhausted,
            ),
        ];
        for (status, body, class) in &cases {
            let err = handle_gemini_error(*status, &none, body);
            assert_eq!(err.class, *class, "HTTP {status} {body}");
            assert_eq!(err.status, Some(*status));
            assert_eq!(err.provider_type, PROVIDER_TYPE);
            assert_eq!(
                err.raw_response.as_deref(),
                Some(excerpt(body, 512).as_str())
            );
        }
    }

    #[test]
    fn the_key_error_is_recognised_by_its_reason_alone() {
        let body = API_KEY_INVALID.replace(
            "API key not valid. Please pass a valid API key.",
            "Bad request.",
        );
        assert_eq!(
            handle_gemini_error(400, &HeaderMap::new(), &body).class,
            ErrorClass::Auth
        );
    }

    #[test]
    fn retry_info_sets_the_retry_delay_before_any_header() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("7"));
        let err = handle_gemini_error(429, &headers, RATE_LIMITED);
        assert_eq!(err.retry_after, Some(Duration::from_secs_f64(38.863719904)));
        let err = handle_gemini_error(
            429,
            &headers,
            &google_error(429, "RESOURCE_EXHAUSTED", "slow down"),
        );
        assert_eq!(err.retry_after, Some(Duration::from_secs(7)));
        let err = handle_gemini_error(429, &HeaderMap::new(), "");
        assert_eq!(err.retry_after, None);
    }

    #[test]
    fn error_messages_name_the_status_and_the_provider_message() {
        let err = handle_gemini_error(503, &HeaderMap::new(), OVERLOADED);
        assert_eq!(
            err.message,
            "HTTP 503: The model is overloaded. Please try again later."
        );
        let html = "<html><body>502 Bad Gateway</body></html>";
        let err = handle_gemini_error(502, &HeaderMap::new(), html);
        assert_eq!(err.message, format!("HTTP 502: {html}"));
    }

    #[test]
    fn hostile_error_bodies_and_headers_never_panic() {
        let deep = "[".repeat(5000);
        let long = "é".repeat(2000);
        let bodies = [
            "",
            "null",
            "[]",
            "[1]",
            "{\"error\": null}",
            "{\"error\": []}",
            "{\"error\": \"quota gone\"}",
            "{\"error\": {\"code\": \"x\", \"status\": 5, \"details\": {}}}",
            "{\"error\": {\"code\": 99999999999, \"details\": [1, null, {\"@type\": 3}]}}",
            r#"{"error": {"code": 429, "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "99999999999999999999999s"}]}}"#,
            r#"{"error": {"code": 429, "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": {"seconds": 18446744073709551615, "nanos": 999999999}}]}}"#,
            r#"{"error": {"code": 429, "details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [null, {"quotaId": 1}]}]}}"#,
            deep.as_str(),
            long.as_str(),
        ];
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("1e30"));
        for status in [0, 200, 400, 429, 503, 999] {
            for body in bodies {
                let err = handle_gemini_error(status, &headers, body);
                assert!(err.message.starts_with(&format!("HTTP {status}: ")));
                assert_eq!(err.retry_after, None, "{body}");
            }
        }
        let err = handle_gemini_error(429, &HeaderMap::new(), bodies[10]);
        assert_eq!(err.retry_after, None);
    }

    // ---- streaming --------------------------------------------------------------------------

    const STREAM: &str = concat!(
        "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Considering greetings.\", \"thought\": true}],\"role\": \"model\"},\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 12,\"totalTokenCount\": 12},\"modelVersion\": \"gemini-2.5-flash\",\"responseId\": \"s1\"}\r\n\r\n",
        "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Hel\"}],\"role\": \"model\"},\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 12,\"candidatesTokenCount\": 1,\"totalTokenCount\": 13},\"modelVersion\": \"gemini-2.5-flash\",\"responseId\": \"s1\"}\r\n\r\n",
        "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"lo\"}],\"role\": \"model\"},\"finishReason\": \"STOP\",\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 12,\"candidatesTokenCount\": 2,\"thoughtsTokenCount\": 5,\"totalTokenCount\": 19},\"modelVersion\": \"gemini-2.5-flash\",\"responseId\": \"s1\"}\r\n\r\n",
    );

    /// Streams `body` from a wiremock server; returns the result and the deltas seen.
    async fn stream(body: &str) -> (Result<Completion, ProviderError>, Vec<String>) {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(
                "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            ))
            .and(query_param("alt", "sse"))
            .and(header("x-goog-api-key", "gm-test-key"))
            .respond_with(
                ResponseTemplate::new(200)
                    .insert_header("content-type", "text/event-stream")
                    .set_body_string(body),
            )
            .expect(1)
            .mount(&server)
            .await;
        stream_from(&server.uri(), Duration::from_secs(2)).await
    }

    async fn stream_from(
        base_url: &str,
        idle_timeout: Duration,
    ) -> (Result<Completion, ProviderError>, Vec<String>) {
        let deltas = Mutex::new(Vec::new());
        let on_delta = |d: &str| deltas.lock().unwrap().push(d.to_owned());
        let key = key();
        let call = Call {
            key: Some(&key),
            timeout: Duration::from_secs(5),
            idle_timeout,
            on_delta: Some(&on_delta),
        };
        let result = provider(base_url).complete(&hello(), MODEL, &call).await;
        (result, deltas.into_inner().unwrap())
    }

    #[tokio::test]
    async fn a_stream_is_assembled_in_order_with_its_final_usage() {
        let (result, deltas) = stream(STREAM).await;
        let completion = result.unwrap();
        assert_eq!(deltas, ["Hel", "lo"]);
        assert_eq!(choice(&completion)["message"]["content"], "Hello");
        assert_eq!(choice(&completion)["finish_reason"], "stop");
        assert_eq!(completion.response["id"], "s1");
        assert_eq!(
            completion.usage,
            Usage {
                input_tokens: 12,
                cached_input_tokens: 0,
                cache_write_tokens: 0,
                output_tokens: 7,
                reasoning_tokens: 5,
            }
        );
    }

    #[tokio::test]
    async fn a_stream_that_ends_without_a_finish_reason_is_interrupted() {
        let cut = STREAM
            .split("\r\n\r\n")
            .take(2)
            .collect::<Vec<_>>()
            .join("\r\n\r\n");
        let (result, deltas) = stream(&cut).await;
        assert_eq!(deltas, ["Hel"]);
        let err = result.unwrap_err();
        assert_eq!(err.class, ErrorClass::StreamInterrupted);
        assert!(err.is_retryable());
        // Usage already reported is kept (it is billed), partial text is not.
        assert_eq!(err.usage.map(|u| u.input_tokens), Some(12));
    }

    #[tokio::test]
    async fn a_raw_json_error_mid_stream_is_classified_by_its_status() {
        let body = format!(
            "data: {{\"candidates\": [{{\"content\": {{\"parts\": [{{\"text\": \"Hel\"}}], \"role\": \"model\"}}, \"index\": 0}}]}}\r\n\r\n{OVERLOADED}\n"
        );
        let (result, deltas) = stream(&body).await;
        assert_eq!(deltas, ["Hel"]);
        let err = result.unwrap_err();
        assert_eq!(err.class, ErrorClass::Overloaded);
        assert!(err.message.contains("overloaded"), "{}", err.message);
    }

    #[tokio::test]
    async fn an_error_object_in_a_data_event_keeps_its_rate_limit_and_delay() {
        let compact: Value = serde_json::from_str(RATE_LIMITED).unwrap();
        let body = format!("data: {compact}\r\n\r\n");
        let (result, _) = stream(&body).await;
        let err = result.unwrap_err();
        assert_eq!(err.class, ErrorClass::RateLimited);
        assert_eq!(err.retry_after, Some(Duration::from_secs_f64(38.863719904)));
        let other = format!(
            "data: {}\r\n\r\n",
            google_error(500, "INTERNAL", "An internal error has occurred.")
        );
        let (result, _) = stream(&other).await;
        assert_eq!(result.unwrap_err().class, ErrorClass::StreamInterrupted);
    }

    #[tokio::test]
    async fn an_error_status_on_the_stream_endpoint_is_classified() {
        let server = serve(503, OVERLOADED).await;
        let (result, deltas) = stream_from(&server.uri(), Duration::from_secs(2)).await;
        let err = result.unwrap_err();
        assert_eq!(err.class, ErrorClass::Overloaded);
        assert_eq!(err.status, Some(503));
        assert!(deltas.is_empty());
    }

    /// A server that sends the headers and `first` as one chunk, then goes silent with the
    /// connection open (the socket is returned so it lives until the test ends).
    async fn silent_after(listener: tokio::net::TcpListener, first: &str) -> tokio::net::TcpStream {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = vec![0u8; 64 * 1024];
        let _ = socket.read(&mut request).await.unwrap();
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        let chunk = format!("{:x}\r\n{first}\r\n", first.len());
        socket.write_all(head.as_bytes()).await.unwrap();
        socket.write_all(chunk.as_bytes()).await.unwrap();
        socket.flush().await.unwrap();
        socket
    }

    #[tokio::test]
    async fn a_stream_that_stalls_before_its_finish_reason_is_interrupted() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let first = STREAM.split("\r\n\r\n").nth(1).unwrap().to_owned() + "\r\n\r\n";
        let (_socket, (result, deltas)) = tokio::join!(
            silent_after(listener, &first),
            stream_from(&base, Duration::from_millis(300))
        );
        assert_eq!(deltas, ["Hel"]);
        let err = result.unwrap_err();
        assert_eq!(err.class, ErrorClass::StreamInterrupted);
        assert!(err.message.contains("stalled"), "{}", err.message);
    }

    #[tokio::test]
    async fn a_stream_left_open_after_its_finish_reason_still_completes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (_socket, (result, deltas)) = tokio::join!(
            silent_after(listener, STREAM),
            stream_from(&base, Duration::from_millis(300))
        );
        assert_eq!(deltas, ["Hel", "lo"]);
        assert_eq!(choice(&result.unwrap())["message"]["content"], "Hello");
    }
}
