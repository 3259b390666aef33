//! Image inputs: `data:` URLs decoded and checked, and https URLs fetched and inlined for
//! providers that only take bytes (Gemini). Errors are sentences for an `invalid_request`.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Largest image fetched for inlining.
pub const MAX_IMAGE_BYTES: usize = 20 * 1024 * 1024;

/// An image as bytes: its media type and base64 data (no `data:` prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineImage {
    pub mime: String,
    pub base64: String,
}

/// Parses `data:<mime>;base64,<data>`, checking that the data decodes.
pub fn parse_data_url(url: &str) -> Result<InlineImage, String> {
    let rest = url
        .strip_prefix("data:")
        .ok_or_else(|| "image URL is not a data: URL".to_owned())?;
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| "image data URL has no ',' before its data".to_owned())?;
    let mime = meta
        .strip_suffix(";base64")
        .ok_or_else(|| "image data URL is not base64-encoded (expected ';base64,')".to_owned())?;
    if !mime.starts_with("image/") {
        return Err(format!("data URL media type {mime:?} is not an image"));
    }
    let data: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let decoded = STANDARD
        .decode(data.as_bytes())
        .map_err(|e| format!("image data URL is not valid base64: {e}"))?;
    if decoded.is_empty() {
        return Err("image data URL is empty".to_owned());
    }
    Ok(InlineImage {
        mime: mime.to_owned(),
        base64: data,
    })
}

/// Redirects an image fetch follows, as browsers and reqwest's default policy do (images often
/// sit behind a redirect to a CDN). The worker's clients follow none by themselves
/// (`transport::client_builder`), so an image's hops are followed here; its request carries
/// no key.
const MAX_IMAGE_REDIRECTS: usize = 10;

