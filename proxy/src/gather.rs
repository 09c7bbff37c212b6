//! [`Gather`]: an `http_body::Body` wrapper that hands on together the frames its inner body
//! already has, so the connection writing them makes one `write` for them instead of one each.
//!
//! Why: the upstream connection's task decodes the chunks of a stream from what it read and
//! passes them to the response body one at a time (hyper's body channel holds one frame). The
//! frames of an LLM stream often arrive in one read (several SSE events in one TCP segment);
//! forwarding each as soon as it is taken costs a `send` per frame, plus a wake-up of the
//! reader on the other side each time. A reverse proxy like nginx writes whatever it has read
//! in one go; this does the same.
//!
//! The data frames handed on together are handed on as one frame (their bytes concatenated, a
//! copy of a few KB): the tap behind it analyses and records them in one call, and the
//! connection encodes one chunk instead of one per frame. Chunk boundaries carry no meaning in
//! HTTP; the bytes and their order are unchanged.
//!
//! How: after taking a frame, the wrapper yields (wakes itself, answers pending), which lets
//! the producing task run and pass on its next frame if it has one; it keeps taking frames this
//! way while they come, and answers with the held frames, in order (data frames merged), once
//! the inner body was pending on [`QUIET_POLLS`] polls in a row or ended, or [`MAX_HELD_FRAMES`] /
//! [`MAX_HELD_BYTES`] are held. It never waits for data that has not arrived: a frame that is
//! alone is handed on after two passes of the event loop (microseconds, no timer), so streams
//! are still forwarded chunk by chunk as their chunks arrive.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

/// Frames held at most before they are handed on.
pub const MAX_HELD_FRAMES: usize = 32;
/// Data bytes held at most before they are handed on.
pub const MAX_HELD_BYTES: usize = 64 * 1024;
/// Data bytes a reply held at the response gate takes from the upstream at most (beyond them
/// the upstream waits for the release).
pub const MAX_GATED_BYTES: usize = 1 << 20;
/// Polls in a row that must find the inner body pending before held frames are handed on.
/// Two, because a writer may poll again within the same run of its task (hyper's connection
/// re-checks a pending body once after a flush), before the producer had its turn; the second
/// pending answer comes from a later run, after the producer's.
const QUIET_POLLS: u8 = 2;

pin_project_lite::pin_project! {
    /// See the module documentation.
    pub struct Gather<B: Body> {
        #[pin]
        inner: B,
        held: VecDeque<Frame<B::Data>>,
        held_bytes: usize,
        // Handing on the held frames (set when the inner body has nothing more right now).
        releasing: bool,
        // Polls in a row that found the inner body pending while frames were held.
        quiet: u8,
        // How the inner body ended (`Some(None)`: normally), returned after the held frames.
        end: Option<Option<B::Error>>,
    }
}

