//! Server streams fed by a task, with an idle limit for clients that stop reading.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Status;

/// The sending end of a server stream fed by a task. A client that stops taking messages for
/// the idle limit makes the task give up, so a stalled reader holds a task, a file and a few
/// queued messages for that long at most.
pub(crate) struct Feed<T> {
    tx: tokio::sync::mpsc::Sender<Result<T, Status>>,
    idle: Duration,
    stalled: Arc<AtomicBool>,
}

/// The stream a [`Feed`] feeds: what was queued, then `DEADLINE_EXCEEDED` if the feed gave
/// up on a stalled client.
pub(crate) type FedStream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

impl<T: Send + 'static> Feed<T> {
    /// A feed with room for `queue` messages, and its stream.
    pub(crate) fn new(idle_seconds: u32, queue: usize) -> (Self, FedStream<T>) {
        let (tx, rx) = tokio::sync::mpsc::channel(queue);
        let idle = Duration::from_secs(u64::from(idle_seconds));
        let stalled = Arc::new(AtomicBool::new(false));
        let flag = stalled.clone();
        let tail = tokio_stream::once(()).filter_map(move |()| {
            flag.load(Ordering::Acquire).then(|| {
                Err(Status::deadline_exceeded(format!(
                    "the client took no message for {} s; the stream was ended, start it again",
                    idle.as_secs()
                )))
            })
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).chain(tail);
        (Self { tx, idle, stalled }, Box::pin(stream))
    }

    /// Queues `item`; false when the producer should stop (the client went away or stalled).
    pub(crate) async fn send(&self, item: Result<T, Status>) -> bool {
        use tokio::sync::mpsc::error::SendTimeoutError;
        match self.tx.send_timeout(item, self.idle).await {
            Ok(()) => true,
            Err(SendTimeoutError::Timeout(_)) => {
                self.stalled.store(true, Ordering::Release);
                tracing::warn!(
                    seconds = self.idle.as_secs(),
                    "a client stopped reading its stream; the stream was ended"
                );
                false
            }
            Err(SendTimeoutError::Closed(_)) => false,
        }
    }
}
