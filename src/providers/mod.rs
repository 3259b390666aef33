//! The provider boundary: one adapter per wire format behind the [`Provider`] enum, the
//! registry built from config, per-provider key pools, and the error classes every failure
//! is mapped to.

pub mod anthropic;
#[cfg(test)]
mod cost_tests;
pub mod extractive;
pub mod gemini;
pub mod images;
pub mod keys;
pub mod openai;
#[cfg(test)]
mod robustness;
pub mod sse;
#[cfg(test)]
pub(crate) mod test_support;
pub mod transport;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderMap;
use secrecy::SecretString;
use serde_json::{Value, json};

pub use keys::{ApiKey, KeyChoice, KeyPool, KeyRest, KeyStatus};

use crate::config::{MaxTokensField, ModelSettings, ProviderKind, ProviderSettings, Settings};
use crate::messages::{ChatRequest, Usage};

/// Longest excerpt of a provider's body kept in an error.
pub const EXCERPT_BYTES: usize = 512;

/// A successful provider call, normalised.
#[derive(Debug, Clone)]
pub struct Completion {
    /// OpenAI `chat.completion` object. `choices[0].finish_reason` is canonical (`stop`,
    /// `length`, `tool_calls`, `content_filter`, `other`) and `choices[0].native_finish_reason`
    /// keeps the provider's own value.
    pub response: Value,
    pub usage: Usage,
}

/// Why a provider call failed, in the vocabulary of `providers-wire.md` §6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    RateLimited,
    Overloaded,
    ServerError,
    Timeout,
    StreamInterrupted,
    Conflict,
    QuotaExhausted,
    Auth,
    InvalidRequest,
    ContentFiltered,
    ContextLength,
}

impl ErrorClass {
    /// The snake_case name stored in attempts and results.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::Overloaded => "overloaded",
            ErrorClass::ServerError => "server_error",
            ErrorClass::Timeout => "timeout",
            ErrorClass::StreamInterrupted => "stream_interrupted",
            ErrorClass::Conflict => "conflict",
            ErrorClass::QuotaExhausted => "quota_exhausted",
            ErrorClass::Auth => "auth",
            ErrorClass::InvalidRequest => "invalid_request",
            ErrorClass::ContentFiltered => "content_filtered",
            ErrorClass::ContextLength => "context_length",
        }
    }

    /// The class named `name` (its snake_case name).
    pub fn parse(name: &str) -> Option<Self> {
        [
            ErrorClass::RateLimited,
            ErrorClass::Overloaded,
            ErrorClass::ServerError,
            ErrorClass::Timeout,
            ErrorClass::StreamInterrupted,
            ErrorClass::Conflict,
            ErrorClass::QuotaExhausted,
            ErrorClass::Auth,
            ErrorClass::InvalidRequest,
            ErrorClass::ContentFiltered,
            ErrorClass::ContextLength,
        ]
        .into_iter()
        .find(|class| class.as_str() == name)
    }

    /// Whether another attempt (or target) may succeed where this one failed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorClass::RateLimited
                | ErrorClass::Overloaded
                | ErrorClass::ServerError
                | ErrorClass::Timeout
                | ErrorClass::StreamInterrupted
                | ErrorClass::Conflict
        )
    }
}

/// A failed provider call. `raw_response` keeps (an excerpt of) the body for diagnosis.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{provider_type} {}: {message}", .class.as_str())]
pub struct ProviderError {
    pub class: ErrorClass,
    pub provider_type: &'static str,
    pub status: Option<u16>,
    pub message: String,
    pub raw_response: Option<String>,
    /// Usage the provider reported despite the failure (billed all the same).
    pub usage: Option<Usage>,
    /// The provider's own retry delay (`retry-after-ms`, `retry-after`, Gemini `RetryInfo`,
    /// reset headers).
    pub retry_after: Option<Duration>,
    /// The provider's `x-should-retry` header, which overrides whether the same call may be
    /// tried again (its class still decides failover and what it says about the target).
    pub should_retry: Option<bool>,
}

