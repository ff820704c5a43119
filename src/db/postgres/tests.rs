//! Tests of the PostgreSQL backend, on a fresh database of the server that
//! `FASTCHAT_TEST_POSTGRES` names (`scripts/postgres.sh start DIR` prints one; `.ci/run` sets
//! it). Without it they say so and pass: `cargo test` needs no PostgreSQL; with it set and the
//! server unreachable, they fail.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{redacted, schema, Conn};
use crate::db::{Location, Options, Outgoing, Store, Tx};
use crate::error::{Error, ErrorCode, Result};
use crate::net::{PublicKeys, WrappedKey};

/// A database of its own, dropped at the end of the test.
struct Fresh {
    server: String,
    name: String,
    url: String,
}

impl Fresh {
    fn new() -> Option<Fresh> {
        let Some(server) = std::env::var("FASTCHAT_TEST_POSTGRES")
            .ok()
            .filter(|s| !s.is_empty())
        else {
            eprintln!("NOT RUN: set FASTCHAT_TEST_POSTGRES to test the PostgreSQL backend");
            return None;
        };
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!(
            "fcu_{}_{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut admin = postgres::Client::connect(&server, postgres::NoTls)
            .unwrap_or_else(|e| panic!("FASTCHAT_TEST_POSTGRES is set but unreachable: {e}"));
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
            .and_then(|()| admin.batch_execute(&format!("CREATE DATABASE {name}")))
            .expect("create a database");
        let base = server.rsplit_once('/').expect("a URL with a database").0;
        let url = format!("{base}/{name}");
        Some(Fresh { server, name, url })
    }

    fn location(&self) -> Location {
        Location::Postgres(self.url.clone())
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        if let Ok(mut admin) = postgres::Client::connect(&self.server, postgres::NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

fn keys() -> PublicKeys {
    PublicKeys {
        x25519: vec![1; 32],
        ed25519: vec![2; 32],
    }
}

#[test]
fn merged_statements_take_bounded_chunks_in_order() {
    use super::chunks;
    assert!(chunks(&[], 10).is_empty());
    assert_eq!(chunks(&[3, 3, 3, 3], 10), [0..3, 3..4]);
    assert_eq!(
        chunks(&[30, 1, 1, 30], 10),
        [0..1, 1..3, 3..4],
        "one item over the bound alone"
    );
    assert_eq!(
        chunks(&[0, 0, 0], 10),
        vec![std::ops::Range { start: 0, end: 3 }]
    );
}

#[test]
fn a_url_is_shown_without_its_password() {
    assert_eq!(
        redacted("postgres://fastchat:s3cret@10.0.0.4:5432/chat?sslmode=require"),
        "postgres://fastchat:***@10.0.0.4:5432/chat?sslmode=require"
    );
    assert_eq!(redacted("postgres://me@host/db"), "postgres://me@host/db");
    assert_eq!(
        Location::parse("postgresql://a:b@h/d").to_string(),
        "postgresql://a:***@h/d"
    );
    assert_eq!(
        Location::parse("/tmp/chat.db"),
        Location::Sqlite("/tmp/chat.db".into())
    );
}

#[test]
fn migrations_are_versioned_and_a_newer_schema_is_refused() -> Result<()> {
    let Some(db) = Fresh::new() else {
        return Ok(());
    };
    let mut conn = Conn::connect(&db.url, Duration::from_secs(5))?;
    schema::migrate(&mut conn)?;
    schema::migrate(&mut conn)?;
    let v: i32 = conn
        .one("SELECT version FROM fastchat_schema", &[])?
        .try_get(0)?;
    assert_eq!(v as usize, schema::version());
    conn.batch("UPDATE fastchat_schema SET version = 999")?;
    match schema::migrate(&mut conn) {
        Err(Error::Invalid(m)) => assert!(m.contains("newer than this program"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    Ok(())
}

#[test]
fn the_storage_contract_holds() -> Result<()> {
    let Some(db) = Fresh::new() else {
        return Ok(());
    };
    let store = Store::open(db.location())?;
    store.call(|tx| {
        assert!(tx.create_user("alice", "h", &keys())?);
        assert!(
            !tx.create_user("ALICE", "h2", &keys())?,
            "names ignore case"
        );
        assert!(tx.create_user("bob", "h", &keys())?);
        // The queue: ordered, idempotent, acknowledged by its recipient only.
        let a = tx.store_message(&Outgoing::new("alice", 1, b"one"), "bob")?;
        let b = tx.store_message(&Outgoing::new("alice", 2, b"two"), "bob")?;
        let again = tx.store_message(&Outgoing::new("alice", 1, b"one"), "bob")?;
        assert_eq!(a.envelope.id, again.envelope.id);
        match tx.store_message(&Outgoing::new("alice", 1, b"other"), "bob") {
            Err(Error::Refused { code, .. }) => assert_eq!(code, ErrorCode::Conflict),
            other => panic!("a reused client id: {other:?}"),
        }
        match tx.store_message(&Outgoing::new("alice", 3, b"x"), "nobody") {
            Err(Error::Refused { code, .. }) => assert_eq!(code, ErrorCode::UnknownUser),
            other => panic!("an unknown recipient: {other:?}"),
        }
        assert_eq!(tx.queued("bob", 0, 10)?.len(), 2);
        assert_eq!(tx.ack("alice", &[a.envelope.id])?, 0);
        assert_eq!(tx.ack("bob", &[a.envelope.id, b.envelope.id])?, 2);
        assert!(tx.queued("bob", 0, 10)?.is_empty());
        // Every id handed out is covered (a conflicting insert uses one up, unlike SQLite).
        assert!(tx.newest_message_id()? >= b.envelope.id);
        // A re-send of a delivered message is not stored again.
        let resend = Outgoing {
            resend_after: Some(0),
            ..Outgoing::new("alice", 1, b"one")
        };
        assert_eq!(tx.store_message(&resend, "bob")?.envelope.id, a.envelope.id);
        assert!(tx.queued("bob", 0, 10)?.is_empty());
        // Presence, read with the message that is routed by it.
        tx.add_presence(7, 1, "bob", b"t")?;
        tx.add_presence(9, 2, "bob", b"t")?;
        let c = tx.store_message(&Outgoing::new("alice", 4, b"x"), "bob")?;
        assert_eq!(c.online_at, [(7, "bob".into()), (9, "bob".into())]);
        assert_eq!(tx.online_users(10, &[9])?, ["bob"]);
        Ok(())
    })?;
    // A group message waits for every member, out-of-order acknowledgements included.
    store.call(|tx| {
        tx.create_user("carol", "h", &keys())?;
        assert!(tx.create_group("alice/team", "alice")?);
        assert!(!tx.create_group("Alice/Team", "bob")?);
        tx.add_member("alice/team", "bob")?;
        tx.add_member("alice/team", "carol")?;
        let one = tx.store_group_message(&Outgoing::new("alice", 10, b"g1"), "alice/team")?;
        let two = tx.store_group_message(&Outgoing::new("alice", 11, b"g2"), "alice/team")?;
        let ids = |tx: &mut dyn Tx, u: &str| -> Result<Vec<i64>> {
            Ok(tx.queued(u, 0, 10)?.iter().map(|m| m.id).collect())
        };
        assert!(ids(tx, "bob")?.contains(&one.envelope.id));
        tx.ack("bob", &[two.envelope.id])?;
        assert!(ids(tx, "bob")?.contains(&one.envelope.id), "the gap stays");
        tx.ack("bob", &[one.envelope.id])?;
        assert!(!ids(tx, "bob")?.contains(&one.envelope.id));
        assert_eq!(tx.queue_usage("g:alice/team")?.messages, 2, "carol has not");
        tx.ack("carol", &[one.envelope.id, two.envelope.id])?;
        assert_eq!(tx.queue_usage("g:alice/team")?.messages, 0);
        Ok(())
    })?;
    Ok(())
}

/// Several processes' writers (each a `Store` with its own connection) store messages for one
/// recipient at once, while a reader follows the queue as a login's sync does: it asks only for
/// ids above the last it saw. If ids did not follow commit order, a message committed after a
/// larger id was seen would be skipped.
#[test]
fn ids_follow_commit_order_across_writers() -> Result<()> {
    let Some(db) = Fresh::new() else {
        return Ok(());
    };
    const WRITERS: usize = 4;
    const EACH: u64 = 300;
    let first = Store::open(db.location())?;
    first.call(|tx| {
        for u in ["bob", "w0", "w1", "w2", "w3"] {
            tx.create_user(u, "h", &keys())?;
        }
        Ok(())
    })?;
    let stores: Vec<Arc<Store>> = (0..WRITERS)
        .map(|_| Store::open(db.location()).map(Arc::new))
        .collect::<Result<_>>()?;
    let writers: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(w, store)| {
            let store = Arc::clone(store);
            std::thread::spawn(move || {
                let (done, finished) = crossbeam_channel::unbounded();
                let from = format!("w{w}");
                for i in 0..EACH {
                    let from = from.clone();
                    let done = done.clone();
                    store.submit(
                        move |tx| {
                            tx.store_message(&Outgoing::new(&from, i, b"x"), "bob")
                                .map(|_| ())
                        },
                        move |r| {
                            let _ = done.send(r);
                        },
                    );
                }
                for _ in 0..EACH {
                    finished.recv().expect("a completion").expect("stored");
                }
            })
        })
        .collect();
    let mut seen: Vec<i64> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let total = WRITERS * EACH as usize;
    let mut writers_done = false;
    loop {
        let after = seen.last().copied().unwrap_or(0);
        let batch = first.read(|tx| tx.queued("bob", after, 10_000))?;
        seen.extend(batch.iter().map(|m| m.id));
        if writers_done && batch.is_empty() {
            break;
        }
        if !writers_done && writers.iter().all(|w| w.is_finished()) {
            writers_done = true;
        }
        assert!(Instant::now() < deadline, "the writers never finished");
    }
    for w in writers {
        w.join().expect("a writer thread");
    }
    let stored = first.read(|tx| tx.queue_usage("bob"))?.messages as usize;
    assert_eq!(stored, total);
    assert_eq!(
        seen.len(),
        total,
        "a reader that follows ids saw every message"
    );
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
    Ok(())
}

#[test]
fn a_lost_connection_is_opened_again() -> Result<()> {
    let Some(db) = Fresh::new() else {
        return Ok(());
    };
    let store = Store::open_with(&db.location(), &Options::default())?;
    store.call(|tx| tx.create_user("alice", "h", &keys()).map(|_| ()))?;
    // An operator ends every connection to the database (a restart does the same).
    let mut admin = postgres::Client::connect(&db.server, postgres::NoTls).expect("admin");
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&db.name],
        )
        .expect("terminate");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // The first try may fail on the dead connection; the next ones connect again.
        let wrote = store.call(|tx| tx.create_user("bob", "h", &keys()));
        let read = store.read(|tx| tx.user_exists("alice"));
        if let (Ok(_), Ok(true)) = (wrote, read) {
            break;
        }
        assert!(Instant::now() < deadline, "never connected again");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(store.read(|tx| tx.user_exists("bob"))?);
    Ok(())
}

/// Read work that panics gives its connection's slot back: more panics than the pool has
/// connections leave it as able as before.
#[test]
fn a_read_that_panics_gives_its_connection_back() -> Result<()> {
    let Some(db) = Fresh::new() else {
        return Ok(());
    };
    let options = Options {
        busy_timeout: Duration::from_secs(2),
        ..Options::default()
    };
    let store = Store::open_with(&db.location(), &options)?;
    for _ in 0..super::MAX_READERS + 2 {
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = store.read(|tx| -> Result<()> {
                tx.user_exists("alice")?;
                panic!("a bug in read work");
            });
        }));
        assert!(panicked.is_err());
    }
    // With the slots lost, this would wait out the busy timeout and fail as Unavailable.
    assert!(!store.read(|tx| tx.user_exists("alice"))?);
    Ok(())
}

/// A job, boxed.
type Work = Box<dyn FnOnce(&mut dyn Tx) -> Result<()> + Send>;

/// Three jobs in one batch, the middle one failing in the database (a member for a group that
/// does not exist breaks a foreign key): guarded, it alone fails; unguarded, the batch is lost
/// and every job of it is told so. Never is a batch with a failed statement said to commit
/// (PostgreSQL answers COMMIT of a failed transaction with a rollback, not an error).
#[test]
fn a_failed_statement_fails_its_job_or_its_whole_batch_never_silently() -> Result<()> {
    let Some(db) = Fresh::new() else {
        return Ok(());
    };
    let store = Store::open(db.location())?;
    for guarded in [true, false] {
        let (tx, rx) = crossbeam_channel::unbounded();
        // Holds the writer so that the three jobs queue up and form one batch.
        store.submit(
            |_| {
                std::thread::sleep(Duration::from_millis(200));
                Ok(())
            },
            |_: Result<()>| {},
        );
        let names = if guarded { ["a1", "a3"] } else { ["b1", "b3"] };
        let submit = |work: Work, i: usize| {
            let tx = tx.clone();
            let done = move |r: Result<()>| {
                let _ = tx.send((i, r.is_ok()));
            };
            if guarded {
                store.submit(work, done);
            } else {
                store.submit_unguarded(work, done);
            }
        };
        let first = names[0].to_string();
        submit(
            Box::new(move |tx| tx.create_user(&first, "h", &keys()).map(|_| ())),
            1,
        );
        submit(Box::new(|tx| tx.add_member("no/such-group", "a1")), 2);
        let third = names[1].to_string();
        submit(
            Box::new(move |tx| tx.create_user(&third, "h", &keys()).map(|_| ())),
            3,
        );
        let mut results: Vec<(usize, bool)> = (0..3)
            .map(|_| rx.recv_timeout(Duration::from_secs(20)).expect("a result"))
            .collect();
        results.sort();
        let exists = |n: &str| store.read(|tx| tx.user_exists(n));
        if guarded {
            assert_eq!(results, [(1, true), (2, false), (3, true)]);
            assert!(exists(names[0])? && exists(names[1])?);
        } else {
            assert_eq!(results, [(1, false), (2, false), (3, false)]);
            assert!(!exists(names[0])? && !exists(names[1])?);
        }
    }
    // The writer goes on.
    store.call(|tx| tx.create_user("after", "h", &keys()))?;
    Ok(())
}

/// The connection is encrypted when the server offers TLS (scripts/postgres.sh, which CI uses,
/// turns it on).
#[test]
fn the_link_to_postgresql_uses_tls_when_offered() -> Result<()> {
    let Some(db) = Fresh::new() else {
        return Ok(());
    };
    let mut conn = Conn::connect(&db.url, Duration::from_secs(5))?;
    let offered: String = conn.one("SHOW ssl", &[])?.try_get(0)?;
    let ours: bool = conn
        .one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )?
        .try_get(0)?;
    assert_eq!(ours, offered == "on", "TLS is used exactly when offered");
    assert!(
        ours,
        "the tests' PostgreSQL should offer TLS (scripts/postgres.sh turns it on)"
    );
    Ok(())
}

