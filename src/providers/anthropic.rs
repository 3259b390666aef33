//! Anthropic Messages API (`POST {base_url}/v1/messages`), non-streaming and streaming, per
//! `providers-wire.md` §3.
//!
//! Requests arrive OpenAI-shaped and are translated here: system and developer messages become
//! the top-level `system` prompt, `tool` messages become `tool_result` blocks of a user turn,
//! assistant `tool_calls` become `tool_use` blocks, and consecutive turns of the same role are
//! merged into one message (content is always sent as a block array). OpenAI fields with no
//! Anthropic equivalent (`n`, `seed`, penalties, `logprobs`, …) are dropped. Responses come
//! back as the normalised OpenAI `chat.completion` object built by [`chat_completion`].

use super::transport::{Endpoint, Transport};
use super::{Answer, EXCERPT_BYTES, send};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::images::parse_data_url;
use super::sse::{SseEvent, SseParser};
use super::{
    Call, Completion, ErrorClass, ProviderError, chat_completion, excerpt, finish,
    retry_after_from_headers,
};
use crate::messages::{ChatMessage, ChatRequest, Usage};

/// Wire-format name used in errors and attempts.
pub const PROVIDER_TYPE: &str = "anthropic";

/// The API version every request pins (ANT-PY `_client.py`).
const ANTHROPIC_VERSION: &str = "2023-06-01";

/// `max_tokens` is required by Anthropic; this is sent when the job sets no cap.
const DEFAULT_MAX_TOKENS: u32 = 4096;

/// Appended to the system prompt for `response_format: {"type":"json_object"}`, which has no
/// native Anthropic equivalent.
const JSON_OBJECT_INSTRUCTION: &str = "Respond with a single JSON object.";

/// Media types Anthropic accepts for base64 image sources.
const BASE64_MEDIA_TYPES: &[&str] = &["image/jpeg", "image/png", "image/gif", "image/webp"];

/// The limits of the `anthropic-ratelimit-{kind}-{remaining,reset}` headers.
const RATE_LIMIT_KINDS: &[&str] = &["requests", "tokens", "input-tokens", "output-tokens"];

/// 429 `error.details.error_code` values that mean a spend cap, not a transient limit.
const SPEND_LIMIT_CODES: &[&str] = &[
    "enforced_spend_limit_reached",
    "contract_spend_limit_reached",
];

/// Phrases of 400 messages that mean the prompt does not fit the model's context window
/// ("prompt is too long: 208310 tokens > 200000 maximum", "input length and `max_tokens`
/// exceed context limit: …").
const CONTEXT_PHRASES: &[&str] = &[
    "prompt is too long",
    "context limit",
    "context window",
    "context length",
];

/// A client for one Anthropic base URL.
#[derive(Debug)]
pub struct AnthropicProvider {
    http: Transport,
    /// `{base_url}/v1/messages`, as the official SDK builds it; `base_url` is the API root
    /// without `/v1` (`https://api.anthropic.com`), possibly with a proxy's path prefix.
    endpoint: Endpoint,
}

// ---------------------------------------------------------------------------------------------
// Request wire format
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct AnthropicRequestBody<'a> {
    model: &'a str,
    max_tokens: u32,
    messages: Vec<AnthropicMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop_sequences: Vec<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<AnthropicTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<AnthropicToolChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_config: Option<AnthropicOutputConfig<'a>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Debug, Serialize)]
struct AnthropicMessage<'a> {
    role: AnthropicRole,
    content: Vec<AnthropicContentBlock<'a>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum AnthropicRole {
    User,
    Assistant,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum AnthropicContentBlock<'a> {
    Text {
        text: &'a str,
    },
    Image {
        source: AnthropicImageSource<'a>,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Value,
    },
    ToolResult {
        tool_use_id: &'a str,
        /// Text and image blocks only; omitted for an empty result.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        content: Vec<AnthropicContentBlock<'a>>,
    },
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum AnthropicImageSource<'a> {
    /// `data` is the base64 payload without the `data:` prefix.
    Base64 {
        media_type: String,
        data: String,
    },
    Url {
        url: &'a str,
    },
}

#[derive(Debug, Serialize)]
struct AnthropicTool<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    input_schema: Cow<'a, Value>,
}

#[derive(Debug, Serialize)]
struct AnthropicToolChoice<'a> {
    /// `auto`, `any`, `none` or `tool`.
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    /// Set from OpenAI `parallel_tool_calls: false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    disable_parallel_tool_use: Option<bool>,
}

#[derive(Debug, Serialize)]
struct AnthropicOutputConfig<'a> {
    format: AnthropicOutputFormat<'a>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum AnthropicOutputFormat<'a> {
    JsonSchema { schema: &'a Value },
}

/// What the job's `response_format` asks for.
enum ResponseFormat<'a> {
    Text,
    JsonObject,
    JsonSchema(&'a Value),
}

fn invalid(message: impl Into<String>) -> ProviderError {
    ProviderError::new(PROVIDER_TYPE, ErrorClass::InvalidRequest, message)
}

impl<'a> AnthropicRequestBody<'a> {
    /// Translates an OpenAI-shaped request. Anything that cannot be expressed on the
    /// Anthropic wire is an `invalid_request` naming the offending field.
    fn new(request: &'a ChatRequest, model: &'a str, stream: bool) -> Result<Self, ProviderError> {
        let mut system: Vec<&'a str> = Vec::new();
        let mut messages: Vec<AnthropicMessage<'a>> = Vec::new();
        for (i, message) in request.messages.iter().enumerate() {
            let at = format!("messages[{i}]");
            let (role, blocks) = match message.role.as_str() {
                "system" | "developer" => {
                    system.extend(system_texts(&message.content, &at)?);
                    continue;
                }
                "user" => (AnthropicRole::User, content_blocks(&message.content, &at)?),
                "assistant" => (AnthropicRole::Assistant, assistant_blocks(message, &at)?),
                "tool" => (AnthropicRole::User, vec![tool_result_block(message, &at)?]),
                other => {
                    return Err(invalid(format!(
                        "{at}: role {other:?} is not supported by the Anthropic Messages API"
                    )));
                }
            };
            push_turn(&mut messages, role, blocks);
        }
        if messages.is_empty() {
            return Err(invalid(
                "the request has no user or assistant content to send to Anthropic",
            ));
        }

        let extra = &request.extra;
        let format = response_format(extra.get("response_format"))?;
        let mut system = system.join("\n\n");
        if matches!(format, ResponseFormat::JsonObject) {
            // Anthropic has no JSON mode without a schema: an instruction in the system
            // prompt is the closest equivalent, so the output is likely, not guaranteed, JSON.
            if !system.is_empty() {
                system.push_str("\n\n");
            }
            system.push_str(JSON_OBJECT_INSTRUCTION);
        }
        let output_config = match format {
            ResponseFormat::JsonSchema(schema) => Some(AnthropicOutputConfig {
                format: AnthropicOutputFormat::JsonSchema { schema },
            }),
            ResponseFormat::Text | ResponseFormat::JsonObject => None,
        };

        let temperature = match request.temperature {
            None => None,
            Some(t) if (0.0..=1.0).contains(&t) => Some(t),
            // OpenAI-shaped jobs may ask for up to 2.0; Anthropic accepts 0..=1. Clamping
            // (rather than rescaling by 1/2) keeps every value ≤ 1 meaning the same on every
            // provider, and reads "hotter than 1" as "as hot as Anthropic allows".
            Some(t) if t > 1.0 && t <= 2.0 => Some(1.0),
            Some(t) => {
                return Err(invalid(format!(
                    "temperature {t} is outside the range 0 to 2"
                )));
            }
        };
        // Recent Claude models reject `temperature` and `top_p` together, so `temperature`
        // wins when a job sets both.
        let top_p = extra
            .get("top_p")
            .and_then(Value::as_f64)
            .filter(|_| temperature.is_none());

        let tools = tools(extra.get("tools"))?;
        let parallel_off = extra.get("parallel_tool_calls").and_then(Value::as_bool) == Some(false)
            && !tools.is_empty();
        let tool_choice = tool_choice(extra.get("tool_choice"), parallel_off)?;

        Ok(Self {
            model,
            max_tokens: request.output_cap().unwrap_or(DEFAULT_MAX_TOKENS),
            messages,
            system: (!system.is_empty()).then_some(system),
            temperature,
            top_p,
            stop_sequences: stop_sequences(extra.get("stop"))?,
            tools,
            tool_choice,
            output_config,
            stream,
        })
    }
}

/// Appends a turn, merging it into the previous one when the role repeats (Anthropic merges
/// consecutive same-role turns anyway; doing it here keeps `tool_result` blocks and the user
/// text that follows them in one message). Turns without content are dropped: Anthropic
/// rejects empty messages.
fn push_turn<'a>(
    messages: &mut Vec<AnthropicMessage<'a>>,
    role: AnthropicRole,
    blocks: Vec<AnthropicContentBlock<'a>>,
) {
    if blocks.is_empty() {
        return;
    }
    match messages.last_mut() {
        Some(last) if last.role == role => last.content.extend(blocks),
        _ => messages.push(AnthropicMessage {
            role,
            content: blocks,
        }),
    }
}

/// The text of a system or developer message (string or text parts).
fn system_texts<'a>(content: &'a Value, at: &str) -> Result<Vec<&'a str>, ProviderError> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(text) => Ok((!text.is_empty())
            .then_some(text.as_str())
            .into_iter()
            .collect()),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .filter(|(_, part)| part.get("text").and_then(Value::as_str) != Some(""))
            .map(|(j, part)| match part.get("type").and_then(Value::as_str) {
                Some("text") => part.get("text").and_then(Value::as_str).ok_or_else(|| {
                    invalid(format!(
                        "{at}.content[{j}]: text part has no \"text\" string"
                    ))
                }),
                _ => Err(invalid(format!(
                    "{at}.content[{j}]: system messages may only hold text parts"
                ))),
            })
            .collect(),
        _ => Err(invalid(format!(
            "{at}.content must be a string, null or an array of content parts"
        ))),
    }
}

