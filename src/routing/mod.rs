//! Routing: which targets may serve a job, in which order. A route's targets are filtered by
//! what the job needs (capabilities, context window), where its data may go (tenant and job
//! regions, the tenant's provider allow-list), target health (open circuits) and a budget
//! hook, then ordered by the route's policy; the explicit fallback chain follows, and the
//! whole plan is cut to `1 + max_failover_depth` targets.

pub mod health;
pub mod limits;
pub mod policy;
pub mod sharing;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use health::TargetHealth;
use policy::WeightedRoundRobin;

use crate::budget::pricing::{Applied, PriceTable};
use crate::config::{Capability, ModelSettings, Policy, Settings, TargetSettings, TenantSettings};
use crate::messages::{Job, JobError};
use crate::providers::{ErrorClass, ProviderEntry, Registry};

/// One provider + model a route may use.
#[derive(Debug, Clone)]
pub struct Target {
    pub provider: Arc<ProviderEntry>,
    pub model: String,
    /// The model's prices over time and volume.
    pub price_table: Arc<PriceTable>,
    pub capabilities: Vec<Capability>,
    pub context_window: Option<u32>,
    /// Per-attempt timeout on this target.
    pub timeout: Duration,
    pub weight: u32,
    pub region: Option<String>,
    pub max_concurrency: Option<usize>,
    pub health: Arc<TargetHealth>,
}

impl Target {
    /// The prices in effect now, before any volume tier (the most a call can be charged).
    pub fn prices(&self) -> Applied {
        self.price_table.applied(chrono::Utc::now(), 0)
    }

    /// `provider/model`.
    pub fn label(&self) -> &str {
        &self.health.key
    }
}

/// A configured route, resolved.
#[derive(Debug)]
pub struct Route {
    pub alias: String,
    pub policy: Policy,
    pub targets: Vec<Arc<Target>>,
    pub fallback: Vec<Arc<Target>>,
    pub max_failover_depth: u8,
    pub failover_on: Vec<ErrorClass>,
    wrr: WeightedRoundRobin,
}

/// The targets to try for one job, in order, and the route's failover rules.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Shared with the route: a plan is made per job, and thousands of jobs may hold one.
    pub targets: Vec<Arc<Target>>,
    /// Targets left out because their circuit is open (`provider/model`), for the audit.
    pub skipped: Vec<String>,
    /// Non-retryable classes that still move on to the next target.
    pub failover_on: Vec<ErrorClass>,
}

/// Why a job has no plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// The alias is not configured (the job is rejected: it can never be served).
    UnknownRoute(JobError),
    /// Every target was excluded (the job fails; it may succeed later).
    NoEligibleTarget(JobError),
}

/// What a job needs from a target.
#[derive(Debug, Clone, Copy, Default)]
struct Needs {
    vision: bool,
    json_schema: bool,
    tools: bool,
    streaming: bool,
}

impl Needs {
    fn of(job: &Job) -> Self {
        let request = &job.request;
        let vision = request.messages.iter().any(|m| {
            m.content.as_array().is_some_and(|parts| {
                parts
                    .iter()
                    .any(|p| p.get("type").and_then(|t| t.as_str()) == Some("image_url"))
            })
        });
        let json_schema = request
            .extra
            .get("response_format")
            .and_then(|f| f.get("type"))
            .and_then(|t| t.as_str())
            == Some("json_schema");
        let tools = request
            .extra
            .get("tools")
            .and_then(|t| t.as_array())
            .is_some_and(|t| !t.is_empty());
        Self {
            vision,
            json_schema,
            tools,
            streaming: request.wants_stream(),
        }
    }

    fn missing(&self, capabilities: &[Capability]) -> Option<&'static str> {
        [
            (self.vision, Capability::Vision, "vision"),
            (self.json_schema, Capability::JsonSchema, "json_schema"),
            (self.tools, Capability::Tools, "tools"),
            (self.streaming, Capability::Streaming, "streaming"),
        ]
        .into_iter()
        .find(|(needed, capability, _)| *needed && !capabilities.contains(capability))
        .map(|(_, _, name)| name)
    }
}

/// Every route, the tenants' policies and the health of every target.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Arc<HashMap<String, Arc<Route>>>,
    tenants: Arc<HashMap<String, TenantSettings>>,
    health: Arc<HashMap<String, Arc<TargetHealth>>>,
    exploration_rate: f64,
}

