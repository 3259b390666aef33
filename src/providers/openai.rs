//! OpenAI chat completions, and every OpenAI-compatible service through `base_url`.

use std::time::Duration;

use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::Value;

use super::{ApiKey, Completion, ErrorClass, ProviderError, excerpt};
use crate::messages::{ChatRequest, Usage};

/// Wire-format name used in errors and attempts.
pub const PROVIDER_TYPE: &str = "openai";

/// Longest body excerpt kept in an error.
const EXCERPT_BYTES: usize = 512;

/// A client for one OpenAI-compatible base URL.
#[derive(Debug)]
pub struct OpenAiProvider {
    http: reqwest::Client,
    /// `…/v1`; the adapter appends `/chat/completions` as the official SDK does.
    base_url: String,
    keys: Vec<ApiKey>,
    timeout: Duration,
}

#[derive(Deserialize)]
struct OpenAiResponse {
    choices: Vec<Value>,
    usage: Option<OpenAiUsage>,
}

#[derive(Deserialize)]
struct OpenAiUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    prompt_tokens_details: Option<OpenAiPromptDetails>,
    completion_tokens_details: Option<OpenAiCompletionDetails>,
}

#[derive(Deserialize)]
struct OpenAiPromptDetails {
    cached_tokens: Option<u64>,
    cache_write_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct OpenAiCompletionDetails {
    reasoning_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct OpenAiErrorBody {
    error: OpenAiErrorDetail,
}

#[derive(Deserialize)]
struct OpenAiErrorDetail {
    message: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    code: Option<Value>,
}

impl From<OpenAiUsage> for Usage {
    fn from(usage: OpenAiUsage) -> Self {
        let prompt = usage.prompt_tokens_details;
        Usage {
            input_tokens: usage.prompt_tokens,
            cached_input_tokens: prompt.as_ref().and_then(|p| p.cached_tokens).unwrap_or(0),
            cache_write_tokens: prompt
                .as_ref()
                .and_then(|p| p.cache_write_tokens)
                .unwrap_or(0),
            output_tokens: usage.completion_tokens,
            reasoning_tokens: usage
                .completion_tokens_details
                .and_then(|c| c.reasoning_tokens)
                .unwrap_or(0),
        }
    }
}

impl OpenAiProvider {
    pub fn new(
        http: reqwest::Client,
        base_url: String,
        keys: Vec<ApiKey>,
        timeout: Duration,
    ) -> Self {
        Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            keys,
            timeout,
        }
    }

    /// The key calls use (rotation across keys comes with key health tracking).
    fn key(&self) -> Option<&ApiKey> {
        self.keys.first()
    }

    pub fn key_id(&self) -> Option<&str> {
        self.key().map(|k| k.id.as_str())
    }

    /// One non-streaming chat completion.
    pub async fn complete(
        &self,
        request: &ChatRequest,
        model: &str,
    ) -> Result<Completion, ProviderError> {
        let Some(key) = self.key() else {
            return Err(ProviderError::new(
                PROVIDER_TYPE,
                ErrorClass::Auth,
                "no API key is available: set the environment variable named in the provider's keys",
            ));
        };
        let mut body = serde_json::to_value(request).map_err(|e| {
            ProviderError::new(
                PROVIDER_TYPE,
                ErrorClass::InvalidRequest,
                format!("cannot encode request: {e}"),
            )
        })?;
        if let Some(object) = body.as_object_mut() {
            object.insert("model".to_owned(), Value::from(model));
            object.remove("stream");
            object.remove("stream_options");
        }
        let response = self
            .http
            .post(format!("{}/chat/completions", self.base_url))
            .bearer_auth(key.secret.expose_secret())
            .timeout(self.timeout)
            .json(&body)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(transport_error)?;
        if !(200..300).contains(&status) {
            return Err(handle_openai_error(status, &text));
        }
        parse_openai_response(&text)
    }
}

/// A connection failure or timeout before a status arrived.
fn transport_error(error: reqwest::Error) -> ProviderError {
    let class = if error.is_timeout() {
        ErrorClass::Timeout
    } else {
        ErrorClass::ServerError
    };
    // `without_url` keeps query strings (which some gateways use for keys) out of the message.
    ProviderError::new(PROVIDER_TYPE, class, error.without_url().to_string())
}

/// Parses a 2xx body into a normalised completion; an unusable body is a server error.
fn parse_openai_response(text: &str) -> Result<Completion, ProviderError> {
    let malformed = |reason: String| ProviderError {
        raw_response: Some(excerpt(text, EXCERPT_BYTES)),
        ..ProviderError::new(PROVIDER_TYPE, ErrorClass::ServerError, reason)
    };
    let mut response: Value = serde_json::from_str(text.trim_start())
        .map_err(|e| malformed(format!("response body is not JSON: {e}")))?;
    if let Some(error) = response.get("error").filter(|e| !e.is_null()) {
        return Err(malformed(format!("200 response carries an error: {error}")));
    }
    let parsed: OpenAiResponse = serde_json::from_value(response.clone())
        .map_err(|e| malformed(format!("response is not a chat.completion: {e}")))?;
    if parsed.choices.is_empty() {
        return Err(malformed("response has no choices".to_owned()));
    }
    let usage = parsed.usage.map(Usage::from).unwrap_or_default();
    if let Some(object) = response.as_object_mut() {
        object.insert("object".to_owned(), Value::from("chat.completion"));
    }
    Ok(Completion { response, usage })
}

/// Maps an error status (then the body's discriminator) to an error class. Never fails:
/// a body that is not JSON (an HTML page from a proxy) still classifies by status.
pub fn handle_openai_error(status: u16, body: &str) -> ProviderError {
    let detail = serde_json::from_str::<OpenAiErrorBody>(body.trim_start())
        .ok()
        .map(|b| b.error);
    let kind = detail
        .as_ref()
        .and_then(|d| d.kind.as_deref())
        .unwrap_or("");
    let code = detail
        .as_ref()
        .and_then(|d| d.code.as_ref())
        .and_then(Value::as_str)
        .unwrap_or("");
    let class = match status {
        400 if code == "context_length_exceeded" => ErrorClass::ContextLength,
        400 if code == "content_filter" || kind == "content_filter" => ErrorClass::ContentFiltered,
        401 | 403 => ErrorClass::Auth,
        408 => ErrorClass::Timeout,
        409 => ErrorClass::Conflict,
        429 if code == "insufficient_quota" || kind == "insufficient_quota" => {
            ErrorClass::QuotaExhausted
        }
        429 => ErrorClass::RateLimited,
        503 | 529 => ErrorClass::Overloaded,
        504 => ErrorClass::Timeout,
        500..=599 => ErrorClass::ServerError,
        _ => ErrorClass::InvalidRequest,
    };
    let message = match detail.and_then(|d| d.message) {
        Some(message) => format!("HTTP {status}: {message}"),
        None => format!("HTTP {status}: {}", excerpt(body.trim(), 200)),
    };
    ProviderError {
        status: Some(status),
        raw_response: Some(excerpt(body, EXCERPT_BYTES)),
        ..ProviderError::new(PROVIDER_TYPE, class, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::ChatMessage;
    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const COMPLETION: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-x",
        "choices":[{"index":0,"message":{"role":"assistant","content":"Hi.","refusal":null},"finish_reason":"stop"}],
        "usage":{"prompt_tokens":20,"completion_tokens":5,"total_tokens":25,
                 "prompt_tokens_details":{"cached_tokens":8},"completion_tokens_details":{"reasoning_tokens":2}}}"#;

    fn provider(server: &MockServer, timeout: Duration) -> OpenAiProvider {
        let key = ApiKey {
            id: "main".to_owned(),
            secret: "sk-test".into(),
        };
        OpenAiProvider::new(
            reqwest::Client::new(),
            format!("{}/v1", server.uri()),
            vec![key],
            timeout,
        )
    }

    fn request() -> ChatRequest {
        ChatRequest {
            messages: vec![ChatMessage::text_message("user", "hello")],
            ..ChatRequest::default()
        }
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
        let completion = provider(&server, Duration::from_secs(5))
            .complete(&request(), "gpt-x")
            .await
            .unwrap();
        assert_eq!(
            completion.response["choices"][0]["message"]["content"],
            "Hi."
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
    }

    #[tokio::test]
    async fn a_429_is_rate_limited_and_retryable() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(429).set_body_string(
                r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
            ))
            .expect(1)
            .mount(&server)
            .await;
        let err = provider(&server, Duration::from_secs(5))
            .complete(&request(), "gpt-x")
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::RateLimited);
        assert_eq!(err.status, Some(429));
        assert!(err.is_retryable());
        assert!(
            err.message.contains("Rate limit reached"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn a_500_with_an_html_body_is_a_server_error() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(502).set_body_string("<html>Bad gateway</html>"))
            .expect(1)
            .mount(&server)
            .await;
        let err = provider(&server, Duration::from_secs(5))
            .complete(&request(), "gpt-x")
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::ServerError);
        assert!(err.message.contains("Bad gateway"));
    }

    #[tokio::test]
    async fn a_malformed_200_body_is_a_server_error_that_keeps_the_body() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_string("{\"choices\": [tru"))
            .expect(1)
            .mount(&server)
            .await;
        let err = provider(&server, Duration::from_secs(5))
            .complete(&request(), "gpt-x")
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
        let err = provider(&server, Duration::from_millis(100))
            .complete(&request(), "gpt-x")
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Timeout);
    }

    #[test]
    fn error_statuses_map_to_classes() {
        let quota = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        let context = r#"{"error":{"message":"too long","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
        assert_eq!(
            handle_openai_error(429, quota).class,
            ErrorClass::QuotaExhausted
        );
        assert_eq!(
            handle_openai_error(400, context).class,
            ErrorClass::ContextLength
        );
        assert_eq!(handle_openai_error(401, "").class, ErrorClass::Auth);
        assert_eq!(handle_openai_error(503, "").class, ErrorClass::Overloaded);
        assert_eq!(handle_openai_error(504, "").class, ErrorClass::Timeout);
        assert_eq!(
            handle_openai_error(404, "").class,
            ErrorClass::InvalidRequest
        );
        assert!(!handle_openai_error(400, "{}").is_retryable());
    }
}
