//! Traffic routing per model: which version answers a request (the stable version, or
//! the canary by weight, sticky by a routing key), which versions get mirrored copies
//! (shadows), and the automated rollout that moves a canary to stable or rolls it back.
//!
//! A model's routing state is its `routing.toml` in the repository ([`TrafficSpec`]).
//! The registry reads it together with the model's versions and publishes both in one
//! snapshot, so a request never sees routing that names a version of another moment.
//! Changes go through [`control`]: validated, written atomically, audited, then picked
//! up by a reconciliation exactly as a hand edit of the file (or another replica's
//! change) would be.
//!
//! - [`store`]: reading and atomically writing `routing.toml`; the JSON-lines audit log.
//! - [`control`]: set / promote / rollback, validation, automatic entry of new versions.
//! - [`compare`]: agreement of two answers (labels, argmax, mean absolute difference).
//! - [`spec`]: the routing state and its rules (which version serves).
//! - [`counters`]: per-version traffic counters for the rollout analysis.
//! - [`rollout`]: the controller that walks a plan.
//! - [`analysis`]: a step's figures from Prometheus, summed over the fleet.
//! - [`judge`]: the verdict on one step, a pure function of the step's figures.
//! - [`stats`]: the binomial, hypergeometric and order-statistic maths the judge uses.

pub mod analysis;
pub mod compare;
pub mod control;
pub mod counters;
pub mod judge;
pub mod rollout;
pub mod spec;
pub mod stats;
pub mod store;
pub mod sync;

pub use spec::{
    Canary, ModelTrafficConfig, NewVersions, PlanPatch, ROUTING_FILE, RolloutPlan, RolloutState,
    Shadow, TrafficSpec, Variant,
};
