//! Transaction pooling in front of a real PostgreSQL server: many clients share a few server
//! connections, transactions stay whole and isolated, a client that leaves mid-transaction
//! has it rolled back, cancel reaches the running transaction, and named prepared statements
//! are refused in words. Clients are `tokio-postgres` (simple and unnamed extended queries)
//! and `psql`.

mod common;

use std::process::Stdio;

use common::{DEADLINE, Dblb, connect, module, route};
use marchproxy_testkit::{
    databases::{PASSWORD, Postgres},
    eventually,
};
use tokio::process::Command;
use tokio_postgres::{NoTls, types::Type};

/// Server connections to `app` that clients (through the DBLB) hold now.
async fn server_connections(server: &Postgres) -> u32 {
    server
        .psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' AND backend_type = 'client backend'",
        )
        .await
        .parse()
        .unwrap()
}

async fn at_most_two_server_connections(server: &Postgres) {
    eventually("at most 2 server connections", DEADLINE, || async {
        server_connections(server).await <= 2
    })
    .await;
}

async fn count_rows(client: &tokio_postgres::Client) -> i64 {
    let rows = client
        .query_typed("SELECT count(*) FROM ledger", &[])
        .await
        .unwrap();
    rows[0].get(0)
}

#[tokio::test]
async fn many_clients_share_few_server_connections_one_transaction_at_a_time() {
    let server = Postgres::start(&[]).await;
    server.psql("postgres", "CREATE DATABASE app").await;
    server
        .psql("app", "CREATE TABLE ledger (client int, n int)")
        .await;
    let address = format!("127.0.0.1:{}", server.port);
    let config = [
        module("queue_timeout_ms = 10000"),
        route(
            "app",
            "postgres",
            &address,
            &[
                ("database", "app"),
                ("pool_mode", "transaction"),
                ("max_connections", "2"),
            ],
        ),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let dblb = Dblb::start(dir.path(), &config, &["postgres"], &[]).await;
    let pg = dblb.listeners[0];

    // Ten clients, each logged in through its own server login, then 20 transactions each,
    // all at once: simple-protocol transactions and unnamed extended-protocol queries.
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(connect(pg, "app", "").await.unwrap());
    }
    // Logins make room: the pool stays at 2 (a closed connection's server process may take
    // a moment to leave pg_stat_activity).
    at_most_two_server_connections(&server).await;
    let work: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(id, client)| {
            tokio::spawn(async move {
                for n in 0..20 {
                    client
                        .simple_query(&format!(
                            "BEGIN; INSERT INTO ledger VALUES ({id}, {n}); INSERT INTO ledger VALUES ({id}, -{n}); COMMIT"
                        ))
                        .await
                        .unwrap();
                    let sum: i64 = client
                        .query_typed(
                            "SELECT coalesce(sum(n), 0)::int8 FROM ledger WHERE client = $1",
                            &[(&(id as i32), Type::INT4)],
                        )
                        .await
                        .unwrap()[0]
                        .get(0);
                    assert_eq!(sum, 0, "both rows of every transaction, or neither");
                }
                client
            })
        })
        .collect();
    let mut clients = Vec::new();
    for task in work {
        clients.push(
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("work ends")
                .unwrap(),
        );
    }
    assert_eq!(count_rows(&clients[0]).await, 400);
    at_most_two_server_connections(&server).await;
    assert!(
        dblb.metric("dblb_pool_checkouts_total", "route=\"app\"")
            .await
            >= 400.0
    );

    // A transaction holds its connection: its uncommitted row is invisible to the others,
    // who share the remaining connection meanwhile.
    let (writer, reader) = (&clients[0], &clients[1]);
    writer
        .simple_query("BEGIN; INSERT INTO ledger VALUES (99, 1)")
        .await
        .unwrap();
    assert_eq!(count_rows(reader).await, 400);
    assert_eq!(count_rows(&clients[2]).await, 400);
    writer.simple_query("COMMIT").await.unwrap();
    assert_eq!(count_rows(reader).await, 401);

    // Cancel reaches the transaction running now.
    let sleeper = connect(pg, "app", "").await.unwrap();
    let token = sleeper.cancel_token();
    let sleeping = tokio::spawn(async move {
        sleeper
            .simple_query("SELECT pg_sleep(60)")
            .await
            .map(|_| ())
    });
    eventually("the sleep runs", DEADLINE, || async {
        server
            .psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'",
            )
            .await
            == "1"
    })
    .await;
    token.cancel_query(NoTls).await.unwrap();
    let cancelled = tokio::time::timeout(DEADLINE, sleeping)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(
        cancelled.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );

    // A client that leaves mid-transaction: rolled back, and the others go on.
    let quitter = connect(pg, "app", "").await.unwrap();
    quitter
        .simple_query("BEGIN; INSERT INTO ledger VALUES (98, 1)")
        .await
        .unwrap();
    drop(quitter);
    eventually(
        "the abandoned transaction is rolled back",
        DEADLINE,
        || async {
            count_rows(reader).await == 401
                && server
                    .psql(
                        "app",
                        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'",
                    )
                    .await
                    == "0"
        },
    )
    .await;

    // Named prepared statements would be lost between connections: refused in words.
    let preparer = connect(pg, "app", "").await.unwrap();
    let refused = preparer.prepare("SELECT 1").await.unwrap_err();
    let refused = refused.as_db_error().expect("a PostgreSQL error");
    assert_eq!(
        refused.code(),
        &tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED
    );
    assert!(
        refused.message().contains("pool_mode = session"),
        "{}",
        refused.message()
    );

    // psql works through the pool too.
    let output = Command::new(server.bin("psql"))
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "app",
            "-At",
            "-c",
            "SELECT count(*) FROM ledger",
        ])
        .arg("-p")
        .arg(pg.port().to_string())
        .env("PGPASSWORD", PASSWORD)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "401",
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    at_most_two_server_connections(&server).await;

    // A client between transactions has nothing to cancel: its key reaches no one else's
    // query, even one running on the connection it logged in with.
    let idle_client = connect(pg, "app", "").await.unwrap();
    let idle_token = idle_client.cancel_token();
    let busy = connect(pg, "app", "").await.unwrap();
    let sleeping =
        tokio::spawn(async move { busy.simple_query("SELECT pg_sleep(1)").await.map(|_| ()) });
    idle_token.cancel_query(NoTls).await.unwrap();
    tokio::time::timeout(DEADLINE, sleeping)
        .await
        .unwrap()
        .unwrap()
        .expect("the other client's query runs to its end");
    assert_eq!(
        dblb.metric("dblb_cancel_requests_total", "outcome=\"idle\"")
            .await,
        1.0
    );

    // With every client gone, the pools keep no server connection.
    drop((clients, idle_client, preparer));
    eventually("no server connection without clients", DEADLINE, || async {
        server_connections(&server).await == 0
    })
    .await;
}
