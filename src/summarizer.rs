//! Sentence-scoring extractive summarizer behind the built-in `extractive` model.
//!
//! This is the zero-cost default "model": it runs offline, needs no API key and is fully
//! deterministic. The pipeline is:
//!
//! 1. **Markdown clean-up.** Fenced code blocks, tables, rules, HTML tags and link definitions
//!    are dropped; headings are set aside (their words boost sentence scores but they never
//!    become summary sentences); bullet, quote and emphasis markers and inline-code backticks
//!    are stripped; `[text](url)` becomes `text` and images disappear. Every list item becomes
//!    its own paragraph and whitespace is collapsed.
//! 2. **Sentence splitting** on `.`, `!`, `?` (and full-width CJK terminators) and on paragraph
//!    breaks, without splitting on common abbreviations, initials, dotted acronyms or decimals.
//! 3. **Scoring.** Content words (lowercased, stopwords removed, light suffix stemming) are
//!    weighted by their document frequency relative to the most frequent term, plus a bonus for
//!    terms that occur in headings. A sentence scores the sum of its distinct term weights
//!    divided by the square root of its word count, with a bonus for the document's first
//!    sentence and for paragraph openers, and penalties for very short and very long sentences,
//!    and (mildly) for list items, fragments without terminal punctuation and colon lead-ins.
//! 4. **Selection.** Sentences are taken best-first (ties broken by position) while the joined
//!    summary still fits the token budget, skipping any sentence that repeats a chosen one (same
//!    text, or a Jaccard overlap of content terms of at least 0.6), up to
//!    `max(3, ceil(20% of sentences))` sentences and never more than 12. They are emitted in
//!    document order, joined by single spaces; a fragment without terminal punctuation (a list
//!    item, an unpunctuated paragraph) gets a `.` (or `。`) appended so that it does not run into
//!    the next sentence. If no whole sentence fits, the best sentence is cut on a word boundary
//!    to fit and returned as cut.
//!
//! Everything is linear in the input size apart from sorting the sentences, and no input can
//! make it panic: all slicing happens on character boundaries found by iteration.

use std::collections::{HashMap, HashSet};

/// A summary never holds more sentences than this.
const MAX_SUMMARY_SENTENCES: usize = 12;
/// A summary may always hold this many sentences, even for short documents.
const MIN_SUMMARY_SENTENCES: usize = 3;
/// Once one sentence is chosen, give up after this many candidates that do not fit the budget.
const MAX_REJECTED_CANDIDATES: usize = 16;
/// Sentences with fewer words than this are penalised.
const SHORT_SENTENCE_WORDS: usize = 5;
/// Sentences with more words than this are penalised.
const LONG_SENTENCE_WORDS: usize = 40;
/// Score multiplier for fragments without terminal punctuation (list items, captions, table of
/// contents entries).
const FRAGMENT_FACTOR: f64 = 0.7;
/// Score multiplier for sentences ending in a colon, which introduce a list or code rather than
/// say something by themselves.
const LEAD_IN_FACTOR: f64 = 0.5;
/// Score multiplier for the first sentence of the document.
const DOCUMENT_START_BONUS: f64 = 1.3;
/// Score multiplier for the first sentence of every other (non-list) paragraph.
const PARAGRAPH_START_BONUS: f64 = 1.1;
/// Score multiplier for list items, which are often fragments rather than full sentences.
const LIST_ITEM_FACTOR: f64 = 0.8;
/// A candidate whose content terms overlap a chosen sentence's this much (Jaccard index) is
/// redundant and skipped.
const REDUNDANCY_THRESHOLD: f64 = 0.6;
/// Added to the weight of a term that also occurs in a heading.
const HEADING_TERM_BONUS: f64 = 0.25;
/// `<...>` spans longer than this are not treated as HTML tags or autolinks.
const MAX_HTML_TAG_BYTES: usize = 200;

/// Abbreviations after which a period never ends a sentence.
const NEVER_SPLIT_ABBREVIATIONS: &[&str] = &[
    "approx", "capt", "cf", "ch", "col", "dr", "e.g", "eq", "eqs", "fig", "figs", "gen", "gov",
    "hon", "i.e", "lt", "mr", "mrs", "ms", "mt", "prof", "rep", "rev", "sen", "sgt", "sr", "jr",
    "st", "viz", "vol", "vs",
];

/// Abbreviations that end a sentence only when the next word starts with a capital letter.
const CAPITAL_SPLIT_ABBREVIATIONS: &[&str] = &[
    "a.m", "al", "apr", "aug", "co", "corp", "dec", "dept", "est", "etc", "feb", "inc", "jan",
    "jul", "jun", "llc", "ltd", "mar", "max", "min", "no", "nos", "nov", "oct", "p.m", "ph.d",
    "sep", "sept",
];

/// Words that usually start a sentence; after an initial or a dotted acronym such as `U.S.`
/// they signal that the period did end the sentence.
const SENTENCE_STARTERS: &[&str] = &[
    "a", "after", "also", "an", "and", "as", "at", "before", "but", "for", "he", "her", "his",
    "however", "i", "if", "in", "it", "its", "many", "most", "my", "on", "our", "she", "so",
    "some", "that", "the", "their", "then", "there", "these", "they", "this", "those", "we",
    "what", "when", "while", "you",
];

/// Built-in English stopwords, separated by whitespace; they never count as content words.
const STOPWORDS: &str = "\
    a about above across after again against all almost also although always am among an and \
    another any anyone anything are aren around as at back be became because become been before \
    being below between both but by can cannot could couldn did didn do does doesn doing don \
    done down during each either else enough etc even ever every few first for from further get \
    gets getting got had hadn has hasn have haven having he her here hers herself him himself \
    his how however i if in into is isn it its itself just least less let like ll made make \
    makes many may me might mine more most much must mustn my myself neither never no nor not \
    now of off often on once one only onto or other others otherwise our ours ourselves out over \
    own per perhaps quite rather re really said same say says see seen several shall she should \
    shouldn since so some something still such than that the their theirs them themselves then \
    there therefore these they thing things this those though through thus to too toward towards \
    under until up upon us use used using ve very via was wasn way we well were weren what \
    whatever when where whether which while who whom whose why will with within without won \
    would wouldn yet you your yours yourself yourselves";

/// CJK particles that never count as content words.
const CJK_STOPWORDS: &[&str] = &[
    "的", "了", "是", "在", "和", "也", "就", "都", "与", "及", "而", "或",
];

