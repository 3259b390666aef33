//! `fake-provider`: an HTTP server that imitates LLM provider APIs, with fault
//! injection, for Switchyard's integration tests and benchmarks.
//!
//! It never talks to a real API and only ever binds a loopback address.
//!
//! # Wire formats
//!
//! * OpenAI chat completions: `POST /v1/chat/completions` (also
//!   `POST /chat/completions`), authenticated with
//!   `Authorization: Bearer <token>`. `"stream": true` streams
//!   `chat.completion.chunk` events ending in `data: [DONE]`, with one usage
//!   chunk (`choices: []`) before it when `stream_options.include_usage` is
//!   true.
//! * Anthropic Messages: `POST /v1/messages`, authenticated with
//!   `x-api-key: <token>`; the `anthropic-version` header is required (400
//!   otherwise) and so is `max_tokens`. `"stream": true` streams
//!   `message_start`, `content_block_start`, `ping`, `content_block_delta`
//!   (`text_delta`) events, `content_block_stop`, `message_delta` and
//!   `message_stop`, each with its `event:` name.
//! * Gemini: `POST /v1beta/models/{model}:generateContent` and
//!   `POST /v1beta/models/{model}:streamGenerateContent?alt=sse` (also under
//!   `/v1/`), authenticated with `x-goog-api-key: <token>` or `?key=<token>`.
//!   The stream is `data:` events (CRLF line endings) with partial text; the
//!   last carries `finishReason` and the full `usageMetadata`; there is no
//!   `[DONE]`. Without `alt=sse` the streaming method answers one JSON array
//!   of the same chunks.
//!
//! Each wire format is one [`WireFormat`] implementation (a section of this
//! file) plus its routes in [`router`]; the request pipeline
//! ([`handle_chat`]), streaming, the fault injection and the statistics are
//! shared.
//!
//! # Behaviour
//!
//! * Credentials: token `revoked` -> invalid key (OpenAI and Anthropic 401,
//!   Gemini 400 `API_KEY_INVALID`); `exhausted` -> quota used up (OpenAI 429
//!   `insufficient_quota`, Anthropic 429 with `error.details.error_code =
//!   enforced_spend_limit_reached`, Gemini 429 with a `PerDay` quota id);
//!   missing credential -> OpenAI and Anthropic 401, Gemini 403.
//! * Malformed JSON or an invalid request (e.g. no messages/contents) -> 400
//!   in the format's error shape.
//! * Faults are drawn per request with one uniform draw, in this order: hang
//!   (no answer for an hour, or until the client gives up or the server
//!   stops), 500, 429 (with a `retry-after` header; Gemini puts the delay in
//!   `RetryInfo.retryDelay` instead), 503 overloaded (Anthropic 529), cut,
//!   stream error, malformed. Hang, 500, 429 and 503 are answered at once;
//!   everything else waits for the configured latency first.
//!   * cut: a stream sends about half of its text chunks, then the connection
//!     is closed abruptly (no terminal marker, no final chunk of the chunked
//!     encoding); a non-streaming request gets status 200 with the first half
//!     of its JSON body.
//!   * stream error: a stream sends about half of its text chunks, then an
//!     error event (OpenAI `data: {"error":{...overloaded_error}}`, Anthropic
//!     `event: error` with `overloaded_error`, Gemini a raw JSON `UNAVAILABLE`
//!     line) and ends; a non-streaming request gets the 503 overloaded answer.
//!   * malformed: status 200 with the body `<html>oops</html>`.
//! * A success answers `"Summary: "` followed by the first sentence of the
//!   last user message, with token usage estimated as
//!   `prompt = ceil(chars / 4) + 4 per message + 3` and
//!   `completion = max(1, ceil(chars / 4))`; a system prompt (OpenAI system
//!   message, Anthropic `system`, Gemini `systemInstruction`) counts as one
//!   message. The request header `x-fake-cached-tokens: N` reports
//!   `min(N, prompt)` cached prompt tokens (OpenAI `cached_tokens`, Anthropic
//!   `cache_read_input_tokens`, Gemini `cachedContentTokenCount`);
//!   `x-fake-cache-write-tokens: N` reports Anthropic
//!   `cache_creation_input_tokens` (at most what is left of the prompt).
//!   Anthropic's `input_tokens` excludes both, so their sum is the prompt
//!   estimate; Gemini's `promptTokenCount` includes the cached tokens.
//! * Streams split the reply into 3 to 16 chunks (word groups; a reply of
//!   fewer than 3 words is split by characters) sent `--chunk-delay-ms`
//!   apart.
//! * `GET /stats` reports `requests_total`, `by_status` (a started hang counts
//!   once as `hang`; a stream counts as `200`), `in_flight` (a stream is in
//!   flight until it ends), `max_in_flight`, `by_auth` (requests per
//!   credential, `<none>` when missing), `by_format` (`openai`, `anthropic`,
//!   `gemini`) and `by_key_status` (per credential, answers by status) for
//!   every chat request, faults included. `GET /stats/window?ms=N` answers
//!   `{"ms":N,"max_requests":M,"recorded":R}`: the largest number of chat
//!   requests that started within any N-millisecond window, over the last
//!   100 000 request starts (R). `POST /stats/reset` zeroes all of them
//!   (`in_flight` stays a live gauge). `GET /healthz` answers `ok`.
//! * Request bodies up to 64 MiB are accepted; larger ones get 413.
//! * On SIGTERM or ctrl-c, open requests (hangs included) are answered 503
//!   and running streams finish without further delays; then the server
//!   exits.
//!
//! # Flags (each also read from the environment as `FAKE_PROVIDER_<NAME>`)
//!
//! | flag | default | meaning |
//! | --- | --- | --- |
//! | `--host` | `127.0.0.1` | loopback address to bind (`localhost` is accepted) |
//! | `--port` | `0` | port; 0 picks a free one |
//! | `--latency-ms` | `0` | delay before each successful answer (first byte of a stream) |
//! | `--jitter-ms` | `0` | uniform ± jitter around the latency, never below 0 |
//! | `--chunk-delay-ms` | `5` | delay between the chunks of a stream |
//! | `--rate-hang` | `0` | fraction (0..=1) of requests never answered |
//! | `--rate-500` | `0` | fraction (0..=1) of requests answered 500 |
//! | `--rate-429` | `0` | fraction (0..=1) of requests answered 429 |
//! | `--retry-after` | `1` | seconds of the `retry-after` header (Gemini: `retryDelay`) of 429s |
//! | `--rate-503` | `0` | fraction (0..=1) answered overloaded (503; Anthropic 529) |
//! | `--rate-cut` | `0` | fraction (0..=1) of answers cut off halfway |
//! | `--rate-stream-error` | `0` | fraction (0..=1) of streams ending in an error event |
//! | `--rate-malformed` | `0` | fraction (0..=1) answered 200 with a non-JSON body |
//! | `--seed` | none | seed for a deterministic random generator |
//! | `--model` | `gpt-4o-mini` | model echoed when the request names none |
//! | `--echo-auth-in-errors` | off | echo the credential headers in every error message (to test redaction) |
//!
//! When the fault rates add up to more than 1, the earlier faults in the
//! order above take precedence.
//!
//! After binding, exactly one line is printed to stdout:
//! `listening on http://127.0.0.1:PORT`. Logs go to stderr (filter with
//! `RUST_LOG`, default `info`). The server stops on SIGTERM or ctrl-c.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;

// ---------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------

/// Command-line flags; each is also read from `FAKE_PROVIDER_<NAME>`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "fake-provider",
    about = "Imitates LLM provider HTTP APIs (OpenAI, Anthropic, Gemini), with fault injection, on loopback only."
)]
struct Cli {
    /// Loopback address to bind (an IP address, or `localhost`).
    #[arg(long, env = "FAKE_PROVIDER_HOST", default_value = "127.0.0.1")]
    host: String,

    /// Port to bind; 0 picks a free port.
    #[arg(long, env = "FAKE_PROVIDER_PORT", default_value_t = 0)]
    port: u16,

    /// Delay in milliseconds before each successful answer (the first byte of a stream).
    #[arg(long, env = "FAKE_PROVIDER_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,

    /// Uniform jitter (± milliseconds) around the latency; the delay never goes below 0.
    #[arg(long, env = "FAKE_PROVIDER_JITTER_MS", default_value_t = 0)]
    jitter_ms: u64,

    /// Delay in milliseconds between the chunks of a streamed answer.
    #[arg(long, env = "FAKE_PROVIDER_CHUNK_DELAY_MS", default_value_t = 5)]
    chunk_delay_ms: u64,

    /// Fraction (0..=1) of requests answered 429 rate limited.
    #[arg(long = "rate-429", env = "FAKE_PROVIDER_RATE_429", default_value_t = 0.0, value_parser = parse_fraction)]
    rate_429: f64,

    /// Seconds sent in the `retry-after` header (Gemini: `RetryInfo.retryDelay`) of 429s.
    #[arg(long, env = "FAKE_PROVIDER_RETRY_AFTER", default_value_t = 1)]
    retry_after: u64,

    /// A request on a credential within this many milliseconds after its 429 is not counted
    /// in `early_after_429` (it may have been sent before the client could read the 429).
    #[arg(long, env = "FAKE_PROVIDER_REST_GRACE_MS", default_value_t = 250)]
    rest_grace_ms: u64,

    /// Fraction (0..=1) of requests answered 500.
    #[arg(long = "rate-500", env = "FAKE_PROVIDER_RATE_500", default_value_t = 0.0, value_parser = parse_fraction)]
    rate_500: f64,

    /// Fraction (0..=1) of requests that never get an answer (about an hour).
    #[arg(long, env = "FAKE_PROVIDER_RATE_HANG", default_value_t = 0.0, value_parser = parse_fraction)]
    rate_hang: f64,

    /// Fraction (0..=1) of requests answered overloaded (503; Anthropic 529).
    #[arg(long = "rate-503", env = "FAKE_PROVIDER_RATE_503", default_value_t = 0.0, value_parser = parse_fraction)]
    rate_503: f64,

    /// Fraction (0..=1) of answers cut off halfway (streams close the connection, others get half a JSON body).
    #[arg(long, env = "FAKE_PROVIDER_RATE_CUT", default_value_t = 0.0, value_parser = parse_fraction)]
    rate_cut: f64,

    /// Fraction (0..=1) of streams that end in an error event (non-streaming: overloaded).
    #[arg(long, env = "FAKE_PROVIDER_RATE_STREAM_ERROR", default_value_t = 0.0, value_parser = parse_fraction)]
    rate_stream_error: f64,

    /// Fraction (0..=1) of requests answered 200 with a non-JSON body.
    #[arg(long, env = "FAKE_PROVIDER_RATE_MALFORMED", default_value_t = 0.0, value_parser = parse_fraction)]
    rate_malformed: f64,

    /// Seed for a deterministic random generator (faults and jitter).
    #[arg(long, env = "FAKE_PROVIDER_SEED")]
    seed: Option<u64>,

    /// Model name echoed when the request names none.
    #[arg(long, env = "FAKE_PROVIDER_MODEL", default_value = "gpt-4o-mini")]
    model: String,

    /// Echo the request's credential headers (`authorization`, `x-api-key`,
    /// `x-goog-api-key`) in the message of every error answer, as some services do.
    #[arg(long, env = "FAKE_PROVIDER_ECHO_AUTH_IN_ERRORS")]
    echo_auth_in_errors: bool,
}

/// Parses a probability in `0..=1`.
fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("not a number: {e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not a fraction between 0 and 1"))
    }
}

/// Resolves `--host` to a loopback IP address, refusing anything else.
fn resolve_host(host: &str) -> Result<IpAddr, String> {
    let ip = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse::<IpAddr>()
            .map_err(|e| format!("--host {host:?} is not an IP address: {e}"))?
    };
    if ip.is_loopback() {
        Ok(ip)
    } else {
        Err(format!(
            "--host {ip} is not a loopback address; fake-provider binds loopback only"
        ))
    }
}

// ---------------------------------------------------------------------------
// Fault injection
// ---------------------------------------------------------------------------

/// Per-request fault probabilities.
#[derive(Debug, Clone, Copy, PartialEq)]
struct FaultRates {
    /// Fraction of requests that never get an answer.
    hang: f64,
    /// Fraction of requests answered 500.
    server_error: f64,
    /// Fraction of requests answered 429.
    rate_limited: f64,
    /// Fraction of requests answered overloaded (503, Anthropic 529).
    overloaded: f64,
    /// Fraction of answers cut off halfway.
    cut: f64,
    /// Fraction of streams ending in an error event.
    stream_error: f64,
    /// Fraction of requests answered 200 with a non-JSON body.
    malformed: f64,
}

/// What happens to one request after authentication and validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Never answer (until the client gives up or the server stops).
    Hang,
    /// Answer 500.
    ServerError,
    /// Answer 429 with a retry delay.
    RateLimited,
    /// Answer overloaded (503, Anthropic 529).
    Overloaded,
    /// Stream half the chunks then drop the connection; or half a JSON body.
    Cut,
    /// Stream half the chunks then an error event; or answer overloaded.
    StreamError,
    /// Answer 200 with a non-JSON body.
    Malformed,
    /// Answer normally, after the latency.
    None,
}

/// Picks the fault for one request from a uniform draw `u` in `[0, 1)`.
///
/// The rates partition `[0, 1)` in the order hang, 500, 429, 503, cut,
/// stream error, malformed, so each rate is exactly the fraction of requests
/// receiving that fault (as long as they add up to at most 1; otherwise the
/// earlier faults take precedence).
fn choose_fault(u: f64, rates: FaultRates) -> Fault {
    let order = [
        (rates.hang, Fault::Hang),
        (rates.server_error, Fault::ServerError),
        (rates.rate_limited, Fault::RateLimited),
        (rates.overloaded, Fault::Overloaded),
        (rates.cut, Fault::Cut),
        (rates.stream_error, Fault::StreamError),
        (rates.malformed, Fault::Malformed),
    ];
    let mut edge = 0.0;
    for (rate, fault) in order {
        edge += rate;
        if u < edge {
            return fault;
        }
    }
    Fault::None
}

/// Latency plus a jitter offset (in `-jitter..=jitter`), clamped at zero.
fn jittered_delay_ms(latency_ms: u64, offset_ms: i64) -> u64 {
    if offset_ms >= 0 {
        latency_ms.saturating_add(offset_ms.unsigned_abs())
    } else {
        latency_ms.saturating_sub(offset_ms.unsigned_abs())
    }
}

/// How long a hanging request waits before it finally gives up.
const HANG_DURATION: Duration = Duration::from_secs(3600);

/// The body of the malformed-answer fault.
const MALFORMED_BODY: &str = "<html>oops</html>";

// ---------------------------------------------------------------------------
// Text helpers and token estimate
// ---------------------------------------------------------------------------

/// Longest summary sentence, in characters.
const MAX_SENTENCE_CHARS: usize = 200;

