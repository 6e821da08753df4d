//! A client's `Generate` stream that survives the loss of its coordinator.
//!
//! [`Resuming`] reads a stream as `tonic::Streaming` does, remembering the request id (from
//! `Started`) and how many generated tokens have arrived (each `Delta`'s
//! `completion_tokens`). When the stream breaks before `Finished` with a status that a lost
//! connection produces (UNAVAILABLE, UNKNOWN, INTERNAL, CANCELLED, ABORTED, or the stream
//! ending early), it calls `Resume` through the caller's endpoints in turn until one takes the
//! request up, and reads on from there: the caller sees one unbroken stream whose deltas are
//! exactly those of a run without the fault (the resumed stream's own `Started` is not
//! repeated).
//!
//! Each `Resume` carries the original request and, when the stream delivers token ids
//! (`stream_token_ids`), the ids received so far (`ResumeRequest.request`,
//! `received_token_ids`): a coordinator that holds the request no more (its coordinator and
//! the worker that held its sequence were lost together) starts it again from them and the
//! stream goes on exactly as before. A request no coordinator holds (NOT_FOUND) of which
//! nothing was received yet (the lost leader had it queued; no worker had started it) is
//! submitted again, with the same request id, to the endpoint that answered (for a
//! coordinator that does not know `ResumeRequest.request`): the client has seen none of its
//! output, so it cannot tell the difference.
//!
//! Giving up: after `timeout` without a coordinator taking the request, or as soon as a full
//! round over the endpoints has every one answering with a final status (NOT_FOUND once
//! tokens were received: the request is gone, its coordinator alive and dropped it or its
//! grace period passed). The original error is returned then, with the last answer appended.

use crate::v1::generate_response::Event;
use crate::v1::{GenerateRequest, GenerateResponse, ResumeRequest};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};
use tonic::{Code, Status, Streaming};

/// What [`Resuming`] asks of an endpoint to take a broken stream up again.
#[derive(Clone, Debug)]
pub enum Reattach {
    Resume(ResumeRequest),
    /// Nothing was received and no coordinator holds the request: submit it again.
    Generate(GenerateRequest),
}

/// Makes the call on endpoint `i` of the caller's list; a connection failure is UNAVAILABLE.
pub type ReattachFn = Box<
    dyn FnMut(
            usize,
            Reattach,
        )
            -> Pin<Box<dyn Future<Output = Result<Streaming<GenerateResponse>, Status>> + Send>>
        + Send,
>;

pub struct Resuming {
    /// None until a call that broke before its stream started is resumed (`broken`).
    stream: Option<Streaming<GenerateResponse>>,
    broken: Option<Status>,
    request: GenerateRequest,
    resume: ReattachFn,
    endpoints: usize,
    timeout: Duration,
    /// Known from the first `Started`, or from the start for [`Resuming::start`].
    request_id: Option<String>,
    started: bool,
    received: u32,
    /// The generated token ids received, while every delta so far carried its ids.
    received_ids: Option<Vec<u32>>,
    finished: bool,
    /// Times the stream was taken up again.
    pub resumes: u32,
}

/// Makes a [`Reattach`] call on a connected client: what every [`ReattachFn`] does once it
/// has one for its endpoint.
pub async fn call<T>(
    c: &mut crate::v1::inference_client::InferenceClient<T>,
    r: Reattach,
) -> Result<Streaming<GenerateResponse>, Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    Ok(match r {
        Reattach::Resume(r) => c.resume(r).await?.into_inner(),
        Reattach::Generate(r) => c.generate(r).await?.into_inner(),
    })
}

/// The longest wait between two rounds over the endpoints: a standby takes over a lease TTL
/// after the leader died (seconds), and a round refused at once costs little.
const RETRY_CAP: Duration = Duration::from_millis(200);

/// A request id unlikely to be anyone else's: the clock's nanoseconds, the process id and a
/// counter.
fn made_up_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "client-{nanos:x}-{:x}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether a broken stream may only have lost its connection (the request may live on).
fn may_resume(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled | Code::Aborted
    )
}

impl Resuming {
    /// `stream` from `Generate(request)`; `resume` reaches `endpoints` coordinators (at
    /// least one).
    pub fn new(
        stream: Streaming<GenerateResponse>,
        request: GenerateRequest,
        endpoints: usize,
        resume: ReattachFn,
        timeout: Duration,
    ) -> Self {
        Resuming {
            stream: Some(stream),
            ..Resuming::unstarted(request, endpoints, resume, timeout)
        }
    }

    fn unstarted(
        request: GenerateRequest,
        endpoints: usize,
        resume: ReattachFn,
        timeout: Duration,
    ) -> Self {
        Resuming {
            stream: None,
            broken: None,
            request,
            resume,
            endpoints: endpoints.max(1),
            timeout,
            request_id: None,
            started: false,
            received: 0,
            received_ids: Some(Vec::new()),
            finished: false,
            resumes: 0,
        }
    }

