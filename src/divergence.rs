//! Detecting a diverging run, step by step, from its loss and its layers'
//! gradient norms, and naming the layer where it started.
//!
//! Two families of rules, each with a config key in `[divergence]` that turns it off:
//!
//! Rules that work from step 0 (they need no window to fill) and must hold
//! for `fast_patience` steps in a row:
//! - `loss_explosion`: the batch loss exceeds `explosion_factor` × the larger
//!   of ln(classes) (the loss of a uniform guess) and the run's first loss.
//! - `dead_layer`: a layer's gradient norm falls below `dead_ratio` × its
//!   median over the first `early_steps` steps while the loss is still above
//!   half of ln(classes): its units died (ReLU) or saturated (sigmoid, tanh),
//!   so nothing reaches the layers below. A collapse to chance without a spike.
//! - `grad_runaway`: the global gradient norm exceeds `runaway_factor` × its
//!   median over the first `early_steps` steps.
//!
//! The ratio rules of a settled run, after `min_steps` and for `patience` steps:
//! - `loss_factor`: the batch loss exceeds `loss_factor` × the best value of
//!   its exponential moving average so far, and that best by `loss_min_rise`.
//! - `grad_factor`: the global gradient norm exceeds `grad_factor` × its
//!   median over the last `grad_window` steps.
//!
//! `non_finite_loss` and `non_finite_grad` fire at once. The step where a
//! rule's streak began is the divergence's onset; a rescue starts from a
//! state taken before it.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::config::DivergenceConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    NonFiniteLoss,
    NonFiniteGrad,
    LossExplosion,
    DeadLayer,
    GradRunaway,
    LossFactor,
    GradFactor,
}

impl Rule {
    /// The rule's name as the config, summary.json and the README write it.
    pub fn name(self) -> &'static str {
        match self {
            Rule::NonFiniteLoss => "non_finite_loss",
            Rule::NonFiniteGrad => "non_finite_grad",
            Rule::LossExplosion => "loss_explosion",
            Rule::DeadLayer => "dead_layer",
            Rule::GradRunaway => "grad_runaway",
            Rule::LossFactor => "loss_factor",
            Rule::GradFactor => "grad_factor",
        }
    }

    /// Whether a one-step event (a bad batch) can explain it: the rules that
    /// judge the loss or the gradient of one step, not a layer's state.
    fn can_be_one_batch(self) -> bool {
        !matches!(self, Rule::DeadLayer)
    }
}

/// A divergence: which rule fired, at which step, when its streak began, and
/// the layers where it started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub rule: Rule,
    pub step: u64,
    pub onset_step: u64,
    /// The first layer (in model order) of [`Verdict::layers`].
    #[serde(default)]
    pub layer: Option<String>,
    /// The layers that left their own recent band first, all at [`Verdict::layer_step`].
    #[serde(default)]
    pub layers: Vec<String>,
    #[serde(default)]
    pub layer_step: Option<u64>,
    /// What the first layer did, in words (e.g. "gradient norm 41× its recent median").
    #[serde(default)]
    pub layer_signal: Option<String>,
    /// The loss jumped in one step from a healthy level: one batch may be to blame.
    #[serde(default)]
    pub sudden: bool,
}

impl Verdict {
    pub fn new(rule: Rule, step: u64, onset_step: u64) -> Self {
        Self {
            rule,
            step,
            onset_step,
            layer: None,
            layers: Vec::new(),
            layer_step: None,
            layer_signal: None,
            sudden: false,
        }
    }

    /// One line for the console and TensorBoard.
    pub fn describe(&self) -> String {
        let mut line = format!(
            "{} at step {} (began at step {})",
            self.rule.name(),
            self.step,
            self.onset_step
        );
        if let Some(layer) = &self.layer {
            let others = self.layers.len().saturating_sub(1);
            let also = match others {
                0 => String::new(),
                n => format!(" and {n} more ({})", self.layers[1..].join(", ")),
            };
            line += &format!(", first in {layer}{also}");
            if let (Some(step), Some(signal)) = (self.layer_step, &self.layer_signal) {
                line += &format!(": {signal} at step {step}");
            }
        }
        line
    }
}

/// What the detector reads of one step.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// The batch's mean loss.
    pub loss: f64,
    /// ‖g‖ of all gradients together, when computed.
    pub grad_norm: Option<f64>,
    /// ‖g‖ of each layer's parameters together, in [`Detector::layers`] order, when computed.
    pub layer_grad_norms: Option<&'a [f64]>,
}