/// The first sentence of `text`, at most [`MAX_SENTENCE_CHARS`] characters.
///
/// Leading whitespace is skipped. The sentence ends after a `.`, `!` or `?`
/// followed by whitespace or the end of the text, or before a line break;
/// otherwise it is cut at the character limit (always on a char boundary).
fn first_sentence(text: &str) -> &str {
    let text = text.trim_start();
    let mut chars = text.char_indices().peekable();
    let mut count = 0usize;
    while let Some((i, c)) = chars.next() {
        if c == '\n' || c == '\r' {
            return text[..i].trim_end();
        }
        if count == MAX_SENTENCE_CHARS {
            return text[..i].trim_end();
        }
        count += 1;
        if matches!(c, '.' | '!' | '?') {
            let end = i + c.len_utf8();
            match chars.peek() {
                None => return &text[..end],
                Some((_, next)) if next.is_whitespace() => return &text[..end],
                Some(_) => {}
            }
        }
    }
    text.trim_end()
}

/// The first `max_chars` characters of `text`.
fn truncate_chars(text: &str, max_chars: usize) -> &str {
    match text.char_indices().nth(max_chars) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

/// The first half (by bytes, rounded down to a char boundary) of `text`.
fn first_half(text: &str) -> &str {
    let mut end = text.len() / 2;
    while end > 0 && !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or("")
}

/// Most chunks a streamed reply is split into.
const MAX_STREAM_CHUNKS: usize = 16;

/// Fewest chunks a streamed reply of at least this many characters gets.
const MIN_STREAM_CHUNKS: usize = 3;

/// Splits a reply into stream chunks whose concatenation is `text`.
///
/// Words (each with its leading whitespace) are grouped into at most
/// [`MAX_STREAM_CHUNKS`] chunks; a text of fewer than [`MIN_STREAM_CHUNKS`]
/// words is split by characters into up to [`MIN_STREAM_CHUNKS`] chunks
/// instead. An empty text gives no chunks.
fn split_chunks(text: &str) -> Vec<&str> {
    // Byte offsets where a word piece starts: 0, and every whitespace run
    // that follows a non-whitespace character.
    let mut starts = Vec::new();
    let mut prev_is_space = true;
    for (i, c) in text.char_indices() {
        let is_space = c.is_whitespace();
        if i == 0 || (is_space && !prev_is_space) {
            starts.push(i);
        }
        prev_is_space = is_space;
    }
    if starts.len() < MIN_STREAM_CHUNKS {
        // Too few words: split by characters instead.
        let boundaries: Vec<usize> = text
            .char_indices()
            .map(|(i, _)| i)
            .chain(std::iter::once(text.len()))
            .collect();
        let chars = boundaries.len().saturating_sub(1);
        let parts = chars.min(MIN_STREAM_CHUNKS);
        let mut chunks = Vec::with_capacity(parts);
        for k in 0..parts {
            let from = boundaries.get(k * chars / parts).copied().unwrap_or(0);
            let to = boundaries
                .get((k + 1) * chars / parts)
                .copied()
                .unwrap_or(text.len());
            if let Some(chunk) = text.get(from..to) {
                chunks.push(chunk);
            }
        }
        return chunks;
    }
    let group = starts.len().div_ceil(MAX_STREAM_CHUNKS);
    starts
        .chunks(group)
        .enumerate()
        .filter_map(|(k, group_starts)| {
            let from = group_starts.first().copied()?;
            let to = starts.get((k + 1) * group).copied().unwrap_or(text.len());
            text.get(from..to)
        })
        .collect()
}

/// `ceil(chars / 4)`.
fn chars_to_tokens(chars: usize) -> u64 {
    u64::try_from(chars.div_ceil(4)).unwrap_or(u64::MAX)
}

/// Prompt tokens: `ceil(total chars / 4) + 4 per message + 3`.
fn estimate_prompt_tokens(messages: &[ChatMessage]) -> u64 {
    let chars: usize = messages.iter().map(ChatMessage::char_count).sum();
    let per_message = u64::try_from(messages.len())
        .unwrap_or(u64::MAX)
        .saturating_mul(4);
    chars_to_tokens(chars)
        .saturating_add(per_message)
        .saturating_add(3)
}

/// Completion tokens: `ceil(chars / 4)`, at least 1.
fn estimate_completion_tokens(content: &str) -> u64 {
    chars_to_tokens(content.chars().count()).max(1)
}

// ---------------------------------------------------------------------------
// Wire-format-neutral request and reply
// ---------------------------------------------------------------------------

/// One message of a chat request, reduced to what the fake needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChatMessage {
    /// `user`, `assistant`, `system`, ... (Gemini's `model` becomes `assistant`).
    role: String,
    /// The message's text parts (a plain string content is one part).
    parts: Vec<String>,
}

impl ChatMessage {
    /// Characters of all text parts, without separators.
    fn char_count(&self) -> usize {
        self.parts.iter().map(|p| p.chars().count()).sum()
    }

    /// The text parts joined with line breaks.
    fn text(&self) -> String {
        self.parts.join("\n")
    }
}

/// A chat request, parsed out of any wire format.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChatRequest {
    /// The requested model, if the request named one.
    model: Option<String>,
    /// The conversation (a system prompt first, as a `system` message); never
    /// empty.
    messages: Vec<ChatMessage>,
    /// The completion token limit, if the request set one.
    max_tokens: Option<u64>,
    /// Whether the answer is streamed as server-sent events.
    stream: bool,
    /// OpenAI `stream_options.include_usage`.
    include_usage: bool,
}

/// Why a completion stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FinishReason {
    /// The reply is complete.
    Stop,
    /// The reply was cut at the token limit.
    Length,
}

/// The deterministic reply to a chat request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    /// The model echoed back.
    model: String,
    /// The assistant's text.
    content: String,
    /// Why it stopped.
    finish: FinishReason,
    /// Estimated prompt tokens (cache reads and writes included).
    prompt_tokens: u64,
    /// Estimated completion tokens.
    completion_tokens: u64,
    /// Prompt tokens reported as read from cache.
    cached_tokens: u64,
    /// Prompt tokens reported as written to cache (Anthropic only).
    cache_write_tokens: u64,
}

impl Reply {
    /// Prompt tokens neither read from nor written to cache (Anthropic's
    /// `input_tokens`).
    fn uncached_input_tokens(&self) -> u64 {
        self.prompt_tokens
            .saturating_sub(self.cached_tokens)
            .saturating_sub(self.cache_write_tokens)
    }

    /// Prompt plus completion tokens.
    fn total_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// The cache figures a request asked the fake to report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct CacheHints {
    /// `x-fake-cached-tokens`.
    read: Option<u64>,
    /// `x-fake-cache-write-tokens`.
    write: Option<u64>,
}

impl CacheHints {
    /// Reads the hint headers; invalid values are ignored.
    fn from_headers(headers: &HeaderMap) -> Self {
        let number = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok())
        };
        Self {
            read: number("x-fake-cached-tokens"),
            write: number("x-fake-cache-write-tokens"),
        }
    }
}

/// Builds the deterministic reply: `"Summary: "` plus the first sentence of
/// the last user message, cut to `max_tokens` if needed.
fn build_reply(req: &ChatRequest, default_model: &str, cache: CacheHints) -> Reply {
    let last_user = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(ChatMessage::text)
        .unwrap_or_default();
    let mut content = format!("Summary: {}", first_sentence(&last_user));
    let mut finish = FinishReason::Stop;
    if let Some(max) = req.max_tokens
        && estimate_completion_tokens(&content) > max
    {
        let max_chars = usize::try_from(max.saturating_mul(4)).unwrap_or(usize::MAX);
        content = truncate_chars(&content, max_chars).to_owned();
        finish = FinishReason::Length;
    }
    let prompt_tokens = estimate_prompt_tokens(&req.messages);
    let completion_tokens = estimate_completion_tokens(&content);
    let cached_tokens = cache.read.unwrap_or(0).min(prompt_tokens);
    let cache_write_tokens = cache
        .write
        .unwrap_or(0)
        .min(prompt_tokens.saturating_sub(cached_tokens));
    Reply {
        model: req
            .model
            .clone()
            .unwrap_or_else(|| default_model.to_owned()),
        content,
        finish,
        prompt_tokens,
        completion_tokens,
        cached_tokens,
        cache_write_tokens,
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh random-looking identifier (32 hex digits).
fn fresh_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// Reads an optional boolean field.
fn bool_field(obj: &serde_json::Map<String, Value>, field: &str) -> Result<bool, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(format!("Invalid type for '{field}': expected a boolean.")),
    }
}

/// Reads an optional token limit, rejecting non-positive or non-integer values.
fn limit_field(obj: &serde_json::Map<String, Value>, field: &str) -> Result<Option<u64>, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Ok(Some(n)),
            _ => Err(format!(
                "Invalid '{field}': expected an integer greater than or equal to 1."
            )),
        },
    }
}

/// The first value of query parameter `name`, percent-decoded.
fn query_param(uri: &Uri, name: &str) -> Option<String> {
    let query = uri.query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

// ---------------------------------------------------------------------------
// Answers and errors shared by all wire formats
// ---------------------------------------------------------------------------

/// A fully rendered, non-streaming HTTP answer (pure data, easy to test).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    /// HTTP status.
    status: StatusCode,
    /// `content-type` header.
    content_type: &'static str,
    /// Extra headers (lower-case names).
    headers: Vec<(&'static str, String)>,
    /// The body.
    body: String,
}

impl Answer {
    /// A JSON answer.
    fn json(status: StatusCode, body: &Value) -> Self {
        Self {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body: body.to_string(),
        }
    }

    /// A JSON answer from a serializable value (fields keep their order).
    fn json_of<T: Serialize>(status: StatusCode, body: &T) -> Self {
        match serde_json::to_string(body) {
            Ok(body) => Self {
                status,
                content_type: "application/json",
                headers: Vec::new(),
                body,
            },
            Err(e) => Self {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                content_type: "text/plain; charset=utf-8",
                headers: Vec::new(),
                body: format!("fake-provider cannot serialize its answer: {e}"),
            },
        }
    }

    /// Adds a header.
    fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The value of header `name`, if set.
    #[cfg(test)]
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.body).into_response();
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(self.content_type) {
            headers.insert(header::CONTENT_TYPE, value);
        }
        for (name, value) in self.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                headers.insert(name, value);
            }
        }
        response
    }
}

/// The error answers a wire format must be able to render.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ApiError {
    /// No usable credential.
    MissingCredential,
    /// The credential is revoked (token `revoked`).
    InvalidCredential(String),
    /// The account's quota is used up (token `exhausted`).
    QuotaExhausted,
    /// The request is malformed.
    BadRequest(String),
    /// The body could not be read (too large, broken stream, ...).
    BodyRejected(StatusCode, String),
    /// Injected 500.
    ServerError,
    /// Injected 429; carries the retry delay in seconds.
    RateLimited(u64),
    /// Injected overload (503; Anthropic 529).
    Overloaded,
    /// The server is shutting down, or a hang ran out (503).
    Unavailable,
}

impl ApiError {
    /// The usual HTTP status of this error; formats may differ (Anthropic
    /// overload is 529, a revoked Gemini key is 400, ...).
    fn status(&self) -> StatusCode {
        match self {
            Self::MissingCredential | Self::InvalidCredential(_) => StatusCode::UNAUTHORIZED,
            Self::QuotaExhausted | Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::BodyRejected(status, _) => *status,
            Self::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Overloaded | Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// A provider API dialect: how credentials, requests, replies, streams and
/// errors look.
///
/// Adding a provider means one more implementation plus its routes.
trait WireFormat: Send + Sync + 'static {
    /// The name counted in `/stats` `by_format`.
    fn name(&self) -> &'static str;
    /// The credential presented by the request, if any.
    fn credential(&self, headers: &HeaderMap, uri: &Uri) -> Option<String>;
    /// Checks required headers other than the credential (message on failure).
    fn check_headers(&self, _headers: &HeaderMap) -> Result<(), String> {
        Ok(())
    }
    /// Parses a request body.
    fn parse(&self, body: &[u8]) -> Result<ChatRequest, String>;
    /// Renders a successful, non-streamed reply.
    fn success(&self, reply: &Reply) -> Answer;
    /// Renders a streamed reply, split into `chunks` (which concatenate to
    /// `reply.content`).
    fn stream(&self, reply: &Reply, chunks: &[&str], include_usage: bool) -> StreamPlan;
    /// The event that breaks off a stream with an overload error.
    fn stream_error_event(&self) -> String;
    /// Renders an error.
    fn error(&self, err: &ApiError) -> Answer;
}

// ---------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------

/// The events of one streamed reply, already framed as SSE text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct StreamPlan {
    /// Events before the first text chunk (sent together).
    head: Vec<String>,
    /// One event per text chunk (sent with a delay between them).
    deltas: Vec<String>,
    /// Events after the last text chunk, up to the terminal marker (sent
    /// together, after a delay).
    tail: Vec<String>,
}

/// How a stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamEnding {
    /// All events, terminal marker included.
    Complete,
    /// About half the deltas, then the connection is dropped.
    Cut,
    /// About half the deltas, then an error event, then a clean end.
    Error,
}

/// One step of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// Send this text.
    Send(String),
    /// Wait the chunk delay.
    Pause,
    /// Drop the connection (the body fails, so the chunked encoding never
    /// terminates).
    Abort,
}

/// Orders a stream's events and pauses for the given ending.
///
/// A cut or error stream sends `deltas.len() / 2` deltas, which never
/// includes the last one (Gemini's terminal chunk).
fn build_steps(plan: StreamPlan, ending: StreamEnding, error_event: String) -> Vec<Step> {
    let StreamPlan { head, deltas, tail } = plan;
    let sent_deltas = match ending {
        StreamEnding::Complete => deltas.len(),
        StreamEnding::Cut | StreamEnding::Error => deltas.len() / 2,
    };
    let mut steps: Vec<Step> = head.into_iter().map(Step::Send).collect();
    for (i, delta) in deltas.into_iter().take(sent_deltas).enumerate() {
        if i > 0 {
            steps.push(Step::Pause);
        }
        steps.push(Step::Send(delta));
    }
    match ending {
        StreamEnding::Complete => {
            if !tail.is_empty() {
                steps.push(Step::Pause);
                steps.extend(tail.into_iter().map(Step::Send));
            }
        }
        StreamEnding::Cut => {
            steps.push(Step::Pause);
            steps.push(Step::Abort);
        }
        StreamEnding::Error => {
            steps.push(Step::Pause);
            steps.push(Step::Send(error_event));
        }
    }
    steps
}

/// `data: <json>` plus a blank line.
fn sse_data(value: &Value) -> String {
    format!("data: {value}\n\n")
}

/// `event: <name>`, `data: <json>` plus a blank line.
fn sse_event(name: &str, value: &Value) -> String {
    format!("event: {name}\ndata: {value}\n\n")
}

/// The state a running stream carries; dropping it (at the end, or when the
/// client goes away) ends the request's `in_flight` count.
struct StreamState {
    /// What is left to do.
    steps: std::vec::IntoIter<Step>,
    /// The pause between chunks.
    delay: Duration,
    /// Becomes `true` when the server is shutting down (pauses are skipped).
    shutdown: watch::Receiver<bool>,
    /// Keeps the request in flight.
    _in_flight: InFlight,
}

