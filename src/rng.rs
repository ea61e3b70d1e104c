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

/// A generator's exact position, for checkpoints (the 256-bit seed in hex,
/// the stream, and the word position as a decimal string: it is a u128).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    seed: String,
    stream: u64,
    word_pos: String,
}

impl RngState {
    pub fn of(rng: &Rng) -> Self {
        Self {
            seed: rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    /// The generator this state describes; `None` when the state is malformed.
    pub fn restore(&self) -> Option<Rng> {
        let bytes: Vec<u8> = (0..self.seed.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(self.seed.get(i..i + 2)?, 16).ok())
            .collect::<Option<_>>()?;
        let mut rng = Rng::from_seed(bytes.try_into().ok()?);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos.parse().ok()?);
        Some(rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng as _;

    #[test]
    fn a_restored_generator_continues_exactly() {
        let mut rng = stream(42, Stream::Shuffle);
        let _: Vec<u64> = (0..37).map(|_| rng.random()).collect();
        let state = RngState::of(&rng);
        let json = serde_json::to_string(&state).unwrap();
        let mut restored = serde_json::from_str::<RngState>(&json)
            .unwrap()
            .restore()
            .unwrap();
        let a: Vec<u32> = (0..100).map(|_| rng.random()).collect();
        let b: Vec<u32> = (0..100).map(|_| restored.random()).collect();
        assert_eq!(a, b);
    }
}