impl Router {
    /// Resolves every route against the registry. One [`TargetHealth`] per provider/model,
    /// shared by every route that uses it.
    pub fn from_settings(settings: &Settings, registry: &Registry) -> Self {
        let mut health: HashMap<String, Arc<TargetHealth>> = HashMap::new();
        let all_providers = settings.all_providers();
        let mut resolve = |target: &TargetSettings| -> Option<Arc<Target>> {
            let provider = registry.get(&target.provider)?.clone();
            let model: Option<&ModelSettings> = provider.model(&target.model);
            let key = format!("{}/{}", target.provider, target.model);
            let health = health
                .entry(key.clone())
                .or_insert_with(|| Arc::new(TargetHealth::new(key, &settings.routing)))
                .clone();
            let provider_settings = all_providers.iter().find(|p| p.name == target.provider);
            Some(Arc::new(Target {
                model: target.model.clone(),
                price_table: Arc::new(model.map(PriceTable::from_model).unwrap_or_default()),
                capabilities: model
                    .map(|m| m.capabilities.clone())
                    .unwrap_or_else(|| vec![Capability::Streaming]),
                context_window: model.and_then(|m| m.context_window),
                timeout: target
                    .timeout_secs
                    .map(Duration::from_secs)
                    .unwrap_or(provider.timeout),
                weight: target.weight,
                region: provider_settings.as_ref().and_then(|p| p.region.clone()),
                max_concurrency: provider_settings
                    .as_ref()
                    .and_then(|p| p.limits.as_ref())
                    .and_then(|l| l.max_concurrency)
                    .map(|m| m as usize),
                health,
                provider,
            }))
        };
        let routes = settings
            .routes
            .iter()
            .map(|route| {
                let targets: Vec<Arc<Target>> =
                    route.targets.iter().filter_map(&mut resolve).collect();
                let fallback: Vec<Arc<Target>> =
                    route.fallback.iter().filter_map(&mut resolve).collect();
                let resolved = Route {
                    alias: route.alias.clone(),
                    policy: route.policy,
                    wrr: WeightedRoundRobin::new(targets.len()),
                    targets,
                    fallback,
                    max_failover_depth: route.max_failover_depth,
                    failover_on: route
                        .failover_on
                        .iter()
                        .filter_map(|c| ErrorClass::parse(c))
                        .collect(),
                };
                (route.alias.clone(), Arc::new(resolved))
            })
            .collect();
        let tenants = settings
            .tenants
            .iter()
            .map(|t| (t.name.clone(), t.clone()))
            .collect();
        Self {
            routes: Arc::new(routes),
            tenants: Arc::new(tenants),
            health: Arc::new(health),
            exploration_rate: settings.routing.exploration_rate,
        }
    }

    /// Known aliases, sorted, for error messages.
    pub fn aliases(&self) -> Vec<&str> {
        let mut aliases: Vec<&str> = self.routes.keys().map(String::as_str).collect();
        aliases.sort_unstable();
        aliases
    }

    /// Every target's health, by `provider/model`.
    pub fn health(&self) -> impl Iterator<Item = &Arc<TargetHealth>> {
        self.health.values()
    }

    /// The health of `provider/model`.
    pub fn health_of(&self, key: &str) -> Option<&Arc<TargetHealth>> {
        self.health.get(key)
    }

