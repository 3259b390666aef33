//! Image inputs: `data:` URLs decoded and checked, and https URLs fetched and inlined for
//! providers that only take bytes (Gemini). Errors are sentences for an `invalid_request`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
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

/// Where images are fetched from. An `image_url` is the job's input, so by default the worker
/// fetches only from public addresses: a loopback, private, link-local, shared (CGNAT),
/// unique-local or otherwise reserved one would let a job make the worker send requests into
/// its own network (server-side request forgery; cloud metadata services answer at
/// 169.254.169.254). A host name is checked where it resolves, by the client's own resolver
/// ([`PublicOnly`]), so the address checked is the address connected to; an address written
/// in the URL is checked before each request, redirects included. The proxy environment
/// variables (`HTTPS_PROXY`, …) are not used: a proxy would resolve the name itself.
/// `allow_private_image_hosts` (a provider setting) lifts the check, for images served
/// inside the network on purpose, and then proxies apply as for any client.
#[derive(Debug, Clone)]
pub struct ImageFetcher {
    /// Without redirects (they are followed here, each checked); `Err` says why none could
    /// be built, and every fetch then fails with it.
    client: Result<reqwest::Client, String>,
    private_hosts: bool,
}

impl ImageFetcher {
    /// Fetches from public addresses only, or from any address with `private_hosts`.
    pub fn new(private_hosts: bool) -> Self {
        let builder = super::transport::client_builder();
        let builder = if private_hosts {
            builder
        } else {
            builder.no_proxy().dns_resolver(PublicOnly)
        };
        Self {
            client: builder
                .build()
                .map_err(|e| format!("no HTTP client to fetch images with: {e}")),
            private_hosts,
        }
    }

    /// Why `url`'s host may not be fetched from, if it is an address that is not public.
    fn refuse(&self, url: &url::Url) -> Option<String> {
        let ip = match url.host()? {
            url::Host::Ipv4(ip) => IpAddr::V4(ip),
            url::Host::Ipv6(ip) => IpAddr::V6(ip),
            url::Host::Domain(_) => return None,
        };
        (!self.private_hosts && !is_public(ip)).then(|| {
            format!(
                "image host {ip} is not a public address (the provider's \
                 allow_private_image_hosts = true fetches from such hosts)"
            )
        })
    }
}

/// A resolver that keeps only a name's public addresses, and fails for a name that has none.
#[derive(Debug)]
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|address| is_public(address.ip()))
                .collect();
            if resolved.is_empty() {
                return Err(format!(
                    "{host} resolves to no public address (the provider's \
                     allow_private_image_hosts = true fetches from such hosts)"
                )
                .into());
            }
            Ok(Box::new(resolved.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Whether `ip` is an address on the public internet: not loopback, unspecified, private,
/// link-local, shared (100.64.0.0/10), multicast, broadcast, documentation, benchmarking or
/// reserved, nor an IPv6 address that is unique-local, link-local, site-local, discard-only,
/// Teredo or in IETF protocol space (2001::/23), nor one that wraps a non-public IPv4 address
/// (IPv4-mapped or -compatible, NAT64, 6to4). Close to Python's `ipaddress` `is_global`.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        // `::` and `::1` too, as 0.0.0.0 and 0.0.0.1.
        IpAddr::V6(ip) => match ip
            .to_ipv4()
            .or_else(|| nat64(ip))
            .or_else(|| six_to_four(ip))
        {
            Some(wrapped) => is_public_v4(wrapped),
            None => {
                let [a, b, c, d, ..] = ip.segments();
                !(ip.is_multicast()
                    || ip.is_unique_local()
                    || ip.is_unicast_link_local()
                    // Site-local (deprecated), fec0::/10.
                    || a & 0xffc0 == 0xfec0
                    // Documentation, 2001:db8::/32.
                    || (a, b) == (0x2001, 0x0db8)
                    // IETF protocol assignments and Teredo, 2001::/23.
                    || (a == 0x2001 && b < 0x0200)
                    // Local-use NAT64, 64:ff9b:1::/48.
                    || (a, b, c) == (0x64, 0xff9b, 1)
                    // Discard-only, 100::/64.
                    || (a, b, c, d) == (0x100, 0, 0, 0))
            }
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && b & 0xc0 == 64)
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && b & 0xfe == 18)
        || a >= 240)
}

/// The IPv4 address inside a NAT64 one (64:ff9b::/96).
fn nat64(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let [a, b, c, d, e, f, g, h] = ip.segments();
    ([a, b, c, d, e, f] == [0x64, 0xff9b, 0, 0, 0, 0]).then(|| ipv4_of(g, h))
}

/// The IPv4 address inside a 6to4 one (2002::/16).
fn six_to_four(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let [a, b, c, ..] = ip.segments();
    (a == 0x2002).then(|| ipv4_of(b, c))
}

fn ipv4_of(high: u16, low: u16) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(high) << 16) | u32::from(low))
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
    images: &ImageFetcher,
    url: &str,
    timeout: Duration,
) -> Result<InlineImage, String> {
    if url.starts_with("data:") {
        return parse_data_url(url);
    }
    let http = images.client.as_ref().map_err(Clone::clone)?;
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
        if let Some(refused) = images.refuse(&at) {
            return Err(format!("cannot fetch image {url}: {refused}"));
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
            .map_err(|e| format!("cannot fetch image {url}: {}", super::strip_url(&e)))?;
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
        .map_err(|e| format!("cannot read image {url}: {}", super::strip_url(&e)))?
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

/// A server on 127.0.0.1 answering `GET /cat.png` with a PNG.
#[cfg(test)]
pub async fn serve_png() -> wiremock::MockServer {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/cat.png"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-type", "image/png")
                .set_body_bytes(b"\x89PNG".to_vec()),
        )
        .mount(&server)
        .await;
    server
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
        let client = ImageFetcher::new(true);
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
        let client = ImageFetcher::new(true);
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
            &ImageFetcher::new(true),
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

    #[test]
    fn only_addresses_on_the_public_internet_are_public() {
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2a00:1450:4001::200e",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "192.0.0.8",
            "198.18.0.1",
            "192.0.2.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::a9fe:a9fe",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a9fe:a9fe",
            "2002:7f00:1::1",
            "2001::1",
            "2001:1ff::1",
            "fec0::1",
            "100::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
    }

    /// By default an image is fetched only from a public address: a job's `image_url` must not
    /// make the worker call into its own network, by an address or by a name resolving there.
    #[tokio::test]
    async fn an_image_on_a_private_address_is_refused_unless_the_provider_allows_it() {
        let server = serve_png().await;
        let port = server.address().port();
        let within = Duration::from_secs(5);
        let public_only = ImageFetcher::new(false);
        for url in [
            format!("http://127.0.0.1:{port}/cat.png"),
            format!("http://[::ffff:127.0.0.1]:{port}/cat.png"),
        ] {
            let err = fetch_inline(&public_only, &url, within).await.unwrap_err();
            assert!(
                err.contains("is not a public address")
                    && err.contains("allow_private_image_hosts"),
                "{err}"
            );
        }
        let by_name = format!("http://localhost:{port}/cat.png");
        let err = fetch_inline(&public_only, &by_name, within)
            .await
            .unwrap_err();
        assert!(err.contains("resolves to no public address"), "{err}");
        assert!(server.received_requests().await.unwrap().is_empty());
        let image = fetch_inline(&ImageFetcher::new(true), &by_name, within)
            .await
            .unwrap();
        assert_eq!(image.mime, "image/png");
    }
}
