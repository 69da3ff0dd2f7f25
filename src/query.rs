//! Applies the API's `Query` (filters, sort, pagination) to any listing.
//!
//! A listed item implements [`Queryable`] by naming its fields; unknown fields and operators
//! are reported so the caller can fix the request instead of getting a silently empty page.

use std::cmp::Ordering;

use crate::pb;

/// Largest page a caller can ask for; bigger listings must be paged.
pub const MAX_PAGE_SIZE: i32 = 1000;

/// A field value as filters and sorting see it.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Text(String),
    Number(f64),
}

impl Value {
    fn compare(&self, other: &str) -> Option<Ordering> {
        match self {
            Value::Number(n) => other
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(|o| n.partial_cmp(&o)),
            Value::Text(t) => Some(t.as_str().cmp(other)),
        }
    }

    fn text(&self) -> String {
        match self {
            Value::Text(t) => t.clone(),
            Value::Number(n) => n.to_string(),
        }
    }
}

impl From<&str> for Value {
    fn from(value: &str) -> Self {
        Value::Text(value.to_owned())
    }
}

impl From<String> for Value {
    fn from(value: String) -> Self {
        Value::Text(value)
    }
}

impl From<i64> for Value {
    fn from(value: i64) -> Self {
        Value::Number(value as f64)
    }
}

impl From<i32> for Value {
    fn from(value: i32) -> Self {
        Value::Number(f64::from(value))
    }
}

/// An item a `Query` can filter and sort.
pub trait Queryable {
    /// The fields callers may name, for error messages.
    const FIELDS: &'static [&'static str];
    /// The value of `field`; `metadata.<key>` style names may be supported too.
    /// `None` when the item has no such field.
    fn field(&self, field: &str) -> Option<Value>;
}

/// What is wrong with a query, said so the caller can fix it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QueryError {
    #[error("unknown field `{field}` in query; known fields: {known}")]
    UnknownField { field: String, known: String },
    #[error("unknown filter operator `{0}`; use one of =, !=, <, <=, >, >=, contains, prefix, in")]
    UnknownOperator(String),
    #[error("pagination.page and pagination.page_size must not be negative (got {0} and {1})")]
    NegativePage(i32, i32),
    #[error("pagination.page_size {0} is above the maximum of {MAX_PAGE_SIZE}")]
    PageTooLarge(i32),
}

enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Contains,
    Prefix,
    In,
}

fn parse_op(op: &str) -> Result<Op, QueryError> {
    Ok(match op.trim().to_ascii_lowercase().as_str() {
        "" | "=" | "==" | "eq" | "equals" => Op::Eq,
        "!=" | "ne" | "not_equals" => Op::Ne,
        "<" | "lt" => Op::Lt,
        "<=" | "le" | "lte" => Op::Le,
        ">" | "gt" => Op::Gt,
        ">=" | "ge" | "gte" => Op::Ge,
        "contains" | "like" => Op::Contains,
        "prefix" | "starts_with" => Op::Prefix,
        "in" => Op::In,
        _ => return Err(QueryError::UnknownOperator(op.to_owned())),
    })
}

fn known_field<T: Queryable>(field: &str) -> bool {
    T::FIELDS.contains(&field) || field.starts_with("metadata.")
}

fn unknown<T: Queryable>(field: &str) -> QueryError {
    QueryError::UnknownField {
        field: field.to_owned(),
        known: T::FIELDS.join(", "),
    }
}

fn matches(value: Option<Value>, op: &Op, wanted: &str) -> bool {
    let Some(value) = value else {
        return matches!(op, Op::Ne);
    };
    let ordering = value.compare(wanted);
    match op {
        Op::Eq => match &value {
            Value::Text(t) => t.eq_ignore_ascii_case(wanted),
            Value::Number(_) => ordering == Some(Ordering::Equal),
        },
        Op::Ne => match &value {
            Value::Text(t) => !t.eq_ignore_ascii_case(wanted),
            Value::Number(_) => ordering != Some(Ordering::Equal),
        },
        Op::Lt => ordering == Some(Ordering::Less),
        Op::Le => matches!(ordering, Some(Ordering::Less | Ordering::Equal)),
        Op::Gt => ordering == Some(Ordering::Greater),
        Op::Ge => matches!(ordering, Some(Ordering::Greater | Ordering::Equal)),
        Op::Contains => value
            .text()
            .to_ascii_lowercase()
            .contains(&wanted.to_ascii_lowercase()),
        Op::Prefix => value.text().starts_with(wanted),
        Op::In => wanted
            .split(',')
            .any(|w| value.text().eq_ignore_ascii_case(w.trim())),
    }
}