impl<B: Body> Gather<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            held: VecDeque::new(),
            held_bytes: 0,
            releasing: false,
            quiet: 0,
            end: None,
        }
    }

    /// Takes the frames the inner body already has, the way [`Body::poll_frame`] does, and
    /// stops before handing any on: ready when the held frames are to be handed on (or the
    /// inner body ended). With nothing held and the inner body pending, waits for a frame if
    /// `wait_for_first`, else is ready at once.
    fn poll_gather(self: Pin<&mut Self>, cx: &mut Context<'_>, wait_for_first: bool) -> Poll<()> {
        let mut this = self.project();
        if *this.releasing || this.end.is_some() {
            return Poll::Ready(());
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                *this.quiet = 0;
                hold(this.held, this.held_bytes, f);
                // The last frame (e.g. of a body of known length) or enough held: nothing to
                // wait for.
                if this.inner.is_end_stream()
                    || this.held.len() >= MAX_HELD_FRAMES
                    || *this.held_bytes >= MAX_HELD_BYTES
                {
                    *this.releasing = true;
                    return Poll::Ready(());
                }
                // Let the producer pass on what it already has, then look again.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(Some(Err(e))) => {
                *this.end = Some(Some(e));
                *this.releasing = true;
                Poll::Ready(())
            }
            Poll::Ready(None) => {
                *this.end = Some(None);
                *this.releasing = true;
                Poll::Ready(())
            }
            Poll::Pending if this.held.is_empty() => {
                if wait_for_first {
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            }
            Poll::Pending => {
                *this.quiet += 1;
                if *this.quiet < QUIET_POLLS {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                *this.releasing = true;
                Poll::Ready(())
            }
        }
    }

    /// Takes the frames the inner body already has (none if it has none right now: this never
    /// waits for data that has not arrived), to be handed on with the first poll. A proxy calls
    /// it before it returns the response head, so the head leaves with the first chunks when
    /// they came together.
    pub async fn fill(mut self: Pin<&mut Self>) {
        std::future::poll_fn(|cx| self.as_mut().poll_gather(cx, false)).await
    }

    /// Takes every frame the inner body has or sends until it ends (`true`; also when it
    /// failed) or `limit` data bytes are held (`false`), to be handed on first, in order. For
    /// a reply held at the response gate: the upstream is not slowed by the hold, and the
    /// hold sees when the reply was complete.
    pub async fn take_all(mut self: Pin<&mut Self>, limit: usize) -> bool {
        std::future::poll_fn(|cx| self.as_mut().poll_take_all(cx, limit)).await
    }

    fn poll_take_all(self: Pin<&mut Self>, cx: &mut Context<'_>, limit: usize) -> Poll<bool> {
        let mut this = self.project();
        loop {
            if this.end.is_some() || *this.held_bytes >= limit {
                *this.releasing = true;
                return Poll::Ready(this.end.is_some());
            }
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => hold(this.held, this.held_bytes, f),
                Poll::Ready(Some(Err(e))) => *this.end = Some(Some(e)),
                Poll::Ready(None) => *this.end = Some(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Appends `f` to the held frames, counting its data bytes.
fn hold<D: Buf>(held: &mut VecDeque<Frame<D>>, held_bytes: &mut usize, f: Frame<D>) {
    if let Some(d) = f.data_ref() {
        *held_bytes += d.remaining();
    }
    held.push_back(f);
}

impl<B: Body<Data = Bytes>> Gather<B> {
    /// The next frame to hand on: the held data frames at the front as one frame, or a
    /// trailers frame.
    fn next_held(
        held: &mut VecDeque<Frame<Bytes>>,
        held_bytes: &mut usize,
    ) -> Option<Frame<Bytes>> {
        let first = match held.pop_front()?.into_data() {
            Ok(first) => first,
            Err(trailers) => return Some(trailers),
        };
        let run = held.iter().take_while(|f| f.is_data()).count();
        let data = if run == 0 {
            first
        } else {
            let len = first.len()
                + held
                    .iter()
                    .take(run)
                    .filter_map(Frame::data_ref)
                    .map(Bytes::len)
                    .sum::<usize>();
            let mut merged = BytesMut::with_capacity(len);
            merged.put(first);
            for f in held.drain(..run) {
                if let Ok(d) = f.into_data() {
                    merged.put(d);
                }
            }
            merged.freeze()
        };
        *held_bytes -= data.len();
        Some(Frame::data(data))
    }
}

impl<B: Body<Data = Bytes>> Body for Gather<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        loop {
            let this = self.as_mut().project();
            if *this.releasing {
                if let Some(f) = Self::next_held(this.held, this.held_bytes) {
                    return Poll::Ready(Some(Ok(f)));
                }
                *this.releasing = false;
            }
            match this.end.take() {
                Some(None) => {
                    // Ended: keep answering so if polled again.
                    *this.end = Some(None);
                    return Poll::Ready(None);
                }
                Some(Some(e)) => return Poll::Ready(Some(Err(e))),
                None => {}
            }
            ready!(self.as_mut().poll_gather(cx, true));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty()
            && match &self.end {
                Some(None) => true,
                Some(Some(_)) => false,
                None => self.inner.is_end_stream(),
            }
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.held_bytes as u64;
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(held));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(held));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    /// A scripted body: each step is a frame, an error, or "pending" (which wakes at once).
    struct Script {
        steps: VecDeque<Step>,
    }

    enum Step {
        Data(&'static str),
        Trailers,
        Pending,
        Fail,
    }

    impl Body for Script {
        type Data = Bytes;
        type Error = &'static str;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
            match self.steps.pop_front() {
                None => Poll::Ready(None),
                Some(Step::Data(s)) => Poll::Ready(Some(Ok(Frame::data(Bytes::from(s))))),
                Some(Step::Trailers) => {
                    Poll::Ready(Some(Ok(Frame::trailers(http::HeaderMap::new()))))
                }
                Some(Step::Fail) => Poll::Ready(Some(Err("cut"))),
                Some(Step::Pending) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
            }
        }
    }

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Polls like a connection writing the body: frames until pending; each run of ready
    /// frames is one "write". Returns the writes.
    fn writes(steps: Vec<Step>) -> (Vec<Vec<String>>, Option<&'static str>) {
        let waker_state = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(waker_state.clone());
        let mut cx = Context::from_waker(&waker);
        let mut body = Box::pin(Gather::new(Script {
            steps: steps.into(),
        }));
        let mut out = Vec::new();
        let mut batch = Vec::new();
        for _ in 0..1000 {
            match body.as_mut().poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(f))) => batch.push(match f.into_data() {
                    Ok(d) => String::from_utf8(d.to_vec()).unwrap(),
                    Err(_) => "<trailers>".to_owned(),
                }),
                Poll::Ready(Some(Err(e))) => {
                    if !batch.is_empty() {
                        out.push(std::mem::take(&mut batch));
                    }
                    return (out, Some(e));
                }
                Poll::Ready(None) => {
                    if !batch.is_empty() {
                        out.push(batch);
                    }
                    assert!(body.is_end_stream());
                    return (out, None);
                }
                Poll::Pending => {
                    // Every pending answer was woken (nothing is left hanging).
                    assert!(waker_state.0.swap(0, Ordering::Relaxed) > 0);
                    if !batch.is_empty() {
                        out.push(std::mem::take(&mut batch));
                    }
                }
            }
        }
        panic!("the body never ended");
    }

    #[test]
    fn frames_ready_together_are_handed_on_together() {
        use Step::*;
        let (w, err) = writes(vec![
            Data("a"),
            Data("b"),
            Data("c"),
            Pending,
            Pending,
            Data("d"),
        ]);
        assert_eq!(w, vec![vec!["abc"], vec!["d"]]);
        assert_eq!(err, None);
    }

    /// Data frames are merged up to a trailers frame, which is handed on as it is.
    #[test]
    fn trailers_are_not_merged() {
        use Step::*;
        let (w, _) = writes(vec![Data("a"), Data("b"), Trailers]);
        assert_eq!(w, vec![vec!["ab", "<trailers>"]]);
    }

    #[test]
    fn a_writer_polling_again_before_the_producer_ran_does_not_split_a_batch() {
        use Step::*;
        // Each single `Pending` is a writer's second poll within the same run of its task.
        let (w, _) = writes(vec![Data("a"), Pending, Data("b"), Pending, Data("c")]);
        assert_eq!(w, vec![vec!["abc"]]);
    }

    #[test]
    fn a_lone_frame_is_not_held_for_more() {
        use Step::*;
        let (w, _) = writes(vec![
            Data("a"),
            Pending,
            Pending,
            Data("b"),
            Pending,
            Pending,
            Data("c"),
        ]);
        assert_eq!(w, vec![vec!["a"], vec!["b"], vec!["c"]]);
    }

    #[test]
    fn an_error_comes_after_the_frames_before_it() {
        use Step::*;
        let (w, err) = writes(vec![Data("a"), Data("b"), Fail, Data("never")]);
        assert_eq!(w, vec![vec!["ab"]]);
        assert_eq!(err, Some("cut"));
    }

    #[test]
    fn at_most_max_held_frames_are_held() {
        let steps = (0..MAX_HELD_FRAMES + 5).map(|_| Step::Data("x")).collect();
        let (w, _) = writes(steps);
        let sizes: Vec<Vec<usize>> = w
            .iter()
            .map(|r| r.iter().map(String::len).collect())
            .collect();
        assert_eq!(sizes, vec![vec![MAX_HELD_FRAMES], vec![5]]);
    }

    #[test]
    fn the_last_frame_of_a_body_is_handed_on_without_a_yield() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut body = Box::pin(Gather::new(http_body_util::Full::new(Bytes::from("all"))));
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(f))) => assert_eq!(f.into_data().unwrap(), "all"),
            _ => panic!("the whole body was there: expected it at once"),
        }
        assert!(body.is_end_stream());
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(None)
        ));
    }

    #[tokio::test]
    async fn fill_takes_what_is_there_and_never_waits_for_more() {
        use Step::*;
        // Nothing there yet: the head is not held back.
        let mut empty = Gather::new(Script {
            steps: vec![Pending, Data("late")].into(),
        });
        Pin::new(&mut empty).fill().await;
        assert!(empty.held.is_empty());
        // Two frames there: both held, handed on first, in order, then the rest.
        let mut two = Gather::new(Script {
            steps: vec![Data("a"), Data("b"), Pending, Pending, Data("c")].into(),
        });
        Pin::new(&mut two).fill().await;
        assert_eq!(two.held.len(), 2);
        let all = two.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"abc");
    }

    #[tokio::test]
    async fn take_all_holds_the_reply_to_its_end_or_the_limit() {
        use Step::*;
        // To the end, across pending polls: everything held, handed on first, in order.
        let mut whole = Gather::new(Script {
            steps: vec![Data("a"), Pending, Data("b"), Trailers].into(),
        });
        assert!(Pin::new(&mut whole).take_all(1 << 20).await, "ended");
        assert_eq!(whole.held.len(), 3);
        let all = whole.collect().await.unwrap();
        assert!(all.trailers().is_some());
        assert_eq!(&all.to_bytes()[..], b"ab");
        // The limit: taking stops once it is held; the rest follows after.
        let mut big = Gather::new(Script {
            steps: vec![Data("ab"), Data("cd"), Data("ef")].into(),
        });
        assert!(!Pin::new(&mut big).take_all(3).await, "limit");
        assert_eq!(big.held_bytes, 4);
        assert_eq!(&big.collect().await.unwrap().to_bytes()[..], b"abcdef");
        // An error ends the taking and comes after the frames before it.
        let mut cut = Gather::new(Script {
            steps: vec![Data("a"), Fail].into(),
        });
        assert!(Pin::new(&mut cut).take_all(1 << 20).await);
        let mut cut = Box::pin(cut);
        let first = std::future::poll_fn(|cx| cut.as_mut().poll_frame(cx)).await;
        assert_eq!(first.unwrap().unwrap().into_data().unwrap(), "a");
        let err = std::future::poll_fn(|cx| cut.as_mut().poll_frame(cx)).await;
        assert_eq!(err.unwrap().unwrap_err(), "cut");
    }

    #[tokio::test]
    async fn bytes_and_order_are_unchanged() {
        use Step::*;
        let body = Gather::new(Script {
            steps: vec![Data("he"), Pending, Data("ll"), Data("o")].into(),
        });
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"hello");
    }
}

