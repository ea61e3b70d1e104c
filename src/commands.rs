//! What each subcommand does, between parsed arguments and the library.

use crate::bench;
use crate::checkpoint;
use crate::cli::{
    BenchArgs, BenchDevice, CompareArgs, CompareFormat, DataCommand, Emit, Format, PlotArgs,
    ProbeArgs, RescueArgs, RunArgs, SweepArgs, TrainArgs,
};
use crate::compare;
use crate::config::{Config, DivergenceAction, OptimizerKind};
use crate::data::{idx, mnist_like};
use crate::error::UserError;
use crate::interrupt;
use crate::plot;
use crate::probe;
use crate::rescue;
use crate::run_dir::{self, RunDir};
use crate::sweep::{SlurmOptions, Sweep, slurm_script};
use crate::train::{RunOptions, Status, Summary, Trainer};

/// Loads the config a command's run arguments describe.
pub fn load_config(args: &RunArgs) -> anyhow::Result<Config> {
    let mut config = Config::load(args.config.as_deref(), &args.overrides)?;
    if let Some(name) = &args.name {
        config.name = name.clone();
        config.validate()?;
    }
    Ok(config)
}

/// How a command ended, for the exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// A run stopped by SIGINT or SIGTERM (checkpoint and summary written).
    Interrupted,
}

pub fn train(args: &TrainArgs) -> anyhow::Result<Outcome> {
    let options = RunOptions {
        quiet: args.quiet,
        interrupt: Some(interrupt::install()?),
    };
    let (config, run_dir, trainer, _lock) = match &args.resume {
        Some(run) => {
            let run_dir = RunDir::open(run)?;
            let lock = run_dir.lock()?;
            let config = Config::load_run(&run_dir.file(run_dir::CONFIG), &args.run.overrides)?;
            let checkpoints = run_dir.file(run_dir::CHECKPOINTS);
            let step = *checkpoint::steps(&checkpoints).last().ok_or_else(|| {
                UserError::data(&checkpoints, "holds no checkpoint to resume from")
            })?;
            let previous: Option<Summary> = run_dir.summary()?;
            if previous.is_some_and(|s| s.status == Status::Diverged) {
                return Err(UserError::data(
                    run,
                    "diverged; continue it from a healthy checkpoint with `larslab rescue RUN --set ...`",
                )
                .into());
            }
            if step >= config.train.steps {
                return Err(UserError::Usage(format!(
                    "{} is already at step {step} of train.steps = {}; extend it with --set train.steps=N",
                    run.display(),
                    config.train.steps
                ))
                .into());
            }
            let trainer = Trainer::resume(&config, &checkpoints, step)?;
            (config, run_dir, trainer, lock)
        }
        None => {
            let config = load_config(&args.run)?;
            let trainer = Trainer::new(&config)?;
            let run_dir = RunDir::create(&args.run.out, &config.name)?;
            let lock = run_dir.lock()?;
            (config, run_dir, trainer, lock)
        }
    };
    let mut trainer = trainer;
    let summary = trainer.run(&run_dir, &options)?;
    println!("{}", summary.line(run_dir.path()));
    if summary.status == Status::Diverged && config.divergence.action == DivergenceAction::Rescue {
        let (_, last) = rescue::climb(&config, &run_dir, summary, trainer, &options)?;
        return Ok(outcome(&last));
    }
    Ok(outcome(&summary))
}

/// `larslab rescue RUN --set ...`: the overrides are the rescue's changes.
pub fn rescue_command(args: &RescueArgs) -> anyhow::Result<Outcome> {
    let options = RunOptions {
        quiet: args.quiet,
        interrupt: Some(interrupt::install()?),
    };
    let run_dir = RunDir::open(&args.run)?;
    let _lock = run_dir.lock()?;
    let summary: Summary = run_dir.summary()?.ok_or_else(|| {
        UserError::data(&args.run, "has no summary.json (still running, or killed?); resume it with `larslab train --resume`")
    })?;
    let (_, last) = rescue::from_disk(&run_dir, &summary, &args.overrides, &options)?;
    Ok(outcome(&last))
}

fn outcome(summary: &Summary) -> Outcome {
    match summary.status {
        Status::Interrupted => Outcome::Interrupted,
        _ => Outcome::Done,
    }
}

