//! Grouping of token-expert assignments by expert: the one host read of a MoE layer.

use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::error::{MoeError, Result};
use crate::router::Routing;

/// Which assignments each expert computes, grouped by expert and in token order within one.
///
/// Built from a [`Routing`] with a single device-to-host read of the chosen expert ids
/// (`T·K` integers); the grouping itself is a counting sort on the host, `O(T·K + E)`.
#[derive(Debug, Clone)]
pub struct DispatchPlan {
    /// Token index of each kept assignment, grouped by expert, `[N]`.
    pub rows: Tensor<1, Int>,
    /// Combine weight of each kept assignment, `[N]` (differentiable w.r.t. the router).
    pub weights: Tensor<1>,
    /// Expert `e` owns assignments `offsets[e]..offsets[e + 1]`; length `E + 1`.
    pub offsets: Vec<usize>,
    /// Assignments the router sent to each expert, before capacity dropping.
    pub routed: Vec<usize>,
    /// Assignments dropped because their expert was full.
    pub dropped: usize,
    /// Tokens in the batch `T`.
    pub tokens: usize,
    /// Tokens that are not padding.
    pub real_tokens: usize,
}

/// Host-side result of grouping, before upload.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HostPlan {
    pub slots: Vec<i64>,
    pub offsets: Vec<usize>,
    pub routed: Vec<usize>,
    pub dropped: usize,
    pub real_tokens: usize,
}

/// Bucket of an unused slot (top-p) in [`group`]'s input; padding uses `experts + 1`.
fn unused(experts: usize) -> i64 {
    experts as i64
}

/// Counting sort of assignments by expert.
///
/// `bucket[n]` is the expert of flat assignment `n = token·k + slot`, `experts` for an unused
/// slot and `experts + 1` for every slot of a padding token. With a capacity factor `f`, each
/// expert keeps its first `⌈f · real tokens · k / E⌉` assignments in token order (Switch
/// Transformer / GShard) and the rest are dropped.
pub(crate) fn group(
    bucket: &[i64],
    experts: usize,
    k: usize,
    capacity_factor: Option<f64>,
) -> HostPlan {
    let mut counts = vec![0usize; experts];
    let padding = unused(experts) + 1;
    let real_tokens = bucket.chunks(k.max(1)).filter(|t| t[0] != padding).count();
    for &b in bucket {
        if let Ok(b) = usize::try_from(b)
            && b < experts
        {
            counts[b] += 1;
        }
    }
    let capacity =
        capacity_factor.map(|f| (f * (real_tokens * k) as f64 / experts as f64).ceil() as usize);
    let kept: Vec<usize> = counts
        .iter()
        .map(|&c| capacity.map_or(c, |cap| c.min(cap)))
        .collect();
    let dropped = counts.iter().zip(&kept).map(|(c, k)| c - k).sum();
    let mut offsets = Vec::with_capacity(experts + 1);
    offsets.push(0);
    for k in &kept {
        offsets.push(offsets.last().unwrap() + k);
    }
    let mut cursor = offsets[..experts].to_vec();
    let mut slots = vec![0i64; offsets[experts]];
    for (n, &b) in bucket.iter().enumerate() {
        if let Ok(b) = usize::try_from(b)
            && b < experts
            && cursor[b] < offsets[b + 1]
        {
            slots[cursor[b]] = n as i64;
            cursor[b] += 1;
        }
    }
    HostPlan {
        slots,
        offsets,
        routed: counts,
        dropped,
        real_tokens,
    }
}

