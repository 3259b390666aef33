//! Incremental Server-Sent Events framing (providers-wire.md §1.3): lines end in LF, CRLF or
//! CR; a blank line ends an event; `data:` may or may not be followed by one space; several
//! `data:` lines join with `\n`; lines starting with `:` are comments. Lines that are neither
//! fields nor comments are kept as `stray` text, because Gemini may send a raw JSON error
//! mid-stream.

/// One complete event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` name, if any (only Anthropic uses them).
    pub event: Option<String>,
    /// The joined `data:` lines.
    pub data: String,
    /// Lines of the event that were not SSE fields (raw text such as a JSON error).
    pub stray: String,
}

/// Feeds bytes in, gets whole events out. Never panics on any input.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the line being read (may hold a split UTF-8 sequence).
    line: Vec<u8>,
    /// The previous byte was CR, so a following LF belongs to the same line ending.
    after_cr: bool,
    current: SseEvent,
    has_fields: bool,
    /// `data:` lines seen in the current event (an empty first line still counts).
    data_lines: usize,
    /// Bytes fed so far.
    read: usize,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes `bytes` and returns every event they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.read = self.read.saturating_add(bytes.len());
        let mut events = Vec::new();
        for &byte in bytes {
            match byte {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    self.after_cr = byte == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(event) = self.end_line(&line) {
                        events.push(event);
                    }
                }
                _ => {
                    self.after_cr = false;
                    self.line.push(byte);
                }
            }
        }
        events
    }

    /// Whether the stream has run past [`super::MAX_RESPONSE_BYTES`]: its reader fails the
    /// call ([`super::ProviderError::too_large`]) rather than keep its text growing.
    pub fn too_long(&self) -> bool {
        self.read > super::MAX_RESPONSE_BYTES
    }

    /// Call at end of stream: returns a last event that was not followed by a blank line.
    pub fn finish(&mut self) -> Option<SseEvent> {
        let line = std::mem::take(&mut self.line);
        let from_line = if line.is_empty() {
            None
        } else {
            self.end_line(&line)
        };
        from_line.or_else(|| self.dispatch())
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        if !self.has_fields {
            return None;
        }
        self.has_fields = false;
        self.data_lines = 0;
        Some(std::mem::take(&mut self.current))
    }

    fn end_line(&mut self, raw: &[u8]) -> Option<SseEvent> {
        if raw.is_empty() {
            return self.dispatch();
        }
        let line = String::from_utf8_lossy(raw);
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "data" => {
                if self.data_lines > 0 {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.data_lines += 1;
            }
            "event" => self.current.event = Some(value.to_owned()),
            "id" | "retry" => {}
            _ => {
                if !self.current.stray.is_empty() {
                    self.current.stray.push('\n');
                }
                self.current.stray.push_str(&line);
            }
        }
        self.has_fields = true;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Vec<SseEvent> {
        let mut parser = SseParser::new();
        let mut events = parser.feed(input);
        events.extend(parser.finish());
        events
    }

    #[test]
    fn events_are_split_on_blank_lines_with_any_line_ending() {
        for input in [
            &b"data: a\n\ndata: b\n\n"[..],
            b"data: a\r\n\r\ndata: b\r\n\r\n",
            b"data: a\r\rdata: b\r\r",
        ] {
            let events = parse_all(input);
            let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
            assert_eq!(data, ["a", "b"], "{input:?}");
        }
    }

    #[test]
    fn the_space_after_data_is_optional_and_multiline_data_joins_with_newlines() {
        let events = parse_all(b"data:{\"a\":1}\n\ndata: x\ndata: y\n\n");
        assert_eq!(events[0].data, "{\"a\":1}");
        assert_eq!(events[1].data, "x\ny");
    }

    #[test]
    fn comments_are_skipped_and_event_names_kept() {
        let events = parse_all(
            b": OPENROUTER PROCESSING\n\nevent: message_stop\ndata: {}\n\n: keep-alive\n\n",
        );
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event.as_deref(), Some("message_stop"));
    }

    #[test]
    fn bytes_may_arrive_split_anywhere_even_inside_a_character() {
        let input = "data: héllo\r\n\r\ndata: wörld\n\n".as_bytes();
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        for byte in input {
            events.extend(parser.feed(std::slice::from_ref(byte)));
        }
        let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["héllo", "wörld"]);
    }

    #[test]
    fn raw_lines_are_kept_as_stray_text() {
        let events = parse_all(b"{\n  \"error\": {\"code\": 503}\n}\n");
        assert_eq!(events.len(), 1);
        assert!(events[0].stray.contains("\"error\""), "{:?}", events[0]);
        assert!(events[0].data.is_empty());
    }

    #[test]
    fn a_last_event_without_a_blank_line_is_returned_by_finish() {
        let mut parser = SseParser::new();
        assert!(parser.feed(b"data: tail").is_empty());
        assert_eq!(parser.finish().map(|e| e.data), Some("tail".to_owned()));
        assert_eq!(parser.finish(), None);
    }
}