/// Splits `text` into sentences, scores them, and returns the best ones in their original order,
/// joined by a single space, such that `count_tokens(result) <= max_tokens` whenever at least one
/// sentence fits; if no whole sentence fits, returns the highest-scoring sentence truncated on a word boundary to fit.
/// Returns an empty string for text with no words.
///
/// `text` may be plain text or Markdown (see the module documentation for the clean-up rules).
/// Chosen fragments that lack terminal punctuation get a `.` (or `。`) appended before joining.
/// A document whose only words are in headings is summarized from its headings. Returns an empty
/// string when `max_tokens` is zero. `count_tokens` is assumed to be monotonic in the text length
/// (a prefix never has more tokens than the whole); with any counter the result never exceeds
/// the budget, it may just be shorter than necessary.
#[must_use]
pub fn summarize(text: &str, max_tokens: usize, count_tokens: &dyn Fn(&str) -> usize) -> String {
    if max_tokens == 0 {
        return String::new();
    }
    let Cleaned {
        paragraphs,
        headings,
    } = clean_markdown(text);
    let paragraphs = if paragraphs.iter().any(|p| has_word(&p.text)) {
        paragraphs
    } else {
        headings
            .iter()
            .map(|heading| Paragraph {
                text: heading.clone(),
                list_item: true,
            })
            .collect()
    };

    let stopwords: HashSet<&str> = STOPWORDS
        .split_whitespace()
        .chain(CJK_STOPWORDS.iter().copied())
        .collect();
    let mut sentences = collect_sentences(&paragraphs, &stopwords);
    // A sentence that merely repeats a heading (a table-of-contents entry, say) is a heading.
    let heading_keys: HashSet<String> = headings.iter().map(|h| heading_key(h)).collect();
    if sentences
        .iter()
        .any(|sentence| !heading_keys.contains(&heading_key(sentence.text)))
    {
        sentences.retain(|sentence| !heading_keys.contains(&heading_key(sentence.text)));
    }
    if sentences.is_empty() {
        return String::new();
    }
    let heading_terms: HashSet<String> = headings
        .iter()
        .flat_map(|heading| analyze(heading, &stopwords).1)
        .collect();

    let mut ranked: Vec<(usize, f64)> = score_sentences(&sentences, &heading_terms)
        .into_iter()
        .enumerate()
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let order: Vec<usize> = ranked.into_iter().map(|(index, _)| index).collect();

    let limit = MIN_SUMMARY_SENTENCES
        .max(sentences.len().div_ceil(5))
        .min(MAX_SUMMARY_SENTENCES);
    if let Some(summary) = select(&sentences, &order, limit, max_tokens, count_tokens) {
        return summary;
    }
    order
        .first()
        .and_then(|&best| sentences.get(best))
        .map(|best| truncate_to_fit(best.text, max_tokens, count_tokens))
        .unwrap_or_default()
}

/// Splits plain `text` into trimmed sentence slices.
///
/// Sentences end at `.`, `!` or `?` (together with any run of further terminators and closing
/// quotes or brackets) followed by whitespace or the end of the text, at full-width CJK
/// terminators (`。！？`), and at blank lines. A period does not end a sentence after common
/// abbreviations (`e.g.`, `i.e.`, `Mr.`, `Dr.`, `etc.` before a lowercase word, ...), after
/// initials (`J. R. R. Tolkien`), after dotted acronyms (`U.S.`) unless a typical
/// sentence-starting word follows, after a leading list number (`1.`), or inside a number
/// (`3.5`). No Markdown processing happens here; [`summarize`] cleans Markdown first.
#[must_use]
pub fn split_sentences(text: &str) -> Vec<&str> {
    sentence_spans(text)
        .into_iter()
        .filter_map(|span| text.get(span.start..span.end))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Sentence splitting
// ---------------------------------------------------------------------------------------------

/// A trimmed sentence as a byte range of the text it was split from.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
    /// Whether this is the first sentence of its paragraph.
    paragraph_start: bool,
}

/// Sentence boundaries of `text`; see [`split_sentences`] for the rules.
fn sentence_spans(text: &str) -> Vec<Span> {
    let mut spans = Vec::new();
    let mut segment_start = 0;
    let mut first_visible: Option<usize> = None;
    let mut paragraph_start = true;
    let mut chars = text.char_indices().peekable();

    while let Some((i, c)) = chars.next() {
        if first_visible.is_none() && !c.is_whitespace() {
            first_visible = Some(i);
        }
        let boundary = match c {
            '.' | '!' | '?' => {
                let mut end = i + c.len_utf8();
                let mut only_periods = c == '.';
                let mut terminators = 1_usize;
                while let Some(&(j, d)) = chars.peek() {
                    if matches!(d, '.' | '!' | '?') {
                        only_periods &= d == '.';
                        terminators += 1;
                    } else if !is_closing_punctuation(d) {
                        break;
                    }
                    end = j + d.len_utf8();
                    chars.next();
                }
                let at_break = chars.peek().is_none_or(|&(_, d)| d.is_whitespace());
                let ends = at_break
                    && (!only_periods
                        || period_ends_sentence(
                            text,
                            segment_start,
                            first_visible,
                            i,
                            terminators,
                            end,
                        ));
                ends.then_some(end)
            }
            '。' | '！' | '？' | '｡' => {
                let mut end = i + c.len_utf8();
                while let Some(&(j, d)) = chars.peek() {
                    if !(matches!(d, '。' | '！' | '？' | '｡' | '!' | '?')
                        || is_closing_punctuation(d))
                    {
                        break;
                    }
                    end = j + d.len_utf8();
                    chars.next();
                }
                Some(end)
            }
            '\n' if starts_blank_line(text, i + 1) => {
                push_span(&mut spans, text, segment_start, i, paragraph_start);
                segment_start = i + 1;
                first_visible = None;
                paragraph_start = true;
                continue;
            }
            _ => None,
        };
        if let Some(end) = boundary {
            if push_span(&mut spans, text, segment_start, end, paragraph_start) {
                paragraph_start = false;
            }
            segment_start = end;
            first_visible = None;
        }
    }
    push_span(&mut spans, text, segment_start, text.len(), paragraph_start);
    spans
}

/// Pushes the trimmed `text[start..end]` unless it is empty; returns whether it pushed.
fn push_span(
    spans: &mut Vec<Span>,
    text: &str,
    start: usize,
    end: usize,
    paragraph_start: bool,
) -> bool {
    let Some(raw) = text.get(start..end) else {
        return false;
    };
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return false;
    }
    let lead = raw.len() - raw.trim_start().len();
    spans.push(Span {
        start: start + lead,
        end: start + lead + trimmed.len(),
        paragraph_start,
    });
    true
}

/// Whether the line starting at byte `from` is blank (only whitespace up to the next newline).
fn starts_blank_line(text: &str, from: usize) -> bool {
    let Some(rest) = text.get(from..) else {
        return false;
    };
    for c in rest.chars() {
        if c == '\n' {
            return true;
        }
        if !c.is_whitespace() {
            return false;
        }
    }
    false
}

/// Characters that may trail a sentence terminator and still belong to the sentence.
fn is_closing_punctuation(c: char) -> bool {
    matches!(
        c,
        '"' | '\'' | ')' | ']' | '}' | '”' | '’' | '»' | '」' | '』' | '）' | '*' | '_' | '`'
    )
}

