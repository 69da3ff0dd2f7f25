//! The NLB's errors and their one mapping to gRPC statuses and `Error` bodies.

use marchproxy::status;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum NlbError {
    /// The request cannot be understood; the message says which field and what to write.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The caller is not the one who may do this (a stale registration id).
    #[error("{0}")]
    Denied(String),
    /// Valid, but not now (a scaling cooldown).
    #[error("{0}")]
    Exhausted(String),
    /// Something the NLB depends on failed (the state directory, a module).
    #[error("{0}")]
    Unavailable(String),
    /// Valid, but something the operator configured says no (a pre-rollout webhook).
    #[error("{0}")]
    Refused(String),
    /// Lost a race with a concurrent change of the same item (another NLB replica's).
    #[error("{0}")]
    Conflict(String),
}

impl NlbError {
    pub fn code(&self) -> Code {
        match self {
            NlbError::Invalid(_) => Code::InvalidArgument,
            NlbError::NotFound(_) => Code::NotFound,
            NlbError::Denied(_) => Code::PermissionDenied,
            NlbError::Exhausted(_) => Code::ResourceExhausted,
            NlbError::Unavailable(_) => Code::Unavailable,
            NlbError::Refused(_) => Code::FailedPrecondition,
            NlbError::Conflict(_) => Code::Aborted,
        }
    }

    /// The `Error` message for response bodies.
    pub fn body(&self) -> marchproxy::pb::Error {
        status::error_body(self.code(), &self.to_string())
    }

    /// The status for an RPC whose response `R` has `success`/`error`: the body rides along.
    pub fn reject<R: status::FailureBody>(self) -> Status {
        status::reject::<R>(self.code(), &self.to_string())
    }
}

impl From<NlbError> for Status {
    fn from(error: NlbError) -> Self {
        Status::new(error.code(), error.to_string())
    }
}

impl From<marchproxy::query::QueryError> for NlbError {
    fn from(error: marchproxy::query::QueryError) -> Self {
        NlbError::Invalid(error.to_string())
    }
}
