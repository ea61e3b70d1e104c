//! Rescuing a diverged run: start again from a healthy state taken before
//! the divergence's onset, with a fix, in a sibling directory `<run>.rescue-<n>`.
//!
//! With `divergence.action = "rescue"` and no `[divergence.rescue]` overrides,
//! the trainer climbs a ladder of fixes (`divergence.ladder`), one rung per
//! rescue, each from the newest healthy state of the run that diverged last:
//!
//! | rung | changes | when |
//! | --- | --- | --- |
//! | `skip_batches` | nothing; the batches from the state's step to the divergence are passed over | the loss jumped in one step from a healthy level (one batch may be to blame), as PaLM skips batches |
//! | `larc_clip` | `optimizer.kind = "lars"`, `optimizer.clip = true`: no layer steps further than the global rate allows, nor than η‖w‖ (LARC) | SGD or LARS without the clip |
//! | `lars_poly` | `optimizer.kind = "lars"`, `schedule.kind = "poly"`: LARS's own recipe, a rate decaying to 0 | SGD or LARS on another schedule |
//! | `lower_lr` | the rate of the run that diverged last ÷ 10, warmed up again over the first steps of the rescue | always (twice in the default ladder) |
//!
//! The LARS rungs also set `optimizer.exclude_1d = false`: a rescue bounds
//! every parameter's step, the biases' too (at lr 60 a bias moved by plain
//! SGD blows the run up again).
//!
//! A rung that does not apply to the run is passed over. Explicit overrides
//! (`[divergence.rescue]`, or `larslab rescue RUN --set ...`) replace the
//! ladder. The newest healthy state is an in-memory snapshot where one exists
//! (every `divergence.snapshot_every` steps, the last `divergence.snapshots`),
//! else a checkpoint on disk.

use std::path::{Path, PathBuf};

use crate::config::{Config, OptimizerKind, Rung, ScheduleKind};
use crate::divergence::Verdict;
use crate::error::UserError;
use crate::run_dir::{self, RunDir};
use crate::train::{
    Rescue, RescueAttempt, RunOptions, Snapshot, Status, Summary, Trainer, healthy_checkpoint,
};

/// The rate divisor of `lower_lr`.
const LOWER_LR_BY: f64 = 10.0;
/// The steps over which `lower_lr` warms the rate up again (at most a tenth of what is left).
const REWARM_STEPS: u64 = 100;

/// What one rescue changes.
struct Fix {
    rung: Option<Rung>,
    overrides: Vec<(String, toml::Value)>,
    skip_batches: bool,
    rewarm_steps: u64,
}

impl Fix {
    /// `rung` for a run with `config` that diverged as `verdict`; `None` where it does not apply.
    /// `last_lr` is the rate of the run that diverged last (`lower_lr` divides it).
    fn of(rung: Rung, config: &Config, verdict: &Verdict, last_lr: f64) -> Option<Fix> {
        let o = &config.optimizer;
        let sgd_like = matches!(o.kind, OptimizerKind::Sgd | OptimizerKind::Lars);
        let lars = toml::Value::String("lars".into());
        // A rescue bounds every parameter's step, the biases' too.
        let with_biases = (
            "optimizer.exclude_1d".to_string(),
            toml::Value::Boolean(false),
        );
        let overrides = match rung {
            Rung::SkipBatches if verdict.sudden => vec![],
            Rung::LarcClip if sgd_like && !(o.kind == OptimizerKind::Lars && o.clip) => vec![
                ("optimizer.kind".into(), lars),
                ("optimizer.clip".into(), toml::Value::Boolean(true)),
                with_biases,
            ],
            Rung::LarsPoly
                if sgd_like
                    && !(o.kind == OptimizerKind::Lars
                        && config.schedule.kind == ScheduleKind::Poly) =>
            {
                vec![
                    ("optimizer.kind".into(), lars),
                    ("schedule.kind".into(), toml::Value::String("poly".into())),
                    with_biases,
                ]
            }
            Rung::LowerLr => vec![(
                "optimizer.lr".into(),
                toml::Value::Float(last_lr / LOWER_LR_BY),
            )],
            _ => return None,
        };
        let remaining = config.train.steps.saturating_sub(verdict.onset_step);
        Some(Fix {
            rung: Some(rung),
            overrides,
            skip_batches: rung == Rung::SkipBatches,
            rewarm_steps: match rung {
                Rung::LowerLr => REWARM_STEPS.min(remaining / 10).max(1),
                _ => 0,
            },
        })
    }