/// Decides whether a run of `terminators` periods starting at byte `dot` (and ending, closing
/// punctuation included, at byte `end`) ends the sentence that started at `segment_start`.
fn period_ends_sentence(
    text: &str,
    segment_start: usize,
    first_visible: Option<usize>,
    dot: usize,
    terminators: usize,
    end: usize,
) -> bool {
    let following = text.get(end..).map(str::trim_start).unwrap_or_default();
    let Some(next_char) = following.chars().next() else {
        return true;
    };
    if terminators > 1 {
        // An ellipsis ends the sentence unless the text carries on in lowercase.
        return !next_char.is_lowercase();
    }
    let segment = text.get(segment_start..dot).unwrap_or_default();
    let raw_word = segment
        .rsplit(char::is_whitespace)
        .next()
        .unwrap_or_default();
    let word_start = dot - raw_word.len();
    let word = raw_word.trim_start_matches(|c: char| !c.is_alphanumeric());
    if word.is_empty() {
        return true;
    }
    let lower = word.to_lowercase();
    if NEVER_SPLIT_ABBREVIATIONS.contains(&lower.as_str()) {
        return false;
    }
    if CAPITAL_SPLIT_ABBREVIATIONS.contains(&lower.as_str()) {
        return next_char.is_uppercase();
    }
    let mut letters = word.chars();
    let is_initial =
        matches!((letters.next(), letters.next()), (Some(c), None) if c.is_uppercase() && c != 'I');
    let is_dotted_acronym = word.contains('.')
        && word.split('.').all(|part| {
            let mut chars = part.chars();
            matches!((chars.next(), chars.next()), (Some(c), None) if c.is_alphabetic())
        });
    if is_initial || is_dotted_acronym {
        let next_word: String = following
            .chars()
            .take_while(|c| c.is_alphabetic())
            .take(16)
            .flat_map(char::to_lowercase)
            .collect();
        return SENTENCE_STARTERS.contains(&next_word.as_str());
    }
    let is_list_number = word.len() <= 3
        && word.bytes().all(|b| b.is_ascii_digit())
        && first_visible == Some(word_start);
    !is_list_number
}

// ---------------------------------------------------------------------------------------------
// Markdown clean-up
// ---------------------------------------------------------------------------------------------

/// A cleaned paragraph: plain text with collapsed whitespace.
#[derive(Debug, Clone)]
struct Paragraph {
    text: String,
    /// List items get no paragraph-start bonus.
    list_item: bool,
}

/// The result of [`clean_markdown`].
#[derive(Debug, Default)]
struct Cleaned {
    paragraphs: Vec<Paragraph>,
    headings: Vec<String>,
}

/// Lines of the paragraph being assembled.
#[derive(Debug, Default)]
struct ParagraphBuilder {
    lines: Vec<String>,
    list_item: bool,
}

impl ParagraphBuilder {
    /// Ends the current paragraph, if any, and starts a fresh one.
    fn flush(&mut self, out: &mut Vec<Paragraph>) {
        if !self.lines.is_empty() {
            let text = normalize_whitespace(&self.lines.join(" "));
            if !text.is_empty() {
                out.push(Paragraph {
                    text,
                    list_item: self.list_item,
                });
            }
            self.lines.clear();
        }
        self.list_item = false;
    }
}

/// Turns Markdown (or plain text) into cleaned paragraphs and heading texts.
fn clean_markdown(text: &str) -> Cleaned {
    let lines: Vec<&str> = text.lines().collect();
    // An opening fence only counts when a closing fence follows; otherwise a stray fence line
    // would swallow the rest of the document.
    let mut last_backtick_close = None;
    let mut last_tilde_close = None;
    for (index, line) in lines.iter().enumerate() {
        let trimmed = line.trim();
        if is_fence_close(trimmed, '`') {
            last_backtick_close = Some(index);
        } else if is_fence_close(trimmed, '~') {
            last_tilde_close = Some(index);
        }
    }

    let mut cleaned = Cleaned::default();
    let mut paragraph = ParagraphBuilder::default();
    let mut open_fence: Option<char> = None;
    for (index, line) in lines.iter().enumerate() {
        let trimmed = line.trim();
        if let Some(marker) = open_fence {
            if is_fence_close(trimmed, marker) {
                open_fence = None;
            }
            continue;
        }
        if let Some(marker) = fence_opening(trimmed) {
            paragraph.flush(&mut cleaned.paragraphs);
            let last_close = if marker == '`' {
                last_backtick_close
            } else {
                last_tilde_close
            };
            if last_close.is_some_and(|last| last > index) {
                open_fence = Some(marker);
            }
            continue;
        }
        clean_line(trimmed, &mut paragraph, &mut cleaned);
    }
    paragraph.flush(&mut cleaned.paragraphs);
    cleaned
}

/// Handles one trimmed line outside code fences.
fn clean_line(line: &str, paragraph: &mut ParagraphBuilder, cleaned: &mut Cleaned) {
    let mut line = line;
    while let Some(rest) = line.strip_prefix('>') {
        line = rest.trim_start();
    }
    if line.is_empty() || line.starts_with("<!--") {
        paragraph.flush(&mut cleaned.paragraphs);
        return;
    }
    if let Some(heading) = atx_heading(line) {
        paragraph.flush(&mut cleaned.paragraphs);
        push_heading(&mut cleaned.headings, &clean_inline(heading));
        return;
    }
    if is_setext_underline(line) && !paragraph.lines.is_empty() {
        let heading = paragraph.lines.join(" ");
        paragraph.lines.clear();
        paragraph.flush(&mut cleaned.paragraphs);
        push_heading(&mut cleaned.headings, &heading);
        return;
    }
    if is_thematic_break(line) || line.starts_with('|') || is_link_definition(line) {
        paragraph.flush(&mut cleaned.paragraphs);
        return;
    }
    if let Some(item) = strip_list_marker(line) {
        paragraph.flush(&mut cleaned.paragraphs);
        paragraph.list_item = true;
        line = strip_task_box(item);
    }
    let inline = clean_inline(line);
    if !inline.trim().is_empty() {
        paragraph.lines.push(inline);
    }
}

/// Records a heading, if it has any text.
fn push_heading(headings: &mut Vec<String>, heading: &str) {
    let heading = normalize_whitespace(heading);
    if !heading.is_empty() {
        headings.push(heading);
    }
}

/// The fence character if `line` opens a fenced code block.
fn fence_opening(line: &str) -> Option<char> {
    if line.starts_with("```") {
        Some('`')
    } else if line.starts_with("~~~") {
        Some('~')
    } else {
        None
    }
}

/// Whether `line` closes a fence of `marker` characters (three or more, nothing else).
fn is_fence_close(line: &str, marker: char) -> bool {
    line.len() >= 3 && line.chars().all(|c| c == marker)
}

/// The text of an ATX heading (`# Title`, `## Title ##`), if `line` is one.
fn atx_heading(line: &str) -> Option<&str> {
    let rest = line.trim_start_matches('#');
    let level = line.len() - rest.len();
    if !(1..=6).contains(&level) || !(rest.is_empty() || rest.starts_with(char::is_whitespace)) {
        return None;
    }
    Some(rest.trim().trim_end_matches('#').trim_end())
}

/// Whether `line` underlines a setext heading (`===` or `---`).
fn is_setext_underline(line: &str) -> bool {
    (line.len() >= 2 && line.chars().all(|c| c == '='))
        || (line.len() >= 3 && line.chars().all(|c| c == '-'))
}

/// Whether `line` is a thematic break such as `---`, `***`, `_ _ _`.
fn is_thematic_break(line: &str) -> bool {
    let mut marks = line.chars().filter(|c| !c.is_whitespace());
    let Some(first) = marks.next() else {
        return false;
    };
    let mut count = 1;
    for c in marks {
        if c != first {
            return false;
        }
        count += 1;
    }
    matches!(first, '-' | '*' | '_') && count >= 3
}

/// Whether `line` is a link reference definition such as `[docs]: https://example.com`.
fn is_link_definition(line: &str) -> bool {
    if !line.starts_with('[') {
        return false;
    }
    let Some(colon) = line.find("]:") else {
        return false;
    };
    let target = line
        .get(colon + 2..)
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or_default();
    target.starts_with('<') || target.starts_with('#') || target.contains(['/', '.'])
}

