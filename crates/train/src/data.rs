//! Training data: a token stream cut into fixed windows, visited in a seeded order that a
//! checkpoint can resume exactly.

use burn::tensor::{Device, Int, Tensor, TensorData};
use moekit_upcycle::partition::SplitMix64;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// A token stream cut into windows of `seq_len + 1` tokens with stride `seq_len`: window `i`
/// gives inputs `tokens[i·T .. i·T + T]` and next-token labels `tokens[i·T + 1 .. i·T + T + 1]`.
#[derive(Debug, Clone)]
pub struct TokenWindows {
    tokens: Vec<u32>,
    seq_len: usize,
}

/// One batch: inputs and their next-token labels.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Input ids `[B, T]`.
    pub tokens: Tensor<2, Int>,
    /// Next-token ids `[B, T]`.
    pub labels: Tensor<2, Int>,
}

impl Batch {
    /// Tokens in the batch (`B·T`).
    pub fn len(&self) -> usize {
        self.tokens.dims().iter().product()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl TokenWindows {
    /// Windows of `seq_len` over `tokens`.
    ///
    /// # Errors
    /// [`TrainError::Data`] for `seq_len < 1` or fewer than `seq_len + 1` tokens.
    pub fn new(tokens: Vec<u32>, seq_len: usize) -> Result<Self> {
        if seq_len == 0 {
            return Err(TrainError::Config(
                "sequence length must be at least 1".into(),
            ));
        }
        if tokens.len() < seq_len + 1 {
            return Err(TrainError::Data(format!(
                "{} tokens make no window of {} (+1 for the labels); give more text or a shorter --seq-len",
                tokens.len(),
                seq_len
            )));
        }
        Ok(Self { tokens, seq_len })
    }

    /// The number of windows.
    pub fn len(&self) -> usize {
        (self.tokens.len() - 1) / self.seq_len
    }

    /// Whether there are no windows (never true for a constructed value).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens per window `T`.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The largest token id.
    pub fn max_token(&self) -> u32 {
        self.tokens.iter().copied().max().unwrap_or(0)
    }

    /// A 64-bit FNV-1a hash of the window length and every token, the same in every build:
    /// two token streams that differ anywhere differ here (but for a chance of 2⁻⁶⁴).
    pub fn fingerprint(&self) -> u64 {
        let mut hash = crate::digest::Fnv1a::default();
        let seq = self.seq_len as u64;
        let words = std::iter::once(seq).chain(self.tokens.iter().map(|&t| u64::from(t)));
        for word in words {
            hash.update(&word.to_le_bytes());
        }
        hash.finish()
    }

    /// Windows `ids` as a batch on `device`.
    ///
    /// # Panics
    /// If an id is `>= len()`.
    pub fn batch(&self, ids: &[usize], device: &Device) -> Batch {
        let t = self.seq_len;
        let mut inputs = Vec::with_capacity(ids.len() * t);
        let mut labels = Vec::with_capacity(ids.len() * t);
        for &i in ids {
            assert!(i < self.len(), "window {i} of {}", self.len());
            let w = &self.tokens[i * t..i * t + t + 1];
            inputs.extend(w[..t].iter().map(|&x| x as i64));
            labels.extend(w[1..].iter().map(|&x| x as i64));
        }
        let ints =
            |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [ids.len(), t]), device);
        Batch {
            tokens: ints(inputs),
            labels: ints(labels),
        }
    }

    /// Consecutive batches of at most `batch_size` windows covering every window once, in
    /// order (for evaluation).
    pub fn sequential(&self, batch_size: usize) -> Vec<Vec<usize>> {
        let ids: Vec<usize> = (0..self.len()).collect();
        ids.chunks(batch_size.max(1))
            .map(<[usize]>::to_vec)
            .collect()
    }
}

/// Where a run is in its data: epoch `e` visits every window once in the order of a
/// Fisher–Yates shuffle seeded by `seed + e`; `position` windows of it are used. Saved in
/// checkpoints, so a resumed run sees exactly the batches the uninterrupted one would.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataOrder {
    /// Seed of the shuffles.
    pub seed: u64,
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Windows of the current epoch already used.
    pub position: usize,
}

