//! The routing table over gRPC: operator routes (UpdateRouting with replace_all and
//! validate_only), module routes, GetRoutingTable filters, RouteRequest decisions and counters,
//! and ValidateRoute asking real ModuleService endpoints.

use std::collections::HashMap;

use marchproxy::{pb, status::failure_of};
use marchproxy_testkit::*;
use tonic::Code;

async fn routing(
    client: &mut NlbClient,
    routes: Vec<pb::Route>,
    replace_all: bool,
    validate_only: bool,
) -> Result<pb::UpdateRoutingResponse, tonic::Status> {
    client
        .update_routing(pb::UpdateRoutingRequest {
            routes,
            replace_all,
            source_instance_id: String::new(),
            validate_only,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn route_for(
    client: &mut NlbClient,
    flow: pb::Route,
    context: &[(&str, &str)],
    dry_run: bool,
) -> pb::RouteRequestResponse {
    client
        .route_request(pb::RouteRequestRequest {
            route: Some(flow),
            context: context
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            dry_run,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn table_ids(client: &mut NlbClient, request: pb::GetRoutingTableRequest) -> Vec<String> {
    let mut ids: Vec<String> = client
        .get_routing_table(request)
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| format!("{}@{}", e.route.unwrap().route_id, e.target_instance_id))
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn operator_routes_are_all_or_nothing() {
    let dir = state_dir();
    let nlb = start(&dir).await;
    let mut client = nlb.client().await;

    let web = route("web", pb::Protocol::Http, "*.example.com", "alb", 10);
    let db = route("db", pb::Protocol::Postgres, "", "dblb", 0);
    let written = routing(&mut client, vec![web.clone(), db.clone()], false, false)
        .await
        .unwrap();
    assert!(written.success);
    assert_eq!(written.routes_updated, 2);

    // validate_only checks and changes nothing, in both outcomes.
    let extra = route("extra", pb::Protocol::Http, "", "alb", 0);
    let checked = routing(&mut client, vec![extra.clone()], true, true)
        .await
        .unwrap();
    assert!(checked.success);
    assert_eq!(checked.routes_updated, 0);
    let broken = route("broken", pb::Protocol::Http, "", "", 0);
    let checked = routing(&mut client, vec![broken.clone()], true, true)
        .await
        .unwrap();
    assert!(!checked.success);
    assert!(
        checked.validation_errors[0].contains("destination_pattern is empty"),
        "{:?}",
        checked.validation_errors
    );
    assert_eq!(
        table_ids(&mut client, Default::default()).await,
        ["db@", "web@"]
    );

    // A rejected replace_all leaves the old table intact, and says which route is wrong.
    let mut bad_port = extra.clone();
    bad_port.source_port = 70000;
    let status = routing(&mut client, vec![extra.clone(), bad_port], true, false)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("routes[1]") && status.message().contains("source_port"),
        "{}",
        status.message()
    );
    let body: pb::UpdateRoutingResponse = failure_of(&status).unwrap();
    assert!(!body.success);
    assert_eq!(body.validation_errors.len(), 1);
    assert_eq!(
        table_ids(&mut client, Default::default()).await,
        ["db@", "web@"]
    );

    for bad in [
        route("", pb::Protocol::Http, "", "alb", 0),
        route("p", pb::Protocol::Http, "not a host", "alb", 0),
        pb::Route {
            protocol: 99,
            ..route("p", pb::Protocol::Http, "", "alb", 0)
        },
        pb::Route {
            path_pattern: "no-slash".into(),
            ..route("p", pb::Protocol::Http, "", "alb", 0)
        },
    ] {
        let status = routing(&mut client, vec![bad], false, false)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    }

    // replace_all swaps the whole operator table.
    routing(&mut client, vec![extra], true, false)
        .await
        .unwrap();
    assert_eq!(table_ids(&mut client, Default::default()).await, ["extra@"]);

    // Module routes need a registered source instance.
    let status = client
        .update_routing(pb::UpdateRoutingRequest {
            routes: vec![web],
            source_instance_id: "ghost".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn route_request_takes_the_best_match_and_counts_unless_dry_run() {
    let dir = state_dir();
    let nlb = start(&dir).await;
    let mut client = nlb.client().await;
    register(
        &mut client,
        instance("alb-1", pb::ModuleType::Alb, "v1", "127.0.0.1:8081"),
        vec![],
    )
    .await;
    register(
        &mut client,
        instance("alb-2", pb::ModuleType::Alb, "v1", "127.0.0.1:8082"),
        vec![],
    )
    .await;
    let db_reg = register(
        &mut client,
        instance("db-1", pb::ModuleType::Dblb, "v1", "127.0.0.1:6432"),
        vec![route("pg", pb::Protocol::Postgres, "", "10.0.0.9:5432", 0)],
    )
    .await;
    let _ = db_reg;
    routing(
        &mut client,
        vec![
            route("any-http", pb::Protocol::Http, "", "alb", 1),
            route("api", pb::Protocol::Http, "api.example.com", "alb-2", 5),
            route("office", pb::Protocol::Http, "192.168.0.0/16", "alb-1", 9),
        ],
        false,
        false,
    )
    .await
    .unwrap();

    let api = route_for(
        &mut client,
        route("", pb::Protocol::Http, "API.example.com:443", "", 0),
        &[],
        false,
    )
    .await;
    assert!(api.routed, "{}", api.message);
    assert_eq!(api.target_instance_id, "alb-2");
    assert_eq!(api.target_address, "127.0.0.1:8082");
    assert_eq!(api.priority, 5);
    assert_eq!(api.target_module_type, pb::ModuleType::Alb as i32);

    let office = route_for(
        &mut client,
        route("", pb::Protocol::Http, "api.example.com", "", 0),
        &[("client_ip", "192.168.1.20")],
        false,
    )
    .await;
    assert_eq!(
        office.target_instance_id, "alb-1",
        "the CIDR route has the higher priority"
    );

    let pg = route_for(
        &mut client,
        route("", pb::Protocol::Postgres, "", "", 0),
        &[],
        false,
    )
    .await;
    assert_eq!(
        (pg.target_instance_id.as_str(), pg.target_address.as_str()),
        ("db-1", "127.0.0.1:6432")
    );

    // Sequential connections spread over equal instances.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        seen.insert(
            route_for(
                &mut client,
                route("", pb::Protocol::Http, "www.other.org", "", 0),
                &[],
                false,
            )
            .await
            .target_instance_id,
        );
    }
    assert_eq!(seen.len(), 2, "both ALBs take turns: {seen:?}");

    // dry_run predicts without counting.
    let before = client
        .get_nlb_status(pb::GetNlbStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .total_requests;
    let dry = route_for(
        &mut client,
        route("", pb::Protocol::Http, "api.example.com", "", 0),
        &[],
        true,
    )
    .await;
    assert!(dry.routed);
    let after = client
        .get_nlb_status(pb::GetNlbStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .total_requests;
    assert_eq!(before, after);
    assert_eq!(before, 9);
    let table = client
        .get_routing_table(pb::GetRoutingTableRequest {
            destination_filter: "alb-2".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let api_entry = table
        .entries
        .iter()
        .find(|e| e.route.as_ref().unwrap().route_id == "api")
        .unwrap();
    assert!(
        api_entry.last_used.is_some(),
        "a routed flow marks its route used"
    );

    // Nothing matches, or nothing healthy serves what matches.
    let none = route_for(
        &mut client,
        route("", pb::Protocol::Rtmp, "", "", 0),
        &[],
        false,
    )
    .await;
    assert!(!none.routed);
    assert_eq!(none.error.unwrap().code, pb::StatusCode::NotFound as i32);
    routing(
        &mut client,
        vec![route("mqtt", pb::Protocol::Tcp, "", "wasm-registry", 0)],
        false,
        false,
    )
    .await
    .unwrap();
    let nobody = route_for(
        &mut client,
        route("", pb::Protocol::Tcp, "", "", 0),
        &[],
        false,
    )
    .await;
    assert!(!nobody.routed);
    assert_eq!(
        nobody.error.unwrap().code,
        pb::StatusCode::Unavailable as i32
    );

    let metrics = http_get(nlb.admin, "/metrics").await.1;
    assert!(
        metrics.contains("nlb_route_decisions_total{module_type=\"alb\",result=\"routed\"} 8"),
        "{metrics}"
    );
    assert!(metrics.contains("result=\"no_route\"} 1"), "{metrics}");

    // Bad flows are refused.
    for (flow, context) in [
        (None, HashMap::new()),
        (
            Some(pb::Route {
                protocol: 99,
                ..Default::default()
            }),
            HashMap::new(),
        ),
        (
            Some(pb::Route {
                source_port: 70000,
                ..Default::default()
            }),
            HashMap::new(),
        ),
        (
            Some(pb::Route::default()),
            HashMap::from([("client_ip".to_string(), "not-an-ip".to_string())]),
        ),
    ] {
        let status = client
            .route_request(pb::RouteRequestRequest {
                route: flow,
                context,
                dry_run: false,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    }
}

#[tokio::test]
async fn routing_table_shows_module_and_operator_routes() {
    let dir = state_dir();
    let nlb = start(&dir).await;
    let mut client = nlb.client().await;
    register(
        &mut client,
        instance("alb-1", pb::ModuleType::Alb, "v1", "127.0.0.1:8081"),
        vec![route(
            "site",
            pb::Protocol::Http,
            "site.example",
            "10.0.0.1:80",
            0,
        )],
    )
    .await;
    register(
        &mut client,
        instance("db-1", pb::ModuleType::Dblb, "v1", "127.0.0.1:6432"),
        vec![],
    )
    .await;
    routing(
        &mut client,
        vec![
            route("pg", pb::Protocol::Postgres, "", "dblb", 0),
            route("later", pb::Protocol::Rtmp, "", "rtmp", 0),
        ],
        false,
        false,
    )
    .await
    .unwrap();
    // A relayed module update replaces that instance's routes only.
    client
        .update_routing(pb::UpdateRoutingRequest {
            routes: vec![route(
                "site2",
                pb::Protocol::Http,
                "two.example",
                "10.0.0.2:80",
                0,
            )],
            replace_all: true,
            source_instance_id: "alb-1".into(),
            validate_only: false,
        })
        .await
        .unwrap();
    assert_eq!(
        table_ids(&mut client, Default::default()).await,
        ["later@", "pg@db-1", "site2@alb-1"]
    );
    let postgres = table_ids(
        &mut client,
        pb::GetRoutingTableRequest {
            protocol_filter: pb::Protocol::Postgres as i32,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(postgres, ["pg@db-1"]);
    let by_kind = table_ids(
        &mut client,
        pb::GetRoutingTableRequest {
            destination_filter: "alb".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_kind, ["site2@alb-1"]);
    let queried = table_ids(
        &mut client,
        pb::GetRoutingTableRequest {
            query: Some(pb::Query {
                filters: vec![pb::Filter {
                    field: "target_module_type".into(),
                    operator: "=".into(),
                    value: "dblb".into(),
                }],
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(queried, ["pg@db-1"]);
    let status = client
        .get_routing_table(pb::GetRoutingTableRequest {
            protocol_filter: 1234,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn validate_route_asks_the_candidate_modules() {
    let dir = state_dir();
    let nlb = start(&dir).await;
    let mut client = nlb.client().await;
    let http_module = fake_module::serve(vec![pb::Protocol::Http], pb::HealthStatus::Healthy).await;
    let pg_module =
        fake_module::serve(vec![pb::Protocol::Postgres], pb::HealthStatus::Healthy).await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    for (id, address) in [
        ("alb-live", http_module),
        ("alb-pg", pg_module),
        ("alb-dead", closed),
    ] {
        let mut module = instance(id, pb::ModuleType::Alb, "v1", "127.0.0.1:8080");
        module.address = address.to_string();
        register(&mut client, module, vec![]).await;
    }
    let answer = client
        .validate_route(pb::ValidateRouteRequest {
            route: Some(route("new", pb::Protocol::Http, "*.example.com", "alb", 0)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.valid);
    assert!(answer.has_handler);
    assert_eq!(answer.capable_instances, ["alb-live"]);
    assert!(
        answer.details["instance.alb-pg"].starts_with("not capable"),
        "{:?}",
        answer.details
    );
    assert!(
        answer.details["instance.alb-dead"].starts_with("unreachable"),
        "{:?}",
        answer.details
    );

    // No module serves it yet: valid, accepted, but without a handler.
    let answer = client
        .validate_route(pb::ValidateRouteRequest {
            route: Some(route("stream", pb::Protocol::Rtmp, "", "rtmp", 0)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.valid && !answer.has_handler);

    let answer = client
        .validate_route(pb::ValidateRouteRequest {
            route: Some(route("bad", pb::Protocol::Http, "10.0.0.0/99", "alb", 0)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.valid);
    assert!(answer.validation_errors[0].contains("CIDR"));
    let status = client
        .validate_route(pb::ValidateRouteRequest { route: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}
