//! `schemas/job.v1.json`: a prompt job as published to the jobs exchange.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// The `schema` value (and AMQP `type`) of a job message.
pub const JOB_SCHEMA: &str = "switchyard.job.v1";

/// One prompt job. Parsed only after the raw body passed schema validation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub schema: String,
    pub id: Uuid,
    pub tenant: String,
    #[serde(default)]
    pub batch: Option<String>,
    pub route: String,
    /// 0 when first published; `switchyard replay` republishes a job with this bumped, and
    /// the worker serves a generation that has no result yet even if an older one has.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: i32,
    pub request: ChatRequest,
    /// A cap on what this job may cost, all attempts together (USD, exact decimal string).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "rust_decimal::serde::str_option"
    )]
    pub max_cost_usd: Option<rust_decimal::Decimal>,
    /// Data residency for this job: only providers in these regions may serve it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

impl Job {
    /// A new job with a fresh UUIDv7 id.
    pub fn new(tenant: &str, batch: Option<&str>, route: &str, request: ChatRequest) -> Self {
        Self {
            schema: JOB_SCHEMA.to_owned(),
            id: Uuid::now_v7(),
            tenant: tenant.to_owned(),
            batch: batch.map(str::to_owned),
            route: route.to_owned(),
            generation: 0,
            request,
            max_cost_usd: None,
            regions: None,
            metadata: None,
        }
    }
}

fn is_zero(generation: &i32) -> bool {
    *generation == 0
}

/// An OpenAI chat-completions request body. Fields Switchyard reads are typed; everything
/// else is kept in `extra` and passed through to OpenAI-compatible providers untouched.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatRequest {
    /// The output-token cap the caller asked for, whichever field carries it.
    pub fn output_cap(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// Whether the caller asked for a streamed answer (`"stream": true`).
    pub fn wants_stream(&self) -> bool {
        self.extra
            .get("stream")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// Text of the last user message, the one a summarizer works on.
    pub fn last_user_text(&self) -> String {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(ChatMessage::text)
            .unwrap_or_default()
    }

    /// All message text, for token estimates.
    pub fn all_text(&self) -> impl Iterator<Item = String> + '_ {
        self.messages.iter().map(ChatMessage::text)
    }
}

/// One chat message; `content` is a string, null, or an array of content parts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Value,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatMessage {
    /// A plain text message.
    pub fn text_message(role: &str, text: impl Into<String>) -> Self {
        Self {
            role: role.to_owned(),
            content: Value::String(text.into()),
            extra: Map::new(),
        }
    }

    /// The message's text: the string content, or its text parts joined by newlines.
    pub fn text(&self) -> String {
        match &self.content {
            Value::String(text) => text.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_request_fields_are_kept_for_passthrough() {
        let body = r#"{"messages":[{"role":"user","content":"hi"}],"seed":7,"max_tokens":5}"#;
        let request: ChatRequest = serde_json::from_str(body).unwrap();
        assert_eq!(request.extra.get("seed"), Some(&Value::from(7)));
        let back = serde_json::to_value(&request).unwrap();
        assert_eq!(back["seed"], 7);
        assert_eq!(back["max_tokens"], 5);
    }

    #[test]
    fn text_parts_are_joined_and_images_skipped() {
        let body = r#"{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"data:x"}},{"type":"text","text":"b"}]}"#;
        let message: ChatMessage = serde_json::from_str(body).unwrap();
        assert_eq!(message.text(), "a\nb");
    }
}
