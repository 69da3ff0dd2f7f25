//! Errors travel two ways at once (spec/api.md, "How errors travel"): as a gRPC status with a
//! message that says what to fix, and, for responses that have `success`/`error` fields, as that
//! response body too. The body rides in the status details as a `google.rpc.Status` whose one
//! `Any` is the response message, gRPC's standard rich-error model, so clients that only read
//! bodies (through their rich-error support) still see `success=false` and `error`.

use prost::Message;
use tonic::{Code, Status};

use crate::{pb, time};

/// `google.rpc.Status`, the standard container of the `grpc-status-details-bin` trailer.
#[derive(Clone, PartialEq, Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<prost_types::Any>,
}

/// The API's own code for a gRPC code.
pub fn status_code(code: Code) -> pb::StatusCode {
    match code {
        Code::Ok => pb::StatusCode::Ok,
        Code::NotFound => pb::StatusCode::NotFound,
        Code::Unavailable | Code::DeadlineExceeded => pb::StatusCode::Unavailable,
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            pb::StatusCode::InvalidArgument
        }
        Code::PermissionDenied | Code::Unauthenticated => pb::StatusCode::PermissionDenied,
        Code::AlreadyExists => pb::StatusCode::AlreadyExists,
        Code::ResourceExhausted => pb::StatusCode::ResourceExhausted,
        _ => pb::StatusCode::Error,
    }
}

/// The `Error` message for a failure.
pub fn error_body(code: Code, message: &str) -> pb::Error {
    pb::Error {
        code: status_code(code) as i32,
        message: message.to_owned(),
        details: Default::default(),
        occurred_at: Some(time::now()),
    }
}

/// A failed call: `code` and `message` as the gRPC status, `body` (already carrying
/// `success=false` and `error`) in the details under `type.googleapis.com/marchproxy.<type_name>`.
pub fn with_body<M: Message>(code: Code, message: &str, type_name: &str, body: &M) -> Status {
    let details = RpcStatus {
        code: code as i32,
        message: message.to_owned(),
        details: vec![prost_types::Any {
            type_url: format!("type.googleapis.com/marchproxy.{type_name}"),
            value: body.encode_to_vec(),
        }],
    };
    Status::with_details(code, message, details.encode_to_vec().into())
}

/// The response body carried by a status made by [`with_body`], if it holds a `M`.
pub fn body_of<M: Message + Default>(status: &Status, type_name: &str) -> Option<M> {
    let details = RpcStatus::decode(status.details()).ok()?;
    let wanted = format!("type.googleapis.com/marchproxy.{type_name}");
    details
        .details
        .iter()
        .find(|any| any.type_url == wanted)
        .and_then(|any| M::decode(any.value.as_slice()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_body_names_are_the_proto_names() {
        let set = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
        let messages: Vec<&str> = set
            .file
            .iter()
            .filter(|f| f.package() == "marchproxy")
            .flat_map(|f| f.message_type.iter().map(|m| m.name()))
            .collect();
        for name in FAILURE_BODY_NAMES {
            assert!(
                messages.contains(name),
                "{name} is not a message of package marchproxy"
            );
        }
    }

    #[test]
    fn body_round_trips_through_the_status() {
        let body = pb::UpdateRoutingResponse {
            success: false,
            message: "route 1: bad".into(),
            error: Some(error_body(Code::InvalidArgument, "route 1: bad")),
            ..Default::default()
        };
        let status = with_body(
            Code::InvalidArgument,
            "route 1: bad",
            "UpdateRoutingResponse",
            &body,
        );
        assert_eq!(status.code(), Code::InvalidArgument);
        let back: pb::UpdateRoutingResponse = body_of(&status, "UpdateRoutingResponse").unwrap();
        assert_eq!(back, body);
        assert_eq!(
            back.error.unwrap().code,
            pb::StatusCode::InvalidArgument as i32
        );
    }
}

/// A response that can say it failed: `success=false` with `message` and `error`.
pub trait FailureBody: Message + Sized {
    /// The message name in the proto files (`UpdateNLBConfigResponse`, not the Rust spelling),
    /// for the type URL of the status details.
    const NAME: &'static str;
    fn failure(message: String, error: pb::Error) -> Self;
}

macro_rules! failure_bodies {
    ($($name:ident $(= $proto:literal)?),* $(,)?) => {$(
        // Some responses have only these three fields; the update fills the rest of the others.
        #[allow(clippy::needless_update)]
        impl FailureBody for pb::$name {
            const NAME: &'static str = failure_bodies!(@name $name $($proto)?);
            fn failure(message: String, error: pb::Error) -> Self {
                pb::$name { success: false, message, error: Some(error), ..Default::default() }
            }
        }
    )*
        /// Every name above, so a test can check each against the proto files.
        #[cfg(test)]
        const FAILURE_BODY_NAMES: &[&str] = &[$(failure_bodies!(@name $name $($proto)?)),*];
    };
    (@name $name:ident $proto:literal) => { $proto };
    (@name $name:ident) => { stringify!($name) };
}

failure_bodies!(
    RegisterModuleResponse,
    UnregisterModuleResponse,
    UpdateRoutingResponse,
    UpdateNlbConfigResponse = "UpdateNLBConfigResponse",
    RebalanceLoadResponse,
    TriggerScalingResponse,
    ReloadResponse,
    ShutdownResponse,
    DeleteRouteResponse,
    SetRateLimitResponse,
    RemoveRateLimitResponse,
    UpdateRoutesResponse,
    ScaleResponse,
    SetTrafficWeightResponse,
    RollbackResponse,
    PromoteVersionResponse,
    UpdateConfigResponse,
);

/// A failed call of an RPC whose response is `R`: the status, with `R`'s failure body in its
/// details.
pub fn reject<R: FailureBody>(code: Code, message: &str) -> Status {
    let body = R::failure(message.to_owned(), error_body(code, message));
    with_body(code, message, R::NAME, &body)
}

/// Reads the failure body of `R` back out of a status made by [`reject`].
pub fn failure_of<R: FailureBody + Default>(status: &Status) -> Option<R> {
    body_of(status, R::NAME)
}

impl From<pb::TriggerScalingResponse> for pb::ScaleResponse {
    /// A module's `Scale` answered by the NLB's `TriggerScaling`.
    fn from(answer: pb::TriggerScalingResponse) -> Self {
        pb::ScaleResponse {
            success: answer.success,
            message: answer.message,
            current_instances: answer.current_instances,
            desired_instances: answer.target_instances,
            error: answer.error,
        }
    }
}