impl DispatchPlan {
    /// Groups the routing's active assignments by expert.
    ///
    /// `keep` (`[T]`, optional) marks real tokens; padding tokens are not dispatched at all.
    /// `capacity_factor` bounds the assignments per expert to `⌈f · real tokens · k / E⌉`.
    pub fn new(
        routing: &Routing,
        keep: Option<Tensor<1, Bool>>,
        capacity_factor: Option<f64>,
    ) -> Result<Self> {
        let [t, k] = routing.experts.dims();
        let experts = routing.probs.dims()[1];
        let n = t * k;
        if i32::try_from(n).is_err() {
            return Err(MoeError::TooManyAssignments { assignments: n });
        }
        let mut bucket = routing
            .experts
            .clone()
            .mask_fill(routing.active.clone().bool_not(), unused(experts));
        if let Some(keep) = keep {
            let padding = keep.bool_not().unsqueeze_dim::<2>(1).expand([t, k]);
            bucket = bucket.mask_fill(padding, unused(experts) + 1);
        }
        let bucket: Vec<i64> = bucket.into_data().iter::<i64>().collect();
        let host = group(&bucket, experts, k, capacity_factor);

        let device = routing.weights.device();
        let rows: Vec<i64> = host.slots.iter().map(|&s| s / k as i64).collect();
        let len = host.slots.len();
        let slots = Tensor::<1, Int>::from_data(TensorData::new(host.slots, [len]), &device);
        let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [len]), &device);
        let weights = routing.weights.clone().reshape([n]).select(0, slots);
        Ok(Self {
            rows,
            weights,
            offsets: host.offsets,
            routed: host.routed,
            dropped: host.dropped,
            tokens: t,
            real_tokens: host.real_tokens,
        })
    }

    /// Number of experts `E`.
    pub fn num_experts(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Kept assignments `N`.
    pub fn assignments(&self) -> usize {
        self.offsets[self.num_experts()]
    }

    /// Assignments each expert computes.
    pub fn tokens_per_expert(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// The dense `[T, E]` matrix of combine weights this plan applies (0 where not dispatched).
    pub fn combine_matrix(&self) -> Tensor<2> {
        let e = self.num_experts();
        let device = self.weights.device();
        let experts: Vec<i64> = self
            .tokens_per_expert()
            .iter()
            .enumerate()
            .flat_map(|(i, &c)| std::iter::repeat_n(i as i64, c))
            .collect();
        let experts =
            Tensor::<1, Int>::from_data(TensorData::new(experts, [self.assignments()]), &device);
        let flat = self.rows.clone() * e as i64 + experts;
        Tensor::<1>::zeros([self.tokens * e], &device)
            .select_assign(
                0,
                flat,
                self.weights.clone(),
                burn::tensor::IndexingUpdateOp::Add,
            )
            .reshape([self.tokens, e])
    }
}

#[cfg(test)]
mod tests {
    use super::group;

    #[test]
    fn groups_by_expert_in_token_order() {
        // 3 tokens x 2 slots; bucket 3 (= E) marks an unused slot.
        let plan = group(&[1, 0, 1, 3, 0, 1], 3, 2, None);
        assert_eq!(plan.offsets, vec![0, 2, 5, 5]);
        assert_eq!(plan.slots, vec![1, 4, 0, 2, 5]);
        assert_eq!(plan.dropped, 0);
    }

    #[test]
    fn capacity_keeps_the_earliest_tokens() {
        // 6 tokens x 1 slot, capacity ⌈0.7 · 6 · 1 / 2⌉ = 3 - but token 5 is padding (bucket 3),
        // so capacity is ⌈0.7 · 5 / 2⌉ = 2.
        let plan = group(&[1, 0, 1, 0, 1, 3], 2, 1, Some(0.7));
        assert_eq!(plan.real_tokens, 5);
        assert_eq!(plan.offsets, vec![0, 2, 4]);
        assert_eq!(plan.slots, vec![1, 3, 0, 2]);
        assert_eq!(plan.dropped, 1);
        assert_eq!(plan.routed, vec![2, 3]);
    }

    #[test]
    fn empty_batch_and_empty_experts() {
        let plan = group(&[], 4, 2, None);
        assert_eq!(plan.offsets, vec![0; 5]);
        assert!(plan.slots.is_empty());
    }
}