/// Steps remembered for naming the first layer.
const RECENT_STEPS: usize = 48;
/// A loss this many times its smoothed value before is a sudden jump.
const SUDDEN_JUMP: f64 = 2.0;
/// Steps before a step whose median is a layer's recent level.
const LAYER_BAND_STEPS: usize = 8;
/// How far before the onset the first layer is looked for.
const LAYER_LOOKBACK: u64 = 10;

/// A rule holding now: which, the step its streak began, its length.
type Streak = Option<(Rule, u64, u64)>;

/// The detector's memory: part of every checkpoint, so a resumed run decides
/// as the original would. Fields missing from an older checkpoint read empty.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DetectorState {
    /// Exponential moving average of the loss (bias-corrected on read).
    ema: f64,
    ema_steps: u64,
    /// The best (lowest) smoothed loss so far.
    pub best_smoothed: Option<f64>,
    grad_norms: VecDeque<f64>,
    /// The ratio rules' streak.
    streak: Streak,
    /// The step-0 rules' streak.
    fast_streak: Streak,
    /// The first step's loss.
    first_loss: Option<f64>,
    /// The global gradient norms of the first `early_steps` steps.
    early_grad_norms: Vec<f64>,
    /// Each layer's gradient norms over the first `early_steps` steps.
    early_layer_norms: Vec<Vec<f64>>,
    /// The last steps, oldest first.
    recent: VecDeque<Seen>,
}

/// One step as the detector remembers it, for naming the first layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Seen {
    step: u64,
    loss: f64,
    /// The smoothed loss before this step.
    smoothed_before: Option<f64>,
    healthy_before: bool,
    /// Per layer; empty when the step took no gradient norms.
    layer_grad_norms: Vec<f64>,
}

pub struct Detector {
    config: DivergenceConfig,
    /// ln(classes): the loss of a uniform guess.
    chance_loss: f64,
    layers: Vec<String>,
    pub state: DetectorState,
}

impl Detector {
    /// A detector for a model with these layers (in model order) and classes.
    pub fn new(
        config: &DivergenceConfig,
        state: DetectorState,
        layers: Vec<String>,
        classes: usize,
    ) -> Self {
        Self {
            config: config.clone(),
            chance_loss: (classes.max(2) as f64).ln(),
            layers,
            state,
        }
    }

    /// The layers whose gradient norms [`Observation::layer_grad_norms`] holds.
    pub fn layers(&self) -> &[String] {
        &self.layers
    }

    /// Whether the detector needs the gradient norms every step.
    pub fn needs_grad_norm(&self) -> bool {
        let c = &self.config;
        c.non_finite || c.grad_factor > 0.0 || c.runaway_factor > 0.0 || c.dead_ratio > 0.0
    }

    /// The bias-corrected smoothed loss, once there is one.
    pub fn smoothed_loss(&self) -> Option<f64> {
        let s = &self.state;
        (s.ema_steps > 0).then(|| s.ema / (1.0 - self.config.smoothing.powi(s.ema_steps as i32)))
    }

    /// Whether training was still going well: the smoothed loss within 10%
    /// of its best so far (or no history yet). Rescues start only from
    /// states taken in such a state.
    pub fn is_healthy(&self) -> bool {
        match (self.smoothed_loss(), self.state.best_smoothed) {
            (Some(smoothed), Some(best)) => smoothed.is_finite() && smoothed <= 1.1 * best,
            _ => true,
        }
    }

    /// Takes in one step and says whether the run is now diverging.
    pub fn observe(&mut self, step: u64, seen: Observation) -> Option<Verdict> {
        let (non_finite, fast_patience, patience) = (
            self.config.non_finite,
            self.config.fast_patience,
            self.config.patience,
        );
        let loss = seen.loss;
        self.remember_step(step, seen);
        let immediate = if non_finite && !loss.is_finite() {
            Some(Rule::NonFiniteLoss)
        } else if non_finite && seen.grad_norm.is_some_and(|g| !g.is_finite()) {
            Some(Rule::NonFiniteGrad)
        } else {
            None
        };
        if let Some(rule) = immediate {
            let verdict = Verdict::new(rule, step, step);
            return Some(self.attributed(verdict));
        }
        let fast = self.fast_rule(loss, seen);
        let slow = self.ratio_rule(step, loss, seen.grad_norm);
        self.remember(loss, seen.grad_norm, seen.layer_grad_norms);
        let fast = advance(&mut self.state.fast_streak, fast, step, fast_patience);
        let slow = advance(&mut self.state.streak, slow, step, patience);
        let verdict = fast.or(slow)?;
        Some(self.attributed(verdict))
    }

