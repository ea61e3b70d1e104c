//! Detecting a diverging run, step by step, from its loss and gradient norm.
//!
//! Four rules (each can be turned off in `[divergence]`):
//! - `non_finite_loss`, `non_finite_grad`: a NaN or infinity; fires at once.
//! - `loss_factor`: the batch loss exceeds `loss_factor` × the best value of
//!   its exponential moving average so far, and that best by `loss_min_rise`.
//! - `grad_factor`: the global gradient norm exceeds `grad_factor` × its
//!   median over the last `grad_window` steps.
//!
//! The ratio rules start after `min_steps` and must hold for `patience`
//! consecutive steps; the step where the streak began is the divergence's
//! onset, and a rescue starts from a checkpoint taken before it.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::config::DivergenceConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    NonFiniteLoss,
    NonFiniteGrad,
    LossFactor,
    GradFactor,
}

/// A divergence: which rule fired, at which step, and when its streak began.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub rule: Rule,
    pub step: u64,
    pub onset_step: u64,
}

/// The detector's memory: part of every checkpoint, so a resumed run decides as the original would.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DetectorState {
    /// Exponential moving average of the loss (bias-corrected on read).
    ema: f64,
    ema_steps: u64,
    /// The best (lowest) smoothed loss so far.
    pub best_smoothed: Option<f64>,
    grad_norms: VecDeque<f64>,
    /// The rule holding now and the step its streak began.
    streak: Option<(Rule, u64, u64)>,
}

pub struct Detector {
    config: DivergenceConfig,
    pub state: DetectorState,
}

impl Detector {
    pub fn new(config: &DivergenceConfig, state: DetectorState) -> Self {
        Self {
            config: config.clone(),
            state,
        }
    }

    /// Whether the detector needs the global gradient norm every step.
    pub fn needs_grad_norm(&self) -> bool {
        self.config.non_finite || self.config.grad_factor > 0.0
    }

    /// The bias-corrected smoothed loss, once there is one.
    pub fn smoothed_loss(&self) -> Option<f64> {
        let s = &self.state;
        (s.ema_steps > 0).then(|| s.ema / (1.0 - self.config.smoothing.powi(s.ema_steps as i32)))
    }

    /// Whether training was still going well: the smoothed loss within 10%
    /// of its best so far (or no history yet). Rescues start only from
    /// checkpoints taken in such a state.
    pub fn is_healthy(&self) -> bool {
        match (self.smoothed_loss(), self.state.best_smoothed) {
            (Some(smoothed), Some(best)) => smoothed.is_finite() && smoothed <= 1.1 * best,
            _ => true,
        }
    }

    /// Takes in one step's batch loss and global gradient norm (when it was
    /// computed) and says whether the run is now diverging.
    pub fn observe(&mut self, step: u64, loss: f64, grad_norm: Option<f64>) -> Option<Verdict> {
        let c = self.config.clone();
        let at_once = |rule| {
            Some(Verdict {
                rule,
                step,
                onset_step: step,
            })
        };
        if c.non_finite && !loss.is_finite() {
            return at_once(Rule::NonFiniteLoss);
        }
        if c.non_finite && grad_norm.is_some_and(|g| !g.is_finite()) {
            return at_once(Rule::NonFiniteGrad);
        }
        let checking = step >= c.min_steps;
        let loss_rule = c.loss_factor > 0.0
            && checking
            && self
                .state
                .best_smoothed
                .is_some_and(|best| loss > c.loss_factor * best && loss > best + c.loss_min_rise);
        let grad_rule = c.grad_factor > 0.0
            && checking
            && self.state.grad_norms.len() >= c.grad_window.min(10)
            && grad_norm.is_some_and(|g| g > c.grad_factor * median(&self.state.grad_norms));
        self.remember(loss, grad_norm);
        let rule = if loss_rule {
            Some(Rule::LossFactor)
        } else if grad_rule {
            Some(Rule::GradFactor)
        } else {
            None
        };
        let Some(rule) = rule else {
            self.state.streak = None;
            return None;
        };
        let (onset, length) = match self.state.streak {
            Some((_, onset, length)) => (onset, length + 1),
            None => (step, 1),
        };
        self.state.streak = Some((rule, onset, length));
        (length >= c.patience).then_some(Verdict {
            rule,
            step,
            onset_step: onset,
        })
    }

