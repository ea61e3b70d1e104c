use clap::Parser;

use larslab::cli::{Cli, Command};
use larslab::{commands, error};

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Train(args) => commands::train(args),
        Command::Bench(args) => commands::bench(args),
    };
    if let Err(err) = result {
        // One line: anyhow's alternate form joins the context chain with ": ".
        eprintln!("error: {err:#}");
        std::process::exit(error::exit_code(&err));
    }
}
