//! The DBLB authenticating PostgreSQL clients itself (`module.auth_type`) in front of a real
//! PostgreSQL server that asks for SCRAM-SHA-256: right and wrong passwords, the users of the
//! auth file only, and clients that come and go one after the other served by the server
//! logins the DBLB made once, reset between clients; cancel still reaches the running query.

mod common;

use std::{path::Path, process::Stdio};

use common::{DEADLINE, Dblb, module, route};
use marchproxy_testkit::{
    databases::{PASSWORD, Postgres},
    eventually,
};
use tokio::process::Command;
use tokio_postgres::{NoTls, error::SqlState, types::Type};

async fn connect_as(
    addr: std::net::SocketAddr,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = format!(
        "host=127.0.0.1 port={} user={user} dbname=app connect_timeout=10",
        addr.port()
    );
    if !password.is_empty() {
        config.push_str(&format!(" password={password}"));
    }
    let (client, connection) = tokio_postgres::connect(&config, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Server processes serving `app` now.
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

fn auth_module(auth_type: &str, file: &Path, extra: &str) -> String {
    module(&format!(
        "auth_type = \"{auth_type}\"\nauth_file = \"{}\"\n{extra}",
        file.display()
    ))
}

#[tokio::test]
async fn clients_checked_by_the_dblb_share_the_server_logins_it_made() {
    let server = Postgres::start(&[]).await;
    server.psql("postgres", "CREATE DATABASE app").await;
    server.psql("app", "CREATE TABLE ledger (n int)").await;
    // The server's own SCRAM secret, as PgBouncer's auth_file holds it: the DBLB checks
    // clients with it and logs in to the server with the key their proofs reveal.
    let secret = server
        .psql(
            "postgres",
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'",
        )
        .await;
    assert!(secret.starts_with("SCRAM-SHA-256$"), "{secret}");
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.txt");
    std::fs::write(
        &users,
        format!("; who may log in\n\"postgres\" \"{secret}\"\n"),
    )
    .unwrap();
    let address = format!("127.0.0.1:{}", server.port);
    let config = [
        auth_module("scram-sha-256", &users, ""),
        route("app", "postgres", &address, &[("database", "app")]),
    ]
    .concat();
    let dblb = Dblb::start(dir.path(), &config, &["postgres"], &[]).await;
    let pg = dblb.listeners[0];

    // Twenty clients one after the other, the first leaving session state behind.
    let mut server_pids = std::collections::HashSet::new();
    for round in 0..20 {
        let client = connect_as(pg, "postgres", PASSWORD).await.unwrap();
        if round == 0 {
            client
                .batch_execute("SET work_mem = '7MB'; CREATE TEMP TABLE scratch (x int)")
                .await
                .unwrap();
        }
        let row = client
            .query_one(
                "SELECT pg_backend_pid(), current_setting('work_mem'), to_regclass('pg_temp.scratch') IS NULL",
                &[],
            )
            .await
            .unwrap();
        server_pids.insert(row.get::<_, i32>(0));
        if round > 0 {
            assert_eq!(
                row.get::<_, String>(1),
                "4MB",
                "round {round}: the session was reset"
            );
            assert!(
                row.get::<_, bool>(2),
                "round {round}: the temp table is gone"
            );
        }
        client
            .execute("INSERT INTO ledger VALUES ($1)", &[&round])
            .await
            .unwrap();
        drop(client);
        // The connection goes back after its reset; the next client takes it then.
        eventually(
            "the server connection back in the pool",
            DEADLINE,
            || async {
                dblb.metric("dblb_pool_idle_connections", "route=\"app\"")
                    .await
                    >= 1.0
            },
        )
        .await;
    }
    let logins = dblb
        .metric("dblb_server_logins_total", "outcome=\"ok\"")
        .await;
    assert_eq!(logins, 1.0, "one server login served all 20 clients");
    assert_eq!(server_pids.len(), 1, "{server_pids:?}");
    assert_eq!(
        server.psql("app", "SELECT count(*) FROM ledger").await,
        "20"
    );

    // A client that leaves inside a transaction: the reset is refused, so its connection is
    // closed (rolling the transaction back) instead of serving the next client.
    let leaving = connect_as(pg, "postgres", PASSWORD).await.unwrap();
    leaving
        .batch_execute("BEGIN; INSERT INTO ledger VALUES (-1)")
        .await
        .unwrap();
    drop(leaving);
    eventually(
        "the connection left in a transaction closed",
        DEADLINE,
        || async { server_connections(&server).await == 0 },
    )
    .await;
    let next = connect_as(pg, "postgres", PASSWORD).await.unwrap();
    let row = next
        .query_one("SELECT count(*) FROM ledger WHERE n = -1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 0, "rolled back");
    assert_eq!(
        dblb.metric("dblb_server_logins_total", "outcome=\"ok\"")
            .await,
        2.0,
        "a new login for the next client"
    );
    drop(next);

    // Wrong passwords and users the file does not name are refused by the DBLB.
    for (user, password) in [("postgres", "wrong"), ("mallory", PASSWORD)] {
        let refused = connect_as(pg, user, password).await.unwrap_err();
        let refused = refused.as_db_error().expect("a PostgreSQL error");
        assert_eq!(refused.code(), &SqlState::INVALID_PASSWORD, "{user}");
        assert!(
            refused.message().contains("password authentication failed"),
            "{}",
            refused.message()
        );
    }
    assert_eq!(
        dblb.metric("dblb_sessions_total", "outcome=\"auth_failed\"")
            .await,
        2.0
    );

    // libpq's own SCRAM through the DBLB.
    let output = Command::new(server.bin("psql"))
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "app", "-At"])
        .args(["-c", "SELECT count(*) FROM ledger"])
        .arg("-p")
        .arg(pg.port().to_string())
        .env("PGPASSWORD", PASSWORD)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "20",
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // A client's cancel key (ours) reaches the query running on the pooled connection.
    let sleeper = connect_as(pg, "postgres", PASSWORD).await.unwrap();
    let token = sleeper.cancel_token();
    let sleeping = tokio::spawn(async move {
        sleeper
            .simple_query("SELECT pg_sleep(30)")
            .await
            .map(|_| ())
    });
    eventually("the query running", DEADLINE, || async {
        server
            .psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'",
            )
            .await
            == "1"
    })
    .await;
    token.cancel_query(NoTls).await.unwrap();
    let cancelled = tokio::time::timeout(DEADLINE, sleeping)
        .await
        .expect("the query ended")
        .unwrap()
        .unwrap_err();
    assert_eq!(cancelled.code(), Some(&SqlState::QUERY_CANCELED));
}