#[cfg(test)]
mod wire_tests {
    use super::*;
    use bytes::Bytes;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The proxy's upstream client on a single-threaded runtime (like a proxy worker), reading
    /// a chunked response whose first four chunks arrive in one segment: the gathered body
    /// hands them on in one run of ready frames to a consumer task, and the chunk sent later
    /// on its own.
    #[tokio::test(flavor = "current_thread")]
    async fn chunks_read_together_come_out_together() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await.unwrap();
            let mut out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            for c in ["a", "bb", "ccc", "dddd"] {
                out.extend_from_slice(format!("{:x}\r\n{c}\r\n", c.len()).as_bytes());
            }
            s.write_all(&out).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            s.write_all(b"1\r\ne\r\n0\r\n\r\n").await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        });
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config::for_upstream("http://127.0.0.1:1", dir.path()).unwrap();
        let client =
            crate::forward::build_client(&config, crate::tls::client_config(None).unwrap());
        let req = http::Request::get(format!("http://{addr}/"))
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        // The consumer is a spawned task, like a server connection writing the body.
        tokio::spawn(async move {
            let mut body = std::pin::pin!(Gather::new(resp.into_body()));
            let mut runs: Vec<Vec<String>> = Vec::new();
            let mut run = Vec::new();
            loop {
                let polled = std::future::poll_fn(|cx| match body.as_mut().poll_frame(cx) {
                    Poll::Pending if !run.is_empty() => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(x) => Poll::Ready(Some(x)),
                })
                .await;
                match polled {
                    None => runs.push(std::mem::take(&mut run)),
                    Some(None) => break,
                    Some(Some(f)) => run
                        .push(String::from_utf8(f.unwrap().into_data().unwrap().to_vec()).unwrap()),
                }
            }
            if !run.is_empty() {
                runs.push(run);
            }
            assert_eq!(runs, vec![vec!["abbcccdddd"], vec!["e"]]);
        })
        .await
        .unwrap();
    }
}
