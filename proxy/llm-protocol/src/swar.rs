//! Eight bytes at a time ("SIMD within a register"): the bytes of a word equal to a given
//! byte, flagged exactly by their high bit. Event streams and JSON are scanned for a few
//! ASCII bytes (line ends, quotes); a byte-by-byte loop was the main cost of those scans.
//! Exact: every flag is computed on the low seven bits of its own byte, so no carry crosses
//! bytes and every flagged byte (not only the lowest) is a match.

/// The word at `bytes[at..at + 8]`, little-endian (byte `k` is bits `8k..8k + 8`).
pub(crate) fn word(bytes: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Bit 7 of byte `k` set iff byte `k` of `w` equals `b`.
pub(crate) fn eq_mask(w: u64, b: u8) -> u64 {
    const LOW: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const ONES: u64 = 0x0101_0101_0101_0101;
    let v = w ^ (ONES * u64::from(b));
    !(((v & LOW) + LOW) | v | LOW)
}

/// The index of the lowest flagged byte of a non-zero mask.
pub(crate) fn first(mask: u64) -> usize {
    (mask.trailing_zeros() / 8) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte value at every position, against every target byte that matters here and
    /// its neighbours (borrows and carries would show as false flags next to a match).
    #[test]
    fn masks_flag_exactly_the_equal_bytes() {
        for target in [0u8, 1, b'\n', b'\r', b'"', b'\\', 0x7f, 0x80, 0xff] {
            for value in 0..=255u8 {
                for pos in 0..8 {
                    let mut bytes = [target.wrapping_add(1); 8];
                    bytes[pos] = value;
                    bytes[(pos + 1) % 8] = target.wrapping_sub(1);
                    let m = eq_mask(word(&bytes, 0), target);
                    for (k, &b) in bytes.iter().enumerate() {
                        assert_eq!(m >> (8 * k + 7) & 1 == 1, b == target, "{bytes:?} {target}");
                    }
                    assert_eq!(m & !0x8080_8080_8080_8080, 0);
                }
            }
        }
    }
}
