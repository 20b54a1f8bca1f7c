//! The layers every call passes: a deadline on single-message calls, and the interceptor that
//! authenticates the caller and applies its rate limit.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Status};

use super::ratelimit;
use crate::identity::Role;
use crate::service::Coordinator;

/// Bounds every call whose request is a single message to `limit` (the longest long poll
/// plus the idle limit), answering `DEADLINE_EXCEEDED` past it: a client that sends headers
/// and never the body holds nothing for longer. Uploads are streams of any length on links
/// of any speed; they are bounded instead by the idle limit between chunks, in the handler.
#[derive(Clone, Debug)]
pub(super) struct CallDeadline<S> {
    pub(super) inner: S,
    pub(super) limit: Duration,
}

impl<S, B, R> tower::Service<http::Request<B>> for CallDeadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send + 'static>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if proto::CLIENT_STREAMING_METHODS.contains(&req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        let path = req.uri().path().to_owned();
        let call = self.inner.call(req);
        let limit = self.limit;
        Box::pin(async move {
            match tokio::time::timeout(limit, call).await {
                Ok(answer) => answer,
                Err(_) => {
                    tracing::warn!(call = %path, seconds = limit.as_secs(), "call took too long; ended");
                    Ok(Status::deadline_exceeded(format!(
                        "the call took longer than {} s and was ended; retry",
                        limit.as_secs()
                    ))
                    .into_http())
                }
            }
        })
    }
}

/// The interceptor of one service: reads the identity from the client certificate, checks
/// revocation and role, applies the identity's rate limit, and hands the identity to the
/// handler.
pub(super) fn authenticator(
    coord: Arc<Coordinator>,
    role: Role,
    limiter: Arc<ratelimit::RateLimiter>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut req: Request<()>| {
        let id = coord.authenticate(&req, role).map_err(Status::from)?;
        if !limiter.allow(&id.key()) {
            tracing::warn!(role = id.role.as_str(), name = %id.name, "rate limit reached");
            return Err(Status::resource_exhausted(format!(
                "{} \"{}\" made more than {} requests at once ({} per second sustained); \
                 slow down and retry",
                id.role.as_str(),
                id.name,
                limiter.burst(),
                limiter.per_second()
            )));
        }
        req.extensions_mut().insert(id);
        Ok(req)
    }
}
