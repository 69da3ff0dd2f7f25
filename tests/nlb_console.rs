//! The operator console over HTTP, as its page uses it, against a live NLB with two ALB versions
//! behind real backends: the page is served, the state needs a session got with the cluster key
//! (a wrong key is refused), a weight set in the console is what gRPC `GetActiveVersion` reads
//! back, the chart's series counts the connections that flow, a rollback restores the split, a
//! drain takes an instance out, and POSTs without the console's header or session are refused.

use std::time::Duration;

use marchproxy::{auth::AttachApiKey, listen::ListenSpec, pb};
use marchproxy_nlb::Config;
use marchproxy_testkit::{backend::tagged_echo, *};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const KEY: &str = "console-test-key";
const DEADLINE: Duration = Duration::from_secs(20);

/// One HTTP/1.1 request; returns the status, the response's head and its body.
async fn exchange(
    admin: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, String, String) {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        request.push_str(&format!("Host: {admin}\r\n"));
    }
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(&body);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// An NLB with the cluster key and a data listener, and two ALB versions registered in front of
/// real backends: alb-blue (v1) and alb-green (v2).
async fn two_alb_versions() -> (TestNlb, backend::Backend, backend::Backend) {
    let nlb = start_with(Config {
        api_key: Some(KEY.into()),
        listen: vec![ListenSpec::parse("auto=127.0.0.1:0").unwrap()],
        ..Config::local()
    })
    .await;
    let mut client = nlb.client().await;
    let (blue, green) = (tagged_echo("blue").await, tagged_echo("green").await);
    for (id, version, backend) in [("alb-blue", "v1", &blue), ("alb-green", "v2", &green)] {
        register(
            &mut client,
            instance(id, pb::ModuleType::Alb, version, &backend.addr.to_string()),
            vec![route("web", pb::Protocol::Http, "*.example", "", 0)],
        )
        .await;
    }
    (nlb, blue, green)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_signs_in_shows_and_steers_blue_green() {
    let (nlb, blue, green) = two_alb_versions().await;
    let admin = nlb.admin;

    let (status, head, page) = exchange(admin, "GET", "/ui/", &[], None).await;
    assert_eq!(status, 200);
    assert!(page.contains("MarchProxy console"), "{page}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    assert!(head.contains("frame-ancestors 'none'"), "{head}");

    // Nothing without a session; a wrong key, or a sign-in from elsewhere, gets none.
    let console = [("x-marchproxy-console", "1")];
    assert_eq!(
        exchange(admin, "GET", "/ui/api/state", &[], None).await.0,
        401
    );
    let (status, _, body) = exchange(
        admin,
        "POST",
        "/ui/api/login",
        &console,
        Some(json!({"key": "guess"})),
    )
    .await;
    assert_eq!(status, 401);
    assert!(
        json_of(&body)["error"]
            .as_str()
            .unwrap()
            .contains("not the cluster's API key")
    );
    let (status, _, _) = exchange(
        admin,
        "POST",
        "/ui/api/login",
        &[],
        Some(json!({"key": KEY})),
    )
    .await;
    assert_eq!(status, 403, "a sign-in without the console's header");

    let (cookie, set_cookie) = sign_in(admin).await;
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    let session = [("cookie", cookie.as_str())];
    let acting = [("cookie", cookie.as_str()), ("x-marchproxy-console", "1")];

    let (status, _, body) = exchange(admin, "GET", "/ui/api/state", &session, None).await;
    assert_eq!(status, 200);
    let state = json_of(&body);
    let ids: Vec<&str> = state["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["alb-blue", "alb-green"]);
    assert_eq!(state["instances"][0]["health"], "healthy");
    assert_eq!(state["kinds"][0]["kind"], "alb");
    assert_eq!(
        state["kinds"][0]["weights"],
        json!([{"version": "v1", "weight": 100}, {"version": "v2", "weight": 0}])
    );
    assert_eq!(state["routes"][0]["route_id"], "web");

    // An action needs the header as well as the session.
    let set_30 = json!({"kind": "alb", "version": "v2", "percent": 30});
    assert_eq!(
        exchange(
            admin,
            "POST",
            "/ui/api/weight",
            &session,
            Some(set_30.clone())
        )
        .await
        .0,
        403
    );
    let (status, _, body) = exchange(admin, "POST", "/ui/api/weight", &acting, Some(set_30)).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        json_of(&body)["message"]
            .as_str()
            .unwrap()
            .contains("v2 now takes 30%"),
        "{body}"
    );
    let mut gateway = pb::module_service_client::ModuleServiceClient::with_interceptor(
        nlb.channel().await,
        AttachApiKey::new(Some(KEY)).unwrap(),
    );
    let active = gateway
        .get_active_version(pb::GetActiveVersionRequest {
            instance_id: "alb".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        active.version_weights["v2"], 30,
        "gRPC reads back what the console set"
    );
    assert_eq!(active.version_weights["v1"], 70);

    // A mistake is refused in words.
    let (status, _, body) = exchange(
        admin,
        "POST",
        "/ui/api/weight",
        &acting,
        Some(json!({"kind": "alb", "version": "v2", "percent": 130})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(!json_of(&body)["error"].as_str().unwrap().is_empty());

    // Connections through the NLB show up in the chart's series, per version.
    for _ in 0..40 {
        let mut stream = TcpStream::connect(nlb.listen[0]).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        stream.shutdown().await.unwrap();
        let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer)).await;
    }
    let routed = blue.connections() + green.connections();
    assert_eq!(routed, 40);
    eventually(
        "the chart's series counts every connection",
        DEADLINE,
        || async {
            let (_, _, body) = exchange(admin, "GET", "/ui/api/state", &session, None).await;
            let series = &json_of(&body)["new_connections"]["kinds"]["alb"];
            let total = |version: &str| -> u64 {
                series[version]
                    .as_array()
                    .map_or(0, |counts| counts.iter().filter_map(Value::as_u64).sum())
            };
            total("v1") + total("v2") == 40 && total("v2") == green.connections() as u64
        },
    )
    .await;

    // Roll back to the active version, as the page's button does outside a promotion.
    let (status, _, body) = exchange(
        admin,
        "POST",
        "/ui/api/rollback",
        &acting,
        Some(json!({"kind": "alb", "to": "v1"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let active = gateway
        .get_active_version(pb::GetActiveVersionRequest {
            instance_id: "alb".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        active.version_weights["v2"], 0,
        "{:?}",
        active.version_weights
    );

    // Drain v2's instance: UnregisterModule(graceful); with no connection open it leaves at once.
    let (status, _, body) = exchange(
        admin,
        "POST",
        "/ui/api/drain",
        &acting,
        Some(json!({"instance": "alb-green"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        json_of(&body)["message"]
            .as_str()
            .unwrap()
            .contains("draining alb-green"),
        "{body}"
    );
    eventually("alb-green drained and gone", DEADLINE, || async {
        let (_, _, body) = exchange(admin, "GET", "/ui/api/state", &session, None).await;
        let state = json_of(&body);
        let ids: Vec<&str> = state["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i["instance_id"].as_str())
            .collect();
        ids == ["alb-blue"]
    })
    .await;
    let (status, _, body) = exchange(
        admin,
        "POST",
        "/ui/api/drain",
        &acting,
        Some(json!({"instance": "alb-nowhere"})),
    )
    .await;
    assert_eq!(status, 404, "{body}");

    // Signed out, the session is gone.
    exchange(admin, "POST", "/ui/api/logout", &acting, None).await;
    assert_eq!(
        exchange(admin, "GET", "/ui/api/state", &session, None)
            .await
            .0,
        401
    );
    // /healthz and /metrics stay open.
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    assert_eq!(http_get(admin, "/metrics").await.0, 200);
}

/// The console in a real headless browser (Chromium through Selenium): sign in (a wrong key is
/// refused), see the instances, set v2 to 30 % and read 30 back over gRPC, watch the chart move
/// as traffic flows, roll back. With MARCHPROXY_UPDATE_SCREENSHOT=1 the screenshot it takes
/// replaces docs/console.png, the README's picture.
#[tokio::test(flavor = "multi_thread")]
async fn a_browser_signs_in_sets_30_percent_watches_the_chart_and_rolls_back() {
    use std::process::Stdio;
    use tokio::io::AsyncBufReadExt;

    marchproxy_testkit::external::require(
        "Chromium, its WebDriver and Python Selenium",
        "test -x /usr/bin/chromium && test -x /usr/bin/chromedriver && python3 -c 'import selenium'",
        "sudo apt-get install -y chromium chromium-driver && python3 -m pip install selenium",
    );
    let (nlb, _blue, green) = two_alb_versions().await;
    // Test traffic, all along: a connection every 20 ms.
    let data = nlb.listen[0];
    let traffic = tokio::spawn(async move {
        loop {
            if let Ok(mut stream) = TcpStream::connect(data).await {
                let _ = stream
                    .write_all(b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n")
                    .await;
                let _ = stream.shutdown().await;
                let mut answer = Vec::new();
                let _ = stream.read_to_end(&mut answer).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    let shots = tempfile::tempdir().unwrap();
    let screenshot = shots.path().join("console.png");
    let root = env!("CARGO_MANIFEST_DIR");
    let mut browser = tokio::process::Command::new("python3")
        .arg(format!("{root}/tests/python/console_browser.py"))
        .arg(format!("http://{}", nlb.admin))
        .arg(KEY)
        .arg(&screenshot)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let mut lines = tokio::io::BufReader::new(browser.stdout.take().unwrap()).lines();
    let mut to_browser = browser.stdin.take().unwrap();
    async fn next_line(
        lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
        what: &str,
    ) -> String {
        tokio::time::timeout(Duration::from_secs(90), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("the browser never got to {what}"))
            .unwrap()
            .unwrap_or_else(|| panic!("the browser script ended before {what}"))
    }
    assert_eq!(next_line(&mut lines, "SET 30").await, "SET 30");
    let mut gateway = pb::module_service_client::ModuleServiceClient::with_interceptor(
        nlb.channel().await,
        AttachApiKey::new(Some(KEY)).unwrap(),
    );
    async fn weights(
        gateway: &mut pb::module_service_client::ModuleServiceClient<
            tonic::service::interceptor::InterceptedService<
                tonic::transport::Channel,
                AttachApiKey,
            >,
        >,
    ) -> std::collections::HashMap<String, i32> {
        gateway
            .get_active_version(pb::GetActiveVersionRequest {
                instance_id: "alb".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .version_weights
    }
    assert_eq!(
        weights(&mut gateway).await["v2"],
        30,
        "gRPC reads the console's 30 %"
    );
    to_browser.write_all(b"go on\n").await.unwrap();
    drop(to_browser);
    assert_eq!(next_line(&mut lines, "the rollback").await, "ROLLED BACK");
    assert_eq!(weights(&mut gateway).await["v2"], 0);
    let status = browser.wait().await.unwrap();
    assert!(status.success(), "the browser script failed: {status}");
    traffic.abort();
    assert!(green.connections() > 0, "v2 served traffic at 30 %");
    assert!(
        std::fs::metadata(&screenshot).is_ok_and(|m| m.len() > 10_000),
        "a screenshot"
    );
    if std::env::var_os("MARCHPROXY_UPDATE_SCREENSHOT").is_some() {
        std::fs::copy(&screenshot, format!("{root}/docs/console.png")).unwrap();
    }
}

/// Signs in over HTTP; returns the session cookie (`name=value`) and the whole Set-Cookie line.
async fn sign_in(admin: std::net::SocketAddr) -> (String, String) {
    let (status, head, _) = exchange(
        admin,
        "POST",
        "/ui/api/login",
        &[("x-marchproxy-console", "1")],
        Some(json!({"key": KEY})),
    )
    .await;
    assert_eq!(status, 200);
    let set_cookie = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a session cookie");
    let cookie = set_cookie
        .split_once(':')
        .unwrap()
        .1
        .split(';')
        .next()
        .unwrap()
        .trim()
        .to_owned();
    (cookie, set_cookie.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_promotion_started_in_the_console_that_rolls_back_by_itself_says_why() {
    let mut config = Config {
        api_key: Some(KEY.into()),
        ..Config::local()
    };
    config.settings.rollout = marchproxy_nlb::policy::RolloutSettings::from_json(
        json!({"step_interval_ms": 200, "failed_checks_tolerated": 0}),
    )
    .unwrap();
    let nlb = start_with(config).await;
    let mut client = nlb.client().await;
    let mut green_registration = String::new();
    for (id, version) in [("alb-blue", "v1"), ("alb-green", "v2")] {
        let registration = register(
            &mut client,
            instance(id, pb::ModuleType::Alb, version, "127.0.0.1:9"),
            vec![route("web", pb::Protocol::Http, "*.example", "", 0)],
        )
        .await;
        // Modules report their counters from their first heartbeat on.
        heartbeat_requests(&mut client, id, &registration, 0, 0).await;
        if version == "v2" {
            green_registration = registration;
        }
    }
    let (cookie, _) = sign_in(nlb.admin).await;
    let acting = [("cookie", cookie.as_str()), ("x-marchproxy-console", "1")];
    let (status, _, body) = exchange(
        nlb.admin,
        "POST",
        "/ui/api/promote",
        &acting,
        Some(json!({"kind": "alb", "version": "v2", "rate": 10})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        json_of(&body)["message"]
            .as_str()
            .unwrap()
            .contains("promoting v2 from 10 % by 10 %"),
        "{body}"
    );
    let (_, _, body) = exchange(nlb.admin, "GET", "/ui/api/state", &acting, None).await;
    let promotion = &json_of(&body)["kinds"][0]["promotion"];
    assert_eq!(promotion["version"], "v2", "{body}");
    // The first step is taken at once; the promoter may have taken another since.
    assert!(
        promotion["weight"]
            .as_u64()
            .is_some_and(|w| (10..100).contains(&w)),
        "{body}"
    );

    // Paused and resumed from the console (the rollout policy's `paused`).
    for paused in [true, false] {
        let (status, _, body) = exchange(
            nlb.admin,
            "POST",
            "/ui/api/pause",
            &acting,
            Some(json!({"kind": "alb", "paused": paused})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let (_, _, body) = exchange(nlb.admin, "GET", "/ui/api/state", &acting, None).await;
        assert_eq!(
            json_of(&body)["kinds"][0]["promotion"]["paused"],
            paused,
            "{body}"
        );
    }
    let (status, _, body) = exchange(
        nlb.admin,
        "POST",
        "/ui/api/pause",
        &acting,
        Some(json!({"kind": "teapot", "paused": true})),
    )
    .await;
    assert!(status == 400 && body.contains("teapot"), "{status} {body}");

    // v2 reports that a third of its requests fail: the NLB rolls the promotion back itself.
    heartbeat_requests(&mut client, "alb-green", &green_registration, 300, 100).await;
    let mut last_state = Value::Null;
    let rolled_back = tokio::time::timeout(DEADLINE, async {
        loop {
            let (_, _, body) = exchange(nlb.admin, "GET", "/ui/api/state", &acting, None).await;
            last_state = json_of(&body);
            if last_state["kinds"][0]["last_promotion_end"]["end"] == "rolled_back" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(rolled_back.is_ok(), "no rollback shown: {last_state}");
    let end = &last_state["kinds"][0]["last_promotion_end"];
    assert_eq!(end["version"], "v2");
    assert!(
        end["message"]
            .as_str()
            .unwrap_or_default()
            .contains("success ratio 0.667 (100 of 300 failed)"),
        "{end}"
    );
    assert!(last_state["kinds"][0]["promotion"].is_null());
    let green = last_state["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["instance_id"] == "alb-green")
        .unwrap();
    let ratio = green["error_ratio"].as_f64().unwrap();
    assert!((ratio - 1.0 / 3.0).abs() < 0.01, "{green}");
}

#[tokio::test]
async fn without_a_key_the_console_steers_only_when_opened_by_address() {
    let nlb = start_with(Config::local()).await;
    let mut client = nlb.client().await;
    for (id, version) in [("alb-blue", "v1"), ("alb-green", "v2")] {
        register(
            &mut client,
            instance(id, pb::ModuleType::Alb, version, "127.0.0.1:9"),
            vec![],
        )
        .await;
    }
    let set = json!({"kind": "alb", "version": "v2", "percent": 10});
    // A page reached through a host name could be a rebound DNS name: no steering from it.
    let (status, _, body) = exchange(
        nlb.admin,
        "POST",
        "/ui/api/weight",
        &[
            ("x-marchproxy-console", "1"),
            ("host", "nlb.example.com:7001"),
        ],
        Some(set.clone()),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        json_of(&body)["error"]
            .as_str()
            .unwrap()
            .contains("IP address"),
        "{body}"
    );
    for host in ["localhost:7001".to_owned(), nlb.admin.to_string()] {
        let (status, _, body) = exchange(
            nlb.admin,
            "POST",
            "/ui/api/weight",
            &[("x-marchproxy-console", "1"), ("host", host.as_str())],
            Some(set.clone()),
        )
        .await;
        assert_eq!(status, 200, "{host}: {body}");
    }
    // Reading needs no sign-in without a key.
    let (status, _, body) = exchange(nlb.admin, "GET", "/ui/api/state", &[], None).await;
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)["key_required"], false);
}