/// A page of results with the `Pagination` to send back.
pub struct Page<T> {
    pub items: Vec<T>,
    pub total: usize,
    pub pagination: pb::Pagination,
}

/// Filters, sorts and pages `items` by `query` (no query: everything, in the given order).
pub fn apply<T: Queryable>(
    mut items: Vec<T>,
    query: Option<&pb::Query>,
) -> Result<Page<T>, QueryError> {
    let default = pb::Query::default();
    let query = query.unwrap_or(&default);
    let mut filters = Vec::with_capacity(query.filters.len());
    for filter in &query.filters {
        if !known_field::<T>(&filter.field) {
            return Err(unknown::<T>(&filter.field));
        }
        filters.push((
            filter.field.as_str(),
            parse_op(&filter.operator)?,
            filter.value.as_str(),
        ));
    }
    items.retain(|item| {
        filters
            .iter()
            .all(|(field, op, wanted)| matches(item.field(field), op, wanted))
    });
    if !query.sort_by.is_empty() {
        if !known_field::<T>(&query.sort_by) {
            return Err(unknown::<T>(&query.sort_by));
        }
        items.sort_by(|a, b| {
            let order = match (a.field(&query.sort_by), b.field(&query.sort_by)) {
                (Some(Value::Number(x)), Some(Value::Number(y))) => x.total_cmp(&y),
                (Some(x), Some(y)) => x.text().cmp(&y.text()),
                (x, y) => x.is_some().cmp(&y.is_some()),
            };
            if query.sort_desc {
                order.reverse()
            } else {
                order
            }
        });
    }
    let total = items.len();
    let asked = query.pagination.unwrap_or_default();
    if asked.page < 0 || asked.page_size < 0 {
        return Err(QueryError::NegativePage(asked.page, asked.page_size));
    }
    if asked.page_size > MAX_PAGE_SIZE {
        return Err(QueryError::PageTooLarge(asked.page_size));
    }
    let total_i32 = i32::try_from(total).unwrap_or(i32::MAX);
    let (page, page_size) = if asked.page_size == 0 {
        (1, total_i32)
    } else {
        (asked.page.max(1), asked.page_size)
    };
    let items: Vec<T> = if asked.page_size == 0 {
        items
    } else {
        let start = (page as usize - 1).saturating_mul(page_size as usize);
        items
            .into_iter()
            .skip(start)
            .take(page_size as usize)
            .collect()
    };
    let total_pages = if page_size == 0 {
        0
    } else {
        (total_i32 + page_size - 1) / page_size
    };
    Ok(Page {
        items,
        total,
        pagination: pb::Pagination {
            page,
            page_size,
            total_items: total_i32,
            total_pages,
        },
    })
}

fn metadata_field(
    metadata: &std::collections::HashMap<String, String>,
    field: &str,
) -> Option<Value> {
    field
        .strip_prefix("metadata.")
        .and_then(|key| metadata.get(key))
        .map(|v| Value::from(v.as_str()))
}

impl Queryable for pb::ModuleInstance {
    const FIELDS: &'static [&'static str] = &[
        "instance_id",
        "module_type",
        "address",
        "health_status",
        "version",
        "current_connections",
        "max_connections",
        "traffic_weight",
        "metadata.<key>",
    ];

    fn field(&self, field: &str) -> Option<Value> {
        Some(match field {
            "instance_id" => self.instance_id.as_str().into(),
            "module_type" => crate::names::ModuleKind::from_module_type(self.module_type)
                .map_or_else(|| self.module_type.to_string(), |k| k.name().to_owned())
                .into(),
            "address" => self.address.as_str().into(),
            "health_status" => crate::names::health_name(self.health_status()).into(),
            "version" => self.version.as_str().into(),
            "current_connections" => self.current_connections.into(),
            "max_connections" => self.max_connections.into(),
            "traffic_weight" => self.traffic_weight.into(),
            other => return metadata_field(&self.metadata, other),
        })
    }
}

