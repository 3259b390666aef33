//! PLACEHOLDER until the helper delivers the real summarizer.
pub fn summarize(text: &str, max_tokens: usize, count_tokens: &dyn Fn(&str) -> usize) -> String {
    let mut out = String::new();
    for s in text.split(". ") {
        if count_tokens(&(out.clone() + s)) > max_tokens { break; }
        out.push_str(s); out.push_str(". ");
    }
    out.trim().to_owned()
}
