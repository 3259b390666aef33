//! The HTTP connections of one provider.
//!
//! Over HTTP/2 a `reqwest::Client` carries every call to a host on one connection, and a call
//! beyond the server's stream limit (`SETTINGS_MAX_CONCURRENT_STREAMS`, often 100–256) waits
//! inside the client for a stream to free up, its timeout running. A worker with hundreds of
//! calls out would queue most of them behind the others. So a provider that may speak HTTP/2
//! (an `https` endpoint, where TLS may negotiate it, or one configured for h2c) gets a set of
//! clients, each with its own connection, and each call leases a client carrying fewer than
//! `max_streams_per_connection` calls; when all are full, a new client joins the set. Calls
//! pack onto the first clients, so the connections in use follow the calls in flight. When the
//! calls fall back, the set shrinks with them: a last client that has carried no call for
//! [`KEEP_IDLE`] (reqwest's own idle timeout, when its connection has closed anyway) leaves the
//! set, so a burst does not keep its clients for the life of the worker, and a load going up and
//! down does not build a client, and open a connection, on every rise.
//!
//! The clients of a set share one TLS setup ([`shared_tls`]): one certificate verifier holding
//! the system's root certificates, read once when the provider is set up. Left to itself,
//! reqwest reads and parses the roots again for every client (a directory of PEM files, inside
//! the call that opens the client) and keeps its own copy, about 37 KB each.
//!
//! A plain `http` endpoint speaks HTTP/1.1, one call per connection, and shares the worker's
//! one client.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::config::{ProviderKind, ProviderSettings};

/// How long a client beyond the first may carry no call before it leaves its set: reqwest's
/// pool closes an idle connection after 90 s, so by then the client holds none.
pub const KEEP_IDLE: Duration = Duration::from_secs(90);

/// The builder every client that calls providers starts from. It follows no redirect: a key
/// travels in a header (`x-api-key`, `x-goog-api-key`) that reqwest would carry on to
/// whatever host a redirect names (it strips only `Authorization` and cookies), and no
/// provider's API redirects a call. A `3xx` answer is an error that names where it pointed
/// (`providers::send`).
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none())
}

/// The worker's one client, shared by plain `http` providers (and the other hosts of a set's
/// calls), keeping up to `idle_per_host` idle connections to a host.
pub fn worker_client(idle_per_host: usize) -> reqwest::Result<reqwest::Client> {
    client_builder()
        .pool_max_idle_per_host(idle_per_host)
        .build()
}

/// Where a provider's calls get their HTTP client.
#[derive(Debug, Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

#[derive(Debug)]
enum Inner {
    /// One client for every call (HTTP/1.1 endpoints, tests).
    Shared(reqwest::Client),
    /// Clients that each carry at most `per_connection` calls at once.
    Spread(Spread),
}

#[derive(Debug)]
struct Spread {
    /// The worker's client, for requests to other hosts.
    shared: reqwest::Client,
    per_connection: usize,
    prior_knowledge: bool,
    /// The TLS setup every client of the set is built with; `None` leaves it to reqwest.
    tls: Option<Box<rustls::ClientConfig>>,
    /// How long a last client may carry no call before it leaves the set ([`KEEP_IDLE`]).
    keep_idle: Duration,
    slots: Mutex<Vec<Slot>>,
}

#[derive(Debug)]
struct Slot {
    client: reqwest::Client,
    in_flight: usize,
    /// When its last call ended, while it carries none.
    idle_since: Option<Instant>,
}

impl Slot {
    fn new(client: reqwest::Client) -> Self {
        Self {
            client,
            in_flight: 0,
            idle_since: None,
        }
    }
}

/// A client for one call; the call's stream slot is given back when the lease is dropped, so
/// hold it until the response (or its stream) has been read.
#[derive(Debug)]
pub struct Lease {
    client: reqwest::Client,
    slot: Option<(Arc<Inner>, usize)>,
}

impl Transport {
    /// The transport `settings` call for: `shared` for plain `http` endpoints, a set of
    /// clients for `https` ones and for `http2_prior_knowledge`.
    pub fn for_provider(settings: &ProviderSettings, shared: &reqwest::Client) -> Self {
        if !may_speak_http2(settings) {
            return Self::from(shared.clone());
        }
        Self::spread(
            usize::try_from(settings.max_streams_per_connection).unwrap_or(usize::MAX),
            settings.http2_prior_knowledge,
            shared,
        )
    }

