//! Property test: arbitrary and mutated response bytes, streamed or not, with any status,
//! never panic or hang an adapter, and every outcome is well formed — a success is a
//! `chat.completion`, an error status is an error carrying that status.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use super::test_support::openai_at;
use super::{ApiKey, Call, Provider, anthropic, gemini};
use crate::messages::{ChatMessage, ChatRequest};

const OPENAI_BODY: &str = r#"{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hi there.","refusal":null,"tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},"finish_reason":"stop"}],"usage":{"prompt_tokens":20,"completion_tokens":5,"total_tokens":25,"prompt_tokens_details":{"cached_tokens":8},"completion_tokens_details":{"reasoning_tokens":2}}}"#;
const OPENAI_STREAM: &str = "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\ndata: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"t\",\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}]},\"finish_reason\":\"stop\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\ndata: [DONE]\n\n";
const ANTHROPIC_BODY: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude","content":[{"type":"thinking","thinking":"hmm"},{"type":"text","text":"Hi."},{"type":"tool_use","id":"tu","name":"f","input":{"a":1}}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"cache_creation_input_tokens":100,"cache_read_input_tokens":200,"output_tokens":7}}"#;
const ANTHROPIC_STREAM: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude\",\"content\":[],\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\nevent: ping\ndata: {\"type\":\"ping\"}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"tu\",\"name\":\"f\",\"input\":{}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\":1}\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":3}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
const GEMINI_BODY: &str = r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"thinking","thought":true},{"text":"Hi."},{"functionCall":{"name":"f","args":{"a":1}}}]},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":30,"candidatesTokenCount":5,"thoughtsTokenCount":4,"cachedContentTokenCount":10,"totalTokenCount":39},"modelVersion":"g","responseId":"r"}"#;
const GEMINI_STREAM: &str = "data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"text\":\"Hi\"}]}}],\"usageMetadata\":{\"promptTokenCount\":3}}\r\n\r\ndata: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"text\":\" there\"}]},\"finishReason\":\"STOP\"}],\"usageMetadata\":{\"promptTokenCount\":3,\"candidatesTokenCount\":2,\"totalTokenCount\":5}}\r\n\r\n";

/// Serves queued (status, body) pairs in order.
struct Queue(Mutex<VecDeque<(u16, Vec<u8>)>>);

impl Respond for Queue {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let (status, body) = self
            .0
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or((500, b"queue empty".to_vec()));
        ResponseTemplate::new(status).set_body_bytes(body)
    }
}

/// One mutation of `sample`: truncation, byte flips, insertions, duplicated spans, swapped
/// scalars, or plain random bytes.
fn mutate(rng: &mut fastrand::Rng, sample: &str) -> Vec<u8> {
    let mut bytes = sample.as_bytes().to_vec();
    for _ in 0..rng.usize(1..4) {
        let len = bytes.len().max(1);
        match rng.u8(0..7) {
            0 => bytes.truncate(rng.usize(0..len)),
            1 => {
                let at = rng.usize(0..len);
                if let Some(b) = bytes.get_mut(at) {
                    *b = rng.u8(..);
                }
            }
            2 => {
                let at = rng.usize(0..=bytes.len());
                let junk: Vec<u8> = (0..rng.usize(1..16)).map(|_| rng.u8(..)).collect();
                bytes.splice(at..at, junk);
            }
            3 => {
                let start = rng.usize(0..len);
                let end = (start + rng.usize(1..64)).min(bytes.len());
                let span = bytes.get(start..end).unwrap_or_default().to_vec();
                bytes.splice(start..start, span);
            }
            4 => {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let swapped = match rng.u8(0..5) {
                    0 => text.replace("1", "-99999999999999999999"),
                    1 => text.replace(":\"", ":[\""),
                    2 => text.replace("\"text\"", "\"text\":null,\"x\""),
                    3 => text.replace("{", "[").replacen("}", "]", 3),
                    _ => text.replace("\n\n", "\n"),
                };
                bytes = swapped.into_bytes();
            }
            5 => bytes = (0..rng.usize(0..256)).map(|_| rng.u8(..)).collect(),
            _ => bytes
                .extend_from_slice(b"\n\ndata: {\"error\":{\"message\":\"x\",\"code\":503}}\n\n"),
        }
    }
    bytes
}

