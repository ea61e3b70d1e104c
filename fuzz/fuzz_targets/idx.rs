//! The IDX parser on arbitrary bytes (raw or gzip): it may refuse them, never panic,
//! and a parsed array's values always match its dimensions.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(array) = larslab::data::idx::decode_bytes(data) {
        let count: usize = array.dims.iter().product();
        assert_eq!(array.values.len(), count);
    }
});