    /// Overrides given by the user (`[divergence.rescue]`, `--set`).
    fn configured(overrides: Vec<(String, toml::Value)>) -> Fix {
        Fix {
            rung: None,
            overrides,
            skip_batches: false,
            rewarm_steps: 0,
        }
    }

    fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .overrides
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if self.skip_batches {
            parts.push("skipping the batches up to the divergence".into());
        }
        if self.rewarm_steps > 0 {
            parts.push(format!("warming up again over {} steps", self.rewarm_steps));
        }
        let name = self.rung.map_or("overrides", Rung::name);
        format!("{name}: {}", parts.join(", "))
    }
}

/// Where a rescue starts: a snapshot in memory, or a checkpoint on disk.
enum Start<'a> {
    Memory(&'a Snapshot),
    Disk(PathBuf, u64),
}

impl Start<'_> {
    fn step(&self) -> u64 {
        match self {
            Start::Memory(s) => s.step,
            Start::Disk(_, step) => *step,
        }
    }

    fn trainer(&self, config: &Config) -> anyhow::Result<Trainer> {
        match self {
            Start::Memory(s) => Trainer::restore(config, s, Path::new("(snapshot in memory)")),
            Start::Disk(dir, step) => Trainer::resume(config, dir, *step),
        }
    }
}

/// After `trainer` diverged in `run_dir` with `config.divergence.action =
/// "rescue"`: rescue after rescue until one does not diverge, the fixes run
/// out, or `max_rescues` is reached. Returns the last run's directory and summary.
pub fn climb(
    config: &Config,
    run_dir: &RunDir,
    summary: Summary,
    trainer: Trainer,
    options: &RunOptions,
) -> anyhow::Result<(RunDir, Summary)> {
    let mut configured = Vec::new();
    if !config.divergence.rescue.is_empty() {
        configured = crate::config::dotted(&config.divergence.rescue);
    }
    let mut ladder = config.divergence.ladder.iter().copied();
    let mut attempts = Vec::new();
    let (mut dir, mut last, mut trainer) = (run_dir.clone(), summary, trainer);
    let mut last_config = config.clone();
    for _ in 0..config.divergence.max_rescues {
        let Some(verdict) = last.divergence.clone() else {
            break;
        };
        let fix = if configured.is_empty() {
            let last_lr = last_config.optimizer.lr;
            match ladder
                .by_ref()
                .find_map(|rung| Fix::of(rung, config, &verdict, last_lr))
            {
                Some(fix) => fix,
                None => {
                    note(options, "the rescue ladder has no rung left to try");
                    break;
                }
            }
        } else {
            Fix::configured(configured.clone())
        };
        let checkpoints = dir.file(run_dir::CHECKPOINTS);
        let start = match trainer.healthy_snapshot(verdict.onset_step) {
            Some(snapshot) => Start::Memory(snapshot),
            None => match healthy_checkpoint(config, &checkpoints, verdict.onset_step) {
                Some(step) => Start::Disk(checkpoints, step),
                None => {
                    note(
                        options,
                        &format!(
                            "no healthy state before step {} to rescue from",
                            verdict.onset_step
                        ),
                    );
                    break;
                }
            },
        };
        let (next_dir, next_trainer, next) = run_one(&dir, &last, config, &start, fix, options)?;
        last_config = next_trainer.config().clone();
        attempts.push(RescueAttempt {
            run: dir_name(next_dir.path()),
            rung: next.rescue.as_ref().and_then(|r| r.rung),
            from_step: start.step(),
            recovered: next.rescue.as_ref().is_some_and(|r| r.recovered),
            diverged_at_step: next.diverged_at_step,
        });
        record_attempts(run_dir, &attempts)?;
        (dir, last, trainer) = (next_dir, next, next_trainer);
        if last.status != Status::Diverged {
            break;
        }
    }
    Ok((dir, last))
}

