//! Property-style checks of the turn tracker on the Claude Code fixture: side calls
//! (probe, title, count_tokens, helper, sub-agent, compaction) placed at random times within
//! their causal windows, overlapping the main loop's requests and replies, never change the
//! main loop's turns.

use std::path::Path;

use llm_protocol::{
    ApiKind, RequestClass, RequestSummary, ResponseSummary, StreamEnd, TurnTracker,
    summarize_request,
};

fn load(file: &str, api: ApiKind) -> RequestSummary {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/claude-code")
        .join(file);
    summarize_request(api, &std::fs::read(&path).unwrap()).unwrap()
}

fn ok() -> ResponseSummary {
    ResponseSummary {
        status: 200,
        model: None,
        response_id: None,
        tool_calls: vec![],
        finish_reason: Some("end_turn".into()),
        usage: None,
        in_band_error: None,
        end: StreamEnd::Completed,
        content_seen: true,
        analysis_error: None,
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    // Ends sort before starts at the same instant (a reply ends, then the next request).
    End(usize),
    Start(usize),
}

#[test]
fn side_calls_at_random_times_never_change_main_turns() {
    let msg = ApiKind::AnthropicMessages;
    let mains = [
        load("07-r1-request.json", msg),
        load("11-r2-request.json", msg),
        load("17-r3-request.json", msg),
        load("19-r4-request.json", msg),
    ];
    // Main step i: request at 1000*i + 100, reply ends at 1000*i + 600.
    let main_start = |i: usize| 1000 * i as u64 + 100;
    let main_end = |i: usize| 1000 * i as u64 + 600;
    // (request, earliest start, latest start): causal windows.
    let sides: Vec<(RequestSummary, u64, u64)> = vec![
        (load("01-q1-request.json", msg), 0, 4000),
        (load("03-t1-request.json", msg), 0, 4000),
        (
            load("05-c1-request.json", ApiKind::AnthropicCountTokens),
            0,
            4000,
        ),
        (
            load("09-b1-request.json", msg),
            main_end(0),
            main_start(1) + 300,
        ),
        (load("13-sa1-request.json", msg), main_end(1), main_start(2)),
        (load("15-sa2-request.json", msg), main_end(1), main_start(2)),
        (load("21-k1-request.json", msg), main_end(3), 4000),
    ];
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for trial in 0..500 {
        // All requests: mains first (ids 0..4), then sides; each with start and end.
        let mut reqs: Vec<(&RequestSummary, u64, u64)> = Vec::new();
        for (i, m) in mains.iter().enumerate() {
            reqs.push((m, main_start(i), main_end(i)));
        }
        for (s, lo, hi) in &sides {
            let start = rng.range(*lo, *hi);
            // Sub-agent steps are sequential inside their window: keep them causal.
            reqs.push((s, start, start + rng.range(1, 900)));
        }
        // sa2 continues sa1: it starts after sa1 ended.
        let (sa1, sa2) = (4 + 4, 4 + 5);
        if reqs[sa2].1 < reqs[sa1].2 {
            let d = reqs[sa2].2 - reqs[sa2].1;
            reqs[sa2].1 = reqs[sa1].2;
            reqs[sa2].2 = reqs[sa2].1 + d;
        }
        let mut events: Vec<(u64, Ev)> = Vec::new();
        for (i, (_, s, e)) in reqs.iter().enumerate() {
            events.push((*s, Ev::Start(i)));
            events.push((*e, Ev::End(i)));
        }
        events.sort();
        let mut t = TurnTracker::new();
        let mut ids = vec![None; reqs.len()];
        for (at, ev) in events {
            match ev {
                Ev::Start(i) => {
                    let d = t.on_request("sb", reqs[i].0, at);
                    if i < 4 {
                        assert_eq!(
                            (d.class, d.turn),
                            (RequestClass::MainLoop, Some(i as u64 + 1)),
                            "trial {trial}: main {i}"
                        );
                    } else {
                        assert!(
                            matches!(d.class, RequestClass::SideCall(_)),
                            "trial {trial}: side {i} classified {:?}",
                            d.class
                        );
                    }
                    ids[i] = Some(d.request_id);
                }
                Ev::End(i) => {
                    if let Some(id) = ids[i] {
                        t.on_response_end("sb", id, &ok(), None, at);
                    }
                }
            }
        }
        let turns = t.turns("sb");
        assert_eq!(turns.len(), 4, "trial {trial}");
        for (i, turn) in turns.iter().enumerate() {
            assert_eq!(turn.llm_wait.start, main_start(i), "trial {trial}");
            assert_eq!(turn.llm_wait.end, Some(main_end(i)), "trial {trial}");
            assert_eq!(turn.retries, 0, "trial {trial}");
        }
    }
}
