use burn::tensor::{Device, Distribution, Tensor};
use moekit::moe::{DispatchPlan, MoeLayerConfig, Selection, losses::aux_losses};
use std::time::Instant;
fn main() {
    let (e, i, k) = (
        std::env::args().nth(1).unwrap().parse().unwrap(),
        std::env::args().nth(2).unwrap().parse().unwrap(),
        std::env::args().nth(3).unwrap().parse().unwrap(),
    );
    let device = Device::default();
    let layer = MoeLayerConfig::new(576, i, e)
        .with_selection(Selection::TopK {
            k,
            renormalize: true,
        })
        .init(&device)
        .unwrap();
    let x = Tensor::<2>::random([2048, 576], Distribution::Normal(0.0, 1.0), &device);
    for _ in 0..3 {
        let t = Instant::now();
        let logits = layer.router.logits(x.clone());
        let _ = logits.clone().into_data();
        let t1 = t.elapsed();
        let t = Instant::now();
        let routing = layer.router.route_logits(logits);
        let _ = routing.weights.clone().into_data();
        let t2 = t.elapsed();
        let t = Instant::now();
        let plan = DispatchPlan::new(&routing, None, None).unwrap();
        let _ = plan.weights.clone().into_data();
        let t3 = t.elapsed();
        let t = Instant::now();
        let y = layer.dispatch.expert_ffn(x.clone(), &layer.experts, &plan);
        let _ = y.into_data();
        let t4 = t.elapsed();
        let t = Instant::now();
        let a = aux_losses(&routing, None, &plan.routed);
        let _ = a.total(&layer.aux_loss).into_data();
        let t5 = t.elapsed();
        let t = Instant::now();
        let _ = layer
            .forward(x.clone().reshape([1, 2048, 576]))
            .unwrap()
            .output
            .into_data();
        let t6 = t.elapsed();
        println!(
            "logits {t1:?} route {t2:?} plan {t3:?} ffn {t4:?} aux {t5:?} total-forward {t6:?}"
        );
    }
}
