//! Calibration tokens cut into model inputs.

use crate::error::{Result, RouterError};

/// `tokens` cut into consecutive windows of `seq_len` (the last one shorter; a last window of
/// one token is dropped), each a separate sequence.
pub fn windows(tokens: &[u32], seq_len: usize) -> Result<Vec<&[u32]>> {
    if seq_len < 2 {
        return Err(RouterError::Calibration(format!(
            "sequence length {seq_len} must be at least 2"
        )));
    }
    let windows: Vec<&[u32]> = tokens.chunks(seq_len).filter(|w| w.len() >= 2).collect();
    if windows.is_empty() {
        return Err(RouterError::Calibration(format!(
            "{} calibration tokens; give more text",
            tokens.len()
        )));
    }
    Ok(windows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_tokens_and_refuse_too_little() {
        let t: Vec<u32> = (0..11).collect();
        let w = windows(&t, 4).unwrap();
        assert_eq!(w, [&t[0..4], &t[4..8], &t[8..11]]);
        assert_eq!(windows(&t[..9], 4).unwrap().len(), 2); // a 1-token tail is dropped
        assert!(windows(&t[..1], 4).is_err());
        assert!(windows(&[], 4).is_err());
        assert!(windows(&t, 1).is_err());
    }
}