fn providers(base: &str) -> Vec<(Provider, &'static str, &'static str)> {
    let http = reqwest::Client::new();
    vec![
        (openai_at(base), OPENAI_BODY, OPENAI_STREAM),
        (
            Provider::Anthropic(anthropic::AnthropicProvider::new(
                http.clone(),
                base.to_owned(),
            )),
            ANTHROPIC_BODY,
            ANTHROPIC_STREAM,
        ),
        (
            Provider::Gemini(gemini::GeminiProvider::new(
                http,
                base.to_owned(),
                super::images::ImageFetcher::new(true),
            )),
            GEMINI_BODY,
            GEMINI_STREAM,
        ),
    ]
}

#[tokio::test]
async fn arbitrary_response_bytes_and_streams_never_panic_or_hang_an_adapter() {
    const CASES: usize = 400;
    let server = MockServer::start().await;
    let queue = std::sync::Arc::new(Queue(Mutex::new(VecDeque::new())));
    Mock::given(wiremock::matchers::any())
        .respond_with(ArcQueue(queue.clone()))
        .mount(&server)
        .await;
    let key = ApiKey {
        id: "k".to_owned(),
        secret: "s".into(),
    };
    let request = ChatRequest {
        messages: vec![ChatMessage::text_message("user", "hello")],
        max_tokens: Some(20),
        ..ChatRequest::default()
    };
    let mut rng = fastrand::Rng::with_seed(0x5EED);
    let statuses = [
        200, 200, 200, 200, 400, 401, 404, 408, 409, 413, 422, 429, 500, 502, 503, 504, 529,
    ];
    let mut outcomes = (0usize, 0usize);
    for (provider, body, stream) in providers(&server.uri()) {
        for case in 0..CASES {
            let streaming = case % 2 == 1;
            let sample = if streaming { stream } else { body };
            // Half the cases are the intact sample, so the success path is exercised too.
            let (status, bytes) = if case % 4 < 2 {
                (200, sample.as_bytes().to_vec())
            } else {
                (
                    statuses[rng.usize(0..statuses.len())],
                    mutate(&mut rng, sample),
                )
            };
            queue.0.lock().unwrap().push_back((status, bytes.clone()));
            let ignore = |_: &str| {};
            let call = Call {
                key: Some(&key),
                timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(2),
                on_delta: streaming.then_some(&ignore as &(dyn Fn(&str) + Send + Sync)),
            };
            let result = tokio::time::timeout(
                Duration::from_secs(10),
                provider.complete(&request, "m", &call),
            )
            .await
            .unwrap_or_else(|_| panic!("{} hung on case {case}", provider.provider_type()));
            let shown = String::from_utf8_lossy(&bytes);
            match result {
                Ok(completion) => {
                    assert!(
                        status < 300,
                        "{}: HTTP {status} became a success: {shown}",
                        provider.provider_type()
                    );
                    assert_eq!(completion.response["object"], "chat.completion");
                    assert!(
                        completion
                            .response
                            .pointer("/choices/0/message")
                            .is_some_and(Value::is_object)
                    );
                    outcomes.0 += 1;
                }
                Err(error) => {
                    if status >= 300 {
                        assert_eq!(
                            error.status,
                            Some(status),
                            "{}: {shown}",
                            provider.provider_type()
                        );
                    }
                    outcomes.1 += 1;
                }
            }
        }
    }
    // The generator must exercise both paths, or the property says little.
    assert!(
        outcomes.0 >= 3 * CASES / 2 && outcomes.1 > 100,
        "successes/errors: {outcomes:?}"
    );
}

/// `Respond` for a shared queue.
struct ArcQueue(std::sync::Arc<Queue>);

impl Respond for ArcQueue {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        self.0.respond(request)
    }
}

#[test]
fn the_sse_parser_never_panics_on_random_bytes_split_anywhere() {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut events = 0;
    for _ in 0..2_000 {
        let sample = [OPENAI_STREAM, ANTHROPIC_STREAM, GEMINI_STREAM][rng.usize(0..3)];
        let bytes = mutate(&mut rng, sample);
        let mut parser = super::sse::SseParser::new();
        let mut rest = bytes.as_slice();
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rng.usize(1..=rest.len()));
            events += parser.feed(chunk).len();
            rest = tail;
        }
        events += usize::from(parser.finish().is_some());
    }
    assert!(
        events > 2_000,
        "mutated streams still yield events: {events}"
    );
}

