//! A minimal JSON writer for the transcript's record lines: strings, integers and literals
//! appended to a `Vec<u8>`, byte for byte what `serde_json` writes for the same values.
//!
//! Why not `serde_json` for everything: record lines are mostly bodies, and LLM bodies are JSON
//! themselves, so a body is a string with a quote every few bytes. `serde_json` copies each
//! run between two escapes with its own `write_all` (a `memcpy` call per few bytes); this
//! writer scans and copies eight bytes at a time and escapes in place.
//!
//! Invariant: [`string`] escapes exactly what `serde_json` escapes (`"`, `\`, control bytes
//! as `\b \t \n \f \r` or `\u00XX`; nothing else, not `/`, not non-ASCII), so a line is
//! identical to the one `serde_json` would write (tested in `transcript`).

/// The escape of each byte: 0 = none, `u` = `\u00XX`, else the character after the `\`.
static ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `s` as a JSON string (quoted, escaped).
pub fn string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let mut src = s.as_bytes();
    // Short strings (names, header values) rarely need an escape: one scan, one copy.
    if src.len() <= 64 && !src.iter().any(|&b| ESCAPE[b as usize] != 0) {
        out.extend_from_slice(src);
        out.push(b'"');
        return;
    }
    while !src.is_empty() {
        // Write through an index into a zeroed tail instead of `push`ing (a `push` reloads
        // the vector's length and capacity for every byte). A quarter more than the input
        // fits JSON text (a quote every few bytes); denser escapes take another round.
        let start = out.len();
        out.resize(start + src.len() + src.len() / 4 + ROOM, 0);
        let (read, written) = escape_into(src, &mut out[start..]);
        out.truncate(start + written);
        src = &src[read..];
    }
    out.push(b'"');
}

/// Room a word step may need past the current output position: eight `\u00XX` escapes
/// (48 bytes) and the 8-byte store that follows the last of them.
const ROOM: usize = 64;

/// Escapes `src` into `dst` until either runs out (`dst` keeps [`ROOM`] bytes of slack);
/// returns the bytes read and written. Eight bytes at a time: a word without any byte to
/// escape is copied whole; in a word with some, the exact mask of those bytes is walked bit
/// by bit — each escape is written, then the rest of the word stored after it in one go —
/// so a JSON body (a quote every few bytes) costs a few operations per escape, not a reload.
fn escape_into(src: &[u8], dst: &mut [u8]) -> (usize, usize) {
    let (mut i, mut n) = (0, 0);
    while i + 8 <= src.len() && n + ROOM <= dst.len() {
        let mut word = [0u8; 8];
        word.copy_from_slice(&src[i..i + 8]);
        let w = u64::from_le_bytes(word);
        dst[n..n + 8].copy_from_slice(&word);
        let mut mask = escape_mask(w);
        // Bytes of this word already consumed (stored before `n`).
        let mut done = 0usize;
        while mask != 0 {
            let k = (mask.trailing_zeros() / 8) as usize;
            // Bytes `done..k` are in place (stored with the word or its rest).
            n += k - done;
            n += escape_byte(word[k], &mut dst[n..]);
            done = k + 1;
            mask &= mask - 1;
            let rest = w.checked_shr(8 * done as u32).unwrap_or(0);
            dst[n..n + 8].copy_from_slice(&rest.to_le_bytes());
        }
        n += 8 - done;
        i += 8;
    }
    while i < src.len() && n + ROOM <= dst.len() {
        let b = src[i];
        if ESCAPE[b as usize] == 0 {
            dst[n] = b;
            n += 1;
        } else {
            n += escape_byte(b, &mut dst[n..]);
        }
        i += 1;
    }
    (i, n)
}

/// Writes the escape of `b` (a byte that needs one) at the start of `dst`; returns its length.
fn escape_byte(b: u8, dst: &mut [u8]) -> usize {
    let e = ESCAPE[b as usize];
    if e == b'u' {
        dst[..6].copy_from_slice(&[
            b'\\',
            b'u',
            b'0',
            b'0',
            HEX[(b >> 4) as usize],
            HEX[(b & 0xf) as usize],
        ]);
        6
    } else {
        dst[0] = b'\\';
        dst[1] = e;
        2
    }
}