/// Text and image blocks of a user, assistant or tool message's `content`.
fn content_blocks<'a>(
    content: &'a Value,
    at: &str,
) -> Result<Vec<AnthropicContentBlock<'a>>, ProviderError> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(text) if text.is_empty() => Ok(Vec::new()),
        Value::String(text) => Ok(vec![AnthropicContentBlock::Text { text }]),
        Value::Array(parts) => {
            let mut blocks = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                blocks.extend(part_block(part, &format!("{at}.content[{j}]"))?);
            }
            Ok(blocks)
        }
        _ => Err(invalid(format!(
            "{at}.content must be a string, null or an array of content parts"
        ))),
    }
}

/// One OpenAI content part; `None` for an empty text part (Anthropic rejects empty text
/// blocks).
fn part_block<'a>(
    part: &'a Value,
    at: &str,
) -> Result<Option<AnthropicContentBlock<'a>>, ProviderError> {
    let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        // An assistant's `refusal` part is text the model produced; replay it as text.
        "text" | "refusal" => {
            let text = part
                .get(kind)
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(format!("{at}: {kind} part has no {kind:?} string")))?;
            Ok((!text.is_empty()).then_some(AnthropicContentBlock::Text { text }))
        }
        "image_url" => image_block(part, at).map(Some),
        other => Err(invalid(format!(
            "{at}: content part type {other:?} is not supported by the Anthropic adapter"
        ))),
    }
}

/// An `image_url` part: a `data:` URL becomes a base64 source, an http(s) URL a URL source.
fn image_block<'a>(part: &'a Value, at: &str) -> Result<AnthropicContentBlock<'a>, ProviderError> {
    let url = match part.get("image_url") {
        Some(Value::String(url)) => Some(url.as_str()),
        Some(object) => object.get("url").and_then(Value::as_str),
        None => None,
    }
    .ok_or_else(|| invalid(format!("{at}: image_url part has no url")))?;
    if url.starts_with("data:") {
        let image = parse_data_url(url).map_err(|e| invalid(format!("{at}: {e}")))?;
        let media_type = image.mime.to_ascii_lowercase();
        if !BASE64_MEDIA_TYPES.contains(&media_type.as_str()) {
            return Err(invalid(format!(
                "{at}: image media type {:?} is not supported by Anthropic \
                 (use image/jpeg, image/png, image/gif or image/webp)",
                image.mime
            )));
        }
        return Ok(AnthropicContentBlock::Image {
            source: AnthropicImageSource::Base64 {
                media_type,
                data: image.base64,
            },
        });
    }
    match url::Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "https" | "http") => {
            Ok(AnthropicContentBlock::Image {
                source: AnthropicImageSource::Url { url },
            })
        }
        _ => Err(invalid(format!(
            "{at}: image URL {:?} is neither an https URL nor a data: URL",
            excerpt(url, 80)
        ))),
    }
}

/// An assistant turn: its text, then one `tool_use` block per OpenAI tool call.
fn assistant_blocks<'a>(
    message: &'a ChatMessage,
    at: &str,
) -> Result<Vec<AnthropicContentBlock<'a>>, ProviderError> {
    let mut blocks = content_blocks(&message.content, at)?;
    match message.extra.get("tool_calls") {
        None | Some(Value::Null) => {}
        Some(Value::Array(calls)) => {
            for (j, call) in calls.iter().enumerate() {
                blocks.push(tool_use_block(call, &format!("{at}.tool_calls[{j}]"))?);
            }
        }
        Some(_) => return Err(invalid(format!("{at}.tool_calls must be an array"))),
    }
    Ok(blocks)
}

/// `{"id","type":"function","function":{"name","arguments":<JSON string>}}` → `tool_use`.
fn tool_use_block<'a>(
    call: &'a Value,
    at: &str,
) -> Result<AnthropicContentBlock<'a>, ProviderError> {
    if let Some(kind) = call.get("type").and_then(Value::as_str)
        && kind != "function"
    {
        return Err(invalid(format!(
            "{at}: tool call type {kind:?} is not supported by the Anthropic adapter"
        )));
    }
    let id = call
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{at} has no id")))?;
    let name = call
        .pointer("/function/name")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{at} has no function.name")))?;
    let input = match call.pointer("/function/arguments") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        // Some clients send "" for a call without arguments.
        Some(Value::String(arguments)) if arguments.trim().is_empty() => Value::Object(Map::new()),
        Some(Value::String(arguments)) => serde_json::from_str(arguments).map_err(|e| {
            invalid(format!(
                "{at} ({name}): function.arguments is not valid JSON: {e}"
            ))
        })?,
        Some(other) => other.clone(),
    };
    if !input.is_object() {
        return Err(invalid(format!(
            "{at} ({name}): function.arguments must encode a JSON object (Anthropic tool_use input)"
        )));
    }
    Ok(AnthropicContentBlock::ToolUse { id, name, input })
}

/// A `tool` message → a `tool_result` block (sent in a user turn).
fn tool_result_block<'a>(
    message: &'a ChatMessage,
    at: &str,
) -> Result<AnthropicContentBlock<'a>, ProviderError> {
    let tool_use_id = message
        .extra
        .get("tool_call_id")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{at}: tool message has no tool_call_id")))?;
    Ok(AnthropicContentBlock::ToolResult {
        tool_use_id,
        content: content_blocks(&message.content, at)?,
    })
}

fn response_format(value: Option<&Value>) -> Result<ResponseFormat<'_>, ProviderError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(ResponseFormat::Text);
    };
    match value.get("type").and_then(Value::as_str) {
        Some("text") => Ok(ResponseFormat::Text),
        Some("json_object") => Ok(ResponseFormat::JsonObject),
        // A `json_schema` without a schema constrains nothing but "JSON": treat it as
        // `json_object` rather than failing a request OpenAI would accept.
        Some("json_schema") => Ok(value
            .pointer("/json_schema/schema")
            .filter(|schema| schema.is_object())
            .map_or(ResponseFormat::JsonObject, ResponseFormat::JsonSchema)),
        other => Err(invalid(format!(
            "response_format type {:?} is not supported by the Anthropic adapter",
            other.unwrap_or("")
        ))),
    }
}

fn stop_sequences(value: Option<&Value>) -> Result<Vec<&str>, ProviderError> {
    let not_strings = || invalid("stop must be a string or an array of strings");
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(stop)) => Ok(vec![stop.as_str()]),
        Some(Value::Array(stops)) => stops
            .iter()
            .map(|stop| stop.as_str().ok_or_else(not_strings))
            .collect(),
        Some(_) => Err(not_strings()),
    }
}

/// OpenAI function tools → `{"name","description","input_schema"}`.
fn tools(value: Option<&Value>) -> Result<Vec<AnthropicTool<'_>>, ProviderError> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(invalid("tools must be an array")),
    };
    items
        .iter()
        .enumerate()
        .map(|(j, tool)| {
            let at = format!("tools[{j}]");
            let kind = tool
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("function");
            if kind != "function" {
                return Err(invalid(format!(
                    "{at}: tool type {kind:?} is not supported by the Anthropic adapter \
                     (only function tools are)"
                )));
            }
            let function = tool
                .get("function")
                .ok_or_else(|| invalid(format!("{at} has no function")))?;
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(format!("{at} has no function.name")))?;
            let input_schema = match function.get("parameters") {
                None | Some(Value::Null) => Cow::Owned(json!({ "type": "object" })),
                // Anthropic requires `"type": "object"`; OpenAI accepts `{}` for "no
                // parameters".
                Some(Value::Object(schema)) if !schema.contains_key("type") => {
                    let mut schema = schema.clone();
                    schema.insert("type".to_owned(), Value::from("object"));
                    Cow::Owned(Value::Object(schema))
                }
                Some(schema @ Value::Object(_)) => Cow::Borrowed(schema),
                Some(_) => {
                    return Err(invalid(format!(
                        "{at} ({name}): function.parameters must be a JSON Schema object"
                    )));
                }
            };
            Ok(AnthropicTool {
                name,
                description: function.get("description").and_then(Value::as_str),
                input_schema,
            })
        })
        .collect()
}

/// `"auto"`→`auto`, `"required"`→`any`, `"none"`→`none`, a named function → `tool`.
fn tool_choice<'a>(
    value: Option<&'a Value>,
    parallel_off: bool,
) -> Result<Option<AnthropicToolChoice<'a>>, ProviderError> {
    let choice = |kind: &'static str, name: Option<&'a str>| {
        Some(AnthropicToolChoice {
            kind,
            name,
            // `none` has no such field on the Anthropic side.
            disable_parallel_tool_use: (parallel_off && kind != "none").then_some(true),
        })
    };
    match value {
        None | Some(Value::Null) if parallel_off => Ok(choice("auto", None)),
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(mode)) => match mode.as_str() {
            "auto" => Ok(choice("auto", None)),
            "required" => Ok(choice("any", None)),
            "none" => Ok(choice("none", None)),
            other => Err(invalid(format!("tool_choice {other:?} is not supported"))),
        },
        Some(object) => match (
            object.get("type").and_then(Value::as_str),
            object.pointer("/function/name").and_then(Value::as_str),
        ) {
            (Some("function"), Some(name)) => Ok(choice("tool", Some(name))),
            _ => Err(invalid(
                "tool_choice must be \"auto\", \"required\", \"none\" or \
                 {\"type\":\"function\",\"function\":{\"name\":…}}",
            )),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Response wire format
// ---------------------------------------------------------------------------------------------

/// A `message` object: the non-streaming response, and `message_start.message` of a stream.
#[derive(Debug, Deserialize)]
struct AnthropicResponse {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    content: Vec<AnthropicBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<AnthropicUsage>,
}

/// An output content block. `thinking`, `redacted_thinking`, server-tool blocks and future
/// types are `Other` and skipped.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum AnthropicBlock {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        #[serde(default)]
        id: String,
        #[serde(default)]
        name: String,
        #[serde(default)]
        input: Value,
    },
    #[serde(other)]
    Other,
}