/// The item text if `line` starts with a bullet (`-`, `*`, `+`) or ordered-list marker.
fn strip_list_marker(line: &str) -> Option<&str> {
    if let Some(rest) = line.strip_prefix(['-', '*', '+']) {
        return rest
            .starts_with(char::is_whitespace)
            .then(|| rest.trim_start());
    }
    let digits = line.bytes().take_while(u8::is_ascii_digit).count();
    if !(1..=9).contains(&digits) {
        return None;
    }
    let rest = line.get(digits..)?.strip_prefix(['.', ')'])?;
    rest.starts_with(char::is_whitespace)
        .then(|| rest.trim_start())
}

/// Removes a task-list checkbox (`[ ]`, `[x]`) from the start of a list item.
fn strip_task_box(item: &str) -> &str {
    ["[ ]", "[x]", "[X]"]
        .iter()
        .find_map(|checkbox| item.strip_prefix(checkbox))
        .map_or(item, str::trim_start)
}

/// Bracket text nested deeper than this is copied without further inline clean-up, which keeps
/// the work linear on pathological input such as thousands of nested brackets.
const MAX_INLINE_DEPTH: usize = 4;

/// Positions that inline parsing looks ahead for, gathered in one pass over a line so that every
/// look-up is a binary search instead of a scan.
#[derive(Debug, Default)]
struct InlineIndex {
    /// `(open, close)` byte positions of matching square brackets, sorted by `open`.
    brackets: Vec<(usize, usize)>,
    /// Byte positions of `)`.
    parens: Vec<usize>,
    /// Byte positions of `>`.
    angles: Vec<usize>,
    /// Byte positions of `` ` ``.
    backticks: Vec<usize>,
}

impl InlineIndex {
    fn new(line: &str) -> Self {
        let mut index = Self::default();
        let mut open = Vec::new();
        let bytes = line.as_bytes();
        let mut i = 0;
        while let Some(&byte) = bytes.get(i) {
            match byte {
                // Skip the escaped byte; a skipped UTF-8 lead byte is harmless because only ASCII
                // bytes are of interest and continuation bytes are never ASCII.
                b'\\' => i += 1,
                b'[' => open.push(i),
                b']' => {
                    if let Some(start) = open.pop() {
                        index.brackets.push((start, i));
                    }
                }
                b')' => index.parens.push(i),
                b'>' => index.angles.push(i),
                b'`' => index.backticks.push(i),
                _ => {}
            }
            i += 1;
        }
        index.brackets.sort_unstable();
        index
    }

    /// The `]` matching the `[` at byte `open`.
    fn bracket_close(&self, open: usize) -> Option<usize> {
        let found = self
            .brackets
            .binary_search_by_key(&open, |&(start, _)| start);
        found
            .ok()
            .and_then(|k| self.brackets.get(k))
            .map(|&(_, close)| close)
    }

    /// The first of the ascending `positions` at or after `from`.
    fn next(positions: &[usize], from: usize) -> Option<usize> {
        positions
            .get(positions.partition_point(|&position| position < from))
            .copied()
    }
}

/// Strips inline Markdown from one line: links and shortcut references keep their text, images,
/// footnote references, HTML tags, emphasis markers and inline-code backticks disappear, and
/// backslash escapes resolve.
fn clean_inline(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    clean_inline_into(line, 0, &mut out);
    out
}

/// [`clean_inline`] appending to `out`; `depth` counts the enclosing brackets.
fn clean_inline_into(line: &str, depth: usize, out: &mut String) {
    let index = InlineIndex::new(line);
    let mut i = 0;
    while let Some(c) = line.get(i..).and_then(|rest| rest.chars().next()) {
        let after = i + c.len_utf8();
        let next = line.get(after..).and_then(|rest| rest.chars().next());
        let prev = line.get(..i).and_then(|before| before.chars().next_back());
        match c {
            '\\' if next.is_some_and(|n| n.is_ascii_punctuation()) => {
                if let Some(escaped) = next {
                    out.push(escaped);
                    i = after + escaped.len_utf8();
                    continue;
                }
            }
            '!' | '[' if c == '[' || next == Some('[') => {
                let open = if c == '[' { i } else { after };
                let parsed = parse_bracket(line, open, &index)
                    // `items[0]` is code-like text, not a shortcut reference.
                    .filter(|bracket| {
                        !(bracket.shortcut && prev.is_some_and(char::is_alphanumeric))
                    });
                if let Some(Bracket { text, end, .. }) = parsed {
                    if c == '[' && !text.starts_with('^') {
                        if depth < MAX_INLINE_DEPTH {
                            clean_inline_into(text, depth + 1, out);
                        } else {
                            out.push_str(text);
                        }
                    }
                    i = end;
                    continue;
                }
                out.push(c);
            }
            '<' if next.is_some_and(|n| n.is_ascii_alphabetic() || n == '/' || n == '!') => {
                if let Some(close) = InlineIndex::next(&index.angles, after)
                    && close - i <= MAX_HTML_TAG_BYTES
                {
                    let inner = line.get(after..close).unwrap_or_default();
                    if is_autolink(inner) {
                        out.push_str(inner.strip_prefix("mailto:").unwrap_or(inner));
                    }
                    i = close + 1;
                    continue;
                }
                out.push('<');
            }
            '`' => {
                // A single-backtick code span is copied verbatim; other backticks vanish.
                if prev != Some('`')
                    && next != Some('`')
                    && let Some(close) = InlineIndex::next(&index.backticks, after)
                    && line
                        .get(close + 1..)
                        .is_none_or(|rest| !rest.starts_with('`'))
                {
                    out.push_str(line.get(after..close).unwrap_or_default());
                    i = close + 1;
                    continue;
                }
            }
            '*' => {
                if prev.is_some_and(char::is_whitespace) && next.is_some_and(char::is_whitespace) {
                    out.push('*');
                }
            }
            '_' => {
                if prev.is_some_and(char::is_alphanumeric)
                    && next.is_some_and(char::is_alphanumeric)
                {
                    out.push('_');
                }
            }
            '~' if next == Some('~') => {
                i = after + 1;
                continue;
            }
            _ => out.push(c),
        }
        i = after;
    }
}

/// A parsed bracket construct.
#[derive(Debug, Clone, Copy)]
struct Bracket<'a> {
    /// The text between the brackets.
    text: &'a str,
    /// Byte index just past the construct.
    end: usize,
    /// Whether this is a bare `[text]` with no link target.
    shortcut: bool,
}

/// Parses the bracket construct whose `[` is at byte `open`: an inline link `[text](url)`, a
/// reference link `[text][ref]`, a footnote reference `[^id]` or a shortcut reference `[text]`.
/// Returns `None` when the bracket is never closed.
fn parse_bracket<'a>(line: &'a str, open: usize, index: &InlineIndex) -> Option<Bracket<'a>> {
    let close = index.bracket_close(open)?;
    let text = line.get(open + 1..close)?;
    let after_close = close + 1;
    let rest = line.get(after_close..)?;
    let linked = |end: usize| Bracket {
        text,
        end,
        shortcut: false,
    };
    if text.starts_with('^') {
        return Some(linked(after_close));
    }
    if rest.starts_with('(')
        && let Some(end) = InlineIndex::next(&index.parens, after_close + 1)
    {
        return Some(linked(end + 1));
    }
    if rest.starts_with('[')
        && let Some(end) = index.bracket_close(after_close)
    {
        return Some(linked(end + 1));
    }
    Some(Bracket {
        text,
        end: after_close,
        shortcut: true,
    })
}

