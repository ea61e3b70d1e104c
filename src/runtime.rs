//! Process-wide settings that decide training speed on the CPU: candle's
//! thread pools and the allocator. Measured on the 2-core reference machine
//! (README, Speed).

/// Training allocates and frees megabytes of tensors every step. glibc's
/// allocator hands them back to the kernel and faults them in again
/// (thousands of page faults per step); mimalloc keeps them, once told not
/// to purge freed memory (see [`configure`]).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_t` (mimalloc.h):
/// milliseconds before freed memory goes back to the OS; −1 is never.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Call first thing in `main`, while the process has one thread.
///
/// - Candle runs matrix products on rayon's pool and element-wise operations
///   on a second pool of its own whose idle workers spin. With both at one
///   thread per core they compete for the same cores: mlp-256-b128 ran 6×
///   faster with the element-wise pool at one thread (the calling thread).
///   `CANDLE_NUM_THREADS` set by the user wins.
/// - mimalloc returns freed memory to the OS 10 ms after it is freed, so every
///   step's large tensors came back as fresh pages the kernel had to fault in
///   and zero: `bench --case cnn-bn-b128 --steps 10 --repeats 1 --warmup 0`
///   made 1,996 `madvise` calls and 21,409 page faults, 517 without purging.
///   Never purging keeps the process's peak footprint resident, which
///   training reaches every step anyway.
pub fn configure() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: no other thread exists yet to read the environment.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    // SAFETY: sets a plain integer option; mimalloc reads options atomically.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
