//! larslab: a research harness for training stability.
//!
//! See DESIGN.md for the contract (commands, config keys, run directory,
//! names) and the module map.

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod commands;
pub mod compare;
pub mod config;
pub mod data;
pub mod device;
pub mod diagnostics;
pub mod divergence;
pub mod error;
pub mod fsutil;
pub mod interrupt;
pub mod model;
pub mod ops;
pub mod optim;
pub mod plot;
pub mod probe;
pub mod rescue;
pub mod rng;
pub mod run_dir;
pub mod runtime;
pub mod sinks;
pub mod sweep;
pub mod tensorboard;
pub mod train;