impl Queryable for pb::Route {
    const FIELDS: &'static [&'static str] = &[
        "route_id",
        "protocol",
        "source_pattern",
        "destination_pattern",
        "source_port",
        "destination_port",
        "path_pattern",
        "priority",
        "metadata.<key>",
    ];

    fn field(&self, field: &str) -> Option<Value> {
        Some(match field {
            "route_id" => self.route_id.as_str().into(),
            "protocol" => crate::names::protocol_name(self.protocol()).into(),
            "source_pattern" => self.source_pattern.as_str().into(),
            "destination_pattern" => self.destination_pattern.as_str().into(),
            "source_port" => self.source_port.into(),
            "destination_port" => self.destination_port.into(),
            "path_pattern" => self.path_pattern.as_str().into(),
            "priority" => self.priority.into(),
            other => return metadata_field(&self.metadata, other),
        })
    }
}

impl Queryable for pb::RoutingEntry {
    const FIELDS: &'static [&'static str] = &[
        "route_id",
        "protocol",
        "source_pattern",
        "destination_pattern",
        "source_port",
        "destination_port",
        "path_pattern",
        "priority",
        "target_instance_id",
        "target_module_type",
        "current_connections",
        "metadata.<key>",
    ];

    fn field(&self, field: &str) -> Option<Value> {
        match field {
            "target_instance_id" => Some(self.target_instance_id.as_str().into()),
            "target_module_type" => Some(
                crate::names::ModuleKind::from_module_type(self.target_module_type)
                    .map_or_else(String::new, |k| k.name().to_owned())
                    .into(),
            ),
            "current_connections" => Some(self.current_connections.into()),
            other => self.route.as_ref().and_then(|route| route.field(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Item(&'static str, i32);

    impl Queryable for Item {
        const FIELDS: &'static [&'static str] = &["name", "size"];
        fn field(&self, field: &str) -> Option<Value> {
            match field {
                "name" => Some(self.0.into()),
                "size" => Some(self.1.into()),
                _ => None,
            }
        }
    }

    fn items() -> Vec<Item> {
        vec![Item("b", 2), Item("a", 10), Item("c", 1)]
    }

    fn names(page: &Page<Item>) -> Vec<&'static str> {
        page.items.iter().map(|i| i.0).collect()
    }

    fn filter(field: &str, operator: &str, value: &str) -> pb::Filter {
        pb::Filter {
            field: field.into(),
            operator: operator.into(),
            value: value.into(),
        }
    }

    #[test]
    fn filters_sorts_and_pages() {
        let query = pb::Query {
            filters: vec![filter("size", ">", "1")],
            sort_by: "size".into(),
            sort_desc: true,
            pagination: None,
        };
        let page = apply(items(), Some(&query)).unwrap();
        assert_eq!(names(&page), ["a", "b"]);

        let query = pb::Query {
            sort_by: "name".into(),
            pagination: Some(pb::Pagination {
                page: 2,
                page_size: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        let page = apply(items(), Some(&query)).unwrap();
        assert_eq!(names(&page), ["c"]);
        assert_eq!(page.pagination.total_pages, 2);
        assert_eq!(page.pagination.total_items, 3);
    }

    #[test]
    fn numbers_compare_as_numbers() {
        let query = pb::Query {
            sort_by: "size".into(),
            ..Default::default()
        };
        assert_eq!(
            names(&apply(items(), Some(&query)).unwrap()),
            ["c", "b", "a"]
        );
        let query = pb::Query {
            filters: vec![filter("name", "in", "a, c")],
            ..Default::default()
        };
        assert_eq!(names(&apply(items(), Some(&query)).unwrap()), ["a", "c"]);
    }

    #[test]
    fn rejects_what_it_cannot_do() {
        let query = pb::Query {
            filters: vec![filter("colour", "=", "red")],
            ..Default::default()
        };
        assert!(matches!(
            apply(items(), Some(&query)),
            Err(QueryError::UnknownField { .. })
        ));
        let query = pb::Query {
            filters: vec![filter("name", "~", "a")],
            ..Default::default()
        };
        assert!(matches!(
            apply(items(), Some(&query)),
            Err(QueryError::UnknownOperator(_))
        ));
        let query = pb::Query {
            pagination: Some(pb::Pagination {
                page: -1,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(
            apply(items(), Some(&query)),
            Err(QueryError::NegativePage(..))
        ));
    }
}
