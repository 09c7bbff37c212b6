//! The BLAKE3 digest of a request body, reusing what an earlier body it starts with already
//! hashed (pure).
//!
//! A record carries the standard BLAKE3 of its request body (readers check a body rebuilt from
//! a delta against it). An agent's request repeats the previous one's bytes and adds a little
//! near the end, so most of each digest was computed for the body before. BLAKE3 is a tree
//! over 1 KiB chunks whose every node's chaining value depends only on its bytes and its
//! offset: the chaining values of a body's aligned [`BLOCK`]-sized subtrees ([`Blocks`]) are
//! kept with it, and the next body reuses those that lie within the prefix it shares with it
//! (the transcript's delta finds that prefix anyway), hashing only the rest and merging the
//! tree's upper levels ([`blake3::hazmat`]).
//!
//! Invariant: [`digest`] returns `blake3::hash(body)` whatever it is given as the earlier
//! body's blocks and shared prefix, as long as the prefix is really shared.

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

/// Bytes per reusable subtree: 16 chunks (a power of two, so aligned blocks are tree nodes).
pub const BLOCK: usize = 16 * blake3::CHUNK_LEN;

/// The chaining values of a body's whole aligned [`BLOCK`]-sized subtrees, in order (none for
/// a body of one or two blocks, hashed whole).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blocks(Vec<ChainingValue>);

/// `blake3::hash(body)`, and `body`'s [`Blocks`]. `earlier` is an earlier body's blocks with
/// the length of the prefix `body` shares with that body: its blocks inside the prefix are
/// reused, not hashed again.
pub fn digest(body: &[u8], earlier: Option<(&Blocks, usize)>) -> (blake3::Hash, Blocks) {
    if body.len() <= 2 * BLOCK {
        return (blake3::hash(body), Blocks::default());
    }
    let mut walk = Walk {
        body,
        earlier: earlier.map(|(b, prefix)| (b, prefix.min(body.len()))),
        blocks: Vec::with_capacity(body.len() / BLOCK),
    };
    let left = left_subtree_len(body.len() as u64) as usize;
    let l = walk.subtree(0, left);
    let r = walk.subtree(left, body.len() - left);
    debug_assert_eq!(walk.blocks.len(), body.len() / BLOCK);
    (merge_subtrees_root(&l, &r, Mode::Hash), Blocks(walk.blocks))
}

struct Walk<'a> {
    body: &'a [u8],
    earlier: Option<(&'a Blocks, usize)>,
    /// The whole blocks' chaining values so far: the walk goes left to right, and every
    /// aligned whole block is a node of BLAKE3's tree (its subtrees are powers of two).
    blocks: Vec<ChainingValue>,
}

impl Walk<'_> {
    /// The chaining value of the non-root subtree of `len` bytes at `start`.
    fn subtree(&mut self, start: usize, len: usize) -> ChainingValue {
        if len == BLOCK && start.is_multiple_of(BLOCK) {
            let reused = self
                .earlier
                .filter(|&(_, prefix)| start + BLOCK <= prefix)
                .and_then(|(b, _)| b.0.get(start / BLOCK).copied());
            let cv = reused.unwrap_or_else(|| self.hash(start, len));
            self.blocks.push(cv);
            return cv;
        }
        if len <= BLOCK {
            return self.hash(start, len);
        }
        let left = left_subtree_len(len as u64) as usize;
        let l = self.subtree(start, left);
        let r = self.subtree(start + left, len - left);
        merge_subtrees_non_root(&l, &r, Mode::Hash)
    }

    fn hash(&self, start: usize, len: usize) -> ChainingValue {
        let mut h = blake3::Hasher::new();
        h.set_input_offset(start as u64);
        h.update(&self.body[start..start + len]);
        h.finalize_non_root()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 10) as u8)
            .collect()
    }

    #[test]
    fn equals_blake3_for_every_shape() {
        for len in [
            0,
            1,
            1024,
            BLOCK,
            2 * BLOCK,
            2 * BLOCK + 1,
            3 * BLOCK,
            3 * BLOCK + 5,
            4 * BLOCK,
            5 * BLOCK - 1,
            128 * 1024,
            200_001,
            1 << 20,
        ] {
            let b = body(len, 7);
            let (h, blocks) = digest(&b, None);
            assert_eq!(h, blake3::hash(&b), "len {len}");
            if len > 2 * BLOCK {
                assert_eq!(blocks.0.len(), len / BLOCK, "len {len}");
            }
        }
    }

    /// A growing conversation: each body the previous one with text inserted before its last
    /// bytes (as a new message goes before the fields after the message list), with every
    /// shared prefix from none to all; the digest always equals BLAKE3's.
    #[test]
    fn reusing_an_earlier_body_gives_the_same_digest() {
        let mut prev = body(40_000, 1);
        let (_, mut prev_blocks) = digest(&prev, None);
        for step in 0..40 {
            let cut = prev.len() - 37;
            let mut next = prev[..cut].to_vec();
            next.extend(body(1000 + step * 977, step as u8));
            next.extend_from_slice(&prev[cut..]);
            let shared = next.iter().zip(&prev).take_while(|(a, b)| a == b).count();
            for prefix in [0, shared / 3, shared.saturating_sub(BLOCK), shared] {
                let (h, blocks) = digest(&next, Some((&prev_blocks, prefix)));
                assert_eq!(h, blake3::hash(&next), "step {step} prefix {prefix}");
                assert_eq!(blocks, digest(&next, None).1, "step {step}");
            }
            prev_blocks = digest(&next, Some((&prev_blocks, shared))).1;
            prev = next;
        }
    }

    /// Reused blocks are only those inside the claimed prefix: a body that differs right after
    /// it gets its own digest, and a shorter body or a prefix longer than the body is fine.
    #[test]
    fn only_blocks_inside_the_prefix_are_reused() {
        let a = body(10 * BLOCK, 3);
        let (_, blocks) = digest(&a, None);
        let mut b = a.clone();
        b[5 * BLOCK + 1] ^= 0xff;
        assert_eq!(
            digest(&b, Some((&blocks, 5 * BLOCK + 1))).0,
            blake3::hash(&b)
        );
        let short = &a[..4 * BLOCK + 100];
        assert_eq!(
            digest(short, Some((&blocks, a.len()))).0,
            blake3::hash(short)
        );
        assert_eq!(
            digest(&a, Some((&Blocks::default(), a.len()))).0,
            blake3::hash(&a)
        );
    }
}
