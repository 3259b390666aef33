//! The route stage: turns a job's route alias into a [`Plan`] of targets, via the
//! [`Router`]. The budget hook excludes nothing until budgets exist.

use crate::messages::Job;
use crate::routing::{Plan, RouteError, Router};

/// The plan for `job`.
pub fn route(router: &Router, job: &Job) -> Result<Plan, RouteError> {
    router.plan(job, &|_| None)
}