    /// Submits `request` through the endpoints (`Generate`, in turn, until one takes it: a
    /// standby's port is closed, a leaderless cluster UNAVAILABLE) and reads it as
    /// [`Resuming::new`] does. Without a request id one is made up first, so that a call that
    /// breaks before the stream starts can be resumed too: the coordinator may have admitted
    /// it before it died, and `Resume` (carrying the request) reattaches to it there or
    /// starts it on the one that took over.
    pub async fn start(
        mut request: GenerateRequest,
        endpoints: usize,
        mut resume: ReattachFn,
        timeout: Duration,
    ) -> Result<Self, Status> {
        if request.request_id.is_empty() {
            request.request_id = made_up_id();
        }
        let endpoints = endpoints.max(1);
        let t0 = Instant::now();
        let mut pause = Duration::from_millis(50);
        let mut last = None;
        loop {
            for i in 0..endpoints {
                match resume(i, Reattach::Generate(request.clone())).await {
                    Ok(stream) => {
                        let id = request.request_id.clone();
                        let mut r = Resuming::new(stream, request, endpoints, resume, timeout);
                        r.request_id = Some(id);
                        return Ok(r);
                    }
                    Err(s) if s.code() == Code::Unavailable => last = Some(s),
                    Err(s) if may_resume(&s) => {
                        // The call broke in flight: the request may live on; the first
                        // message resumes it.
                        let id = request.request_id.clone();
                        let mut r = Resuming::unstarted(request, endpoints, resume, timeout);
                        r.request_id = Some(id);
                        r.broken = Some(s);
                        return Ok(r);
                    }
                    Err(s) => return Err(s),
                }
            }
            if t0.elapsed() >= timeout {
                return Err(last.unwrap_or_else(|| Status::unavailable("no endpoint")));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_CAP);
        }
    }

    /// Generated tokens received so far.
    pub fn received(&self) -> u32 {
        self.received
    }

    /// The next message, as `Streaming::message`, resuming across a lost coordinator.
    pub async fn message(&mut self) -> Result<Option<GenerateResponse>, Status> {
        loop {
            let Some(stream) = &mut self.stream else {
                let broken = self
                    .broken
                    .take()
                    .unwrap_or_else(|| Status::unavailable("no stream"));
                self.stream = Some(self.reattach(broken).await?);
                self.resumes += 1;
                continue;
            };
            let broken = match stream.message().await {
                Ok(Some(m)) => {
                    match &m.event {
                        Some(Event::Started(s)) => {
                            if self.started {
                                // The resumed stream's own Started: already reported.
                                continue;
                            }
                            self.started = true;
                            self.request_id = Some(s.request_id.clone());
                        }
                        Some(Event::Delta(d)) => {
                            self.received = if d.completion_tokens > 0 {
                                d.completion_tokens
                            } else {
                                self.received + 1
                            };
                            if let Some(ids) = &mut self.received_ids {
                                ids.extend(&d.token_ids);
                                if ids.len() != self.received as usize {
                                    self.received_ids = None;
                                }
                            }
                        }
                        Some(Event::Finished(_)) => self.finished = true,
                        None => {}
                    }
                    return Ok(Some(m));
                }
                Ok(None) if self.finished || self.request_id.is_none() => return Ok(None),
                Ok(None) => Status::unavailable("the stream ended before Finished"),
                Err(s) if self.finished || self.request_id.is_none() || !may_resume(&s) => {
                    return Err(s)
                }
                Err(s) => s,
            };
            self.stream = Some(self.reattach(broken).await?);
            self.resumes += 1;
        }
    }

    /// Resume through the endpoints until one takes the request (see the module docs).
    async fn reattach(&mut self, broken: Status) -> Result<Streaming<GenerateResponse>, Status> {
        let t0 = Instant::now();
        let request_id = self.request_id.clone().expect("checked by the caller");
        let mut pause = Duration::from_millis(50);
        loop {
            let mut last = None;
            let mut retry = false;
            for i in 0..self.endpoints {
                let req = ResumeRequest {
                    request_id: request_id.clone(),
                    received_tokens: self.received,
                    request: self.received_ids.as_ref().map(|_| GenerateRequest {
                        request_id: request_id.clone(),
                        ..self.request.clone()
                    }),
                    received_token_ids: self.received_ids.clone().unwrap_or_default(),
                };
                let mut answer = (self.resume)(i, Reattach::Resume(req)).await;
                if self.received == 0 && matches!(&answer, Err(s) if s.code() == Code::NotFound) {
                    let again = GenerateRequest {
                        request_id: request_id.clone(),
                        ..self.request.clone()
                    };
                    answer = (self.resume)(i, Reattach::Generate(again)).await;
                }
                match answer {
                    Ok(s) => return Ok(s),
                    Err(s) => {
                        retry |= s.code() == Code::Unavailable;
                        last = Some(s);
                    }
                }
            }
            let last = last.expect("at least one endpoint");
            if !retry || t0.elapsed() >= self.timeout {
                return Err(Status::new(
                    broken.code(),
                    format!(
                        "{} (resuming request {request_id:?} after {} tokens failed: {}: {})",
                        broken.message(),
                        self.received,
                        last.code(),
                        last.message()
                    ),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_CAP);
        }
    }
}
