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
}
