//! Where crashes are injected: a seeded draw per task instance (pure).
//!
//! A crash point is a turn (1-based), a moment — during the turn's command (`tool`), while the
//! reply to the request after it is awaited (`llm-wait`), or the instant that request is sent,
//! when the turn-end checkpoint starts (`checkpoint`) — and a kind: every process of the
//! sandbox but its init killed (`processes`), or the whole container (`container`). Distinct
//! points of one instance never share a (turn, moment), and they are ordered by turn, so each
//! fires exactly once while the agent moves forward.

use crate::stack::splitmix;

/// When in a turn a crash hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum When {
    Tool,
    LlmWait,
    Checkpoint,
}

/// What a crash kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Processes,
    Container,
}

impl When {
    pub fn name(self) -> &'static str {
        match self {
            When::Tool => "tool",
            When::LlmWait => "llm-wait",
            When::Checkpoint => "checkpoint",
        }
    }
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Processes => "processes",
            Kind::Container => "container",
        }
    }
}

/// One crash to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashPoint {
    pub turn: usize,
    pub when: When,
    pub kind: Kind,
}

/// `count` crash points for an instance of a task with `turns` tool turns, drawn from
/// (seed, instance); at most one per (turn, moment), sorted by (turn, moment). `llm-wait` and
/// `checkpoint` crashes after the last turn hit the request for the final answer.
pub fn plan(seed: u64, instance: usize, turns: usize, count: usize) -> Vec<CrashPoint> {
    const MOMENTS: [When; 3] = [When::Tool, When::LlmWait, When::Checkpoint];
    let slots = turns * MOMENTS.len();
    let mut state = seed ^ (instance as u64).wrapping_mul(0xA076_1D64_78BD_642F) ^ 0xC4A5;
    let mut chosen: Vec<usize> = Vec::new();
    while chosen.len() < count.min(slots) {
        let s = (splitmix(&mut state) % slots as u64) as usize;
        if !chosen.contains(&s) {
            chosen.push(s);
        }
    }
    let mut points: Vec<CrashPoint> = chosen
        .into_iter()
        .map(|s| CrashPoint {
            turn: s / MOMENTS.len() + 1,
            when: MOMENTS[s % MOMENTS.len()],
            kind: if splitmix(&mut state).is_multiple_of(2) {
                Kind::Processes
            } else {
                Kind::Container
            },
        })
        .collect();
    points.sort_by_key(|p| (p.turn, p.when));
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_seeded_distinct_sorted_and_in_range() {
        let a = plan(7, 3, 6, 4);
        assert_eq!(a, plan(7, 3, 6, 4));
        assert_ne!(a, plan(7, 4, 6, 4));
        assert_eq!(a.len(), 4);
        assert!(
            a.windows(2)
                .all(|w| (w[0].turn, w[0].when) < (w[1].turn, w[1].when))
        );
        assert!(a.iter().all(|p| (1..=6).contains(&p.turn)));
        // Never more than the slots there are.
        assert_eq!(plan(1, 0, 1, 10).len(), 3);
        assert!(plan(1, 0, 5, 0).is_empty());
        // Both kinds and all moments show up over many instances.
        let all: Vec<CrashPoint> = (0..50).flat_map(|i| plan(1, i, 8, 1)).collect();
        assert!(all.iter().any(|p| p.kind == Kind::Processes));
        assert!(all.iter().any(|p| p.kind == Kind::Container));
        for w in [When::Tool, When::LlmWait, When::Checkpoint] {
            assert!(all.iter().any(|p| p.when == w), "{w:?}");
        }
    }
}
