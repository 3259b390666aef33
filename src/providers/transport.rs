//! The HTTP connections of one provider.
//!
//! Over HTTP/2 a `reqwest::Client` carries every call to a host on one connection, and a call
//! beyond the server's stream limit (`SETTINGS_MAX_CONCURRENT_STREAMS`, often 100–256) waits
//! inside the client for a stream to free up, its timeout running. A worker with hundreds of
//! calls out would queue most of them behind the others. So a provider that may speak HTTP/2
//! (an `https` endpoint, where TLS may negotiate it, or one configured for h2c) gets a set of
//! clients, each with its own connection, and each call leases a client carrying fewer than
//! `max_streams_per_connection` calls; when all are full, a new client joins the set. Calls
//! pack onto the first clients, so the connections in use follow the calls in flight. A client
//! stays in the set once built (its idle connection closes after reqwest's 90 s idle timeout);
//! each keeps its own copy of the root certificates, about 40 KB.
//!
//! A plain `http` endpoint speaks HTTP/1.1, one call per connection, and shares the worker's
//! one client.

use std::sync::{Arc, Mutex, PoisonError};

use crate::config::ProviderSettings;

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
    slots: Mutex<Vec<Slot>>,
}

#[derive(Debug)]
struct Slot {
    client: reqwest::Client,
    in_flight: usize,
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
        let https = settings
            .base_url
            .as_deref()
            .is_some_and(|url| url.starts_with("https://"));
        if !https && !settings.http2_prior_knowledge {
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
        let spread = Spread {
            shared: shared.clone(),
            per_connection: per_connection.max(1),
            prior_knowledge,
            slots: Mutex::new(Vec::new()),
        };
        let first = spread.build().unwrap_or_else(|| shared.clone());
        spread
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Slot {
                client: first,
                in_flight: 0,
            });
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
                // Built without the lock (building reads the system's root certificates), so
                // other calls lease meanwhile; two calls may both build, which only adds a client.
                drop(slots);
                let built = spread.build();
                slots = spread.slots.lock().unwrap_or_else(PoisonError::into_inner);
                match built {
                    Some(client) => {
                        slots.push(Slot {
                            client,
                            in_flight: 0,
                        });
                        slots.len() - 1
                    }
                    // A client that cannot be built now leaves the call on the least busy one.
                    None => least_busy(&slots),
                }
            }
        };
        let slot = &mut slots[index];
        slot.in_flight += 1;
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

fn least_busy(slots: &[Slot]) -> usize {
    slots
        .iter()
        .enumerate()
        .min_by_key(|(_, slot)| slot.in_flight)
        .map_or(0, |(index, _)| index)
}

impl Spread {
    fn build(&self) -> Option<reqwest::Client> {
        let builder = reqwest::Client::builder().pool_max_idle_per_host(self.per_connection);
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
            let mut slots = spread.slots.lock().unwrap_or_else(PoisonError::into_inner);
            slots[index].in_flight -= 1;
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
}
