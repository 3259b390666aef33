//! The built-in `extractive` model: an offline, zero-cost summarizer that needs no key. It is
//! the default route's target, so Switchyard works out of the box with no provider configured.

use uuid::Uuid;

use super::{Call, Completion, ErrorClass, ProviderError, chat_completion, finish};
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
        call: &Call<'_>,
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
        if let Some(on_delta) = call.on_delta {
            // A "stream" of one chunk per sentence, so streaming jobs work offline too.
            for (index, sentence) in summarizer::split_sentences(&summary)
                .into_iter()
                .enumerate()
            {
                on_delta(&if index == 0 {
                    sentence.to_owned()
                } else {
                    format!(" {sentence}")
                });
            }
        }
        let response = chat_completion(
            &format!("chatcmpl-{}", Uuid::now_v7().simple()),
            model,
            Some(&summary),
            None,
            finish::STOP,
            Some("stop"),
            &usage,
        );
        Ok(Completion { response, usage })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::ChatMessage;

    fn no_call() -> Call<'static> {
        Call {
            key: None,
            timeout: std::time::Duration::from_secs(1),
            idle_timeout: std::time::Duration::from_secs(1),
            on_delta: None,
        }
    }

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
            .complete(&request(text), "extractive-v1", &no_call())
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
            .complete(&request("   "), "extractive-v1", &no_call())
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidRequest);
    }
}
