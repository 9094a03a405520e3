//! The jobs' replica-wide lock (`ecommerce::exclusive`), driven with bodies that panic, race and
//! lose their connection. Each "replica" is a pool of its own on the test's database; a
//! one-connection pool makes a leaked lock visible, since the next run gets the same connection.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use ecommerce::{Exclusive, exclusive};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

const JOB: i64 = 0x6563_0099;
const CHECK: Duration = Duration::from_millis(100);

async fn replica(db: &PgConnectOptions, connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(connections)
        .connect_with(db.clone())
        .await
        .expect("test pool connects")
}

/// Backends of this database that hold an advisory lock.
async fn advisory_holders(pg: &PgPool) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_locks
         WHERE locktype = 'advisory' AND granted
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_all(pg)
    .await
    .unwrap()
}

#[sqlx::test(migrations = false)]
async fn a_panicking_job_releases_its_lock(_: PgPoolOptions, db: PgConnectOptions) {
    let a = replica(&db, 1).await;
    let b = replica(&db, 1).await;
    let outcome = exclusive(&a, JOB, "panics", CHECK, async {
        if std::hint::black_box(true) {
            panic!("a job body that panics");
        }
    })
    .await
    .unwrap();
    assert_eq!(outcome, Exclusive::Panicked);
    assert_eq!(advisory_holders(&b).await, Vec::<i32>::new());
    // Another replica takes the job at once, and so does this one on its only connection.
    let ran = exclusive(&b, JOB, "after", CHECK, async { 1 })
        .await
        .unwrap();
    assert_eq!(ran, Exclusive::Ran(1));
    let ran = exclusive(&a, JOB, "after", CHECK, async { 2 })
        .await
        .unwrap();
    assert_eq!(ran, Exclusive::Ran(2));
}

#[sqlx::test(migrations = false)]
async fn two_replicas_never_hold_a_job_at_once(_: PgPoolOptions, db: PgConnectOptions) {
    let replicas = [replica(&db, 2).await, replica(&db, 2).await];
    let inside = Arc::new(AtomicUsize::new(0));
    let most_inside = Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + Duration::from_secs(2);
    let mut runners = Vec::new();
    // Two runners per replica: the scheduler's tick and a payment's nudge race the same way.
    for (r, pg) in replicas.iter().enumerate() {
        for _ in 0..2 {
            let (pg, inside, most_inside) = (pg.clone(), inside.clone(), most_inside.clone());
            runners.push(tokio::spawn(async move {
                let (mut ran, mut busy) = (0, 0);
                while Instant::now() < until {
                    let body = async {
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most_inside.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(3)).await;
                        inside.fetch_sub(1, Ordering::SeqCst);
                    };
                    match exclusive(&pg, JOB, "race", CHECK, body).await.unwrap() {
                        Exclusive::Ran(()) => ran += 1,
                        Exclusive::Busy => busy += 1,
                        other => panic!("unexpected {other:?}"),
                    }
                }
                (r, ran, busy)
            }));
        }
    }
    let mut ran = [0; 2];
    let mut busy = 0;
    for runner in runners {
        let (r, n, b) = runner.await.unwrap();
        ran[r] += n;
        busy += b;
    }
    println!("runs per replica {ran:?}, turns skipped because the other held the job: {busy}");
    assert_eq!(most_inside.load(Ordering::SeqCst), 1, "two runs overlapped");
    assert!(
        ran[0] > 0 && ran[1] > 0,
        "both replicas ran the job: {ran:?}"
    );
    assert!(busy > 0, "the runners contended");
}

#[sqlx::test(migrations = false)]
async fn a_job_whose_lock_connection_dies_is_stopped(_: PgPoolOptions, db: PgConnectOptions) {
    let a = replica(&db, 2).await;
    let b = replica(&db, 2).await;
    let started = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let run = tokio::spawn({
        let (a, started, finished) = (a.clone(), started.clone(), finished.clone());
        async move {
            exclusive(&a, JOB, "stalls", CHECK, async move {
                started.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(30)).await;
                finished.store(true, Ordering::SeqCst);
            })
            .await
            .unwrap()
        }
    });
    while !started.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        exclusive(&b, JOB, "meanwhile", CHECK, async {})
            .await
            .unwrap(),
        Exclusive::Busy
    );
    let holders = advisory_holders(&b).await;
    assert_eq!(holders.len(), 1, "{holders:?}");
    let killed_at = Instant::now();
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(holders[0])
        .execute(&b)
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("the run stops soon after its lock is gone")
        .unwrap();
    let stopped_after = killed_at.elapsed();
    println!("run abandoned {stopped_after:?} after its lock's connection was killed");
    assert_eq!(outcome, Exclusive::LockLost);
    assert!(!finished.load(Ordering::SeqCst));
    assert!(stopped_after < CHECK * 5, "{stopped_after:?}");
    assert_eq!(
        exclusive(&b, JOB, "takes over", CHECK, async { 3 })
            .await
            .unwrap(),
        Exclusive::Ran(3)
    );
}
