//! `fake-provider`: an HTTP server that imitates LLM provider APIs, with fault
//! injection, for Switchyard's integration tests and benchmarks.
//!
//! It never talks to a real API and only ever binds a loopback address.
//!
//! # Wire formats
//!
//! * OpenAI: `POST /v1/chat/completions` (also `POST /chat/completions`),
//!   authenticated with `Authorization: Bearer <token>`.
//!
//! Each wire format is one [`WireFormat`] implementation (a section of this
//! file) plus its routes in [`router`]; the request pipeline
//! ([`handle_chat`]), the fault injection and the statistics are shared.
//!
//! # Behaviour
//!
//! * Bearer token `revoked` -> 401, `exhausted` -> 429 `insufficient_quota`,
//!   missing credential -> 401.
//! * Malformed JSON, or no non-empty `messages` array -> 400.
//! * Faults are drawn per request, in this order: hang (no answer for an hour,
//!   or until the client gives up or the server stops), 500, 429 (with a
//!   `retry-after` header). Faults are answered at once; only successes wait
//!   for the configured latency.
//! * A success answers `"Summary: "` followed by the first sentence of the
//!   last user message, with token usage estimated as
//!   `prompt = ceil(chars / 4) + 4 per message + 3` and
//!   `completion = max(1, ceil(chars / 4))`. The request header
//!   `x-fake-cached-tokens: N` reports `min(N, prompt)` cached prompt tokens.
//! * `GET /stats` reports `requests_total`, `by_status` (a started hang counts
//!   once as `hang`), `in_flight`, `max_in_flight` and `by_auth` (requests per
//!   credential, `<none>` when missing) for every chat request, faults
//!   included. `POST /stats/reset` zeroes them (`in_flight` stays a live
//!   gauge). `GET /healthz` answers `ok`.
//! * Request bodies up to 64 MiB are accepted; larger ones get 413.
//! * On SIGTERM or ctrl-c, open requests (hangs included) are answered 503
//!   and the server exits.
//!
//! # Flags (each also read from the environment as `FAKE_PROVIDER_<NAME>`)
//!
//! | flag | default | meaning |
//! | --- | --- | --- |
//! | `--host` | `127.0.0.1` | loopback address to bind (`localhost` is accepted) |
//! | `--port` | `0` | port; 0 picks a free one |
//! | `--latency-ms` | `0` | delay before each successful answer |
//! | `--jitter-ms` | `0` | uniform ± jitter around the latency, never below 0 |
//! | `--rate-429` | `0` | fraction (0..=1) of requests answered 429 |
//! | `--retry-after` | `1` | seconds sent in the `retry-after` header of 429s |
//! | `--rate-500` | `0` | fraction (0..=1) of requests answered 500 |
//! | `--rate-hang` | `0` | fraction (0..=1) of requests never answered |
//! | `--seed` | none | seed for a deterministic random generator |
//! | `--model` | `gpt-4o-mini` | model echoed when the request names none |
//!
//! When the fault rates add up to more than 1, the earlier faults in the
//! order above take precedence.
//!
//! After binding, exactly one line is printed to stdout:
//! `listening on http://127.0.0.1:PORT`. Logs go to stderr (filter with
//! `RUST_LOG`, default `info`). The server stops on SIGTERM or ctrl-c.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;

// ---------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------

/// Command-line flags; each is also read from `FAKE_PROVIDER_<NAME>`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "fake-provider",
    about = "Imitates LLM provider HTTP APIs, with fault injection, on loopback only."
)]
struct Cli {
    /// Loopback address to bind (an IP address, or `localhost`).
    #[arg(long, env = "FAKE_PROVIDER_HOST", default_value = "127.0.0.1")]
    host: String,

    /// Port to bind; 0 picks a free port.
    #[arg(long, env = "FAKE_PROVIDER_PORT", default_value_t = 0)]
    port: u16,

    /// Delay in milliseconds before each successful answer.
    #[arg(long, env = "FAKE_PROVIDER_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,

    /// Uniform jitter (± milliseconds) around the latency; the delay never goes below 0.
    #[arg(long, env = "FAKE_PROVIDER_JITTER_MS", default_value_t = 0)]
    jitter_ms: u64,

