//! Request bodies recorded as a difference from an earlier one (pure).
//!
//! An agent sends its whole conversation with every request, so a sandbox's consecutive
//! requests share almost all their bytes: the new request is the previous one with a few
//! messages added before the fields that follow the message list. Recording every body whole
//! makes a transcript grow with the square of the conversation's length (a 100-step session of
//! 100 KB requests writes 10 MB) and rotates a long session's early turns away. A body is
//! therefore recorded, when that saves enough, as a [`Delta`]: an earlier body of the same file
//! (its record id), how many bytes of that base it starts with, how many it ends with, and the
//! text in between. A Codex session's requests shrink to the ~500 bytes each step adds.
//!
//! Invariants: [`apply`] rebuilds exactly the body [`choose`] was given, or returns None (a
//! delta that does not fit its base); the cuts fall on character boundaries of the body
//! (which is JSON, so UTF-8: a byte starts a character unless it is `10xxxxxx`).

use llm_protocol::common_prefix;
use serde::{Deserialize, Serialize};

/// How many earlier bodies of a file a new body is compared with (a main-loop request often
/// follows a side call — a title, a token count — and continues the body before it).
pub const BASES: usize = 4;

/// A delta is used only when it saves at least this many bytes over the whole body.
const MIN_SAVING: usize = 256;

/// Whether a body of `len` bytes can take part in a delta: a shorter one can neither save
/// [`MIN_SAVING`] bytes nor share that many with a later body, so the writer neither compares
/// nor keeps it, and readers need not keep it either.
pub fn worth_a_delta(len: usize) -> bool {
    len >= MIN_SAVING
}

/// A body as the bytes of an earlier body (`base`, a record id of the same file) around new
/// text: `base[..prefix] + text + base[base.len() - suffix..]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub base: u64,
    pub prefix: u64,
    pub suffix: u64,
    pub text: String,
}

/// The best delta of `body` (UTF-8) against the `bases` (record id, body), newest last, if
/// one saves [`MIN_SAVING`] bytes: (base id, prefix length, suffix length), the cuts on
/// character boundaries of `body`. The newest base is tried first; a base that leaves
/// nothing in between ends the search.
pub fn choose<'a>(
    bases: impl DoubleEndedIterator<Item = (u64, &'a [u8])>,
    body: &[u8],
) -> Option<(u64, usize, usize)> {
    if !worth_a_delta(body.len()) {
        return None;
    }
    let mut best: Option<(u64, usize, usize)> = None;
    for (id, base) in bases.rev() {
        let (prefix, suffix) = split(base, body);
        if best.is_none_or(|(_, p, s)| prefix + suffix > p + s) {
            best = Some((id, prefix, suffix));
        }
        if prefix + suffix == body.len() {
            break;
        }
    }
    best.filter(|&(_, prefix, suffix)| prefix + suffix >= MIN_SAVING)
}

/// Whether `at` is a character boundary of the UTF-8 text `text`.
fn boundary(text: &[u8], at: usize) -> bool {
    text.get(at).is_none_or(|&b| b & 0xc0 != 0x80)
}

/// The bytes `body` shares with the start and (after that) the end of `base`, cut back to
/// character boundaries of `body`.
fn split(base: &[u8], body: &[u8]) -> (usize, usize) {
    let mut prefix = common_prefix(base, body);
    while !boundary(body, prefix) {
        prefix -= 1;
    }
    let mut end = body.len() - common_suffix(&base[prefix..], &body[prefix..]);
    while !boundary(body, end) {
        end += 1;
    }
    (prefix, body.len() - end)
}

/// Rebuilds a body from its base; None if the delta does not fit the base.
pub fn apply(base: &[u8], d: &Delta) -> Option<Vec<u8>> {
    let prefix = usize::try_from(d.prefix).ok()?;
    let suffix = usize::try_from(d.suffix).ok()?;
    if prefix.checked_add(suffix)? > base.len() {
        return None;
    }
    let mut out = Vec::with_capacity(prefix + d.text.len() + suffix);
    out.extend_from_slice(&base[..prefix]);
    out.extend_from_slice(d.text.as_bytes());
    out.extend_from_slice(&base[base.len() - suffix..]);
    Some(out)
}

