//! Money: prices, the exact-decimal cost of an attempt, and budgets that are never overshot.
//!
//! Before each provider call the dispatch stage reserves the call's maximum cost (every byte
//! of the prompt as a token — no tokenizer counts more — plus the output cap of every choice,
//! at the target's prices; [`max_cost`]) on every hard budget that applies, atomically in Postgres. The finalize transaction
//! settles each reservation to the actual cost. Reservations of a worker that died expire and
//! are released. A hard budget's `spent + reserved` can therefore never pass its cap.

pub mod pricing;
pub mod reserver;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::{BudgetMode, BudgetPeriod, BudgetSettings, Prices, Settings};
use crate::messages::{CostEvent, Job, JobError, Usage};
use crate::store::budgets::{self, Ask, Refusal, Settlement};

/// A reservation held for one attempt, to settle in the finalize transaction.
#[derive(Debug, Clone)]
pub struct Held {
    pub reservation: Uuid,
    pub budget: String,
    pub period_start: DateTime<Utc>,
}

/// The outcome of [`Budgets::reserve`].
#[derive(Debug)]
pub enum Reserved {
    Held(Vec<Held>),
    /// A provider or key budget cannot cover the call: skip this target, try the next.
    Reroute(Refusal),
    /// A tenant, route or batch budget cannot cover it: the job fails.
    Refused(Refusal),
    /// Spent alone leaves room, but calls in flight hold it: wait for them to settle.
    Busy(Refusal),
}

/// Budgets of the config, with the pool that enforces them.
#[derive(Debug, Clone)]
pub struct Budgets {
    pool: PgPool,
    budgets: Arc<Vec<BudgetSettings>>,
    grace: Duration,
    default_output: u32,
    /// Longest wait for in-flight reservations to settle before the job is parked.
    max_wait: Duration,
    /// Grants single-budget reservations in groups (see `reserver.rs`); without it every
    /// reservation is its own statement.
    reserver: Option<reserver::Reserver>,
}

/// Output tokens assumed for a job without `max_tokens` when no config says otherwise.
pub const DEFAULT_OUTPUT_RESERVATION: u32 = 4096;

/// Tokens reserved per image part: images are billed by size and detail, which the request
/// does not fully tell, so this is an allowance rather than a bound.
pub const IMAGE_TOKEN_ALLOWANCE: u64 = 2_000;

/// Tokens reserved per `file` part beside its bytes: a document is billed as its text and an
/// image of each page, and a part naming an uploaded file (`file_id`) shows none of it. An
/// allowance (some ten pages), not a bound, like the image one.
pub const FILE_TOKEN_ALLOWANCE: u64 = 20_000;

/// Tokens reserved when a request offers tools: providers add a system prompt of their own
/// for tool use (Anthropic documents 313–346 tokens), which no byte of the request shows.
pub const TOOLS_TOKEN_ALLOWANCE: u64 = 1_000;