pub fn data(command: &DataCommand) -> anyhow::Result<()> {
    let DataCommand::MnistLike(args) = command;
    let (n, test_n) = (args.n as usize, args.test_n as usize);
    if let Some(path) = &args.preview
        && path
            .extension()
            .is_none_or(|e| !e.eq_ignore_ascii_case("png"))
    {
        return Err(UserError::Usage(format!(
            "--preview {}: the preview is a .png file",
            path.display()
        ))
        .into());
    }
    let digits = mnist_like::generate(n + test_n, args.seed);
    // The preview first: when it cannot be written, nothing else is.
    let mut written: Vec<std::path::PathBuf> = Vec::new();
    if let Some(path) = &args.preview {
        let bytes = mnist_like::preview_png(&digits, 100, 10, 3)
            .map_err(|e| UserError::data(path, format!("cannot draw the preview: {e}")))?;
        plot::write_figure(path, &bytes)
            .map_err(|e| UserError::data(path, format!("cannot write the preview: {e}")))?;
        written.push(path.clone());
    }
    match write_digits(args, &digits, n, test_n, &mut written) {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            if let Some(path) = &args.preview {
                println!("{}", path.display());
            }
            Ok(())
        }
        Err(e) => {
            for path in &written {
                let _ = std::fs::remove_file(path);
            }
            Err(e)
        }
    }
}

/// The IDX files of `larslab data mnist-like`; each path written is pushed to `written`.
fn write_digits(
    args: &crate::cli::MnistLikeArgs,
    digits: &mnist_like::Digits,
    n: usize,
    test_n: usize,
    written: &mut Vec<std::path::PathBuf>,
) -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    std::fs::create_dir_all(&args.out)
        .map_err(|e| UserError::data(&args.out, format!("cannot create: {e}")))?;
    let side = mnist_like::SIDE;
    let pixels = side * side;
    let ext = if args.gzip { ".gz" } else { "" };
    for (prefix, range) in [("train", 0..n), ("t10k", n..n + test_n)] {
        if range.is_empty() {
            continue;
        }
        let count = range.len();
        let images = &digits.images[range.start * pixels..range.end * pixels];
        let labels = &digits.labels[range.clone()];
        let image_path = args.out.join(format!("{prefix}-images-idx3-ubyte{ext}"));
        let label_path = args.out.join(format!("{prefix}-labels-idx1-ubyte{ext}"));
        idx::write_u8(&image_path, &[count, side, side], images, args.gzip)
            .map_err(|e| UserError::data(&image_path, format!("cannot write: {e}")))?;
        written.push(image_path.clone());
        idx::write_u8(&label_path, &[count], labels, args.gzip)
            .map_err(|e| UserError::data(&label_path, format!("cannot write: {e}")))?;
        written.push(label_path.clone());
        lines.push(format!(
            "{} ({count} digits), {}",
            image_path.display(),
            label_path.display()
        ));
    }
    Ok(lines)
}

