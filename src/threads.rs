//! Thread pools. Candle runs matrix products on rayon's pool and
//! element-wise operations on a second pool of its own whose idle workers
//! spin. With both at one thread per core they compete for the same cores:
//! on the 2-core reference machine, mlp-256-b128 ran 6× faster with the
//! element-wise pool at one thread (the calling thread), and no case ran
//! slower (README, Speed).

/// Sets candle's element-wise pool to the calling thread alone, unless
/// `CANDLE_NUM_THREADS` says otherwise. Must run before the first tensor
/// operation and before any other thread exists.
pub fn configure() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: called first thing in `main`, while the process has one thread.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}
