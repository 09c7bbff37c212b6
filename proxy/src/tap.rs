//! [`TapBody`]: an `http_body::Body` wrapper that forwards every frame of an inner body as it
//! arrives and hands a *copy* of each data frame to a [`Tap`] after the frame has been passed
//! on, then reports exactly once how the body ended ([`BodyEnd`]).
//!
//! It also enforces an idle timeout between frames (never a total cap): a stream that goes
//! silent for longer than the idle timeout is ended with [`BodyEnd::IdleTimeout`] and an error,
//! so the client sees a cut stream rather than hanging forever.
//!
//! Cost per frame: one `Bytes` clone (a reference-count increment) and one clock read. The copy
//! of frame *n* is handed to the tap when frame *n+1* is requested (or at the end), i.e. after
//! the forwarding path has taken frame *n*. The idle timer is not re-armed per frame (a timer
//! wheel update each time): a frame only records when it arrived, and a timer that fires
//! before the stream was really silent for the idle timeout is moved to the right deadline.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// How a tapped body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyEnd {
    /// The inner body ended normally.
    Completed,
    /// The inner body failed (e.g. the upstream connection was closed mid-stream).
    Cut,
    /// The inner body was silent for longer than the idle timeout.
    IdleTimeout,
    /// The body was dropped before it ended: the client went away.
    ClientCancelled,
}

/// Receives copies of a body's data frames and its end.
pub trait Tap: Send + 'static {
    /// A data frame that was forwarded; `at` is when it arrived from the inner body.
    fn on_data(&mut self, chunk: Bytes, at: Instant);
    /// Called exactly once, after the last `on_data`.
    fn on_end(&mut self, end: BodyEnd, at: Instant);
}

/// Errors a [`TapBody`] yields.
#[derive(Debug, thiserror::Error)]
pub enum TapBodyError {
    /// The inner body failed.
    #[error("upstream body failed: {source}")]
    Inner {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The inner body was idle too long.
    #[error("upstream body idle for more than {idle:?}")]
    Idle { idle: Duration },
}

pin_project_lite::pin_project! {
    /// See the module documentation.
    pub struct TapBody<B: Body, T: Tap> {
        #[pin]
        inner: B,
        tap: T,
        pending: Option<(Bytes, Instant)>,
        idle: Option<(Pin<Box<Sleep>>, Duration)>,
        // When the last frame arrived (or `start`): the idle deadline is this plus the timeout.
        last_frame: Instant,
        ended: bool,
    }

    impl<B: Body, T: Tap> PinnedDrop for TapBody<B, T> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.ended {
                *this.ended = true;
                let end = if this.inner.is_end_stream() {
                    BodyEnd::Completed
                } else {
                    BodyEnd::ClientCancelled
                };
                let now = Instant::now();
                if let Some((chunk, at)) = this.pending.take() {
                    this.tap.on_data(chunk, at);
                }
                this.tap.on_end(end, now);
            }
        }
    }
}

impl<B: Body, T: Tap> TapBody<B, T> {
    /// Wraps `inner`; `idle_timeout` (if any) limits the silence between frames, counted from
    /// `start` (usually the moment the response head arrived).
    pub fn new(inner: B, tap: T, idle_timeout: Option<Duration>, start: Instant) -> Self {
        Self {
            inner,
            tap,
            pending: None,
            idle: idle_timeout.map(|d| (Box::pin(tokio::time::sleep_until(start + d)), d)),
            last_frame: start,
            ended: false,
        }
    }
}