/// The most a call of `job` can cost at `prices`: every prompt byte as a token (no tokenizer
/// yields more tokens than bytes), counting the text of the messages and, as JSON, everything
/// else the request carries (tool definitions, a response schema, earlier tool calls, content
/// parts other than text and images, such as `input_audio` and `file`: audio and documents are
/// billed by their length, and audio's base64 runs to more bytes than it is billed tokens),
/// [`IMAGE_TOKEN_ALLOWANCE`] per image, [`FILE_TOKEN_ALLOWANCE`] per file and
/// [`TOOLS_TOKEN_ALLOWANCE`] with tools; plus the
/// output cap, or `default_output` without one (dispatch then gives the provider that cap),
/// once per choice asked for (`n`).
pub fn max_cost(job: &Job, prices: &Prices, default_output: u32) -> Decimal {
    let request = &job.request;
    let messages = request.messages.len() as u64;
    let (mut images, mut other_parts) = (0u64, 0u64);
    for part in request
        .messages
        .iter()
        .filter_map(|m| m.content.as_array())
        .flatten()
    {
        match part.get("type").and_then(|t| t.as_str()) {
            // Its text is counted with the messages' text.
            Some("text") => {}
            Some("image_url") => images += 1,
            Some("file") => other_parts += json_len(part) + FILE_TOKEN_ALLOWANCE,
            _ => other_parts += json_len(part),
        }
    }
    let beside_text: u64 = request
        .messages
        .iter()
        .filter(|m| !m.extra.is_empty())
        .map(|m| json_len(&m.extra))
        .sum::<u64>()
        + if request.extra.is_empty() {
            0
        } else {
            json_len(&request.extra)
        };
    let tools = ["tools", "functions"].iter().any(|field| {
        request
            .extra
            .get(*field)
            .and_then(serde_json::Value::as_array)
            .is_some_and(|tools| !tools.is_empty())
    });
    let prompt: u64 = request.all_text().map(|t| t.len() as u64).sum::<u64>()
        + beside_text
        + other_parts
        + 4 * messages
        + 3
        + images * IMAGE_TOKEN_ALLOWANCE
        + if tools { TOOLS_TOKEN_ALLOWANCE } else { 0 };
    let choices = request
        .extra
        .get("n")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(1)
        .max(1);
    let output = u64::from(request.output_cap().unwrap_or(default_output)).saturating_mul(choices);
    let mut usage = Usage {
        input_tokens: prompt,
        output_tokens: output,
        ..Usage::default()
    };
    // Prompt tokens may be billed as cache writes (Anthropic: 1.25 or 2 times the input
    // price) or cache reads: each is priced at the dearest of the three.
    if prices.cache_write > prices.input && prices.cache_write >= prices.cached_input {
        usage.cache_write_tokens = prompt;
    } else if prices.cached_input > prices.input {
        usage.cached_input_tokens = prompt;
    }
    pricing::cost(&usage, prices)
}

/// The length of `value` as JSON, counted without building the text.
pub fn json_len(value: &impl serde::Serialize) -> u64 {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len() as u64;
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing JSON values to a counter cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// The start of the period containing `now`.
pub fn period_start(period: BudgetPeriod, now: DateTime<Utc>) -> DateTime<Utc> {
    let start = match period {
        BudgetPeriod::Month => Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0),
        BudgetPeriod::Day => Utc.with_ymd_and_hms(now.year(), now.month(), now.day(), 0, 0, 0),
        BudgetPeriod::Total => Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0),
    };
    start.single().unwrap_or(now)
}

/// The `budget_exceeded` error for a refusal, naming the budget and its figures.
pub fn exceeded(refusal: &Refusal, needed: Decimal) -> JobError {
    JobError::new(
        "budget_exceeded",
        format!(
            "budget {:?} cannot cover ${needed}: cap ${}, spent ${}, reserved ${}, period from {}",
            refusal.budget,
            refusal.cap.normalize(),
            refusal.spent.normalize(),
            refusal.reserved.normalize(),
            refusal.period_start.format("%Y-%m-%d")
        ),
    )
}

impl Budgets {
    /// `None` when the config has no budgets.
    pub fn from_settings(settings: &Settings, pool: &PgPool) -> Option<Self> {
        (!settings.budgets.is_empty()).then(|| Self {
            pool: pool.clone(),
            budgets: Arc::new(settings.budgets.clone()),
            grace: Duration::from_secs(settings.routing.reservation_grace_secs),
            default_output: settings.routing.default_output_reservation,
            max_wait: Duration::from_secs(settings.routing.max_limit_wait_secs),
            reserver: None,
        })
    }

    /// Grants single-budget reservations in groups through `reserver`.
    #[must_use]
    pub fn with_reserver(mut self, reserver: reserver::Reserver) -> Self {
        self.reserver = Some(reserver);
        self
    }

    /// The configured budget called `name`.
    pub fn get(&self, name: &str) -> Option<&BudgetSettings> {
        self.budgets.iter().find(|b| b.name == name)
    }

