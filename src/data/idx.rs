//! IDX files, the format of MNIST and its cousins (Fashion-MNIST, KMNIST, EMNIST).
//!
//! Layout (all integers big-endian): two zero bytes, a type code, the number
//! of dimensions, one u32 per dimension, then the values in row-major order.
//! Files may be gzip-compressed; we detect that by its magic bytes, not by the
//! file name. Every way a file can be wrong is a [`UserError`] naming it.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use flate2::bufread::GzDecoder;

use crate::error::UserError;

/// The element types the IDX format defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdxType {
    U8,
    I8,
    I16,
    I32,
    F32,
    F64,
}

impl IdxType {
    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0x08 => Self::U8,
            0x09 => Self::I8,
            0x0B => Self::I16,
            0x0C => Self::I32,
            0x0D => Self::F32,
            0x0E => Self::F64,
            _ => return None,
        })
    }

    fn code(self) -> u8 {
        match self {
            Self::U8 => 0x08,
            Self::I8 => 0x09,
            Self::I16 => 0x0B,
            Self::I32 => 0x0C,
            Self::F32 => 0x0D,
            Self::F64 => 0x0E,
        }
    }

    fn size(self) -> usize {
        match self {
            Self::U8 | Self::I8 => 1,
            Self::I16 => 2,
            Self::I32 | Self::F32 => 4,
            Self::F64 => 8,
        }
    }

    fn decode(self, bytes: &[u8]) -> f64 {
        match self {
            Self::U8 => bytes[0] as f64,
            Self::I8 => bytes[0] as i8 as f64,
            Self::I16 => i16::from_be_bytes([bytes[0], bytes[1]]) as f64,
            Self::I32 => i32::from_be_bytes(bytes.try_into().expect("4 bytes")) as f64,
            Self::F32 => f32::from_be_bytes(bytes.try_into().expect("4 bytes")) as f64,
            Self::F64 => f64::from_be_bytes(bytes.try_into().expect("8 bytes")),
        }
    }
}

/// An IDX array: u8 values as they are, other types widened to f32
/// (labels and grey levels are exact in f32).
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    pub dtype: IdxType,
    pub dims: Vec<usize>,
    pub values: Values,
}

/// An IDX array's values: u8 kept as bytes (a quarter of the memory), the rest as f32.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

impl Values {
    pub fn len(&self) -> usize {
        match self {
            Values::U8(v) => v.len(),
            Values::F32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every value widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Values::U8(v) => v.iter().map(|&b| b as f32).collect(),
            Values::F32(v) => v.clone(),
        }
    }
}

/// Refuse arrays beyond this many values (16 GiB of f32): a header claiming
/// more is corrupt, and reading it would exhaust memory before failing.
const MAX_VALUES: usize = 1 << 32;

/// Reads an IDX file, raw or gzip.
pub fn read(path: &Path) -> Result<IdxArray, UserError> {
    let err = |message: String| UserError::data(path, message);
    if path.is_dir() {
        return Err(err("is a directory, not an IDX file".into()));
    }
    let file = File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let file_len = file.metadata().map(|m| m.len()).ok();
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let gzip = {
        use std::io::BufRead;
        reader
            .fill_buf()
            .map_err(|e| err(format!("cannot read: {e}")))?
            .starts_with(&[0x1f, 0x8b])
    };
    if gzip {
        let mut decoder = GzDecoder::new(reader);
        let array = decode(&mut decoder, None).map_err(err)?;
        nothing_after_gzip(decoder.into_inner()).map_err(err)?;
        Ok(array)
    } else {
        decode(&mut reader, file_len).map_err(err)
    }
}

/// Decodes IDX bytes held in memory, raw or gzip (the fuzz target's entry).
pub fn decode_bytes(bytes: &[u8]) -> Result<IdxArray, String> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut decoder = GzDecoder::new(bytes);
        let array = decode(&mut decoder, None)?;
        nothing_after_gzip(decoder.into_inner())?;
        Ok(array)
    } else {
        decode(&mut &bytes[..], Some(bytes.len() as u64))
    }
}

/// The gzip stream has ended (its CRC checked); the file must end with it.
/// (`flate2::bufread`'s decoder reads no further than its stream, so what is
/// left in `rest` is what follows it in the file.)
fn nothing_after_gzip(mut rest: impl Read) -> Result<(), String> {
    let mut probe = [0u8; 1];
    match rest.read(&mut probe) {
        Ok(0) => Ok(()),
        Ok(_) => {
            Err("has bytes after its gzip stream (trailing junk, or a second file appended)".into())
        }
        Err(e) => Err(format!("cannot read: {e}")),
    }
}

