//! The provider boundary: one adapter per wire format behind the [`Provider`] enum, the
//! registry built from config, and the error classes every failure is mapped to.

pub mod extractive;
pub mod openai;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use serde_json::Value;

use crate::config::{ModelSettings, ProviderKind, ProviderSettings, Settings};
use crate::messages::{ChatRequest, Usage};

/// A successful provider call, normalised.
#[derive(Debug, Clone)]
pub struct Completion {
    /// OpenAI `chat.completion` object.
    pub response: Value,
    pub usage: Usage,
}

/// Why a provider call failed, in the vocabulary of `providers-wire.md` §6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    RateLimited,
    Overloaded,
    ServerError,
    Timeout,
    StreamInterrupted,
    Conflict,
    QuotaExhausted,
    Auth,
    InvalidRequest,
    ContentFiltered,
    ContextLength,
}

impl ErrorClass {
    /// The snake_case name stored in attempts and results.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::Overloaded => "overloaded",
            ErrorClass::ServerError => "server_error",
            ErrorClass::Timeout => "timeout",
            ErrorClass::StreamInterrupted => "stream_interrupted",
            ErrorClass::Conflict => "conflict",
            ErrorClass::QuotaExhausted => "quota_exhausted",
            ErrorClass::Auth => "auth",
            ErrorClass::InvalidRequest => "invalid_request",
            ErrorClass::ContentFiltered => "content_filtered",
            ErrorClass::ContextLength => "context_length",
        }
    }

    /// Whether another target may succeed where this one failed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorClass::RateLimited
                | ErrorClass::Overloaded
                | ErrorClass::ServerError
                | ErrorClass::Timeout
                | ErrorClass::StreamInterrupted
                | ErrorClass::Conflict
        )
    }
}

/// A failed provider call. `raw_response` keeps (an excerpt of) the body for diagnosis.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{provider_type} {}: {message}", .class.as_str())]
pub struct ProviderError {
    pub class: ErrorClass,
    pub provider_type: &'static str,
    pub status: Option<u16>,
    pub message: String,
    pub raw_response: Option<String>,
    /// Usage the provider reported despite the failure (billed all the same).
    pub usage: Option<Usage>,
}

impl ProviderError {
    pub fn new(provider_type: &'static str, class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            provider_type,
            status: None,
            message: message.into(),
            raw_response: None,
            usage: None,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.class.is_retryable()
    }
}

/// An API key by id; the secret is only exposed when building a request.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: String,
    pub secret: SecretString,
}

/// One adapter per wire format, dispatched by enum rather than trait object.
#[derive(Debug)]
pub enum Provider {
    Extractive(extractive::ExtractiveProvider),
    OpenAi(openai::OpenAiProvider),
}

impl Provider {
    /// Runs one chat completion against `model`.
    pub async fn complete(
        &self,
        request: &ChatRequest,
        model: &str,
    ) -> Result<Completion, ProviderError> {
        match self {
            Provider::Extractive(p) => p.complete(request, model),
            Provider::OpenAi(p) => p.complete(request, model).await,
        }
    }

    /// The id of the key the next call will use, if the provider uses keys.
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Provider::Extractive(_) => None,
            Provider::OpenAi(p) => p.key_id(),
        }
    }
}

/// A configured provider: its client and the models (with prices) it serves.
#[derive(Debug)]
pub struct ProviderEntry {
    pub name: String,
    pub client: Provider,
    pub models: HashMap<String, ModelSettings>,
}

impl ProviderEntry {
    /// The model's settings; the built-in provider serves any model name at zero cost.
    pub fn model(&self, name: &str) -> Option<&ModelSettings> {
        self.models.get(name)
    }
}

/// Every provider of the config, by name.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    entries: Arc<HashMap<String, Arc<ProviderEntry>>>,
}

impl Registry {
    /// Builds clients for every configured provider. Keys are read from their environment
    /// variables here; a missing variable leaves that key out (logged, without its value).
    pub fn from_settings(settings: &Settings, http: &reqwest::Client) -> Self {
        let entries = settings
            .all_providers()
            .into_iter()
            .map(|p| (p.name.clone(), Arc::new(build_entry(&p, http))))
            .collect();
        Self {
            entries: Arc::new(entries),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ProviderEntry>> {
        self.entries.get(name)
    }
}

fn build_entry(settings: &ProviderSettings, http: &reqwest::Client) -> ProviderEntry {
    let client = match settings.kind {
        ProviderKind::Extractive => Provider::Extractive(extractive::ExtractiveProvider),
        ProviderKind::Openai => {
            let keys = settings
                .keys
                .iter()
                .filter_map(|key| match std::env::var(&key.env) {
                    Ok(secret) if !secret.is_empty() => Some(ApiKey {
                        id: key.id.clone(),
                        secret: SecretString::from(secret),
                    }),
                    _ => {
                        tracing::warn!(
                            provider = %settings.name,
                            key_id = %key.id,
                            env = %key.env,
                            "API key environment variable is not set; the key is unavailable."
                        );
                        None
                    }
                })
                .collect();
            Provider::OpenAi(openai::OpenAiProvider::new(
                http.clone(),
                settings.base_url.clone().unwrap_or_default(),
                keys,
                Duration::from_secs(settings.timeout_secs),
            ))
        }
    };
    ProviderEntry {
        name: settings.name.clone(),
        client,
        models: settings
            .models
            .iter()
            .map(|m| (m.name.clone(), m.clone()))
            .collect(),
    }
}

/// Cuts `text` to at most `max` bytes on a char boundary, for error excerpts.
pub fn excerpt(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}