    /// The targets for `job`, in order. `excluded` is the budget hook: it may exclude a target
    /// with a reason.
    pub fn plan(
        &self,
        job: &Job,
        excluded: &dyn Fn(&Target) -> Option<String>,
    ) -> Result<Plan, RouteError> {
        let Some(route) = self.routes.get(&job.route) else {
            return Err(RouteError::UnknownRoute(JobError {
                code: "unknown_route".to_owned(),
                message: format!(
                    "route {:?} is not configured; known routes: {}",
                    job.route,
                    self.aliases().join(", ")
                ),
                path: Some("/route".to_owned()),
            }));
        };
        let needs = Needs::of(job);
        let tenant = self.tenants.get(&job.tenant);
        let regions = allowed_regions(
            tenant.and_then(|t| t.regions.as_deref()),
            job.regions.as_deref(),
        );
        let prompt_tokens = std::cell::OnceCell::new();
        let prompt =
            || *prompt_tokens.get_or_init(|| crate::tokens::count_prompt(&job.request) as u64);
        let output = u64::from(job.request.output_cap().unwrap_or(0));
        let now = Instant::now();
        let mut reasons: Vec<String> = Vec::new();
        let mut skipped: Vec<String> = Vec::new();
        let mut eligible = |target: &Target| -> bool {
            let reason = if let Some(capability) = needs.missing(&target.capabilities) {
                Some(format!("model lacks {capability}"))
            } else if let Some(window) = target.context_window
                && prompt() + output > u64::from(window)
            {
                Some(format!(
                    "context window {window} < {} prompt + {output} output tokens",
                    prompt()
                ))
            } else if let Some(allowed) = &regions
                && !target.region.as_ref().is_some_and(|r| allowed.contains(r))
            {
                Some(format!(
                    "region {} is outside the allowed regions [{}]",
                    target.region.as_deref().unwrap_or("(unknown)"),
                    allowed.iter().cloned().collect::<Vec<_>>().join(", ")
                ))
            } else if let Some(allowed) = tenant.and_then(|t| t.allowed_providers.as_ref())
                && !allowed.contains(&target.provider.name)
            {
                Some(format!("provider is not allowed for tenant {}", job.tenant))
            } else if let Some(until) = target.health.is_open(now) {
                skipped.push(target.label().to_owned());
                Some(format!(
                    "circuit open for {:?}",
                    until.saturating_duration_since(now)
                ))
            } else {
                excluded(target)
            };
            match reason {
                Some(reason) => {
                    reasons.push(format!("{}: {reason}", target.label()));
                    false
                }
                None => true,
            }
        };
        let mut ordered: Vec<Arc<Target>> = route
            .targets
            .iter()
            .filter(|t| eligible(t))
            .cloned()
            .collect();
        let weights: Vec<(String, u32)> = route
            .targets
            .iter()
            .map(|t| (t.label().to_owned(), t.weight))
            .collect();
        policy::order(
            route.policy,
            &mut ordered,
            &route.wrr,
            &weights,
            || (prompt(), output),
            self.exploration_rate,
        );
        for target in &route.fallback {
            if !ordered.iter().any(|t| t.label() == target.label()) && eligible(target) {
                ordered.push(target.clone());
            }
        }
        if ordered.is_empty() {
            return Err(RouteError::NoEligibleTarget(JobError::new(
                "no_eligible_target",
                format!(
                    "no eligible target on route {:?}: {}",
                    route.alias,
                    reasons.join("; ")
                ),
            )));
        }
        ordered.truncate(1 + usize::from(route.max_failover_depth));
        Ok(Plan {
            targets: ordered,
            skipped,
            failover_on: route.failover_on.clone(),
        })
    }
}