/// Produces the next piece of a stream's body.
async fn next_stream_item(
    mut state: StreamState,
) -> Option<(Result<Bytes, std::io::Error>, StreamState)> {
    loop {
        match state.steps.next()? {
            Step::Send(text) => return Some((Ok(Bytes::from(text)), state)),
            Step::Pause => {
                if state.delay.is_zero() || *state.shutdown.borrow() {
                    continue;
                }
                let delay = state.delay;
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = state.shutdown.wait_for(|stopping| *stopping) => {}
                }
            }
            Step::Abort => {
                let err = std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "fake-provider cut the stream",
                );
                return Some((Err(err), state));
            }
        }
    }
}

/// A `200 text/event-stream` response that plays `steps`.
fn stream_response(
    steps: Vec<Step>,
    delay: Duration,
    shutdown: watch::Receiver<bool>,
    in_flight: InFlight,
) -> Response {
    let state = StreamState {
        steps: steps.into_iter(),
        delay,
        shutdown,
        _in_flight: in_flight,
    };
    let mut response = Response::new(Body::from_stream(futures::stream::unfold(
        state,
        next_stream_item,
    )));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

// ---------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------

/// The wire format names, always present in `by_format`.
const FORMATS: [&str; 3] = ["openai", "anthropic", "gemini"];

/// How many request start instants `/stats/window` remembers.
const MAX_RECORDED_STARTS: usize = 100_000;

/// Counters guarded by one mutex.
#[derive(Debug, Default)]
struct Counters {
    /// Chat requests received.
    requests_total: u64,
    /// Answers by status code (or `hang`).
    by_status: BTreeMap<String, u64>,
    /// Requests by credential (`<none>` when missing).
    by_auth: BTreeMap<String, u64>,
    /// Requests by wire format.
    by_format: BTreeMap<String, u64>,
    /// Answers by credential, then status code (or `hang`).
    by_key_status: BTreeMap<String, BTreeMap<String, u64>>,
    /// When the last [`MAX_RECORDED_STARTS`] requests started, oldest first.
    starts: VecDeque<Instant>,
    /// Per credential: from when a request counts as early (its last injected 429 was sent
    /// plus `--rest-grace-ms`) and until when it asked the client to wait (`retry-after`).
    rests: BTreeMap<String, (Instant, Instant)>,
    /// Requests that arrived on a credential while its `retry-after` was still running, more
    /// than `--rest-grace-ms` after the 429 was sent (requests already on the wire, or sent
    /// before the client could have read the 429, are not the client's fault).
    early_after_429: u64,
}

/// Request statistics, safe to share between handlers.
#[derive(Debug, Default)]
struct Stats {
    /// Totals and breakdowns.
    counters: Mutex<Counters>,
    /// Chat requests currently being handled (streams until they end).
    in_flight: AtomicU64,
    /// Highest `in_flight` since start or the last reset.
    max_in_flight: AtomicU64,
}

/// The `GET /stats` answer.
#[derive(Debug, Serialize)]
struct StatsSnapshot {
    /// Chat requests received.
    requests_total: u64,
    /// Answers by status code (or `hang`).
    by_status: BTreeMap<String, u64>,
    /// Chat requests currently being handled.
    in_flight: u64,
    /// Highest concurrency seen.
    max_in_flight: u64,
    /// Requests by credential.
    by_auth: BTreeMap<String, u64>,
    /// Requests by wire format.
    by_format: BTreeMap<String, u64>,
    /// Answers by credential, then status.
    by_key_status: BTreeMap<String, BTreeMap<String, u64>>,
    /// Requests that ignored a running `retry-after` (see `Counters::early_after_429`).
    early_after_429: u64,
}

/// The `GET /stats/window` answer.
#[derive(Debug, Serialize)]
struct WindowSnapshot {
    /// The window length asked for.
    ms: u64,
    /// Most request starts within any window of that length.
    max_requests: usize,
    /// How many request starts are remembered.
    recorded: usize,
}

/// The largest number of `starts` (sorted, oldest first) that lie within any
/// half-open window of length `window`, i.e. with `last - first < window`.
fn max_in_window(starts: &VecDeque<Instant>, window: Duration) -> usize {
    if window.is_zero() {
        return 0;
    }
    let mut best = 0;
    let mut first = 0;
    for (last, &end) in starts.iter().enumerate() {
        while first < last
            && starts
                .get(first)
                .is_some_and(|&start| end.saturating_duration_since(start) >= window)
        {
            first += 1;
        }
        best = best.max(last - first + 1);
    }
    best
}

impl Stats {
    /// Locks the counters, recovering from a poisoned lock.
    fn lock(&self) -> MutexGuard<'_, Counters> {
        self.counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a new chat request; the guard keeps it in flight until dropped.
    fn begin(self: &Arc<Self>, format: &str, credential: Option<&str>) -> InFlight {
        let key = credential.unwrap_or("<none>").to_owned();
        {
            let mut c = self.lock();
            c.requests_total += 1;
            *c.by_auth.entry(key.clone()).or_insert(0) += 1;
            *c.by_format.entry(format.to_owned()).or_insert(0) += 1;
            let now = Instant::now();
            if let Some((early_from, until)) = c.rests.get(&key)
                && now > *early_from
                && now < *until
            {
                c.early_after_429 += 1;
            }
            // Taken under the lock, so the instants stay sorted.
            c.starts.push_back(now);
            while c.starts.len() > MAX_RECORDED_STARTS {
                c.starts.pop_front();
            }
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight {
            stats: Arc::clone(self),
            key,
        }
    }

    /// The current numbers.
    fn snapshot(&self) -> StatsSnapshot {
        let c = self.lock();
        let mut by_format: BTreeMap<String, u64> =
            FORMATS.iter().map(|f| ((*f).to_owned(), 0)).collect();
        by_format.extend(c.by_format.iter().map(|(k, v)| (k.clone(), *v)));
        StatsSnapshot {
            requests_total: c.requests_total,
            by_status: c.by_status.clone(),
            in_flight: self.in_flight.load(Ordering::SeqCst),
            max_in_flight: self.max_in_flight.load(Ordering::SeqCst),
            by_auth: c.by_auth.clone(),
            by_format,
            by_key_status: c.by_key_status.clone(),
            early_after_429: c.early_after_429,
        }
    }

    /// Remembers that `credential` was told to wait `rest`; requests within `grace` of now
    /// are not counted as early.
    fn rest(&self, credential: Option<&str>, rest: Duration, grace: Duration) {
        let now = Instant::now();
        self.lock().rests.insert(
            credential.unwrap_or("<none>").to_owned(),
            (now + grace, now + rest),
        );
    }

    /// The busiest `ms`-millisecond window.
    fn window(&self, ms: u64) -> WindowSnapshot {
        let c = self.lock();
        WindowSnapshot {
            ms,
            max_requests: max_in_window(&c.starts, Duration::from_millis(ms)),
            recorded: c.starts.len(),
        }
    }

    /// Zeroes the counters. `in_flight` is a gauge and keeps counting the
    /// requests still open; `max_in_flight` restarts from it.
    fn reset(&self) {
        let mut c = self.lock();
        *c = Counters::default();
        self.max_in_flight
            .store(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// Keeps one request counted in `in_flight` until dropped (also when the
/// client disconnects and the handler or the stream is dropped), and records
/// its answer.
struct InFlight {
    /// The statistics to update.
    stats: Arc<Stats>,
    /// The credential (`<none>` when missing).
    key: String,
}

impl InFlight {
    /// Counts the request's answer (a status code, or `hang`).
    fn record(&self, status: &str) {
        let mut c = self.stats.lock();
        *c.by_status.entry(status.to_owned()).or_insert(0) += 1;
        *c.by_key_status
            .entry(self.key.clone())
            .or_default()
            .entry(status.to_owned())
            .or_insert(0) += 1;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------
// Shared state and request pipeline
// ---------------------------------------------------------------------------

/// Server configuration derived from the CLI.
#[derive(Debug, Clone)]
struct Config {
    /// Base delay of successful answers.
    latency_ms: u64,
    /// ± jitter around it.
    jitter_ms: u64,
    /// Delay between stream chunks.
    chunk_delay_ms: u64,
    /// Fault probabilities.
    rates: FaultRates,
    /// Retry delay in seconds of injected 429s.
    retry_after: u64,
    /// See [`Counters::early_after_429`].
    rest_grace_ms: u64,
    /// Default model name.
    model: String,
    /// Echo credential headers in error messages.
    echo_auth_in_errors: bool,
}

/// State shared by all handlers.
#[derive(Clone)]
struct AppState {
    /// Configuration.
    config: Arc<Config>,
    /// Random generator (seeded when `--seed` is given).
    rng: Arc<Mutex<fastrand::Rng>>,
    /// Counters.
    stats: Arc<Stats>,
    /// Becomes `true` when the server is shutting down.
    shutdown: watch::Receiver<bool>,
}

impl AppState {
    /// Builds the state from a configuration.
    fn new(config: Config, seed: Option<u64>, shutdown: watch::Receiver<bool>) -> Self {
        let rng = seed.map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed);
        Self {
            config: Arc::new(config),
            rng: Arc::new(Mutex::new(rng)),
            stats: Arc::new(Stats::default()),
            shutdown,
        }
    }

    /// Draws the fault for one request.
    fn draw_fault(&self) -> Fault {
        let u = self
            .rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .f64();
        choose_fault(u, self.config.rates)
    }

    /// Draws the delay of one successful answer.
    fn draw_delay(&self) -> Duration {
        let jitter = i64::try_from(self.config.jitter_ms).unwrap_or(i64::MAX);
        let offset = if jitter == 0 {
            0
        } else {
            self.rng
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .i64(-jitter..=jitter)
        };
        Duration::from_millis(jittered_delay_ms(self.config.latency_ms, offset))
    }

    /// Sleeps for `duration`, or until shutdown. Returns `false` on shutdown.
    async fn sleep_unless_shutdown(&self, duration: Duration) -> bool {
        if duration.is_zero() {
            return true;
        }
        let mut rx = self.shutdown.clone();
        tokio::select! {
            () = tokio::time::sleep(duration) => true,
            _ = rx.wait_for(|stopping| *stopping) => false,
        }
    }
}

/// Records the answer's status and turns it into a response.
fn finish(in_flight: &InFlight, answer: Answer) -> Response {
    in_flight.record(answer.status.as_str());
    answer.into_response()
}

/// The credential headers of a request, as `name: value` lines.
fn credential_headers(headers: &HeaderMap) -> String {
    ["authorization", "x-api-key", "x-goog-api-key"]
        .iter()
        .filter_map(|name| {
            let value = headers.get(*name)?.to_str().ok()?;
            Some(format!("{name}: {value}"))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// With `--echo-auth-in-errors`, appends the credential headers to an error answer's
/// `error.message` (every wire format here has one).
fn echo_auth(mut answer: Answer, echoed: Option<&str>) -> Answer {
    let Some(echoed) = echoed else { return answer };
    if answer.status.as_u16() < 400 {
        return answer;
    }
    if let Ok(mut body) = serde_json::from_str::<Value>(&answer.body)
        && let Some(Value::String(message)) =
            body.get_mut("error").and_then(|e| e.get_mut("message"))
    {
        message.push_str(&format!(" (request headers: {echoed})"));
        answer.body = body.to_string();
    }
    answer
}

/// The pipeline every chat endpoint shares: count, authenticate, validate,
/// inject faults, wait, answer (or stream).
async fn handle_chat<W: WireFormat>(
    wire: &W,
    state: &AppState,
    headers: &HeaderMap,
    uri: &Uri,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let credential = wire.credential(headers, uri);
    let echoed = state
        .config
        .echo_auth_in_errors
        .then(|| credential_headers(headers));
    let finish_echoing = |in_flight: &InFlight, answer: Answer| {
        finish(in_flight, echo_auth(answer, echoed.as_deref()))
    };
    let in_flight = state.stats.begin(wire.name(), credential.as_deref());

    let token = match credential.as_deref() {
        None => return finish_echoing(&in_flight, wire.error(&ApiError::MissingCredential)),
        Some("revoked") => {
            let err = ApiError::InvalidCredential("revoked".to_owned());
            return finish_echoing(&in_flight, wire.error(&err));
        }
        Some("exhausted") => {
            return finish_echoing(&in_flight, wire.error(&ApiError::QuotaExhausted));
        }
        Some(token) => token,
    };
    if let Err(msg) = wire.check_headers(headers) {
        return finish_echoing(&in_flight, wire.error(&ApiError::BadRequest(msg)));
    }

    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let err = ApiError::BodyRejected(rejection.status(), rejection.body_text());
            return finish_echoing(&in_flight, wire.error(&err));
        }
    };
    let request = match wire.parse(&body) {
        Ok(request) => request,
        Err(msg) => return finish_echoing(&in_flight, wire.error(&ApiError::BadRequest(msg))),
    };

    let fault = state.draw_fault();
    match fault {
        Fault::Hang => {
            in_flight.record("hang");
            tracing::debug!(token, format = wire.name(), "hanging request");
            state.sleep_unless_shutdown(HANG_DURATION).await;
            // Whatever ends the hang, it was already counted as `hang`.
            return wire.error(&ApiError::Unavailable).into_response();
        }
        Fault::ServerError => {
            return finish_echoing(&in_flight, wire.error(&ApiError::ServerError));
        }
        Fault::RateLimited => {
            state.stats.rest(
                credential.as_deref(),
                Duration::from_secs(state.config.retry_after),
                Duration::from_millis(state.config.rest_grace_ms),
            );
            let err = ApiError::RateLimited(state.config.retry_after);
            return finish_echoing(&in_flight, wire.error(&err));
        }
        Fault::Overloaded => return finish_echoing(&in_flight, wire.error(&ApiError::Overloaded)),
        Fault::StreamError if !request.stream => {
            return finish_echoing(&in_flight, wire.error(&ApiError::Overloaded));
        }
        Fault::Cut | Fault::StreamError | Fault::Malformed | Fault::None => {}
    }

    if !state.sleep_unless_shutdown(state.draw_delay()).await {
        return finish_echoing(&in_flight, wire.error(&ApiError::Unavailable));
    }
    if fault == Fault::Malformed {
        let answer = Answer {
            status: StatusCode::OK,
            content_type: "text/html; charset=utf-8",
            headers: Vec::new(),
            body: MALFORMED_BODY.to_owned(),
        };
        return finish_echoing(&in_flight, answer);
    }

    let reply = build_reply(
        &request,
        &state.config.model,
        CacheHints::from_headers(headers),
    );
    if !request.stream {
        let mut answer = wire.success(&reply);
        if fault == Fault::Cut {
            answer.body = first_half(&answer.body).to_owned();
        }
        return finish_echoing(&in_flight, answer);
    }

    let ending = match fault {
        Fault::Cut => StreamEnding::Cut,
        Fault::StreamError => StreamEnding::Error,
        _ => StreamEnding::Complete,
    };
    let chunks = split_chunks(&reply.content);
    let plan = wire.stream(&reply, &chunks, request.include_usage);
    let steps = build_steps(plan, ending, wire.stream_error_event());
    in_flight.record(StatusCode::OK.as_str());
    stream_response(
        steps,
        Duration::from_millis(state.config.chunk_delay_ms),
        state.shutdown.clone(),
        in_flight,
    )
}

// ---------------------------------------------------------------------------
// OpenAI wire format
// ---------------------------------------------------------------------------

/// The OpenAI chat completions dialect.
struct OpenAi;

/// The OpenAI error envelope: `{"error": {...}}`.
#[derive(Debug, Serialize)]
struct OpenAiErrorEnvelope<'a> {
    /// The error itself.
    error: OpenAiError<'a>,
}

/// An OpenAI error object.
#[derive(Debug, Serialize)]
struct OpenAiError<'a> {
    /// Human-readable message.
    message: &'a str,
    /// Error type, e.g. `invalid_request_error`.
    #[serde(rename = "type")]
    kind: &'a str,
    /// Offending parameter; always null here.
    param: Option<&'a str>,
    /// Machine-readable code, e.g. `rate_limit_exceeded`.
    code: Option<&'a str>,
}

/// Renders an OpenAI error answer.
fn openai_error_body(message: &str, kind: &str, code: Option<&str>, status: StatusCode) -> Answer {
    let body = OpenAiErrorEnvelope {
        error: OpenAiError {
            message,
            kind,
            param: None,
            code,
        },
    };
    Answer::json_of(status, &body)
}

/// An OpenAI `chat.completion` object, fields in the API's order.
#[derive(Debug, Serialize)]
struct OpenAiCompletion<'a> {
    /// `chatcmpl-<uuid>`.
    id: String,
    /// Always `chat.completion`.
    object: &'static str,
    /// Unix seconds.
    created: u64,
    /// The model echoed back.
    model: &'a str,
    /// Exactly one choice.
    choices: [OpenAiChoice<'a>; 1],
    /// Token accounting.
    usage: OpenAiUsage,
    /// Always `fp_fake`.
    system_fingerprint: &'static str,
}

/// One completion choice.
#[derive(Debug, Serialize)]
struct OpenAiChoice<'a> {
    /// Always 0.
    index: u32,
    /// The assistant message.
    message: OpenAiMessage<'a>,
    /// Always null.
    logprobs: Option<()>,
    /// `stop` or `length`.
    finish_reason: &'static str,
}

/// The assistant message of a choice.
#[derive(Debug, Serialize)]
struct OpenAiMessage<'a> {
    /// Always `assistant`.
    role: &'static str,
    /// The reply text.
    content: &'a str,
    /// Always null.
    refusal: Option<&'a str>,
}

/// OpenAI usage block.
#[derive(Debug, Serialize)]
struct OpenAiUsage {
    /// Estimated prompt tokens.
    prompt_tokens: u64,
    /// Estimated completion tokens.
    completion_tokens: u64,
    /// Their sum.
    total_tokens: u64,
    /// Cached and audio prompt tokens.
    prompt_tokens_details: OpenAiPromptDetails,
    /// Breakdown of completion tokens; all zero.
    completion_tokens_details: OpenAiCompletionDetails,
}

impl OpenAiUsage {
    /// The usage of a reply.
    fn of(reply: &Reply) -> Self {
        Self {
            prompt_tokens: reply.prompt_tokens,
            completion_tokens: reply.completion_tokens,
            total_tokens: reply.total_tokens(),
            prompt_tokens_details: OpenAiPromptDetails {
                cached_tokens: reply.cached_tokens,
                audio_tokens: 0,
            },
            completion_tokens_details: OpenAiCompletionDetails::default(),
        }
    }
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Serialize)]
struct OpenAiPromptDetails {
    /// Prompt tokens served from cache.
    cached_tokens: u64,
    /// Always 0.
    audio_tokens: u64,
}

/// `usage.completion_tokens_details`.
#[derive(Debug, Default, Serialize)]
struct OpenAiCompletionDetails {
    /// Always 0.
    reasoning_tokens: u64,
    /// Always 0.
    audio_tokens: u64,
    /// Always 0.
    accepted_prediction_tokens: u64,
    /// Always 0.
    rejected_prediction_tokens: u64,
}

/// Reads an OpenAI message `content` (string, array of parts or null) into
/// text parts.
fn openai_content_parts(index: usize, content: Option<&Value>) -> Result<Vec<String>, String> {
    match content {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(parts)) => {
            let mut out = Vec::new();
            for (j, part) in parts.iter().enumerate() {
                let Some(obj) = part.as_object() else {
                    return Err(format!(
                        "Invalid type for 'messages[{index}].content[{j}]': expected an object."
                    ));
                };
                if obj.get("type").and_then(Value::as_str) == Some("text") {
                    match obj.get("text") {
                        Some(Value::String(t)) => out.push(t.clone()),
                        _ => {
                            return Err(format!(
                                "Missing required parameter: 'messages[{index}].content[{j}].text'."
                            ));
                        }
                    }
                }
            }
            Ok(out)
        }
        Some(_) => Err(format!(
            "Invalid type for 'messages[{index}].content': expected a string or an array."
        )),
    }
}

/// An OpenAI `finish_reason`.
fn openai_finish_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// One `chat.completion.chunk` with a single choice.
fn openai_chunk(
    id: &str,
    created: u64,
    model: &str,
    delta: Value,
    finish_reason: Option<&str>,
    include_usage: bool,
) -> Value {
    let mut chunk = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [{
            "index": 0,
            "delta": delta,
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
    });
    if include_usage && let Some(obj) = chunk.as_object_mut() {
        obj.insert("usage".to_owned(), Value::Null);
    }
    chunk
}

impl WireFormat for OpenAi {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn credential(&self, headers: &HeaderMap, _uri: &Uri) -> Option<String> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
        let (scheme, token) = value.split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
    }

    fn parse(&self, body: &[u8]) -> Result<ChatRequest, String> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            format!(
                "We could not parse the JSON body of your request. (HINT: This likely means you \
                 aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, \
                 but what was sent was not valid JSON.) Parser error: {e}"
            )
        })?;
        let Some(obj) = value.as_object() else {
            return Err("Invalid request body: expected a JSON object.".to_owned());
        };
        let stream = bool_field(obj, "stream")?;
        let include_usage = match obj.get("stream_options") {
            None | Some(Value::Null) => false,
            Some(Value::Object(options)) => {
                if !stream {
                    return Err(
                        "The 'stream_options' parameter is only allowed when 'stream' is enabled."
                            .to_owned(),
                    );
                }
                options.get("include_usage").and_then(Value::as_bool) == Some(true)
            }
            Some(_) => {
                return Err("Invalid type for 'stream_options': expected an object.".to_owned());
            }
        };
        let model = match obj.get("model") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err("Invalid type for 'model': expected a string.".to_owned()),
        };
        let messages = match obj.get("messages") {
            None | Some(Value::Null) => {
                return Err("Missing required parameter: 'messages'.".to_owned());
            }
            Some(Value::Array(list)) if list.is_empty() => {
                return Err(
                    "Invalid 'messages': empty array. Expected an array with minimum length 1, \
                     but got an empty array instead."
                        .to_owned(),
                );
            }
            Some(Value::Array(list)) => list,
            Some(_) => return Err("Invalid type for 'messages': expected an array.".to_owned()),
        };
        let mut parsed = Vec::with_capacity(messages.len());
        for (i, message) in messages.iter().enumerate() {
            let Some(m) = message.as_object() else {
                return Err(format!(
                    "Invalid type for 'messages[{i}]': expected an object."
                ));
            };
            let Some(role) = m.get("role").and_then(Value::as_str) else {
                return Err(format!("Missing required parameter: 'messages[{i}].role'."));
            };
            parsed.push(ChatMessage {
                role: role.to_owned(),
                parts: openai_content_parts(i, m.get("content"))?,
            });
        }
        let max_tokens = match (
            limit_field(obj, "max_tokens")?,
            limit_field(obj, "max_completion_tokens")?,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(ChatRequest {
            model,
            messages: parsed,
            max_tokens,
            stream,
            include_usage,
        })
    }

    fn success(&self, reply: &Reply) -> Answer {
        let body = OpenAiCompletion {
            id: format!("chatcmpl-{}", fresh_id()),
            object: "chat.completion",
            created: unix_now(),
            model: &reply.model,
            choices: [OpenAiChoice {
                index: 0,
                message: OpenAiMessage {
                    role: "assistant",
                    content: &reply.content,
                    refusal: None,
                },
                logprobs: None,
                finish_reason: openai_finish_reason(reply.finish),
            }],
            usage: OpenAiUsage::of(reply),
            system_fingerprint: "fp_fake",
        };
        Answer::json_of(StatusCode::OK, &body)
    }

    fn stream(&self, reply: &Reply, chunks: &[&str], include_usage: bool) -> StreamPlan {
        let id = format!("chatcmpl-{}", fresh_id());
        let created = unix_now();
        let model = reply.model.as_str();
        let chunk = |delta: Value, finish: Option<&str>| {
            sse_data(&openai_chunk(
                &id,
                created,
                model,
                delta,
                finish,
                include_usage,
            ))
        };
        let head = vec![chunk(
            json!({"role": "assistant", "content": "", "refusal": null}),
            None,
        )];
        let deltas = chunks
            .iter()
            .map(|text| chunk(json!({ "content": text }), None))
            .collect();
        let mut tail = vec![chunk(json!({}), Some(openai_finish_reason(reply.finish)))];
        if include_usage {
            let usage = serde_json::to_value(OpenAiUsage::of(reply)).unwrap_or(Value::Null);
            tail.push(sse_data(&json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [],
                "usage": usage,
            })));
        }
        tail.push("data: [DONE]\n\n".to_owned());
        StreamPlan { head, deltas, tail }
    }

    fn stream_error_event(&self) -> String {
        sse_data(&json!({"error": {"message": "Overloaded", "type": "overloaded_error"}}))
    }

    fn error(&self, err: &ApiError) -> Answer {
        let status = err.status();
        match err {
            ApiError::MissingCredential => openai_error_body(
                "You didn't provide an API key. You need to provide your API key in an \
                 Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
                Some("invalid_api_key"),
                status,
            ),
            ApiError::InvalidCredential(token) => openai_error_body(
                &format!("Incorrect API key provided: {token}."),
                "invalid_request_error",
                Some("invalid_api_key"),
                status,
            ),
            ApiError::QuotaExhausted => openai_error_body(
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota",
                Some("insufficient_quota"),
                status,
            ),
            ApiError::BadRequest(msg) | ApiError::BodyRejected(_, msg) => {
                openai_error_body(msg, "invalid_request_error", None, status)
            }
            ApiError::ServerError => openai_error_body(
                "The server had an error while processing your request.",
                "server_error",
                None,
                status,
            ),
            ApiError::RateLimited(retry_after) => openai_error_body(
                "Rate limit reached for requests",
                "requests",
                Some("rate_limit_exceeded"),
                status,
            )
            .with_header("retry-after", retry_after.to_string()),
            ApiError::Overloaded | ApiError::Unavailable => openai_error_body(
                "The engine is currently overloaded, please try again later.",
                "server_error",
                None,
                status,
            ),
        }
    }
}

