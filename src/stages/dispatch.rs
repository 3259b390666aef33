//! Calls the route's targets in order until one succeeds: a retryable failure moves on to the
//! next target, a permanent one stops the job with the provider's reason.

use std::time::Instant;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::route::Target;
use crate::config::Prices;
use crate::messages::{ChatRequest, JobError, Usage};
use crate::providers::ProviderError;

/// One provider call and how it ended.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub id: Uuid,
    pub n: u32,
    pub provider: String,
    pub model: String,
    pub key_id: Option<String>,
    pub prices: Prices,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub latency_ms: u64,
    pub outcome: Result<Usage, ProviderError>,
}

impl Attempt {
    /// Usage to bill: always for a success, and for a failure the provider reported usage for.
    pub fn billed_usage(&self) -> Option<Usage> {
        match &self.outcome {
            Ok(usage) => Some(*usage),
            Err(error) => error.usage,
        }
    }
}

/// Every attempt of a job, and either the response or why there is none.
#[derive(Debug, Clone)]
pub struct Dispatched {
    pub attempts: Vec<Attempt>,
    pub outcome: Result<Value, JobError>,
}

impl Dispatched {
    /// The attempt that produced the response.
    pub fn winner(&self) -> Option<&Attempt> {
        self.attempts.last().filter(|a| a.outcome.is_ok())
    }
}

/// Runs `request` against `targets` in order.
pub async fn dispatch(request: &ChatRequest, targets: &[Target]) -> Dispatched {
    let mut attempts = Vec::with_capacity(1);
    for (index, target) in targets.iter().enumerate() {
        let started_at = Utc::now();
        let clock = Instant::now();
        let key_id = target.provider.client.key_id().map(str::to_owned);
        let result = target
            .provider
            .client
            .complete(request, &target.model)
            .await;
        let latency_ms = u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
        let (outcome, response) = match result {
            Ok(completion) => (Ok(completion.usage), Some(completion.response)),
            Err(error) => (Err(error), None),
        };
        let retryable = outcome
            .as_ref()
            .err()
            .is_some_and(ProviderError::is_retryable);
        attempts.push(Attempt {
            id: Uuid::now_v7(),
            n: u32::try_from(index + 1).unwrap_or(u32::MAX),
            provider: target.provider.name.clone(),
            model: target.model.clone(),
            key_id,
            prices: target.prices.clone(),
            started_at,
            ended_at: Utc::now(),
            latency_ms,
            outcome,
        });
        if let Some(response) = response {
            return Dispatched {
                attempts,
                outcome: Ok(response),
            };
        }
        if !retryable {
            break;
        }
    }
    let error = job_error(&attempts);
    Dispatched {
        attempts,
        outcome: Err(error),
    }
}

/// The job's error: the last failure's class as the code, and every attempt in the message.
fn job_error(attempts: &[Attempt]) -> JobError {
    let failures: Vec<&ProviderError> = attempts
        .iter()
        .filter_map(|a| a.outcome.as_ref().err())
        .collect();
    let Some(last) = failures.last() else {
        return JobError::new("no_targets", "the route has no targets");
    };
    let code = if last.is_retryable() {
        "all_attempts_failed"
    } else {
        last.class.as_str()
    };
    let listing = attempts
        .iter()
        .filter_map(|a| {
            let e = a.outcome.as_ref().err()?;
            Some(format!(
                "#{} {}/{}: {} ({})",
                a.n,
                a.provider,
                a.model,
                e.class.as_str(),
                e.message
            ))
        })
        .collect::<Vec<_>>()
        .join("; ");
    JobError::new(
        code,
        format!("{} attempt(s) failed: {listing}", failures.len()),
    )
}
