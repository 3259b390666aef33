//! Property tests (proptest, a few hundred cases each, so they run in every CI build) for the
//! three parsers that face outside input: job ingest, SSE framing and provider response
//! bodies. Each checks "never panics" and a round-trip property.

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::providers::sse::{SseEvent, SseParser};
use crate::providers::{anthropic, gemini, openai};
use crate::stages::ingest::ingest;

/// Codes an ingest rejection may carry.
const INGEST_CODES: &[&str] = &[
    "too_large",
    "invalid_utf8",
    "invalid_json",
    "schema_violation",
    "invalid_text",
    "invalid_image",
];

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn valid_job() -> Value {
    json!({
        "schema": "switchyard.job.v1", "id": "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        "tenant": "acme", "batch": "b1", "route": "default",
        "request": {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 10}
    })
}

const FIELDS: &[&str] = &[
    "/schema",
    "/id",
    "/tenant",
    "/batch",
    "/route",
    "/regions",
    "/max_cost_usd",
    "/metadata",
    "/request",
    "/request/messages",
    "/request/messages/0",
    "/request/messages/0/role",
    "/request/messages/0/content",
    "/request/max_tokens",
    "/request/temperature",
    "/request/stop",
];

fn check_ingest(body: &[u8]) -> Result<(), TestCaseError> {
    match ingest(body, None, 1 << 20) {
        Ok(job) => {
            // An accepted job serializes back into an accepted job with the same id.
            let again = serde_json::to_vec(&job).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let reparsed = ingest(&again, None, 1 << 20)
                .map_err(|r| TestCaseError::fail(format!("re-ingest failed: {:?}", r.error)))?;
            prop_assert_eq!(reparsed.id, job.id);
            prop_assert!(crate::stages::ingest::is_name(&job.tenant));
        }
        Err(rejection) => {
            prop_assert!(
                INGEST_CODES.contains(&rejection.error.code.as_str()),
                "{:?}",
                rejection.error
            );
            prop_assert!(!rejection.error.message.is_empty());
            if let Some(path) = &rejection.error.path {
                prop_assert!(path.starts_with('/'), "{}", path);
            }
            if let Some(tenant) = &rejection.tenant {
                prop_assert!(crate::stages::ingest::is_name(tenant));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn ingest_never_panics_on_any_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
        check_ingest(&body)?;
    }

    #[test]
    fn ingest_never_panics_on_any_json(value in arb_json()) {
        check_ingest(&serde_json::to_vec(&value).unwrap_or_default())?;
    }

    #[test]
    fn a_job_with_any_field_replaced_is_accepted_or_rejected_with_a_path(
        field in prop::sample::select(FIELDS),
        replacement in arb_json(),
    ) {
        let mut job = valid_job();
        if let Some(slot) = job.pointer_mut(field) {
            *slot = replacement;
        }
        check_ingest(&serde_json::to_vec(&job).unwrap_or_default())?;
    }

    #[test]
    fn sse_events_survive_any_chunking_and_line_ending(
        events in prop::collection::vec(("[a-z_]{0,8}", prop::collection::vec("[^\r\n]{0,16}", 1..4)), 0..6),
        ending in prop::sample::select(vec!["\n", "\r\n", "\r"]),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut text = String::new();
        let mut expected = Vec::new();
        for (name, lines) in &events {
            if !name.is_empty() {
                text.push_str(&format!("event: {name}{ending}"));
            }
            for line in lines {
                text.push_str(&format!("data: {line}{ending}"));
            }
            text.push_str(ending);
            expected.push(SseEvent {
                event: (!name.is_empty()).then(|| name.clone()),
                data: lines.join("\n"),
                stray: String::new(),
            });
        }
        let bytes = text.as_bytes();
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        let mut parser = SseParser::new();
        let mut got = Vec::new();
        let mut start = 0;
        for point in points.into_iter().chain([bytes.len()]) {
            got.extend(parser.feed(&bytes[start..point]));
            start = point;
        }
        got.extend(parser.finish());
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn sse_parsing_never_panics_on_any_bytes(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8)) {
        let mut parser = SseParser::new();
        for chunk in &chunks {
            let _ = parser.feed(chunk);
        }
        let _ = parser.finish();
    }

    #[test]
    fn provider_bodies_of_any_shape_never_panic(value in arb_json(), noise in ".{0,64}") {
        for text in [value.to_string(), noise] {
            // Errors are fine; a panic fails the test.
            let _ = openai::parse_openai_response(&text, "m");
            let _ = anthropic::parse_anthropic_response(&text, "m");
            let _ = gemini::parse_gemini_response(&text, "m");
        }
    }

    #[test]
    fn any_openai_completion_is_normalised_with_its_text_and_usage(
        content in ".{0,64}",
        prompt in 0u32..1_000_000,
        completion in 0u32..1_000_000,
    ) {
        let body = json!({
            "id": "c1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        });
        let parsed = openai::parse_openai_response(&body.to_string(), "m")
            .map_err(|e| TestCaseError::fail(e.message))?;
        prop_assert_eq!(parsed.response["choices"][0]["message"]["content"].as_str(), Some(content.as_str()));
        prop_assert_eq!(parsed.usage.input_tokens, u64::from(prompt));
        prop_assert_eq!(parsed.usage.output_tokens, u64::from(completion));
    }

    #[test]
    fn any_anthropic_message_is_normalised_with_its_text_and_usage(
        content in ".{0,64}",
        input in 0u32..1_000_000,
        output in 0u32..1_000_000,
    ) {
        let body = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
            "content": [{"type": "text", "text": content}], "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": output},
        });
        let parsed = anthropic::parse_anthropic_response(&body.to_string(), "m")
            .map_err(|e| TestCaseError::fail(e.message))?;
        let text = parsed.response["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_owned();
        prop_assert_eq!(text, content);
        prop_assert_eq!(parsed.usage.input_tokens, u64::from(input));
        prop_assert_eq!(parsed.usage.output_tokens, u64::from(output));
    }
}
