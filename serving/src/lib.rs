//! What every Ouroboros server shares, so that the embedded `ouro serve` and the deployed
//! services behave alike: the session table (admission, KV budget, TTL), the batching
//! verify scheduler, the target and draft runtimes over them, and the gRPC plumbing
//! (health, reflection, SIGTERM drain).

pub mod args;
pub mod draft;
pub mod draft_scheduler;
pub mod scheduler;
pub mod server;
pub mod sessions;
pub mod target;
pub mod tls;
mod worker;

pub use draft::{DraftConfig, DraftRuntime};
pub use scheduler::{Scheduler, SchedulerConfig};
pub use sessions::{Clock, SessionLimits, SessionState, SessionTable};
pub use target::{TargetConfig, TargetRuntime};
