//! The cost of a known request, through each wire format's real adapter, matches a figure
//! computed by hand — cache reads and cache writes included.

use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::{ApiKey, Call, Provider, anthropic, gemini};
use crate::budget::pricing;
use crate::config::Prices;
use crate::messages::{ChatMessage, ChatRequest};

fn prices() -> Prices {
    Prices {
        input: Decimal::from(3),
        cached_input: Decimal::from_str("0.3").unwrap(),
        cache_write: Decimal::from_str("3.75").unwrap(),
        output: Decimal::from(15),
        per_request: Decimal::ZERO,
    }
}

async fn cost_of(make: impl FnOnce(String) -> Provider, body: &str) -> Decimal {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_string(body))
        .mount(&server)
        .await;
    let key = ApiKey {
        id: "k".to_owned(),
        secret: "s".into(),
    };
    let call = Call {
        key: Some(&key),
        timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        on_delta: None,
    };
    let request = ChatRequest {
        messages: vec![ChatMessage::text_message("user", "hello")],
        max_tokens: Some(600),
        ..ChatRequest::default()
    };
    let completion = make(server.uri())
        .complete(&request, "m", &call)
        .await
        .unwrap();
    pricing::cost(&completion.usage, &prices())
}

#[tokio::test]
async fn openai_cost_counts_cached_and_cache_written_tokens_at_their_prices() {
    // 10,000 prompt tokens of which 4,000 cache reads and 1,000 cache writes; 500 output
    // (100 of them reasoning). 5,000 × 3 + 4,000 × 0.3 + 1,000 × 3.75 + 500 × 15
    // = 27,450 per million = $0.02745.
    let body = r#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"x"},"finish_reason":"stop"}],
        "usage":{"prompt_tokens":10000,"completion_tokens":500,"total_tokens":10500,
                 "prompt_tokens_details":{"cached_tokens":4000,"cache_write_tokens":1000},
                 "completion_tokens_details":{"reasoning_tokens":100}}}"#;
    let make = |base: String| super::test_support::openai_at(&base);
    assert_eq!(
        cost_of(make, body).await,
        Decimal::from_str("0.02745").unwrap()
    );
}

#[tokio::test]
async fn anthropic_cost_adds_cache_reads_and_writes_to_the_uncached_input() {
    // Anthropic's input_tokens exclude cache traffic: 5,000 + 4,000 read + 1,000 written, 500
    // output: the same $0.02745 as the OpenAI figure above.
    let body = r#"{"id":"msg_1","type":"message","role":"assistant","model":"m","content":[{"type":"text","text":"x"}],
        "stop_reason":"end_turn","stop_sequence":null,
        "usage":{"input_tokens":5000,"cache_read_input_tokens":4000,"cache_creation_input_tokens":1000,"output_tokens":500}}"#;
    let make = |base: String| {
        Provider::Anthropic(anthropic::AnthropicProvider::new(
            reqwest::Client::new(),
            base,
        ))
    };
    assert_eq!(
        cost_of(make, body).await,
        Decimal::from_str("0.02745").unwrap()
    );
}

#[tokio::test]
async fn gemini_cost_counts_cached_content_and_bills_thoughts_as_output() {
    // promptTokenCount 10,000 includes 4,000 cached; output = 400 candidates + 100 thoughts.
    // 6,000 × 3 + 4,000 × 0.3 + 500 × 15 = 26,700 per million = $0.0267.
    let body = r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"x"}]},"finishReason":"STOP"}],
        "usageMetadata":{"promptTokenCount":10000,"cachedContentTokenCount":4000,"candidatesTokenCount":400,"thoughtsTokenCount":100,"totalTokenCount":10500}}"#;
    let make = |base: String| {
        Provider::Gemini(gemini::GeminiProvider::new(
            reqwest::Client::new(),
            base,
            super::images::ImageFetcher::new(true),
        ))
    };
    assert_eq!(
        cost_of(make, body).await,
        Decimal::from_str("0.0267").unwrap()
    );
}