impl ProviderError {
    pub fn new(provider_type: &'static str, class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            provider_type,
            status: None,
            message: message.into(),
            raw_response: None,
            usage: None,
            retry_after: None,
            should_retry: None,
        }
    }

    /// Whether the same call may be tried again: the provider's `x-should-retry`, else its
    /// class.
    pub fn is_retryable(&self) -> bool {
        self.should_retry
            .unwrap_or_else(|| self.class.is_retryable())
    }

    /// A 2xx body that cannot be used: a retryable server error that keeps an excerpt of it.
    pub fn malformed(provider_type: &'static str, body: &str, reason: String) -> Self {
        Self {
            raw_response: Some(excerpt(body, EXCERPT_BYTES)),
            ..Self::new(provider_type, ErrorClass::ServerError, reason)
        }
    }

    /// A response, or a stream, longer than [`MAX_RESPONSE_BYTES`]: the call fails (a server
    /// error, so the job may fail over) rather than grow the worker's memory.
    pub fn too_large(provider_type: &'static str) -> Self {
        Self::new(
            provider_type,
            ErrorClass::ServerError,
            format!(
                "the response is larger than {} MiB; a worker reads no more of one",
                MAX_RESPONSE_BYTES / (1024 * 1024)
            ),
        )
    }

    /// A connection failure or timeout before a status arrived.
    pub fn transport(provider_type: &'static str, error: &reqwest::Error) -> Self {
        let class = if error.is_timeout() {
            ErrorClass::Timeout
        } else {
            ErrorClass::ServerError
        };
        // `without_url` keeps query strings (which some gateways use for keys) out of messages.
        let message = match error.status() {
            Some(status) => format!("HTTP {}: {}", status.as_u16(), strip_url(error)),
            None => strip_url(error),
        };
        Self::new(provider_type, class, message)
    }
}

fn strip_url(error: &reqwest::Error) -> String {
    let mut message = error.to_string();
    if let Some(url) = error.url() {
        message = message.replace(url.as_str(), "<url>");
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// What an adapter needs for one call besides the request.
pub struct Call<'a> {
    /// The key to authenticate with (`None` only for the built-in provider).
    pub key: Option<&'a ApiKey>,
    /// Whole-call timeout (non-streaming) or time to the first byte (streaming).
    pub timeout: Duration,
    /// A stream that sends nothing for this long is interrupted.
    pub idle_timeout: Duration,
    /// Receives each text delta of a streamed response, in order. `None` unless the job asked
    /// for `stream: true`.
    pub on_delta: Option<&'a (dyn Fn(&str) + Send + Sync)>,
}

impl Call<'_> {
    /// The key, or an `auth` error naming the provider type.
    pub fn require_key(&self, provider_type: &'static str) -> Result<&ApiKey, ProviderError> {
        self.key.ok_or_else(|| {
            ProviderError::new(
                provider_type,
                ErrorClass::Auth,
                "no API key is available: set the environment variable named in the provider's keys",
            )
        })
    }

    /// Whether the job asked for a streamed response.
    pub fn streaming(&self) -> bool {
        self.on_delta.is_some()
    }
}

/// One adapter per wire format, dispatched by enum rather than trait object.
#[derive(Debug)]
pub enum Provider {
    Extractive(extractive::ExtractiveProvider),
    OpenAi(openai::OpenAiProvider),
    Anthropic(anthropic::AnthropicProvider),
    Gemini(gemini::GeminiProvider),
}

impl Provider {
    /// Runs one chat completion against `model`.
    pub async fn complete(
        &self,
        request: &ChatRequest,
        model: &str,
        call: &Call<'_>,
    ) -> Result<Completion, ProviderError> {
        let outcome = match self {
            Provider::Extractive(p) => p.complete(request, model, call),
            Provider::OpenAi(p) => p.complete(request, model, call).await,
            Provider::Anthropic(p) => p.complete(request, model, call).await,
            Provider::Gemini(p) => p.complete(request, model, call).await,
        };
        // Error bodies are redacted in `send`; this also covers error events inside streams.
        outcome.map_err(|mut error| {
            error.message = redact_key(&error.message, call.key).into_owned();
            error.raw_response = error
                .raw_response
                .map(|raw| redact_key(&raw, call.key).into_owned());
            error
        })
    }

