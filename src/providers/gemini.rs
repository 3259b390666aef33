//! Gemini adapter (being written).

use super::{Call, Completion, ErrorClass, ProviderError};
use crate::messages::ChatRequest;

/// Wire-format name used in errors and attempts.
pub const PROVIDER_TYPE: &str = "gemini";

/// Client for one Gemini base URL.
#[derive(Debug)]
pub struct GeminiProvider {
    #[expect(dead_code, reason = "used once the adapter lands")]
    http: reqwest::Client,
    #[expect(dead_code, reason = "used once the adapter lands")]
    base_url: String,
}

impl GeminiProvider {
    pub fn new(http: reqwest::Client, base_url: String) -> Self {
        Self { http, base_url }
    }

    pub async fn complete(
        &self,
        _request: &ChatRequest,
        _model: &str,
        _call: &Call<'_>,
    ) -> Result<Completion, ProviderError> {
        Err(ProviderError::new(
            PROVIDER_TYPE,
            ErrorClass::InvalidRequest,
            "the gemini adapter is not available yet",
        ))
    }
}
