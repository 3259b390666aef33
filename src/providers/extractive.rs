//! The built-in `extractive` model: an offline, zero-cost summarizer that needs no key. It is
//! the default route's target, so Switchyard works out of the box with no provider configured.

use serde_json::json;
use uuid::Uuid;

use super::{Completion, ErrorClass, ProviderError};
use crate::messages::{ChatRequest, Usage};
use crate::{summarizer, tokens};

/// Wire-format name used in errors and attempts.
pub const PROVIDER_TYPE: &str = "extractive";

/// Summary length when the request sets no output cap.
const DEFAULT_MAX_TOKENS: u32 = 256;

/// Summarizes the last user message by sentence scoring.
#[derive(Debug, Clone, Copy)]
pub struct ExtractiveProvider;

impl ExtractiveProvider {
    /// Answers with an extractive summary and real token counts.
    pub fn complete(
        &self,
        request: &ChatRequest,
        model: &str,
    ) -> Result<Completion, ProviderError> {
        let document = request.last_user_text();
        if document.trim().is_empty() {
            return Err(ProviderError::new(
                PROVIDER_TYPE,
                ErrorClass::InvalidRequest,
                "the request has no user text to summarize",
            ));
        }
        let max_tokens = request.output_cap().unwrap_or(DEFAULT_MAX_TOKENS) as usize;
        let summary = summarizer::summarize(&document, max_tokens, &tokens::count);
        let usage = Usage {
            input_tokens: tokens::count_prompt(request) as u64,
            output_tokens: tokens::count(&summary) as u64,
            ..Usage::default()
        };
        let response = json!({
            "id": format!("chatcmpl-{}", Uuid::now_v7().simple()),
            "object": "chat.completion",
            "created": chrono::Utc::now().timestamp(),
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": summary, "refusal": null},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": {
                "prompt_tokens": usage.input_tokens,
                "completion_tokens": usage.output_tokens,
                "total_tokens": usage.input_tokens + usage.output_tokens
            }
        });
        Ok(Completion { response, usage })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::ChatMessage;

    fn request(text: &str) -> ChatRequest {
        ChatRequest {
            messages: vec![
                ChatMessage::text_message("system", "Summarize the document."),
                ChatMessage::text_message("user", text),
            ],
            ..ChatRequest::default()
        }
    }

    #[test]
    fn answers_with_a_shorter_summary_and_honest_token_counts() {
        let text = "Rivers carry sediment to the sea. The sediment builds deltas over centuries. \
                    Deltas host rich farmland and large cities. Engineers now dam many rivers. \
                    Dams trap sediment, so deltas shrink. Shrinking deltas expose cities to floods. \
                    Some countries now release sediment through dams on purpose.";
        let completion = ExtractiveProvider
            .complete(&request(text), "extractive-v1")
            .unwrap();
        let summary = completion.response["choices"][0]["message"]["content"]
            .as_str()
            .unwrap();
        assert!(!summary.is_empty() && summary.len() < text.len());
        assert!(text.contains(summary.split(". ").next().unwrap()));
        assert_eq!(
            completion.usage.output_tokens,
            tokens::count(summary) as u64
        );
        assert_eq!(
            completion.usage.input_tokens,
            tokens::count_prompt(&request(text)) as u64
        );
        assert_eq!(
            completion.response["usage"]["prompt_tokens"],
            completion.usage.input_tokens
        );
    }

    #[test]
    fn a_request_without_user_text_is_an_invalid_request() {
        let err = ExtractiveProvider
            .complete(&request("   "), "extractive-v1")
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidRequest);
    }
}