/// `larslab rescue RUN --set ...`: one rescue of a diverged run from its
/// newest healthy checkpoint on disk, with the overrides as its changes.
pub fn from_disk(
    run_dir: &RunDir,
    summary: &Summary,
    overrides: &[String],
    options: &RunOptions,
) -> anyhow::Result<(RunDir, Summary)> {
    let verdict = summary.divergence.clone().ok_or_else(|| {
        UserError::data(
            run_dir.path(),
            "did not diverge; continue it with `larslab train --resume RUN --set train.steps=N`",
        )
    })?;
    let config = Config::load_run(&run_dir.file(run_dir::CONFIG), overrides)?;
    if config.train.steps <= verdict.onset_step {
        return Err(UserError::key(
            "train.steps",
            format!(
                "{} leaves nothing to train after the rescue's checkpoint",
                config.train.steps
            ),
        )
        .into());
    }
    let checkpoints = run_dir.file(run_dir::CHECKPOINTS);
    let step = healthy_checkpoint(&config, &checkpoints, verdict.onset_step).ok_or_else(|| {
        UserError::data(
            &checkpoints,
            format!(
                "holds no healthy checkpoint before step {} where the divergence began (set train.checkpoint_every)",
                verdict.onset_step
            ),
        )
    })?;
    let assignments = overrides
        .iter()
        .filter_map(|o| o.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), crate::config::parse_value(v.trim())))
        .collect();
    let fix = Fix::configured(assignments);
    let start = Start::Disk(checkpoints, step);
    let (dir, _, next) = run_one(run_dir, summary, &config, &start, fix, options)?;
    let mut attempts = summary.rescued_by.clone();
    attempts.push(RescueAttempt {
        run: dir_name(dir.path()),
        rung: None,
        from_step: step,
        recovered: next.rescue.as_ref().is_some_and(|r| r.recovered),
        diverged_at_step: next.diverged_at_step,
    });
    record_attempts(run_dir, &attempts)?;
    Ok((dir, next))
}

/// Trains `config` with `fix` from `start` into a new sibling of `run_dir`.
fn run_one(
    run_dir: &RunDir,
    diverged: &Summary,
    config: &Config,
    start: &Start,
    fix: Fix,
    options: &RunOptions,
) -> anyhow::Result<(RunDir, Trainer, Summary)> {
    let fixed = config.overridden(&fix.overrides, "the rescue")?;
    let verdict = diverged.divergence.as_ref();
    let skipped_batches = match verdict {
        Some(v) if fix.skip_batches => v.step + 1 - start.step(),
        _ => 0,
    };
    let rescue = Rescue {
        from_run: run_dir.path().display().to_string(),
        from_step: start.step(),
        rung: fix.rung,
        from_snapshot: matches!(start, Start::Memory(_)),
        overrides: fix
            .overrides
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        skipped_batches,
        rewarm_steps: fix.rewarm_steps,
        best_smoothed_loss_before: diverged.best_smoothed_train_loss,
        back_under_best_at_step: None,
        recovered: false,
    };
    let parent = run_dir.path().parent().unwrap_or(Path::new("."));
    let stem = format!("{}.rescue", root_name(run_dir.path()));
    let dir = RunDir::create_numbered(parent, &stem)?;
    let _lock = dir.lock()?;
    let name = dir
        .path()
        .file_name()
        .map_or(stem.clone(), |n| n.to_string_lossy().into_owned());
    note(
        options,
        &format!(
            "rescuing {} from its {} at step {} (divergence began at step {}) with {}",
            run_dir.path().display(),
            match start {
                Start::Memory(_) => "snapshot",
                Start::Disk(..) => "checkpoint",
            },
            start.step(),
            verdict.map_or(0, |v| v.onset_step),
            fix.describe()
        ),
    );
    let mut trainer = start.trainer(&fixed)?.rescuing(rescue).renamed(&name);
    let summary = trainer.run(&dir, options)?;
    println!("{}", summary.line(dir.path()));
    Ok((dir, trainer, summary))
}