#[test]
fn merged_sends_and_acks_answer_as_one_by_one() -> Result<()> {
    let Some(db) = Fresh::new() else {
        return Ok(());
    };
    let store = Store::open(db.location())?;
    crate::db::merged_tests::merged_sends_and_acks_answer_as_one_by_one(&store)
}

#[test]
fn stores_read_before_a_freeze_are_refused() -> Result<()> {
    let Some(db) = Fresh::new() else {
        return Ok(());
    };
    let store = Store::open(db.location())?;
    crate::db::merged_tests::stores_read_before_a_freeze_are_refused(&store)
}

/// Storing many messages costs one round trip, and so does acknowledging them, however many
/// senders, recipients and acknowledging users there are.
#[test]
fn a_merged_batch_is_one_round_trip_per_kind() -> Result<()> {
    let Some(db) = Fresh::new() else {
        return Ok(());
    };
    let mut conn = Conn::connect(&db.url, Duration::from_secs(10))?;
    schema::migrate(&mut conn)?;
    let names: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
    for n in &names {
        conn.create_user(n, "h", &keys())?;
    }
    // The statements are prepared on first use.
    let warm = Tx::store_messages(&mut conn, &[(Outgoing::new("u0", 0, b"w"), "u1")])?;
    let warm: Vec<i64> = warm
        .into_iter()
        .map(|r| r.map(|s| s.envelope.id))
        .collect::<Result<_>>()?;
    Tx::ack_many(&mut conn, &[("u1", &warm)])?;

    let msgs: Vec<(Outgoing<'_>, &str)> = (0..200u64)
        .map(|i| {
            let from = names[i as usize % 10].as_str();
            let to = names[(i as usize * 7 + 3) % 10].as_str();
            (Outgoing::new(from, 1 + i, b"x"), to)
        })
        .collect();
    let before = conn.round_trips;
    let stored = Tx::store_messages(&mut conn, &msgs)?;
    assert_eq!(
        conn.round_trips - before,
        1,
        "200 messages in one round trip"
    );
    let mut by_user: Vec<(&str, Vec<i64>)> = names.iter().map(|n| (n.as_str(), vec![])).collect();
    for (r, (_, to)) in stored.into_iter().zip(&msgs) {
        let id = r?.envelope.id;
        by_user
            .iter_mut()
            .find(|(u, _)| u == to)
            .expect("a user")
            .1
            .push(id);
    }
    let acks: Vec<(&str, &[i64])> = by_user
        .iter()
        .map(|(u, ids)| (*u, ids.as_slice()))
        .collect();
    let before = conn.round_trips;
    let counts = Tx::ack_many(&mut conn, &acks)?;
    assert_eq!(
        conn.round_trips - before,
        1,
        "ten users' acknowledgements in one round trip"
    );
    assert_eq!(
        counts
            .into_iter()
            .collect::<Result<Vec<_>>>()?
            .iter()
            .sum::<usize>(),
        200
    );
    assert_eq!(conn.queued_total()?, 0);

    // Group messages: stored in one round trip; every member's acknowledgements in three (the
    // statement, the position walks, the removal of what everyone passed).
    assert!(conn.create_group("u0/g", "u0")?);
    let mut keys = vec![WrappedKey {
        member: "u0".into(),
        wrapped: b"k".to_vec(),
    }];
    for n in &names[1..5] {
        conn.add_member("u0/g", n)?;
        keys.push(WrappedKey {
            member: n.clone(),
            wrapped: b"k".to_vec(),
        });
    }
    conn.put_keys("u0/g", 1, &keys, "u0")?;
    let warm = Tx::store_group_messages(&mut conn, &[(Outgoing::new("u0", 999, b"w"), "u0/g", 1)])?;
    let warm = [warm[0].as_ref().expect("stored").envelope.id];
    let acks: Vec<(&str, &[i64])> = names[1..5]
        .iter()
        .map(|n| (n.as_str(), &warm[..]))
        .collect();
    Tx::ack_many(&mut conn, &acks)?;
    let msgs: Vec<(Outgoing<'_>, &str, u64)> = (0..50u64)
        .map(|i| (Outgoing::new("u0", 1000 + i, b"g"), "u0/g", 1))
        .collect();
    let before = conn.round_trips;
    let stored = Tx::store_group_messages(&mut conn, &msgs)?;
    assert_eq!(
        conn.round_trips - before,
        1,
        "50 group messages in one round trip"
    );
    let mut ids: Vec<i64> = Vec::new();
    for s in stored {
        ids.push(s.expect("the common case").envelope.id);
    }
    let acks: Vec<(&str, &[i64])> = names[1..5].iter().map(|n| (n.as_str(), &ids[..])).collect();
    let before = conn.round_trips;
    let counts = Tx::ack_many(&mut conn, &acks)?;
    assert_eq!(
        conn.round_trips - before,
        3,
        "four members' acknowledgements"
    );
    for c in counts {
        assert_eq!(c?, ids.len());
    }
    assert_eq!(conn.queued_total()?, 0, "every member passed every message");
    Ok(())
}

#[test]
fn merged_group_messages_answer_as_one_by_one() -> Result<()> {
    let Some(db) = Fresh::new() else {
        return Ok(());
    };
    let store = Store::open(db.location())?;
    let checked = crate::db::merged_tests::merged_group_messages_answer_as_one_by_one(&store)?;
    assert_eq!(
        checked, 6,
        "the two plain messages in one statement, the rest checked"
    );
    Ok(())
}

/// Rows read from `table` by a plan, as `EXPLAIN (ANALYZE, FORMAT JSON)` tells: each node
/// that scans it, its rows times its loops.
fn rows_read(plan: &serde_json::Value, table: &str) -> f64 {
    let here = if plan.get("Relation Name").and_then(|v| v.as_str()) == Some(table) {
        let n = |k: &str| plan.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
        n("Actual Rows") * n("Actual Loops")
    } else {
        0.0
    };
    let below: f64 = plan
        .get("Plans")
        .and_then(|v| v.as_array())
        .map(|plans| plans.iter().map(|p| rows_read(p, table)).sum())
        .unwrap_or(0.0);
    here + below
}

/// A connection keeps its plans for its life, and one made when the tables were small (a new
/// cluster, statistics taken while they were empty) stayed: a member's position walk then read
/// all of the member's acknowledgements at every step, and group traffic stalled for seconds
/// behind a gap of a few hundred messages. The walk over 300 acknowledged messages, planned
/// as a connection keeps it, reads each acknowledgement a bounded number of times.
#[test]
fn a_position_walk_reads_each_acknowledgement_once_at_any_table_size() -> Result<()> {
    let Some(db) = Fresh::new() else {
        return Ok(());
    };
    const MESSAGES: i64 = 300;
    let mut conn = Conn::connect(&db.url, Duration::from_secs(10))?;
    schema::migrate(&mut conn)?;
    conn.batch("ANALYZE; SET plan_cache_mode = force_generic_plan")?;
    conn.create_user("alice", "h", &keys())?;
    conn.create_user("bob", "h", &keys())?;
    assert!(conn.create_group("alice/g", "alice")?);
    conn.add_member("alice/g", "bob")?;
    let ids: Vec<i64> = (0..MESSAGES)
        .map(|i| {
            let msg = Outgoing::new("alice", i as u64, b"x");
            Ok(conn.store_group_message(&msg, "alice/g")?.envelope.id)
        })
        .collect::<Result<_>>()?;
    // Everything but the first is acknowledged: the position waits at the gap.
    conn.ack("bob", &ids[1..])?;
    assert_eq!(conn.queued("bob", 0, 1000)?.len(), 1);
    conn.exec(
        r#"INSERT INTO group_acks (grp, "user", msg_id) VALUES ('alice/g', 'bob', $1)"#,
        &[&ids[0]],
    )?;
    let explain = format!(
        "PREPARE walk(text[], text[]) AS {};
         EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE walk('{{alice/g}}', '{{bob}}')",
        super::groups::WALK
    );
    let json = conn
        .client
        .simple_query(&explain)
        .map_err(Error::from)?
        .into_iter()
        .find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a plan");
    let plan: serde_json::Value = serde_json::from_str(&json).expect("a plan in JSON");
    let read = rows_read(&plan[0]["Plan"], "group_acks");
    assert!(
        read <= 3.0 * MESSAGES as f64,
        "the walk read {read} acknowledgement rows for {MESSAGES} steps"
    );
    assert!(
        conn.queued("bob", 0, 1000)?.is_empty(),
        "the walk went all the way"
    );
    Ok(())
}

/// A batch of large messages or long acknowledgements is cut into statements of bounded size,
/// in order.
#[test]
fn large_batches_go_in_bounded_statements() -> Result<()> {
    let Some(db) = Fresh::new() else {
        return Ok(());
    };
    let mut conn = Conn::connect(&db.url, Duration::from_secs(10))?;
    schema::migrate(&mut conn)?;
    conn.create_user("alice", "h", &keys())?;
    conn.create_user("bob", "h", &keys())?;
    // Prepared on first use.
    Tx::store_messages(&mut conn, &[(Outgoing::new("alice", 0, b"w"), "bob")])?;
    Tx::ack_many(&mut conn, &[("bob", &[0])])?;

    let body = vec![7u8; crate::net::MAX_BODY];
    let msgs: Vec<(Outgoing<'_>, &str)> = (1..=80u64)
        .map(|i| (Outgoing::new("alice", i, &body), "bob"))
        .collect();
    let before = conn.round_trips;
    let stored = Tx::store_messages(&mut conn, &msgs)?;
    assert_eq!(
        conn.round_trips - before,
        2,
        "5 MiB of bodies in two statements"
    );
    let ids: Vec<i64> = stored
        .into_iter()
        .map(|r| r.map(|s| s.envelope.id))
        .collect::<Result<_>>()?;
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "in order across statements"
    );

    let none: Vec<i64> = (-40_000..-20_000).collect();
    let also: Vec<i64> = (-20_000..0).collect();
    let before = conn.round_trips;
    let counts = Tx::ack_many(&mut conn, &[("bob", &none), ("bob", &also), ("bob", &ids)])?;
    assert_eq!(conn.round_trips - before, 2, "40,080 ids in two statements");
    let counts: Vec<usize> = counts.into_iter().collect::<Result<_>>()?;
    assert_eq!(counts, [0, 0, 80]);
    Ok(())
}

/// A database restarted, or an operator ending backends (`pg_terminate_backend`), leaves every
/// unused connection broken without a word: the next request on each would fail. A connection
/// unused for a while is asked first, and replaced: the first read and the first write after
/// it succeed.
#[test]
fn connections_the_database_ended_are_replaced_before_their_next_use() -> Result<()> {
    let Some(db) = Fresh::new() else {
        return Ok(());
    };
    let store = Store::open(db.location())?;
    store.call(|tx| tx.create_user("alice", "hash", &keys()))?;
    assert!(store.read(|tx| tx.user_exists("alice"))?);
    std::thread::sleep(super::IDLE_CHECK + Duration::from_millis(50));
    let mut admin = postgres::Client::connect(&db.server, postgres::NoTls).expect("connect");
    let ended = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&db.name],
        )
        .expect("end the backends");
    assert!(ended.len() >= 2, "the writer's and a reader's: {ended:?}");
    assert!(store.read(|tx| tx.user_exists("alice"))?);
    assert!(store.call(|tx| tx.create_user("bob", "hash", &keys()))?);
    assert!(store.read(|tx| tx.user_exists("bob"))?);
    Ok(())
}

