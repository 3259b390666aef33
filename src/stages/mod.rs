//! The pipeline one job goes through: `ingest` (parse and validate), `route` (alias to
//! targets), `dispatch` (call providers), `finalize` (one transaction per group of jobs, then
//! publish with confirms, then ack).

pub mod dispatch;
pub mod finalize;
pub mod ingest;
pub mod lookup;
pub mod recorder;
pub mod relay;
pub mod route;
