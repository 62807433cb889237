//! Learning-rate schedules.

/// Linear warm-up to `peak`, then cosine decay to `floor · peak` (Loshchilov & Hutter 2017,
/// SGDR without restarts; the schedule of most LLM fine-tuning recipes).
///
/// `lr(s) = peak · (s + 1) / warmup` for `s < warmup`, then
/// `peak · (floor + (1 − floor) · ½(1 + cos(π · t)))` with `t = (s − warmup) / (total − warmup)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmupCosine {
    /// Peak learning rate.
    pub peak: f64,
    /// Warm-up steps (at least 1).
    pub warmup: usize,
    /// Total steps.
    pub total: usize,
    /// Final learning rate as a fraction of the peak.
    pub floor: f64,
}

impl WarmupCosine {
    /// A schedule over `total` steps.
    pub fn new(peak: f64, warmup: usize, total: usize, floor: f64) -> Self {
        Self {
            peak,
            warmup: warmup.max(1),
            total,
            floor,
        }
    }

    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let t = ((step - self.warmup) as f64
            / (self.total.saturating_sub(self.warmup)).max(1) as f64)
            .min(1.0);
        self.peak
            * (self.floor + (1.0 - self.floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_to_the_floor() {
        let s = WarmupCosine::new(1.0, 4, 104, 0.1);
        assert_eq!(s.lr(0), 0.25);
        assert_eq!(s.lr(3), 1.0);
        assert!((s.lr(4) - 1.0).abs() < 1e-12);
        // Half-way through the decay: the mean of peak and floor.
        assert!((s.lr(54) - 0.55).abs() < 1e-12);
        assert!((s.lr(104) - 0.1).abs() < 1e-12);
        assert!(
            (s.lr(500) - 0.1).abs() < 1e-12,
            "past the end it stays at the floor"
        );
        for i in 4..104 {
            assert!(s.lr(i + 1) <= s.lr(i));
        }
    }
}
