//! Token-to-expert routing: a linear gate, a scoring function and a selection rule.

mod factor;
mod gate;
mod selection;

pub use factor::low_rank_factors;
pub use gate::{Router, RouterConfig, Routing};
pub use selection::{RouterNoise, Scoring, Selection};
