//! Sparse Mixture-of-Experts layers for burn.
//!
//! A [`MoeLayer`] routes each token to a few experts ([`router`]), evaluates only those
//! experts ([`dispatch`]) and returns the output together with auxiliary losses ([`losses`]) and
//! routing statistics ([`stats`]).
//!
//! ```no_run
//! use burn::tensor::{Device, Distribution, Tensor};
//! use moekit_moe::{MoeLayerConfig, Selection};
//!
//! let device = Device::default();
//! let layer = MoeLayerConfig::new(64, 128, 8)
//!     .with_selection(Selection::TopK { k: 2, renormalize: true })
//!     .init(&device)
//!     .unwrap();
//! let x = Tensor::<3>::random([2, 16, 64], Distribution::Normal(0.0, 1.0), &device);
//! let out = layer.forward(x).unwrap();
//! assert_eq!(out.output.dims(), [2, 16, 64]);
//! ```
#![warn(missing_docs)]

pub mod activation;
pub mod dispatch;
pub mod error;
pub mod experts;
pub mod ffn;
mod kernels;
pub mod layer;
pub mod losses;
pub mod low_rank;
pub mod router;
pub mod shared;
pub mod stats;

pub use activation::Activation;
pub use dispatch::{DispatchMode, DispatchPlan};
pub use error::{MoeError, Result};
pub use experts::{ExpertBank, ExpertBankConfig, ExpertWeights, Experts};
pub use ffn::{FeedForward, FeedForwardConfig};
pub use layer::{ExpertInput, MoeLayer, MoeLayerConfig, MoeOutput};
pub use losses::{AuxLossConfig, AuxLosses};
pub use low_rank::{LowRankBank, LowRankBankConfig};
pub use router::{
    Router, RouterConfig, RouterNoise, Routing, Scoring, Selection, low_rank_factors,
};
pub use shared::{SharedExpert, SharedExpertConfig};
pub use stats::RoutingStats;