    /// Whether `budget`'s scope covers a call for `tenant`/`route`/`batch` on `provider` with
    /// `key_id`.
    fn applies(
        budget: &BudgetSettings,
        tenant: &str,
        route: &str,
        batch: Option<&str>,
        provider: &str,
        key_id: Option<&str>,
    ) -> bool {
        let key = key_id.map(|k| format!("{provider}/{k}"));
        budget.tenant.as_deref() == Some(tenant)
            || budget.provider.as_deref() == Some(provider)
            || (budget.key.is_some() && budget.key == key)
            || budget.route.as_deref() == Some(route)
            || (budget.batch.is_some() && budget.batch.as_deref() == batch)
    }

    /// Reserves `amount` on every hard budget that applies to a call of `job` on `provider`
    /// with `key_id` (soft budgets only alert). Held until `call_timeout` plus the grace.
    pub async fn reserve(
        &self,
        job: &Job,
        provider: &str,
        key_id: Option<&str>,
        amount: Decimal,
        call_timeout: Duration,
    ) -> Result<Reserved, sqlx::Error> {
        let now = Utc::now();
        let mut applicable: Vec<&BudgetSettings> = self
            .budgets
            .iter()
            .filter(|b| {
                b.mode == BudgetMode::Hard
                    && Self::applies(
                        b,
                        &job.tenant,
                        &job.route,
                        job.batch.as_deref(),
                        provider,
                        key_id,
                    )
            })
            .collect();
        if applicable.is_empty() {
            return Ok(Reserved::Held(Vec::new()));
        }
        applicable.sort_by(|a, b| a.name.cmp(&b.name));
        let asks: Vec<Ask<'_>> = applicable
            .iter()
            .map(|b| Ask {
                budget: &b.name,
                period_start: period_start(b.period, now),
                cap: b.cap_usd,
                hard: true,
            })
            .collect();
        let expires =
            now + chrono::Duration::from_std(call_timeout + self.grace).unwrap_or_default();
        if let ([ask], Some(reserver)) = (asks.as_slice(), &self.reserver) {
            let id = Uuid::now_v7();
            let hold = chrono::Duration::from_std(call_timeout + self.grace).unwrap_or_default();
            if reserver
                .reserve((ask.budget, ask.period_start, ask.cap), id, amount, hold)
                .await
            {
                return Ok(Reserved::Held(vec![Held {
                    reservation: id,
                    budget: ask.budget.to_owned(),
                    period_start: ask.period_start,
                }]));
            }
        }
        // Fresh ids: an ask the group failed on must not collide with a row it may have left.
        let ids: Vec<Uuid> = asks.iter().map(|_| Uuid::now_v7()).collect();
        match budgets::reserve(&self.pool, &asks, amount, &ids, expires).await? {
            Ok(()) => Ok(Reserved::Held(
                asks.iter()
                    .zip(ids)
                    .map(|(ask, id)| Held {
                        reservation: id,
                        budget: ask.budget.to_owned(),
                        period_start: ask.period_start,
                    })
                    .collect(),
            )),
            Err(refusal) => {
                let by_target = self
                    .get(&refusal.budget)
                    .is_some_and(|b| b.provider.is_some() || b.key.is_some());
                Ok(if by_target {
                    // Another target can serve the job now.
                    Reserved::Reroute(refusal)
                } else if refusal.spent + amount <= refusal.cap {
                    Reserved::Busy(refusal)
                } else {
                    Reserved::Refused(refusal)
                })
            }
        }
    }

