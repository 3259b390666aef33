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

/// Fetches an http(s) image and returns it inline.
pub async fn fetch_inline(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<InlineImage, String> {
    if url.starts_with("data:") {
        return parse_data_url(url);
    }
    let parsed = url::Url::parse(url).map_err(|e| format!("image URL {url:?} is invalid: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "image URL scheme {:?} is not supported",
            parsed.scheme()
        ));
    }
    let response = http
        .get(parsed)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| format!("cannot fetch image {url}: {}", e.without_url()))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!(
            "cannot fetch image {url}: HTTP {}",
            status.as_u16()
        ));
    }
    let mime = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned())
        .unwrap_or_default();
    if !mime.starts_with("image/") {
        return Err(format!("{url} is not an image (content-type {mime:?})"));
    }
    let bytes = response
        .bytes()
        .await
        .map_err(|e| format!("cannot read image {url}: {}", e.without_url()))?;
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(format!(
            "image {url} is larger than {MAX_IMAGE_BYTES} bytes"
        ));
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