/// `POST /v1/chat/completions` and `POST /chat/completions`.
async fn openai_chat(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle_chat(&OpenAi, &state, &headers, &uri, body).await
}

// ---------------------------------------------------------------------------
// Anthropic wire format
// ---------------------------------------------------------------------------

/// The Anthropic Messages dialect.
struct Anthropic;

/// Anthropic's overload status (not in the `http` crate's list).
fn status_529() -> StatusCode {
    StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
}

/// Renders an Anthropic error answer:
/// `{"type":"error","error":{"type","message","details"?},"request_id"}`,
/// with the same id in the `request-id` header.
fn anthropic_error_body(
    status: StatusCode,
    kind: &str,
    message: &str,
    details: Option<Value>,
) -> Answer {
    let request_id = format!("req_{}", fresh_id());
    let mut error = json!({ "type": kind, "message": message });
    if let (Some(details), Some(obj)) = (details, error.as_object_mut()) {
        obj.insert("details".to_owned(), details);
    }
    let body = json!({ "type": "error", "error": error, "request_id": request_id });
    Answer::json(status, &body).with_header("request-id", request_id)
}

/// Reads Anthropic content (a string, or an array of blocks) into text parts;
/// `what` names the field in error messages.
fn anthropic_text_blocks(what: &str, content: &Value) -> Result<Vec<String>, String> {
    match content {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(blocks) => {
            let mut out = Vec::new();
            for (j, block) in blocks.iter().enumerate() {
                let Some(obj) = block.as_object() else {
                    return Err(format!("{what}.{j}: Input should be a valid dictionary"));
                };
                match obj.get("type").and_then(Value::as_str) {
                    None => return Err(format!("{what}.{j}.type: Field required")),
                    Some("text") => match obj.get("text") {
                        Some(Value::String(t)) => out.push(t.clone()),
                        _ => return Err(format!("{what}.{j}.text: Field required")),
                    },
                    Some(_) => {}
                }
            }
            Ok(out)
        }
        _ => Err(format!(
            "{what}: Input should be a valid string or a valid list"
        )),
    }
}

/// Anthropic's `usage` object for a reply (`output_tokens` given separately,
/// since `message_start` reports a placeholder).
fn anthropic_usage(reply: &Reply, output_tokens: u64) -> Value {
    json!({
        "input_tokens": reply.uncached_input_tokens(),
        "cache_creation_input_tokens": reply.cache_write_tokens,
        "cache_read_input_tokens": reply.cached_tokens,
        "output_tokens": output_tokens,
    })
}

/// An Anthropic `stop_reason`.
fn anthropic_stop_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Stop => "end_turn",
        FinishReason::Length => "max_tokens",
    }
}

impl WireFormat for Anthropic {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn credential(&self, headers: &HeaderMap, _uri: &Uri) -> Option<String> {
        let key = headers.get("x-api-key")?.to_str().ok()?.trim();
        (!key.is_empty()).then(|| key.to_owned())
    }

    fn check_headers(&self, headers: &HeaderMap) -> Result<(), String> {
        let version = headers
            .get("anthropic-version")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .unwrap_or("");
        if version.is_empty() {
            Err("anthropic-version: header is required".to_owned())
        } else {
            Ok(())
        }
    }