/// A one-connection HTTP server that reads the request, writes `head` (status line and
/// headers, without the blank line) and then what `body` writes, and closes. Returns its base
/// URL and the task serving it.
async fn raw_server<F, Fut>(head: &'static str, body: F) -> (String, tokio::task::JoinSet<()>)
where
    F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        // The whole request, so closing leaves nothing unread (which would reset the
        // connection before the client reads the answer).
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = socket.read(&mut buf).await.unwrap();
            request.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&request);
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if request.len() >= end + 4 + length {
                    break;
                }
            }
            assert!(n > 0, "the client closed before its request was complete");
        }
        socket.write_all(head.as_bytes()).await.unwrap();
        socket.write_all(b"\r\n\r\n").await.unwrap();
        body(socket).await;
    });
    (base, tasks)
}

async fn call_once(provider: &Provider) -> Result<super::Completion, super::ProviderError> {
    call_with(provider, false).await
}

/// One call, streamed or not.
async fn call_with(
    provider: &Provider,
    streaming: bool,
) -> Result<super::Completion, super::ProviderError> {
    let key = ApiKey {
        id: "k".to_owned(),
        secret: "sk-test-0123456789".into(),
    };
    let request = ChatRequest {
        messages: vec![ChatMessage::text_message("user", "hello")],
        max_tokens: Some(20),
        ..ChatRequest::default()
    };
    let ignore = |_: &str| {};
    let call = Call {
        key: Some(&key),
        timeout: Duration::from_secs(20),
        idle_timeout: Duration::from_secs(5),
        on_delta: streaming.then_some(&ignore as &(dyn Fn(&str) + Send + Sync)),
    };
    tokio::time::timeout(
        Duration::from_secs(30),
        provider.complete(&request, "m", &call),
    )
    .await
    .expect("the call ends")
}

/// A body that never ends, or one declared larger than the limit, fails the call at the limit
/// (a server error, so the job fails over) instead of growing the worker's memory until the
/// call times out.
#[tokio::test]
async fn a_response_body_over_the_limit_fails_the_call_at_the_limit() {
    use tokio::io::AsyncWriteExt;
    let (base, _server) = raw_server(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked",
        |mut socket| async move {
            let chunk = vec![b' '; 1024 * 1024];
            let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
            framed.extend_from_slice(&chunk);
            framed.extend_from_slice(b"\r\n");
            // Until the client stops reading.
            while socket.write_all(&framed).await.is_ok() {}
        },
    )
    .await;
    let error = call_once(&openai_at(&base)).await.unwrap_err();
    assert_eq!(error.class, super::ErrorClass::ServerError, "{error:?}");
    assert!(error.message.contains("larger than 32 MiB"), "{error:?}");

    let (base, _server) = raw_server(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1073741824",
        |socket| async move {
            // Holds the connection open, sending nothing.
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(socket);
        },
    )
    .await;
    let error = call_once(&openai_at(&base)).await.unwrap_err();
    assert!(error.message.contains("larger than 32 MiB"), "{error:?}");
}

/// A stream that never ends (its deltas keep coming, so no idle timer fires) fails the call
/// once it has sent more than a response may hold, instead of growing its text until the
/// stream's time runs out.
#[tokio::test]
async fn a_stream_longer_than_a_response_may_be_fails_the_call() {
    use tokio::io::AsyncWriteExt;
    let (base, _server) = raw_server(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream",
        |mut socket| async move {
            let delta = format!(
                "data: {{\"id\":\"c1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}},\"finish_reason\":null}}]}}\n\n",
                "x".repeat(64 * 1024)
            );
            while socket.write_all(delta.as_bytes()).await.is_ok() {}
        },
    )
    .await;
    let error = call_with(&openai_at(&base), true).await.unwrap_err();
    assert_eq!(error.class, super::ErrorClass::ServerError, "{error:?}");
    assert!(error.message.contains("larger than 32 MiB"), "{error:?}");
}

/// An error status whose body breaks off is classified by its status (here a 401: the key is
/// bad, the call is not retried), not as a transport failure.
#[tokio::test]
async fn an_error_status_whose_body_breaks_off_is_classified_by_its_status() {
    use tokio::io::AsyncWriteExt;
    let (base, _server) = raw_server(
        "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: 500",
        |mut socket| async move {
            socket
                .write_all(br#"{"error":{"message":"Incorrect API key"#)
                .await
                .unwrap();
        },
    )
    .await;
    let error = call_once(&openai_at(&base)).await.unwrap_err();
    assert_eq!(error.status, Some(401), "{error:?}");
    assert_eq!(error.class, super::ErrorClass::Auth, "{error:?}");
}