/// Decodes an IDX stream whose total length, when known (`raw_len`: an
/// uncompressed file), is checked against the header before anything is allocated.
fn decode(reader: &mut dyn Read, raw_len: Option<u64>) -> Result<IdxArray, String> {
    let mut header = [0u8; 4];
    read_exact(reader, &mut header, "the 4-byte header")?;
    if header[0] != 0 || header[1] != 0 {
        return Err(format!(
            "not an IDX file (magic bytes {:02x} {:02x}, expected 00 00)",
            header[0], header[1]
        ));
    }
    let dtype = IdxType::from_code(header[2])
        .ok_or_else(|| format!("unknown IDX element type 0x{:02x}", header[2]))?;
    let ndim = header[3] as usize;
    if ndim == 0 {
        return Err("IDX header declares 0 dimensions".into());
    }
    let mut dims = Vec::with_capacity(ndim);
    for i in 0..ndim {
        let mut b = [0u8; 4];
        read_exact(reader, &mut b, &format!("the size of dimension {i}"))?;
        dims.push(u32::from_be_bytes(b) as usize);
    }
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_VALUES)
        .ok_or_else(|| format!("implausible dimensions {dims:?}"))?;
    let declared = 4 + 4 * ndim as u64 + (count as u64).saturating_mul(dtype.size() as u64);
    if let Some(len) = raw_len
        && len < declared
    {
        return Err(format!(
            "truncated: the header {dims:?} declares {declared} bytes, the file holds {len}"
        ));
    }
    let values = read_values(reader, dtype, count)?;
    let mut probe = [0u8; 1];
    match reader.read(&mut probe) {
        Ok(0) => {}
        Ok(_) => {
            return Err(format!(
                "has bytes after the {count} values its header {dims:?} declares"
            ));
        }
        Err(e) => return Err(format!("cannot read: {e}")),
    }
    Ok(IdxArray {
        dtype,
        dims,
        values,
    })
}

fn read_exact(reader: &mut dyn Read, buf: &mut [u8], what: &str) -> Result<(), String> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => format!("truncated: the file ends within {what}"),
        _ => format!("cannot read {what}: {e}"),
    })
}

/// Streams the values in chunks, so memory holds the f32 result and one chunk.
fn read_values(reader: &mut dyn Read, dtype: IdxType, count: usize) -> Result<Values, String> {
    if dtype == IdxType::U8 {
        // Grow with the data rather than trusting the header: a compressed file
        // claiming 2^32 values must fail on truncation, not allocate 4 GiB first.
        let mut values = Vec::with_capacity(count.min(1 << 24));
        let mut chunk = vec![0u8; 1 << 16];
        while values.len() < count {
            let n = (count - values.len()).min(1 << 16);
            read_exact(reader, &mut chunk[..n], "the data").map_err(|_| {
                format!("truncated: the header declares {count} values, the file ends before that")
            })?;
            values.extend_from_slice(&chunk[..n]);
        }
        return Ok(Values::U8(values));
    }
    let size = dtype.size();
    let mut values = Vec::with_capacity(count.min(1 << 22));
    let mut chunk = vec![0u8; (1 << 16) * size];
    while values.len() < count {
        let n = (count - values.len()).min(1 << 16);
        let bytes = &mut chunk[..n * size];
        read_exact(reader, bytes, "the data").map_err(|_| {
            format!("truncated: the header declares {count} values, the file ends before that")
        })?;
        values.extend(bytes.chunks_exact(size).map(|b| dtype.decode(b) as f32));
    }
    Ok(Values::F32(values))
}

