//! The digest of a whole request body, continuing the hash of the earlier body it starts with
//! (pure).
//!
//! An agent's request repeats the previous one and adds a little near its end. The summary's
//! body digest (XXH3-128 of the raw bytes) is computed as a stream that keeps its state every
//! [`STEP`] bytes ([`Marks`]); the next body that shares a prefix with it (the summary memo
//! finds that prefix anyway) continues from the last mark inside the prefix.
//!
//! Invariant: [`digest`] returns `Digest::of_bytes(body)` whatever marks it is given, as long
//! as the stated prefix is really shared with the body the marks were taken from.

use xxhash_rust::xxh3::Xxh3;

use crate::canonical::Digest;

/// Bytes between two marks.
pub(super) const STEP: usize = 16 * 1024;

/// The hash state after each whole [`STEP`] of a body: `0[k]` has read `(k + 1) * STEP` bytes.
#[derive(Clone, Default)]
pub(super) struct Marks(Vec<Xxh3>);

impl std::fmt::Debug for Marks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Marks({})", self.0.len())
    }
}

impl Marks {
    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        self.0.capacity() * std::mem::size_of::<Xxh3>()
    }
}

/// `Digest::of_bytes(body)` and the body's marks; `earlier` is an earlier body's marks with
/// the length of the prefix `body` shares with that body.
pub(super) fn digest(body: &[u8], earlier: Option<(&Marks, usize)>) -> (Digest, Marks) {
    if body.len() < STEP {
        return (Digest::of_bytes(body), Marks::default());
    }
    let usable = earlier.map_or(0, |(m, shared)| {
        (shared.min(body.len()) / STEP).min(m.0.len())
    });
    let (mut state, mut marks) = match earlier {
        Some((m, _)) if usable > 0 => (m.0[usable - 1].clone(), m.0[..usable].to_vec()),
        _ => (Xxh3::new(), Vec::new()),
    };
    let mut at = usable * STEP;
    while at + STEP <= body.len() {
        state.update(&body[at..at + STEP]);
        marks.push(state.clone());
        at += STEP;
    }
    state.update(&body[at..]);
    (Digest::of_stream(&state), Marks(marks))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    #[test]
    fn equals_the_one_shot_digest_whatever_is_reused() {
        for len in [
            0,
            1,
            240,
            STEP - 1,
            STEP,
            STEP + 1,
            3 * STEP,
            100_003,
            300_000,
        ] {
            let b = body(len, 5);
            let (d, marks) = digest(&b, None);
            assert_eq!(d, Digest::of_bytes(&b), "len {len}");
            assert_eq!(marks.0.len(), len / STEP);
        }
        // A growing body: each the previous one with bytes inserted near its end.
        let mut prev = body(20_000, 1);
        let mut marks = digest(&prev, None).1;
        for step in 0..30u8 {
            let cut = prev.len() - 23;
            let mut next = prev[..cut].to_vec();
            next.extend(body(3000 + usize::from(step) * 1111, step));
            next.extend_from_slice(&prev[cut..]);
            let shared = crate::common_prefix(&prev, &next);
            for prefix in [0, shared / 2, shared, shared + STEP] {
                let prefix = prefix.min(shared);
                let (d, m) = digest(&next, Some((&marks, prefix)));
                assert_eq!(d, Digest::of_bytes(&next), "step {step} prefix {prefix}");
                assert_eq!(m.0.len(), next.len() / STEP);
            }
            marks = digest(&next, Some((&marks, shared))).1;
            prev = next;
        }
        // A shorter body that is a prefix of the marked one.
        let short = &prev[..2 * STEP + 7];
        assert_eq!(
            digest(short, Some((&marks, prev.len()))).0,
            Digest::of_bytes(short)
        );
    }
}
