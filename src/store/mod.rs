//! Postgres, the system of record: connecting (creating the database if needed), migrations,
//! and one file of queries per table. Store functions take a `&mut PgConnection` so callers
//! compose them into one transaction.

pub mod attempts;
pub mod audit;
pub mod batches;
pub mod budgets;
pub mod circuits;
pub mod cost_ledger;
pub mod group;
pub mod jobs;
pub mod limiter;
pub mod outbox;
pub mod results;

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

use crate::config::DatabaseSettings;

/// The embedded migrations of `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Why the store could not be reached or prepared.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database url: {0}")]
    Url(#[source] sqlx::Error),
    #[error(
        "cannot connect to Postgres at {address}: {source}. Is it running? Start it with \
         `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, or set \
         [database] url / SWITCHYARD_DATABASE__URL"
    )]
    Unreachable {
        address: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database name {0:?} may only contain letters, digits and underscores")]
    BadName(String),
    #[error("cannot create database {name}: {source}")]
    Create {
        name: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot apply migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Query(#[from] sqlx::Error),
}

fn address(options: &PgConnectOptions) -> String {
    format!("{}:{}", options.get_host(), options.get_port())
}

/// Parses a database URL. Without an explicit `sslmode`, a server on a loopback address or a
/// Unix socket is reached without TLS: encrypting traffic that never leaves the machine
/// protects nothing and cost about a fifth of a worker's CPU (issue 9's profile). Every other
/// host keeps sqlx's default, `prefer`; any URL can say `?sslmode=require` (or `disable`).
pub fn connect_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    let options = PgConnectOptions::from_str(url).map_err(StoreError::Url)?;
    // Any TLS setting in the URL or the environment is the user's choice, not ours to drop.
    const TLS_KEYS: &[&str] = &[
        "sslmode",
        "ssl-mode",
        "sslrootcert",
        "ssl-root-cert",
        "ssl-ca",
        "sslcert",
        "ssl-cert",
        "sslkey",
        "ssl-key",
    ];
    const TLS_ENV: &[&str] = &["PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY"];
    let explicit = url::Url::parse(url)
        .map(|u| {
            u.query_pairs()
                .any(|(key, _)| TLS_KEYS.contains(&key.as_ref()))
        })
        .unwrap_or(true)
        || TLS_ENV.iter().any(|name| std::env::var_os(name).is_some());
    if explicit || !is_local(options.get_host()) {
        return Ok(options);
    }
    Ok(options.ssl_mode(PgSslMode::Disable))
}

/// Whether `host` is this machine: a loopback address, `localhost`, or a socket directory.
fn is_local(host: &str) -> bool {
    host == "localhost"
        || host.starts_with('/')
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// How long a pooled connection may sit idle before it is pinged when handed out.
const PING_AFTER_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Connects a pool; with `auto_migrate`, first creates the database when missing and then
/// applies pending migrations.
pub async fn connect(settings: &DatabaseSettings) -> Result<PgPool, StoreError> {
    let options = connect_options(&settings.url)?;
    if settings.auto_migrate {
        create_database_if_missing(&options).await?;
    }
    // sqlx pings a connection when it goes back to the pool, and by default again before
    // handing it out: a round trip added to every transaction. A connection back for less
    // than `PING_AFTER_IDLE` answered that release ping a moment ago, so only one idle for
    // longer (through a Postgres restart, say) is pinged, and replaced if it is dead.
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_AFTER_IDLE {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_with(options.clone())
        .await
        .map_err(|source| StoreError::Unreachable {
            address: address(&options),
            source,
        })?;
    if settings.auto_migrate {
        MIGRATOR.run(&pool).await?;
    }
    Ok(pool)
}

/// The database named in `options`, checked to be `[A-Za-z0-9_]+` (identifiers cannot be
/// bound), and a connection to the server's `postgres` database to create or drop it from.
async fn admin_connection(
    options: &PgConnectOptions,
) -> Result<(String, PgConnection), StoreError> {
    let name = options.get_database().unwrap_or("postgres").to_owned();
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(StoreError::BadName(name));
    }
    let admin = options
        .clone()
        .database("postgres")
        .connect()
        .await
        .map_err(|source| StoreError::Unreachable {
            address: address(options),
            source,
        })?;
    Ok((name, admin))
}

/// Creates the database named in `options` unless it exists, via the `postgres` database.
pub async fn create_database_if_missing(options: &PgConnectOptions) -> Result<(), StoreError> {
    let (name, mut admin) = admin_connection(options).await?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_optional(&mut admin)
        .await?;
    if exists.is_none() {
        // Identifiers cannot be bound; `admin_connection` checked the name is [A-Za-z0-9_]+.
        let statement = format!("CREATE DATABASE \"{name}\"");
        match sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&mut admin)
            .await
        {
            Ok(_) => tracing::info!(database = %name, "Created the database."),
            // Another process created it between our check and our CREATE.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(source) => return Err(StoreError::Create { name, source }),
        }
    }
    admin.close().await?;
    Ok(())
}

/// Drops the database named in `options` if it exists, with whatever sessions are still
/// connected to it (`WITH (FORCE)`): the tests' and the benchmark's throwaway databases.
pub async fn drop_database_if_exists(options: &PgConnectOptions) -> Result<(), StoreError> {
    let (name, mut admin) = admin_connection(options).await?;
    let statement = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
    sqlx::query(sqlx::AssertSqlSafe(statement))
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    Ok(())
}

/// Runs migrations on an existing database (`switchyard migrate`).
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Opens a single connection (for tools that need no pool).
pub async fn connect_one(url: &str) -> Result<PgConnection, StoreError> {
    let options = connect_options(url)?;
    options
        .connect()
        .await
        .map_err(|source| StoreError::Unreachable {
            address: address(&options),
            source,
        })
}

/// A query with its arguments bound so far; store functions add their rows' columns to it.
pub type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// The arguments of an `UNNEST` of one array per column, numbered from `$first`:
/// `$1::uuid[], $2::text[]` for `unnest_arguments(1, &["uuid", "text"])`. Lets one table's
/// insert stand alone or as one part of a larger statement.
pub fn unnest_arguments(first: usize, types: &[&str]) -> String {
    types
        .iter()
        .enumerate()
        .map(|(i, ty)| format!("${}::{ty}[]", first + i))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `error` says Postgres could not be reached or went away (connection lost, pool
/// exhausted or closed, the server shutting down or not yet accepting connections), rather
/// than that it refused the statement.
pub fn is_unreachable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // Class 08: connection exceptions; 57P01–57P03: admin or crash shutdown, cannot
        // connect now.
        sqlx::Error::Database(error) => error
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P0")),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_or_exhausted_connection_is_unreachable_and_a_refused_statement_is_not() {
        assert!(is_unreachable(&sqlx::Error::PoolTimedOut));
        assert!(is_unreachable(&sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset
        ))));
        assert!(!is_unreachable(&sqlx::Error::RowNotFound));
        assert!(!is_unreachable(&sqlx::Error::ColumnNotFound(
            "x".to_owned()
        )));
    }

    #[test]
    fn unnest_arguments_are_numbered_from_the_first_one_given() {
        assert_eq!(unnest_arguments(1, &["uuid"]), "$1::uuid[]");
        assert_eq!(
            unnest_arguments(9, &["uuid", "text", "int4"]),
            "$9::uuid[], $10::text[], $11::int4[]"
        );
    }

    fn mode(url: &str) -> PgSslMode {
        connect_options(url).unwrap().get_ssl_mode()
    }

    #[test]
    fn a_loopback_server_without_a_tls_setting_is_reached_without_tls() {
        for url in [
            "postgres://postgres@127.0.0.1:5432/db",
            "postgres://postgres@localhost/db",
            "postgres://postgres@[::1]/db",
        ] {
            assert!(matches!(mode(url), PgSslMode::Disable), "{url}");
        }
    }

    #[test]
    fn a_tls_setting_or_a_remote_host_keeps_sqlxs_tls_choice() {
        let cases = [
            (
                "postgres://postgres@127.0.0.1/db?sslmode=require",
                PgSslMode::Require,
            ),
            (
                "postgres://postgres@127.0.0.1/db?ssl-mode=require",
                PgSslMode::Require,
            ),
            ("postgres://postgres@db.internal:5432/db", PgSslMode::Prefer),
            ("postgres://postgres@10.1.2.3/db", PgSslMode::Prefer),
        ];
        for (url, expected) in cases {
            assert_eq!(
                std::mem::discriminant(&mode(url)),
                std::mem::discriminant(&expected),
                "{url}"
            );
        }
        // A root certificate alone keeps TLS on (sqlx may also raise it to `verify-ca`).
        assert!(!matches!(
            mode("postgres://postgres@127.0.0.1/db?sslrootcert=/etc/ca.pem"),
            PgSslMode::Disable
        ));
    }
}