/// Usage as reported; every field is optional because a streamed `message_delta.usage` may
/// carry only some of them (and nulls), each overriding the `message_start` value.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens_details: Option<AnthropicOutputTokensDetails>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct AnthropicOutputTokensDetails {
    #[serde(default)]
    thinking_tokens: Option<u64>,
}

impl AnthropicUsage {
    /// Applies a later, cumulative report: its non-null fields replace ours.
    fn update(&mut self, later: AnthropicUsage) {
        self.input_tokens = later.input_tokens.or(self.input_tokens);
        self.output_tokens = later.output_tokens.or(self.output_tokens);
        self.cache_creation_input_tokens = later
            .cache_creation_input_tokens
            .or(self.cache_creation_input_tokens);
        self.cache_read_input_tokens = later
            .cache_read_input_tokens
            .or(self.cache_read_input_tokens);
        let thinking = later
            .output_tokens_details
            .and_then(|d| d.thinking_tokens)
            .or(self.output_tokens_details.and_then(|d| d.thinking_tokens));
        self.output_tokens_details = thinking.map(|thinking_tokens| AnthropicOutputTokensDetails {
            thinking_tokens: Some(thinking_tokens),
        });
    }
}

impl From<AnthropicUsage> for Usage {
    /// §3.4: Anthropic's `input_tokens` excludes cache traffic, so the normalised input is
    /// the sum of the three; output already includes thinking.
    fn from(usage: AnthropicUsage) -> Self {
        let cache_write = usage.cache_creation_input_tokens.unwrap_or(0);
        let cache_read = usage.cache_read_input_tokens.unwrap_or(0);
        Usage {
            input_tokens: usage
                .input_tokens
                .unwrap_or(0)
                .saturating_add(cache_write)
                .saturating_add(cache_read),
            cached_input_tokens: cache_read,
            cache_write_tokens: cache_write,
            output_tokens: usage.output_tokens.unwrap_or(0),
            reasoning_tokens: usage
                .output_tokens_details
                .and_then(|d| d.thinking_tokens)
                .unwrap_or(0),
        }
    }
}

/// The canonical finish reason for a `stop_reason` (§6).
fn canonical_finish(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("end_turn" | "stop_sequence") => finish::STOP,
        Some("max_tokens" | "model_context_window_exceeded") => finish::LENGTH,
        Some("tool_use") => finish::TOOL_CALLS,
        Some("refusal") => finish::CONTENT_FILTER,
        // `pause_turn` (a server tool loop paused) and anything unknown.
        _ => finish::OTHER,
    }
}

/// An OpenAI `tool_calls` entry; `arguments` is the input serialised as a JSON string.
fn openai_tool_call(id: &str, name: &str, input: &Value) -> Value {
    let arguments = if input.is_null() {
        "{}".to_owned()
    } else {
        input.to_string()
    };
    json!({ "id": id, "type": "function", "function": { "name": name, "arguments": arguments } })
}

/// Builds the normalised completion shared by the non-streaming and streaming paths.
fn completion(
    id: Option<&str>,
    model: &str,
    text: &str,
    tool_calls: Vec<Value>,
    stop_reason: Option<&str>,
    usage: Usage,
) -> Completion {
    let tool_calls = (!tool_calls.is_empty()).then_some(Value::Array(tool_calls));
    // Like OpenAI: `content` is null when the model only called tools.
    let content = (!text.is_empty() || tool_calls.is_none()).then_some(text);
    let response = chat_completion(
        id.unwrap_or("msg"),
        model,
        content,
        tool_calls,
        canonical_finish(stop_reason),
        stop_reason,
        &usage,
    );
    Completion { response, usage }
}

impl AnthropicResponse {
    fn into_completion(self, requested_model: &str) -> Completion {
        let mut text = String::new();
        let mut tool_calls = Vec::new();
        for block in &self.content {
            match block {
                AnthropicBlock::Text { text: part } => text.push_str(part),
                AnthropicBlock::ToolUse { id, name, input } => {
                    tool_calls.push(openai_tool_call(id, name, input));
                }
                AnthropicBlock::Other => {}
            }
        }
        completion(
            self.id.as_deref(),
            self.model.as_deref().unwrap_or(requested_model),
            &text,
            tool_calls,
            self.stop_reason.as_deref(),
            self.usage.map(Usage::from).unwrap_or_default(),
        )
    }
}

fn malformed(text: &str, reason: String) -> ProviderError {
    ProviderError::malformed(PROVIDER_TYPE, text, reason)
}

/// An error object delivered with HTTP 200 (a stream's `event: error`, or a 200 body of type
/// `error`). `overloaded_error` is `overloaded`; anything else is `otherwise`.
fn error_after_200(value: &Value, usage: Option<Usage>, otherwise: ErrorClass) -> ProviderError {
    let error = value.get("error").unwrap_or(value);
    let kind = error.get("type").and_then(Value::as_str).unwrap_or("error");
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("no message");
    let class = if kind == "overloaded_error" {
        ErrorClass::Overloaded
    } else {
        otherwise
    };
    ProviderError {
        usage,
        raw_response: Some(excerpt(&value.to_string(), EXCERPT_BYTES)),
        ..ProviderError::new(
            PROVIDER_TYPE,
            class,
            format!("error after HTTP 200: {kind}: {}", excerpt(message, 400)),
        )
    }
}

/// Parses a 2xx body into a normalised completion; an unusable body is a server error.
pub(crate) fn parse_anthropic_response(
    text: &str,
    model: &str,
) -> Result<Completion, ProviderError> {
    let value: Value = serde_json::from_str(text.trim_start())
        .map_err(|e| malformed(text, format!("response body is not JSON: {e}")))?;
    if value.get("type").and_then(Value::as_str) == Some("error") {
        return Err(error_after_200(&value, None, ErrorClass::ServerError));
    }
    let parsed: AnthropicResponse = serde_json::from_value(value)
        .map_err(|e| malformed(text, format!("response is not a message: {e}")))?;
    Ok(parsed.into_completion(model))
}

// ---------------------------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------------------------

/// The stream events this adapter acts on; `ping`, `content_block_stop` and unknown types are
/// `Ignored`. `error` events are handled before this parse (their shape must never make the
/// parse fail).
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum AnthropicStreamEvent {
    MessageStart {
        message: AnthropicResponse,
    },
    ContentBlockStart {
        #[serde(default)]
        index: u64,
        content_block: AnthropicBlock,
    },
    ContentBlockDelta {
        #[serde(default)]
        index: u64,
        delta: AnthropicDelta,
    },
    MessageDelta {
        #[serde(default)]
        delta: AnthropicMessageDelta,
        #[serde(default)]
        usage: Option<AnthropicUsage>,
    },
    MessageStop,
    #[serde(other)]
    Ignored,
}

/// `thinking_delta`, `signature_delta`, `citations_delta` and future types are `Other`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum AnthropicDelta {
    TextDelta {
        #[serde(default)]
        text: String,
    },
    InputJsonDelta {
        #[serde(default)]
        partial_json: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Default, Deserialize)]
struct AnthropicMessageDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

/// A `tool_use` block being streamed.
struct StreamedToolUse {
    id: String,
    name: String,
    /// `content_block_start.content_block.input` (normally `{}`), used when no
    /// `input_json_delta` arrives.
    initial_input: Value,
    /// The concatenated `input_json_delta.partial_json` fragments.
    partial_json: String,
}

/// Whether the stream reached its terminal marker.
enum StreamStep {
    Continue,
    Stop,
}

/// Everything gathered from a stream so far.
#[derive(Default)]
struct AnthropicStreamState {
    id: Option<String>,
    model: Option<String>,
    text: String,
    /// `tool_use` blocks by content-block index, so calls come out in block order.
    tool_uses: BTreeMap<u64, StreamedToolUse>,
    /// `None` until `message_start` (or a `message_delta`) reports usage.
    usage: Option<AnthropicUsage>,
    stop_reason: Option<String>,
}

fn interrupted(usage: Option<Usage>, message: String) -> ProviderError {
    ProviderError {
        usage,
        ..ProviderError::new(PROVIDER_TYPE, ErrorClass::StreamInterrupted, message)
    }
}

impl AnthropicStreamState {
    /// Usage received so far, for errors (billed despite the failure).
    fn usage(&self) -> Option<Usage> {
        self.usage.map(Usage::from)
    }

    fn push_text(&mut self, delta: &str, call: &Call<'_>) {
        if delta.is_empty() {
            return;
        }
        self.text.push_str(delta);
        if let Some(on_delta) = call.on_delta {
            on_delta(delta);
        }
    }

    /// Applies one SSE event.
    fn apply(&mut self, event: &SseEvent, call: &Call<'_>) -> Result<StreamStep, ProviderError> {
        let data = event.data.trim();
        if data.is_empty() {
            return Ok(StreamStep::Continue);
        }
        let mut value: Value = serde_json::from_str(data).map_err(|_| ProviderError {
            raw_response: Some(excerpt(data, EXCERPT_BYTES)),
            ..interrupted(self.usage(), "stream event is not JSON".to_owned())
        })?;
        let name = event.event.as_deref().filter(|name| !name.is_empty());
        if name == Some("error") || value.get("type").and_then(Value::as_str) == Some("error") {
            return Err(error_after_200(
                &value,
                self.usage(),
                ErrorClass::StreamInterrupted,
            ));
        }
        // The payload's `type` repeats the event name; fill it in if a proxy dropped it.
        if let (Some(name), Some(object)) = (name, value.as_object_mut()) {
            object
                .entry("type")
                .or_insert_with(|| Value::from(name.to_owned()));
        }
        let parsed: AnthropicStreamEvent =
            serde_json::from_value(value).map_err(|e| ProviderError {
                raw_response: Some(excerpt(data, EXCERPT_BYTES)),
                ..interrupted(self.usage(), format!("stream event is malformed: {e}"))
            })?;
        match parsed {
            AnthropicStreamEvent::MessageStart { message } => {
                self.id = message.id;
                self.model = message.model;
                if let Some(usage) = message.usage {
                    self.usage.get_or_insert_default().update(usage);
                }
            }
            AnthropicStreamEvent::ContentBlockStart {
                index,
                content_block,
            } => match content_block {
                AnthropicBlock::Text { text } => self.push_text(&text, call),
                AnthropicBlock::ToolUse { id, name, input } => {
                    self.tool_uses.insert(
                        index,
                        StreamedToolUse {
                            id,
                            name,
                            initial_input: input,
                            partial_json: String::new(),
                        },
                    );
                }
                AnthropicBlock::Other => {}
            },
            AnthropicStreamEvent::ContentBlockDelta { index, delta } => match delta {
                AnthropicDelta::TextDelta { text } => self.push_text(&text, call),
                AnthropicDelta::InputJsonDelta { partial_json } => {
                    if let Some(tool_use) = self.tool_uses.get_mut(&index) {
                        tool_use.partial_json.push_str(&partial_json);
                    }
                }
                AnthropicDelta::Other => {}
            },
            AnthropicStreamEvent::MessageDelta { delta, usage } => {
                if delta.stop_reason.is_some() {
                    self.stop_reason = delta.stop_reason;
                }
                if let Some(usage) = usage {
                    self.usage.get_or_insert_default().update(usage);
                }
            }
            AnthropicStreamEvent::MessageStop => return Ok(StreamStep::Stop),
            AnthropicStreamEvent::Ignored => {}
        }
        Ok(StreamStep::Continue)
    }

