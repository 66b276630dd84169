//! The upstream thread: an HTTP client on its own tokio runtime, so that no shard ever
//! waits on an upstream (the backplane thread is the model). Shards hand it requests
//! through an unbounded channel (pushing never blocks); an invocation's answer comes
//! back on a oneshot its invoker awaits, so a slow upstream slows the invoking clients
//! and nothing else. Each upstream has at most [`MAX_IN_FLIGHT`] requests on their way;
//! the rest wait their turn here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_channel::oneshot;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use thiserror::Error;
use tokio::sync::{mpsc, Semaphore};

use crate::metrics::Metrics;
use crate::upstream::rules::Category;

/// Requests one upstream has on their way at most.
pub const MAX_IN_FLIGHT: usize = 64;

/// How long an invocation waits for its upstream's answer (.NET's `HttpClient` default,
/// what Azure's service waits).
const CALL_TIMEOUT: Duration = Duration::from_secs(100);

/// How long one attempt of a connection event may take.
const EVENT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The first wait before an event is sent again; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One POST to an upstream.
#[derive(Debug)]
pub struct Request {
    /// Which upstream rule it goes by (its in-flight bound).
    pub upstream: usize,
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
    pub content_type: &'static str,
    pub body: Bytes,
}

/// An upstream's answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// Why a request got no answer.
#[derive(Debug, Clone, Error)]
pub enum UpstreamError {
    #[error("the upstream cannot be reached: {0}")]
    Unreachable(String),
    #[error("the upstream did not answer within {0} s")]
    TimedOut(u64),
    #[error("the upstream's answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the request cannot be made: {0}")]
    Invalid(String),
    #[error("the server is shutting down")]
    Gone,
}

enum Job {
    /// A connection event: sent again until it is taken or the retry time is over;
    /// `first_attempt` is told when the first attempt is over, either way.
    Event {
        request: Request,
        first_attempt: Option<oneshot::Sender<()>>,
    },
    /// An invocation: its answer, whatever it is, goes back to its invoker.
    Call {
        request: Request,
        reply: oneshot::Sender<Result<Answer, UpstreamError>>,
    },
}

/// The shards' handle on the upstream thread (it ends when the last one is dropped).
#[derive(Debug, Clone)]
pub struct Link {
    jobs: mpsc::UnboundedSender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").finish_non_exhaustive()
    }
}

impl Link {
    /// Sends a connection event; the returned receiver is told when its first attempt
    /// is over (retries go on without anyone waiting).
    pub fn event(&self, request: Request) -> oneshot::Receiver<()> {
        let (told, first_attempt) = oneshot::channel();
        let _ = self.jobs.send(Job::Event {
            request,
            first_attempt: Some(told),
        });
        first_attempt
    }

    /// Sends an invocation and waits for the upstream's answer.
    pub async fn call(&self, request: Request) -> Result<Answer, UpstreamError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Call { request, reply })
            .map_err(|_| UpstreamError::Gone)?;
        answer.await.unwrap_or(Err(UpstreamError::Gone))
    }
}

/// What the thread's tasks share.
struct Sender {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// Per upstream rule, its requests on their way.
    in_flight: Vec<Arc<Semaphore>>,
    metrics: Arc<Metrics>,
    /// How long a connection event is tried.
    retry_for: Duration,
    /// The largest answer taken (an invocation's result must fit in a message).
    max_answer: usize,
}

/// Starts the upstream thread for `upstreams` rules.
pub fn start(
    upstreams: usize,
    metrics: Arc<Metrics>,
    retry_for: Duration,
    max_answer: usize,
) -> std::io::Result<Link> {
    let (jobs, mut queue) = mpsc::unbounded_channel::<Job>();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let connector = connector()?;
    std::thread::Builder::new()
        .name("ringhub-upstream".into())
        .spawn(move || {
            let sender = Arc::new(Sender {
                client: Client::builder(TokioExecutor::new())
                    .pool_timer(hyper_util::rt::TokioTimer::new())
                    .build(connector),
                in_flight: (0..upstreams)
                    .map(|_| Arc::new(Semaphore::new(MAX_IN_FLIGHT)))
                    .collect(),
                metrics,
                retry_for,
                max_answer,
            });
            runtime.block_on(async move {
                while let Some(job) = queue.recv().await {
                    tokio::spawn(sender.clone().run(job));
                }
            });
        })?;
    Ok(Link { jobs })
}