/// Writes a u8 IDX file; gzip-compressed when `gzip`. Written to a temporary
/// name and renamed, so an interrupted write never leaves a half file.
pub fn write_u8(path: &Path, dims: &[usize], values: &[u8], gzip: bool) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(4 + 4 * dims.len() + values.len());
    bytes.extend_from_slice(&[0, 0, IdxType::U8.code(), dims.len() as u8]);
    for &d in dims {
        bytes.extend_from_slice(&(d as u32).to_be_bytes());
    }
    bytes.extend_from_slice(values);
    if gzip {
        let mut encoder = flate2::write::GzEncoder::new(
            BufWriter::new(Vec::new()),
            flate2::Compression::default(),
        );
        encoder.write_all(&bytes)?;
        bytes = encoder.finish()?.into_inner().map_err(|e| e.into_error())?;
    }
    crate::fsutil::atomic_write(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(code: u8, dims: &[u32]) -> Vec<u8> {
        let mut b = vec![0, 0, code, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b
    }

    fn write_raw(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn u8_round_trip_raw_and_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<u8> = (0..2 * 3 * 4).map(|i| (i * 11) as u8).collect();
        for gzip in [false, true] {
            let path = dir.path().join(format!("x-{gzip}"));
            write_u8(&path, &[2, 3, 4], &values, gzip).unwrap();
            let raw = std::fs::read(&path).unwrap();
            assert_eq!(raw.starts_with(&[0x1f, 0x8b]), gzip);
            let array = read(&path).unwrap();
            assert_eq!(array.dtype, IdxType::U8);
            assert_eq!(array.dims, vec![2, 3, 4]);
            assert_eq!(array.values, Values::U8(values.clone()));
        }
    }

    #[test]
    fn wider_types_are_big_endian() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = header(0x0B, &[2]);
        bytes.extend_from_slice(&(-2i16).to_be_bytes());
        bytes.extend_from_slice(&300i16.to_be_bytes());
        assert_eq!(
            read(&write_raw(dir.path(), "i16", &bytes))
                .unwrap()
                .values
                .to_f32(),
            [-2.0, 300.0]
        );

        let mut bytes = header(0x0D, &[1]);
        bytes.extend_from_slice(&1.5f32.to_be_bytes());
        assert_eq!(
            read(&write_raw(dir.path(), "f32", &bytes))
                .unwrap()
                .values
                .to_f32(),
            [1.5]
        );

        let mut bytes = header(0x0E, &[1]);
        bytes.extend_from_slice(&(-0.25f64).to_be_bytes());
        assert_eq!(
            read(&write_raw(dir.path(), "f64", &bytes))
                .unwrap()
                .values
                .to_f32(),
            [-0.25]
        );

        let mut bytes = header(0x09, &[1]);
        bytes.push(0xFF);
        assert_eq!(
            read(&write_raw(dir.path(), "i8", &bytes))
                .unwrap()
                .values
                .to_f32(),
            [-1.0]
        );

        let mut bytes = header(0x0C, &[1]);
        bytes.extend_from_slice(&70000i32.to_be_bytes());
        assert_eq!(
            read(&write_raw(dir.path(), "i32", &bytes))
                .unwrap()
                .values
                .to_f32(),
            [70000.0]
        );
    }

    fn error_of(bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = write_raw(dir.path(), "bad-file", bytes);
        let message = read(&path).unwrap_err().to_string();
        assert!(
            message.contains("bad-file"),
            "error does not name the file: {message}"
        );
        message
    }

    #[test]
    fn malformed_files_are_errors_naming_the_file() {
        let mut good = header(0x08, &[2, 2]);
        good.extend_from_slice(&[1, 2, 3, 4]);

        assert!(error_of(&[]).contains("truncated"));
        assert!(error_of(&good[..3]).contains("truncated"));
        assert!(error_of(&good[..9]).contains("truncated"));
        assert!(error_of(&good[..good.len() - 1]).contains("truncated"));
        assert!(error_of(&[good.as_slice(), &[9]].concat()).contains("after"));
        assert!(error_of(&[0x50, 0x4b, 3, 4, 0, 0]).contains("not an IDX"));
        assert!(error_of(&header(0x07, &[1])).contains("element type"));
        assert!(error_of(&header(0x08, &[])).contains("0 dimensions"));
        assert!(error_of(&header(0x08, &[u32::MAX, u32::MAX, 4])).contains("implausible"));
    }

    #[test]
    fn truncated_gzip_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.gz");
        write_u8(&path, &[100, 10], &[7; 1000], true).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(read(&path).is_err());
    }

    /// A seeded stand-in for the fuzz target (fuzz/fuzz_targets/idx.rs) that
    /// runs in the suite: mutated, truncated and extended files, raw and gzip,
    /// are refused or parsed consistently, never a panic.
    #[test]
    fn mutated_files_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut good = header(0x08, &[3, 4, 5]);
        good.extend((0..60u8).map(|i| i.wrapping_mul(37)));
        let dir = tempfile::tempdir().unwrap();
        let gz_path = dir.path().join("g");
        write_u8(&gz_path, &[3, 4, 5], &good[16..], true).unwrap();
        let good_gz = std::fs::read(&gz_path).unwrap();
        for round in 0..3000 {
            let mut bytes = if round % 2 == 0 {
                good.clone()
            } else {
                good_gz.clone()
            };
            for _ in 0..rng.random_range(1..4) {
                match rng.random_range(0..4) {
                    0 if !bytes.is_empty() => {
                        let i = rng.random_range(0..bytes.len());
                        bytes[i] ^= 1 << rng.random_range(0..8);
                    }
                    1 => bytes.truncate(rng.random_range(0..=bytes.len())),
                    2 => bytes.extend((0..rng.random_range(1..8)).map(|_| rng.random::<u8>())),
                    _ if bytes.len() > 4 => bytes[rng.random_range(2..4)] = rng.random(),
                    _ => {}
                }
            }
            if let Ok(array) = decode_bytes(&bytes) {
                assert_eq!(array.values.len(), array.dims.iter().product::<usize>());
            }
        }
    }

    #[test]
    fn missing_file_is_an_error() {
        let message = read(Path::new("/no/such/idx-file"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("/no/such/idx-file") && message.contains("cannot open"));
    }
}