impl<B, T> Body for TapBody<B, T>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T: Tap,
{
    type Data = Bytes;
    type Error = TapBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, TapBodyError>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        // The previous frame has been taken by the forwarding path: analyse its copy now.
        if let Some((chunk, at)) = this.pending.take() {
            this.tap.on_data(chunk, at);
        }
        let polled = this.inner.poll_frame(cx);
        let now;
        let result = match polled {
            Poll::Pending => {
                if let Some((sleep, d)) = this.idle.as_mut() {
                    let d = *d;
                    loop {
                        ready!(sleep.as_mut().poll(cx));
                        // The timer was armed for an earlier frame: silent for less than the
                        // timeout so far, so wait for the real deadline.
                        let deadline = *this.last_frame + d;
                        if Instant::now() < deadline {
                            sleep.as_mut().reset(deadline);
                            continue;
                        }
                        break;
                    }
                    *this.ended = true;
                    this.tap.on_end(BodyEnd::IdleTimeout, Instant::now());
                    return Poll::Ready(Some(Err(TapBodyError::Idle { idle: d })));
                }
                return Poll::Pending;
            }
            Poll::Ready(r) => {
                now = Instant::now();
                r
            }
        };
        match result {
            Some(Ok(frame)) => {
                *this.last_frame = now;
                if let Some(data) = frame.data_ref() {
                    *this.pending = Some((data.clone(), now));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                *this.ended = true;
                this.tap.on_end(BodyEnd::Cut, now);
                Poll::Ready(Some(Err(TapBodyError::Inner { source: e.into() })))
            }
            None => {
                *this.ended = true;
                this.tap.on_end(BodyEnd::Completed, now);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::Arc;

    #[derive(Default)]
    struct Seen {
        chunks: Vec<Bytes>,
        end: Option<BodyEnd>,
        ends: u32,
    }

    struct Rec(Arc<parking_lot::Mutex<Seen>>);
    impl Tap for Rec {
        fn on_data(&mut self, chunk: Bytes, _at: Instant) {
            self.0.lock().chunks.push(chunk);
        }
        fn on_end(&mut self, end: BodyEnd, _at: Instant) {
            let mut s = self.0.lock();
            s.end = Some(end);
            s.ends += 1;
        }
    }

    type Item = Result<Frame<Bytes>, std::io::Error>;

    fn stream(
        items: Vec<Item>,
    ) -> StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Item>>> {
        StreamBody::new(futures_util::stream::iter(items))
    }

    #[tokio::test]
    async fn forwards_all_and_reports_completed() {
        let seen = Arc::new(parking_lot::Mutex::new(Seen::default()));
        let body = stream(vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Ok(Frame::data(Bytes::from_static(b"bc"))),
        ]);
        let tap = TapBody::new(body, Rec(seen.clone()), None, Instant::now());
        let out = tap.collect().await.unwrap().to_bytes();
        assert_eq!(&out[..], b"abc");
        let s = seen.lock();
        assert_eq!(
            s.chunks,
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"bc")]
        );
        assert_eq!((s.end, s.ends), (Some(BodyEnd::Completed), 1));
    }

    #[tokio::test]
    async fn inner_error_is_cut() {
        let seen = Arc::new(parking_lot::Mutex::new(Seen::default()));
        let body = stream(vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Err(std::io::Error::other("reset")),
        ]);
        let tap = TapBody::new(body, Rec(seen.clone()), None, Instant::now());
        assert!(tap.collect().await.is_err());
        let s = seen.lock();
        assert_eq!(s.chunks.len(), 1);
        assert_eq!((s.end, s.ends), (Some(BodyEnd::Cut), 1));
    }

    #[tokio::test]
    async fn drop_midway_is_client_cancelled() {
        let seen = Arc::new(parking_lot::Mutex::new(Seen::default()));
        let body = stream(vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Ok(Frame::data(Bytes::from_static(b"b"))),
        ]);
        let mut tap = TapBody::new(body, Rec(seen.clone()), None, Instant::now());
        let first = tap.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "a");
        drop(tap);
        let s = seen.lock();
        assert_eq!(s.chunks.len(), 1, "the forwarded frame is still tapped");
        assert_eq!((s.end, s.ends), (Some(BodyEnd::ClientCancelled), 1));
    }

    #[tokio::test]
    async fn drop_of_finished_body_is_completed() {
        let seen = Arc::new(parking_lot::Mutex::new(Seen::default()));
        let body = http_body_util::Full::new(Bytes::from_static(b"xyz"));
        let mut tap = TapBody::new(body, Rec(seen.clone()), None, Instant::now());
        let _ = tap.frame().await.unwrap().unwrap();
        assert!(tap.is_end_stream());
        drop(tap);
        let s = seen.lock();
        assert_eq!((s.end, s.ends), (Some(BodyEnd::Completed), 1));
        assert_eq!(s.chunks.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_between_frames() {
        let seen = Arc::new(parking_lot::Mutex::new(Seen::default()));
        let (tx, rx) = tokio::sync::mpsc::channel::<Item>(4);
        let body = StreamBody::new(tokio_stream_shim(rx));
        let mut tap = TapBody::new(
            body,
            Rec(seen.clone()),
            Some(Duration::from_secs(5)),
            Instant::now(),
        );
        tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .unwrap();
        assert!(tap.frame().await.unwrap().is_ok());
        // Slow but within the idle limit each time: never cut (no total cap).
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            tx.send(Ok(Frame::data(Bytes::from_static(b"b"))))
                .await
                .unwrap();
            assert!(tap.frame().await.unwrap().is_ok());
        }
        let err = tap.frame().await.unwrap().unwrap_err();
        assert!(matches!(err, TapBodyError::Idle { .. }));
        assert!(tap.frame().await.is_none());
        drop(tap);
        let s = seen.lock();
        assert_eq!((s.end, s.ends), (Some(BodyEnd::IdleTimeout), 1));
        assert_eq!(s.chunks.len(), 5);
    }

    fn tokio_stream_shim(
        mut rx: tokio::sync::mpsc::Receiver<Item>,
    ) -> impl futures_util::Stream<Item = Item> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