    /// The wire-format name.
    pub fn provider_type(&self) -> &'static str {
        match self {
            Provider::Extractive(_) => extractive::PROVIDER_TYPE,
            Provider::OpenAi(_) => openai::PROVIDER_TYPE,
            Provider::Anthropic(_) => anthropic::PROVIDER_TYPE,
            Provider::Gemini(_) => gemini::PROVIDER_TYPE,
        }
    }
}

/// A configured provider: its client, keys, limits and the models (with prices) it serves.
#[derive(Debug)]
pub struct ProviderEntry {
    pub name: String,
    pub client: Provider,
    pub keys: KeyPool,
    pub timeout: Duration,
    pub idle_timeout: Duration,
    /// A stream is ended after this long (`stream_max_secs`).
    pub stream_max: Duration,
    pub max_retries: u32,
    pub models: HashMap<String, ModelSettings>,
    /// Limits shared across workers, if any are configured.
    pub scopes: crate::routing::limits::ProviderScopes,
    /// The worker's own cap on calls at once over HTTP/1.1 (`http1_max_connections`).
    pub connections: Option<transport::ConnectionCap>,
}

impl ProviderEntry {
    /// The model's settings.
    pub fn model(&self, name: &str) -> Option<&ModelSettings> {
        self.models.get(name)
    }

    /// Whether calls need an API key.
    pub fn needs_key(&self) -> bool {
        !matches!(self.client, Provider::Extractive(_))
    }
}

/// Every provider of the config, by name.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    entries: Arc<HashMap<String, Arc<ProviderEntry>>>,
}