    /// Clients that each carry at most `per_connection` calls.
    pub fn spread(per_connection: usize, prior_knowledge: bool, shared: &reqwest::Client) -> Self {
        Self::spread_keeping_idle(per_connection, prior_knowledge, shared, KEEP_IDLE)
    }

    fn spread_keeping_idle(
        per_connection: usize,
        prior_knowledge: bool,
        shared: &reqwest::Client,
        keep_idle: Duration,
    ) -> Self {
        let spread = Spread {
            shared: shared.clone(),
            per_connection: per_connection.max(1),
            prior_knowledge,
            tls: shared_tls(prior_knowledge).map(Box::new),
            keep_idle,
            slots: Mutex::new(Vec::new()),
        };
        let first = spread.build().unwrap_or_else(|| shared.clone());
        spread
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Slot::new(first));
        Self {
            inner: Arc::new(Inner::Spread(spread)),
        }
    }

    /// A client for one call: the first one carrying fewer than the limit, or a new one.
    pub fn lease(&self) -> Lease {
        let spread = match &*self.inner {
            Inner::Shared(client) => {
                return Lease {
                    client: client.clone(),
                    slot: None,
                };
            }
            Inner::Spread(spread) => spread,
        };
        let mut slots = spread.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let free = slots
            .iter()
            .position(|slot| slot.in_flight < spread.per_connection);
        let index = match free {
            Some(index) => index,
            None => {
                // Built without the lock, so other calls lease meanwhile; two calls may both
                // build, which only adds a client.
                drop(slots);
                let built = spread.build();
                slots = spread.slots.lock().unwrap_or_else(PoisonError::into_inner);
                match built {
                    Some(client) => {
                        slots.push(Slot::new(client));
                        slots.len() - 1
                    }
                    // A client that cannot be built now leaves the call on the least busy one.
                    None => least_busy(&slots),
                }
            }
        };
        let slot = &mut slots[index];
        slot.in_flight += 1;
        slot.idle_since = None;
        Lease {
            client: slot.client.clone(),
            slot: Some((Arc::clone(&self.inner), index)),
        }
    }

    /// The worker's client, for requests to hosts other than the provider's (image
    /// downloads), which must not inherit the provider's HTTP/2 settings.
    pub fn shared(&self) -> &reqwest::Client {
        match &*self.inner {
            Inner::Shared(client) => client,
            Inner::Spread(spread) => &spread.shared,
        }
    }
}

/// Whether calls to `settings`' provider may go over HTTP/2: an `https` endpoint (TLS may
/// negotiate it) or one configured for h2c. A plain `http` endpoint speaks HTTP/1.1.
fn may_speak_http2(settings: &ProviderSettings) -> bool {
    settings.http2_prior_knowledge
        || settings
            .base_url
            .as_deref()
            .is_some_and(|url| url.starts_with("https://"))
}

/// At most `http1_max_connections` calls at once to a provider spoken to over HTTP/1.1,
/// where each call being sent holds a connection of its own. hyper gives every connection a
/// dispatch channel and write and read buffers of its own (about 20 KB of heap) and reqwest
/// sizes none of them, so a worker with 10,000 jobs in flight to a slow provider opened some
/// 4,000 connections, and they were the largest part of its memory (bench/RESULTS.md, stop 30).
/// A call beyond the cap waits, first come first served, for one to end.
#[derive(Debug)]
pub struct ConnectionCap {
    permits: Semaphore,
    max: u32,
}

impl ConnectionCap {
    /// The cap of `settings`' provider; `None` where calls share HTTP/2 connections (or may)
    /// and for the built-in provider, which calls nothing.
    pub fn for_provider(settings: &ProviderSettings) -> Option<Self> {
        if settings.kind == ProviderKind::Extractive || may_speak_http2(settings) {
            return None;
        }
        let max = settings.http1_max_connections;
        Some(Self {
            permits: Semaphore::new(usize::try_from(max).map_or(Semaphore::MAX_PERMITS, |max| {
                max.min(Semaphore::MAX_PERMITS)
            })),
            max,
        })
    }