/// The regions a job may use: the intersection of the tenant's and the job's, when either
/// restricts them.
fn allowed_regions(tenant: Option<&[String]>, job: Option<&[String]>) -> Option<BTreeSet<String>> {
    match (tenant, job) {
        (None, None) => None,
        (Some(only), None) | (None, Some(only)) => Some(only.iter().cloned().collect()),
        (Some(a), Some(b)) => Some(a.iter().filter(|r| b.contains(r)).cloned().collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{ChatMessage, ChatRequest};
    use serde_json::json;

    const CONFIG: &str = r#"
[[providers]]
name = "us-big"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
region = "us"
keys = [{ id = "k", env = "PATH" }]
models = [{ name = "big", context_window = 100000, capabilities = ["vision", "tools", "json_schema", "streaming"], prices = { input = "5", output = "15" } }]

[[providers]]
name = "eu-small"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
region = "eu"
keys = [{ id = "k", env = "PATH" }]
models = [{ name = "small", context_window = 50, prices = { input = "0.1", output = "0.2" } }]

[[providers]]
name = "eu-mid"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
region = "eu"
keys = [{ id = "k", env = "PATH" }]
models = [{ name = "mid", context_window = 100000, prices = { input = "1", output = "2" } }]

[[routes]]
alias = "chain"
targets = [{ provider = "us-big", model = "big" }, { provider = "eu-small", model = "small" }]
fallback = [{ provider = "eu-mid", model = "mid" }]

[[routes]]
alias = "cheap"
policy = "cheapest"
targets = [{ provider = "us-big", model = "big" }, { provider = "eu-mid", model = "mid" }, { provider = "eu-small", model = "small" }]

[[routes]]
alias = "shallow"
max_failover_depth = 0
targets = [{ provider = "us-big", model = "big" }, { provider = "eu-mid", model = "mid" }]

[[tenants]]
name = "eu-corp"
regions = ["eu"]

[[tenants]]
name = "picky"
allowed_providers = ["eu-mid"]
"#;

    fn router() -> Router {
        let settings = Settings::from_toml(CONFIG).unwrap();
        Router::from_settings(
            &settings,
            &Registry::from_settings(&settings, &reqwest::Client::new()),
        )
    }

    fn job(tenant: &str, route: &str, text: &str) -> Job {
        let request = ChatRequest {
            messages: vec![ChatMessage::text_message("user", text)],
            max_tokens: Some(10),
            ..ChatRequest::default()
        };
        Job::new(tenant, None, route, request)
    }

    fn labels(plan: &Plan) -> Vec<&str> {
        plan.targets.iter().map(|t| t.label()).collect()
    }

    #[test]
    fn targets_keep_their_order_and_the_fallback_chain_follows() {
        let plan = router().plan(&job("t", "chain", "hi"), &|_| None).unwrap();
        assert_eq!(
            labels(&plan),
            ["us-big/big", "eu-small/small", "eu-mid/mid"]
        );
    }

    #[test]
    fn a_prompt_larger_than_a_context_window_skips_that_model() {
        let long = "word ".repeat(200);
        let plan = router().plan(&job("t", "chain", &long), &|_| None).unwrap();
        assert_eq!(labels(&plan), ["us-big/big", "eu-mid/mid"]);
    }

    #[test]
    fn a_job_needing_vision_only_goes_to_models_declaring_it() {
        let mut j = job("t", "chain", "x");
        j.request.messages[0].content =
            json!([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]);
        let plan = router().plan(&j, &|_| None).unwrap();
        assert_eq!(labels(&plan), ["us-big/big"]);
    }

    #[test]
    fn tenant_regions_keep_jobs_inside_them() {
        let plan = router()
            .plan(&job("eu-corp", "chain", "hi"), &|_| None)
            .unwrap();
        assert_eq!(labels(&plan), ["eu-small/small", "eu-mid/mid"]);
        let mut j = job("t", "chain", "hi");
        j.regions = Some(vec!["eu".to_owned()]);
        assert_eq!(
            labels(&router().plan(&j, &|_| None).unwrap()),
            ["eu-small/small", "eu-mid/mid"]
        );
    }

    #[test]
    fn no_eligible_target_lists_every_target_and_why() {
        let mut j = job("eu-corp", "chain", &"word ".repeat(200));
        j.regions = Some(vec!["eu".to_owned(), "us".to_owned()]);
        j.request.extra.insert(
            "tools".to_owned(),
            json!([{"type": "function", "function": {"name": "f"}}]),
        );
        let Err(RouteError::NoEligibleTarget(error)) = router().plan(&j, &|_| None) else {
            panic!("expected no eligible target");
        };
        assert_eq!(error.code, "no_eligible_target");
        assert!(
            error
                .message
                .contains("us-big/big: region us is outside the allowed regions [eu]"),
            "{}",
            error.message
        );
        assert!(
            error.message.contains("eu-small/small: model lacks tools"),
            "{}",
            error.message
        );
        assert!(
            error.message.contains("eu-mid/mid: model lacks tools"),
            "{}",
            error.message
        );
    }

    #[test]
    fn the_tenant_allow_list_and_the_budget_hook_exclude_targets() {
        assert_eq!(
            labels(
                &router()
                    .plan(&job("picky", "chain", "hi"), &|_| None)
                    .unwrap()
            ),
            ["eu-mid/mid"]
        );
        let hook =
            |t: &Target| (t.provider.name == "us-big").then(|| "budget exhausted".to_owned());
        assert_eq!(
            labels(&router().plan(&job("t", "chain", "hi"), &hook).unwrap()),
            ["eu-small/small", "eu-mid/mid"]
        );
    }

    #[test]
    fn cheapest_orders_by_estimated_cost() {
        let plan = router().plan(&job("t", "cheap", "hi"), &|_| None).unwrap();
        assert_eq!(
            labels(&plan),
            ["eu-small/small", "eu-mid/mid", "us-big/big"]
        );
    }

    #[test]
    fn the_plan_is_cut_to_the_failover_depth() {
        assert_eq!(
            labels(
                &router()
                    .plan(&job("t", "shallow", "hi"), &|_| None)
                    .unwrap()
            ),
            ["us-big/big"]
        );
    }

    #[test]
    fn an_open_circuit_leaves_the_target_out_and_says_so() {
        let router = router();
        router
            .health_of("us-big/big")
            .unwrap()
            .open_until(Instant::now() + Duration::from_secs(60));
        let plan = router.plan(&job("t", "chain", "hi"), &|_| None).unwrap();
        assert_eq!(labels(&plan), ["eu-small/small", "eu-mid/mid"]);
        assert_eq!(plan.skipped, ["us-big/big"]);
    }

    #[test]
    fn an_unknown_route_is_its_own_error() {
        assert!(matches!(
            router().plan(&job("t", "nope", "hi"), &|_| None),
            Err(RouteError::UnknownRoute(_))
        ));
    }

    fn policy_router(policy: &str) -> Router {
        let text = format!(
            "{CONFIG}\n[[routes]]\nalias = \"p\"\npolicy = \"{policy}\"\ntargets = [{{ provider = \"us-big\", model = \"big\" }}, {{ provider = \"eu-mid\", model = \"mid\" }}]\n"
        );
        let mut settings = Settings::from_toml(&text).unwrap();
        settings.routing.exploration_rate = 0.0;
        settings.providers[0].limits = Some(crate::config::Limits {
            max_concurrency: Some(4),
            ..crate::config::Limits::default()
        });
        settings.providers[2].limits = Some(crate::config::Limits {
            max_concurrency: Some(10),
            ..crate::config::Limits::default()
        });
        Router::from_settings(
            &settings,
            &Registry::from_settings(&settings, &reqwest::Client::new()),
        )
    }

    #[test]
    fn fastest_prefers_the_lowest_recent_latency_and_measures_new_targets_first() {
        let router = policy_router("fastest");
        let j = job("t", "p", "hi");
        router
            .health_of("us-big/big")
            .unwrap()
            .record(Duration::from_millis(50), false, false);
        assert_eq!(
            labels(&router.plan(&j, &|_| None).unwrap())[0],
            "eu-mid/mid",
            "unmeasured goes first"
        );
        router
            .health_of("eu-mid/mid")
            .unwrap()
            .record(Duration::from_millis(500), false, false);
        assert_eq!(
            labels(&router.plan(&j, &|_| None).unwrap())[0],
            "us-big/big"
        );
    }

    #[test]
    fn fastest_explores_other_targets_at_its_exploration_rate() {
        let text = format!(
            "{CONFIG}\n[routing]\nexploration_rate = 0.5\n[[routes]]\nalias = \"p\"\npolicy = \"fastest\"\ntargets = [{{ provider = \"us-big\", model = \"big\" }}, {{ provider = \"eu-mid\", model = \"mid\" }}]\n"
        );
        let settings = Settings::from_toml(&text).unwrap();
        let router = Router::from_settings(
            &settings,
            &Registry::from_settings(&settings, &reqwest::Client::new()),
        );
        router
            .health_of("us-big/big")
            .unwrap()
            .record(Duration::from_millis(10), false, false);
        router
            .health_of("eu-mid/mid")
            .unwrap()
            .record(Duration::from_millis(900), false, false);
        let j = job("t", "p", "hi");
        let slow_first = (0..400)
            .filter(|_| labels(&router.plan(&j, &|_| None).unwrap())[0] == "eu-mid/mid")
            .count();
        assert!(
            (120..=280).contains(&slow_first),
            "explored {slow_first} of 400"
        );
    }

    #[test]
    fn least_busy_prefers_the_most_free_concurrency() {
        let router = policy_router("least_busy");
        let j = job("t", "p", "hi");
        // us-big: 4 slots, eu-mid: 10 slots.
        assert_eq!(
            labels(&router.plan(&j, &|_| None).unwrap())[0],
            "eu-mid/mid"
        );
        let mid = router.health_of("eu-mid/mid").unwrap().clone();
        let busy: Vec<_> = (0..8).map(|_| mid.start_call()).collect();
        assert_eq!(
            labels(&router.plan(&j, &|_| None).unwrap())[0],
            "us-big/big",
            "4 free beats 2 free"
        );
        drop(busy);
    }
}
