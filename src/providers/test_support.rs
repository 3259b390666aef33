//! Helpers shared by the adapters' unit tests.

use wiremock::matchers::method;

use super::{Provider, openai};
use crate::config::MaxTokensField;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// A server that answers exactly one POST with `status` and `body` (verified on drop).
pub async fn serve(status: u16, body: &str) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(status).set_body_string(body))
        .expect(1)
        .mount(&server)
        .await;
    server
}

/// An OpenAI-kind provider at `base` (its API under `/v1`), with the plain options.
pub fn openai_at(base: &str) -> Provider {
    Provider::OpenAi(openai::OpenAiProvider::new(
        reqwest::Client::new(),
        format!("{base}/v1"),
        openai::OpenAiOptions {
            max_tokens_field: MaxTokensField::MaxTokens,
            strict_fields: false,
        },
    ))
}