    fn parse(&self, body: &[u8]) -> Result<ChatRequest, String> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| format!("There was an error parsing the body of your request: {e}"))?;
        let Some(obj) = value.as_object() else {
            return Err("Input should be a valid dictionary".to_owned());
        };
        let model = match obj.get("model") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err("model: Input should be a valid string".to_owned()),
        };
        let max_tokens = match obj.get("max_tokens") {
            None | Some(Value::Null) => return Err("max_tokens: Field required".to_owned()),
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => n,
                _ => {
                    return Err(
                        "max_tokens: Input should be an integer greater than or equal to 1"
                            .to_owned(),
                    );
                }
            },
        };
        let stream = bool_field(obj, "stream")?;
        let mut parsed = Vec::new();
        match obj.get("system") {
            None | Some(Value::Null) => {}
            Some(system) => {
                let parts = anthropic_text_blocks("system", system)?;
                if parts.iter().any(|p| !p.is_empty()) {
                    parsed.push(ChatMessage {
                        role: "system".to_owned(),
                        parts,
                    });
                }
            }
        }
        let messages = match obj.get("messages") {
            None | Some(Value::Null) => return Err("messages: Field required".to_owned()),
            Some(Value::Array(list)) if list.is_empty() => {
                return Err("messages: at least one message is required".to_owned());
            }
            Some(Value::Array(list)) => list,
            Some(_) => return Err("messages: Input should be a valid list".to_owned()),
        };
        for (i, message) in messages.iter().enumerate() {
            let Some(m) = message.as_object() else {
                return Err(format!("messages.{i}: Input should be a valid dictionary"));
            };
            let role = match m.get("role").and_then(Value::as_str) {
                Some(role @ ("user" | "assistant")) => role,
                Some(_) => {
                    return Err(format!(
                        "messages.{i}.role: Input should be 'user' or 'assistant'"
                    ));
                }
                None => return Err(format!("messages.{i}.role: Field required")),
            };
            let Some(content) = m.get("content") else {
                return Err(format!("messages.{i}.content: Field required"));
            };
            parsed.push(ChatMessage {
                role: role.to_owned(),
                parts: anthropic_text_blocks(&format!("messages.{i}.content"), content)?,
            });
        }
        Ok(ChatRequest {
            model,
            messages: parsed,
            max_tokens: Some(max_tokens),
            stream,
            include_usage: false,
        })
    }

    fn success(&self, reply: &Reply) -> Answer {
        let body = json!({
            "id": format!("msg_{}", fresh_id()),
            "type": "message",
            "role": "assistant",
            "model": reply.model,
            "content": [{ "type": "text", "text": reply.content }],
            "stop_reason": anthropic_stop_reason(reply.finish),
            "stop_sequence": null,
            "usage": anthropic_usage(reply, reply.completion_tokens),
        });
        Answer::json(StatusCode::OK, &body).with_header("request-id", format!("req_{}", fresh_id()))
    }

    fn stream(&self, reply: &Reply, chunks: &[&str], _include_usage: bool) -> StreamPlan {
        let message = json!({
            "id": format!("msg_{}", fresh_id()),
            "type": "message",
            "role": "assistant",
            "model": reply.model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": anthropic_usage(reply, 1),
        });
        let head = vec![
            sse_event(
                "message_start",
                &json!({ "type": "message_start", "message": message }),
            ),
            sse_event(
                "content_block_start",
                &json!({
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": { "type": "text", "text": "" },
                }),
            ),
            sse_event("ping", &json!({ "type": "ping" })),
        ];
        let deltas = chunks
            .iter()
            .map(|text| {
                sse_event(
                    "content_block_delta",
                    &json!({
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": { "type": "text_delta", "text": text },
                    }),
                )
            })
            .collect();
        let tail = vec![
            sse_event(
                "content_block_stop",
                &json!({ "type": "content_block_stop", "index": 0 }),
            ),
            sse_event(
                "message_delta",
                &json!({
                    "type": "message_delta",
                    "delta": {
                        "stop_reason": anthropic_stop_reason(reply.finish),
                        "stop_sequence": null,
                    },
                    "usage": anthropic_usage(reply, reply.completion_tokens),
                }),
            ),
            sse_event("message_stop", &json!({ "type": "message_stop" })),
        ];
        StreamPlan { head, deltas, tail }
    }

    fn stream_error_event(&self) -> String {
        sse_event(
            "error",
            &json!({
                "type": "error",
                "error": { "type": "overloaded_error", "message": "Overloaded" },
            }),
        )
    }

    fn error(&self, err: &ApiError) -> Answer {
        match err {
            ApiError::MissingCredential => anthropic_error_body(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "x-api-key header is required",
                None,
            ),
            ApiError::InvalidCredential(_) => anthropic_error_body(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid x-api-key",
                None,
            ),
            ApiError::QuotaExhausted => anthropic_error_body(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "You have reached your specified API usage limits. You will regain access at \
                 the start of the next billing period.",
                Some(json!({ "error_code": "enforced_spend_limit_reached" })),
            ),
            ApiError::BadRequest(msg) => {
                anthropic_error_body(StatusCode::BAD_REQUEST, "invalid_request_error", msg, None)
            }
            ApiError::BodyRejected(status, msg) => {
                let kind = if *status == StatusCode::PAYLOAD_TOO_LARGE {
                    "request_too_large"
                } else {
                    "invalid_request_error"
                };
                anthropic_error_body(*status, kind, msg, None)
            }
            ApiError::ServerError => anthropic_error_body(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "Internal server error",
                None,
            ),
            ApiError::RateLimited(retry_after) => anthropic_error_body(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "This request would exceed the rate limit for your organization of 50 \
                 requests per minute. Please retry after the time in the retry-after header.",
                None,
            )
            .with_header("retry-after", retry_after.to_string()),
            ApiError::Overloaded => {
                anthropic_error_body(status_529(), "overloaded_error", "Overloaded", None)
            }
            ApiError::Unavailable => anthropic_error_body(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "Service unavailable: the server is shutting down.",
                None,
            ),
        }
    }
}

/// `POST /v1/messages`.
async fn anthropic_messages(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle_chat(&Anthropic, &state, &headers, &uri, body).await
}

// ---------------------------------------------------------------------------
// Gemini wire format
// ---------------------------------------------------------------------------

/// Which Gemini method was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GeminiMode {
    /// `:generateContent`.
    Generate,
    /// `:streamGenerateContent?alt=sse`.
    StreamSse,
    /// `:streamGenerateContent` without `alt=sse`: one JSON array of chunks.
    StreamArray,
}

/// The Gemini `generateContent` dialect; the model comes from the path.
struct Gemini {
    /// The model named in the path.
    model: String,
    /// The method called.
    mode: GeminiMode,
}

/// The google.rpc status name for an HTTP status.
fn gemini_status_name(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 413 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        400..=499 => "FAILED_PRECONDITION",
        _ => "INTERNAL",
    }
}

/// The Google RPC error body: `{"error":{"code","message","status","details"?}}`.
fn gemini_error_json(status: StatusCode, message: &str, details: Option<Value>) -> Value {
    let mut error = json!({
        "code": status.as_u16(),
        "message": message,
        "status": gemini_status_name(status),
    });
    if let (Some(details), Some(obj)) = (details, error.as_object_mut()) {
        obj.insert("details".to_owned(), details);
    }
    json!({ "error": error })
}

/// Renders a Gemini error answer.
fn gemini_error_body(status: StatusCode, message: &str, details: Option<Value>) -> Answer {
    Answer::json(status, &gemini_error_json(status, message, details))
}

/// The `details` of a Gemini 429: a quota violation, a help link and the
/// retry delay.
fn gemini_quota_details(
    model: &str,
    metric: &str,
    quota_id: &str,
    quota_value: u64,
    retry_after: u64,
) -> Value {
    json!([
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{
                "quotaMetric": format!("generativelanguage.googleapis.com/{metric}"),
                "quotaId": quota_id,
                "quotaDimensions": { "location": "global", "model": model },
                "quotaValue": quota_value.to_string(),
            }],
        },
        {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [{
                "description": "Learn more about Gemini API quotas",
                "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
            }],
        },
        {
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": format!("{retry_after}s"),
        },
    ])
}

/// Reads a Gemini `Content`'s `parts` into text parts; `what` names it in
/// error messages.
fn gemini_text_parts(
    what: &str,
    content: &serde_json::Map<String, Value>,
) -> Result<Vec<String>, String> {
    let parts = match content.get("parts") {
        Some(Value::Array(parts)) if !parts.is_empty() => parts,
        Some(Value::Array(_)) | None | Some(Value::Null) => {
            return Err(format!(
                "* GenerateContentRequest.{what}.parts: contents.parts must not be empty."
            ));
        }
        Some(_) => {
            return Err(format!(
                "Invalid value at '{what}.parts': Proto field is not repeating, cannot start list."
            ));
        }
    };
    let mut out = Vec::new();
    for (j, part) in parts.iter().enumerate() {
        let Some(obj) = part.as_object() else {
            return Err(format!(
                "Invalid value at '{what}.parts[{j}]': expected a Part object."
            ));
        };
        match obj.get("text") {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) => out.push(t.clone()),
            Some(_) => {
                return Err(format!(
                    "Invalid value at '{what}.parts[{j}].text': expected a string."
                ));
            }
        }
    }
    Ok(out)
}

/// A field by its camelCase or snake_case name (proto JSON accepts both).
fn either<'a>(
    obj: &'a serde_json::Map<String, Value>,
    camel: &str,
    snake: &str,
) -> Option<&'a Value> {
    obj.get(camel)
        .or_else(|| obj.get(snake))
        .filter(|v| !v.is_null())
}

impl Gemini {
    /// A Gemini `finishReason`.
    fn finish_reason(finish: FinishReason) -> &'static str {
        match finish {
            FinishReason::Stop => "STOP",
            FinishReason::Length => "MAX_TOKENS",
        }
    }

    /// The full `usageMetadata` of a reply.
    fn usage(reply: &Reply) -> Value {
        let mut usage = json!({
            "promptTokenCount": reply.prompt_tokens,
            "candidatesTokenCount": reply.completion_tokens,
            "totalTokenCount": reply.total_tokens(),
        });
        if reply.cached_tokens > 0
            && let Some(obj) = usage.as_object_mut()
        {
            obj.insert(
                "cachedContentTokenCount".to_owned(),
                Value::from(reply.cached_tokens),
            );
        }
        usage
    }

    /// One `GenerateContentResponse`; `last` adds the finish reason and the
    /// full usage (earlier chunks carry the prompt count only).
    fn response(reply: &Reply, response_id: &str, text: &str, last: bool) -> Value {
        let mut candidate = json!({
            "content": { "parts": [{ "text": text }], "role": "model" },
            "index": 0,
        });
        if last && let Some(obj) = candidate.as_object_mut() {
            obj.insert(
                "finishReason".to_owned(),
                Value::from(Self::finish_reason(reply.finish)),
            );
        }
        let usage = if last {
            Self::usage(reply)
        } else {
            json!({
                "promptTokenCount": reply.prompt_tokens,
                "totalTokenCount": reply.prompt_tokens,
            })
        };
        json!({
            "candidates": [candidate],
            "usageMetadata": usage,
            "modelVersion": reply.model,
            "responseId": response_id,
        })
    }

    /// The chunks of a streamed reply (at least one: the last carries the
    /// finish reason).
    fn stream_values(reply: &Reply, chunks: &[&str]) -> Vec<Value> {
        let response_id = fresh_id();
        let texts: Vec<&str> = if chunks.is_empty() {
            vec![""]
        } else {
            chunks.to_vec()
        };
        let last = texts.len().saturating_sub(1);
        texts
            .iter()
            .enumerate()
            .map(|(i, text)| Self::response(reply, &response_id, text, i == last))
            .collect()
    }
}

impl WireFormat for Gemini {
    fn name(&self) -> &'static str {
        "gemini"
    }

    fn credential(&self, headers: &HeaderMap, uri: &Uri) -> Option<String> {
        let from_header = headers
            .get("x-goog-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_owned);
        from_header.or_else(|| {
            query_param(uri, "key")
                .map(|k| k.trim().to_owned())
                .filter(|k| !k.is_empty())
        })
    }

    fn parse(&self, body: &[u8]) -> Result<ChatRequest, String> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| format!("Invalid JSON payload received. {e}"))?;
        let Some(obj) = value.as_object() else {
            return Err(
                "Invalid JSON payload received. Expected an object (GenerateContentRequest)."
                    .to_owned(),
            );
        };
        let mut parsed = Vec::new();
        match either(obj, "systemInstruction", "system_instruction") {
            None => {}
            Some(Value::Object(system)) => {
                let parts = gemini_text_parts("system_instruction", system)?;
                if parts.iter().any(|p| !p.is_empty()) {
                    parsed.push(ChatMessage {
                        role: "system".to_owned(),
                        parts,
                    });
                }
            }
            Some(_) => {
                return Err(
                    "Invalid value at 'system_instruction': expected a Content object.".to_owned(),
                );
            }
        }
        let contents = match obj.get("contents") {
            Some(Value::Array(list)) if !list.is_empty() => list,
            None | Some(Value::Null) | Some(Value::Array(_)) => {
                return Err(
                    "* GenerateContentRequest.contents: contents is not specified".to_owned(),
                );
            }
            Some(_) => {
                return Err(
                    "Invalid value at 'contents': Proto field is not repeating, cannot start list."
                        .to_owned(),
                );
            }
        };
        for (i, content) in contents.iter().enumerate() {
            let Some(c) = content.as_object() else {
                return Err(format!(
                    "Invalid value at 'contents[{i}]': expected a Content object."
                ));
            };
            let role = match c.get("role") {
                None | Some(Value::Null) => "user",
                Some(Value::String(r)) if r.is_empty() || r == "user" => "user",
                Some(Value::String(r)) if r == "model" => "assistant",
                Some(_) => return Err("Please use a valid role: user, model.".to_owned()),
            };
            parsed.push(ChatMessage {
                role: role.to_owned(),
                parts: gemini_text_parts(&format!("contents[{i}]"), c)?,
            });
        }
        let max_tokens = match either(obj, "generationConfig", "generation_config") {
            None => None,
            Some(Value::Object(config)) => {
                let field = if config.contains_key("maxOutputTokens") {
                    "maxOutputTokens"
                } else {
                    "max_output_tokens"
                };
                limit_field(config, field)?
            }
            Some(_) => {
                return Err(
                    "Invalid value at 'generation_config': expected a GenerationConfig object."
                        .to_owned(),
                );
            }
        };
        Ok(ChatRequest {
            model: Some(self.model.clone()),
            messages: parsed,
            max_tokens,
            stream: self.mode == GeminiMode::StreamSse,
            include_usage: false,
        })
    }

    fn success(&self, reply: &Reply) -> Answer {
        if self.mode == GeminiMode::StreamArray {
            let chunks = split_chunks(&reply.content);
            let values = Self::stream_values(reply, &chunks);
            return Answer::json(StatusCode::OK, &Value::Array(values));
        }
        Answer::json(
            StatusCode::OK,
            &Self::response(reply, &fresh_id(), &reply.content, true),
        )
    }

    fn stream(&self, reply: &Reply, chunks: &[&str], _include_usage: bool) -> StreamPlan {
        StreamPlan {
            head: Vec::new(),
            deltas: Self::stream_values(reply, chunks)
                .iter()
                .map(|v| format!("data: {v}\r\n\r\n"))
                .collect(),
            tail: Vec::new(),
        }
    }

    fn stream_error_event(&self) -> String {
        let body = json!({
            "error": {
                "code": 503,
                "message": "The model is overloaded.",
                "status": "UNAVAILABLE",
            },
        });
        format!("{body}\r\n")
    }

    fn error(&self, err: &ApiError) -> Answer {
        match err {
            ApiError::MissingCredential => gemini_error_body(
                StatusCode::FORBIDDEN,
                "Method doesn't allow unregistered callers (callers without established \
                 identity). Please use API Key or other form of API consumer identity to call \
                 this API.",
                None,
            ),
            ApiError::InvalidCredential(_) => gemini_error_body(
                StatusCode::BAD_REQUEST,
                "API key not valid. Please pass a valid API key.",
                Some(json!([{
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": { "service": "generativelanguage.googleapis.com" },
                }])),
            ),
            ApiError::QuotaExhausted => gemini_error_body(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "You exceeded your current quota, please check your plan and billing \
                     details. For more information on this error, head to: \
                     https://ai.google.dev/gemini-api/docs/rate-limits.\n* Quota exceeded for \
                     metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, \
                     limit: 0, model: {}",
                    self.model
                ),
                Some(gemini_quota_details(
                    &self.model,
                    "generate_content_free_tier_requests",
                    "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                    0,
                    86_400,
                )),
            ),
            ApiError::BadRequest(msg) => gemini_error_body(StatusCode::BAD_REQUEST, msg, None),
            ApiError::BodyRejected(status, msg) => gemini_error_body(*status, msg, None),
            ApiError::ServerError => gemini_error_body(
                StatusCode::INTERNAL_SERVER_ERROR,
                "An internal error has occurred. Please retry or report in \
                 https://developers.generativeai.google/guide/troubleshooting",
                None,
            ),
            ApiError::RateLimited(retry_after) => gemini_error_body(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "You exceeded your current quota, please check your plan and billing \
                     details.\n* Quota exceeded for metric: \
                     generativelanguage.googleapis.com/generate_content_requests, limit: 15, \
                     model: {}\nPlease retry in {retry_after}s.",
                    self.model
                ),
                Some(gemini_quota_details(
                    &self.model,
                    "generate_content_requests",
                    "GenerateRequestsPerMinutePerProjectPerModel",
                    15,
                    *retry_after,
                )),
            ),
            ApiError::Overloaded => gemini_error_body(
                StatusCode::SERVICE_UNAVAILABLE,
                "The model is overloaded. Please try again later.",
                None,
            ),
            ApiError::Unavailable => gemini_error_body(
                StatusCode::SERVICE_UNAVAILABLE,
                "The service is currently unavailable.",
                None,
            ),
        }
    }
}

