//! What each subcommand does, between parsed arguments and the library.

use crate::bench;
use crate::cli::{BenchArgs, Format, RunArgs, TrainArgs};
use crate::config::Config;
use crate::config::OptimizerKind;
use crate::run_dir::RunDir;
use crate::train::Trainer;

/// Loads the config a command's run arguments describe.
pub fn load_config(args: &RunArgs) -> anyhow::Result<Config> {
    let mut config = Config::load(args.config.as_deref(), &args.overrides)?;
    if let Some(name) = &args.name {
        config.name = name.clone();
        config.validate()?;
    }
    Ok(config)
}

pub fn train(args: &TrainArgs) -> anyhow::Result<()> {
    let config = load_config(&args.run)?;
    let trainer = Trainer::new(&config)?;
    let run_dir = RunDir::create(&args.run.out, &config.name)?;
    let summary = trainer.run(&run_dir, args.quiet)?;
    let percent = |v: Option<f64>| v.map_or("-".into(), |a| format!("{:.1}%", 100.0 * a));
    let outcome = match summary.diverged_at_step {
        Some(step) => format!("diverged at step {step}"),
        None => format!("{} steps", summary.steps),
    };
    println!(
        "{}: {outcome}, final val accuracy {} (best {}), {:.1} s, {:.0} samples/s",
        run_dir.path().display(),
        percent(summary.final_val_accuracy),
        percent(summary.best_val_accuracy),
        summary.wall_seconds,
        summary.samples_per_second,
    );
    Ok(())
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    let cases = bench::select(args.case.as_deref())?;
    let plan = bench::Plan {
        warmup_steps: args.warmup as usize,
        steps_per_repeat: args.steps as usize,
        repeats: args.repeats as usize,
        measure_every: 20,
    };
    let configurations = [
        (OptimizerKind::Sgd, false),
        (OptimizerKind::Sgd, true),
        (OptimizerKind::Lars, false),
        (OptimizerKind::Lars, true),
    ];
    let mut results = Vec::new();
    for case in &cases {
        if args.format == Format::Table {
            eprintln!("timing {} ...", case.name);
        }
        results.extend(bench::run(case, &configurations, &plan)?);
    }
    match args.format {
        Format::Table => print!("{}", bench::table(&results)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&results)?),
    }
    Ok(())
}