/// A word's bytes that need an escape (below 0x20, `"`, `\\`), flagged exactly by their
/// high bit: every test works on the low seven bits of each byte, so no carry crosses bytes.
fn escape_mask(w: u64) -> u64 {
    const LOW: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const ONES: u64 = 0x0101_0101_0101_0101;
    // High bit set where the byte is zero.
    let zero = |v: u64| !(((v & LOW) + LOW) | v | LOW);
    // High bit set where the byte is below 0x20: its high bit is clear and its low seven
    // bits plus 0x60 stay below 0x80.
    let control = !(((w & LOW) + ONES * 0x60) | w | LOW);
    control | zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\')))
}

/// Appends an unsigned integer.
pub fn uint(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Appends an optional unsigned integer (`null` when absent).
pub fn opt_uint(out: &mut Vec<u8>, n: Option<u64>) {
    match n {
        Some(n) => uint(out, n),
        None => out.extend_from_slice(b"null"),
    }
}

/// Appends an optional string (`null` when absent).
pub fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// Appends `true` or `false`.
pub fn boolean(out: &mut Vec<u8>, b: bool) {
    out.extend_from_slice(if b { b"true" } else { b"false" });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serde(s: &str) -> Vec<u8> {
        serde_json::to_vec(s).unwrap()
    }

    #[test]
    fn strings_match_serde_json_for_every_byte() {
        let mut all = String::new();
        for c in 0u8..0x80 {
            all.push(c as char);
        }
        all.push_str("é€😀 {\"a\":\"b\\c\"}\n/");
        for s in [
            "",
            "plain",
            all.as_str(),
            "\u{7f}",
            "\"\"\"",
            "\\\\",
            "\u{1f}x",
        ] {
            let mut out = Vec::new();
            string(&mut out, s);
            assert_eq!(out, serde(s), "{s:?}");
        }
    }

    /// Every position of every escape class, in strings of every length around the word size.
    #[test]
    fn escapes_at_every_offset_match_serde_json() {
        for len in 0..40 {
            for pos in 0..len {
                for special in ["\"", "\\", "\n", "\u{1}", "\u{1f}", "é", "\u{7f}"] {
                    let mut s: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
                    s.replace_range(pos..pos + 1, special);
                    let mut out = vec![b'x'];
                    string(&mut out, &s);
                    assert_eq!(out[1..], serde(&s)[..], "{s:?}");
                }
            }
        }
        let dense = "\u{1}".repeat(5000) + &"\"".repeat(5000);
        let mut out = Vec::new();
        string(&mut out, &dense);
        assert_eq!(out, serde(&dense));
    }

    /// Several escapes per word, of every kind, at pseudo-random positions.
    #[test]
    fn mixed_escapes_match_serde_json() {
        let alphabet = [
            "a", "\"", "\\", "\n", "\u{1}", "\u{1f}", " ", "é", "\u{7f}", "/", "€",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..300 {
            let s: String = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    alphabet[(seed % alphabet.len() as u64) as usize]
                })
                .collect();
            let mut out = Vec::new();
            string(&mut out, &s);
            assert_eq!(out, serde(&s), "{s:?}");
        }
    }

    #[test]
    fn integers_match_serde_json() {
        for n in [0u64, 1, 9, 10, 99, 100, 12345, u64::MAX - 1, u64::MAX] {
            let mut out = Vec::new();
            uint(&mut out, n);
            assert_eq!(out, serde_json::to_vec(&n).unwrap());
        }
        let mut out = Vec::new();
        opt_uint(&mut out, None);
        opt_string(&mut out, None);
        boolean(&mut out, true);
        boolean(&mut out, false);
        assert_eq!(out, b"nullnulltruefalse");
    }
}