/// A process stopped inside a transaction (SIGSTOP, a hung machine) would hold the cluster's
/// write lock until it resumed: PostgreSQL ends such a transaction after a few seconds, and
/// the next writer gets the lock.
#[test]
fn a_transaction_left_waiting_gives_the_write_lock_back() -> Result<()> {
    let Some(db) = Fresh::new() else {
        return Ok(());
    };
    let mut stopped = Conn::connect(&db.url, Duration::from_secs(5))?;
    stopped.batch(&format!(
        "BEGIN; SELECT pg_advisory_xact_lock({})",
        super::WRITE_LOCK
    ))?;
    let began = Instant::now();
    let mut next = Conn::connect(&db.url, Duration::from_secs(20))?;
    next.batch(&format!(
        "BEGIN; SELECT pg_advisory_xact_lock({}); COMMIT",
        super::WRITE_LOCK
    ))?;
    let waited = began.elapsed();
    assert!(
        waited >= Duration::from_millis(super::IDLE_IN_TRANSACTION_MS - 500),
        "the lock was held: {waited:?}"
    );
    assert!(waited < Duration::from_secs(15), "{waited:?}");
    // The one that waited inside its transaction lost it, and says so.
    assert!(stopped.batch("COMMIT").is_err());
    Ok(())
}