impl Registry {
    /// Builds clients for every configured provider. Keys are read from their environment
    /// variables here; a missing variable leaves that key out (logged, without its value).
    pub fn from_settings(settings: &Settings, http: &reqwest::Client) -> Self {
        let entries = settings
            .all_providers()
            .into_iter()
            .map(|p| (p.name.clone(), Arc::new(build_entry(&p, http))))
            .collect();
        Self {
            entries: Arc::new(entries),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ProviderEntry>> {
        self.entries.get(name)
    }

    /// Sends every key pool's rests to `announcer`.
    pub fn announce_rests_to(&self, announcer: &tokio::sync::mpsc::UnboundedSender<KeyRest>) {
        for entry in self.entries.values() {
            entry.keys.announce_to(announcer.clone());
        }
    }
}

fn read_keys(settings: &ProviderSettings) -> Vec<ApiKey> {
    settings
        .keys
        .iter()
        .filter_map(|key| match std::env::var(&key.env) {
            Ok(secret) if !secret.is_empty() => Some(ApiKey {
                id: key.id.clone(),
                secret: SecretString::from(secret),
            }),
            _ => {
                tracing::warn!(
                    provider = %settings.name,
                    key_id = %key.id,
                    env = %key.env,
                    "API key environment variable is not set; the key is unavailable."
                );
                None
            }
        })
        .collect()
}

fn build_entry(settings: &ProviderSettings, http: &reqwest::Client) -> ProviderEntry {
    let base_url = settings.base_url.clone().unwrap_or_default();
    let http = transport::Transport::for_provider(settings, http);
    let client = match settings.kind {
        ProviderKind::Extractive => Provider::Extractive(extractive::ExtractiveProvider),
        ProviderKind::Openai => {
            let official = url::Url::parse(&base_url)
                .ok()
                .and_then(|u| u.host_str().map(|h| h == "api.openai.com"))
                .unwrap_or(false);
            let max_tokens_field = settings.max_tokens_field.unwrap_or(if official {
                MaxTokensField::MaxCompletionTokens
            } else {
                MaxTokensField::MaxTokens
            });
            Provider::OpenAi(openai::OpenAiProvider::new(
                http,
                base_url,
                openai::OpenAiOptions {
                    max_tokens_field,
                    strict_fields: settings.strict_fields,
                },
            ))
        }
        ProviderKind::Anthropic => {
            Provider::Anthropic(anthropic::AnthropicProvider::new(http, base_url))
        }
        ProviderKind::Gemini => Provider::Gemini(gemini::GeminiProvider::new(
            http,
            base_url,
            images::ImageFetcher::new(settings.allow_private_image_hosts),
        )),
    };
    ProviderEntry {
        name: settings.name.clone(),
        client,
        keys: KeyPool::new(read_keys(settings)),
        timeout: Duration::from_secs(settings.timeout_secs),
        idle_timeout: Duration::from_secs(settings.stream_idle_secs),
        stream_max: Duration::from_secs(settings.stream_max_secs),
        max_retries: settings.max_retries,
        scopes: crate::routing::limits::ProviderScopes::from_settings(settings),
        connections: transport::ConnectionCap::for_provider(settings),
        models: settings
            .models
            .iter()
            .map(|m| (m.name.clone(), m.clone()))
            .collect(),
    }
}

/// What a provider sent back to a successful request: a stream to read, or a whole body.
pub enum Answer {
    Stream(reqwest::Response),
    Body(String),
}

/// Sends `builder` under the call's timeouts: the whole call for a plain request, the
/// response headers for a streamed one. A non-2xx status becomes `classify`'s error; the
/// error body of a stream is read for at most the idle timeout (it only refines the class).
pub async fn send(
    builder: reqwest::RequestBuilder,
    call: &Call<'_>,
    provider_type: &'static str,
    classify: impl Fn(u16, &HeaderMap, &str) -> ProviderError,
) -> Result<Answer, ProviderError> {
    if call.streaming() {
        let response = tokio::time::timeout(call.timeout, builder.send())
            .await
            .map_err(|_| {
                ProviderError::new(
                    provider_type,
                    ErrorClass::Timeout,
                    "no response headers in time",
                )
            })?
            .map_err(|e| ProviderError::transport(provider_type, &e))?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(Answer::Stream(response));
        }
        let headers = response.headers().clone();
        let text = Box::pin(tokio::time::timeout(
            call.idle_timeout,
            read_capped(response, MAX_ERROR_BODY_BYTES),
        ))
        .await
        .ok()
        .and_then(Result::ok)
        .map(|body| body.text)
        .unwrap_or_default();
        return Err(refused(status, &headers, &text, call.key, &classify));
    }
    let response = builder
        .timeout(call.timeout)
        .send()
        .await
        .map_err(|e| ProviderError::transport(provider_type, &e))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    if !(200..300).contains(&status) {
        // Classified by its status first: a body that breaks off, or is cut at its limit,
        // only loses detail from the message.
        let text = Box::pin(read_capped(response, MAX_ERROR_BODY_BYTES))
            .await
            .map(|body| body.text)
            .unwrap_or_default();
        return Err(refused(status, &headers, &text, call.key, &classify));
    }
    // Boxed, like every step of a call that only runs for a moment: reading a body takes a
    // 1 KB future, which a call waiting for its answer would otherwise hold all along.
    let body = Box::pin(read_capped(response, MAX_RESPONSE_BYTES))
        .await
        .map_err(|e| ProviderError::transport(provider_type, &e))?;
    if body.cut {
        return Err(ProviderError::too_large(provider_type));
    }
    Ok(Answer::Body(body.text))
}

/// The most of a successful response's body (or stream) a call reads. A chat completion is a
/// few KB to a few hundred KB; a provider or proxy sending more (a runaway or hostile endpoint)
/// fails the call instead of growing the worker's memory without bound.
pub const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

/// The most of an error response's body a call reads: enough for any provider's error object,
/// of which only an excerpt is kept.
pub const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// The most of a body's declared length [`read_capped`] reserves before any of it arrives.
const PRESIZED_BODY_BYTES: usize = 64 * 1024;

/// A response body read up to a limit.
struct CappedBody {
    /// The body (invalid UTF-8 replaced), up to the limit.
    text: String,
    /// Whether the body went on past the limit (and was not read further).
    cut: bool,
}

/// Reads `response`'s body up to `limit` bytes, refusing at once one whose declared length is
/// over it.
async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<CappedBody, reqwest::Error> {
    let declared = response
        .content_length()
        .and_then(|n| usize::try_from(n).ok());
    if declared.is_some_and(|n| n > limit) {
        return Ok(CappedBody {
            text: String::new(),
            cut: true,
        });
    }
    // Sized from the declared length only up to what a usual answer needs: a length is the
    // sender's word, and thousands of calls each reserving megabytes on it would add up.
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0).min(PRESIZED_BODY_BYTES));
    let mut cut = false;
    while let Some(chunk) = response.chunk().await? {
        let room = limit - bytes.len();
        if chunk.len() > room {
            bytes.extend_from_slice(&chunk[..room]);
            cut = true;
            break;
        }
        bytes.extend_from_slice(&chunk);
    }
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) => String::from_utf8_lossy(error.as_bytes()).into_owned(),
    };
    Ok(CappedBody { text, cut })
}