    /// A connection's turn, waited for at most `within`; held until the call has ended. The
    /// error says why there was none.
    pub async fn wait(&self, within: Duration) -> Result<Connection<'_>, String> {
        // Usually one is free: no timer is set up for it.
        if let Ok(permit) = self.permits.try_acquire() {
            return Ok(Connection {
                _permit: permit,
                queued: false,
            });
        }
        match tokio::time::timeout(within, self.permits.acquire()).await {
            Ok(Ok(permit)) => Ok(Connection {
                _permit: permit,
                queued: true,
            }),
            // The semaphore is never closed; an error is reported like the wait running out.
            Ok(Err(_)) | Err(_) => Err(self.none_in(within)),
        }
    }

    /// Why a call got no connection within `within`.
    pub fn none_in(&self, within: Duration) -> String {
        format!(
            "no connection to the provider came free within {within:?}: all {} \
             (http1_max_connections) were carrying calls",
            self.max
        )
    }
}

/// A call's turn on one of the provider's connections, given back when dropped.
#[derive(Debug)]
pub struct Connection<'a> {
    _permit: SemaphorePermit<'a>,
    /// Whether the call had to wait for it.
    pub queued: bool,
}

/// The TLS setup reqwest would build for a client, built once for a whole set: the platform's
/// verifier (the system's root certificates), TLS 1.2 and 1.3, and ALPN offering `h2` (and
/// `http/1.1`, unless the provider is configured for HTTP/2 only), as reqwest offers them.
/// `None`, with a warning, when the system's roots cannot be loaded: each client then tries
/// again itself.
fn shared_tls(prior_knowledge: bool) -> Option<rustls::ClientConfig> {
    use rustls_platform_verifier::BuilderVerifierExt as _;

    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let built = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| builder.with_platform_verifier());
    match built {
        Ok(builder) => {
            let mut config = builder.with_no_client_auth();
            config.alpn_protocols = if prior_knowledge {
                vec![b"h2".to_vec()]
            } else {
                vec![b"h2".to_vec(), b"http/1.1".to_vec()]
            };
            Some(config)
        }
        Err(error) => {
            tracing::warn!(%error, "cannot set up TLS once for a provider's clients; each client sets up its own");
            None
        }
    }
}

fn least_busy(slots: &[Slot]) -> usize {
    slots
        .iter()
        .enumerate()
        .min_by_key(|(_, slot)| slot.in_flight)
        .map_or(0, |(index, _)| index)
}

impl Spread {
    fn build(&self) -> Option<reqwest::Client> {
        let mut builder = client_builder().pool_max_idle_per_host(self.per_connection);
        if let Some(tls) = &self.tls {
            builder = builder.tls_backend_preconfigured(rustls::ClientConfig::clone(tls));
        }
        let builder = if self.prior_knowledge {
            builder.http2_prior_knowledge()
        } else {
            builder
        };
        match builder.build() {
            Ok(client) => Some(client),
            Err(error) => {
                tracing::warn!(%error, "cannot build another HTTP client; calls share the existing ones");
                None
            }
        }
    }
}

impl From<reqwest::Client> for Transport {
    fn from(client: reqwest::Client) -> Self {
        Self {
            inner: Arc::new(Inner::Shared(client)),
        }
    }
}

impl std::ops::Deref for Lease {
    type Target = reqwest::Client;

    fn deref(&self) -> &reqwest::Client {
        &self.client
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some((inner, index)) = self.slot.take()
            && let Inner::Spread(spread) = &*inner
        {
            let now = Instant::now();
            let mut slots = spread.slots.lock().unwrap_or_else(PoisonError::into_inner);
            let slot = &mut slots[index];
            slot.in_flight -= 1;
            if slot.in_flight == 0 {
                slot.idle_since = Some(now);
            }
            // Only trailing clients go, so no lease's index moves; the first always stays.
            let mut gone = Vec::new();
            while slots.len() > 1
                && slots
                    .last()
                    .and_then(|last| last.idle_since)
                    .is_some_and(|since| now.saturating_duration_since(since) >= spread.keep_idle)
            {
                gone.extend(slots.pop());
            }
            drop(slots);
            drop(gone);
        }
    }
}

/// A provider's request URL, parsed once when the provider is built. Given a `String`, reqwest
/// parses it again on every call (the host's IDNA mapping and the path), about 1% of a worker's
/// CPU in the healthy benchmark's profile; reqwest still parses the response's URL itself. A
/// URL that does not parse stays text, so its calls fail with reqwest's own error, as they
/// always did.
#[derive(Debug)]
pub enum Endpoint {
    Parsed(reqwest::Url),
    Unparsed(String),
}