pub fn sweep(args: &SweepArgs) -> anyhow::Result<Outcome> {
    let mut sweep = Sweep::plan(
        args.config.as_deref(),
        &args.overrides,
        &args.grid,
        args.seeds.as_deref(),
        &args.out,
        args.name.as_deref(),
    )?;
    if args.emit == Some(Emit::Slurm) {
        let multiline = [&args.slurm_time]
            .into_iter()
            .chain(&args.slurm_partition)
            .chain(&args.slurm_lines)
            .find(|v| v.contains(['\n', '\r']));
        if let Some(value) = multiline {
            return Err(
                UserError::Usage(format!("--slurm option {value:?}: one line only")).into(),
            );
        }
        if args.slurm_cpus == 0 {
            return Err(UserError::Usage("--slurm-cpus must be at least 1".into()).into());
        }
        sweep.write_json()?;
        // Declared here, before the array's tasks start at once and each would declare it.
        sweep.declare_experiment()?;
        for run in sweep.failures() {
            eprintln!(
                "invalid: {} (array task {} will fail): {}",
                run.name,
                run.index,
                run.error.as_deref().unwrap_or("?")
            );
        }
        let mut forwarded = Vec::new();
        if let Some(config) = &args.config {
            forwarded.extend(["--config".to_string(), config.display().to_string()]);
        }
        for o in &args.overrides {
            forwarded.extend(["--set".to_string(), o.clone()]);
        }
        for g in &args.grid {
            forwarded.extend(["--grid".to_string(), g.clone()]);
        }
        let seeds: Vec<String> = sweep.seeds.iter().map(u64::to_string).collect();
        forwarded.extend(["--seeds".to_string(), seeds.join(",")]);
        forwarded.extend(["--out".to_string(), args.out.display().to_string()]);
        forwarded.extend(["--name".to_string(), sweep.name.clone()]);
        let options = SlurmOptions {
            time: args.slurm_time.clone(),
            cpus: args.slurm_cpus,
            partition: args.slurm_partition.clone(),
            extra: args.slurm_lines.clone(),
        };
        let path = sweep.dir.join("sweep.sbatch");
        crate::fsutil::atomic_write(&path, slurm_script(&sweep, &forwarded, &options).as_bytes())?;
        println!(
            "{} ({} array tasks): sbatch {}",
            path.display(),
            sweep.runs.len(),
            path.display()
        );
        return Ok(Outcome::Done);
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let base_jobs = sweep
        .runs
        .iter()
        .find_map(|r| r.config.as_ref().ok())
        .map_or(0, |c| c.sweep.jobs);
    let jobs = args.jobs.unwrap_or(if base_jobs > 0 {
        base_jobs
    } else {
        (cores / 2).max(1)
    });
    sweep.execute(jobs, args.only, args.quiet)?;
    if sweep.interrupted {
        eprintln!(
            "interrupted: {} stopped with checkpoints; the same `larslab sweep` command resumes it",
            sweep.dir.display()
        );
        return Ok(Outcome::Interrupted);
    }
    if args.only.is_none() && sweep.all_failed_on_bad_input() {
        let first = sweep.failures()[0];
        return Err(UserError::Usage(format!(
            "every run of the sweep failed (see {}); the first, {}: {}",
            sweep.dir.join("sweep.json").display(),
            first.name,
            first.error.as_deref().unwrap_or("?")
        ))
        .into());
    }
    let failures = sweep.failures();
    for run in &failures {
        eprintln!(
            "failed: {}: {}",
            run.name,
            run.error.as_deref().unwrap_or("?")
        );
    }
    println!("{}: {} runs", sweep.dir.display(), sweep.runs.len());
    if !failures.is_empty() {
        anyhow::bail!(
            "{} of {} runs failed (see above and sweep.json)",
            failures.len(),
            sweep.runs.len()
        );
    }
    Ok(Outcome::Done)
}

pub fn plot(args: &PlotArgs) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for path in &args.paths {
        if path.join(run_dir::METRICS).is_file() {
            runs.push(path.clone());
        } else {
            let entries = std::fs::read_dir(path)
                .map_err(|e| UserError::data(path, format!("cannot read: {e}")))?;
            let mut found: Vec<_> = entries
                .filter_map(|e| Some(e.ok()?.path()))
                .filter(|p| p.join(run_dir::METRICS).is_file())
                .collect();
            if found.is_empty() {
                return Err(UserError::data(
                    path,
                    "is not a run and holds none (no metrics.jsonl)",
                )
                .into());
            }
            found.sort();
            runs.extend(found);
        }
    }
    plot::Format::of(&args.out)
        .map_err(|e| UserError::Usage(format!("--out {}: {e}", args.out.display())))?;
    let layers = args
        .layers
        .as_deref()
        .map(regex::Regex::new)
        .transpose()
        .map_err(|e| UserError::Usage(format!("--layers: {e}")))?;
    let per_layer = !args.metric.contains('/');
    let prefix = format!("{}/", args.metric);
    let file_name = |p: &std::path::Path| {
        p.file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned())
    };
    let mut curves = Vec::new();
    // The metric's layers in the runs, matched by --layers or not, to say which of the two found nothing.
    let mut unmatched: Vec<String> = Vec::new();
    for run in &runs {
        let wanted = |tag: &str| {
            if per_layer {
                tag.strip_prefix(&prefix)
                    .is_some_and(|layer| layers.as_ref().is_none_or(|r| r.is_match(layer)))
            } else {
                tag == args.metric
            }
        };
        if per_layer && layers.is_some() {
            let all = plot::curves(run, |tag| tag.starts_with(&prefix)).map_err(|e| {
                UserError::data(&run.join(run_dir::METRICS), format!("cannot read: {e}"))
            })?;
            for curve in all {
                let layer = curve.label.strip_prefix(&prefix).unwrap_or(&curve.label);
                if !unmatched.iter().any(|l| l == layer) {
                    unmatched.push(layer.to_string());
                }
            }
        }
        let found = plot::curves(run, wanted).map_err(|e| {
            UserError::data(&run.join(run_dir::METRICS), format!("cannot read: {e}"))
        })?;
        for plot::Curve { label: tag, points } in found {
            let layer = tag.strip_prefix(&prefix).unwrap_or(&tag).to_string();
            let label = match (per_layer, runs.len()) {
                (true, 1) => layer,
                (true, _) => format!("{}: {layer}", file_name(run)),
                (false, _) => file_name(run),
            };
            curves.push(plot::Curve { label, points });
        }
    }
    if curves.is_empty() && !unmatched.is_empty() {
        return Err(UserError::Usage(format!(
            "--layers {}: matches none of {}'s layers ({})",
            args.layers.as_deref().unwrap_or_default(),
            args.metric,
            unmatched.join(", ")
        ))
        .into());
    }
    if curves.is_empty() {
        return Err(UserError::Usage(format!(
            "--metric {}: no such tag in the runs' metrics.jsonl (per-layer metrics: grad_norm, trust_ratio, act_std, ...; tags: loss/train, accuracy/val, ...)",
            args.metric
        ))
        .into());
    }
    let title = match runs.as_slice() {
        [one] => format!("{} — {}", args.metric, file_name(one)),
        _ => args.metric.clone(),
    };
    let bytes = plot::line_figure(&curves, &title, &args.metric, args.log_y, &args.out)
        .map_err(|e| UserError::data(&args.out, format!("cannot draw the figure: {e}")))?;
    plot::write_figure(&args.out, &bytes)
        .map_err(|e| UserError::data(&args.out, format!("cannot write the figure: {e}")))?;
    println!("{}", args.out.display());
    Ok(())
}