    /// The step-0 rule that holds at this step, if any.
    fn fast_rule(&self, loss: f64, seen: Observation) -> Option<Rule> {
        let c = &self.config;
        let s = &self.state;
        let reference = self.chance_loss.max(s.first_loss.unwrap_or(loss).max(0.0));
        if c.explosion_factor > 0.0 && loss > c.explosion_factor * reference {
            return Some(Rule::LossExplosion);
        }
        let early_done = s.early_grad_norms.len() as u64 >= c.early_steps;
        if c.dead_ratio > 0.0
            && early_done
            && loss > 0.5 * self.chance_loss
            && let Some(norms) = seen.layer_grad_norms
            && self.vanished_layers(norms).next().is_some()
        {
            return Some(Rule::DeadLayer);
        }
        if c.runaway_factor > 0.0
            && early_done
            && let Some(g) = seen.grad_norm
            && g > c.runaway_factor * median(s.early_grad_norms.iter().copied())
        {
            return Some(Rule::GradRunaway);
        }
        None
    }

    /// Indices of the layers whose gradient fell below `dead_ratio` × their early level.
    fn vanished_layers<'a>(&'a self, norms: &'a [f64]) -> impl Iterator<Item = usize> + 'a {
        let early = &self.state.early_layer_norms;
        norms.iter().enumerate().filter_map(move |(i, &norm)| {
            let level = median(early.get(i)?.iter().copied());
            (level > 0.0 && norm <= self.config.dead_ratio * level).then_some(i)
        })
    }

    /// The ratio rule that holds at this step, if any.
    fn ratio_rule(&self, step: u64, loss: f64, grad_norm: Option<f64>) -> Option<Rule> {
        let c = &self.config;
        if step < c.min_steps {
            return None;
        }
        let loss_rule = c.loss_factor > 0.0
            && self
                .state
                .best_smoothed
                .is_some_and(|best| loss > c.loss_factor * best && loss > best + c.loss_min_rise);
        let grads = &self.state.grad_norms;
        let grad_rule = c.grad_factor > 0.0
            && grads.len() >= c.grad_window.min(10)
            && grad_norm.is_some_and(|g| g > c.grad_factor * median(grads.iter().copied()));
        if loss_rule {
            Some(Rule::LossFactor)
        } else if grad_rule {
            Some(Rule::GradFactor)
        } else {
            None
        }
    }

    fn remember(&mut self, loss: f64, grad_norm: Option<f64>, layer_norms: Option<&[f64]>) {
        let early_steps = self.config.early_steps;
        let beta = self.config.smoothing;
        let s = &mut self.state;
        s.first_loss.get_or_insert(loss);
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
            if (s.early_grad_norms.len() as u64) < early_steps {
                s.early_grad_norms.push(grad_norm);
                if let Some(norms) = layer_norms {
                    s.early_layer_norms.resize(norms.len(), Vec::new());
                    for (early, &norm) in s.early_layer_norms.iter_mut().zip(norms) {
                        early.push(norm);
                    }
                }
            }
        }
    }

    fn remember_step(&mut self, step: u64, seen: Observation) {
        let entry = Seen {
            step,
            loss: seen.loss,
            smoothed_before: self.smoothed_loss(),
            healthy_before: self.is_healthy(),
            layer_grad_norms: seen.layer_grad_norms.unwrap_or_default().to_vec(),
        };
        let recent = &mut self.state.recent;
        recent.push_back(entry);
        if recent.len() > RECENT_STEPS {
            recent.pop_front();
        }
    }

    /// The verdict with the layers where it started and whether it was sudden.
    fn attributed(&self, mut verdict: Verdict) -> Verdict {
        let onset = self
            .state
            .recent
            .iter()
            .find(|s| s.step == verdict.onset_step);
        verdict.sudden = verdict.rule.can_be_one_batch()
            && verdict.onset_step >= self.config.early_steps
            && onset.is_some_and(|s| {
                s.healthy_before
                    && s.smoothed_before
                        .is_some_and(|before| s.loss.is_nan() || s.loss > SUDDEN_JUMP * before)
            });
        let first = if verdict.rule == Rule::DeadLayer {
            self.first_vanished()
        } else {
            first_out_of_band(
                &self.state.recent,
                verdict.onset_step.saturating_sub(LAYER_LOOKBACK),
                self.config.layer_band,
            )
        };
        if let Some(FirstLayers {
            step,
            layers,
            signal,
        }) = first
        {
            verdict.layers = layers.iter().map(|&i| self.layers[i].clone()).collect();
            verdict.layer = verdict.layers.first().cloned();
            verdict.layer_step = Some(step);
            verdict.layer_signal = Some(signal);
        }
        verdict
    }

    /// The earliest step in the history at which some layer's gradient had
    /// vanished against its early level, and those layers.
    fn first_vanished(&self) -> Option<FirstLayers> {
        self.state.recent.iter().find_map(|seen| {
            let norms = &seen.layer_grad_norms;
            let layers: Vec<usize> = self.vanished_layers(norms).collect();
            let &first = layers.first()?;
            let early = median(self.state.early_layer_norms[first].iter().copied());
            Some(FirstLayers {
                step: seen.step,
                signal: format!(
                    "gradient norm {:.1e}, {:.0e}× its early level: its units are dead or saturated",
                    norms[first],
                    norms[first] / early
                ),
                layers,
            })
        })
    }
}

