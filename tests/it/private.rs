//! Private RabbitMQ and Postgres instances for tests that stop and restart them: the shared
//! ones (5672, 5432) serve every other test and are never touched. Each instance lives in its
//! own directory under the temp dir and is stopped and removed on drop, also when the test
//! fails; one left over by a killed test run (its owner process gone) is cleaned up by the
//! next start. The ports are fixed, so the tests using them run one at a time (nextest group
//! `chaos`), and a test finding its port taken — say by another checkout's run — fails
//! instead of touching it.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// AMQP port of the private RabbitMQ node.
pub const RABBIT_PORT: u16 = 5673;
/// Erlang distribution port of the private node (the shared node uses 25672).
const RABBIT_DIST_PORT: u16 = 25673;
/// Port of the private Postgres server.
pub const POSTGRES_PORT: u16 = 5433;

const RABBIT_DIR_PREFIX: &str = "sy-chaos-rabbit-";
const POSTGRES_DIR_PREFIX: &str = "sy-chaos-postgres-";

fn run(command: &mut Command) -> std::process::Output {
    let output = command.stdin(Stdio::null()).output();
    output.unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

fn run_ok(command: &mut Command) {
    let output = run(command);
    assert!(
        output.status.success(),
        "{command:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// Waits until `port` accepts connections (`true`) or is closed (`false`).
pub fn wait_for_port(port: u16, open: bool, within: Duration) {
    let deadline = Instant::now() + within;
    while port_open(port) != open {
        assert!(
            Instant::now() < deadline,
            "port {port} did not {} within {within:?}",
            if open { "open" } else { "close" }
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Directories whose name starts with `prefix` left by test processes that are gone (killed
/// before their drop ran). A directory whose owner still runs — another checkout's test run —
/// is never touched.
fn leftovers(prefix: &str) -> Vec<PathBuf> {
    let owner_alive = |dir: &Path| {
        std::fs::read_to_string(dir.join("owner"))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok())
            .is_none_or(|pid| Path::new(&format!("/proc/{pid}")).exists())
    };
    std::fs::read_dir(std::env::temp_dir())
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .filter(|dir| !owner_alive(dir))
                .collect()
        })
        .unwrap_or_default()
}

/// Records this test process as the owner of an instance directory.
fn claim(dir: &Path) {
    std::fs::write(dir.join("owner"), std::process::id().to_string()).unwrap();
}

fn chown(path: &Path, user: &str) {
    run_ok(
        Command::new("chown")
            .args(["-R", &format!("{user}:{user}")])
            .arg(path),
    );
}

/// A RabbitMQ node of its own on 127.0.0.1:5673 (management plugin off).
pub struct PrivateRabbit {
    dir: tempfile::TempDir,
    node: String,
}

impl PrivateRabbit {
    /// Starts a fresh node and waits until it accepts AMQP connections.
    pub fn start() -> Self {
        for dir in leftovers(RABBIT_DIR_PREFIX) {
            if let Ok(node) = std::fs::read_to_string(dir.join("node")) {
                let _ = run(Command::new("rabbitmqctl").args(["-n", node.trim(), "stop"]));
            }
            let _ = std::fs::remove_dir_all(dir);
        }
        assert!(
            !port_open(RABBIT_PORT),
            "port {RABBIT_PORT} is taken by something this test did not start"
        );
        let dir = tempfile::Builder::new()
            .prefix(RABBIT_DIR_PREFIX)
            .tempdir()
            .expect("temp dir");
        claim(dir.path());
        let node = format!("chaos-{}@localhost", fastrand::u32(..));
        std::fs::write(dir.path().join("node"), &node).unwrap();
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{RABBIT_PORT}\n"),
        )
        .unwrap();
        std::fs::write(dir.path().join("enabled_plugins"), "[].\n").unwrap();
        std::fs::create_dir_all(dir.path().join("mnesia")).unwrap();
        std::fs::create_dir_all(dir.path().join("log")).unwrap();
        run_ok(Command::new("chmod").arg("755").arg(dir.path()));
        chown(dir.path(), "rabbitmq");
        let rabbit = Self { dir, node };
        rabbit.start_again();
        rabbit
    }

    /// `amqp://guest:guest@127.0.0.1:5673/%2f`
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{RABBIT_PORT}/%2f")
    }

    /// Starts the (stopped) node again with the same data, and waits for its listener.
    pub fn start_again(&self) {
        let dir = self.dir.path();
        run_ok(
            Command::new("rabbitmq-server")
                .arg("-detached")
                .env("RABBITMQ_NODENAME", &self.node)
                .env("RABBITMQ_DIST_PORT", RABBIT_DIST_PORT.to_string())
                .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
                .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
                .env("RABBITMQ_LOG_BASE", dir.join("log"))
                .env("RABBITMQ_PID_FILE", dir.join("pid"))
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        wait_for_port(RABBIT_PORT, true, Duration::from_secs(120));
    }

    /// Stops the node (its queues and messages are durable and come back on start).
    pub fn stop(&self) {
        run_ok(Command::new("rabbitmqctl").args(["-n", &self.node, "stop"]));
        wait_for_port(RABBIT_PORT, false, Duration::from_secs(30));
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        let _ = run(Command::new("rabbitmqctl").args(["-n", &self.node, "stop"]));
    }
}

/// A Postgres server of its own on 127.0.0.1:5433 (trust auth, user `postgres`), from
/// Debian's postgresql package binaries, run as the `postgres` user.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("Postgres binaries under /usr/lib/postgresql (Debian's postgresql package)")
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("an initdb under /usr/lib/postgresql/*/bin")
}

fn as_postgres(program: &Path) -> Command {
    let mut command = Command::new("runuser");
    command.args(["-u", "postgres", "--"]).arg(program);
    command
}

impl PrivatePostgres {
    /// Creates a fresh cluster and starts it.
    pub fn start() -> Self {
        let bin = postgres_bin();
        for dir in leftovers(POSTGRES_DIR_PREFIX) {
            let _ = run(as_postgres(&bin.join("pg_ctl"))
                .arg("-D")
                .arg(dir.join("data"))
                .args(["-m", "immediate", "-w", "stop"]));
            let _ = std::fs::remove_dir_all(dir);
        }
        assert!(
            !port_open(POSTGRES_PORT),
            "port {POSTGRES_PORT} is taken by something this test did not start"
        );
        let dir = tempfile::Builder::new()
            .prefix(POSTGRES_DIR_PREFIX)
            .tempdir()
            .expect("temp dir");
        claim(dir.path());
        run_ok(Command::new("chmod").arg("755").arg(dir.path()));
        chown(dir.path(), "postgres");
        run_ok(
            as_postgres(&bin.join("initdb"))
                .arg("-D")
                .arg(dir.path().join("data"))
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]),
        );
        let postgres = Self { dir, bin };
        postgres.start_again();
        postgres
    }

    /// `postgres://postgres@127.0.0.1:5433`
    pub fn server(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{POSTGRES_PORT}")
    }

    /// Starts the stopped server again on the same data.
    pub fn start_again(&self) {
        let dir = self.dir.path();
        run_ok(
            as_postgres(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(dir.join("data"))
                .arg("-l")
                .arg(dir.join("log"))
                .arg("-o")
                .arg(format!(
                    "-p {POSTGRES_PORT} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
                    dir.display()
                ))
                .args(["-w", "-t", "60", "start"])
                .stdout(Stdio::null()),
        );
        wait_for_port(POSTGRES_PORT, true, Duration::from_secs(30));
    }

    /// Stops the server (fast: open connections are cut).
    pub fn stop(&self) {
        run_ok(
            as_postgres(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-m", "fast", "-w", "stop"])
                .stdout(Stdio::null()),
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = run(as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"]));
    }
}