#[tokio::test]
async fn trusted_users_share_pooled_transactions_and_idle_logins_close() {
    let server = Postgres::start(&[]).await;
    server.psql("postgres", "CREATE DATABASE app").await;
    server.psql("app", "CREATE TABLE ledger (n int)").await;
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.txt");
    // A plain password: the DBLB answers the server's SCRAM with it.
    std::fs::write(&users, format!("\"postgres\" \"{PASSWORD}\"\n")).unwrap();
    let address = format!("127.0.0.1:{}", server.port);
    let config = [
        auth_module("trust", &users, "server_idle_timeout_ms = 1500"),
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
    let dblb = Dblb::start(dir.path(), &config, &["postgres"], &[]).await;
    let pg = dblb.listeners[0];

    // Trusted: no password needed, but only for the users of the file.
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(connect_as(pg, "postgres", "").await.unwrap());
    }
    let refused = connect_as(pg, "nobody", "").await.unwrap_err();
    assert_eq!(
        refused.as_db_error().map(|e| e.code()),
        Some(&SqlState::INVALID_PASSWORD)
    );
    let mut work = tokio::task::JoinSet::new();
    for (i, client) in clients.into_iter().enumerate() {
        work.spawn(async move {
            for n in 0..10 {
                let value = (i * 100 + n) as i32;
                // Unnamed statements: named ones cannot be pooled by transaction.
                client
                    .query_typed("INSERT INTO ledger VALUES ($1)", &[(&value, Type::INT4)])
                    .await
                    .unwrap();
            }
            client
        });
    }
    let clients = work.join_all().await;
    assert_eq!(
        server.psql("app", "SELECT count(*) FROM ledger").await,
        "80"
    );
    let logins = dblb
        .metric("dblb_server_logins_total", "outcome=\"ok\"")
        .await;
    assert!(
        (1.0..=2.0).contains(&logins),
        "8 clients served by at most max_connections logins, got {logins}"
    );
    assert!(server_connections(&server).await <= 2);

    // Once every client has left, the logins stay for the next ones, then close when unused.
    drop(clients);
    let again = connect_as(pg, "postgres", "").await.unwrap();
    again.simple_query("SELECT 1").await.unwrap();
    drop(again);
    assert_eq!(
        dblb.metric("dblb_server_logins_total", "outcome=\"ok\"")
            .await,
        logins,
        "a later client reuses a login"
    );
    eventually("idle logins closed", DEADLINE, || async {
        server_connections(&server).await == 0
    })
    .await;
}
