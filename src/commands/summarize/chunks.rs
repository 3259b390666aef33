//! Splitting a document that does not fit a model's context window into pieces of at most
//! `max_tokens` tokens, on paragraph boundaries where possible, then on sentence boundaries,
//! and only for a single sentence longer than a piece, between words (and a single word longer
//! than a piece, between characters).

use crate::summarizer::split_sentences;
use crate::tokens;

/// One unit that is never split further (unless it alone is too big) and what joins it to
/// the previous unit.
struct Unit<'a> {
    text: &'a str,
    tokens: usize,
    paragraph_start: bool,
    /// A cut of a word longer than a piece: a piece by itself, so that no space is put
    /// inside the word and the cut's byte bound holds.
    alone: bool,
}

/// Splits `text` into pieces of at most `max_tokens` tokens (counted with the tokenizer),
/// keeping whole paragraphs together where they fit and whole sentences otherwise.
pub fn split(text: &str, max_tokens: usize) -> Vec<String> {
    let max_tokens = max_tokens.max(1);
    let mut units: Vec<Unit<'_>> = Vec::new();
    for paragraph in text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
        let tokens = tokens::count(paragraph);
        if tokens <= max_tokens {
            units.push(Unit {
                text: paragraph,
                tokens,
                paragraph_start: true,
                alone: false,
            });
            continue;
        }
        let mut first = true;
        for sentence in split_sentences(paragraph) {
            let sentence = sentence.trim();
            if sentence.is_empty() {
                continue;
            }
            let tokens = tokens::count(sentence);
            if tokens <= max_tokens {
                units.push(Unit {
                    text: sentence,
                    tokens,
                    paragraph_start: first,
                    alone: false,
                });
            } else {
                for (piece, alone) in split_words(sentence, max_tokens) {
                    units.push(Unit {
                        text: piece,
                        tokens: tokens::count(piece),
                        paragraph_start: first,
                        alone,
                    });
                    first = false;
                }
            }
            first = false;
        }
    }
    let mut pieces = Vec::new();
    let mut current = String::new();
    let mut current_tokens = 0;
    for unit in units {
        // A joiner costs about one token; count it so pieces stay within the limit.
        let joined = current_tokens + usize::from(!current.is_empty()) + unit.tokens;
        if !current.is_empty() && (joined > max_tokens || unit.alone) {
            pieces.push(std::mem::take(&mut current));
            current_tokens = 0;
        }
        if unit.alone {
            pieces.push(unit.text.to_owned());
            continue;
        }
        if !current.is_empty() {
            current.push_str(if unit.paragraph_start { "\n\n" } else { " " });
            current_tokens += 1;
        }
        current.push_str(unit.text);
        current_tokens += unit.tokens;
    }
    if !current.is_empty() {
        pieces.push(current);
    }
    pieces
}

/// Cuts one over-long sentence between words into runs of at most `max_tokens` tokens (a word
/// longer than that, between characters).
/// Each run says whether it is a cut of one word (`true`), to be a piece by itself.
fn split_words(sentence: &str, max_tokens: usize) -> Vec<(&str, bool)> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut end = 0;
    let mut tokens_so_far = 0;
    for (offset, word) in sentence
        .split_inclusive(char::is_whitespace)
        .scan(0, |at, word| {
            let offset = *at;
            *at += word.len();
            Some((offset, word))
        })
    {
        let tokens = tokens::count(word);
        if tokens > max_tokens {
            // A word longer than a piece (a URL, inline base64, a minified line) is cut
            // between characters, after the run before it.
            if end > start {
                pieces.push((sentence[start..end].trim(), false));
            }
            pieces.extend(
                split_chars(word.trim(), max_tokens)
                    .into_iter()
                    .map(|cut| (cut, true)),
            );
            start = offset + word.len();
            end = start;
            tokens_so_far = 0;
            continue;
        }
        if end > start && tokens_so_far + tokens > max_tokens {
            pieces.push((sentence[start..end].trim(), false));
            start = offset;
            tokens_so_far = 0;
        }
        end = offset + word.len();
        tokens_so_far += tokens;
    }
    if end > start {
        pieces.push((sentence[start..end].trim(), false));
    }
    pieces.retain(|(p, _)| !p.is_empty());
    pieces
}