/// The error of a call answered with `status` (not 2xx). Its body is redacted before
/// `classify` cuts any excerpt, so no prefix of a key survives a cut either. A redirect says
/// where it pointed (without the query, which may carry a signature): calls follow none
/// (`transport::client_builder`).
fn refused(
    status: u16,
    headers: &HeaderMap,
    body: &str,
    key: Option<&ApiKey>,
    classify: impl Fn(u16, &HeaderMap, &str) -> ProviderError,
) -> ProviderError {
    let mut error = classify(status, headers, &redact_key(body, key));
    error.should_retry = headers
        .get("x-should-retry")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| match v.trim() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        });
    if (300..400).contains(&status) {
        let to = headers
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(|location| location.split(['?', '#']).next().unwrap_or_default())
            .unwrap_or("nowhere");
        error.message = format!(
            "HTTP {status}: the provider redirected the call to {to}; calls follow no redirect \
             (set the provider's base_url to the address that answers)"
        );
    }
    error
}

/// What a key echoed back by a provider is replaced with.
pub const REDACTED: &str = "[REDACTED]";

/// `text` with every occurrence of the call's key replaced by [`REDACTED`]. Some services
/// echo the `Authorization` header in error bodies; those bodies end up in attempts, results
/// and audit events.
pub fn redact_key<'t>(text: &'t str, key: Option<&ApiKey>) -> std::borrow::Cow<'t, str> {
    use secrecy::ExposeSecret as _;
    match key.map(|k| k.secret.expose_secret()) {
        // A very short "key" would redact ordinary words; real keys are far longer.
        Some(secret) if secret.len() >= 8 && text.contains(secret) => {
            std::borrow::Cow::Owned(text.replace(secret, REDACTED))
        }
        _ => std::borrow::Cow::Borrowed(text),
    }
}

/// Cuts `text` to at most `max` bytes on a char boundary, for error excerpts. NUL characters
/// are dropped (Postgres text cannot hold them).
pub fn excerpt(text: &str, max: usize) -> String {
    let text = if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', ""))
    } else {
        std::borrow::Cow::Borrowed(text)
    };
    if text.len() <= max {
        return text.into_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The longest retry delay taken at face value from any provider. Providers ask for seconds
/// to hours (a per-day quota at most a day); anything beyond a week is a broken value, and a
/// large enough one would overflow `Instant::now() + wait` (a panic).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// A retry delay, or `None` when it is beyond [`MAX_RETRY_AFTER`].
pub fn plausible_retry_after(delay: Option<Duration>) -> Option<Duration> {
    delay.filter(|wait| *wait <= MAX_RETRY_AFTER)
}

/// The retry delay a response's headers ask for: `retry-after-ms`, then `retry-after`
/// (seconds or an HTTP date); `None` when absent, unreadable or over [`MAX_RETRY_AFTER`].
pub fn retry_after_from_headers(headers: &HeaderMap) -> Option<Duration> {
    plausible_retry_after(requested_retry_after(headers))
}

fn requested_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Duration::try_from_secs_f64(ms / 1000.0).ok();
    }
    let value = header("retry-after")?;
    if let Ok(seconds) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).ok();
    }
    let date = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = date.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// A Go-style duration as in OpenAI's `x-ratelimit-reset-*` headers (`1s`, `6m0s`, `20ms`,