/// `POST /v1beta/models/{model}:generateContent` and
/// `POST /v1beta/models/{model}:streamGenerateContent` (also under `/v1/`).
async fn gemini_models(
    State(state): State<AppState>,
    action: Result<Path<String>, PathRejection>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let not_found = |what: &str| {
        gemini_error_body(
            StatusCode::NOT_FOUND,
            &format!("{what} is not found for API version v1beta, or is not supported."),
            None,
        )
        .into_response()
    };
    let Ok(Path(action)) = action else {
        return not_found("The requested method");
    };
    let Some((model, method)) = action.rsplit_once(':') else {
        return not_found(&format!("models/{action}"));
    };
    let model = model.strip_prefix("models/").unwrap_or(model);
    if model.is_empty() {
        return not_found("The empty model");
    }
    let mode = match method {
        "generateContent" => GeminiMode::Generate,
        "streamGenerateContent" if query_param(&uri, "alt").as_deref() == Some("sse") => {
            GeminiMode::StreamSse
        }
        "streamGenerateContent" => GeminiMode::StreamArray,
        _ => return not_found(&format!("Method {method}")),
    };
    let wire = Gemini {
        model: model.to_owned(),
        mode,
    };
    handle_chat(&wire, &state, &headers, &uri, body).await
}

// ---------------------------------------------------------------------------
// Observability endpoints and router
// ---------------------------------------------------------------------------

/// `GET /stats`.
async fn get_stats(State(state): State<AppState>) -> axum::Json<StatsSnapshot> {
    axum::Json(state.stats.snapshot())
}

/// `POST /stats/reset`.
async fn reset_stats(State(state): State<AppState>) -> StatusCode {
    state.stats.reset();
    StatusCode::NO_CONTENT
}

/// `GET /healthz`.
async fn healthz() -> &'static str {
    "ok"
}

/// `GET /stats/window?ms=N`.
async fn get_stats_window(State(state): State<AppState>, uri: Uri) -> Response {
    match query_param(&uri, "ms").and_then(|ms| ms.trim().parse::<u64>().ok()) {
        Some(ms) if ms >= 1 => Answer::json_of(StatusCode::OK, &state.stats.window(ms)),
        _ => Answer::json(
            StatusCode::BAD_REQUEST,
            &json!({ "error": "query parameter 'ms' must be an integer >= 1" }),
        ),
    }
    .into_response()
}

/// Unknown routes: an OpenAI-style 404.
async fn not_found(method: Method, uri: Uri) -> Response {
    openai_error_body(
        &format!("Invalid URL ({method} {})", uri.path()),
        "invalid_request_error",
        None,
        StatusCode::NOT_FOUND,
    )
    .into_response()
}

/// Known route, wrong method: an OpenAI-style 405.
async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    openai_error_body(
        &format!("Method {method} not allowed for {}", uri.path()),
        "invalid_request_error",
        None,
        StatusCode::METHOD_NOT_ALLOWED,
    )
    .into_response()
}

/// Largest accepted request body.
const BODY_LIMIT: usize = 64 * 1024 * 1024;

/// All routes.
fn router(state: AppState) -> Router {
    Router::new()
        // OpenAI
        .route("/v1/chat/completions", post(openai_chat))
        .route("/chat/completions", post(openai_chat))
        // Anthropic
        .route("/v1/messages", post(anthropic_messages))
        // Gemini (`{model}:{method}` is one path segment)
        .route("/v1beta/models/{action}", post(gemini_models))
        .route("/v1/models/{action}", post(gemini_models))
        // Observability
        .route("/stats", get(get_stats))
        .route("/stats/window", get(get_stats_window))
        .route("/stats/reset", post(reset_stats))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

// ---------------------------------------------------------------------------
// Startup and shutdown
// ---------------------------------------------------------------------------

/// How long in-flight requests may take to finish after a stop signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolves on ctrl-c or SIGTERM.
async fn stop_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for ctrl-c: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Binds, announces the address and serves until a stop signal.
async fn run(cli: Cli) -> Result<(), String> {
    let ip = resolve_host(&cli.host)?;
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, cli.port))
        .await
        .map_err(|e| format!("cannot bind {ip}:{}: {e}", cli.port))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let config = Config {
        latency_ms: cli.latency_ms,
        jitter_ms: cli.jitter_ms,
        chunk_delay_ms: cli.chunk_delay_ms,
        rates: FaultRates {
            hang: cli.rate_hang,
            server_error: cli.rate_500,
            rate_limited: cli.rate_429,
            overloaded: cli.rate_503,
            cut: cli.rate_cut,
            stream_error: cli.rate_stream_error,
            malformed: cli.rate_malformed,
        },
        retry_after: cli.retry_after,
        rest_grace_ms: cli.rest_grace_ms,
        model: cli.model.clone(),
        echo_auth_in_errors: cli.echo_auth_in_errors,
    };
    let app = router(AppState::new(config, cli.seed, stop_rx.clone()));

    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("cannot write to stdout: {e}"))?;
    }
    tracing::info!(%addr, ?cli, "fake-provider started");

    let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
        stop_signal().await;
        tracing::info!("stop signal received, draining");
        stop_tx.send_replace(true);
    });
    let mut stop_rx = stop_rx;
    let deadline = async move {
        // The sender lives inside the server future; an error means it is gone.
        let _ = stop_rx.wait_for(|stopping| *stopping).await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    tokio::select! {
        result = std::future::IntoFuture::into_future(serve) => {
            result.map_err(|e| format!("server error: {e}"))?;
        }
        () = deadline => {
            tracing::warn!("requests still open after {DRAIN_TIMEOUT:?}; exiting anyway");
        }
    }
    tracing::info!("fake-provider stopped");
    Ok(())
}