/// Length of the common suffix (the slices are aligned at their ends).
fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 4096;
    let n = a.len().min(b.len());
    let (a, b) = (&a[a.len() - n..], &b[b.len() - n..]);
    let mut k = 0;
    while k + BLOCK <= n && a[n - k - BLOCK..n - k] == b[n - k - BLOCK..n - k] {
        k += BLOCK;
    }
    k + a[..n - k]
        .iter()
        .rev()
        .zip(b[..n - k].iter().rev())
        .take_while(|(x, y)| x == y)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta_of(bases: &[(u64, &str)], body: &str) -> Option<Delta> {
        let (base, prefix, suffix) = choose(
            bases.iter().map(|(id, b)| (*id, b.as_bytes())),
            body.as_bytes(),
        )?;
        Some(Delta {
            base,
            prefix: prefix as u64,
            suffix: suffix as u64,
            text: body[prefix..body.len() - suffix].to_owned(),
        })
    }

    fn rebuilt(bases: &[(u64, &str)], d: &Delta) -> Vec<u8> {
        let base = bases.iter().find(|(id, _)| *id == d.base).unwrap().1;
        apply(base.as_bytes(), d).unwrap()
    }

    /// The recorded agent sessions: every request is rebuilt exactly from the ones before
    /// it, and the growing conversations cost a small part of their bytes (these sessions
    /// are 3 to 12 requests long; the saving grows with the session).
    #[test]
    fn recorded_sessions_rebuild_exactly_and_shrink() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("llm-protocol/tests/fixtures");
        let (mut all_whole, mut all_recorded) = (0, 0);
        for agent in ["codex", "claude-code", "aider", "mini-swe-agent"] {
            let mut names: Vec<_> = std::fs::read_dir(dir.join(agent))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.ends_with("request.json"))
                .collect();
            names.sort();
            let bodies: Vec<String> = names
                .iter()
                .map(|n| std::fs::read_to_string(dir.join(agent).join(n)).unwrap())
                .collect();
            let (mut whole, mut recorded) = (0, 0);
            for (i, body) in bodies.iter().enumerate() {
                let bases: Vec<(u64, &str)> = (i.saturating_sub(BASES)..i)
                    .map(|j| (j as u64, bodies[j].as_str()))
                    .collect();
                whole += body.len();
                match delta_of(&bases, body) {
                    Some(d) => {
                        assert_eq!(rebuilt(&bases, &d), body.as_bytes(), "{agent} {}", names[i]);
                        recorded += d.text.len();
                    }
                    None => recorded += body.len(),
                }
            }
            assert!(recorded < whole, "{agent}: {recorded} of {whole} bytes");
            if agent == "codex" {
                // Five requests of one conversation: the first whole, then what each adds.
                assert!(recorded * 4 < whole, "{agent}: {recorded} of {whole} bytes");
            }
            all_whole += whole;
            all_recorded += recorded;
        }
        assert!(
            all_recorded * 3 < all_whole,
            "{all_recorded} of {all_whole} bytes"
        );
    }

    #[test]
    fn cuts_fall_on_character_boundaries() {
        // The bodies differ inside a multi-byte character ("é" is C3 A9, "è" is C3 A8).
        let pad = "x".repeat(600);
        let base = format!("{pad}\"caf\u{e9}\"{pad}");
        let body = format!("{pad}\"caf\u{e8}\"{pad}");
        let d = delta_of(&[(7, &base)], &body).unwrap();
        assert_eq!(d.text, "\u{e8}");
        assert_eq!(rebuilt(&[(7, &base)], &d), body.as_bytes());
        // Shared bytes overlap when the body repeats the base: the cuts never cross.
        let base = "ab".repeat(400);
        let body = "ab".repeat(401);
        let d = delta_of(&[(1, &base)], &body).unwrap();
        assert_eq!(d.prefix + d.suffix + d.text.len() as u64, body.len() as u64);
        assert_eq!(rebuilt(&[(1, &base)], &d), body.as_bytes());
    }

    #[test]
    fn the_closest_base_wins_and_small_savings_are_not_taken() {
        let conv = format!("{{\"messages\":[{}]}}", "\"m\",".repeat(300));
        let longer = format!("{{\"messages\":[{}\"n\"]}}", "\"m\",".repeat(300));
        let side = "{\"messages\":[\"title?\"]}";
        let d = delta_of(&[(1, &conv), (2, side)], &longer).unwrap();
        assert_eq!((d.base, d.text.as_str()), (1, "\"n\""));
        assert_eq!(delta_of(&[(2, side)], &longer), None);
        assert_eq!(delta_of(&[], &longer), None);
        assert_eq!(delta_of(&[(1, &conv)], "{}"), None);
    }

    #[test]
    fn a_delta_that_does_not_fit_its_base_is_refused() {
        let d = Delta {
            base: 1,
            prefix: 10,
            suffix: 10,
            text: "x".into(),
        };
        assert_eq!(apply(b"short", &d), None);
        let huge = Delta {
            prefix: u64::MAX,
            ..d
        };
        assert_eq!(apply(b"short", &huge), None);
        assert_eq!(
            apply(
                b"0123456789abcdefghij",
                &Delta {
                    text: "-".into(),
                    ..d
                }
            ),
            Some(b"0123456789-abcdefghij".to_vec())
        );
    }

    #[test]
    fn block_and_byte_comparisons_agree() {
        for (n, at) in [
            (0, 0),
            (10, 3),
            (4096, 4095),
            (9000, 4096),
            (9000, 8191),
            (9000, 8999),
        ] {
            let a = vec![b'a'; n];
            let mut b = a.clone();
            if n > 0 {
                b[at] = b'b';
            }
            let expect = if n > 0 { at } else { 0 };
            assert_eq!(common_prefix(&a, &b), expect, "{n} {at}");
            let back = if n > 0 { n - 1 - at } else { 0 };
            assert_eq!(common_suffix(&a, &b), back, "{n} {at}");
        }
        assert_eq!(common_prefix(b"abc", b"abcdef"), 3);
        assert_eq!(common_suffix(b"xyz", b"xyz"), 3);
    }
}