/// `18.642s`) or a protobuf duration (`38.8s`).
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut number = String::new();
    let mut chars = text.trim().chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let value: f64 = number.parse().ok()?;
        number.clear();
        let unit = match c {
            'h' => 3600.0,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                0.001
            }
            'm' => 60.0,
            's' => 1.0,
            _ => return None,
        };
        total += value * unit;
        any = true;
    }
    if !any || !number.is_empty() {
        return None;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Canonical `finish_reason` values.
pub mod finish {
    pub const STOP: &str = "stop";
    pub const LENGTH: &str = "length";
    pub const TOOL_CALLS: &str = "tool_calls";
    pub const CONTENT_FILTER: &str = "content_filter";
    pub const OTHER: &str = "other";
}

/// Builds the normalised OpenAI `chat.completion` object every adapter returns.
pub fn chat_completion(
    id: &str,
    model: &str,
    text: Option<&str>,
    tool_calls: Option<Value>,
    finish_reason: &str,
    native_finish_reason: Option<&str>,
    usage: &Usage,
) -> Value {
    let mut message = json!({ "role": "assistant", "content": text, "refusal": null });
    if let Some(calls) = tool_calls
        && let Some(object) = message.as_object_mut()
    {
        object.insert("tool_calls".to_owned(), calls);
    }
    json!({
        "id": id,
        "object": "chat.completion",
        "created": chrono::Utc::now().timestamp(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason,
            "native_finish_reason": native_finish_reason,
        }],
        "usage": usage_json(usage),
    })
}

/// OpenAI-shaped usage for a normalised [`Usage`].
pub fn usage_json(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {
            "cached_tokens": usage.cached_input_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        },
        "completion_tokens_details": { "reasoning_tokens": usage.reasoning_tokens },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_ms_wins_over_retry_after() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(
            retry_after_from_headers(&headers),
            Some(Duration::from_secs(7))
        );
        headers.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(
            retry_after_from_headers(&headers),
            Some(Duration::from_millis(250))
        );
    }

    #[test]
    fn retry_after_may_be_an_http_date() {
        let mut headers = HeaderMap::new();
        let at = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        headers.insert("retry-after", HeaderValue::from_str(&at).unwrap());
        let wait = retry_after_from_headers(&headers).unwrap();
        assert!(
            wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        headers.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after_from_headers(&headers), Some(Duration::ZERO));
    }

    #[test]
    fn absurd_delays_are_ignored_not_a_panic() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("1e30"));
        assert_eq!(retry_after_from_headers(&headers), None);
        // Representable, but past any clock: `Instant::now() + wait` would panic.
        headers.insert("retry-after", HeaderValue::from_static("9e18"));
        assert_eq!(retry_after_from_headers(&headers), None);
        headers.insert("retry-after", HeaderValue::from_static("604801"));
        assert_eq!(retry_after_from_headers(&headers), None);
        headers.insert("retry-after", HeaderValue::from_static("604800"));
        assert_eq!(
            retry_after_from_headers(&headers),
            Some(Duration::from_secs(604_800))
        );
        headers.insert("retry-after", HeaderValue::from_static("1e30"));
        headers.insert("retry-after-ms", HeaderValue::from_static("-5"));
        assert_eq!(retry_after_from_headers(&headers), None);
        assert_eq!(parse_go_duration("99999999999999999999999s"), None);
    }

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(
            parse_go_duration("18.642s"),
            Some(Duration::from_millis(18642))
        );
        assert_eq!(parse_go_duration("soon"), None);
        assert_eq!(parse_go_duration("12"), None);
    }

    #[test]
    fn excerpts_cut_on_char_boundaries_and_drop_nul() {
        assert_eq!(excerpt("héllo", 2), "h…");
        assert_eq!(excerpt("a\0b", 10), "ab");
    }
}
