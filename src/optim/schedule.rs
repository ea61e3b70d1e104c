//! Learning-rate schedules: an optional linear warm-up, then a decay.

use crate::config::{ScheduleConfig, ScheduleKind};

/// The global learning rate at each step of a run of `total_steps`.
#[derive(Debug, Clone)]
pub struct Schedule {
    config: ScheduleConfig,
    base_lr: f64,
    total_steps: u64,
}

impl Schedule {
    pub fn new(config: &ScheduleConfig, base_lr: f64, total_steps: u64) -> Self {
        Self {
            config: config.clone(),
            base_lr,
            total_steps,
        }
    }

    /// The rate for update `step` (0-based). Warm-up rises linearly to
    /// `base_lr` at step `warmup_steps − 1`; the decay's progress runs from 0
    /// right after warm-up to 1 at the end of the run (`poly` and `cosine`
    /// reach 0 only after the last step). `step` multiplies by `gamma` every
    /// `step_every` steps counted from the start of the run.
    pub fn lr(&self, step: u64) -> f64 {
        let c = &self.config;
        if step < c.warmup_steps {
            return self.base_lr * (step + 1) as f64 / c.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(c.warmup_steps).max(1);
        let progress = ((step - c.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        self.base_lr
            * match c.kind {
                ScheduleKind::Constant => 1.0,
                ScheduleKind::Poly => (1.0 - progress).powf(c.power),
                ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
                ScheduleKind::Step => c.gamma.powi((step / c.step_every) as i32),
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind, warmup_steps: u64) -> Schedule {
        let config = ScheduleConfig {
            kind,
            warmup_steps,
            power: 2.0,
            step_every: 30,
            gamma: 0.5,
        };
        Schedule::new(&config, 2.0, 110)
    }

    #[test]
    fn warmup_rises_linearly_to_the_base_rate() {
        let s = schedule(ScheduleKind::Constant, 10);
        assert_eq!(s.lr(0), 0.2);
        assert_eq!(s.lr(4), 1.0);
        assert_eq!(s.lr(9), 2.0);
        assert_eq!(s.lr(50), 2.0);
    }

    #[test]
    fn decays_follow_their_formulas() {
        let poly = schedule(ScheduleKind::Poly, 10);
        assert_eq!(poly.lr(10), 2.0);
        assert!((poly.lr(60) - 2.0 * 0.25).abs() < 1e-12);
        let cosine = schedule(ScheduleKind::Cosine, 10);
        assert!((cosine.lr(60) - 1.0).abs() < 1e-12);
        assert!(cosine.lr(109) < 0.01 && cosine.lr(109) > 0.0);
        let step = schedule(ScheduleKind::Step, 0);
        assert_eq!(step.lr(29), 2.0);
        assert_eq!(step.lr(30), 1.0);
        assert_eq!(step.lr(95), 0.25);
    }
}
