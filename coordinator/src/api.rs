//! The inference API both front ends adapt: a typed request (`switchyard.v1.GenerateRequest`,
//! the versioned schema), the call's context in domain terms ([`Call`]), a typed stream of
//! events ([`Events`]) and typed errors ([`ApiError`]). The gRPC service
//! ([`crate::server::InferenceService`]'s `Inference` impl) and the HTTP server (`http`) map
//! them to their status codes and bodies at their edges only, as TGI's router does: nothing in
//! between speaks gRPC status codes or parses error strings.

use std::time::Duration;
use switchyard_proto::v1::GenerateResponse;

/// Why a request was refused or failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// A field of the request is invalid; `field` names it (the typed API's name).
    #[error("{field}: {detail}")]
    InvalidArgument { field: String, detail: String },
    /// The request is invalid as a whole.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// Admission queue or per-key limit full: retry later.
    #[error("{0}")]
    ResourceExhausted(String),
    /// No cluster is serving (retry).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        ApiError::InvalidArgument {
            field: field.into(),
            detail: detail.to_string(),
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        use tonic::Code;
        let code = match &e {
            ApiError::InvalidArgument { .. } | ApiError::BadRequest(_) => Code::InvalidArgument,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ApiError::Internal(_) => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}

/// A call's context: who calls (the `authorization` value), how long it may take, the W3C
/// trace context its span joins, and whether `max_tokens` 0 means "as many as the context
/// leaves" (OpenAI's chat API without a limit; a gRPC caller cannot ask for it).
#[derive(Clone, Debug, Default)]
pub struct Call {
    pub authorization: Option<String>,
    pub timeout: Option<Duration>,
    /// `traceparent` and `tracestate`, when given.
    pub trace: Vec<(&'static str, String)>,
    pub up_to_context: bool,
}

impl Call {
    /// A trace header's value.
    pub fn trace_header(&self, key: &str) -> Option<String> {
        self.trace
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }
}

/// One generation's events: `Started`, `Delta`s, then exactly one `Finished`, or an error
/// that ends the stream.
pub type Events = tokio::sync::mpsc::Receiver<Result<GenerateResponse, ApiError>>;

macro_rules! constructors {
    ($($name:ident => $variant:ident),* $(,)?) => {
        impl ApiError {
            $(pub fn $name(m: impl Into<String>) -> Self {
                ApiError::$variant(m.into())
            })*
        }
    };
}

constructors! {
    bad_request => BadRequest,
    unauthenticated => Unauthenticated,
    permission_denied => PermissionDenied,
    not_found => NotFound,
    failed_precondition => FailedPrecondition,
    resource_exhausted => ResourceExhausted,
    unavailable => Unavailable,
    deadline_exceeded => DeadlineExceeded,
    internal => Internal,
}