/// Whether the inside of `<...>` is an autolink (URL or e-mail address) rather than a tag.
fn is_autolink(inner: &str) -> bool {
    !inner.contains(char::is_whitespace)
        && (inner.contains("://") || inner.starts_with("mailto:") || inner.contains('@'))
}

/// Collapses every whitespace run to a single space and trims the ends.
fn normalize_whitespace(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

// ---------------------------------------------------------------------------------------------
// Words and terms
// ---------------------------------------------------------------------------------------------

/// Whether `text` contains at least one word.
fn has_word(text: &str) -> bool {
    text.chars().any(char::is_alphanumeric)
}

/// CJK ideographs and Japanese kana: each one counts as a word of its own, since such text is
/// written without spaces.
fn is_cjk(c: char) -> bool {
    matches!(
        c,
        '\u{3040}'..='\u{30FF}'
            | '\u{3400}'..='\u{4DBF}'
            | '\u{4E00}'..='\u{9FFF}'
            | '\u{F900}'..='\u{FAFF}'
            | '\u{20000}'..='\u{2FA1F}'
    )
}

/// Hiragana carries grammar rather than topic, so it never counts as a content word.
fn is_hiragana(c: char) -> bool {
    matches!(c, '\u{3040}'..='\u{309F}')
}

/// Calls `f` with every word of `text`: runs of alphanumeric characters, and single CJK
/// characters.
fn for_each_word(text: &str, mut f: impl FnMut(&str)) {
    let mut start: Option<usize> = None;
    for (i, c) in text.char_indices() {
        if is_cjk(c) {
            if let Some(s) = start.take() {
                f(text.get(s..i).unwrap_or_default());
            }
            f(text.get(i..i + c.len_utf8()).unwrap_or_default());
        } else if c.is_alphanumeric() {
            start.get_or_insert(i);
        } else if let Some(s) = start.take() {
            f(text.get(s..i).unwrap_or_default());
        }
    }
    if let Some(s) = start {
        f(text.get(s..).unwrap_or_default());
    }
}

/// Counts the words of `text` and lists its content terms (with repetitions).
fn analyze(text: &str, stopwords: &HashSet<&str>) -> (usize, Vec<String>) {
    let mut words = 0;
    let mut terms = Vec::new();
    for_each_word(text, |word| {
        words += 1;
        if let Some(term) = content_term(word, stopwords) {
            terms.push(term);
        }
    });
    (words, terms)
}

/// The normalised term for `word`, or `None` for stopwords, numbers and single letters.
fn content_term(word: &str, stopwords: &HashSet<&str>) -> Option<String> {
    let lower = word.to_lowercase();
    let mut chars = lower.chars();
    let first = chars.next()?;
    let single = chars.next().is_none();
    if (single && (!is_cjk(first) || is_hiragana(first)))
        || lower.chars().all(char::is_numeric)
        || stopwords.contains(lower.as_str())
    {
        return None;
    }
    Some(stem(lower))
}

/// Light suffix stripping for ASCII words so that `checks`, `checked` and `checking` share a term.
fn stem(word: String) -> String {
    if !word.is_ascii() {
        return word;
    }
    let mut stemmed = word;
    if stemmed.len() > 4 && stemmed.ends_with("ies") {
        stemmed.truncate(stemmed.len() - 3);
        stemmed.push('y');
    } else if stemmed.ends_with("sses") {
        stemmed.truncate(stemmed.len() - 2);
    } else if stemmed.len() > 3
        && stemmed.ends_with('s')
        && !stemmed.ends_with("ss")
        && !stemmed.ends_with("us")
        && !stemmed.ends_with("is")
    {
        stemmed.truncate(stemmed.len() - 1);
    }
    if stemmed.len() > 5 && stemmed.ends_with("ing") {
        stemmed.truncate(stemmed.len() - 3);
    } else if stemmed.len() > 4 && stemmed.ends_with("ed") && !stemmed.ends_with("eed") {
        stemmed.truncate(stemmed.len() - 2);
    }
    stemmed
}

// ---------------------------------------------------------------------------------------------
// Scoring and selection
// ---------------------------------------------------------------------------------------------

/// A candidate summary sentence.
#[derive(Debug)]
struct Sentence<'a> {
    text: &'a str,
    words: usize,
    /// Content terms with repetitions, in order.
    terms: Vec<String>,
    /// Content terms, sorted and deduplicated.
    distinct: Vec<String>,
    paragraph_start: bool,
    list_item: bool,
    ending: Ending,
}

/// How a sentence ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// With `.`, `!`, `?` or a CJK terminator.
    Terminal,
    /// With a colon.
    Colon,
    /// Without punctuation; the summary appends the given terminator so that joined fragments
    /// do not run into each other.
    Fragment(char),
}

impl Ending {
    fn of(text: &str) -> Self {
        match text
            .trim_end_matches(is_closing_punctuation)
            .chars()
            .next_back()
        {
            Some('.' | '!' | '?' | '。' | '！' | '？' | '｡' | '…') => Self::Terminal,
            Some(':' | '：') => Self::Colon,
            Some(c) if is_cjk(c) => Self::Fragment('。'),
            _ => Self::Fragment('.'),
        }
    }
}

/// Splits every paragraph into sentences, dropping sentences without words.
fn collect_sentences<'a>(
    paragraphs: &'a [Paragraph],
    stopwords: &HashSet<&str>,
) -> Vec<Sentence<'a>> {
    let mut sentences = Vec::new();
    for paragraph in paragraphs {
        for span in sentence_spans(&paragraph.text) {
            let Some(text) = paragraph.text.get(span.start..span.end) else {
                continue;
            };
            let (words, terms) = analyze(text, stopwords);
            if words == 0 {
                continue;
            }
            let mut distinct = terms.clone();
            distinct.sort_unstable();
            distinct.dedup();
            sentences.push(Sentence {
                text,
                words,
                terms,
                distinct,
                paragraph_start: span.paragraph_start && !paragraph.list_item,
                list_item: paragraph.list_item,
                ending: Ending::of(text),
            });
        }
    }
    sentences
}

