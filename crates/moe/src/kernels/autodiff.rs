//! Autodiff for the fused dispatch: a four-parent backward step that calls the Flex kernel.

use burn::backend::Autodiff;
use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};

use super::extension::MoeKernels;
use super::flex::{self, Saved};
use crate::activation::Activation;

#[derive(Debug)]
struct GroupedFfnStep;

impl Backward<Flex, 4> for GroupedFfnStep {
    type State = Saved;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let parent_grads = flex::backward(ops.state, dy);
        for (parent, grad) in ops.parents.into_iter().zip(parent_grads) {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

impl<C: CheckpointStrategy> MoeKernels for Autodiff<Flex, C> {
    fn grouped_ffn(
        x: FloatTensor<Self>,
        w_in: FloatTensor<Self>,
        w_out: FloatTensor<Self>,
        rows: IntTensor<Self>,
        weights: FloatTensor<Self>,
        offsets: Vec<usize>,
        activation: Activation,
    ) -> FloatTensor<Self> {
        let guards = [x.node(), w_in.node(), w_out.node(), weights.node()];
        let prep = GroupedFfnStep
            .prepare::<C>(guards)
            .compute_bound()
            .stateful();
        let keep = matches!(prep, OpsKind::Tracked(_));
        let (y, saved) = flex::forward(
            x.into_primitive(),
            w_in.into_primitive(),
            w_out.into_primitive(),
            rows,
            weights.into_primitive(),
            offsets,
            activation,
            keep,
        );
        match (prep, saved) {
            (OpsKind::Tracked(prep), Some(saved)) => prep.finish(saved, y),
            (OpsKind::UnTracked(prep), _) => prep.finish(y),
            (OpsKind::Tracked(_), None) => unreachable!("tracked steps keep their pre-activations"),
        }
    }

    fn top_k_indices(scores: FloatTensor<Self>, k: usize) -> IntTensor<Self> {
        Flex::top_k_indices(scores.into_primitive(), k)
    }
}
