//! The command line (clap derive). Parsing only; `main` dispatches.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "larslab",
    version,
    about = "A research harness for training stability"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train one run; without --config, the built-in default experiment.
    Train(TrainArgs),
    /// Continue a diverged run from its last checkpoint before the divergence, with changed settings.
    Rescue(RescueArgs),
    /// The cartesian product of a grid, each point a run, N at a time (or a Slurm job array).
    Sweep(SweepArgs),
    /// Finished runs side by side: the settings that differ and the summary figures.
    Compare(CompareArgs),
    /// Curves of a metric over steps: one line per run, or per layer for a per-layer metric.
    Plot(PlotArgs),
    /// Write a data set as IDX files.
    #[command(subcommand)]
    Data(DataCommand),
    /// Measure a model at initialisation: per-layer variances, Jacobian spectrum (writes probe.json).
    Probe(ProbeArgs),
    /// Time the training step of fixed cases, SGD and LARS, measurements on and off.
    Bench(BenchArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Emit {
    Slurm,
}

#[derive(Debug, Args)]
pub struct SweepArgs {
    /// The experiment's TOML file (its `[sweep]` table adds grid keys and seeds).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override a config key for every run: --set train.steps=500
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// A grid axis: KEY=V1,V2,... (TOML values; bare words are strings).
    #[arg(long = "grid", value_name = "KEY=V1,V2,...")]
    pub grid: Vec<String>,
    /// Seeds every grid point runs with: 0,1,2
    #[arg(long, value_delimiter = ',')]
    pub seeds: Option<Vec<u64>>,
    /// Runs at a time (default: the `[sweep]` table's, else one per two cores).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// The directory that holds the sweep directory.
    #[arg(long, value_name = "DIR", default_value = "runs")]
    pub out: PathBuf,
    /// The sweep directory's name (default: the config's name + "-sweep").
    #[arg(long)]
    pub name: Option<String>,
    /// Run only the run with this index (a Slurm array task).
    #[arg(long, value_name = "INDEX")]
    pub only: Option<usize>,
    /// Write a job script instead of running: `--emit slurm` writes DIR/sweep.sbatch.
    #[arg(long, value_enum)]
    pub emit: Option<Emit>,
    #[arg(long, default_value = "01:00:00")]
    pub slurm_time: String,
    #[arg(long, default_value_t = 2)]
    pub slurm_cpus: usize,
    #[arg(long)]
    pub slurm_partition: Option<String>,
    /// An extra `#SBATCH` line, e.g. --slurm-line '--mem=8G'
    #[arg(long = "slurm-line")]
    pub slurm_lines: Vec<String>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompareFormat {
    Table,
    Md,
    Csv,
    Json,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Run directories, or directories of runs (a sweep, `runs/`).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    #[arg(long, value_enum, default_value_t = CompareFormat::Table)]
    pub format: CompareFormat,
    /// Sort by this column (numbers descending, text ascending).
    #[arg(long)]
    pub sort: Option<String>,
    /// One row per configuration, mean ± std over its seeds.
    #[arg(long)]
    pub group_seeds: bool,
    /// The validation accuracy `steps_to_target` counts the steps to.
    #[arg(long, default_value_t = 0.9)]
    pub target: f64,
}

#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Run directories, or directories of runs.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// A tag (`loss/val`: one line per run) or a per-layer metric (`trust_ratio`: one line per layer).
    #[arg(long)]
    pub metric: String,
    /// Only the layers or parameters whose name matches this regular expression.
    #[arg(long, value_name = "REGEX")]
    pub layers: Option<String>,
    #[arg(long)]
    pub log_y: bool,
    /// The figure: FILE.png or FILE.svg.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Procedurally drawn MNIST-like digits: train-{images,labels} and t10k-{images,labels} IDX files.
    MnistLike(MnistLikeArgs),
}

#[derive(Debug, Args)]
pub struct MnistLikeArgs {
    /// The directory to write the four IDX files into.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Training digits.
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub n: u64,
    /// Test digits (the t10k files), drawn after the training ones.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub test_n: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Gzip the files (`.gz`), as MNIST is distributed.
    #[arg(long)]
    pub gzip: bool,
    /// Also write a PNG grid of the first 100 training digits.
    #[arg(long, value_name = "FILE")]
    pub preview: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Inputs the Jacobian is taken at (its singular values are pooled over them).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub inputs: u64,
    /// Also draw the per-layer spreads and the singular-value histogram into this PNG (or SVG).
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
    /// No table on stdout: only the paths written.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct RescueArgs {
    /// The diverged run's directory.
    pub run: PathBuf,
    /// What to change for the rescue, e.g. --set optimizer.kind=lars
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// One case (mlp-1024-b128, mlp-1024-b1024, mlp-256-b128, deep30-b128, cnn-bn-b128, cnn-bn-b1024); default: all.
    #[arg(long)]
    pub case: Option<String>,
    /// Timed steps per repeat.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: u64,
    /// Timed repeats; the median is reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub repeats: u64,
    /// Untimed steps first.
    #[arg(long, default_value_t = 5)]
    pub warmup: u64,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Where to run: cpu, cuda (needs `--features cuda`), auto.
    #[arg(long, value_enum, default_value_t = BenchDevice::Cpu)]
    pub device: BenchDevice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchDevice {
    Cpu,
    Cuda,
    Auto,
}

/// The options every command that builds a run from a config shares.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The experiment's TOML file (default: the built-in experiment, experiments/default.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override a config key with a TOML value, after the file: --set optimizer.lr=0.5
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// The directory that holds run directories.
    #[arg(long, value_name = "DIR", default_value = "runs")]
    pub out: PathBuf,
    /// The run's name (default: the config's `name`); the run directory is OUT/NAME.
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// Continue the run in this directory from its last checkpoint (with --set
    /// train.steps=N, extend a finished run); its config.toml is the config.
    #[arg(long, value_name = "RUN", conflicts_with_all = ["config", "name"])]
    pub resume: Option<PathBuf>,
}