    fn remember(&mut self, loss: f64, grad_norm: Option<f64>) {
        let s = &mut self.state;
        let beta = self.config.smoothing;
        s.ema = beta * s.ema + (1.0 - beta) * loss;
        s.ema_steps += 1;
        let smoothed = s.ema / (1.0 - beta.powi(s.ema_steps as i32));
        if s.best_smoothed.is_none_or(|b| smoothed < b) {
            s.best_smoothed = Some(smoothed);
        }
        if let Some(grad_norm) = grad_norm.filter(|g| g.is_finite()) {
            s.grad_norms.push_back(grad_norm);
            if s.grad_norms.len() > self.config.grad_window {
                s.grad_norms.pop_front();
            }
        }
    }
}

fn median(values: &VecDeque<f64>) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detector(configure: impl FnOnce(&mut DivergenceConfig)) -> Detector {
        let mut config = DivergenceConfig {
            min_steps: 5,
            patience: 3,
            ..DivergenceConfig::default()
        };
        configure(&mut config);
        Detector::new(&config, DetectorState::default())
    }

    /// A healthy run: loss falling with noise, gradient norms wobbling.
    fn healthy(step: u64) -> (f64, f64) {
        let wobble = ((step * 7919) % 13) as f64 / 13.0;
        (
            2.3 * (-(step as f64) / 200.0).exp() + 0.2 * wobble,
            1.0 + 0.5 * wobble,
        )
    }

    #[test]
    fn a_healthy_run_stays_quiet() {
        let mut d = detector(|c| c.grad_factor = 5.0);
        for step in 0..1000 {
            let (loss, grad) = healthy(step);
            assert_eq!(d.observe(step, loss, Some(grad)), None, "step {step}");
        }
    }

    #[test]
    fn non_finite_values_fire_at_once() {
        let mut d = detector(|_| {});
        assert_eq!(
            d.observe(0, f64::NAN, Some(1.0)).unwrap().rule,
            Rule::NonFiniteLoss
        );
        let v = d.observe(1, 1.0, Some(f64::INFINITY)).unwrap();
        assert_eq!((v.rule, v.step, v.onset_step), (Rule::NonFiniteGrad, 1, 1));
        assert_eq!(
            d.observe(2, 1.0, Some(f64::NAN)).unwrap().rule,
            Rule::NonFiniteGrad
        );
        let mut off = detector(|c| c.non_finite = false);
        assert_eq!(off.observe(0, 1.0, Some(f64::NAN)), None);
    }

    #[test]
    fn a_loss_spike_fires_after_patience_with_its_onset() {
        let mut d = detector(|_| {});
        for step in 0..50 {
            assert_eq!(d.observe(step, healthy(step).0, Some(1.0)), None);
        }
        assert_eq!(d.observe(50, 20.0, Some(1.0)), None);
        assert_eq!(d.observe(51, 20.0, Some(1.0)), None);
        let v = d
            .observe(52, 20.0, Some(1.0))
            .expect("fires on the third step");
        assert_eq!((v.rule, v.step, v.onset_step), (Rule::LossFactor, 52, 50));
    }

    #[test]
    fn noise_on_a_nearly_zero_loss_does_not_fire() {
        let mut d = detector(|_| {});
        for step in 0..200 {
            let loss = if step < 100 { 1e-4 } else { 1e-2 };
            assert_eq!(d.observe(step, loss, Some(1.0)), None, "step {step}");
        }
    }

    #[test]
    fn a_short_spike_within_patience_is_forgiven() {
        let mut d = detector(|_| {});
        for step in 0..50 {
            d.observe(step, healthy(step).0, Some(1.0));
        }
        assert_eq!(d.observe(50, 20.0, Some(1.0)), None);
        assert_eq!(d.observe(51, 20.0, Some(1.0)), None);
        assert_eq!(d.observe(52, 1.0, Some(1.0)), None);
        assert_eq!(d.observe(53, 20.0, Some(1.0)), None);
    }

    #[test]
    fn a_gradient_explosion_fires_the_grad_rule() {
        let mut d = detector(|c| c.grad_factor = 10.0);
        for step in 0..60 {
            d.observe(step, 1.0, Some(1.0));
        }
        let mut fired = None;
        for step in 60..70 {
            fired = fired.or(d.observe(step, 1.0, Some(50.0)));
        }
        let v = fired.expect("fires");
        assert_eq!((v.rule, v.onset_step, v.step), (Rule::GradFactor, 60, 62));
    }

    #[test]
    fn nothing_fires_before_min_steps() {
        let mut d = detector(|c| c.min_steps = 100);
        d.observe(0, 1.0, Some(1.0));
        for step in 1..100 {
            assert_eq!(d.observe(step, 50.0, Some(1.0)), None);
        }
    }
}