/// Scores every sentence; see the module documentation for the formula.
fn score_sentences(sentences: &[Sentence<'_>], heading_terms: &HashSet<String>) -> Vec<f64> {
    let mut frequency: HashMap<&str, usize> = HashMap::new();
    for sentence in sentences {
        for term in &sentence.terms {
            *frequency.entry(term.as_str()).or_insert(0) += 1;
        }
    }
    let max_frequency = frequency.values().copied().max().unwrap_or(1).max(1) as f64;

    sentences
        .iter()
        .enumerate()
        .map(|(index, sentence)| {
            let weight: f64 = sentence
                .distinct
                .iter()
                .map(|term| {
                    let tf =
                        frequency.get(term.as_str()).copied().unwrap_or(0) as f64 / max_frequency;
                    let bonus = if heading_terms.contains(term) {
                        HEADING_TERM_BONUS
                    } else {
                        0.0
                    };
                    tf + bonus
                })
                .sum();
            let words = sentence.words.max(1) as f64;
            let mut score = weight / words.sqrt();
            if sentence.words < SHORT_SENTENCE_WORDS {
                // 1 word: x0.2, 2 words: x0.4, ..., 4 words: x0.8.
                score *= words / SHORT_SENTENCE_WORDS as f64;
            }
            match sentence.ending {
                Ending::Terminal => {}
                Ending::Colon => score *= LEAD_IN_FACTOR,
                Ending::Fragment(_) => score *= FRAGMENT_FACTOR,
            }
            if sentence.words > LONG_SENTENCE_WORDS {
                score *= (LONG_SENTENCE_WORDS as f64 / words).sqrt();
            }
            if sentence.list_item {
                score *= LIST_ITEM_FACTOR;
            }
            if index == 0 {
                score *= DOCUMENT_START_BONUS;
            } else if sentence.paragraph_start {
                score *= PARAGRAPH_START_BONUS;
            }
            score
        })
        .collect()
}

/// Greedily takes sentences in `order` (best first) while the summary fits `max_tokens`, up to
/// `limit` sentences; returns the summary in document order, or `None` if no sentence fits.
fn select(
    sentences: &[Sentence<'_>],
    order: &[usize],
    limit: usize,
    max_tokens: usize,
    count_tokens: &dyn Fn(&str) -> usize,
) -> Option<String> {
    let mut chosen: Vec<usize> = Vec::new();
    let mut summary: Option<String> = None;
    let mut rejected = 0;
    for &candidate in order {
        if chosen.len() >= limit {
            break;
        }
        let Some(sentence) = sentences.get(candidate) else {
            continue;
        };
        let redundant = chosen
            .iter()
            .filter_map(|&index| sentences.get(index))
            .any(|other| is_redundant(sentence, other));
        if redundant {
            continue;
        }
        let mut trial = chosen.clone();
        let position = trial.partition_point(|&index| index < candidate);
        trial.insert(position, candidate);
        let mut joined = String::new();
        for sentence in trial.iter().filter_map(|&index| sentences.get(index)) {
            if !joined.is_empty() {
                joined.push(' ');
            }
            joined.push_str(sentence.text);
            if let Ending::Fragment(terminator) = sentence.ending {
                joined.push(terminator);
            }
        }
        if count_tokens(&joined) <= max_tokens {
            chosen = trial;
            summary = Some(joined);
        } else if !chosen.is_empty() {
            rejected += 1;
            if rejected >= MAX_REJECTED_CANDIDATES {
                break;
            }
        }
    }
    summary
}

/// `text` lowercased without trailing punctuation, for comparing sentences with headings.
fn heading_key(text: &str) -> String {
    text.trim_end_matches(|c: char| !c.is_alphanumeric())
        .to_lowercase()
}

/// Whether `a` repeats `b`: the same text, or heavily overlapping content terms.
fn is_redundant(a: &Sentence<'_>, b: &Sentence<'_>) -> bool {
    if a.text.eq_ignore_ascii_case(b.text) {
        return true;
    }
    if a.distinct.is_empty() || b.distinct.is_empty() {
        return false;
    }
    let (mut i, mut j, mut shared) = (0, 0, 0_usize);
    while let (Some(x), Some(y)) = (a.distinct.get(i), b.distinct.get(j)) {
        match x.cmp(y) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                shared += 1;
                i += 1;
                j += 1;
            }
        }
    }
    let union = a.distinct.len() + b.distinct.len() - shared;
    shared as f64 >= REDUNDANCY_THRESHOLD * union as f64
}

/// The longest prefix of `sentence` that ends on a word boundary and fits `max_tokens`; if not
/// even the first word fits, the longest fitting prefix of that word (on a character boundary).
fn truncate_to_fit(
    sentence: &str,
    max_tokens: usize,
    count_tokens: &dyn Fn(&str) -> usize,
) -> String {
    let fits = |end: usize| {
        sentence
            .get(..end)
            .is_some_and(|prefix| count_tokens(prefix) <= max_tokens)
    };
    let mut word_ends = Vec::new();
    let mut in_word = false;
    for (i, c) in sentence.char_indices() {
        if c.is_whitespace() {
            if in_word {
                word_ends.push(i);
            }
            in_word = false;
        } else if is_cjk(c) {
            word_ends.push(i + c.len_utf8());
            in_word = false;
        } else {
            in_word = true;
        }
    }
    if in_word {
        word_ends.push(sentence.len());
    }

    if let Some(end) = largest_fitting(&word_ends, fits) {
        let prefix = sentence.get(..end).unwrap_or_default();
        let tidy = prefix
            .trim_end_matches([',', ';', ':', '-', '–', '—', '(', '[', '"', '“', '‘', '\''])
            .trim_end();
        if !tidy.is_empty() && count_tokens(tidy) <= max_tokens {
            return tidy.to_owned();
        }
        return prefix.to_owned();
    }
    let first_word_end = word_ends.first().copied().unwrap_or(sentence.len());
    let char_ends: Vec<usize> = sentence
        .char_indices()
        .map(|(i, c)| i + c.len_utf8())
        .take_while(|&end| end <= first_word_end)
        .collect();
    largest_fitting(&char_ends, fits)
        .and_then(|end| sentence.get(..end))
        .unwrap_or_default()
        .to_owned()
}

