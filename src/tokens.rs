//! Token counting with a real tokenizer (`o200k_base`, embedded, works offline).

use crate::messages::ChatRequest;

/// Tokens in `text`, counted the way current OpenAI models count them.
pub fn count(text: &str) -> usize {
    tiktoken_rs::o200k_base_singleton().count_ordinary(text)
}

/// Prompt tokens of a chat request: message text plus OpenAI's per-message framing
/// (3 tokens per message and 3 to prime the reply).
pub fn count_prompt(request: &ChatRequest) -> usize {
    request
        .all_text()
        .map(|text| count(&text) + 3)
        .sum::<usize>()
        + 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_real_tokenizer_counts_not_character_guesses() {
        assert_eq!(count(""), 0);
        assert_eq!(count("hello world"), 2);
        assert!(count("internationalization") < "internationalization".len() / 2);
    }
}