impl DataOrder {
    /// The start of epoch 0.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            epoch: 0,
            position: 0,
        }
    }

    /// The visiting order of `epoch` over `n` windows.
    fn permutation(&self, epoch: u64, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        SplitMix64::new(self.seed.wrapping_add(epoch.wrapping_mul(0x9E37_79B9)))
            .shuffle(&mut order);
        order
    }

    /// The next `count` window ids of `n`. An epoch's windows are not split across batches:
    /// when fewer than `count` remain, the next epoch starts (`count` is capped at `n`).
    pub fn next(&mut self, count: usize, n: usize) -> Vec<usize> {
        let count = count.min(n);
        // `position ≤ n` unless a state file says otherwise (the trainer checks on resume).
        if count > n.saturating_sub(self.position) {
            self.epoch += 1;
            self.position = 0;
        }
        let ids = self.permutation(self.epoch, n)[self.position..self.position + count].to_vec();
        self.position += count;
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_shift_labels_by_one() {
        let device = moekit_testing::device(0);
        let w = TokenWindows::new((0..11).collect(), 4).unwrap();
        assert_eq!(w.len(), 2); // 11 tokens: [0..5), [4..9); [8..13) is incomplete
        let b = w.batch(&[1, 0], &device);
        let tokens: Vec<i64> = b.tokens.into_data().iter::<i64>().collect();
        let labels: Vec<i64> = b.labels.into_data().iter::<i64>().collect();
        assert_eq!(tokens, [4, 5, 6, 7, 0, 1, 2, 3]);
        assert_eq!(labels, [5, 6, 7, 8, 1, 2, 3, 4]);
        assert!(TokenWindows::new((0..4).collect(), 4).is_err());
        assert!(TokenWindows::new((0..4).collect(), 0).is_err());
    }

    #[test]
    fn fingerprints_are_fnv1a_of_the_length_and_tokens() {
        let w = TokenWindows::new(vec![1, 2, 3], 2).unwrap();
        // FNV-1a 64 of the little-endian u64s 2, 1, 2, 3 (computed independently).
        assert_eq!(w.fingerprint(), 0xaf7f_f694_d0b1_3a27);
        assert_eq!(w.max_token(), 3);
        let other = TokenWindows::new(vec![1, 2, 4], 2).unwrap();
        assert_ne!(other.fingerprint(), w.fingerprint());
        let longer = TokenWindows::new(vec![1, 2, 3], 1).unwrap();
        assert_ne!(longer.fingerprint(), w.fingerprint());
    }

    #[test]
    fn order_visits_each_window_once_per_epoch_and_resumes() {
        let mut order = DataOrder::new(3);
        let mut seen: Vec<usize> = (0..3).flat_map(|_| order.next(3, 10)).collect();
        assert_eq!(order.epoch, 0);
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 9, "no window twice within an epoch");
        assert!(seen.iter().all(|&i| i < 10));
        let next = order.next(3, 10);
        assert_eq!(order.epoch, 1, "one window left: a new epoch starts");
        assert_eq!(next.len(), 3);
        // A copy taken mid-run (as a checkpoint does) continues identically.
        let mut copy = order;
        assert_eq!(order.next(4, 10), copy.next(4, 10));
        // Different epochs use different orders.
        let a = DataOrder::new(3).permutation(0, 50);
        let b = DataOrder::new(3).permutation(1, 50);
        assert_ne!(a, b);
    }

    #[test]
    fn a_position_past_the_data_starts_the_next_epoch_instead_of_overflowing() {
        let mut order = DataOrder {
            seed: 1,
            epoch: 4,
            position: usize::MAX - 1,
        };
        let ids = order.next(3, 10);
        assert_eq!((order.epoch, order.position), (5, 3));
        assert_eq!(ids, DataOrder::new(1).permutation(5, 10)[..3]);
    }
}