    /// The settlements of one billed call: each reservation it held (hard budgets) and every
    /// soft budget that applies, at the call's actual cost.
    pub fn settlements(&self, holds: &[Held], cost: Option<&CostEvent>) -> Vec<Settlement> {
        let actual = cost.map_or(Decimal::ZERO, |c| c.amount_usd);
        let mut settlements: Vec<Settlement> = holds
            .iter()
            .map(|hold| Settlement {
                reservation: Some(hold.reservation),
                budget: hold.budget.clone(),
                period_start: hold.period_start,
                cap: self.get(&hold.budget).map_or(Decimal::ZERO, |b| b.cap_usd),
                actual,
            })
            .collect();
        if let Some(cost) = cost {
            let now = Utc::now();
            settlements.extend(
                self.budgets
                    .iter()
                    .filter(|b| b.mode == BudgetMode::Soft)
                    .filter(|b| {
                        Self::applies(
                            b,
                            &cost.tenant,
                            &cost.route,
                            cost.batch.as_deref(),
                            &cost.provider,
                            cost.key_id.as_deref(),
                        )
                    })
                    .map(|b| Settlement {
                        reservation: None,
                        budget: b.name.clone(),
                        period_start: period_start(b.period, now),
                        cap: b.cap_usd,
                        actual,
                    }),
            );
        }
        settlements
    }

    /// Output tokens reserved (and given to the provider as the cap) for a job without one.
    pub fn default_output(&self) -> u32 {
        self.default_output
    }

    /// Longest wait for in-flight reservations to settle.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Every configured budget.
    pub fn all(&self) -> &[BudgetSettings] {
        &self.budgets
    }