    /// Fraction (0..=1) of requests answered 429 rate_limit_exceeded.
    #[arg(long = "rate-429", env = "FAKE_PROVIDER_RATE_429", default_value_t = 0.0, value_parser = parse_fraction)]
    rate_429: f64,

    /// Seconds sent in the `retry-after` header of injected 429s.
    #[arg(long, env = "FAKE_PROVIDER_RETRY_AFTER", default_value_t = 1)]
    retry_after: u64,

    /// Fraction (0..=1) of requests answered 500 server_error.
    #[arg(long = "rate-500", env = "FAKE_PROVIDER_RATE_500", default_value_t = 0.0, value_parser = parse_fraction)]
    rate_500: f64,

    /// Fraction (0..=1) of requests that never get an answer (about an hour).
    #[arg(long, env = "FAKE_PROVIDER_RATE_HANG", default_value_t = 0.0, value_parser = parse_fraction)]
    rate_hang: f64,

    /// Seed for a deterministic random generator (faults and jitter).
    #[arg(long, env = "FAKE_PROVIDER_SEED")]
    seed: Option<u64>,

    /// Model name echoed when the request names none.
    #[arg(long, env = "FAKE_PROVIDER_MODEL", default_value = "gpt-4o-mini")]
    model: String,
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
}

/// What happens to one request after authentication and validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Never answer (until the client gives up or the server stops).
    Hang,
    /// Answer 500.
    ServerError,
    /// Answer 429 with `retry-after`.
    RateLimited,
    /// Answer normally, after the latency.
    None,
}

