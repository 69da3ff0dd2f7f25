//! API messages as canonical protobuf JSON, through the descriptors compiled into `marchproxy`:
//! the same JSON grpcurl or any protobuf library prints, with proto field names.

use std::sync::OnceLock;

use marchproxy::pb;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("the compiled-in descriptors are unreadable: {0}")]
    Descriptors(String),
    #[error("no message type {0} in the API")]
    UnknownType(String),
    #[error("{0}")]
    Invalid(String),
}

fn pool() -> Result<&'static DescriptorPool, JsonError> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| JsonError::Descriptors(e.clone()))
}

fn descriptor(name: &str) -> Result<prost_reflect::MessageDescriptor, JsonError> {
    let full = format!("marchproxy.{name}");
    pool()?
        .get_message_by_name(&full)
        .ok_or(JsonError::UnknownType(full))
}

/// `message` (of API type `name`, e.g. `ListModulesResponse`) as JSON, defaults included.
pub fn to_json<M: Message>(message: &M, name: &str) -> Result<serde_json::Value, JsonError> {
    let dynamic = DynamicMessage::decode(descriptor(name)?, message.encode_to_vec().as_slice())
        .map_err(|e| JsonError::Invalid(e.to_string()))?;
    let options = SerializeOptions::new()
        .skip_default_fields(false)
        .use_proto_field_name(true)
        .stringify_64_bit_integers(false);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| JsonError::Invalid(e.to_string()))
}

/// An API message of type `name` from protobuf JSON (proto or JSON field names).
pub fn from_json<M: Message + Default>(
    value: &serde_json::Value,
    name: &str,
) -> Result<M, JsonError> {
    let text = value.to_string();
    let mut deserializer = serde_json::Deserializer::from_str(&text);
    let dynamic = DynamicMessage::deserialize(descriptor(name)?, &mut deserializer)
        .map_err(|e| JsonError::Invalid(format!("not a valid {name}: {e}")))?;
    M::decode(dynamic.encode_to_vec().as_slice()).map_err(|e| JsonError::Invalid(e.to_string()))
}

/// Routes from a JSON file's text: an array of Route objects, or `{"routes": [...]}`.
pub fn routes_from_json(text: &str) -> Result<Vec<pb::Route>, JsonError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| JsonError::Invalid(format!("not JSON: {e}")))?;
    let list = match &value {
        serde_json::Value::Array(list) => list.clone(),
        serde_json::Value::Object(map) => match map.get("routes") {
            Some(serde_json::Value::Array(list)) => list.clone(),
            _ => {
                return Err(JsonError::Invalid(
                    "expected an array of routes or {\"routes\": [...]}".into(),
                ));
            }
        },
        _ => {
            return Err(JsonError::Invalid(
                "expected an array of routes or {\"routes\": [...]}".into(),
            ));
        }
    };
    list.iter()
        .enumerate()
        .map(|(index, route)| {
            from_json(route, "Route")
                .map_err(|e| JsonError::Invalid(format!("routes[{index}]: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_json() {
        let route = pb::Route {
            route_id: "web".into(),
            protocol: pb::Protocol::Http as i32,
            priority: 3,
            ..Default::default()
        };
        let json = to_json(&route, "Route").unwrap();
        assert_eq!(json["protocol"], "PROTOCOL_HTTP");
        assert_eq!(json["route_id"], "web");
        assert_eq!(json["source_port"], 0, "defaults are shown");
        let back: pb::Route = from_json(&json, "Route").unwrap();
        assert_eq!(back, route);
    }

    #[test]
    fn reads_route_files() {
        let routes = routes_from_json(
            r#"[{"routeId": "a", "protocol": "PROTOCOL_POSTGRES", "destination_pattern": "dblb"}]"#,
        )
        .unwrap();
        assert_eq!(routes[0].protocol, pb::Protocol::Postgres as i32);
        assert_eq!(routes[0].destination_pattern, "dblb");
        assert!(
            routes_from_json(r#"[{"route_id": "a", "colour": 1}]"#)
                .unwrap_err()
                .to_string()
                .contains("routes[0]")
        );
        assert!(routes_from_json("42").is_err());
    }
}
