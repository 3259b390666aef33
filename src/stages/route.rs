//! Resolves a job's route alias to the ordered provider targets that may serve it.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Prices, Settings};
use crate::providers::{ProviderEntry, Registry};

/// One provider + model a route may use, with the prices that bill it.
#[derive(Debug, Clone)]
pub struct Target {
    pub provider: Arc<ProviderEntry>,
    pub model: String,
    pub prices: Prices,
}

/// Every route alias and its targets, resolved once at start.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    by_alias: Arc<HashMap<String, Vec<Target>>>,
}

impl Routes {
    /// Resolves every configured route against the registry. Config validation guarantees
    /// every target names a known provider; an unknown one is skipped defensively.
    pub fn from_settings(settings: &Settings, registry: &Registry) -> Self {
        let by_alias = settings
            .routes
            .iter()
            .map(|route| {
                let targets = route
                    .targets
                    .iter()
                    .filter_map(|target| {
                        let provider = registry.get(&target.provider)?.clone();
                        let prices = provider
                            .model(&target.model)
                            .map(|m| m.prices.clone())
                            .unwrap_or_default();
                        Some(Target {
                            provider,
                            model: target.model.clone(),
                            prices,
                        })
                    })
                    .collect();
                (route.alias.clone(), targets)
            })
            .collect();
        Self {
            by_alias: Arc::new(by_alias),
        }
    }

    /// The targets of `alias`, in order; `None` for an unknown alias.
    pub fn resolve(&self, alias: &str) -> Option<&[Target]> {
        self.by_alias
            .get(alias)
            .map(Vec::as_slice)
            .filter(|t| !t.is_empty())
    }

    /// Known aliases, sorted, for error messages.
    pub fn aliases(&self) -> Vec<&str> {
        let mut aliases: Vec<&str> = self.by_alias.keys().map(String::as_str).collect();
        aliases.sort_unstable();
        aliases
    }
}
