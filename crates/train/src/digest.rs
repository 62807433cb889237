//! A content fingerprint that is the same in every build and on every machine.

use std::io::Read;
use std::path::Path;

use crate::error::{Result, TrainError};

/// 64-bit FNV-1a (Fowler–Noll–Vo): `h ← (h ⊕ byte) · 0x100000001b3` from `0xcbf29ce484222325`.
/// Not cryptographic; two inputs that differ anywhere differ here but for a chance of 2⁻⁶⁴.
/// Written out here, not taken from a crate, because `std`'s hashers may change between Rust
/// releases and fingerprints are stored in files.
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    /// Feeds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// The hash of everything fed so far.
    pub fn finish(self) -> u64 {
        self.0
    }

    /// The hash of the file at `path`, read in blocks (memory does not follow the file).
    pub fn of_file(path: &Path) -> Result<u64> {
        let mut file = std::fs::File::open(path).map_err(|e| TrainError::io(path, e))?;
        let mut hash = Self::default();
        let mut block = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut block).map_err(|e| TrainError::io(path, e))?;
            if n == 0 {
                return Ok(hash.finish());
            }
            hash.update(&block[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_its_published_test_vectors() {
        // From the FNV reference (isthe.com/chongo/tech/comp/fnv): "", "a", "foobar".
        for (input, want) in [
            ("", 0xcbf2_9ce4_8422_2325u64),
            ("a", 0xaf63_dc4c_8601_ec8c),
            ("foobar", 0x8594_4171_f739_67e8),
        ] {
            let mut h = Fnv1a::default();
            h.update(input.as_bytes());
            assert_eq!(h.finish(), want, "{input:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"foobar").unwrap();
        assert_eq!(Fnv1a::of_file(&p).unwrap(), 0x8594_4171_f739_67e8);
    }
}