pub fn compare(args: &CompareArgs) -> anyhow::Result<()> {
    let runs = compare::collect(&args.paths, args.target)?;
    let table = compare::table(&runs, args.group_seeds, args.sort.as_deref())?;
    print!(
        "{}",
        match args.format {
            CompareFormat::Table => compare::render_text(&table),
            CompareFormat::Md => compare::render_markdown(&table),
            CompareFormat::Csv => compare::render_csv(&table),
            CompareFormat::Json => compare::render_json(&table),
        }
    );
    Ok(())
}

pub fn probe(args: &ProbeArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.plot {
        plot::Format::of(path)
            .map_err(|e| UserError::Usage(format!("--plot {}: {e}", path.display())))?;
    }
    let config = load_config(&args.run)?;
    let report = probe::probe(&config, args.inputs as usize)?;
    // The figure first: when it cannot be written, no run directory is left behind.
    if let Some(path) = &args.plot {
        let bytes = plot::probe_figure(&report, &config.name, path)
            .map_err(|e| UserError::data(path, format!("cannot draw the figure: {e}")))?;
        plot::write_figure(path, &bytes)
            .map_err(|e| UserError::data(path, format!("cannot write the figure: {e}")))?;
    }
    let written = (|| -> anyhow::Result<RunDir> {
        let run_dir = RunDir::create(&args.run.out, &config.name)?;
        let fill = || -> anyhow::Result<()> {
            run_dir.write_text(run_dir::CONFIG, &config.to_toml())?;
            run_dir.write_json("probe.json", &report)?;
            Ok(())
        };
        if let Err(e) = fill() {
            let _ = std::fs::remove_dir_all(run_dir.path());
            return Err(e);
        }
        Ok(run_dir)
    })();
    let run_dir = match written {
        Ok(run_dir) => run_dir,
        Err(e) => {
            if let Some(path) = &args.plot {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
    };
    if !args.quiet {
        print!("{}", probe::table(&report));
    }
    println!("{}", run_dir.file("probe.json").display());
    if let Some(path) = &args.plot {
        println!("{}", path.display());
    }
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
    let device = match args.device {
        BenchDevice::Cpu => candle_core::Device::Cpu,
        BenchDevice::Cuda => candle_core::Device::new_cuda(0).map_err(|e| {
            UserError::Usage(format!(
                "--device cuda: no CUDA device ({e}); build with `--features cuda` on a GPU machine"
            ))
        })?,
        BenchDevice::Auto => {
            candle_core::Device::cuda_if_available(0).unwrap_or(candle_core::Device::Cpu)
        }
    };
    let mut results = Vec::new();
    for case in &cases {
        if args.format == Format::Table {
            eprintln!("timing {} ...", case.name);
        }
        results.extend(bench::run(case, &configurations, &plan, &device)?);
    }
    match args.format {
        Format::Table => print!("{}", bench::table(&results)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&results)?),
    }
    Ok(())
}