/// Most bytes per token of a piece cut from an over-long word. Most tokens are a few bytes,
/// so this rarely binds, and it bounds what each cut reads; but a run of one character (`=`,
/// `─`) can be 64 or more bytes per token, and such a piece must still fit in a message,
/// whose piece size allows 16 bytes per token (`Plan::piece_tokens`).
const MAX_BYTES_PER_TOKEN: usize = 16;

/// Cuts one word of more than `max_tokens` tokens between characters into the longest
/// prefixes of at most `max_tokens` tokens (at least one character each).
fn split_chars(word: &str, max_tokens: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = word;
    // As far as one piece may reach (at least 16 bytes: never less than a character).
    let reach = max_tokens.saturating_mul(MAX_BYTES_PER_TOKEN);
    while !rest.is_empty() {
        // Byte ends of the first 1, 2, … characters, within reach.
        let ends: Vec<usize> = rest
            .char_indices()
            .map(|(at, c)| at + c.len_utf8())
            .take_while(|end| *end <= reach)
            .collect();
        // The most characters whose text is within `max_tokens` (the first one always goes).
        let (mut low, mut high) = (0, ends.len() - 1);
        while low < high {
            let middle = (low + high).div_ceil(2);
            if tokens::count(&rest[..ends[middle]]) <= max_tokens {
                low = middle;
            } else {
                high = middle - 1;
            }
        }
        pieces.push(&rest[..ends[low]]);
        rest = &rest[ends[low]..];
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paragraph(n: usize, sentences: usize) -> String {
        (0..sentences)
            .map(|i| {
                format!("Paragraph {n} says thing number {i} about the harbour and its cranes.")
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn a_short_text_is_one_piece() {
        assert_eq!(
            split("One. Two.\n\nThree.", 100),
            vec!["One. Two.\n\nThree."]
        );
    }

    #[test]
    fn pieces_fit_and_keep_every_word_in_order() {
        let text = (0..40)
            .map(|n| paragraph(n, 1 + n % 7))
            .collect::<Vec<_>>()
            .join("\n\n");
        for max in [20, 64, 300] {
            let pieces = split(&text, max);
            assert!(pieces.len() > 1);
            for piece in &pieces {
                assert!(
                    tokens::count(piece) <= max,
                    "{} > {max}: {piece}",
                    tokens::count(piece)
                );
            }
            let words: Vec<&str> = text.split_whitespace().collect();
            let rejoined = pieces.join(" ");
            let back: Vec<&str> = rejoined.split_whitespace().collect();
            assert_eq!(back, words);
        }
    }

    #[test]
    fn paragraphs_are_not_split_when_they_fit() {
        let a = paragraph(1, 3);
        let b = paragraph(2, 3);
        let max = tokens::count(&a).max(tokens::count(&b)) + 1;
        let pieces = split(&format!("{a}\n\n{b}"), max);
        assert_eq!(pieces, vec![a, b]);
    }

    #[test]
    fn a_giant_sentence_is_cut_between_words() {
        let sentence = "word ".repeat(1000);
        let pieces = split(&sentence, 50);
        assert!(pieces.len() >= 20);
        assert!(
            pieces
                .iter()
                .all(|p| tokens::count(p) <= 50 && !p.starts_with(' '))
        );
        assert_eq!(pieces.join(" ").split_whitespace().count(), 1000);
    }

    /// A word longer than a piece (inline base64, a minified line) is cut between characters:
    /// no piece is larger than asked, and no character is lost or reordered.
    #[test]
    fn a_word_longer_than_a_piece_is_cut_between_characters() {
        let blob: String = (0..20_000)
            .map(|i| char::from(b"Zq9+/xK3ab"[i % 10]))
            .collect();
        let text = format!("Intro. Before {blob} after the blob. End.");
        let pieces = split(&text, 100);
        assert!(pieces.len() >= 20, "{}", pieces.len());
        for piece in &pieces {
            assert!(
                tokens::count(piece) <= 100,
                "{} tokens",
                tokens::count(piece)
            );
        }
        let joined: String = pieces.concat().split_whitespace().collect();
        let expected: String = text.split_whitespace().collect();
        assert_eq!(joined, expected);
        // Characters of several bytes are never cut inside, and a cut from a run of one
        // (many bytes to a token) is at most 16 bytes per token of the piece size.
        for wide in ["é€😀".repeat(3_000), "─".repeat(20_000)] {
            let pieces = split(&wide, 50);
            assert!(
                pieces
                    .iter()
                    .all(|p| tokens::count(p) <= 50 && p.len() <= 800)
            );
            assert_eq!(pieces.concat(), wide);
        }
    }
}
