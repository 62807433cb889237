//! Balanced partitions of an FFN's neurons into experts (LLaMA-MoE, MoEfication, LaDiMo's initialisation).
//!
//! Every function returns a partition of `0..n` into equal-size groups; the caller guarantees
//! `n % groups == 0`. Non-finite scores never panic: NaN counts as the smallest value.

use std::cmp::Ordering;

/// A small deterministic PRNG (SplitMix64, Steele, Lea & Flood 2014) so partitions are reproducible from a seed.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// SplitMix64 state initialised to `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits (the SplitMix64 output function).
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` by Lemire's multiply-shift reduction of [`Self::next_u64`]; `0` when `n == 0`.
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Fisher–Yates shuffle of `v` in place, drawing from [`Self::below`].
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }

    /// A float in `[0, 1)` from the top 53 bits.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A standard normal sample (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.unit(); // (0, 1]
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// `n` samples of `N(0, std²)` as `f32`.
    pub fn normals(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * std) as f32).collect()
    }
}

/// Random partition (LLaMA-MoE "random"): a seeded shuffle cut into `groups` equal parts; each part sorted ascending.
pub fn random(n: usize, groups: usize, seed: u64) -> Vec<Vec<usize>> {
    if groups == 0 {
        return Vec::new();
    }
    debug_assert_eq!(
        n % groups,
        0,
        "{n} neurons do not split into {groups} groups"
    );
    let mut perm: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed).shuffle(&mut perm);
    let size = n / groups;
    (0..groups)
        .map(|g| {
            let mut part = perm[g * size..(g + 1) * size].to_vec();
            part.sort_unstable();
            part
        })
        .collect()
}

/// Balanced k-means (MoEfication / LLaMA-MoE "clustering"): `points` is row-major `n × dim`.
/// Lloyd iterations where the assignment step is balanced: every cluster gets exactly n/groups points.
/// Balanced assignment: sort all (point, cluster) pairs by squared distance and assign greedily while the cluster has room (a point is assigned once).
/// Initialise centroids with k-means++ seeding from `seed`. Stop after `iters` iterations or when assignments stop changing.
/// Returns the groups (each sorted ascending, groups ordered by their smallest member) and the final centroids (`groups × dim`, row-major, in the same order as the returned groups).
///
/// The returned centroids are the means of the returned groups. Coordinates are used in `f64`;
/// NaN coordinates count as `0` and infinities are clamped to the finite `f32` range.
pub fn balanced_kmeans(
    points: &[f32],
    dim: usize,
    groups: usize,
    iters: usize,
    seed: u64,
) -> (Vec<Vec<usize>>, Vec<f32>) {
    if groups == 0 {
        return (Vec::new(), Vec::new());
    }
    let n = points.len().checked_div(dim).unwrap_or(0);
    debug_assert_eq!(points.len(), n * dim, "points is not n × {dim}");
    debug_assert_eq!(
        n % groups,
        0,
        "{n} points do not split into {groups} groups"
    );
    if n == 0 {
        return (vec![Vec::new(); groups], vec![0.0; groups * dim]);
    }
    let pts: Vec<f64> = points[..n * dim]
        .iter()
        .map(|&x| {
            if x.is_nan() {
                0.0
            } else {
                f64::from(x.clamp(f32::MIN, f32::MAX))
            }
        })
        .collect();
    let point = |i: usize| &pts[i * dim..(i + 1) * dim];

    let mut rng = SplitMix64::new(seed);
    let mut centroids = kmeans_pp(&pts, dim, groups, &mut rng);
    let mut assign = balanced_assign(&pts, dim, &centroids, n / groups);
    for _ in 0..iters {
        centroids = means(&pts, dim, &assign, groups);
        let next = balanced_assign(&pts, dim, &centroids, n / groups);
        if next == assign {
            break;
        }
        assign = next;
    }

    let mut parts = vec![Vec::with_capacity(n / groups); groups];
    for (i, &c) in assign.iter().enumerate() {
        parts[c].push(i);
    }
    // Members are pushed in ascending order, so each part is sorted and part[0] is its minimum.
    let mut order: Vec<usize> = (0..groups).collect();
    order.sort_unstable_by_key(|&c| parts[c][0]);
    let mut out_centroids = Vec::with_capacity(groups * dim);
    for &c in &order {
        let mut sum = vec![0.0f64; dim];
        for &i in &parts[c] {
            sum.iter_mut().zip(point(i)).for_each(|(s, x)| *s += x);
        }
        let len = parts[c].len() as f64;
        out_centroids.extend(sum.iter().map(|s| (s / len) as f32));
    }
    let out_groups = order
        .iter()
        .map(|&c| std::mem::take(&mut parts[c]))
        .collect();
    (out_groups, out_centroids)
}

/// Squared Euclidean distance.
fn dist2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// k-means++ seeding (Arthur & Vassilvitskii 2007): each next centroid is a point drawn with
/// probability proportional to its squared distance to the nearest chosen centroid.
fn kmeans_pp(pts: &[f64], dim: usize, k: usize, rng: &mut SplitMix64) -> Vec<f64> {
    let n = pts.len() / dim;
    let point = |i: usize| &pts[i * dim..(i + 1) * dim];
    let mut centroids = Vec::with_capacity(k * dim);
    centroids.extend_from_slice(point(rng.below(n)));
    let mut nearest: Vec<f64> = (0..n).map(|i| dist2(point(i), &centroids)).collect();
    for _ in 1..k {
        let total: f64 = nearest.iter().sum();
        let pick = if total > 0.0 && total.is_finite() {
            let r = rng.unit() * total;
            let mut acc = 0.0;
            // Fall back to the last point with positive weight if rounding leaves `r` uncovered.
            let last = nearest.iter().rposition(|&d| d > 0.0).unwrap_or(n - 1);
            nearest
                .iter()
                .position(|&d| {
                    acc += d;
                    d > 0.0 && acc > r
                })
                .unwrap_or(last)
        } else {
            rng.below(n)
        };
        let c = point(pick).to_vec();
        for (i, d) in nearest.iter_mut().enumerate() {
            *d = d.min(dist2(point(i), &c));
        }
        centroids.extend_from_slice(&c);
    }
    centroids
}

/// Greedy balanced assignment: (point, cluster) pairs by ascending squared distance (ties by
/// point, then cluster), each point to the first cluster that still has room among its pairs.
fn balanced_assign(pts: &[f64], dim: usize, centroids: &[f64], cap: usize) -> Vec<usize> {
    let n = pts.len() / dim;
    let k = centroids.len() / dim;
    let mut pairs: Vec<(f64, usize, usize)> = Vec::with_capacity(n * k);
    for (i, p) in pts.chunks_exact(dim).enumerate() {
        for (c, q) in centroids.chunks_exact(dim).enumerate() {
            pairs.push((dist2(p, q), i, c));
        }
    }
    pairs.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut assign = vec![usize::MAX; n];
    let mut room = vec![cap; k];
    for (_, i, c) in pairs {
        if assign[i] == usize::MAX && room[c] > 0 {
            assign[i] = c;
            room[c] -= 1;
        }
    }
    assign
}

/// Cluster means (`k × dim`); an empty cluster keeps a zero centroid.
fn means(pts: &[f64], dim: usize, assign: &[usize], k: usize) -> Vec<f64> {
    let mut sum = vec![0.0; k * dim];
    let mut count = vec![0usize; k];
    for (p, &c) in pts.chunks_exact(dim).zip(assign) {
        count[c] += 1;
        sum[c * dim..(c + 1) * dim]
            .iter_mut()
            .zip(p)
            .for_each(|(s, x)| *s += x);
    }
    for (row, &cnt) in sum.chunks_exact_mut(dim).zip(&count) {
        if cnt > 0 {
            row.iter_mut().for_each(|s| *s /= cnt as f64);
        }
    }
    sum
}

/// A score as a totally ordered `f64`: NaN becomes the smallest finite `f32`, infinities are
/// clamped to the finite `f32` range (so sums of up to ~10²⁶⁹ of them stay finite) and `-0` is `+0`.
fn score(x: f32) -> f64 {
    if x.is_nan() {
        f64::from(f32::MIN)
    } else {
        f64::from(x.clamp(f32::MIN, f32::MAX)) + 0.0
    }
}

/// Index of the largest `key(i)` over `candidates` (ties → lower index, given ascending candidates).
fn argmax(candidates: impl Iterator<Item = usize>, key: impl Fn(usize) -> f64) -> Option<usize> {
    candidates.fold(None, |best, i| match best {
        Some(b) if key(i).total_cmp(&key(b)) != Ordering::Greater => Some(b),
        _ => Some(i),
    })
}

/// Co-activation grouping (MoEfication's co-activation graph, done greedily and balanced):
/// `co` is a symmetric row-major `n × n` matrix of co-activation scores, `activity` the per-neuron activity.
/// Repeatedly: seed a new group with the most active unassigned neuron, then add, one at a time, the unassigned neuron with the highest summed co-activation with the current members (ties → lower index), until the group has n/groups members.
/// Must be O(n²) overall (keep a running score vector per group; don't recompute sums).
/// Groups sorted ascending inside; returned in creation order.
///
/// `n` is `activity.len()`; NaN scores count as the smallest value.
pub fn coactivation(co: &[f32], activity: &[f32], groups: usize) -> Vec<Vec<usize>> {
    if groups == 0 {
        return Vec::new();
    }
    let n = activity.len();
    debug_assert_eq!(co.len(), n * n, "co is not n × n with n = {n}");
    debug_assert_eq!(
        n % groups,
        0,
        "{n} neurons do not split into {groups} groups"
    );
    let size = n / groups;
    let mut free = vec![true; n];
    // Summed co-activation of every neuron with the current group's members.
    let mut sums = vec![0.0f64; n];
    let mut out = Vec::with_capacity(groups);
    for _ in 0..groups {
        let mut group = Vec::with_capacity(size);
        let Some(mut next) = argmax((0..n).filter(|&i| free[i]), |i| score(activity[i])) else {
            out.push(group);
            continue;
        };
        sums.fill(0.0);
        while group.len() < size {
            free[next] = false;
            group.push(next);
            let row = &co[next * n..(next + 1) * n];
            sums.iter_mut().zip(row).for_each(|(s, &c)| *s += score(c));
            if group.len() < size {
                // `size * groups == n`, so a free neuron is left whenever the group is not full.
                match argmax((0..n).filter(|&i| free[i]), |i| sums[i]) {
                    Some(j) => next = j,
                    None => break,
                }
            }
        }
        group.sort_unstable();
        out.push(group);
    }
    out
}

/// Indices of `importance` from the most important down (ties → lower index; NaN counts as
/// the smallest value): the order in which the importance split fills its parts.
pub fn importance_order(importance: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..importance.len()).collect();
    order.sort_by(|&a, &b| {
        score(importance[b])
            .total_cmp(&score(importance[a]))
            .then(a.cmp(&b))
    });
    order
}

/// Importance split (LLaMA-MoE v2 style shared experts): the `shared` neurons with the highest importance
/// (ties → lower index) and the others, both sorted ascending.
///
/// NaN importance counts as the smallest value; `shared` is capped at the number of neurons.
pub fn by_importance(importance: &[f32], shared: usize) -> (Vec<usize>, Vec<usize>) {
    let mut order = importance_order(importance);
    let mut rest = order.split_off(shared.min(order.len()));
    order.sort_unstable();
    rest.sort_unstable();
    (order, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts that `groups` partitions `0..n` into `k` parts of `n / k`.
    fn assert_partition(parts: &[Vec<usize>], n: usize, k: usize) {
        assert_eq!(parts.len(), k, "number of groups");
        let mut seen = vec![false; n];
        for part in parts {
            assert_eq!(part.len(), n / k, "group size in {parts:?}");
            assert!(part.windows(2).all(|w| w[0] < w[1]), "unsorted {part:?}");
            for &i in part {
                assert!(i < n, "index {i} out of 0..{n}");
                assert!(!seen[i], "index {i} twice in {parts:?}");
                seen[i] = true;
            }
        }
        assert!(seen.iter().all(|&s| s), "missing indices in {parts:?}");
    }

    const SHAPES: [(usize, usize); 8] = [
        (0, 1),
        (0, 3),
        (1, 1),
        (12, 3),
        (30, 1),
        (64, 8),
        (60, 60),
        (96, 4),
    ];

    fn uniform_points(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..n * dim).map(|_| rng.unit() as f32).collect()
    }

    fn symmetric(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        let mut co = vec![0.0; n * n];
        for i in 0..n {
            for j in i..n {
                let v = rng.unit() as f32;
                co[i * n + j] = v;
                co[j * n + i] = v;
            }
        }
        co
    }

    #[test]
    fn splitmix_reference_values() {
        // First outputs of the reference SplitMix64 from seed 0.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(rng.next_u64(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn below_and_shuffle() {
        let mut rng = SplitMix64::new(7);
        assert_eq!(rng.below(0), 0);
        let mut hits = [0usize; 5];
        for _ in 0..5000 {
            hits[rng.below(5)] += 1;
        }
        assert!(hits.iter().all(|&h| (800..1200).contains(&h)), "{hits:?}");
        let mut v: Vec<usize> = (0..50).collect();
        rng.shuffle(&mut v);
        assert_ne!(v, (0..50).collect::<Vec<_>>());
        v.sort_unstable();
        assert_eq!(v, (0..50).collect::<Vec<_>>());
        rng.shuffle::<u8>(&mut []);
    }

    #[test]
    fn random_is_a_partition() {
        for (n, k) in SHAPES {
            assert_partition(&random(n, k, 3), n, k);
        }
        assert!(random(5, 0, 1).is_empty());
    }

    #[test]
    fn random_is_seeded() {
        assert_eq!(random(64, 8, 42), random(64, 8, 42));
        assert_ne!(random(64, 8, 42), random(64, 8, 43));
        // Not the identity cut.
        let identity: Vec<Vec<usize>> = (0..8).map(|g| (g * 8..g * 8 + 8).collect()).collect();
        assert_ne!(random(64, 8, 42), identity);
    }

    #[test]
    fn kmeans_is_a_partition() {
        for (n, k) in SHAPES {
            let dim = 3;
            let (parts, centroids) = balanced_kmeans(&uniform_points(n, dim, 9), dim, k, 20, 1);
            assert_partition(&parts, n, k);
            assert_eq!(centroids.len(), k * dim);
            if n > 0 {
                assert!(parts.windows(2).all(|w| w[0][0] < w[1][0]), "{parts:?}");
            }
        }
        assert_eq!(balanced_kmeans(&[1.0, 2.0], 2, 0, 5, 0), (vec![], vec![]));
        assert_eq!(
            balanced_kmeans(&[], 0, 2, 5, 0).0,
            vec![Vec::<usize>::new(); 2]
        );
    }

    #[test]
    fn kmeans_centroids_are_group_means() {
        let dim = 4;
        let pts = uniform_points(40, dim, 5);
        let (parts, centroids) = balanced_kmeans(&pts, dim, 5, 3, 2);
        for (part, c) in parts.iter().zip(centroids.chunks_exact(dim)) {
            for (d, &cd) in c.iter().enumerate() {
                let mean = part.iter().map(|&i| pts[i * dim + d]).sum::<f32>() / part.len() as f32;
                assert!((mean - cd).abs() < 1e-5, "{mean} vs {cd}");
            }
        }
    }

    #[test]
    fn kmeans_is_seeded() {
        let pts = uniform_points(64, 2, 11);
        assert_eq!(
            balanced_kmeans(&pts, 2, 8, 10, 5),
            balanced_kmeans(&pts, 2, 8, 10, 5)
        );
        let differs =
            (1..10).any(|s| balanced_kmeans(&pts, 2, 8, 0, 0) != balanced_kmeans(&pts, 2, 8, 0, s));
        assert!(differs, "seeds never change the result");
    }

    /// `sizes[c]` points around `centres[c]` with ±0.1 jitter, in shuffled order; returns the points
    /// and each point's planted cluster.
    fn planted(centres: &[[f32; 3]], sizes: &[usize], seed: u64) -> (Vec<f32>, Vec<usize>) {
        let mut rng = SplitMix64::new(seed);
        let mut labels: Vec<usize> = sizes
            .iter()
            .enumerate()
            .flat_map(|(c, &s)| std::iter::repeat_n(c, s))
            .collect();
        rng.shuffle(&mut labels);
        let pts = labels
            .iter()
            .flat_map(|&c| centres[c].map(|x| x + (rng.unit() as f32 - 0.5) * 0.2))
            .collect();
        (pts, labels)
    }

    #[test]
    fn kmeans_recovers_planted_clusters() {
        let centres = [
            [0.0, 0.0, 0.0],
            [10.0, 0.0, 0.0],
            [0.0, 10.0, 0.0],
            [0.0, 0.0, 10.0],
        ];
        for seed in 0..5 {
            let (pts, labels) = planted(&centres, &[8; 4], seed);
            let (parts, centroids) = balanced_kmeans(&pts, 3, 4, 50, seed);
            assert_partition(&parts, 32, 4);
            for (part, c) in parts.iter().zip(centroids.chunks_exact(3)) {
                let label = labels[part[0]];
                assert!(part.iter().all(|&i| labels[i] == label), "mixed {part:?}");
                let err = dist2(
                    &c.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
                    &centres[label].map(f64::from),
                );
                assert!(err < 0.01, "centroid {c:?} far from {:?}", centres[label]);
            }
        }
    }

    #[test]
    fn kmeans_balances_unequal_clusters() {
        let centres = [[0.0, 0.0, 0.0], [10.0, 10.0, 10.0]];
        for seed in 0..5 {
            let (pts, labels) = planted(&centres, &[12, 4], seed);
            let (parts, _) = balanced_kmeans(&pts, 3, 2, 50, seed);
            assert_partition(&parts, 16, 2);
            // The small cluster stays together, topped up with 4 points of the big one.
            let small: Vec<usize> = (0..16).filter(|&i| labels[i] == 1).collect();
            assert!(
                parts.iter().any(|p| small.iter().all(|i| p.contains(i))),
                "{parts:?}"
            );
        }
    }

    #[test]
    fn coactivation_is_a_partition() {
        for (n, k) in SHAPES {
            let co = symmetric(n, 4);
            let activity = uniform_points(n, 1, 8);
            assert_partition(&coactivation(&co, &activity, k), n, k);
        }
        assert!(coactivation(&[], &[], 0).is_empty());
    }

    #[test]
    fn coactivation_recovers_planted_blocks() {
        let (blocks, size) = (4, 6);
        let n = blocks * size;
        let mut rng = SplitMix64::new(21);
        let mut block_of: Vec<usize> = (0..n).map(|i| i / size).collect();
        rng.shuffle(&mut block_of);
        let mut co = symmetric(n, 22);
        for i in 0..n {
            for j in 0..n {
                co[i * n + j] *= 0.1;
                if block_of[i] == block_of[j] {
                    co[i * n + j] += 1.0;
                }
            }
        }
        let activity = uniform_points(n, 1, 23);
        let parts = coactivation(&co, &activity, blocks);
        assert_partition(&parts, n, blocks);
        for part in &parts {
            assert!(
                part.iter().all(|&i| block_of[i] == block_of[part[0]]),
                "mixed {part:?}"
            );
        }
        // The first group is seeded by the most active neuron.
        let top = (0..n)
            .max_by(|&a, &b| activity[a].total_cmp(&activity[b]))
            .unwrap();
        assert!(parts[0].contains(&top));
    }

    #[test]
    fn coactivation_ties_go_to_lower_index() {
        // All scores equal: each group takes the lowest free indices.
        let parts = coactivation(&[0.0; 36], &[1.0; 6], 3);
        assert_eq!(parts, vec![vec![0, 1], vec![2, 3], vec![4, 5]]);
        // Seeds follow activity, in creation order.
        let parts = coactivation(&[0.0; 16], &[0.0, 1.0, 3.0, 2.0], 4);
        assert_eq!(parts, vec![vec![2], vec![3], vec![1], vec![0]]);
    }

    #[test]
    fn by_importance_picks_top_with_ties_to_lower_index() {
        let imp = [1.0, 3.0, 3.0, 2.0, 3.0];
        assert_eq!(by_importance(&imp, 2), (vec![1, 2], vec![0, 3, 4]));
        assert_eq!(by_importance(&imp, 4), (vec![1, 2, 3, 4], vec![0]));
        assert_eq!(by_importance(&imp, 0), (vec![], vec![0, 1, 2, 3, 4]));
        assert_eq!(by_importance(&imp, 9), (vec![0, 1, 2, 3, 4], vec![]));
        assert_eq!(by_importance(&[-0.0, 0.0], 1), (vec![0], vec![1]));
        assert_eq!(by_importance(&[], 3), (vec![], vec![]));
    }

    #[test]
    fn nan_is_the_smallest_and_never_panics() {
        let nan = f32::NAN;
        let inf = f32::INFINITY;
        assert_eq!(
            by_importance(&[nan, 0.5, -1.0, -inf], 2),
            (vec![1, 2], vec![0, 3])
        );
        assert_eq!(by_importance(&[nan, nan, -inf], 1), (vec![0], vec![1, 2]));
        assert_eq!(importance_order(&[nan, 0.5, inf, -1.0]), [2, 1, 3, 0]);

        let activity = [nan, 1.0, -inf, inf];
        let mut co = symmetric(4, 3);
        co[1] = nan;
        co[4] = nan;
        co[2 * 4 + 3] = inf;
        co[3 * 4 + 2] = inf;
        co[5] = -inf;
        let parts = coactivation(&co, &activity, 2);
        assert_partition(&parts, 4, 2);
        assert_eq!(parts[0], vec![2, 3]);

        let mut pts = uniform_points(8, 2, 1);
        pts[0] = nan;
        pts[3] = inf;
        pts[6] = -inf;
        let (parts, centroids) = balanced_kmeans(&pts, 2, 4, 10, 0);
        assert_partition(&parts, 8, 4);
        assert!(centroids.iter().all(|c| !c.is_nan()));
        let (parts, _) = balanced_kmeans(&[nan; 12], 3, 2, 10, 0);
        assert_partition(&parts, 4, 2);
    }
}