/// The layers that left their band first, at which step, and what the first one did.
struct FirstLayers {
    step: u64,
    layers: Vec<usize>,
    signal: String,
}

/// Moves a streak on by one step (`holding`: the rule that holds now) and
/// returns a verdict once it has lasted `patience` steps.
fn advance(
    streak: &mut Streak,
    holding: Option<Rule>,
    step: u64,
    patience: u64,
) -> Option<Verdict> {
    let Some(rule) = holding else {
        *streak = None;
        return None;
    };
    let (onset, length) = match *streak {
        Some((_, onset, length)) => (onset, length + 1),
        None => (step, 1),
    };
    *streak = Some((rule, onset, length));
    (length >= patience).then(|| Verdict::new(rule, step, onset))
}

/// The first step from `from` on at which some layer's gradient norm left
/// its own recent band: non-finite, or more than `band` × above or below its
/// median over the steps just before. Layers that left at that step are
/// named together; the first of them (in model order) leads.
fn first_out_of_band(recent: &VecDeque<Seen>, from: u64, band: f64) -> Option<FirstLayers> {
    for (index, seen) in recent.iter().enumerate() {
        if seen.step < from || index == 0 {
            continue;
        }
        let before = recent.range(index.saturating_sub(LAYER_BAND_STEPS)..index);
        let mut left = Vec::new();
        let mut signals = Vec::new();
        for (layer, &norm) in seen.layer_grad_norms.iter().enumerate() {
            let level = median(
                before
                    .clone()
                    .filter_map(|s| s.layer_grad_norms.get(layer).copied()),
            );
            let signal = if !norm.is_finite() {
                Some("a non-finite gradient".to_string())
            } else if level > 0.0 && norm > band * level {
                Some(format!(
                    "gradient norm {:.0}× its recent median",
                    norm / level
                ))
            } else if level > 0.0 && norm * band < level {
                Some(format!(
                    "gradient norm 1/{:.0} of its recent median",
                    level / norm
                ))
            } else {
                None
            };
            if let Some(signal) = signal {
                left.push(layer);
                signals.push(signal);
            }
        }
        if let Some(signal) = signals.into_iter().next() {
            return Some(FirstLayers {
                step: seen.step,
                layers: left,
                signal,
            });
        }
    }
    None
}

