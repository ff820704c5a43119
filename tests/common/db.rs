//! The database a test cluster runs on: a fresh SQLite file in the test's folder, or, when
//! `FASTCHAT_TEST_POSTGRES` names a PostgreSQL server (`scripts/postgres.sh start` prints its
//! URL), a fresh database on it, dropped when the test ends. [`Sql`] lets a test look into (or
//! tamper with) either, with the same statements.

use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The PostgreSQL server the tests run on, if any.
pub fn postgres_url() -> Option<String> {
    std::env::var("FASTCHAT_TEST_POSTGRES")
        .ok()
        .filter(|s| !s.is_empty())
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    format!("{host_part}/{name}{query}")
}

fn pg_connect(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls).unwrap_or_else(|e| {
        panic!(
            "FASTCHAT_TEST_POSTGRES is set, but PostgreSQL cannot be reached at it: {e} \
             (scripts/postgres.sh start DIR starts one)"
        )
    })
}

/// A database of its own on the tests' PostgreSQL server; dropped with this.
pub struct PgDatabase {
    server: String,
    name: String,
    /// The URL of this database, for `--db`.
    pub url: String,
}

impl PgDatabase {
    pub fn create(server: &str) -> PgDatabase {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "fct_{}_{}_{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        pg_connect(server)
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
        PgDatabase {
            server: server.to_string(),
            url: with_database(server, &name),
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.server, postgres::NoTls) {
            let _ = c.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// A statement parameter either backend takes.
pub trait Param: rusqlite::ToSql + postgres::types::ToSql + Sync {}
impl<T: rusqlite::ToSql + postgres::types::ToSql + Sync> Param for T {}

/// A column type either backend reads.
pub trait Col: rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a> {}
impl<T: rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a>> Col for T {}

/// A connection to a test cluster's database.
pub enum Sql {
    Lite(rusqlite::Connection),
    Pg(RefCell<postgres::Client>),
}

/// A row read through [`Sql`].
pub enum Row {
    Lite(Vec<rusqlite::types::Value>),
    Pg(postgres::Row),
}

impl Row {
    /// Column `i` as a `T`.
    pub fn get<T: Col>(&self, i: usize) -> T {
        match self {
            Row::Lite(values) => {
                T::column_result(rusqlite::types::ValueRef::from(&values[i])).expect("column")
            }
            Row::Pg(row) => row.try_get(i).expect("column"),
        }
    }
}

/// `sql` in PostgreSQL's dialect: `?N` parameters become `$N`, and the column `user` (a
/// reserved word there) is quoted.
fn pg_dialect(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let chars = sql.chars();
    let mut in_string = false;
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word == "user" {
            out.push_str("\"user\"");
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in chars {
        if in_string {
            out.push(c);
            if c == '\'' {
                in_string = false;
            }
            continue;
        }
        if c.is_alphanumeric() || c == '_' {
            word.push(c);
            continue;
        }
        flush(&mut word, &mut out);
        match c {
            '\'' => {
                in_string = true;
                out.push(c);
            }
            '?' => out.push('$'),
            c => out.push(c),
        }
    }
    flush(&mut word, &mut out);
    out
}

impl Sql {
    /// Opens `db` (a file path or a PostgreSQL URL).
    pub fn open(db: &str) -> Sql {
        if db.starts_with("postgres://") {
            Sql::Pg(RefCell::new(pg_connect(db)))
        } else {
            let c = rusqlite::Connection::open(Path::new(db)).expect("open db");
            c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
            Sql::Lite(c)
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Sql::Pg(_))
    }

    /// Whether the database's write lock (SQLite's, or the advisory lock every PostgreSQL
    /// writer batch takes) can be had now; given back at once.
    pub fn write_lock_free(&self) -> bool {
        match self {
            Sql::Lite(c) => {
                c.busy_timeout(std::time::Duration::from_millis(200))
                    .unwrap();
                c.execute_batch("BEGIN IMMEDIATE; ROLLBACK").is_ok()
            }
            Sql::Pg(c) => {
                let lock = fastchat::db::postgres::WRITE_LOCK;
                let mut c = c.borrow_mut();
                let free: bool = c
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&lock])
                    .unwrap()
                    .get(0);
                if free {
                    c.execute("SELECT pg_advisory_unlock($1)", &[&lock])
                        .unwrap();
                }
                free
            }
        }
    }

    /// Runs one statement; how many rows it changed.
    pub fn exec(&self, sql: &str, params: &[&dyn Param]) -> usize {
        match self {
            Sql::Lite(c) => c
                .execute(sql, rusqlite::params_from_iter(lite(params)))
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
            Sql::Pg(c) => c
                .borrow_mut()
                .execute(pg_dialect(sql).as_str(), &pg(params))
                .unwrap_or_else(|e| panic!("{sql}: {e}")) as usize,
        }
    }

    /// Every row of a query.
    pub fn rows(&self, sql: &str, params: &[&dyn Param]) -> Vec<Row> {
        match self {
            Sql::Lite(c) => {
                let mut stmt = c.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
                let n = stmt.column_count();
                stmt.query_map(rusqlite::params_from_iter(lite(params)), |r| {
                    (0..n)
                        .map(|i| r.get::<_, rusqlite::types::Value>(i))
                        .collect::<rusqlite::Result<Vec<_>>>()
                        .map(Row::Lite)
                })
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
            }
            Sql::Pg(c) => c
                .borrow_mut()
                .query(pg_dialect(sql).as_str(), &pg(params))
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .into_iter()
                .map(Row::Pg)
                .collect(),
        }
    }

    /// The first column of every row.
    pub fn column<T: Col>(&self, sql: &str, params: &[&dyn Param]) -> Vec<T> {
        self.rows(sql, params).iter().map(|r| r.get(0)).collect()
    }

    /// The first column of the one row a query returns.
    pub fn one<T: Col>(&self, sql: &str, params: &[&dyn Param]) -> T {
        let rows = self.rows(sql, params);
        assert_eq!(rows.len(), 1, "{sql}: expected one row");
        rows[0].get(0)
    }

    /// Every value of every table of the fastchat schema, as bytes (`bytea` raw, the rest as
    /// text), by table: what a thief with a copy of a PostgreSQL database reads.
    pub fn dump_postgres(&self) -> Vec<(String, Vec<u8>)> {
        let columns = self.rows(
            "SELECT table_name::TEXT, column_name::TEXT, data_type::TEXT
               FROM information_schema.columns WHERE table_schema = 'public'",
            &[],
        );
        let mut out = Vec::new();
        for col in &columns {
            let (table, column, kind): (String, String, String) =
                (col.get(0), col.get(1), col.get(2));
            let q = if kind == "bytea" {
                format!("SELECT \"{column}\" FROM \"{table}\" WHERE \"{column}\" IS NOT NULL")
            } else {
                format!(
                    "SELECT convert_to(\"{column}\"::TEXT, 'UTF8') FROM \"{table}\"
                      WHERE \"{column}\" IS NOT NULL"
                )
            };
            let Sql::Pg(c) = self else {
                panic!("not a PostgreSQL database")
            };
            let rows = c.borrow_mut().query(q.as_str(), &[]).expect("dump");
            for r in rows {
                out.push((format!("{table}.{column}"), r.get::<_, Vec<u8>>(0)));
            }
        }
        out
    }

    /// Runs statements without parameters.
    pub fn batch(&self, sql: &str) {
        match self {
            Sql::Lite(c) => c.execute_batch(sql),
            Sql::Pg(c) => {
                return c
                    .borrow_mut()
                    .batch_execute(&pg_dialect(sql))
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
            }
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

fn lite<'a>(params: &'a [&'a dyn Param]) -> impl Iterator<Item = &'a dyn rusqlite::ToSql> {
    params.iter().map(|p| *p as &dyn rusqlite::ToSql)
}

fn pg<'a>(params: &'a [&'a dyn Param]) -> Vec<&'a (dyn postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|p| *p as &(dyn postgres::types::ToSql + Sync))
        .collect()
}
