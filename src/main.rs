use clap::Parser;

use larslab::cli::{Cli, Command};
use larslab::commands::Outcome;
use larslab::{commands, error, interrupt, runtime};

fn main() {
    runtime::configure();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Train(args) => commands::train(args),
        Command::Rescue(args) => commands::rescue_command(args),
        Command::Sweep(args) => commands::sweep(args),
        Command::Plot(args) => commands::plot(args).map(|()| Outcome::Done),
        Command::Compare(args) => commands::compare(args).map(|()| Outcome::Done),
        Command::Data(command) => commands::data(command).map(|()| Outcome::Done),
        Command::Probe(args) => commands::probe(args).map(|()| Outcome::Done),
        Command::Bench(args) => commands::bench(args).map(|()| Outcome::Done),
    };
    match result {
        Ok(Outcome::Done) => {}
        Ok(Outcome::Interrupted) => std::process::exit(interrupt::EXIT_INTERRUPTED),
        Err(err) => {
            // One line: anyhow's alternate form joins the context chain with ": ".
            eprintln!("error: {err:#}");
            std::process::exit(error::exit_code(&err));
        }
    }
}