/// The largest of the ascending `candidates` for which `fits` holds, assuming `fits` is
/// monotonic. Gallops from the smallest candidate before bisecting, so `fits` is mostly asked
/// about short prefixes. Only ever returns a candidate for which `fits` returned true.
fn largest_fitting(candidates: &[usize], fits: impl Fn(usize) -> bool) -> Option<usize> {
    let mut good: Option<usize> = None;
    let mut bad = candidates.len();
    let mut probe = 0;
    let mut step = 1_usize;
    while probe < bad {
        let Some(&candidate) = candidates.get(probe) else {
            break;
        };
        if fits(candidate) {
            good = Some(probe);
            probe = probe.saturating_add(step);
            step = step.saturating_mul(2);
        } else {
            bad = probe;
        }
    }
    let mut low = good? + 1;
    let mut high = bad.min(candidates.len());
    while low < high {
        let middle = low + (high - low) / 2;
        let Some(&candidate) = candidates.get(middle) else {
            break;
        };
        if fits(candidate) {
            good = Some(middle);
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    good.and_then(|index| candidates.get(index).copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> usize {
        text.split_whitespace().count()
    }

    fn chars(text: &str) -> usize {
        text.chars().count()
    }

    fn bytes(text: &str) -> usize {
        text.len()
    }

    const ARTICLE: &str = "Coral reefs cover a tiny fraction of the ocean floor. \
        They nevertheless shelter about a quarter of all marine species. \
        Warming water makes corals expel the algae that feed them, and the reefs bleach. \
        Bleached reefs can recover if the water cools quickly enough. \
        Repeated bleaching, however, kills the coral and the reefs collapse. \
        Fishermen in the region have noticed smaller catches.\n\n\
        Scientists now breed heat-tolerant coral to restore damaged reefs. \
        Early trials show that restored reefs bleach less than wild reefs. \
        Local divers help by planting coral fragments on reefs. \
        The weather was pleasant during most of the field season. \
        Funding for reef restoration comes mostly from tourism.";

    #[test]
    fn summary_keeps_sentences_in_document_order() {
        let summary = summarize(ARTICLE, 1_000, &words);
        let picked = split_sentences(&summary);
        assert!(picked.len() >= 2, "expected several sentences: {summary:?}");
        let positions: Vec<usize> = picked
            .iter()
            .map(|sentence| {
                ARTICLE
                    .find(sentence)
                    .expect("summary sentence comes from the text")
            })
            .collect();
        assert!(
            positions.windows(2).all(|pair| pair[0] < pair[1]),
            "{positions:?}"
        );
    }

    #[test]
    fn summary_prefers_sentences_with_frequent_content_words() {
        let topic = "The Rust compiler enforces borrow rules so Rust programs avoid memory bugs.";
        let support = "The borrow checker catches memory bugs early.";
        let text = format!(
            "Yesterday the weather stayed pleasant near the quiet coast. \
             Several gardeners planted tulips along narrow village lanes. {topic} \
             A baker sold fresh bread to early customers downtown. \
             Children played football in the park after school. \
             Many teams adopt Rust for memory safety. {support} \
             An old clock tower chimed twice over the market square."
        );
        assert_eq!(summarize(&text, words(topic), &words), topic);
        assert_eq!(
            summarize(&text, words(topic) + words(support), &words),
            format!("{topic} {support}")
        );
    }

    #[test]
    fn summary_respects_the_token_budget() {
        let long = ARTICLE.repeat(5);
        for budget in 1..=80 {
            let summary = summarize(&long, budget, &words);
            assert!(words(&summary) <= budget, "budget {budget}: {summary:?}");
            assert!(!summary.is_empty(), "budget {budget} gave nothing");
        }
        let summary = summarize(ARTICLE, 30, &chars);
        assert!(chars(&summary) <= 30 && !summary.is_empty(), "{summary:?}");
    }

    #[test]
    fn summary_stops_at_a_natural_length() {
        // 11 sentences: max(3, ceil(2.2)) = 3 sentences even with a huge budget.
        let summary = summarize(ARTICLE, 100_000, &words);
        assert_eq!(split_sentences(&summary).len(), 3, "{summary:?}");
        // 110 sentences: ceil(22) capped at 12.
        let many: String = (0..110)
            .map(|i| format!("Report{i} covers region{i} and sector{i} in detail. "))
            .collect();
        let summary = summarize(&many, 100_000, &words);
        assert_eq!(split_sentences(&summary).len(), 12, "{summary:?}");
    }

    #[test]
    fn abbreviations_do_not_split_sentences() {
        let text = "Dr. Smith met Mr. Jones at 3.5 p.m. on Main St. in the U.S. capital, e.g. near the mall. \
            J. R. R. Tolkien wrote books, i.e. novels, poems etc. and essays! \
            Prices rose 2.5% vs. last year... and then fell. Was it the U.S. The answer is no. \
            We moved on.";
        let sentences = split_sentences(text);
        assert_eq!(
            sentences,
            vec![
                "Dr. Smith met Mr. Jones at 3.5 p.m. on Main St. in the U.S. capital, e.g. near the mall.",
                "J. R. R. Tolkien wrote books, i.e. novels, poems etc. and essays!",
                "Prices rose 2.5% vs. last year... and then fell.",
                "Was it the U.S.",
                "The answer is no.",
                "We moved on.",
            ]
        );
    }

    #[test]
    fn sentences_split_on_terminal_punctuation_and_blank_lines() {
        let text = "Is it done? Yes! It is \"finished.\" Next one\n\n  A new paragraph\nwithout a period\n\t\nLast.";
        assert_eq!(
            split_sentences(text),
            vec![
                "Is it done?",
                "Yes!",
                "It is \"finished.\"",
                "Next one",
                "A new paragraph\nwithout a period",
                "Last."
            ]
        );
        let spans = sentence_spans(text);
        let starts: Vec<bool> = spans.iter().map(|span| span.paragraph_start).collect();
        assert_eq!(starts, vec![true, false, false, false, true, true]);
    }

    #[test]
    fn cjk_text_splits_on_full_width_punctuation() {
        let text = "今天天气很好。我们去公园散步！你想一起去吗？";
        assert_eq!(
            split_sentences(text),
            vec!["今天天气很好。", "我们去公园散步！", "你想一起去吗？"]
        );
        let summary = summarize(text, 100, &chars);
        assert!(!summary.is_empty() && chars(&summary) <= 100);
    }

    #[test]
    fn markdown_headings_are_not_summary_sentences() {
        let text = "# Solar Panel Basics\n\n\
            Solar panels convert sunlight into electricity for homes.\n\n\
            ## Installation Costs\n\n\
            Installation of solar panels costs less every year.\n\
            Panels on sunny roofs pay for themselves within a decade.\n\n\
            Setext Heading Text\n\
            ===================\n\n\
            Cloudy regions still produce useful solar power.";
        let body = [
            "Solar panels convert sunlight into electricity for homes.",
            "Installation of solar panels costs less every year.",
            "Panels on sunny roofs pay for themselves within a decade.",
            "Cloudy regions still produce useful solar power.",
        ];
        let summary = summarize(text, 1_000, &words);
        assert!(!summary.is_empty());
        assert!(
            !summary.contains('#') && !summary.contains("Basics"),
            "{summary:?}"
        );
        assert!(
            !summary.contains("Setext") && !summary.contains("==="),
            "{summary:?}"
        );
        for sentence in split_sentences(&summary) {
            assert!(
                body.contains(&sentence),
                "{sentence:?} is not a body sentence"
            );
        }
    }

    #[test]
    fn table_of_contents_entries_are_not_summary_sentences() {
        let text = "- [Installing the tool](#installing-the-tool)\n\
            - [Configuring the tool](#configuring-the-tool)\n\n\
            ## Installing the tool\n\n\
            Installing the tool takes one command on every platform.\n\n\
            ## Configuring the tool\n\n\
            Configuring the tool happens in a single file next to the project.";
        assert_eq!(
            summarize(text, 100, &words),
            "Installing the tool takes one command on every platform. \
             Configuring the tool happens in a single file next to the project."
        );
    }

    #[test]
    fn heading_words_boost_matching_sentences() {
        let body = "Here are notes. Gardeners water the tulips every morning. \
            Engineers calibrate the turbines every evening.";
        let plain = summarize(body, 6, &words);
        assert_eq!(plain, "Gardeners water the tulips every morning.");
        let with_heading = summarize(&format!("# Turbines\n\n{body}"), 6, &words);
        assert_eq!(
            with_heading,
            "Engineers calibrate the turbines every evening."
        );
    }

    #[test]
    fn markdown_links_emphasis_and_code_are_cleaned() {
        let text = "Read **the [official guide](https://example.com/guide)** before `cargo build` starts.\n\n\
            ```rust\nfn main() { println!(\"code is not prose\"); }\n```\n\n\
            - First bullet explains *why* snake_case names matter ![logo](logo.png).\n\
            - Second bullet mentions <https://example.org> and a footnote[^1].\n\n\
            > Quoted wisdom stays in the summary <br/> too.";
        let paragraphs: Vec<String> = clean_markdown(text)
            .paragraphs
            .into_iter()
            .map(|paragraph| paragraph.text)
            .collect();
        assert_eq!(
            paragraphs,
            vec![
                "Read the official guide before cargo build starts.",
                "First bullet explains why snake_case names matter .",
                "Second bullet mentions https://example.org and a footnote.",
                "Quoted wisdom stays in the summary too.",
            ]
        );
        let summary = summarize(text, 1_000, &words);
        assert!(!summary.is_empty());
        for fragment in [
            "**",
            "](",
            "`",
            "code is not prose",
            "logo",
            "- ",
            "[^1]",
            "<br",
            "> ",
        ] {
            assert!(
                !summary.contains(fragment),
                "{fragment:?} leaked into {summary:?}"
            );
        }
    }

    #[test]
    fn badges_references_and_inline_code_are_cleaned() {
        let text = "[![Crates.io][crates-badge]][crates-url] [![CI](https://ci/badge.svg)](https://ci)\n\n\
            The [heapsize] example uses `items[0]` and `a*b_c` inside code, plus array[i] outside.\n\n\
            [crates-url]: https://crates.io/crates/tokio";
        let paragraphs: Vec<String> = clean_markdown(text)
            .paragraphs
            .into_iter()
            .map(|paragraph| paragraph.text)
            .collect();
        assert_eq!(
            paragraphs,
            vec![
                "The heapsize example uses items[0] and a*b_c inside code, plus array[i] outside."
            ]
        );
    }

    #[test]
    fn repeated_sentences_appear_only_once() {
        let text = ARTICLE.repeat(4);
        let summary = summarize(&text, 10_000, &words);
        let picked = split_sentences(&summary);
        assert!(picked.len() >= 3, "{summary:?}");
        let mut unique = picked.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), picked.len(), "{summary:?}");
    }

    #[test]
    fn empty_and_whitespace_input_give_empty_summary() {
        for text in [
            "",
            "   ",
            "\n\n\t \r\n",
            "... !!! ???",
            "```\n```",
            "---\n***",
        ] {
            assert_eq!(summarize(text, 100, &words), "", "{text:?}");
        }
        assert!(split_sentences(" \n\n ").is_empty());
    }

    #[test]
    fn heading_only_documents_fall_back_to_headings() {
        assert_eq!(summarize("# Release Notes", 100, &words), "Release Notes.");
    }

    #[test]
    fn unpunctuated_fragments_do_not_run_together() {
        let text = "- Apples ripen in early autumn\n- Pears ripen a little later\n";
        assert_eq!(
            summarize(text, 100, &words),
            "Apples ripen in early autumn. Pears ripen a little later."
        );
        assert_eq!(
            summarize("苹果很好吃\n\n梨也很好吃", 100, &chars),
            "苹果很好吃。 梨也很好吃。"
        );
    }

    #[test]
    fn zero_budget_gives_empty_summary() {
        assert_eq!(summarize(ARTICLE, 0, &words), "");
        assert_eq!(summarize("Short.", 0, &|_: &str| 0), "");
    }

    #[test]
    fn a_single_oversized_sentence_is_truncated_on_a_word_boundary() {
        let sentence = (0..50)
            .map(|i| format!("word{i}"))
            .collect::<Vec<_>>()
            .join(" ")
            + ".";
        let summary = summarize(&sentence, 10, &words);
        assert_eq!(words(&summary), 10, "{summary:?}");
        assert!(sentence.starts_with(&summary));
        assert_eq!(sentence[summary.len()..].chars().next(), Some(' '));
        // Character budget: still a prefix that ends at a whole word.
        let summary = summarize(&sentence, 33, &chars);
        assert!(chars(&summary) <= 33 && !summary.is_empty(), "{summary:?}");
        assert_eq!(sentence[summary.len()..].chars().next(), Some(' '));
    }

    #[test]
    fn text_without_spaces_is_truncated_to_fit() {
        let cjk = "这是一个非常长的句子没有任何空格也没有标点";
        let summary = summarize(cjk, 5, &chars);
        assert_eq!(summary, "这是一个非");
        let blob = "x".repeat(10_000);
        let summary = summarize(&blob, 7, &bytes);
        assert_eq!(summary, "xxxxxxx");
    }

    #[test]
    fn never_panics_on_odd_unicode() {
        let inputs = [
            "👩‍👩‍👧‍👦 family. 🇺🇳 flags! e\u{301}\u{301}clair?",
            "日本語のテキストです。漢字とかなが混ざっています。",
            "مرحبا بالعالم. هذا نص عربي.",
            "\u{200B}\u{200D}\u{FEFF}. \u{0}\u{1}\u{7F}.",
            "Ünïcödé Ωmega. ß straße. İstanbul ǅ.",
            "[",
            "[](",
            "![",
            "<",
            "<a",
            "`",
            "*",
            "_",
            "~~",
            "\\",
            "#",
            "# ",
            "1.",
            ". .",
            "[a](b",
            "[a][b",
            "[^",
            "<a href='x'",
            "a\u{2028}b\u{2029}c.",
            "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙. 𠜎𠜱𠝹𠱓.",
            "\r\n\r\n.\r\n",
            "U.S.A. e.g. i.e. Mr. J. ... ?!?! 3.14.15.",
        ];
        for text in inputs {
            let _ = split_sentences(text);
            for budget in [0, 1, 2, 3, 5, 100] {
                for counter in [&words as &dyn Fn(&str) -> usize, &chars, &bytes] {
                    let summary = summarize(text, budget, counter);
                    assert!(
                        counter(&summary) <= budget,
                        "{text:?} {budget}: {summary:?}"
                    );
                }
            }
        }
        assert_eq!(summarize("😀 😀 😀", 2, &chars), "", "emoji are not words");
        assert_eq!(summarize("Hi 😀 there 😀", 4, &chars), "Hi 😀");
    }

    #[test]
    fn never_panics_on_pseudo_random_input() {
        let alphabet: Vec<char> = "ab Z.!?\n\n#*_`[]()<>~|-+1 é日。😀\u{301}\\^:"
            .chars()
            .collect();
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..2_000 {
            let mut text = String::new();
            for _ in 0..(state % 97) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                text.push(alphabet[(state % alphabet.len() as u64) as usize]);
            }
            for sentence in split_sentences(&text) {
                assert!(!sentence.is_empty() && sentence.trim() == sentence);
            }
            let budget = (state % 12) as usize;
            let summary = summarize(&text, budget, &chars);
            assert!(chars(&summary) <= budget, "{text:?}: {summary:?}");
        }
    }

    #[test]
    fn summaries_are_deterministic() {
        let text = ARTICLE.repeat(3);
        let first = summarize(&text, 60, &words);
        assert!(!first.is_empty());
        for _ in 0..5 {
            assert_eq!(summarize(&text, 60, &words), first);
        }
    }

    #[test]
    fn large_and_pathological_documents_are_handled() {
        let big = ARTICLE.repeat(1_000_000 / ARTICLE.len() + 1);
        let summary = summarize(&big, 200, &words);
        assert!(!summary.is_empty() && words(&summary) <= 200);

        let one_sentence = "word ".repeat(200_000);
        let summary = summarize(&one_sentence, 50, &words);
        assert_eq!(words(&summary), 50);

        for unit in ["[", "<a", "[x](", "[x][", "**", "a. ", "\n", "1. "] {
            let text = unit.repeat(200_000 / unit.len());
            let summary = summarize(&text, 20, &chars);
            assert!(chars(&summary) <= 20);
        }
    }
}
