//! Neuron profiles against a naive host computation.

mod common;

use common::*;
use moekit_moe::FeedForwardConfig;
use moekit_testing::{device, normal};
use moekit_upcycle::profile;

#[test]
fn profiles_count_importance_and_coactivation_as_a_host_loop_does() {
    let device = device(31);
    let ffn = FeedForwardConfig::new(HIDDEN, INTERMEDIATE)
        .init(&device)
        .unwrap();
    let t = 50;
    let x = normal([t, HIDDEN], 1.0, &device);
    // Host: mean |a| per neuron; the fraction of tokens on which two neurons both exceed
    // the token's mean |a|.
    let acts = swiglu_acts(&Mat::of(x.clone()), &Mat::of(ffn.w_in.val()));
    let i = INTERMEDIATE;
    let (mut importance, mut co) = (vec![0f32; i], vec![0f32; i * i]);
    for a in &acts {
        let mean = a.iter().map(|v| v.abs()).sum::<f32>() / i as f32;
        let fires: Vec<bool> = a.iter().map(|v| v.abs() > mean).collect();
        for j in 0..i {
            importance[j] += a[j].abs() / t as f32;
            for k in 0..i {
                if fires[j] && fires[k] {
                    co[j * i + k] += 1.0 / t as f32;
                }
            }
        }
    }
    let full = profile(&ffn, x.clone(), true);
    assert_eq!(full.tokens, t);
    assert_vec_close(&full.importance, &importance, 1e-4, "importance");
    let got = full.coactivation.as_deref().expect("asked for");
    assert_vec_close(got, &co, 1e-5, "co-activation");
    let diagonal: Vec<f32> = (0..i).map(|j| co[j * i + j]).collect();
    assert_vec_close(&full.firing_rate().unwrap(), &diagonal, 1e-5, "firing rate");
    // Without co-activations: the same importances, and no firing rate.
    let light = profile(&ffn, x, false);
    assert_eq!(light.importance, full.importance);
    assert!(light.coactivation.is_none() && light.firing_rate().is_none());
}