/// jemalloc: the same allocator as the worker, so the provider stand-in costs the shared CPU as
/// little as it can.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("fake-provider: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, text: &str) -> ChatMessage {
        ChatMessage {
            role: role.to_owned(),
            parts: vec![text.to_owned()],
        }
    }

    const NO_FAULTS: FaultRates = FaultRates {
        hang: 0.0,
        server_error: 0.0,
        rate_limited: 0.0,
        overloaded: 0.0,
        cut: 0.0,
        stream_error: 0.0,
        malformed: 0.0,
    };

    #[test]
    fn prompt_tokens_follow_the_formula() {
        // 5 + 3 = 8 chars -> 2 tokens, + 2 * 4 per message + 3.
        let messages = vec![msg("system", "Hello"), msg("user", "abc")];
        assert_eq!(estimate_prompt_tokens(&messages), 2 + 8 + 3);
        // 9 chars -> ceil(9 / 4) = 3, + 4 + 3.
        assert_eq!(
            estimate_prompt_tokens(&[msg("user", "123456789")]),
            3 + 4 + 3
        );
        // Characters, not bytes: 4 multibyte chars are 1 token.
        assert_eq!(estimate_prompt_tokens(&[msg("user", "éééé")]), 1 + 4 + 3);
        assert_eq!(estimate_prompt_tokens(&[msg("user", "")]), 4 + 3);
    }

    #[test]
    fn completion_tokens_are_at_least_one() {
        assert_eq!(estimate_completion_tokens(""), 1);
        assert_eq!(estimate_completion_tokens("abcd"), 1);
        assert_eq!(estimate_completion_tokens("abcde"), 2);
    }

    #[test]
    fn first_sentence_stops_at_punctuation_or_newline() {
        assert_eq!(first_sentence("Hello world. More text."), "Hello world.");
        assert_eq!(first_sentence("  Why? Because."), "Why?");
        assert_eq!(
            first_sentence("Pi is 3.14 roughly. Yes"),
            "Pi is 3.14 roughly."
        );
        assert_eq!(first_sentence("Title\nBody. More."), "Title");
        assert_eq!(first_sentence("no end at all  "), "no end at all");
        assert_eq!(first_sentence(""), "");
        assert_eq!(first_sentence("Wow!"), "Wow!");
    }

    #[test]
    fn first_sentence_is_capped_on_a_char_boundary() {
        let long = "é".repeat(500);
        let s = first_sentence(&long);
        assert_eq!(s.chars().count(), MAX_SENTENCE_CHARS);
        let ascii = "a".repeat(MAX_SENTENCE_CHARS);
        assert_eq!(first_sentence(&ascii), ascii);
    }

    #[test]
    fn fault_selection_with_rates_zero_and_one() {
        for u in [0.0, 0.5, 0.999_999] {
            assert_eq!(choose_fault(u, NO_FAULTS), Fault::None);
            let all_429 = FaultRates {
                rate_limited: 1.0,
                ..NO_FAULTS
            };
            assert_eq!(choose_fault(u, all_429), Fault::RateLimited);
            let all_500 = FaultRates {
                server_error: 1.0,
                ..NO_FAULTS
            };
            assert_eq!(choose_fault(u, all_500), Fault::ServerError);
            let all_hang = FaultRates {
                hang: 1.0,
                ..NO_FAULTS
            };
            assert_eq!(choose_fault(u, all_hang), Fault::Hang);
            // Order: hang before 500 before 429.
            let everything = FaultRates {
                hang: 1.0,
                server_error: 1.0,
                rate_limited: 1.0,
                overloaded: 1.0,
                cut: 1.0,
                stream_error: 1.0,
                malformed: 1.0,
            };
            assert_eq!(choose_fault(u, everything), Fault::Hang);
            let no_hang = FaultRates {
                hang: 0.0,
                ..everything
            };
            assert_eq!(choose_fault(u, no_hang), Fault::ServerError);
        }
    }

    #[test]
    fn fault_rates_are_exact_fractions() {
        let rates = FaultRates {
            hang: 0.1,
            server_error: 0.2,
            rate_limited: 0.3,
            ..NO_FAULTS
        };
        assert_eq!(choose_fault(0.05, rates), Fault::Hang);
        assert_eq!(choose_fault(0.15, rates), Fault::ServerError);
        assert_eq!(choose_fault(0.45, rates), Fault::RateLimited);
        assert_eq!(choose_fault(0.65, rates), Fault::None);
    }

    #[test]
    fn jitter_never_goes_negative() {
        assert_eq!(jittered_delay_ms(100, -30), 70);
        assert_eq!(jittered_delay_ms(100, 30), 130);
        assert_eq!(jittered_delay_ms(10, -30), 0);
    }

    #[test]
    fn fractions_and_hosts_are_validated() {
        assert_eq!(parse_fraction("0.25"), Ok(0.25));
        assert!(parse_fraction("1.5").is_err());
        assert!(parse_fraction("-0.1").is_err());
        assert!(parse_fraction("x").is_err());
        assert!(resolve_host("127.0.0.1").is_ok());
        assert!(resolve_host("::1").is_ok());
        assert!(resolve_host("localhost").is_ok());
        assert!(resolve_host("0.0.0.0").is_err());
        assert!(resolve_host("10.0.0.1").is_err());
    }

    #[test]
    fn openai_parse_accepts_string_and_part_contents() {
        let body = br#"{"model":"m","max_completion_tokens":5,"messages":[
            {"role":"system","content":"Be brief."},
            {"role":"user","content":[{"type":"text","text":"First part."},
                                      {"type":"image_url","image_url":{"url":"x"}},
                                      {"type":"text","text":"Second."}]},
            {"role":"assistant","content":null}]}"#;
        let req = OpenAi.parse(body).unwrap();
        assert_eq!(req.model.as_deref(), Some("m"));
        assert_eq!(req.max_tokens, Some(5));
        assert_eq!(req.messages.len(), 3);
        assert_eq!(req.messages[1].parts, vec!["First part.", "Second."]);
    }

    #[test]
    fn openai_parse_rejects_bad_bodies() {
        for body in [
            &b"not json"[..],
            br#"[]"#,
            br#"{}"#,
            br#"{"messages":[]}"#,
            br#"{"messages":"hi"}"#,
            br#"{"messages":[1]}"#,
            br#"{"messages":[{"content":"no role"}]}"#,
            br#"{"messages":[{"role":"user","content":5}]}"#,
            br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
            br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"5"}"#,
        ] {
            assert!(
                OpenAi.parse(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn reply_summarises_the_last_user_message() {
        let req = ChatRequest {
            model: None,
            messages: vec![
                msg("user", "Old question."),
                msg("assistant", "Old answer."),
                msg("user", "The cat sat. Then it left."),
            ],
            max_tokens: None,
            stream: false,
            include_usage: false,
        };
        let hints = CacheHints {
            read: Some(1_000),
            write: Some(5),
        };
        let reply = build_reply(&req, "default", hints);
        assert_eq!(reply.content, "Summary: The cat sat.");
        assert_eq!(reply.model, "default");
        assert_eq!(reply.finish, FinishReason::Stop);
        assert_eq!(reply.completion_tokens, 6); // 21 chars
        assert_eq!(reply.cached_tokens, reply.prompt_tokens);
        // Nothing is left of the prompt to write to cache.
        assert_eq!(reply.cache_write_tokens, 0);
        assert_eq!(reply.uncached_input_tokens(), 0);
    }

    #[test]
    fn reply_is_cut_at_max_tokens() {
        let req = ChatRequest {
            model: Some("m".to_owned()),
            messages: vec![msg("user", "A fairly long sentence that needs cutting.")],
            max_tokens: Some(2),
            stream: false,
            include_usage: false,
        };
        let reply = build_reply(&req, "default", CacheHints::default());
        assert_eq!(reply.content, "Summary:");
        assert_eq!(reply.finish, FinishReason::Length);
        assert_eq!(reply.completion_tokens, 2);
        assert_eq!(reply.cached_tokens, 0);
    }

    #[test]
    fn openai_bearer_credentials() {
        let mut h = HeaderMap::new();
        let uri = Uri::from_static("/v1/chat/completions");
        assert_eq!(OpenAi.credential(&h, &uri), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-1"),
        );
        assert_eq!(OpenAi.credential(&h, &uri).as_deref(), Some("sk-1"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(OpenAi.credential(&h, &uri), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(OpenAi.credential(&h, &uri), None);
    }

    // -- new formats, streaming, faults and stats ---------------------------

    fn body_json(answer: &Answer) -> Value {
        serde_json::from_str(&answer.body).unwrap()
    }

    fn sample_reply() -> Reply {
        let req = ChatRequest {
            model: Some("m-1".to_owned()),
            messages: vec![
                msg("system", "Be brief."),
                msg("user", "Tides follow the moon across every ocean. More."),
            ],
            max_tokens: None,
            stream: true,
            include_usage: true,
        };
        let hints = CacheHints {
            read: Some(4),
            write: Some(3),
        };
        build_reply(&req, "default", hints)
    }

    /// Splits SSE text into `(event name, data)` pairs (CRLF or LF framing).
    fn sse_events(text: &str) -> Vec<(Option<String>, String)> {
        text.replace("\r\n", "\n")
            .split("\n\n")
            .filter(|block| !block.trim().is_empty())
            .map(|block| {
                let mut event = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(name) = line.strip_prefix("event: ") {
                        event = Some(name.to_owned());
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data.push_str(d);
                    }
                }
                (event, data)
            })
            .collect()
    }

    /// The SSE text a plan sends when it completes.
    fn complete_text(plan: StreamPlan) -> String {
        build_steps(plan, StreamEnding::Complete, String::new())
            .into_iter()
            .filter_map(|step| match step {
                Step::Send(text) => Some(text),
                _ => None,
            })
            .collect()
    }

    fn gemini(mode: GeminiMode) -> Gemini {
        Gemini {
            model: "gemini-x".to_owned(),
            mode,
        }
    }

    #[test]
    fn chunks_concatenate_to_the_text() {
        for text in [
            "Summary: Tides follow the moon across every ocean of the world.",
            "Summary: Hi.",
            "Summary:",
            "ab",
            "x",
            "  leading and trailing  ",
            "é ü ö ä ß",
            &"word ".repeat(100),
        ] {
            let chunks = split_chunks(text);
            assert_eq!(chunks.concat(), text, "{text:?}");
            assert!(chunks.len() <= MAX_STREAM_CHUNKS, "{text:?}");
            assert!(chunks.iter().all(|c| !c.is_empty()), "{text:?}");
            if text.chars().count() >= MIN_STREAM_CHUNKS {
                assert!(chunks.len() >= MIN_STREAM_CHUNKS, "{text:?}: {chunks:?}");
            }
        }
        assert!(split_chunks("").is_empty());
        assert_eq!(split_chunks("ab"), vec!["a", "b"]);
        assert_eq!(
            split_chunks("Summary: The cat sat."),
            vec!["Summary:", " The", " cat", " sat."]
        );
        assert_eq!(split_chunks("Summary:"), vec!["Su", "mma", "ry:"]);
        // 100 words are grouped 7 a chunk into 15 chunks.
        assert_eq!(split_chunks(&"word ".repeat(100)).len(), 15);
    }

    #[test]
    fn first_half_respects_char_boundaries() {
        assert_eq!(first_half("abcd"), "ab");
        assert_eq!(first_half("aé"), "a");
        assert_eq!(first_half(""), "");
        assert_eq!(first_half("{\"a\":1}"), "{\"a");
    }

    #[test]
    fn new_faults_follow_the_single_draw_order() {
        let rates = FaultRates {
            hang: 0.1,
            server_error: 0.1,
            rate_limited: 0.1,
            overloaded: 0.1,
            cut: 0.1,
            stream_error: 0.1,
            malformed: 0.1,
        };
        let expected = [
            Fault::Hang,
            Fault::ServerError,
            Fault::RateLimited,
            Fault::Overloaded,
            Fault::Cut,
            Fault::StreamError,
            Fault::Malformed,
            Fault::None,
            Fault::None,
            Fault::None,
        ];
        for (k, fault) in expected.iter().enumerate() {
            let u = f64::from(u32::try_from(k).unwrap()) / 10.0 + 0.05;
            assert_eq!(choose_fault(u, rates), *fault, "u = {u}");
        }
        for (field, fault) in [
            (
                FaultRates {
                    overloaded: 1.0,
                    ..NO_FAULTS
                },
                Fault::Overloaded,
            ),
            (
                FaultRates {
                    cut: 1.0,
                    ..NO_FAULTS
                },
                Fault::Cut,
            ),
            (
                FaultRates {
                    stream_error: 1.0,
                    ..NO_FAULTS
                },
                Fault::StreamError,
            ),
            (
                FaultRates {
                    malformed: 1.0,
                    ..NO_FAULTS
                },
                Fault::Malformed,
            ),
        ] {
            assert_eq!(choose_fault(0.0, field), fault);
            assert_eq!(choose_fault(0.999_999, field), fault);
        }
    }

    #[test]
    fn openai_parse_reads_stream_flags() {
        let body = br#"{"messages":[{"role":"user","content":"x"}],"stream":true,
                        "stream_options":{"include_usage":true}}"#;
        let req = OpenAi.parse(body).unwrap();
        assert!(req.stream && req.include_usage);
        let req = OpenAi
            .parse(br#"{"messages":[{"role":"user","content":"x"}],"stream":false}"#)
            .unwrap();
        assert!(!req.stream && !req.include_usage);
        for bad in [
            &br#"{"messages":[{"role":"user","content":"x"}],"stream":"yes"}"#[..],
            br#"{"messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#,
            br#"{"messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":1}"#,
        ] {
            assert!(OpenAi.parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn anthropic_parse_extracts_system_and_blocks() {
        let body = br#"{"model":"claude-x","max_tokens":64,"stream":true,
            "system":[{"type":"text","text":"Be brief."},{"type":"text","text":"Really."}],
            "messages":[
              {"role":"user","content":"Old question."},
              {"role":"assistant","content":[{"type":"text","text":"Old answer."}]},
              {"role":"user","content":[
                 {"type":"image","source":{"type":"base64","media_type":"image/png","data":"AA=="}},
                 {"type":"text","text":"The cat sat. Then it left."}]}]}"#;
        let req = Anthropic.parse(body).unwrap();
        assert_eq!(req.model.as_deref(), Some("claude-x"));
        assert_eq!(req.max_tokens, Some(64));
        assert!(req.stream);
        assert_eq!(req.messages.len(), 4);
        assert_eq!(req.messages[0].role, "system");
        assert_eq!(req.messages[0].parts, vec!["Be brief.", "Really."]);
        assert_eq!(req.messages[3].parts, vec!["The cat sat. Then it left."]);
        let reply = build_reply(&req, "default", CacheHints::default());
        assert_eq!(reply.content, "Summary: The cat sat.");

        let plain = Anthropic
            .parse(br#"{"max_tokens":5,"system":"S","messages":[{"role":"user","content":"Hi."}]}"#)
            .unwrap();
        assert_eq!(plain.messages, vec![msg("system", "S"), msg("user", "Hi.")]);
        assert!(!plain.stream);
        // The same conversation costs the same prompt tokens as in OpenAI form.
        let openai = OpenAi
            .parse(br#"{"messages":[{"role":"system","content":"S"},{"role":"user","content":"Hi."}]}"#)
            .unwrap();
        assert_eq!(
            estimate_prompt_tokens(&plain.messages),
            estimate_prompt_tokens(&openai.messages)
        );
    }

    #[test]
    fn anthropic_parse_rejects_bad_bodies() {
        for body in [
            &b"nope"[..],
            br#"[]"#,
            br#"{"messages":[{"role":"user","content":"x"}]}"#,
            br#"{"max_tokens":0,"messages":[{"role":"user","content":"x"}]}"#,
            br#"{"max_tokens":5,"messages":[]}"#,
            br#"{"max_tokens":5}"#,
            br#"{"max_tokens":5,"messages":[{"role":"system","content":"x"}]}"#,
            br#"{"max_tokens":5,"messages":[{"role":"user"}]}"#,
            br#"{"max_tokens":5,"messages":[{"role":"user","content":5}]}"#,
            br#"{"max_tokens":5,"messages":[{"role":"user","content":[{"text":"x"}]}]}"#,
            br#"{"max_tokens":5,"messages":[{"role":"user","content":[{"type":"text"}]}]}"#,
            br#"{"max_tokens":5,"system":7,"messages":[{"role":"user","content":"x"}]}"#,
            br#"{"max_tokens":5,"stream":1,"messages":[{"role":"user","content":"x"}]}"#,
        ] {
            assert!(
                Anthropic.parse(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn anthropic_needs_a_key_and_a_version() {
        let uri = Uri::from_static("/v1/messages");
        let mut h = HeaderMap::new();
        assert_eq!(Anthropic.credential(&h, &uri), None);
        assert!(Anthropic.check_headers(&h).is_err());
        h.insert("x-api-key", HeaderValue::from_static(" sk-ant "));
        h.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        assert_eq!(Anthropic.credential(&h, &uri).as_deref(), Some("sk-ant"));
        assert!(Anthropic.check_headers(&h).is_ok());
    }

    #[test]
    fn gemini_parse_extracts_contents_and_config() {
        let body = br#"{"systemInstruction":{"parts":[{"text":"Be brief."}]},
            "contents":[
              {"role":"user","parts":[{"text":"Old question."}]},
              {"role":"model","parts":[{"text":"Old answer."}]},
              {"parts":[{"inlineData":{"mimeType":"image/png","data":"AA=="}},
                        {"text":"The cat sat. Then it left."}]}],
            "generationConfig":{"maxOutputTokens":40,"temperature":0.2}}"#;
        let req = gemini(GeminiMode::StreamSse).parse(body).unwrap();
        assert_eq!(req.model.as_deref(), Some("gemini-x"));
        assert_eq!(req.max_tokens, Some(40));
        assert!(req.stream);
        let roles: Vec<&str> = req.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, vec!["system", "user", "assistant", "user"]);
        let reply = build_reply(&req, "default", CacheHints::default());
        assert_eq!(reply.content, "Summary: The cat sat.");

        let snake = br#"{"system_instruction":{"parts":[{"text":"S"}]},
            "contents":[{"role":"user","parts":[{"text":"Hi."}]}],
            "generation_config":{"max_output_tokens":3}}"#;
        let req = gemini(GeminiMode::Generate).parse(snake).unwrap();
        assert_eq!(req.messages, vec![msg("system", "S"), msg("user", "Hi.")]);
        assert_eq!(req.max_tokens, Some(3));
        assert!(!req.stream);
        assert!(!gemini(GeminiMode::StreamArray).parse(snake).unwrap().stream);
    }

    #[test]
    fn gemini_parse_rejects_bad_bodies() {
        for body in [
            &b"{"[..],
            br#"[]"#,
            br#"{}"#,
            br#"{"contents":[]}"#,
            br#"{"contents":{}}"#,
            br#"{"contents":[1]}"#,
            br#"{"contents":[{"role":"assistant","parts":[{"text":"x"}]}]}"#,
            br#"{"contents":[{"role":"user"}]}"#,
            br#"{"contents":[{"role":"user","parts":[]}]}"#,
            br#"{"contents":[{"role":"user","parts":[{"text":5}]}]}"#,
            br#"{"contents":[{"parts":[{"text":"x"}]}],"systemInstruction":"S"}"#,
            br#"{"contents":[{"parts":[{"text":"x"}]}],"generationConfig":{"maxOutputTokens":0}}"#,
        ] {
            assert!(
                gemini(GeminiMode::Generate).parse(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn gemini_credentials_from_header_or_query() {
        let g = gemini(GeminiMode::Generate);
        let plain = Uri::from_static("/v1beta/models/g:generateContent");
        let query = Uri::from_static("/v1beta/models/g:streamGenerateContent?alt=sse&key=k%2D1");
        let mut h = HeaderMap::new();
        assert_eq!(g.credential(&h, &plain), None);
        assert_eq!(g.credential(&h, &query).as_deref(), Some("k-1"));
        h.insert("x-goog-api-key", HeaderValue::from_static("hdr"));
        assert_eq!(g.credential(&h, &query).as_deref(), Some("hdr"));
        assert_eq!(query_param(&query, "alt").as_deref(), Some("sse"));
        assert_eq!(query_param(&plain, "alt"), None);
    }

    #[test]
    fn anthropic_success_splits_input_and_cache_tokens() {
        let reply = sample_reply();
        let answer = Anthropic.success(&reply);
        assert_eq!(answer.status, StatusCode::OK);
        let v = body_json(&answer);
        assert!(v["id"].as_str().unwrap().starts_with("msg_"));
        assert_eq!(v["type"], "message");
        assert_eq!(v["role"], "assistant");
        assert_eq!(v["model"], "m-1");
        assert_eq!(v["content"][0]["type"], "text");
        assert_eq!(
            v["content"][0]["text"],
            "Summary: Tides follow the moon across every ocean."
        );
        assert_eq!(v["stop_reason"], "end_turn");
        assert!(v["stop_sequence"].is_null());
        let usage = &v["usage"];
        assert_eq!(usage["cache_read_input_tokens"], 4);
        assert_eq!(usage["cache_creation_input_tokens"], 3);
        let total = usage["input_tokens"].as_u64().unwrap() + 4 + 3;
        assert_eq!(total, reply.prompt_tokens);
        assert_eq!(usage["output_tokens"], reply.completion_tokens);
    }

    #[test]
    fn gemini_success_reports_usage_and_model() {
        let reply = sample_reply();
        let v = body_json(&gemini(GeminiMode::Generate).success(&reply));
        let candidate = &v["candidates"][0];
        assert_eq!(candidate["content"]["role"], "model");
        assert_eq!(candidate["content"]["parts"][0]["text"], reply.content);
        assert_eq!(candidate["finishReason"], "STOP");
        let usage = &v["usageMetadata"];
        assert_eq!(usage["promptTokenCount"], reply.prompt_tokens);
        assert_eq!(usage["cachedContentTokenCount"], 4);
        assert_eq!(usage["candidatesTokenCount"], reply.completion_tokens);
        assert_eq!(usage["totalTokenCount"], reply.total_tokens());
        assert_eq!(v["modelVersion"], "m-1");
        assert!(v["responseId"].is_string());

        let uncached = Reply {
            cached_tokens: 0,
            finish: FinishReason::Length,
            ..reply.clone()
        };
        let v = body_json(&gemini(GeminiMode::Generate).success(&uncached));
        assert!(v["usageMetadata"].get("cachedContentTokenCount").is_none());
        assert_eq!(v["candidates"][0]["finishReason"], "MAX_TOKENS");

        // Without alt=sse, the streaming method answers an array of chunks.
        let v = body_json(&gemini(GeminiMode::StreamArray).success(&reply));
        let chunks = v.as_array().unwrap();
        assert!(chunks.len() >= 3);
        let last = chunks.last().unwrap();
        assert_eq!(last["candidates"][0]["finishReason"], "STOP");
    }

    #[test]
    fn openai_stream_has_deltas_usage_chunk_and_done() {
        let reply = sample_reply();
        let chunks = split_chunks(&reply.content);
        assert!(chunks.len() >= 3);
        let text = complete_text(OpenAi.stream(&reply, &chunks, true));
        let events = sse_events(&text);
        assert_eq!(events.last().unwrap().1, "[DONE]");
        let values: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|(_, data)| serde_json::from_str(data).unwrap())
            .collect();
        let ids: std::collections::BTreeSet<&str> =
            values.iter().map(|v| v["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), 1, "one id for the whole stream");
        assert!(
            values
                .iter()
                .all(|v| v["object"] == "chat.completion.chunk")
        );
        assert_eq!(values[0]["choices"][0]["delta"]["role"], "assistant");
        let content: String = values
            .iter()
            .filter_map(|v| v["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(content, reply.content);
        let usage_chunk = values.last().unwrap();
        assert_eq!(usage_chunk["choices"], json!([]));
        assert_eq!(usage_chunk["usage"]["prompt_tokens"], reply.prompt_tokens);
        assert_eq!(
            usage_chunk["usage"]["completion_tokens"],
            reply.completion_tokens
        );
        let finish = &values[values.len() - 2];
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
        assert!(
            values[..values.len() - 1]
                .iter()
                .all(|v| v["usage"].is_null())
        );

        // Without include_usage: no usage chunk and no usage fields.
        let text = complete_text(OpenAi.stream(&reply, &chunks, false));
        let events = sse_events(&text);
        let before_done: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
        assert_eq!(before_done["choices"][0]["finish_reason"], "stop");
        assert!(before_done.get("usage").is_none());
    }

    #[test]
    fn anthropic_stream_follows_the_event_sequence() {
        let reply = sample_reply();
        let chunks = split_chunks(&reply.content);
        let events = sse_events(&complete_text(Anthropic.stream(&reply, &chunks, false)));
        let names: Vec<&str> = events.iter().map(|(e, _)| e.as_deref().unwrap()).collect();
        let mut expected = vec!["message_start", "content_block_start", "ping"];
        expected.extend(std::iter::repeat_n("content_block_delta", chunks.len()));
        expected.extend(["content_block_stop", "message_delta", "message_stop"]);
        assert_eq!(names, expected);
        let values: Vec<Value> = events
            .iter()
            .map(|(_, d)| serde_json::from_str(d).unwrap())
            .collect();
        for ((name, _), v) in events.iter().zip(&values) {
            assert_eq!(
                v["type"],
                name.as_deref().unwrap(),
                "data type matches event name"
            );
        }
        assert_eq!(values[0]["message"]["usage"]["cache_read_input_tokens"], 4);
        let text: String = values
            .iter()
            .filter(|v| v["type"] == "content_block_delta")
            .map(|v| {
                assert_eq!(v["delta"]["type"], "text_delta");
                v["delta"]["text"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(text, reply.content);
        let delta = &values[values.len() - 2];
        assert_eq!(delta["delta"]["stop_reason"], "end_turn");
        assert_eq!(delta["usage"]["output_tokens"], reply.completion_tokens);
    }

    #[test]
    fn gemini_stream_ends_with_finish_reason_and_no_done() {
        let reply = sample_reply();
        let chunks = split_chunks(&reply.content);
        let text = complete_text(gemini(GeminiMode::StreamSse).stream(&reply, &chunks, false));
        assert!(text.contains("\r\n\r\n"), "CRLF framing");
        assert!(!text.contains("[DONE]"));
        let values: Vec<Value> = sse_events(&text)
            .iter()
            .map(|(e, d)| {
                assert!(e.is_none());
                serde_json::from_str(d).unwrap()
            })
            .collect();
        assert_eq!(values.len(), chunks.len());
        let joined: String = values
            .iter()
            .map(|v| {
                v["candidates"][0]["content"]["parts"][0]["text"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert_eq!(joined, reply.content);
        let (last, earlier) = values.split_last().unwrap();
        assert!(
            earlier
                .iter()
                .all(|v| v["candidates"][0].get("finishReason").is_none())
        );
        assert_eq!(last["candidates"][0]["finishReason"], "STOP");
        assert_eq!(
            last["usageMetadata"]["candidatesTokenCount"],
            reply.completion_tokens
        );
        // An empty reply still gets its terminal chunk.
        let empty = Reply {
            content: String::new(),
            ..reply
        };
        let plan = gemini(GeminiMode::StreamSse).stream(&empty, &[], false);
        assert_eq!(plan.deltas.len(), 1);
    }

    #[test]
    fn steps_for_each_stream_ending() {
        let plan = StreamPlan {
            head: vec!["h".to_owned()],
            deltas: vec![
                "d1".to_owned(),
                "d2".to_owned(),
                "d3".to_owned(),
                "d4".to_owned(),
            ],
            tail: vec!["t1".to_owned(), "t2".to_owned()],
        };
        let send = |s: &str| Step::Send(s.to_owned());
        assert_eq!(
            build_steps(plan.clone(), StreamEnding::Complete, "E".to_owned()),
            vec![
                send("h"),
                send("d1"),
                Step::Pause,
                send("d2"),
                Step::Pause,
                send("d3"),
                Step::Pause,
                send("d4"),
                Step::Pause,
                send("t1"),
                send("t2"),
            ]
        );
        assert_eq!(
            build_steps(plan.clone(), StreamEnding::Cut, "E".to_owned()),
            vec![
                send("h"),
                send("d1"),
                Step::Pause,
                send("d2"),
                Step::Pause,
                Step::Abort
            ]
        );
        assert_eq!(
            build_steps(plan, StreamEnding::Error, "E".to_owned()),
            vec![
                send("h"),
                send("d1"),
                Step::Pause,
                send("d2"),
                Step::Pause,
                send("E")
            ]
        );
        // A single delta (Gemini's terminal chunk) is never sent by a cut stream.
        let one = StreamPlan {
            deltas: vec!["last".to_owned()],
            ..StreamPlan::default()
        };
        assert_eq!(
            build_steps(one, StreamEnding::Cut, String::new()),
            vec![Step::Pause, Step::Abort]
        );
    }

    #[test]
    fn stream_error_events_per_format() {
        let events = sse_events(&OpenAi.stream_error_event());
        let v: Value = serde_json::from_str(&events[0].1).unwrap();
        assert_eq!(v["error"]["type"], "overloaded_error");
        assert_eq!(v["error"]["message"], "Overloaded");

        let events = sse_events(&Anthropic.stream_error_event());
        assert_eq!(events[0].0.as_deref(), Some("error"));
        let v: Value = serde_json::from_str(&events[0].1).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "overloaded_error");

        let raw = gemini(GeminiMode::StreamSse).stream_error_event();
        assert!(!raw.starts_with("data:"));
        let v: Value = serde_json::from_str(raw.trim()).unwrap();
        assert_eq!(
            v,
            json!({"error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}})
        );
    }

    #[test]
    fn openai_error_bodies() {
        let answer = OpenAi.error(&ApiError::RateLimited(7));
        assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(answer.header("retry-after"), Some("7"));
        let v = body_json(&answer);
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert!(v["error"]["param"].is_null());
        let v = body_json(&OpenAi.error(&ApiError::QuotaExhausted));
        assert_eq!(v["error"]["type"], "insufficient_quota");
        assert_eq!(v["error"]["code"], "insufficient_quota");
        let answer = OpenAi.error(&ApiError::InvalidCredential("revoked".to_owned()));
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert_eq!(body_json(&answer)["error"]["code"], "invalid_api_key");
        let answer = OpenAi.error(&ApiError::Overloaded);
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body_json(&answer)["error"]["type"], "server_error");
    }

    #[test]
    fn anthropic_error_bodies() {
        let cases = [
            (ApiError::MissingCredential, 401, "authentication_error"),
            (
                ApiError::InvalidCredential("revoked".to_owned()),
                401,
                "authentication_error",
            ),
            (ApiError::QuotaExhausted, 429, "rate_limit_error"),
            (ApiError::RateLimited(3), 429, "rate_limit_error"),
            (
                ApiError::BadRequest("x".to_owned()),
                400,
                "invalid_request_error",
            ),
            (
                ApiError::BodyRejected(StatusCode::PAYLOAD_TOO_LARGE, "big".to_owned()),
                413,
                "request_too_large",
            ),
            (ApiError::ServerError, 500, "api_error"),
            (ApiError::Overloaded, 529, "overloaded_error"),
            (ApiError::Unavailable, 503, "api_error"),
        ];
        for (err, status, kind) in cases {
            let answer = Anthropic.error(&err);
            assert_eq!(answer.status.as_u16(), status, "{err:?}");
            let v = body_json(&answer);
            assert_eq!(v["type"], "error", "{err:?}");
            assert_eq!(v["error"]["type"], kind, "{err:?}");
            assert!(v["error"]["message"].is_string(), "{err:?}");
            let request_id = v["request_id"].as_str().unwrap();
            assert!(request_id.starts_with("req_"));
            assert_eq!(answer.header("request-id"), Some(request_id));
        }
        let answer = Anthropic.error(&ApiError::RateLimited(3));
        assert_eq!(answer.header("retry-after"), Some("3"));
        assert!(body_json(&answer)["error"].get("details").is_none());
        let answer = Anthropic.error(&ApiError::QuotaExhausted);
        assert_eq!(answer.header("retry-after"), None);
        assert_eq!(
            body_json(&answer)["error"]["details"]["error_code"],
            "enforced_spend_limit_reached"
        );
    }

    #[test]
    fn gemini_error_bodies() {
        let g = gemini(GeminiMode::Generate);
        let cases = [
            (ApiError::MissingCredential, 403, "PERMISSION_DENIED"),
            (
                ApiError::InvalidCredential("revoked".to_owned()),
                400,
                "INVALID_ARGUMENT",
            ),
            (ApiError::QuotaExhausted, 429, "RESOURCE_EXHAUSTED"),
            (ApiError::RateLimited(7), 429, "RESOURCE_EXHAUSTED"),
            (
                ApiError::BadRequest("x".to_owned()),
                400,
                "INVALID_ARGUMENT",
            ),
            (ApiError::ServerError, 500, "INTERNAL"),
            (ApiError::Overloaded, 503, "UNAVAILABLE"),
            (ApiError::Unavailable, 503, "UNAVAILABLE"),
        ];
        for (err, status, name) in cases {
            let answer = g.error(&err);
            assert_eq!(answer.status.as_u16(), status, "{err:?}");
            let v = body_json(&answer);
            assert_eq!(v["error"]["code"], status, "{err:?}");
            assert_eq!(v["error"]["status"], name, "{err:?}");
            assert!(v["error"]["message"].is_string(), "{err:?}");
        }
        let v = body_json(&g.error(&ApiError::InvalidCredential("revoked".to_owned())));
        assert_eq!(
            v["error"]["details"][0]["@type"],
            "type.googleapis.com/google.rpc.ErrorInfo"
        );
        assert_eq!(v["error"]["details"][0]["reason"], "API_KEY_INVALID");

        let detail = |v: &Value, kind: &str| {
            v["error"]["details"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["@type"] == format!("type.googleapis.com/google.rpc.{kind}"))
                .cloned()
                .unwrap()
        };
        let answer = g.error(&ApiError::RateLimited(7));
        assert_eq!(answer.header("retry-after"), None, "Gemini uses RetryInfo");
        let v = body_json(&answer);
        assert_eq!(detail(&v, "RetryInfo")["retryDelay"], "7s");
        let quota_id = detail(&v, "QuotaFailure")["violations"][0]["quotaId"].clone();
        assert!(!quota_id.as_str().unwrap().contains("PerDay"));
        let v = body_json(&g.error(&ApiError::QuotaExhausted));
        let quota_id = detail(&v, "QuotaFailure")["violations"][0]["quotaId"].clone();
        assert!(quota_id.as_str().unwrap().contains("PerDay"));
        let v = body_json(&g.error(&ApiError::Overloaded));
        assert_eq!(
            v["error"]["message"],
            "The model is overloaded. Please try again later."
        );
    }

    #[test]
    fn window_counts_the_busiest_stretch() {
        let base = Instant::now();
        let at = |ms: &[u64]| -> VecDeque<Instant> {
            ms.iter()
                .map(|&m| base + Duration::from_millis(m))
                .collect()
        };
        let ms = Duration::from_millis;
        assert_eq!(max_in_window(&VecDeque::new(), ms(100)), 0);
        let starts = at(&[0, 10, 20, 500, 510, 520, 530, 2_000]);
        assert_eq!(max_in_window(&starts, ms(1)), 1);
        assert_eq!(max_in_window(&starts, ms(30)), 3);
        // Half-open: 500 and 530 are exactly 30 ms apart.
        assert_eq!(max_in_window(&starts, ms(31)), 4);
        assert_eq!(max_in_window(&starts, ms(600)), 7);
        assert_eq!(max_in_window(&starts, ms(10_000)), 8);
        assert_eq!(max_in_window(&starts, Duration::ZERO), 0);
        // Simultaneous starts all fit in the smallest window.
        assert_eq!(max_in_window(&at(&[5, 5, 5]), ms(1)), 3);
    }

    #[test]
    fn stats_count_formats_keys_and_windows() {
        let stats = Arc::new(Stats::default());
        {
            let a = stats.begin("anthropic", Some("k1"));
            a.record("200");
            let b = stats.begin("gemini", None);
            b.record("403");
            let c = stats.begin("anthropic", Some("k1"));
            c.record("hang");
            assert_eq!(stats.snapshot().in_flight, 3);
        }
        let snap = stats.snapshot();
        assert_eq!(snap.in_flight, 0);
        assert_eq!(snap.max_in_flight, 3);
        assert_eq!(snap.requests_total, 3);
        assert_eq!(snap.by_format["anthropic"], 2);
        assert_eq!(snap.by_format["gemini"], 1);
        assert_eq!(snap.by_format["openai"], 0);
        assert_eq!(snap.by_key_status["k1"]["200"], 1);
        assert_eq!(snap.by_key_status["k1"]["hang"], 1);
        assert_eq!(snap.by_key_status["<none>"]["403"], 1);
        assert_eq!(stats.window(60_000).max_requests, 3);
        assert_eq!(stats.window(60_000).recorded, 3);
        stats.reset();
        let snap = stats.snapshot();
        assert_eq!(snap.requests_total, 0);
        assert!(snap.by_key_status.is_empty());
        assert_eq!(stats.window(60_000).recorded, 0);
    }

    #[test]
    fn answers_become_responses_with_their_headers() {
        let answer = Anthropic.error(&ApiError::RateLimited(2));
        let response = answer.clone().into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            response.headers().get("retry-after").unwrap(),
            &HeaderValue::from_static("2")
        );
        assert_eq!(
            response.headers().get(header::CONTENT_TYPE).unwrap(),
            &HeaderValue::from_static("application/json")
        );
        assert!(response.headers().get("request-id").is_some());
        assert_eq!(status_529().as_u16(), 529);
    }
}