    /// The completion of a stream that reached `message_stop`.
    fn finish(self, requested_model: &str) -> Result<Completion, ProviderError> {
        let usage = self.usage();
        let mut tool_calls = Vec::with_capacity(self.tool_uses.len());
        for (index, tool_use) in &self.tool_uses {
            let input = if tool_use.partial_json.trim().is_empty() {
                Cow::Borrowed(&tool_use.initial_input)
            } else {
                Cow::Owned(
                    serde_json::from_str::<Value>(&tool_use.partial_json).map_err(|e| {
                        ProviderError {
                            usage,
                            ..malformed(
                                &tool_use.partial_json,
                                format!(
                                    "streamed input of tool_use block {index} ({}) is not valid JSON: {e}",
                                    tool_use.name
                                ),
                            )
                        }
                    })?,
                )
            };
            tool_calls.push(openai_tool_call(&tool_use.id, &tool_use.name, &input));
        }
        Ok(completion(
            self.id.as_deref(),
            self.model.as_deref().unwrap_or(requested_model),
            &self.text,
            tool_calls,
            self.stop_reason.as_deref(),
            usage.unwrap_or_default(),
        ))
    }
}

/// Reads an Anthropic SSE stream. EOF before `message_stop`, an `error` event after HTTP 200,
/// or silence longer than the idle timeout is a failed attempt, never a partial success.
async fn read_anthropic_stream(
    response: reqwest::Response,
    model: &str,
    call: &Call<'_>,
) -> Result<Completion, ProviderError> {
    let mut bytes = response.bytes_stream();
    let mut parser = SseParser::new();
    let mut state = AnthropicStreamState::default();
    loop {
        let next = tokio::time::timeout(call.idle_timeout, bytes.next())
            .await
            .map_err(|_| {
                interrupted(
                    state.usage(),
                    format!("stream stalled for {:?}", call.idle_timeout),
                )
            })?;
        let (events, at_eof) = match next {
            Some(Ok(chunk)) => (parser.feed(&chunk), false),
            Some(Err(e)) => {
                return Err(interrupted(
                    state.usage(),
                    format!(
                        "stream broke: {}",
                        ProviderError::transport(PROVIDER_TYPE, &e).message
                    ),
                ));
            }
            // A last event may lack its blank line.
            None => (parser.finish().into_iter().collect(), true),
        };
        if parser.too_long() {
            return Err(ProviderError {
                usage: state.usage(),
                ..ProviderError::too_large(PROVIDER_TYPE)
            });
        }
        for event in &events {
            if let StreamStep::Stop = state.apply(event, call)? {
                return state.finish(model);
            }
        }
        if at_eof {
            return Err(interrupted(
                state.usage(),
                "stream ended before message_stop".to_owned(),
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Calls and errors
// ---------------------------------------------------------------------------------------------

impl AnthropicProvider {
    /// A client for `base_url` (`https://api.anthropic.com`, or a proxy such as
    /// `http://proxy/anthropic`); a trailing `/` is ignored.
    pub fn new(http: impl Into<Transport>, base_url: String) -> Self {
        Self {
            http: http.into(),
            endpoint: Endpoint::under(&base_url, "/v1/messages"),
        }
    }

    /// One Messages API call, streamed when the call has a delta receiver.
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
        let body = AnthropicRequestBody::new(request, model, call.streaming())?;
        let http = self.http.lease();
        let builder = self
            .endpoint
            .post(&http)
            .header("x-api-key", key_header)
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(&body);
        // The builder holds the serialized bytes: the body is not kept while the call is out.
        drop(body);
        match send(builder, call, PROVIDER_TYPE, handle_anthropic_error).await? {
            Answer::Stream(response) => read_anthropic_stream(response, model, call).await,
            Answer::Body(text) => parse_anthropic_response(&text, model),
        }
    }
}

/// The discriminators of an error body, empty when absent or when the body is not JSON
/// (Cloudflare's 413 page, a proxy's HTML).
#[derive(Debug, Default)]
struct AnthropicErrorFields {
    /// `error.type`, e.g. `rate_limit_error`.
    kind: String,
    /// `error.message`.
    message: String,
    /// `error.details.error_code`, e.g. `enforced_spend_limit_reached`.
    code: String,
}

fn error_fields(body: &str) -> AnthropicErrorFields {
    let value = serde_json::from_str::<Value>(body.trim_start()).unwrap_or(Value::Null);
    let error = value.get("error").unwrap_or(&Value::Null);
    let field = |found: Option<&Value>| match found {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    };
    match error {
        Value::String(message) => AnthropicErrorFields {
            message: message.clone(),
            ..AnthropicErrorFields::default()
        },
        _ => AnthropicErrorFields {
            kind: field(error.get("type")),
            message: field(error.get("message")),
            code: field(error.pointer("/details/error_code")),
        },
    }
}

/// The retry delay a response asks for: `retry-after-ms`/`retry-after`, else the reset time
/// of the exhausted `anthropic-ratelimit-*` limits.
fn retry_delay(headers: &HeaderMap) -> Option<Duration> {
    retry_after_from_headers(headers).or_else(|| reset_delay(headers, chrono::Utc::now()))
}

/// The wait until every exhausted limit (`…-remaining` = 0) has reset. §6 words it as "the
/// earliest relevant reset", but a retry cannot succeed before *all* exhausted limits reset,
/// so the latest one is taken (as `openai.rs` does). A reset in the past is no wait; one
/// beyond [`super::MAX_RETRY_AFTER`] is a broken header, left out as the same `retry-after`
/// would be.
fn reset_delay(headers: &HeaderMap, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let header = |name: String| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    RATE_LIMIT_KINDS
        .iter()
        .filter(|kind| header(format!("anthropic-ratelimit-{kind}-remaining")) == Some("0"))
        .filter_map(|kind| {
            let reset = header(format!("anthropic-ratelimit-{kind}-reset"))?;
            let at = chrono::DateTime::parse_from_rfc3339(reset).ok()?;
            super::plausible_retry_after(Some(
                (at.with_timezone(&chrono::Utc) - now)
                    .to_std()
                    .unwrap_or(Duration::ZERO),
            ))
        })
        .max()
}

/// Maps an error response to an error class: by HTTP status first, refined by `error.type`,
/// `error.details.error_code` and (for 400) the message. Never fails: a body that is not JSON
/// still classifies by status.
///
/// 413 (`request_too_large`, the 32 MB request-size limit enforced by Cloudflare) stays
/// `invalid_request` as in §6: it is a limit on bytes (images, documents), not on tokens, so
/// `context_length` (which lets policy fail over to a larger-context model) would not help.
pub fn handle_anthropic_error(status: u16, headers: &HeaderMap, body: &str) -> ProviderError {
    let fields = error_fields(body);
    let message = fields.message.to_lowercase();
    let about_context =
        CONTEXT_PHRASES.iter().any(|p| message.contains(p)) || fields.code.contains("context");
    let class = match status {
        400 if fields.kind == "billing_error" || message.contains("credit balance") => {
            ErrorClass::QuotaExhausted
        }
        400 if about_context => ErrorClass::ContextLength,
        401 | 403 => ErrorClass::Auth,
        402 => ErrorClass::QuotaExhausted,
        408 => ErrorClass::Timeout,
        409 => ErrorClass::Conflict,
        429 if SPEND_LIMIT_CODES.contains(&fields.code.as_str())
            || fields.kind == "billing_error" =>
        {
            ErrorClass::QuotaExhausted
        }
        429 => ErrorClass::RateLimited,
        503 | 529 => ErrorClass::Overloaded,
        504 => ErrorClass::Timeout,
        500..=599 if fields.kind == "overloaded_error" => ErrorClass::Overloaded,
        500..=599 if fields.kind == "timeout_error" => ErrorClass::Timeout,
        500..=599 => ErrorClass::ServerError,
        // 400, 404, 413, 422 and every other status.
        _ => ErrorClass::InvalidRequest,
    };
    let message = if !fields.message.is_empty() {
        format!("HTTP {status}: {}", excerpt(&fields.message, 400))
    } else if body.trim().is_empty() {
        format!("HTTP {status}: (empty body)")
    } else {
        format!("HTTP {status}: {}", excerpt(body.trim(), 200))
    };
    ProviderError {
        status: Some(status),
        raw_response: Some(excerpt(body, EXCERPT_BYTES)),
        retry_after: retry_delay(headers),
        ..ProviderError::new(PROVIDER_TYPE, class, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::ApiKey;
    use crate::providers::test_support::serve;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    /// A non-streaming response in the shape of the Messages API reference example, with
    /// prompt caching and extended thinking.
    const MESSAGE: &str = r#"{
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [
            {"type": "thinking", "thinking": "The user greets me.", "signature": "EqQBCgIYAhIM"},
            {"type": "text", "text": "Hi! My name is Claude."},
            {"type": "text", "text": " How can I help?", "citations": null}
        ],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {
            "input_tokens": 12,
            "cache_creation_input_tokens": 1500,
            "cache_read_input_tokens": 2000,
            "cache_creation": {"ephemeral_5m_input_tokens": 1500, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 40,
            "output_tokens_details": {"thinking_tokens": 9},
            "service_tier": "standard"
        }
    }"#;

    const TOOL_USE_MESSAGE: &str = r#"{
        "id": "msg_01Aq9w938a90dw8q",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [
            {"type": "text", "text": "I'll check the weather."},
            {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
             "input": {"location": "San Francisco, CA", "unit": "celsius"}}
        ],
        "stop_reason": "tool_use",
        "stop_sequence": null,
        "usage": {"input_tokens": 472, "output_tokens": 91}
    }"#;

    fn key() -> ApiKey {
        ApiKey {
            id: "main".to_owned(),
            secret: "sk-ant-test".into(),
        }
    }

    fn chat(request: Value) -> ChatRequest {
        serde_json::from_value(request).unwrap()
    }

    /// The wire body sent for `request`.
    fn body(request: Value) -> Value {
        let request = chat(request);
        serde_json::to_value(AnthropicRequestBody::new(&request, "claude-x", false).unwrap())
            .unwrap()
    }

    fn body_error(request: Value) -> ProviderError {
        let request = chat(request);
        AnthropicRequestBody::new(&request, "claude-x", false).unwrap_err()
    }

    fn hello() -> ChatRequest {
        chat(json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 50}))
    }

    async fn call(
        base_url: String,
        request: &ChatRequest,
        timeout: Duration,
    ) -> Result<Completion, ProviderError> {
        let key = key();
        let call = Call {
            key: Some(&key),
            timeout,
            idle_timeout: Duration::from_secs(2),
            on_delta: None,
        };
        AnthropicProvider::new(reqwest::Client::new(), base_url)
            .complete(request, "claude-x", &call)
            .await
    }

    async fn sent_body(server: &MockServer) -> Value {
        serde_json::from_slice(&server.received_requests().await.unwrap()[0].body).unwrap()
    }

    // --- request translation -----------------------------------------------------------------

    #[test]
    fn system_and_developer_messages_become_the_top_level_system_prompt() {
        let sent = body(json!({"messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]}
        ]}));
        assert_eq!(sent["system"], "You are terse.\n\nAnswer in French.");
        assert_eq!(
            sent["messages"],
            json!([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
        );
    }

    #[test]
    fn consecutive_same_role_turns_are_merged_and_empty_turns_dropped() {
        let sent = body(json!({"messages": [
            {"role": "user", "content": "one"},
            {"role": "user", "content": [{"type": "text", "text": "two"}, {"type": "text", "text": ""}]},
            {"role": "assistant", "content": "three"},
            {"role": "assistant", "content": null},
            {"role": "assistant", "content": "four"},
            {"role": "user", "content": "five"}
        ]}));
        assert_eq!(
            sent["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "three"}, {"type": "text", "text": "four"}]},
                {"role": "user", "content": [{"type": "text", "text": "five"}]}
            ])
        );
    }

    #[test]
    fn image_data_urls_become_base64_sources_and_https_urls_become_url_sources() {
        let sent = body(json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "Compare these."},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
            {"type": "image_url", "image_url": {"url": "https://upload.wikimedia.org/cat.jpg"}}
        ]}]}));
        assert_eq!(
            sent["messages"][0]["content"],
            json!([
                {"type": "text", "text": "Compare these."},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://upload.wikimedia.org/cat.jpg"}}
            ])
        );
    }

    #[test]
    fn a_broken_data_url_is_an_invalid_request_that_names_the_part_and_the_problem() {
        let err = body_error(json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}
        ]}]}));
        assert_eq!(err.class, ErrorClass::InvalidRequest);
        assert!(
            err.message.contains("messages[0].content[1]"),
            "{}",
            err.message
        );
        assert!(err.message.contains("not valid base64"), "{}", err.message);
    }

    #[test]
    fn images_anthropic_cannot_take_are_invalid_requests() {
        let bmp = body_error(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/bmp;base64,Qk0="}}
        ]}]}));
        assert_eq!(bmp.class, ErrorClass::InvalidRequest);
        assert!(bmp.message.contains("image/bmp"), "{}", bmp.message);
        let ftp = body_error(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "ftp://example.com/cat.png"}}
        ]}]}));
        assert_eq!(ftp.class, ErrorClass::InvalidRequest);
        assert!(
            ftp.message.contains("neither an https URL"),
            "{}",
            ftp.message
        );
    }

    #[test]
    fn unsupported_roles_and_content_parts_are_invalid_requests() {
        let role =
            body_error(json!({"messages": [{"role": "function", "name": "f", "content": "x"}]}));
        assert_eq!(role.class, ErrorClass::InvalidRequest);
        assert!(role.message.contains("\"function\""), "{}", role.message);
        let audio = body_error(json!({"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
        ]}]}));
        assert!(audio.message.contains("input_audio"), "{}", audio.message);
        let empty = body_error(json!({"messages": [{"role": "system", "content": "Be nice."}]}));
        assert_eq!(empty.class, ErrorClass::InvalidRequest);
    }

    #[test]
    fn tools_are_translated_with_a_default_input_schema() {
        let sent = body(json!({
            "messages": [{"role": "user", "content": "Weather in Oslo?"}],
            "tools": [
                {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
                {"type": "function", "function": {"name": "now"}},
                {"type": "function", "function": {"name": "ping", "parameters": {}}}
            ]
        }));
        assert_eq!(
            sent["tools"],
            json!([
                {"name": "get_weather", "description": "Current weather",
                 "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
                {"name": "now", "input_schema": {"type": "object"}},
                {"name": "ping", "input_schema": {"type": "object"}}
            ])
        );
        assert!(sent.get("tool_choice").is_none());
    }

    #[test]
    fn every_tool_choice_form_is_translated() {
        let tools = json!([{"type": "function", "function": {"name": "get_weather"}}]);
        let cases = [
            (json!("auto"), json!({"type": "auto"})),
            (json!("required"), json!({"type": "any"})),
            (json!("none"), json!({"type": "none"})),
            (
                json!({"type": "function", "function": {"name": "get_weather"}}),
                json!({"type": "tool", "name": "get_weather"}),
            ),
        ];
        for (choice, expected) in cases {
            let sent = body(json!({
                "messages": [{"role": "user", "content": "hi"}],
                "tools": tools, "tool_choice": choice
            }));
            assert_eq!(sent["tool_choice"], expected, "{choice}");
        }
        let bad = body_error(json!({
            "messages": [{"role": "user", "content": "hi"}],
            "tools": tools, "tool_choice": "sometimes"
        }));
        assert_eq!(bad.class, ErrorClass::InvalidRequest);
    }

    #[test]
    fn parallel_tool_calls_false_disables_parallel_tool_use() {
        let sent = body(json!({
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "parallel_tool_calls": false
        }));
        assert_eq!(
            sent["tool_choice"],
            json!({"type": "auto", "disable_parallel_tool_use": true})
        );
    }

    #[test]
    fn assistant_tool_calls_become_tool_use_and_tool_messages_become_tool_results() {
        let sent = body(json!({"messages": [
            {"role": "user", "content": "Weather in Oslo and Bergen?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}},
                {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Bergen\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "4°C, rain"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "7°C, fog"}]},
            {"role": "user", "content": "And tomorrow?"}
        ]}));
        assert_eq!(
            sent["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo and Bergen?"}]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Bergen"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "4°C, rain"}]},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "7°C, fog"}]},
                    {"type": "text", "text": "And tomorrow?"}
                ]}
            ])
        );
    }

    #[test]
    fn tool_call_arguments_that_are_not_a_json_object_are_invalid_requests() {
        let with_arguments = |arguments: &str| {
            body_error(json!({"messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [
                    {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
                ]}
            ]}))
        };
        let broken = with_arguments("{\"city\": \"Os");
        assert_eq!(broken.class, ErrorClass::InvalidRequest);
        assert!(
            broken
                .message
                .contains("messages[1].tool_calls[0] (get_weather)")
                && broken.message.contains("not valid JSON"),
            "{}",
            broken.message
        );
        let array = with_arguments("[1, 2]");
        assert!(array.message.contains("JSON object"), "{}", array.message);
        let missing_id = body_error(json!({"messages": [
            {"role": "tool", "content": "4°C"}
        ]}));
        assert!(
            missing_id.message.contains("tool_call_id"),
            "{}",
            missing_id.message
        );
    }

    #[test]
    fn a_json_schema_response_format_becomes_output_config() {
        let schema = json!({"type": "object", "properties": {"answer": {"type": "string"}},
                            "required": ["answer"], "additionalProperties": false});
        let sent = body(json!({
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": true}}
        }));
        assert_eq!(
            sent["output_config"],
            json!({"format": {"type": "json_schema", "schema": schema}})
        );
        assert!(sent.get("system").is_none());
        assert!(sent.get("response_format").is_none());
    }

    #[test]
    fn a_json_object_response_format_adds_an_instruction_to_the_system_prompt() {
        let with_system = body(json!({
            "messages": [{"role": "system", "content": "You extract data."}, {"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"}
        }));
        assert_eq!(
            with_system["system"],
            "You extract data.\n\nRespond with a single JSON object."
        );
        assert!(with_system.get("output_config").is_none());
        let without_system = body(json!({
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"}
        }));
        assert_eq!(without_system["system"], JSON_OBJECT_INSTRUCTION);
    }

    #[test]
    fn temperatures_above_one_are_clamped_and_out_of_range_ones_rejected() {
        let with_temperature = |t: f64| {
            let request = ChatRequest {
                temperature: Some(t),
                ..hello()
            };
            AnthropicRequestBody::new(&request, "claude-x", false)
                .map(|b| serde_json::to_value(b).unwrap()["temperature"].clone())
        };
        assert_eq!(with_temperature(0.7).unwrap(), 0.7);
        assert_eq!(with_temperature(1.0).unwrap(), 1.0);
        assert_eq!(with_temperature(1.5).unwrap(), 1.0);
        assert_eq!(with_temperature(2.0).unwrap(), 1.0);
        assert_eq!(
            with_temperature(2.5).unwrap_err().class,
            ErrorClass::InvalidRequest
        );
        assert_eq!(
            with_temperature(-0.1).unwrap_err().class,
            ErrorClass::InvalidRequest
        );
    }

    #[test]
    fn top_p_is_sent_only_without_a_temperature() {
        let alone = body(json!({"messages": [{"role": "user", "content": "hi"}], "top_p": 0.9}));
        assert_eq!(alone["top_p"], 0.9);
        let both = body(
            json!({"messages": [{"role": "user", "content": "hi"}], "top_p": 0.9, "temperature": 0.2}),
        );
        assert_eq!(both["temperature"], 0.2);
        assert!(both.get("top_p").is_none());
    }

    #[test]
    fn max_tokens_defaults_to_4096_and_otherwise_takes_the_callers_cap() {
        let default = body(json!({"messages": [{"role": "user", "content": "hi"}]}));
        assert_eq!(default["max_tokens"], 4096);
        let legacy =
            body(json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300}));
        assert_eq!(legacy["max_tokens"], 300);
        let both = body(json!({"messages": [{"role": "user", "content": "hi"}],
                               "max_tokens": 300, "max_completion_tokens": 700}));
        assert_eq!(both["max_tokens"], 700);
        assert!(both.get("max_completion_tokens").is_none());
    }

    #[test]
    fn stop_becomes_stop_sequences_and_unknown_fields_are_dropped() {
        let one = body(
            json!({"messages": [{"role": "user", "content": "hi"}], "stop": "\n\nHuman:",
                              "seed": 7, "n": 1, "frequency_penalty": 0.5, "stream": true}),
        );
        assert_eq!(one["stop_sequences"], json!(["\n\nHuman:"]));
        for dropped in ["stop", "seed", "n", "frequency_penalty", "stream"] {
            assert!(one.get(dropped).is_none(), "{dropped} was sent");
        }
        let many =
            body(json!({"messages": [{"role": "user", "content": "hi"}], "stop": ["END", "STOP"]}));
        assert_eq!(many["stop_sequences"], json!(["END", "STOP"]));
        let bad = body_error(json!({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}));
        assert_eq!(bad.class, ErrorClass::InvalidRequest);
    }

    #[tokio::test]
    async fn a_call_posts_to_v1_messages_under_the_base_path_with_anthropic_headers() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/anthropic/v1/messages"))
            .and(header("x-api-key", "sk-ant-test"))
            .and(header("anthropic-version", "2023-06-01"))
            .and(header("content-type", "application/json"))
            .respond_with(ResponseTemplate::new(200).set_body_string(MESSAGE))
            .expect(1)
            .mount(&server)
            .await;
        let completion = call(
            format!("{}/anthropic/", server.uri()),
            &hello(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(
            completion.response["choices"][0]["message"]["content"],
            "Hi! My name is Claude. How can I help?"
        );
        let sent = sent_body(&server).await;
        assert_eq!(sent["model"], "claude-x");
        assert_eq!(sent["max_tokens"], 50);
        assert!(sent.get("stream").is_none());
    }

    // --- response parsing --------------------------------------------------------------------

    #[test]
    fn text_blocks_are_concatenated_without_thinking_and_usage_adds_cache_traffic() {
        let completion = parse_anthropic_response(MESSAGE, "claude-x").unwrap();
        let choice = &completion.response["choices"][0];
        assert_eq!(
            choice["message"]["content"],
            "Hi! My name is Claude. How can I help?"
        );
        assert!(choice["message"].get("tool_calls").is_none());
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(choice["native_finish_reason"], "end_turn");
        assert_eq!(completion.response["id"], "msg_013Zva2CMHLNnXjNJJKqJ2EF");
        assert_eq!(completion.response["model"], "claude-sonnet-4-5-20250929");
        // 12 uncached + 1500 written to the cache + 2000 read from it.
        assert_eq!(
            completion.usage,
            Usage {
                input_tokens: 3512,
                cached_input_tokens: 2000,
                cache_write_tokens: 1500,
                output_tokens: 40,
                reasoning_tokens: 9,
            }
        );
        assert_eq!(completion.response["usage"]["prompt_tokens"], 3512);
        assert_eq!(completion.response["usage"]["total_tokens"], 3552);
    }

    #[test]
    fn tool_use_blocks_become_openai_tool_calls() {
        let completion = parse_anthropic_response(TOOL_USE_MESSAGE, "claude-x").unwrap();
        let choice = &completion.response["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], "I'll check the weather.");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["id"], "toolu_01A09q90qw90lq917835lq9");
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "get_weather");
        let arguments: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(
            arguments,
            json!({"location": "San Francisco, CA", "unit": "celsius"})
        );
        assert_eq!(completion.usage.input_tokens, 472);
        assert_eq!(completion.usage.cached_input_tokens, 0);
    }

    #[test]
    fn a_tool_only_response_has_null_content() {
        let body = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-x",
            "content":[{"type":"tool_use","id":"toolu_1","name":"now","input":{}}],
            "stop_reason":"tool_use","stop_sequence":null,"usage":{"input_tokens":5,"output_tokens":3}}"#;
        let completion = parse_anthropic_response(body, "claude-x").unwrap();
        let message = &completion.response["choices"][0]["message"];
        assert!(message["content"].is_null());
        assert_eq!(message["tool_calls"][0]["function"]["arguments"], "{}");
    }

    #[test]
    fn every_stop_reason_maps_to_its_canonical_finish() {
        let rows = [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("model_context_window_exceeded", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
            ("pause_turn", "other"),
            ("something_new", "other"),
        ];
        for (native, canonical) in rows {
            let body = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                "content": [{"type": "text", "text": "x"}], "stop_reason": native, "stop_sequence": null,
                "usage": {"input_tokens": 1, "output_tokens": 1}})
            .to_string();
            let completion = parse_anthropic_response(&body, "claude-x").unwrap();
            let choice = &completion.response["choices"][0];
            assert_eq!(choice["finish_reason"], canonical, "{native}");
            assert_eq!(choice["native_finish_reason"], native);
        }
    }

    #[tokio::test]
    async fn a_malformed_200_body_is_a_server_error_that_keeps_the_body() {
        let server = serve(200, "{\"content\": [tru").await;
        let err = call(server.uri(), &hello(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::ServerError);
        assert_eq!(err.raw_response.as_deref(), Some("{\"content\": [tru"));
    }

    #[tokio::test]
    async fn a_slow_provider_times_out() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_string(MESSAGE)
                    .set_delay(Duration::from_secs(5)),
            )
            .mount(&server)
            .await;
        let err = call(server.uri(), &hello(), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Timeout);
    }

    #[tokio::test]
    async fn a_call_without_a_key_is_an_auth_error_and_sends_nothing() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_string(MESSAGE))
            .expect(0)
            .mount(&server)
            .await;
        let call = Call {
            key: None,
            timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(2),
            on_delta: None,
        };
        let err = AnthropicProvider::new(reqwest::Client::new(), server.uri())
            .complete(&hello(), "claude-x", &call)
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Auth);
    }

    /// The key travels in `x-api-key`, which reqwest's default policy would carry on to any
    /// host a redirect names: the workers' clients follow no redirect, and the error says where
    /// it pointed, without its query.
    #[tokio::test]
    async fn a_redirect_is_not_followed_so_the_key_never_reaches_another_host() {
        let elsewhere = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_string(MESSAGE))
            .mount(&elsewhere)
            .await;
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(307).insert_header(
                "location",
                format!("{}/v1/messages?signature=s3cr3t", elsewhere.uri()).as_str(),
            ))
            .mount(&server)
            .await;
        let key = key();
        let call = Call {
            key: Some(&key),
            timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(2),
            on_delta: None,
        };
        // The worker's own client (`app.rs`), which a plain `http` provider shares.
        let client = crate::providers::transport::worker_client(8).unwrap();
        let err = AnthropicProvider::new(client, server.uri())
            .complete(&hello(), "claude-x", &call)
            .await
            .unwrap_err();
        assert!(
            elsewhere.received_requests().await.unwrap().is_empty(),
            "nothing, and no key, was sent to the redirect's host"
        );
        assert_eq!(err.status, Some(307));
        assert!(
            err.message.contains(&format!(
                "redirected the call to {}/v1/messages;",
                elsewhere.uri()
            )),
            "{}",
            err.message
        );
        assert!(!err.message.contains("s3cr3t"), "{}", err.message);
    }

    // --- errors --------------------------------------------------------------------------------

    fn anthropic_error(kind: &str, message: &str) -> String {
        json!({"type": "error", "error": {"type": kind, "message": message},
               "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"})
        .to_string()
    }

    fn anthropic_error_with_code(kind: &str, message: &str, code: &str) -> String {
        json!({"type": "error", "error": {"type": kind, "message": message, "details": {"error_code": code}},
               "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"})
        .to_string()
    }

    const CLOUDFLARE_413: &str = "<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n";

    #[test]
    fn every_row_of_the_classification_table_maps_to_its_class() {
        let none = HeaderMap::new();
        let cases: Vec<(u16, String, ErrorClass)> = vec![
            (
                400,
                anthropic_error("invalid_request_error", "messages: roles must alternate"),
                ErrorClass::InvalidRequest,
            ),
            (
                400,
                anthropic_error(
                    "invalid_request_error",
                    "prompt is too long: 208310 tokens > 200000 maximum",
                ),
                ErrorClass::ContextLength,
            ),
            (
                400,
                anthropic_error(
                    "invalid_request_error",
                    "input length and `max_tokens` exceed context limit: 188240 + 21333 > 200000",
                ),
                ErrorClass::ContextLength,
            ),
            (
                400,
                anthropic_error(
                    "invalid_request_error",
                    "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.",
                ),
                ErrorClass::QuotaExhausted,
            ),
            (
                401,
                anthropic_error("authentication_error", "invalid x-api-key"),
                ErrorClass::Auth,
            ),
            (
                402,
                anthropic_error("billing_error", "Payment required"),
                ErrorClass::QuotaExhausted,
            ),
            (
                403,
                anthropic_error(
                    "permission_error",
                    "Your API key does not have permission to use the specified resource.",
                ),
                ErrorClass::Auth,
            ),
            (
                404,
                anthropic_error("not_found_error", "model: claude-nonexistent"),
                ErrorClass::InvalidRequest,
            ),
            (408, String::new(), ErrorClass::Timeout),
            (409, String::new(), ErrorClass::Conflict),
            (413, CLOUDFLARE_413.to_owned(), ErrorClass::InvalidRequest),
            (
                413,
                anthropic_error(
                    "request_too_large",
                    "Request exceeds the maximum allowed number of bytes.",
                ),
                ErrorClass::InvalidRequest,
            ),
            (
                429,
                anthropic_error(
                    "rate_limit_error",
                    "This request would exceed the rate limit for your organization of 50,000 input tokens per minute.",
                ),
                ErrorClass::RateLimited,
            ),
            (
                429,
                anthropic_error_with_code(
                    "rate_limit_error",
                    "Your organization has reached its spend limit.",
                    "enforced_spend_limit_reached",
                ),
                ErrorClass::QuotaExhausted,
            ),
            (
                429,
                anthropic_error_with_code(
                    "rate_limit_error",
                    "Your contract spend limit has been reached.",
                    "contract_spend_limit_reached",
                ),
                ErrorClass::QuotaExhausted,
            ),
            (
                429,
                anthropic_error_with_code(
                    "rate_limit_error",
                    "Usage increased too quickly; retry after the time in the retry-after header.",
                    "ramp_limit_exceeded",
                ),
                ErrorClass::RateLimited,
            ),
            (
                500,
                anthropic_error("api_error", "Internal server error"),
                ErrorClass::ServerError,
            ),
            (
                502,
                "<html><body>502 Bad Gateway</body></html>".to_owned(),
                ErrorClass::ServerError,
            ),
            (
                503,
                "upstream connect error".to_owned(),
                ErrorClass::Overloaded,
            ),
            (
                504,
                anthropic_error("timeout_error", "Request timed out"),
                ErrorClass::Timeout,
            ),
            (
                504,
                "<html>Gateway Timeout</html>".to_owned(),
                ErrorClass::Timeout,
            ),
            (
                529,
                anthropic_error("overloaded_error", "Overloaded"),
                ErrorClass::Overloaded,
            ),
            (
                500,
                anthropic_error("overloaded_error", "Overloaded"),
                ErrorClass::Overloaded,
            ),
            (
                599,
                "\u{0}\u{ffff}garbage".to_owned(),
                ErrorClass::ServerError,
            ),
            (
                422,
                anthropic_error("invalid_request_error", "unprocessable"),
                ErrorClass::InvalidRequest,
            ),
            (418, "I'm a teapot".to_owned(), ErrorClass::InvalidRequest),
        ];
        for (status, body, class) in &cases {
            let err = handle_anthropic_error(*status, &none, body);
            assert_eq!(err.class, *class, "HTTP {status} {body}");
            assert_eq!(err.status, Some(*status));
            assert_eq!(err.provider_type, PROVIDER_TYPE);
            assert!(err.raw_response.is_some());
        }
    }

    #[test]
    fn error_messages_carry_the_status_and_the_error_message_or_a_body_excerpt() {
        let none = HeaderMap::new();
        let json = handle_anthropic_error(
            529,
            &none,
            &anthropic_error("overloaded_error", "Overloaded"),
        );
        assert_eq!(json.message, "HTTP 529: Overloaded");
        let html = handle_anthropic_error(413, &none, CLOUDFLARE_413);
        assert!(
            html.message.starts_with("HTTP 413: <html>")
                && html.message.contains("413 Request Entity Too Large"),
            "{}",
            html.message
        );
        assert_eq!(
            handle_anthropic_error(408, &none, "").message,
            "HTTP 408: (empty body)"
        );
        let huge = "x".repeat(5000);
        let long = handle_anthropic_error(500, &none, &huge);
        assert!(long.raw_response.unwrap().len() <= EXCERPT_BYTES + "…".len());
        assert!(long.message.len() < 300);
    }

    #[test]
    fn retry_after_headers_win_over_rate_limit_resets() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("12"));
        headers.insert(
            "anthropic-ratelimit-requests-remaining",
            HeaderValue::from_static("0"),
        );
        headers.insert(
            "anthropic-ratelimit-requests-reset",
            HeaderValue::from_static("2099-01-01T00:00:00Z"),
        );
        let err = handle_anthropic_error(
            429,
            &headers,
            &anthropic_error("rate_limit_error", "Rate limited"),
        );
        assert_eq!(err.retry_after, Some(Duration::from_secs(12)));
    }

    #[test]
    fn without_retry_after_the_exhausted_limits_reset_is_the_delay() {
        let now = chrono::DateTime::parse_from_rfc3339("2025-06-01T12:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "2025-06-01T12:00:05Z"),
            ("anthropic-ratelimit-input-tokens-remaining", "0"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2025-06-01T12:00:20.500Z",
            ),
            // Not exhausted: its (later) reset does not matter.
            ("anthropic-ratelimit-output-tokens-remaining", "8000"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2025-06-01T12:01:00Z",
            ),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
        assert_eq!(
            reset_delay(&headers, now),
            Some(Duration::from_millis(20_500))
        );
        let mut past = HeaderMap::new();
        past.insert(
            "anthropic-ratelimit-tokens-remaining",
            HeaderValue::from_static("0"),
        );
        past.insert(
            "anthropic-ratelimit-tokens-reset",
            HeaderValue::from_static("2025-06-01T11:59:00Z"),
        );
        assert_eq!(reset_delay(&past, now), Some(Duration::ZERO));
        let mut unparsable = past.clone();
        unparsable.insert(
            "anthropic-ratelimit-tokens-reset",
            HeaderValue::from_static("soon"),
        );
        assert_eq!(reset_delay(&unparsable, now), None);
        assert_eq!(reset_delay(&HeaderMap::new(), now), None);
    }

    /// A reset years away is a broken header, as the same value in `retry-after` is: it must
    /// not rest the key for the longest allowed rest on every worker.
    #[test]
    fn a_reset_beyond_any_plausible_rest_is_no_delay() {
        let exhausted = |headers: &mut HeaderMap, kind: &str, reset: &str| {
            for (field, value) in [("remaining", "0"), ("reset", reset)] {
                let name = format!("anthropic-ratelimit-{kind}-{field}");
                headers.insert(
                    reqwest::header::HeaderName::try_from(name).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
        };
        let mut headers = HeaderMap::new();
        exhausted(&mut headers, "requests", "9999-01-01T00:00:00Z");
        assert_eq!(retry_delay(&headers), None);
        let soon = (chrono::Utc::now() + chrono::Duration::hours(2)).to_rfc3339();
        exhausted(&mut headers, "requests", &soon);
        let delay = retry_delay(&headers).expect("a reset two hours away is a delay");
        assert!(delay > Duration::from_secs(7100) && delay <= Duration::from_secs(7200));
        // A broken reset of another exhausted limit does not cancel a good one.
        exhausted(&mut headers, "tokens", "9999-01-01T00:00:00Z");
        let delay = retry_delay(&headers).expect("the good reset still counts");
        assert!(delay > Duration::from_secs(7100) && delay <= Duration::from_secs(7200));
    }

    #[tokio::test]
    async fn a_429_over_http_is_rate_limited_with_its_retry_delay() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(429)
                    .insert_header("retry-after", "3")
                    .set_body_string(anthropic_error(
                        "rate_limit_error",
                        "Number of request tokens has exceeded your per-minute rate limit",
                    )),
            )
            .expect(1)
            .mount(&server)
            .await;
        let err = call(server.uri(), &hello(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::RateLimited);
        assert_eq!(err.status, Some(429));
        assert_eq!(err.retry_after, Some(Duration::from_secs(3)));
        assert!(
            err.message.contains("per-minute rate limit"),
            "{}",
            err.message
        );
    }

    // --- streaming -----------------------------------------------------------------------------

    /// Serves `body` as an SSE stream and runs a streaming call, returning the result, the
    /// deltas received, and the request body sent.
    async fn stream(body: &str) -> (Result<Completion, ProviderError>, Vec<String>, Value) {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/messages"))
            .respond_with(
                ResponseTemplate::new(200)
                    .insert_header("content-type", "text/event-stream")
                    .set_body_string(body),
            )
            .expect(1)
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
        let result = AnthropicProvider::new(reqwest::Client::new(), server.uri())
            .complete(&hello(), "claude-x", &call)
            .await;
        let sent = sent_body(&server).await;
        (result, deltas.into_inner().unwrap(), sent)
    }

    /// The text stream of the Anthropic streaming docs, with cache usage in `message_start`
    /// and a `message_delta` that reports cumulative counts (nulls do not override).
    const TEXT_STREAM: &str = concat!(
        "event: message_start\n",
        "data: {\"type\": \"message_start\", \"message\": {\"id\": \"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY\", \"type\": \"message\", \"role\": \"assistant\", \"content\": [], \"model\": \"claude-sonnet-4-5-20250929\", \"stop_reason\": null, \"stop_sequence\": null, \"usage\": {\"input_tokens\": 25, \"cache_creation_input_tokens\": 5, \"cache_read_input_tokens\": 10, \"output_tokens\": 1}}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\": \"content_block_start\", \"index\": 0, \"content_block\": {\"type\": \"text\", \"text\": \"\"}}\n\n",
        "event: ping\n",
        "data: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", \"text\": \"Hello\"}}\n\n",
        "event: some_future_event\n",
        "data: {\"type\": \"some_future_event\", \"payload\": [1, 2]}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", \"text\": \", world\"}}\r\n\r\n",
        "event: content_block_delta\n",
        "data: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", \"text\": \"!\"}}\n\n",
        "event: content_block_stop\n",
        "data: {\"type\": \"content_block_stop\", \"index\": 0}\n\n",
        "event: message_delta\n",
        "data: {\"type\": \"message_delta\", \"delta\": {\"stop_reason\": \"end_turn\", \"stop_sequence\": null}, \"usage\": {\"input_tokens\": 25, \"cache_creation_input_tokens\": null, \"output_tokens\": 15}}\n\n",
        "event: message_stop\n",
        "data: {\"type\": \"message_stop\"}\n\n",
    );

    #[tokio::test]
    async fn a_stream_is_assembled_in_order_with_message_delta_usage_overriding_message_start() {
        let (result, deltas, sent) = stream(TEXT_STREAM).await;
        assert_eq!(sent["stream"], true);
        let completion = result.unwrap();
        assert_eq!(deltas, ["Hello", ", world", "!"]);
        let choice = &completion.response["choices"][0];
        assert_eq!(choice["message"]["content"], "Hello, world!");
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(choice["native_finish_reason"], "end_turn");
        assert_eq!(
            completion.response["id"],
            "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"
        );
        assert_eq!(
            completion.usage,
            Usage {
                input_tokens: 40,
                cached_input_tokens: 10,
                cache_write_tokens: 5,
                output_tokens: 15,
                reasoning_tokens: 0,
            }
        );
    }

    #[tokio::test]
    async fn a_final_message_stop_without_its_blank_line_still_completes_the_stream() {
        let body = TEXT_STREAM.trim_end_matches('\n');
        let (result, _, _) = stream(body).await;
        assert_eq!(
            result.unwrap().response["choices"][0]["message"]["content"],
            "Hello, world!"
        );
    }

    #[tokio::test]
    async fn a_stream_cut_before_message_stop_is_interrupted_and_keeps_usage_received() {
        let cut = TEXT_STREAM
            .split("event: message_delta")
            .next()
            .unwrap()
            .to_owned();
        let (result, deltas, _) = stream(&cut).await;
        assert_eq!(deltas, ["Hello", ", world", "!"]);
        let err = result.unwrap_err();
        assert_eq!(err.class, ErrorClass::StreamInterrupted);
        assert!(err.is_retryable());
        assert!(err.message.contains("message_stop"), "{}", err.message);
        // `message_start` usage was received: the input was billed.
        let usage = err.usage.unwrap();
        assert_eq!((usage.input_tokens, usage.output_tokens), (40, 1));
    }

    #[tokio::test]
    async fn a_stream_cut_before_message_start_is_interrupted_without_usage() {
        let (result, deltas, _) = stream("event: ping\ndata: {\"type\": \"ping\"}\n\n").await;
        assert!(deltas.is_empty());
        let err = result.unwrap_err();
        assert_eq!(err.class, ErrorClass::StreamInterrupted);
        assert!(err.usage.is_none());
    }

    #[tokio::test]
    async fn an_overloaded_error_event_after_200_is_overloaded() {
        let body = format!(
            "{}event: error\ndata: {{\"type\": \"error\", \"error\": {{\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}}}\n\n",
            TEXT_STREAM
                .split("event: content_block_stop")
                .next()
                .unwrap()
        );
        let (result, _, _) = stream(&body).await;
        let err = result.unwrap_err();
        assert_eq!(err.class, ErrorClass::Overloaded);
        assert!(err.message.contains("Overloaded"), "{}", err.message);
        assert_eq!(err.usage.map(|u| u.input_tokens), Some(40));
    }

    #[tokio::test]
    async fn any_other_error_event_after_200_is_an_interrupted_stream() {
        let body = "event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"api_error\", \"message\": \"Internal server error\"}}\n\n";
        let (result, _, _) = stream(body).await;
        let err = result.unwrap_err();
        assert_eq!(err.class, ErrorClass::StreamInterrupted);
        assert!(err.message.contains("api_error"), "{}", err.message);
    }

    #[tokio::test]
    async fn a_streamed_tool_use_is_assembled_from_input_json_deltas() {
        let body = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_014p7gG3wDgGV9EUtLvnow3U\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5-20250929\",\"stop_sequence\":null,\"usage\":{\"input_tokens\":472,\"output_tokens\":2},\"content\":[],\"stop_reason\":null}}\n\n",
            "event: content_block_start\n",
            "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Okay, let's check the weather.\"}}\n\n",
            "event: content_block_stop\n",
            "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
            "event: content_block_start\n",
            "data: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_01T1x1fJ34qAmk2tNTrN7Up6\",\"name\":\"get_weather\",\"input\":{}}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\"}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"location\\\":\"}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\" \\\"San Francisco, CA\\\"}\"}}\n\n",
            "event: content_block_stop\n",
            "data: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
            "event: content_block_start\n",
            "data: {\"type\":\"content_block_start\",\"index\":2,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_02\",\"name\":\"now\",\"input\":{}}}\n\n",
            "event: content_block_stop\n",
            "data: {\"type\":\"content_block_stop\",\"index\":2}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":89}}\n\n",
            "event: message_stop\n",
            "data: {\"type\":\"message_stop\"}\n\n",
        );
        let (result, deltas, _) = stream(body).await;
        assert_eq!(deltas, ["Okay, let's check the weather."]);
        let completion = result.unwrap();
        let choice = &completion.response["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["native_finish_reason"], "tool_use");
        assert_eq!(
            choice["message"]["content"],
            "Okay, let's check the weather."
        );
        let calls = choice["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["id"], "toolu_01T1x1fJ34qAmk2tNTrN7Up6");
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        assert_eq!(
            calls[0]["function"]["arguments"],
            "{\"location\":\"San Francisco, CA\"}"
        );
        assert_eq!(calls[1]["function"]["name"], "now");
        assert_eq!(calls[1]["function"]["arguments"], "{}");
        assert_eq!(
            (
                completion.usage.input_tokens,
                completion.usage.output_tokens
            ),
            (472, 89)
        );
    }

    #[tokio::test]
    async fn a_non_2xx_answer_to_a_streaming_call_is_classified() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(529)
                    .set_body_string(anthropic_error("overloaded_error", "Overloaded")),
            )
            .expect(1)
            .mount(&server)
            .await;
        let on_delta = |_: &str| {};
        let key = key();
        let call = Call {
            key: Some(&key),
            timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(2),
            on_delta: Some(&on_delta),
        };
        let err = AnthropicProvider::new(reqwest::Client::new(), server.uri())
            .complete(&hello(), "claude-x", &call)
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Overloaded);
        assert_eq!(err.status, Some(529));
    }

    #[tokio::test]
    async fn a_stream_that_stalls_past_the_idle_timeout_is_interrupted() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let first_event = TEXT_STREAM
            .split("event: content_block_start")
            .next()
            .unwrap();
        // Headers and one event, then silence for longer than the idle timeout.
        let server = async {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 8192];
            let _ = socket.read(&mut request).await.unwrap();
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{first_event}\r\n",
                first_event.len()
            );
            socket.write_all(response.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
        };
        let client = async {
            let on_delta = |_: &str| {};
            let key = key();
            let call = Call {
                key: Some(&key),
                timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_millis(200),
                on_delta: Some(&on_delta),
            };
            AnthropicProvider::new(reqwest::Client::new(), format!("http://{address}"))
                .complete(&hello(), "claude-x", &call)
                .await
        };
        let ((), result) = tokio::join!(server, client);
        let err = result.unwrap_err();
        assert_eq!(err.class, ErrorClass::StreamInterrupted);
        assert!(err.message.contains("stalled"), "{}", err.message);
        assert_eq!(err.usage.map(|u| u.input_tokens), Some(40));
    }

    #[test]
    fn stream_events_of_unknown_or_broken_shape_never_panic() {
        let key = key();
        let call = Call {
            key: Some(&key),
            timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            on_delta: None,
        };
        let mut state = AnthropicStreamState::default();
        let event = |name: Option<&str>, data: &str| SseEvent {
            event: name.map(str::to_owned),
            data: data.to_owned(),
            stray: String::new(),
        };
        for (name, data) in [
            (
                Some("content_block_delta"),
                r#"{"type":"content_block_delta","index":7,"delta":{"type":"input_json_delta","partial_json":"{"}}"#,
            ),
            (
                Some("content_block_delta"),
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hm"}}"#,
            ),
            (
                Some("message_delta"),
                r#"{"type":"message_delta","delta":{},"usage":null}"#,
            ),
            // A proxy that strips `type` from the payload.
            (
                Some("content_block_delta"),
                r#"{"index":0,"delta":{"type":"text_delta","text":"ok"}}"#,
            ),
            (None, ""),
        ] {
            assert!(
                matches!(
                    state.apply(&event(name, data), &call),
                    Ok(StreamStep::Continue)
                ),
                "{data}"
            );
        }
        assert_eq!(state.text, "ok");
        let not_json = state.apply(&event(Some("content_block_delta"), "{\"type\":"), &call);
        assert_eq!(
            not_json.err().map(|e| e.class),
            Some(ErrorClass::StreamInterrupted)
        );
        let wrong_shape = state.apply(
            &event(
                Some("message_start"),
                r#"{"type":"message_start","message":"nope"}"#,
            ),
            &call,
        );
        assert_eq!(
            wrong_shape.err().map(|e| e.class),
            Some(ErrorClass::StreamInterrupted)
        );
        let bare_error = state.apply(&event(Some("error"), r#"{"oops":true}"#), &call);
        assert_eq!(
            bare_error.err().map(|e| e.class),
            Some(ErrorClass::StreamInterrupted)
        );
    }

    #[test]
    fn a_streamed_tool_use_with_broken_json_fails_the_attempt() {
        let mut state = AnthropicStreamState::default();
        state.tool_uses.insert(
            0,
            StreamedToolUse {
                id: "toolu_1".to_owned(),
                name: "get_weather".to_owned(),
                initial_input: json!({}),
                partial_json: "{\"location\": \"Os".to_owned(),
            },
        );
        let err = state.finish("claude-x").unwrap_err();
        assert_eq!(err.class, ErrorClass::ServerError);
        assert!(err.message.contains("get_weather"), "{}", err.message);
    }
}
