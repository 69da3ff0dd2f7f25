//! Where operator routes send traffic.

use marchproxy::{names::ModuleKind, route::RouteSpec};

/// What an operator route sends traffic to (`destination_pattern`): a module kind or one instance.
#[derive(Clone, Debug, PartialEq)]
pub enum OperatorTarget {
    Kind(ModuleKind),
    Instance(String),
}

impl OperatorTarget {
    pub fn of(route: &RouteSpec) -> Result<Self, String> {
        if route.destination.is_empty() {
            return Err(format!(
                "route {}: destination_pattern is empty; name a module kind (alb, dblb, ...) or an instance id",
                route.id
            ));
        }
        Ok(route
            .destination
            .parse::<ModuleKind>()
            .map(OperatorTarget::Kind)
            .unwrap_or_else(|_| OperatorTarget::Instance(route.destination.clone())))
    }
}