impl Endpoint {
    /// `path` (which starts with `/`) under `base_url`, whose trailing slashes are dropped, as
    /// the official SDKs join them.
    pub fn under(base_url: &str, path: &str) -> Self {
        let url = format!("{}{path}", base_url.trim_end_matches('/'));
        match reqwest::Url::parse(&url) {
            Ok(parsed) => Self::Parsed(parsed),
            Err(_) => Self::Unparsed(url),
        }
    }

    /// A POST to this endpoint on `client`.
    pub fn post(&self, client: &reqwest::Client) -> reqwest::RequestBuilder {
        match self {
            Self::Parsed(url) => client.post(url.clone()),
            Self::Unparsed(text) => client.post(text.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::SocketAddr;

    use axum::extract::{ConnectInfo, State};
    use axum::http::Version;

    use super::*;

    fn in_flight(transport: &Transport) -> Vec<usize> {
        let Inner::Spread(spread) = &*transport.inner else {
            panic!("not a spread transport");
        };
        spread
            .slots
            .lock()
            .unwrap()
            .iter()
            .map(|slot| slot.in_flight)
            .collect()
    }

    #[test]
    fn calls_pack_onto_the_first_client_with_room_and_give_their_slot_back() {
        let transport = Transport::spread(2, false, &reqwest::Client::new());
        let first = transport.lease();
        let second = transport.lease();
        assert_eq!(in_flight(&transport), vec![2]);
        let third = transport.lease();
        assert_eq!(in_flight(&transport), vec![2, 1]);
        drop(first);
        assert_eq!(in_flight(&transport), vec![1, 1]);
        // The freed slot on the first client is taken before the second client's.
        let fourth = transport.lease();
        assert_eq!(in_flight(&transport), vec![2, 1]);
        drop((second, third, fourth));
        assert_eq!(in_flight(&transport), vec![0, 0]);
    }

    #[test]
    fn clients_idle_for_the_keep_idle_time_leave_the_set_from_its_end() {
        let keep_idle = Duration::from_millis(200);
        let transport =
            Transport::spread_keeping_idle(2, false, &reqwest::Client::new(), keep_idle);
        let mut leases: Vec<Lease> = (0..7).map(|_| transport.lease()).collect();
        assert_eq!(in_flight(&transport), vec![2, 2, 2, 1]);
        // Calls end on the last two clients: both stay while they have been idle only briefly.
        leases.truncate(4);
        assert_eq!(in_flight(&transport), vec![2, 2, 0, 0]);
        std::thread::sleep(keep_idle);
        // The next call to end finds them idle for long enough: they go, from the end.
        leases.truncate(3);
        assert_eq!(in_flight(&transport), vec![2, 1]);
        // A call packs onto the remaining clients; once they are idle long enough, the set
        // shrinks again, down to its first client, which always stays.
        let again = transport.lease();
        assert_eq!(in_flight(&transport), vec![2, 2]);
        drop(again);
        leases.clear();
        std::thread::sleep(keep_idle);
        drop(transport.lease());
        assert_eq!(in_flight(&transport), vec![0]);
    }

    #[test]
    fn a_set_keeps_its_idle_clients_until_reqwest_would_have_closed_their_connections() {
        let transport = Transport::spread(1, false, &reqwest::Client::new());
        let leases: Vec<Lease> = (0..3).map(|_| transport.lease()).collect();
        drop(leases);
        assert_eq!(in_flight(&transport), vec![0, 0, 0]);
        assert_eq!(KEEP_IDLE, Duration::from_secs(90));
    }

    #[test]
    fn plain_http_shares_the_workers_client_and_https_or_h2c_spreads() {
        let mut settings = crate::config::Settings::default().all_providers().remove(0);
        let shared = reqwest::Client::new();
        settings.base_url = Some("http://127.0.0.1:9/v1".to_owned());
        assert!(matches!(
            &*Transport::for_provider(&settings, &shared).inner,
            Inner::Shared(_)
        ));
        settings.http2_prior_knowledge = true;
        assert!(matches!(
            &*Transport::for_provider(&settings, &shared).inner,
            Inner::Spread(Spread {
                prior_knowledge: true,
                ..
            })
        ));
        settings.http2_prior_knowledge = false;
        settings.base_url = Some("https://api.example.com/v1".to_owned());
        settings.max_streams_per_connection = 7;
        assert!(matches!(
            &*Transport::for_provider(&settings, &shared).inner,
            Inner::Spread(Spread {
                per_connection: 7,
                prior_knowledge: false,
                ..
            })
        ));
    }

    /// Per connection: calls open now, the most open at once, and the HTTP versions seen.
    #[derive(Default)]
    struct Seen {
        open: HashMap<SocketAddr, usize>,
        most: HashMap<SocketAddr, usize>,
        http2: usize,
        other: usize,
    }

    async fn slow(
        State((seen, release)): State<(Arc<Mutex<Seen>>, Arc<tokio::sync::Notify>)>,
        ConnectInfo(peer): ConnectInfo<SocketAddr>,
        version: Version,
    ) -> &'static str {
        {
            let mut seen = seen.lock().unwrap();
            if version == Version::HTTP_2 {
                seen.http2 += 1;
            } else {
                seen.other += 1;
            }
            let open = seen.open.entry(peer).or_default();
            *open += 1;
            let now = *open;
            let most = seen.most.entry(peer).or_default();
            *most = (*most).max(now);
        }
        release.notified().await;
        *seen.lock().unwrap().open.get_mut(&peer).unwrap() -= 1;
        "ok"
    }

    #[tokio::test]
    async fn h2c_calls_beyond_the_stream_limit_open_another_connection() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let release = Arc::new(tokio::sync::Notify::new());
        let app = axum::Router::new()
            .route("/", axum::routing::get(slow))
            .with_state((Arc::clone(&seen), Arc::clone(&release)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let tasks = tokio_util::task::TaskTracker::new();
        tasks.spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
        });

        let transport = Transport::spread(3, true, &reqwest::Client::new());
        let calls: Vec<_> = (0..10)
            .map(|_| {
                let transport = transport.clone();
                tasks.spawn(async move {
                    let http = transport.lease();
                    let response = http.get(format!("http://{address}/")).send().await?;
                    response.text().await
                })
            })
            .collect();
        // Every call reaches the server before any is answered: none waits in a client.
        tokio::time::timeout(std::time::Duration::from_secs(20), async {
            loop {
                let open: usize = seen.lock().unwrap().open.values().sum();
                if open == 10 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("all ten calls reach the server at once");
        release.notify_waiters();
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap(), "ok");
        }
        let seen = seen.lock().unwrap();
        assert_eq!((seen.http2, seen.other), (10, 0), "every call is HTTP/2");
        assert_eq!(
            seen.most.len(),
            4,
            "10 calls at 3 per connection: 4 connections"
        );
        assert!(
            seen.most.values().all(|most| *most <= 3),
            "no connection carries more than 3 calls: {:?}",
            seen.most
        );
        assert_eq!(in_flight(&transport), vec![0, 0, 0, 0]);
    }

    /// Runs `tls_calls_share_one_setup_and_negotiate_http2` in a child process whose system
    /// roots are the test CA (`SSL_CERT_FILE`, which the platform verifier reads on Linux): a
    /// test cannot change its own environment (`unsafe_code` is forbidden) and must not add
    /// a test CA to the machine.
    #[test]
    fn tls_clients_verify_with_the_system_roots_and_offer_http2_and_http1() {
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "providers::transport::tests::tls_calls_share_one_setup_and_negotiate_http2",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("SSL_CERT_FILE", fixture("ca.crt"))
            .env_remove("SSL_CERT_DIR")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "the TLS test failed:\n{stdout}\n{stderr}"
        );
    }

    fn fixture(name: &str) -> String {
        format!("{}/tests/fixtures/tls/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    /// A TLS server on loopback with the test CA's `localhost` certificate, offering `alpn`;
    /// answers "ok" over HTTP/2 or HTTP/1.1, whichever was negotiated, and records it.
    async fn tls_server(
        alpn: &[&[u8]],
        tasks: &tokio_util::task::TaskTracker,
    ) -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let certs = CertificateDer::pem_file_iter(fixture("localhost.crt"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(fixture("localhost.key")).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let negotiated = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&negotiated);
        let connections = tasks.clone();
        tasks.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, seen) = (acceptor.clone(), Arc::clone(&seen));
                connections.spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let protocol = tls.get_ref().1.alpn_protocol().unwrap_or_default().to_vec();
                    seen.lock().unwrap().push(protocol.clone());
                    if protocol == b"h2" {
                        let Ok(mut connection) = h2::server::handshake(tls).await else {
                            return;
                        };
                        while let Some(Ok((_, mut respond))) = connection.accept().await {
                            if let Ok(mut body) = respond.send_response(http::Response::new(()), false) {
                                let _ = body.send_data(bytes::Bytes::from_static(b"ok"), true);
                            }
                        }
                    } else {
                        let mut request = Vec::new();
                        let mut chunk = [0; 1024];
                        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                            match tls.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => request.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let _ = tls
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                            .await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        (address, negotiated)
    }

    #[tokio::test]
    #[ignore = "run by tls_clients_verify_with_the_system_roots_and_offer_http2_and_http1, with SSL_CERT_FILE set"]
    async fn tls_calls_share_one_setup_and_negotiate_http2() {
        let tasks = tokio_util::task::TaskTracker::new();
        let transport = Transport::spread(2, false, &reqwest::Client::new());
        let Inner::Spread(spread) = &*transport.inner else {
            panic!("not a spread transport");
        };
        assert!(spread.tls.is_some(), "the shared TLS setup was built");

        // Three calls at two per connection: two clients, both built from the shared setup,
        // each verifying the server against the (test) system roots and negotiating HTTP/2.
        let (address, negotiated) = tls_server(&[b"h2", b"http/1.1"], &tasks).await;
        let leases: Vec<Lease> = (0..3).map(|_| transport.lease()).collect();
        assert_eq!(in_flight(&transport), vec![2, 1]);
        let url = format!("https://localhost:{}/", address.port());
        for http in &leases {
            let response = http.get(&url).send().await.unwrap();
            assert_eq!(response.version(), reqwest::Version::HTTP_2);
            assert_eq!(response.text().await.unwrap(), "ok");
        }
        assert_eq!(*negotiated.lock().unwrap(), vec![b"h2".to_vec(); 2]);
        drop(leases);

        // A server that speaks only HTTP/1.1 is reached over it: the clients offer both.
        let (address, negotiated) = tls_server(&[b"http/1.1"], &tasks).await;
        let http = transport.lease();
        let response = http
            .get(format!("https://localhost:{}/", address.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_11);
        assert_eq!(response.text().await.unwrap(), "ok");
        assert_eq!(*negotiated.lock().unwrap(), vec![b"http/1.1".to_vec()]);

        // The certificate must name the host called: the verifier checks names, not only roots.
        let refused = reqwest::Client::builder()
            .tls_backend_preconfigured(*spread.tls.clone().unwrap())
            .resolve("other.example", address)
            .build()
            .unwrap()
            .get(format!("https://other.example:{}/", address.port()))
            .send()
            .await;
        assert!(
            refused.is_err(),
            "a certificate for another name is refused"
        );
    }

    #[tokio::test]
    async fn every_client_of_a_set_is_built_from_the_sets_tls_setup() {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;

        // A setup that trusts only the test CA: a client built without it (with the system's
        // roots, which do not hold the test CA) would refuse the server's certificate.
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(fixture("ca.crt")).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let transport = Transport {
            inner: Arc::new(Inner::Spread(Spread {
                shared: reqwest::Client::new(),
                per_connection: 1,
                prior_knowledge: false,
                tls: Some(Box::new(tls)),
                keep_idle: KEEP_IDLE,
                slots: Mutex::new(Vec::new()),
            })),
        };
        let tasks = tokio_util::task::TaskTracker::new();
        let (address, negotiated) = tls_server(&[b"h2", b"http/1.1"], &tasks).await;
        let leases: Vec<Lease> = (0..2).map(|_| transport.lease()).collect();
        assert_eq!(in_flight(&transport), vec![1, 1], "two clients built");
        for http in &leases {
            let response = http
                .get(format!("https://localhost:{}/", address.port()))
                .send()
                .await
                .unwrap();
            assert_eq!(response.text().await.unwrap(), "ok");
        }
        assert_eq!(*negotiated.lock().unwrap(), vec![b"h2".to_vec(); 2]);
    }

    #[test]
    fn an_endpoint_is_parsed_once_and_an_unparsable_one_fails_its_calls_as_before() {
        let client = reqwest::Client::new();
        let endpoint = Endpoint::under("http://127.0.0.1:9/v1/", "/chat/completions");
        assert!(matches!(endpoint, Endpoint::Parsed(_)));
        let request = endpoint.post(&client).build().unwrap();
        assert_eq!(request.method(), reqwest::Method::POST);
        assert_eq!(
            request.url().as_str(),
            "http://127.0.0.1:9/v1/chat/completions"
        );

        let broken = Endpoint::under("no scheme", "/chat/completions");
        assert!(matches!(broken, Endpoint::Unparsed(_)));
        let error = broken.post(&client).build().unwrap_err();
        assert!(error.is_builder(), "{error}");
    }
}
