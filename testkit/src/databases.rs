//! Real database servers for the DBLB's tests: PostgreSQL (Debian `postgresql`) and MariaDB
//! (Debian `mariadb-server`), each initialised in a temporary directory and listening on a free
//! loopback port with password authentication over TCP. They can be stopped and started again
//! on the same port and data, as a server that goes down and comes back. When the tests run as
//! root, PostgreSQL runs as the `postgres` user the package creates (it refuses root).

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::process::Command;

use crate::{
    eventually,
    external::{Process, free_port, require},
};

/// The password of the PostgreSQL superuser `postgres` and of MariaDB's `app` user.
pub const PASSWORD: &str = "secret";

const READY: Duration = Duration::from_secs(60);

async fn run(what: &str, command: &mut Command) -> String {
    let output = command
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("{what} cannot start: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// The uid and gid of a system user.
fn user_ids(user: &str) -> (u32, u32) {
    let id = |flag: &str| {
        std::process::Command::new("id")
            .args([flag, user])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or_else(|| {
                panic!("PostgreSQL will not run as root and there is no `{user}` user; create one with: sudo useradd --system {user}")
            })
    };
    (id("-u"), id("-g"))
}

/// A PostgreSQL server; the superuser `postgres` logs in over TCP with [`PASSWORD`]
/// (SCRAM-SHA-256).
pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    /// The unprivileged user the server runs as, when the tests run as root.
    owner: Option<(u32, u32)>,
    settings: Vec<String>,
    process: Option<Process>,
    dir: tempfile::TempDir,
}

impl Postgres {
    /// Initialises and starts a server; `settings` are extra `name=value` server settings.
    pub async fn start(settings: &[&str]) -> Postgres {
        require(
            "PostgreSQL",
            "ls /usr/lib/postgresql/*/bin/postgres",
            "sudo apt-get install -y postgresql",
        );
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("/usr/lib/postgresql")
            .filter_map(|e| e.ok())
            .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path())))
            .max()
            .map(|(_, path)| path.join("bin"))
            .expect("a PostgreSQL version under /usr/lib/postgresql");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let owner = running_as_root().then(|| user_ids("postgres"));
        std::fs::write(dir.path().join("password"), PASSWORD).unwrap();
        if owner.is_some() {
            run(
                "chown",
                Command::new("chown")
                    .arg("-R")
                    .arg("postgres:")
                    .arg(dir.path()),
            )
            .await;
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.path().join("data"))
            .args([
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "--auth-local=trust",
            ])
            .args(["--auth-host=scram-sha-256", "--pwfile"])
            .arg(dir.path().join("password"));
        if let Some((uid, gid)) = owner {
            initdb.uid(uid).gid(gid);
        }
        run("initdb", &mut initdb).await;
        let mut server = Postgres {
            port: free_port(),
            bin,
            owner,
            settings: settings.iter().map(|s| (*s).to_owned()).collect(),
            process: None,
            dir,
        };
        server.resume().await;
        server
    }

    /// A program of this PostgreSQL version (`psql`, `pgbench` ...).
    pub fn bin(&self, program: &str) -> PathBuf {
        self.bin.join(program)
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// Starts the server again after [`Postgres::stop`] (same port, same data) and waits until
    /// it takes logins.
    pub async fn resume(&mut self) {
        let mut command = std::process::Command::new(self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.log()).unwrap());
        for setting in &self.settings {
            command.arg("-c").arg(setting);
        }
        if let Some((uid, gid)) = self.owner {
            std::os::unix::process::CommandExt::uid(&mut command, uid);
            std::os::unix::process::CommandExt::gid(&mut command, gid);
        }
        let mut process = Process::spawn("postgres", &mut command);
        let addr = ([127, 0, 0, 1], self.port).into();
        process.wait_listening(addr, READY, &self.log()).await;
        let (isready, port) = (self.bin("pg_isready"), self.port.to_string());
        eventually("PostgreSQL takes logins", READY, || {
            let mut check = Command::new(&isready);
            check
                .args(["-h", "127.0.0.1", "-U", "postgres", "-p", &port])
                .stdout(Stdio::null());
            async move { check.status().await.is_ok_and(|s| s.success()) }
        })
        .await;
        self.process = Some(process);
    }

    /// Stops the server (fast shutdown: sessions end, the port closes) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.signal("INT");
            process.wait();
        }
    }

    /// Runs `sql` with psql directly on this server as `postgres`; its unaligned output.
    pub async fn psql(&self, database: &str, sql: &str) -> String {
        run(
            "psql",
            Command::new(self.bin("psql"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                    "-At",
                    "-v",
                    "ON_ERROR_STOP=1",
                ])
                .arg("-p")
                .arg(self.port.to_string())
                .args(["-d", database, "-c", sql])
                .env("PGPASSWORD", PASSWORD),
        )
        .await
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A MariaDB server; `app` (password [`PASSWORD`]) may do anything from anywhere, and the
/// database `shop` exists.
pub struct MariaDb {
    pub port: u16,
    process: Option<Process>,
    root: bool,
    dir: tempfile::TempDir,
}

impl MariaDb {
    pub async fn start() -> MariaDb {
        require(
            "MariaDB",
            "{ command -v mariadbd || test -x /usr/sbin/mariadbd; } && command -v mariadb-install-db && command -v mariadb",
            "sudo apt-get install -y mariadb-server mariadb-client",
        );
        let dir = tempfile::tempdir().expect("a temporary directory");
        let root = running_as_root();
        let mut install = Command::new("mariadb-install-db");
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            // Its own temporary directory: two servers set up at once in a shared /tmp can
            // trip over each other's temporary tables.
            .arg(format!("--tmpdir={}", dir.path().display()));
        if root {
            install.arg("--user=root");
        }
        run("mariadb-install-db", &mut install).await;
        let mut server = MariaDb {
            port: free_port(),
            process: None,
            root,
            dir,
        };
        server.resume().await;
        server
            .sql(&format!(
                "CREATE USER 'app'@'%' IDENTIFIED BY '{PASSWORD}'; GRANT ALL ON *.* TO 'app'@'%'; CREATE DATABASE shop;"
            ))
            .await;
        server
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("mysqld.sock")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("error.log")
    }

    /// Starts the server again after [`MariaDb::stop`] and waits until it answers.
    pub async fn resume(&mut self) {
        let data = self.dir.path().join("data");
        // Debian puts the server in /usr/sbin, which is not on every user's PATH.
        let program = if std::path::Path::new("/usr/sbin/mariadbd").exists() {
            "/usr/sbin/mariadbd"
        } else {
            "mariadbd"
        };
        let mut command = std::process::Command::new(program);
        command
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!(
                "--pid-file={}",
                self.dir.path().join("mysqld.pid").display()
            ))
            .arg(format!("--log-error={}", self.log().display()))
            .arg(format!("--tmpdir={}", self.dir.path().display()))
            .args([
                "--skip-log-bin",
                "--innodb-buffer-pool-size=32M",
                "--skip-name-resolve",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.root {
            command.arg("--user=root");
        }
        let mut process = Process::spawn("mariadbd", &mut command);
        let addr = ([127, 0, 0, 1], self.port).into();
        process.wait_listening(addr, READY, &self.log()).await;
        self.process = Some(process);
    }

    /// Stops the server (SIGTERM, a clean shutdown) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.signal("TERM");
            process.wait();
        }
    }

    /// Runs `sql` as root on the server's socket; its tab-separated output.
    pub async fn sql(&self, sql: &str) -> String {
        run(
            "mariadb",
            Command::new("mariadb")
                .arg("--no-defaults")
                .arg(format!("--socket={}", self.socket().display()))
                .args(["-uroot", "-N", "-B", "-e", sql]),
        )
        .await
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.stop();
    }
}