/// The median of finite values (0 when there are none).
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut sorted: Vec<f64> = values.filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return 0.0;
    }
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

    const LAYERS: usize = 3;

    fn detector(configure: impl FnOnce(&mut DivergenceConfig)) -> Detector {
        let mut config = DivergenceConfig {
            min_steps: 5,
            patience: 3,
            ..DivergenceConfig::default()
        };
        configure(&mut config);
        let layers = (1..=LAYERS).map(|i| format!("fc{i}")).collect();
        Detector::new(&config, DetectorState::default(), layers, 10)
    }

    /// A healthy run: loss falling with noise, gradient norms wobbling.
    fn healthy(step: u64) -> (f64, f64) {
        let wobble = ((step * 7919) % 13) as f64 / 13.0;
        (
            2.3 * (-(step as f64) / 200.0).exp() + 0.2 * wobble,
            1.0 + 0.5 * wobble,
        )
    }

    /// Feeds one step with every layer's gradient norm at `layer_norm` (the
    /// global norm is theirs together).
    fn feed(d: &mut Detector, step: u64, loss: f64, layers: [f64; LAYERS]) -> Option<Verdict> {
        let global = layers.iter().map(|n| n * n).sum::<f64>().sqrt();
        d.observe(
            step,
            Observation {
                loss,
                grad_norm: Some(global),
                layer_grad_norms: Some(&layers),
            },
        )
    }

    fn quiet_for(d: &mut Detector, steps: std::ops::Range<u64>) {
        for step in steps {
            let (loss, grad) = healthy(step);
            assert_eq!(feed(d, step, loss, [grad; LAYERS]), None, "step {step}");
        }
    }

    #[test]
    fn a_healthy_run_stays_quiet() {
        let mut d = detector(|c| c.grad_factor = 5.0);
        quiet_for(&mut d, 0..1000);
    }

    #[test]
    fn non_finite_values_fire_at_once() {
        let mut d = detector(|_| {});
        let v = feed(&mut d, 0, f64::NAN, [1.0; LAYERS]).unwrap();
        assert_eq!(v.rule, Rule::NonFiniteLoss);
        let v = feed(&mut d, 1, 1.0, [1.0, f64::INFINITY, 1.0]).unwrap();
        assert_eq!((v.rule, v.step, v.onset_step), (Rule::NonFiniteGrad, 1, 1));
        assert_eq!(v.layer.as_deref(), Some("fc2"), "{v:?}");
        let mut off = detector(|c| c.non_finite = false);
        assert_eq!(feed(&mut off, 0, 1.0, [f64::NAN; LAYERS]), None);
    }

    #[test]
    fn an_explosion_in_the_first_steps_fires_after_fast_patience() {
        let mut d = detector(|_| {});
        assert_eq!(feed(&mut d, 0, 2.3, [1.0; LAYERS]), None);
        assert_eq!(feed(&mut d, 1, 2.1, [1.0; LAYERS]), None);
        // The loss passes 2 ln 10 = 4.6 at step 2; fc3's gradient left its band at step 2 first.
        assert_eq!(feed(&mut d, 2, 9.0, [1.0, 1.0, 30.0]), None);
        assert_eq!(feed(&mut d, 3, 60.0, [40.0, 50.0, 90.0]), None);
        let v = feed(&mut d, 4, 400.0, [400.0, 500.0, 900.0]).expect("fires at the third step");
        assert_eq!((v.rule, v.step, v.onset_step), (Rule::LossExplosion, 4, 2));
        assert_eq!(v.layers, ["fc3"]);
        assert_eq!(v.layer_step, Some(2));
        assert!(
            !v.sudden,
            "a blow-up in the first steps is the rate, not a batch"
        );
    }

    #[test]
    fn the_explosion_reference_is_the_first_loss_when_it_is_above_chance() {
        // A badly scaled init starts at a loss of 19 and learns: not an explosion.
        let mut d = detector(|_| {});
        for (step, loss) in [19.0, 14.0, 12.0, 11.0, 12.0, 9.0].into_iter().enumerate() {
            assert_eq!(feed(&mut d, step as u64, loss, [5.0; LAYERS]), None);
        }
        let mut off = detector(|c| c.explosion_factor = 0.0);
        for step in 0..10 {
            assert_eq!(feed(&mut off, step, 1e3, [1.0; LAYERS]), None);
        }
    }

    #[test]
    fn a_layer_whose_gradient_vanishes_at_chance_is_dead() {
        let mut d = detector(|_| {});
        for step in 0..10 {
            assert_eq!(feed(&mut d, step, 2.3, [1.0; LAYERS]), None);
        }
        // fc2's units die at step 10: nothing reaches fc1 either, the loss sits at ln 10.
        assert_eq!(feed(&mut d, 10, 2.302, [0.0, 0.0, 0.3]), None);
        assert_eq!(feed(&mut d, 11, 2.302, [0.0, 0.0, 0.3]), None);
        let v = feed(&mut d, 12, 2.302, [0.0, 0.0, 0.3]).expect("fires");
        assert_eq!((v.rule, v.onset_step), (Rule::DeadLayer, 10));
        assert_eq!(v.layers, ["fc1", "fc2"]);
        assert_eq!(v.layer_step, Some(10));
    }

    #[test]
    fn tiny_gradients_from_the_start_or_at_a_near_zero_loss_are_not_dead() {
        // A deep net at chance with tiny gradients from step 0 (a slow start).
        let mut d = detector(|_| {});
        for step in 0..300 {
            assert_eq!(feed(&mut d, step, 2.3, [1e-7, 1e-6, 1e-3]), None);
        }
        // A small training set fitted: the gradients shrink with the loss.
        let mut d = detector(|_| {});
        for step in 0..300 {
            let fitted = (-(step as f64) / 10.0).exp();
            assert_eq!(feed(&mut d, step, 2.3 * fitted, [fitted; LAYERS]), None);
        }
    }

    #[test]
    fn a_gradient_norm_far_above_its_early_level_runs_away() {
        let mut d = detector(|c| c.runaway_factor = 100.0);
        for step in 0..10 {
            assert_eq!(feed(&mut d, step, 2.0, [1.0; LAYERS]), None);
        }
        for step in 10..12 {
            assert_eq!(feed(&mut d, step, 2.0, [300.0, 1.0, 1.0]), None);
        }
        let v = feed(&mut d, 12, 2.0, [300.0, 1.0, 1.0]).expect("fires");
        assert_eq!((v.rule, v.onset_step), (Rule::GradRunaway, 10));
        assert_eq!(v.layer.as_deref(), Some("fc1"));
    }

    #[test]
    fn a_loss_spike_after_a_healthy_stretch_fires_the_ratio_rule_and_is_sudden() {
        let mut d = detector(|c| c.explosion_factor = 0.0);
        quiet_for(&mut d, 0..50);
        assert_eq!(feed(&mut d, 50, 20.0, [1.0; LAYERS]), None);
        assert_eq!(feed(&mut d, 51, 20.0, [1.0; LAYERS]), None);
        let v = feed(&mut d, 52, 20.0, [1.0; LAYERS]).expect("fires on the third step");
        assert_eq!((v.rule, v.step, v.onset_step), (Rule::LossFactor, 52, 50));
        assert!(v.sudden, "{v:?}");
    }

    #[test]
    fn noise_on_a_nearly_zero_loss_does_not_fire() {
        let mut d = detector(|_| {});
        for step in 0..200 {
            let loss = if step < 100 { 1e-4 } else { 1e-2 };
            assert_eq!(feed(&mut d, step, loss, [1.0; LAYERS]), None, "step {step}");
        }
    }

    #[test]
    fn a_short_spike_within_patience_is_forgiven() {
        let mut d = detector(|_| {});
        quiet_for(&mut d, 0..50);
        assert_eq!(feed(&mut d, 50, 20.0, [1.0; LAYERS]), None);
        assert_eq!(feed(&mut d, 51, 20.0, [1.0; LAYERS]), None);
        assert_eq!(feed(&mut d, 52, 1.0, [1.0; LAYERS]), None);
        assert_eq!(feed(&mut d, 53, 20.0, [1.0; LAYERS]), None);
    }

    #[test]
    fn a_gradient_explosion_fires_the_grad_rule() {
        let mut d = detector(|c| c.grad_factor = 10.0);
        for step in 0..60 {
            feed(&mut d, step, 1.0, [1.0; LAYERS]);
        }
        let fired = (60..70).find_map(|step| feed(&mut d, step, 1.0, [50.0; LAYERS]));
        let v = fired.expect("fires");
        assert_eq!((v.rule, v.onset_step, v.step), (Rule::GradFactor, 60, 62));
        assert_eq!(v.layers, ["fc1", "fc2", "fc3"], "all left together");
    }

    #[test]
    fn the_ratio_rules_wait_for_min_steps() {
        let mut d = detector(|c| {
            c.min_steps = 100;
            c.explosion_factor = 0.0;
        });
        feed(&mut d, 0, 1.0, [1.0; LAYERS]);
        for step in 1..100 {
            assert_eq!(feed(&mut d, step, 50.0, [1.0; LAYERS]), None);
        }
    }

    #[test]
    fn an_old_checkpoint_state_reads_with_empty_new_fields() {
        let old = r#"{"ema": 1.0, "ema_steps": 3, "best_smoothed": 0.5, "grad_norms": [1.0], "streak": null}"#;
        let state: DetectorState = serde_json::from_str(old).unwrap();
        assert_eq!(state.best_smoothed, Some(0.5));
        assert!(state.recent.is_empty());
    }
}