/// http:// and https:// (rustls on ring, the system's root certificates; without any,
/// https:// upstreams are refused and http:// ones still work).
fn connector() -> std::io::Result<hyper_rustls::HttpsConnector<HttpConnector>> {
    let builder = match hyper_rustls::HttpsConnectorBuilder::new().with_native_roots() {
        Ok(builder) => builder,
        Err(e) => {
            tracing::warn!("no system root certificates ({e}): https:// upstreams are refused");
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(std::io::Error::other)?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
        }
    };
    Ok(builder.https_or_http().enable_http1().build())
}

impl Sender {
    async fn run(self: Arc<Self>, job: Job) {
        match job {
            Job::Event {
                request,
                first_attempt,
            } => self.deliver_event(request, first_attempt).await,
            Job::Call { request, reply } => {
                let answered = {
                    let _turn = self.turn(request.upstream).await;
                    self.send(&request, CALL_TIMEOUT).await
                };
                let failed = match &answered {
                    Ok(answer) => !(200..300).contains(&answer.status),
                    Err(_) => true,
                };
                if failed {
                    self.metrics.upstream_failed(Category::Messages);
                }
                let _ = reply.send(answered);
            }
        }
    }

    /// Waits until the upstream has room for one more request.
    async fn turn(&self, upstream: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let limit = self.in_flight.get(upstream)?.clone();
        limit.acquire_owned().await.ok()
    }

    /// Sends a connection event until the upstream takes it (2xx), refuses it for good
    /// (a 4xx other than 408 and 429) or the retry time is over; then it is dropped and
    /// counted.
    async fn deliver_event(
        &self,
        request: Request,
        mut first_attempt: Option<oneshot::Sender<()>>,
    ) {
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        loop {
            let sent = {
                let _turn = self.turn(request.upstream).await;
                self.send(&request, EVENT_ATTEMPT_TIMEOUT).await
            };
            if let Some(told) = first_attempt.take() {
                let _ = told.send(());
            }
            let why = match sent {
                Ok(answer) if (200..300).contains(&answer.status) => return,
                Ok(answer) if retried_status(answer.status) => {
                    format!("status code {}", answer.status)
                }
                Ok(answer) => {
                    self.dropped(&request, &format!("status code {}", answer.status));
                    return;
                }
                Err(e) => e.to_string(),
            };
            if started.elapsed() + backoff > self.retry_for {
                self.dropped(&request, &why);
                return;
            }
            tracing::debug!(url = %request.url, "upstream event failed ({why}); trying again in {backoff:?}");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn dropped(&self, request: &Request, why: &str) {
        self.metrics.upstream_failed(Category::Connections);
        tracing::warn!(url = %request.url, "upstream event dropped: {why}");
    }

    /// One POST and its whole answer.
    async fn send(&self, request: &Request, timeout: Duration) -> Result<Answer, UpstreamError> {
        let mut builder = hyper::Request::post(request.url.as_str())
            .header(CONTENT_TYPE, HeaderValue::from_static(request.content_type));
        for (name, value) in &request.headers {
            match HeaderValue::from_bytes(value.as_bytes()) {
                Ok(value) => builder = builder.header(*name, value),
                Err(_) => tracing::debug!("{name} left out: not a valid header value"),
            }
        }
        let http_request = builder
            .body(Full::new(request.body.clone()))
            .map_err(|e| UpstreamError::Invalid(e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(http_request)
                .await
                .map_err(|e| UpstreamError::Unreachable(causes(&e)))?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), self.max_answer)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        UpstreamError::TooLarge(self.max_answer)
                    } else {
                        UpstreamError::Unreachable(e.to_string())
                    }
                })?
                .to_bytes();
            Ok(Answer { status, body })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(UpstreamError::TimedOut(timeout.as_secs())))
    }
}

/// Statuses worth another attempt: server errors, timeouts and throttling.
fn retried_status(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}

/// An error and its causes, for people ("client error (Connect): tcp connect error:
/// Connection refused").
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
