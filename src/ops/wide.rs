//! Element-wise loops compiled for the widest vectors the CPU has.
//!
//! The build targets baseline x86-64, so the compiler vectorises loops four
//! f32 lanes (two f64) wide. Code run through [`wide`] is compiled a second
//! time with AVX-512 enabled, sixteen lanes wide, and that copy is chosen at
//! run time where the CPU has AVX-512F. The operations and their order stay
//! the same (Rust never fuses a multiplication and an addition on its own),
//! so both copies give the same bits.

/// Runs `f`, compiled for AVX-512 where the CPU has it.
#[inline(always)]
pub fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}
