//! Seeded random streams.
//!
//! candle's CPU generator cannot be seeded, so every random number in a run
//! comes from here: one ChaCha8 generator per purpose, all derived from the
//! config's one seed. Separate streams keep purposes independent: turning
//! dropout on does not change the initial weights or the data order.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub type Rng = ChaCha8Rng;

/// What a random stream is used for; each gets its own ChaCha stream number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Drawing synthetic data sets.
    Data = 1,
    /// Splitting off the validation set.
    Split = 2,
    /// Initial weights.
    Init = 3,
    /// The order of training samples.
    Shuffle = 4,
    /// Dropout masks.
    Dropout = 5,
}

/// The generator for one purpose of one seed.
pub fn stream(seed: u64, purpose: Stream) -> Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(purpose as u64);
    rng
}