/// The run a chain of rescues began from: `x` for `x.rescue-2`.
fn root_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map_or("run".into(), |n| n.to_string_lossy().into_owned());
    match name.find(".rescue") {
        Some(at) if at > 0 => name[..at].to_string(),
        _ => name,
    }
}

/// A rescue run's directory name (a sibling of the diverged run's).
fn dir_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Writes the rescues tried into the diverged run's summary.json.
fn record_attempts(run_dir: &RunDir, attempts: &[RescueAttempt]) -> anyhow::Result<()> {
    if let Some(mut summary) = run_dir.summary::<Summary>()? {
        summary.rescued_by = attempts.to_vec();
        run_dir.write_json(run_dir::SUMMARY, &summary)?;
    }
    Ok(())
}

fn note(options: &RunOptions, line: &str) {
    if !options.quiet {
        eprintln!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::divergence::Rule;

    fn config(kind: OptimizerKind, clip: bool) -> Config {
        let mut config = Config::default();
        config.optimizer.kind = kind;
        config.optimizer.clip = clip;
        config.optimizer.lr = 0.8;
        config.train.steps = 500;
        config
    }

    fn verdict(sudden: bool) -> Verdict {
        Verdict {
            sudden,
            ..Verdict::new(Rule::LossExplosion, 100, 98)
        }
    }

    fn keys(fix: &Fix) -> Vec<String> {
        fix.overrides
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    }

    #[test]
    fn skip_batches_applies_only_to_a_sudden_spike() {
        let sgd = config(OptimizerKind::Sgd, false);
        assert!(Fix::of(Rung::SkipBatches, &sgd, &verdict(false), 0.8).is_none());
        let fix = Fix::of(Rung::SkipBatches, &sgd, &verdict(true), 0.8).unwrap();
        assert!(fix.skip_batches && fix.overrides.is_empty());
    }

    #[test]
    fn the_lars_rungs_apply_to_the_sgd_family_and_bound_the_biases() {
        let sgd = config(OptimizerKind::Sgd, false);
        let fix = Fix::of(Rung::LarcClip, &sgd, &verdict(false), 0.8).unwrap();
        assert_eq!(
            keys(&fix),
            [
                "optimizer.kind=\"lars\"",
                "optimizer.clip=true",
                "optimizer.exclude_1d=false"
            ]
        );
        let larc = config(OptimizerKind::Lars, true);
        assert!(Fix::of(Rung::LarcClip, &larc, &verdict(false), 0.8).is_none());
        assert!(Fix::of(Rung::LarsPoly, &larc, &verdict(false), 0.8).is_some());
        for adam in [OptimizerKind::Adamw, OptimizerKind::Lamb] {
            let c = config(adam, false);
            assert!(Fix::of(Rung::LarcClip, &c, &verdict(false), 0.8).is_none());
            assert!(Fix::of(Rung::LarsPoly, &c, &verdict(false), 0.8).is_none());
        }
    }

    #[test]
    fn lower_lr_divides_the_last_rate_and_warms_up_again() {
        let sgd = config(OptimizerKind::Sgd, false);
        let fix = Fix::of(Rung::LowerLr, &sgd, &verdict(false), 0.08).unwrap();
        assert_eq!(fix.overrides[0].0, "optimizer.lr");
        let lr = fix.overrides[0].1.as_float().unwrap();
        assert!((lr - 0.008).abs() < 1e-12, "{lr}");
        // 402 steps remain after the onset at 98: a tenth of them.
        assert_eq!(fix.rewarm_steps, 40);
        let fixed = sgd.overridden(&fix.overrides, "the rescue").unwrap();
        assert!((fixed.optimizer.lr - 0.008).abs() < 1e-12);
    }

    #[test]
    fn a_chain_of_rescues_is_named_after_the_first_run() {
        assert_eq!(root_name(Path::new("runs/x.rescue-2")), "x");
        assert_eq!(root_name(Path::new("runs/x")), "x");
    }
}