/// Fetches an http(s) image and returns it inline, its redirects and body all within
/// `timeout`. The body is read a chunk at a time and refused once it passes
/// [`MAX_IMAGE_BYTES`] (or when its `Content-Length` says it will), so a huge download never
/// sits whole in the worker's memory.
pub async fn fetch_inline(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<InlineImage, String> {
    if url.starts_with("data:") {
        return parse_data_url(url);
    }
    let mut at = url::Url::parse(url).map_err(|e| format!("image URL {url:?} is invalid: {e}"))?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut hops = 0;
    let mut response = loop {
        if !matches!(at.scheme(), "http" | "https") {
            return Err(format!(
                "image URL scheme {:?} is not supported",
                at.scheme()
            ));
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(format!(
                "cannot fetch image {url}: no answer within {timeout:?}"
            ));
        }
        let response = http
            .get(at.clone())
            .timeout(left)
            .send()
            .await
            .map_err(|e| format!("cannot fetch image {url}: {}", e.without_url()))?;
        let status = response.status();
        if !status.is_redirection() {
            if !status.is_success() {
                return Err(format!(
                    "cannot fetch image {url}: HTTP {}",
                    status.as_u16()
                ));
            }
            break response;
        }
        hops += 1;
        let next = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|location| at.join(location).ok());
        match next {
            Some(next) if hops <= MAX_IMAGE_REDIRECTS => at = next,
            Some(_) => {
                return Err(format!(
                    "cannot fetch image {url}: more than {MAX_IMAGE_REDIRECTS} redirects"
                ));
            }
            None => {
                return Err(format!(
                    "cannot fetch image {url}: HTTP {} without a usable location",
                    status.as_u16()
                ));
            }
        }
    };
    let mime = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned())
        .unwrap_or_default();
    if !mime.starts_with("image/") {
        return Err(format!("{url} is not an image (content-type {mime:?})"));
    }
    let too_large = || format!("image {url} is larger than {MAX_IMAGE_BYTES} bytes");
    let announced = response.content_length().unwrap_or(0);
    if announced > MAX_IMAGE_BYTES as u64 {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(announced as usize);
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("cannot read image {url}: {}", e.without_url()))?
    {
        if bytes.len() + chunk.len() > MAX_IMAGE_BYTES {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(InlineImage {
        mime,
        base64: STANDARD.encode(&bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_png_data_url_is_parsed() {
        let image = parse_data_url("data:image/png;base64,iVBORw0KGgo=").unwrap();
        assert_eq!(image.mime, "image/png");
        assert_eq!(image.base64, "iVBORw0KGgo=");
    }

    #[test]
    fn broken_data_urls_say_what_is_wrong() {
        assert!(
            parse_data_url("data:image/png;base64,@@@")
                .unwrap_err()
                .contains("not valid base64")
        );
        assert!(
            parse_data_url("data:image/png,abc")
                .unwrap_err()
                .contains("not base64-encoded")
        );
        assert!(
            parse_data_url("data:text/plain;base64,aGk=")
                .unwrap_err()
                .contains("not an image")
        );
        assert!(
            parse_data_url("data:image/png;base64")
                .unwrap_err()
                .contains("no ','")
        );
    }

    /// An image behind a redirect to another host is fetched through it, with a client that
    /// follows no redirect by itself (the worker's); a redirect loop ends with an error.
    #[tokio::test]
    async fn an_image_is_fetched_through_its_redirects_and_a_loop_ends() {
        use wiremock::matchers::path;
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let cdn = MockServer::start().await;
        Mock::given(path("/cat.png"))
            .respond_with(
                ResponseTemplate::new(200)
                    .insert_header("content-type", "image/png")
                    .set_body_bytes(&b"\x89PNG"[..]),
            )
            .mount(&cdn)
            .await;
        let site = MockServer::start().await;
        Mock::given(path("/cat"))
            .respond_with(
                ResponseTemplate::new(302)
                    .insert_header("location", format!("{}/cat.png", cdn.uri()).as_str()),
            )
            .mount(&site)
            .await;
        Mock::given(path("/loop"))
            .respond_with(ResponseTemplate::new(301).insert_header("location", "/loop"))
            .mount(&site)
            .await;
        let client = crate::providers::transport::worker_client(8).unwrap();
        let image = fetch_inline(
            &client,
            &format!("{}/cat", site.uri()),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(image.mime, "image/png");
        assert_eq!(image.base64, STANDARD.encode(b"\x89PNG"));
        let err = fetch_inline(
            &client,
            &format!("{}/loop", site.uri()),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(err.contains("more than 10 redirects"), "{err}");
    }

    /// An image larger than the limit is refused by its `Content-Length`, and one that does not
    /// announce its length is refused once its chunks pass the limit, before it is all read.
    #[tokio::test]
    async fn an_image_over_the_limit_is_refused_before_it_is_read_whole() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = sent.clone();
        let tasks = tokio_util::task::TaskTracker::new();
        let server = tasks.spawn(async move {
            for chunked in [false, true] {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut request = [0u8; 1024];
                let _ = socket.read(&mut request).await.unwrap();
                let length = MAX_IMAGE_BYTES + 1;
                let head = if chunked {
                    "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ntransfer-encoding: chunked\r\n\r\n".to_owned()
                } else {
                    format!("HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {length}\r\n\r\n")
                };
                socket.write_all(head.as_bytes()).await.unwrap();
                if !chunked {
                    continue;
                }
                // 1 MiB chunks, up to twice the limit; the client hangs up before the end.
                let chunk = vec![b'x'; 1024 * 1024];
                for _ in 0..2 * MAX_IMAGE_BYTES / chunk.len() {
                    let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
                    if socket.write_all(&framed).await.is_err() {
                        break;
                    }
                    counter.fetch_add(chunk.len(), std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        let client = crate::providers::transport::worker_client(8).unwrap();
        for _ in 0..2 {
            let err = fetch_inline(
                &client,
                &format!("http://{address}/big.png"),
                Duration::from_secs(20),
            )
            .await
            .unwrap_err();
            assert!(err.contains("is larger than"), "{err}");
        }
        server.await.unwrap();
        assert!(
            sent.load(std::sync::atomic::Ordering::SeqCst) < 2 * MAX_IMAGE_BYTES,
            "the reader stopped before the server sent all it had"
        );
    }

    #[tokio::test]
    async fn an_unreachable_image_is_a_clear_error() {
        let err = fetch_inline(
            &reqwest::Client::new(),
            "http://127.0.0.1:1/cat.png",
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
        assert!(
            err.contains("cannot fetch image http://127.0.0.1:1/cat.png"),
            "{err}"
        );
    }
}
