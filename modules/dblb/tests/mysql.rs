//! The DBLB in front of real MariaDB servers, driven by the `mysql` client and the
//! `mysql_async` driver: a server per listener (one of them a read-only port), the server's own
//! authentication, a connection cap that queues then answers "Too many connections", a server
//! that dies taken out and brought back, and MySQL through the NLB beside PostgreSQL on one
//! DBLB.

mod common;

use std::{net::SocketAddr, process::Stdio};

use common::{DEADLINE, Dblb, module, route};
use marchproxy::pb;
use marchproxy_testkit::{
    databases::{MariaDb, PASSWORD},
    eventually,
    external::free_port,
};
use tokio::process::Command;

/// The `mysql` client through `addr` as `app`; Ok(stdout) or Err(stderr).
async fn mysql(addr: SocketAddr, password: &str, sql: &str) -> Result<String, String> {
    let output = Command::new("mysql")
        .args(["--no-defaults", "-h", "127.0.0.1", "-u", "app", "-N", "-B"])
        .arg(format!("-P{}", addr.port()))
        .arg(format!("-p{password}"))
        .args(["--connect-timeout=10", "-e", sql, "shop"])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("the mysql client runs");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

#[tokio::test]
async fn listeners_limits_and_a_dead_server_through_the_dblb_and_the_nlb() {
    let (mut main, mut reports) = tokio::join!(MariaDb::start(), MariaDb::start());
    let (a, b) = (
        format!("127.0.0.1:{}", main.port),
        format!("127.0.0.1:{}", reports.port),
    );
    let [writes, reads, pg] = [(); 3].map(|()| SocketAddr::from(([127, 0, 0, 1], free_port())));
    let (writes_port, reads_port) = (writes.port().to_string(), reads.port().to_string());
    let config = [
        module("queue_timeout_ms = 3000"),
        route(
            "shop",
            "mysql",
            &a,
            &[("listener_port", &writes_port), ("max_connections", "1")],
        ),
        route(
            "shop-reports",
            "mysql",
            &b,
            &[("listener_port", &reads_port), ("role", "replica")],
        ),
    ]
    .concat();
    let state = marchproxy_testkit::state_dir();
    let nlb = marchproxy_testkit::start_with(marchproxy_nlb::Config {
        state_dir: Some(state.path().to_owned()),
        listen: vec![marchproxy::listen::ListenSpec::parse("mysql=127.0.0.1:0").unwrap()],
        ..marchproxy_nlb::Config::local()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    // The PostgreSQL listener comes first, so the NLB must pick the MySQL one by protocol.
    let dblb = Dblb::start_on(
        dir.path(),
        &config,
        &["postgres", "mysql", "mysql"],
        &[pg, writes, reads],
        &["--nlb", &nlb.url(), "--heartbeat-interval", "1s"],
    )
    .await;

    // Each listener reaches its server; the server checks the password.
    assert_eq!(
        mysql(writes, PASSWORD, "SELECT @@port").await.unwrap(),
        main.port.to_string()
    );
    assert_eq!(
        mysql(reads, PASSWORD, "SELECT @@port").await.unwrap(),
        reports.port.to_string()
    );
    mysql(
        writes,
        PASSWORD,
        "CREATE TABLE orders (id INT); INSERT INTO orders VALUES (1)",
    )
    .await
    .unwrap();
    // A Rust driver, with a prepared statement, the same way.
    let options = mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(reads.port())
        .user(Some("app"))
        .pass(Some(PASSWORD))
        .db_name(Some("shop"));
    let mut driver = mysql_async::Conn::new(options).await.unwrap();
    let port: Option<u16> =
        mysql_async::prelude::Queryable::query_first(&mut driver, "SELECT @@port")
            .await
            .unwrap();
    assert_eq!(port, Some(reports.port));
    let sum: Option<i64> =
        mysql_async::prelude::Queryable::exec_first(&mut driver, "SELECT ? + ?", (40, 2))
            .await
            .unwrap();
    assert_eq!(sum, Some(42));
    driver.disconnect().await.unwrap();
    let denied = mysql(writes, "wrong", "SELECT 1").await.unwrap_err();
    assert!(denied.contains("Access denied"), "{denied}");

    // One session at a time on `shop`: a second client waits for the first to finish ...
    let held_shortly = tokio::spawn(mysql(writes, PASSWORD, "SELECT SLEEP(1)"));
    eventually("the first session holds the server", DEADLINE, || async {
        dblb.metric("dblb_backend_sessions", "route=\"shop\"").await == 1.0
    })
    .await;
    assert_eq!(
        mysql(writes, PASSWORD, "SELECT COUNT(*) FROM orders")
            .await
            .unwrap(),
        "1"
    );
    held_shortly.await.unwrap().unwrap();
    assert!(
        dblb.metric("dblb_wait_seconds_count", "protocol=\"mysql\"")
            .await
            >= 1.0
    );
    // ... and gives up in MySQL's words when the first stays too long.
    let held_long = tokio::spawn(mysql(writes, PASSWORD, "SELECT SLEEP(6)"));
    eventually("the long session holds the server", DEADLINE, || async {
        dblb.metric("dblb_backend_sessions", "route=\"shop\"").await == 1.0
    })
    .await;
    let full = mysql(writes, PASSWORD, "SELECT 1").await.unwrap_err();
    assert!(
        full.contains("1040") && full.contains("Too many connections"),
        "{full}"
    );
    held_long.await.unwrap().unwrap();

    // The server dies: it is taken out and its listener says so; the other goes on.
    main.stop();
    let main_up = format!("backend=\"{a}\"");
    eventually("the server is out", DEADLINE, || async {
        dblb.metric("dblb_backend_up", &main_up).await == 0.0
    })
    .await;
    let down = mysql(writes, PASSWORD, "SELECT 1").await.unwrap_err();
    assert!(
        down.contains("No healthy primary server for listener port"),
        "{down}"
    );
    assert_eq!(mysql(reads, PASSWORD, "SELECT 1").await.unwrap(), "1");
    main.resume().await;
    eventually("the server is back", DEADLINE, || async {
        dblb.metric("dblb_backend_up", &main_up).await == 1.0
    })
    .await;
    assert_eq!(
        mysql(writes, PASSWORD, "SELECT @@port").await.unwrap(),
        main.port.to_string()
    );
    assert!(
        dblb.metric("dblb_queries_total", "protocol=\"mysql\"")
            .await
            >= 8.0
    );

    // Through the NLB's MySQL listener.
    nlb.wait_healthy(pb::ModuleType::Dblb, DEADLINE).await;
    assert_eq!(
        mysql(nlb.listen[0], PASSWORD, "SELECT @@port")
            .await
            .unwrap(),
        main.port.to_string()
    );
    reports.stop();
}