    /// Releases reservations whose worker died.
    pub async fn release_expired(&self) -> Result<u64, sqlx::Error> {
        budgets::release_expired(&self.pool, Utc::now()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_start_at_the_calendar_boundary_in_utc() {
        let now = Utc.with_ymd_and_hms(2026, 11, 25, 17, 30, 5).unwrap();
        assert_eq!(
            period_start(BudgetPeriod::Month, now),
            Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(
            period_start(BudgetPeriod::Day, now),
            Utc.with_ymd_and_hms(2026, 11, 25, 0, 0, 0).unwrap()
        );
        assert_eq!(
            period_start(BudgetPeriod::Total, now),
            period_start(BudgetPeriod::Total, Utc::now())
        );
    }

    /// Input at $1 and output at $1,000,000 per million tokens, so a cost in micro-dollars
    /// reads as input tokens, and in dollars as output tokens.
    fn max_cost_of(request: serde_json::Value) -> (u64, u64) {
        use rust_decimal::prelude::ToPrimitive;
        let job = Job::new("t", None, "r", serde_json::from_value(request).unwrap());
        let input = Prices {
            input: Decimal::ONE,
            ..Prices::default()
        };
        let output = Prices {
            output: Decimal::from(1_000_000),
            ..Prices::default()
        };
        (
            (max_cost(&job, &input, 100) * Decimal::from(1_000_000))
                .to_u64()
                .unwrap(),
            max_cost(&job, &output, 100).to_u64().unwrap(),
        )
    }

    /// A prompt billed as cache writes (Anthropic's 1-hour cache: twice the input price) or
    /// cache reads costs no more than the reservation: each prompt token is reserved at the
    /// dearest of the three prices.
    #[test]
    fn the_most_a_call_can_cost_prices_the_prompt_at_its_dearest_rate() {
        let job = Job::new(
            "t",
            None,
            "r",
            serde_json::from_value(
                serde_json::json!({"messages": [{"role": "user", "content": "hello"}]}),
            )
            .unwrap(),
        );
        // 12 prompt tokens (5 bytes of text, 4 per message and 3) and no output.
        let prompt = Usage {
            input_tokens: 12,
            ..Usage::default()
        };
        let writes = Prices {
            input: Decimal::ONE,
            cache_write: Decimal::TWO,
            cached_input: Decimal::new(1, 1),
            ..Prices::default()
        };
        let all_written = Usage {
            cache_write_tokens: 12,
            ..prompt
        };
        assert_eq!(
            max_cost(&job, &writes, 0),
            pricing::cost(&all_written, &writes)
        );
        assert!(max_cost(&job, &writes, 0) > pricing::cost(&prompt, &writes));
        let reads = Prices {
            input: Decimal::ONE,
            cache_write: Decimal::ONE,
            cached_input: Decimal::from(3),
            ..Prices::default()
        };
        let all_read = Usage {
            cached_input_tokens: 12,
            ..prompt
        };
        assert_eq!(max_cost(&job, &reads, 0), pricing::cost(&all_read, &reads));
        let plain = Prices {
            input: Decimal::ONE,
            cache_write: Decimal::new(5, 1),
            cached_input: Decimal::new(1, 1),
            ..Prices::default()
        };
        assert_eq!(max_cost(&job, &plain, 0), pricing::cost(&prompt, &plain));
    }

    /// What a request carries besides its messages' text is billed as input too, and each of
    /// `n` choices is billed for the output cap: the reservation counts both, so a budget
    /// cannot be overshot by tools, a response schema, earlier tool calls or `n`.
    #[test]
    fn the_most_a_call_can_cost_counts_tools_tool_calls_and_every_choice() {
        let hello = serde_json::json!({"role": "user", "content": "hello"});
        // 5 bytes of text, 4 per message and 3.
        assert_eq!(
            max_cost_of(serde_json::json!({"messages": [hello]})),
            (12, 100)
        );
        assert_eq!(
            max_cost_of(serde_json::json!({"messages": [hello], "max_tokens": 7, "n": 3})),
            (12 + r#"{"n":3}"#.len() as u64, 21)
        );
        let tools = serde_json::json!([{"type": "function", "function": {"name": "f"}}]);
        let extra = serde_json::json!({"tools": tools}).to_string().len() as u64;
        assert_eq!(
            max_cost_of(serde_json::json!({"messages": [hello], "tools": tools})),
            (12 + extra + TOOLS_TOKEN_ALLOWANCE, 100)
        );
        let call = serde_json::json!({"role": "assistant", "content": null,
            "tool_calls": [{"id": "c", "type": "function",
                            "function": {"name": "f", "arguments": "{\"x\":1}"}}]});
        let calls = serde_json::json!({"tool_calls": call["tool_calls"]})
            .to_string()
            .len() as u64;
        assert_eq!(
            max_cost_of(serde_json::json!({"messages": [hello, call]})),
            (12 + 4 + calls, 100)
        );
    }

    /// Audio and file parts are billed by what they hold, which neither the text nor the image
    /// allowance counts: each is counted as its JSON, base64 data and all, and a file gets an
    /// allowance of its own besides.
    #[test]
    fn the_most_a_call_can_cost_counts_audio_and_file_parts_by_their_bytes() {
        let audio = serde_json::json!({"type": "input_audio",
            "input_audio": {"data": "UklGRiQAAABXQVZFZm10IBAAAAABAAEA", "format": "wav"}});
        let file = serde_json::json!({"type": "file",
            "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0xLjQK"}});
        let parts = (audio.to_string().len() + file.to_string().len()) as u64;
        let message = serde_json::json!({"role": "user", "content": [
            {"type": "text", "text": "hello"}, audio, file,
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
        ]});
        assert_eq!(
            max_cost_of(serde_json::json!({"messages": [message]})),
            (
                12 + parts + IMAGE_TOKEN_ALLOWANCE + FILE_TOKEN_ALLOWANCE,
                100
            )
        );
    }

    #[test]
    fn budget_exceeded_names_the_budget_and_its_figures() {
        let refusal = Refusal {
            budget: "acme".to_owned(),
            cap: Decimal::new(100, 2),
            spent: Decimal::new(99, 2),
            reserved: Decimal::new(2, 2),
            period_start: Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
        };
        let error = exceeded(&refusal, Decimal::new(2, 2));
        assert_eq!(error.code, "budget_exceeded");
        assert_eq!(
            error.message,
            "budget \"acme\" cannot cover $0.02: cap $1, spent $0.99, reserved $0.02, period from 2026-11-01"
        );
    }
}