/// Picks the fault for one request from a uniform draw `u` in `[0, 1)`.
///
/// The rates partition `[0, 1)` in the order hang, 500, 429, so each rate is
/// exactly the fraction of requests receiving that fault (as long as they add
/// up to at most 1; otherwise the earlier faults take precedence).
fn choose_fault(u: f64, rates: FaultRates) -> Fault {
    let mut edge = rates.hang;
    if u < edge {
        return Fault::Hang;
    }
    edge += rates.server_error;
    if u < edge {
        return Fault::ServerError;
    }
    edge += rates.rate_limited;
    if u < edge {
        return Fault::RateLimited;
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
    /// `user`, `assistant`, `system`, ...
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
    /// The conversation; never empty.
    messages: Vec<ChatMessage>,
    /// The completion token limit, if the request set one.
    max_tokens: Option<u64>,
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
    /// Estimated prompt tokens.
    prompt_tokens: u64,
    /// Estimated completion tokens.
    completion_tokens: u64,
    /// Prompt tokens reported as served from cache.
    cached_tokens: u64,
}

/// Builds the deterministic reply: `"Summary: "` plus the first sentence of
/// the last user message, cut to `max_tokens` if needed.
fn build_reply(req: &ChatRequest, default_model: &str, cached_hint: Option<u64>) -> Reply {
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
    Reply {
        model: req
            .model
            .clone()
            .unwrap_or_else(|| default_model.to_owned()),
        content,
        finish,
        prompt_tokens,
        completion_tokens,
        cached_tokens: cached_hint.unwrap_or(0).min(prompt_tokens),
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Errors shared by all wire formats
// ---------------------------------------------------------------------------

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
    /// Injected 429; carries the `retry-after` seconds.
    RateLimited(u64),
    /// The server is shutting down, or a hang ran out (503).
    Unavailable,
}

impl ApiError {
    /// The HTTP status of this error.
    fn status(&self) -> StatusCode {
        match self {
            Self::MissingCredential | Self::InvalidCredential(_) => StatusCode::UNAUTHORIZED,
            Self::QuotaExhausted | Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::BodyRejected(status, _) => *status,
            Self::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// A provider API dialect: how credentials, requests, replies and errors look.
///
/// Adding a provider means one more implementation plus its routes.
trait WireFormat: Send + Sync + 'static {
    /// The credential presented by the request, if any.
    fn credential(&self, headers: &HeaderMap, uri: &Uri) -> Option<String>;
    /// Parses a request body.
    fn parse(&self, body: &[u8]) -> Result<ChatRequest, String>;
    /// Renders a successful reply.
    fn success(&self, reply: &Reply) -> Response;
    /// Renders an error.
    fn error(&self, err: &ApiError) -> Response;
}

// ---------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------

/// Counters guarded by one mutex.
#[derive(Debug, Default)]
struct Counters {
    /// Chat requests received.
    requests_total: u64,
    /// Answers by status code (or `hang`).
    by_status: BTreeMap<String, u64>,
    /// Requests by credential (`<none>` when missing).
    by_auth: BTreeMap<String, u64>,
}

/// Request statistics, safe to share between handlers.
#[derive(Debug, Default)]
struct Stats {
    /// Totals and breakdowns.
    counters: Mutex<Counters>,
    /// Chat requests currently being handled.
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
}

impl Stats {
    /// Locks the counters, recovering from a poisoned lock.
    fn lock(&self) -> MutexGuard<'_, Counters> {
        self.counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a new chat request; the guard keeps it in flight until dropped.
    fn begin(self: &Arc<Self>, credential: Option<&str>) -> InFlight {
        {
            let mut c = self.lock();
            c.requests_total += 1;
            let key = credential.unwrap_or("<none>").to_owned();
            *c.by_auth.entry(key).or_insert(0) += 1;
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight {
            stats: Arc::clone(self),
        }
    }

    /// Counts one answer (or `hang`).
    fn record(&self, status: &str) {
        *self.lock().by_status.entry(status.to_owned()).or_insert(0) += 1;
    }

    /// The current numbers.
    fn snapshot(&self) -> StatsSnapshot {
        let c = self.lock();
        StatsSnapshot {
            requests_total: c.requests_total,
            by_status: c.by_status.clone(),
            in_flight: self.in_flight.load(Ordering::SeqCst),
            max_in_flight: self.max_in_flight.load(Ordering::SeqCst),
            by_auth: c.by_auth.clone(),
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
/// client disconnects and the handler is cancelled).
struct InFlight {
    /// The statistics to decrement.
    stats: Arc<Stats>,
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
    /// Fault probabilities.
    rates: FaultRates,
    /// `retry-after` seconds on injected 429s.
    retry_after: u64,
    /// Default model name.
    model: String,
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

/// Parses the `x-fake-cached-tokens` hint; invalid values are ignored.
fn cached_tokens_hint(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("x-fake-cached-tokens")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Records `status` and passes the response through.
fn finish(state: &AppState, response: Response) -> Response {
    state.stats.record(response.status().as_str());
    response
}

/// The pipeline every chat endpoint shares: count, authenticate, validate,
/// inject faults, wait, answer.
async fn handle_chat<W: WireFormat>(
    wire: &W,
    state: &AppState,
    headers: &HeaderMap,
    uri: &Uri,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let credential = wire.credential(headers, uri);
    let _in_flight = state.stats.begin(credential.as_deref());

    let token = match credential.as_deref() {
        None => return finish(state, wire.error(&ApiError::MissingCredential)),
        Some("revoked") => {
            let err = ApiError::InvalidCredential("revoked".to_owned());
            return finish(state, wire.error(&err));
        }
        Some("exhausted") => return finish(state, wire.error(&ApiError::QuotaExhausted)),
        Some(token) => token,
    };

    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let err = ApiError::BodyRejected(rejection.status(), rejection.body_text());
            return finish(state, wire.error(&err));
        }
    };
    let request = match wire.parse(&body) {
        Ok(request) => request,
        Err(msg) => return finish(state, wire.error(&ApiError::BadRequest(msg))),
    };

    match state.draw_fault() {
        Fault::Hang => {
            state.stats.record("hang");
            tracing::debug!(token, "hanging request");
            state.sleep_unless_shutdown(HANG_DURATION).await;
            // Whatever ends the hang, it was already counted as `hang`.
            return wire.error(&ApiError::Unavailable);
        }
        Fault::ServerError => return finish(state, wire.error(&ApiError::ServerError)),
        Fault::RateLimited => {
            let err = ApiError::RateLimited(state.config.retry_after);
            return finish(state, wire.error(&err));
        }
        Fault::None => {}
    }

    if !state.sleep_unless_shutdown(state.draw_delay()).await {
        return finish(state, wire.error(&ApiError::Unavailable));
    }
    let reply = build_reply(&request, &state.config.model, cached_tokens_hint(headers));
    finish(state, wire.success(&reply))
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

/// Renders an OpenAI error response.
fn openai_error_body(
    message: &str,
    kind: &str,
    code: Option<&str>,
    status: StatusCode,
) -> Response {
    let body = OpenAiErrorEnvelope {
        error: OpenAiError {
            message,
            kind,
            param: None,
            code,
        },
    };
    (status, axum::Json(body)).into_response()
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

/// Reads a token limit field, rejecting non-positive or non-integer values.
fn openai_limit(obj: &serde_json::Map<String, Value>, field: &str) -> Result<Option<u64>, String> {
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

impl WireFormat for OpenAi {
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
        if obj.get("stream").and_then(Value::as_bool) == Some(true) {
            return Err("Streaming is not supported by fake-provider.".to_owned());
        }
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
            openai_limit(obj, "max_tokens")?,
            openai_limit(obj, "max_completion_tokens")?,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(ChatRequest {
            model,
            messages: parsed,
            max_tokens,
        })
    }

    fn success(&self, reply: &Reply) -> Response {
        let finish_reason = match reply.finish {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        };
        let body = OpenAiCompletion {
            id: format!("chatcmpl-{}", uuid::Uuid::now_v7().simple()),
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
                finish_reason,
            }],
            usage: OpenAiUsage {
                prompt_tokens: reply.prompt_tokens,
                completion_tokens: reply.completion_tokens,
                total_tokens: reply.prompt_tokens.saturating_add(reply.completion_tokens),
                prompt_tokens_details: OpenAiPromptDetails {
                    cached_tokens: reply.cached_tokens,
                    audio_tokens: 0,
                },
                completion_tokens_details: OpenAiCompletionDetails::default(),
            },
            system_fingerprint: "fp_fake",
        };
        (StatusCode::OK, axum::Json(body)).into_response()
    }

    fn error(&self, err: &ApiError) -> Response {
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
            ApiError::RateLimited(retry_after) => {
                let mut response = openai_error_body(
                    "Rate limit reached for requests",
                    "requests",
                    Some("rate_limit_exceeded"),
                    status,
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
                response
            }
            ApiError::Unavailable => openai_error_body(
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

/// Unknown routes: an OpenAI-style 404.
async fn not_found(method: Method, uri: Uri) -> Response {
    openai_error_body(
        &format!("Invalid URL ({method} {})", uri.path()),
        "invalid_request_error",
        None,
        StatusCode::NOT_FOUND,
    )
}

/// Known route, wrong method: an OpenAI-style 405.
async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    openai_error_body(
        &format!("Method {method} not allowed for {}", uri.path()),
        "invalid_request_error",
        None,
        StatusCode::METHOD_NOT_ALLOWED,
    )
}

/// Largest accepted request body.
const BODY_LIMIT: usize = 64 * 1024 * 1024;

/// All routes.
fn router(state: AppState) -> Router {
    Router::new()
        // OpenAI
        .route("/v1/chat/completions", post(openai_chat))
        .route("/chat/completions", post(openai_chat))
        // Observability
        .route("/stats", get(get_stats))
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
        rates: FaultRates {
            hang: cli.rate_hang,
            server_error: cli.rate_500,
            rate_limited: cli.rate_429,
        },
        retry_after: cli.retry_after,
        model: cli.model.clone(),
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
        };
        let reply = build_reply(&req, "default", Some(1_000));
        assert_eq!(reply.content, "Summary: The cat sat.");
        assert_eq!(reply.model, "default");
        assert_eq!(reply.finish, FinishReason::Stop);
        assert_eq!(reply.completion_tokens, 6); // 21 chars
        assert_eq!(reply.cached_tokens, reply.prompt_tokens);
    }

    #[test]
    fn reply_is_cut_at_max_tokens() {
        let req = ChatRequest {
            model: Some("m".to_owned()),
            messages: vec![msg("user", "A fairly long sentence that needs cutting.")],
            max_tokens: Some(2),
        };
        let reply = build_reply(&req, "default", None);
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
}
