use std::sync::Mutex;

use tokio::sync::Semaphore;

use super::*;

const IN_FLIGHT: usize = 4;

fn limits(max: usize) -> WriteBatches {
    WriteBatches {
        max,
        in_flight: IN_FLIGHT,
        overlap_commit: true,
        stall: Duration::MAX,
    }
}

/// A runner that records the calls of each batch, says it is committing at once (with
/// `overlap_commit`, the turn is passed), then holds the batch until `gate` lets it finish, and
/// answers each call with itself.
fn gated(batches: Arc<Mutex<Vec<Vec<u32>>>>, gate: Arc<Semaphore>) -> Runner<u32, u32> {
    turn_gated(
        batches,
        Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
        gate,
    )
}

/// Like [`gated`], but the batch says it is committing only when `decided` lets it.
fn turn_gated(
    batches: Arc<Mutex<Vec<Vec<u32>>>>,
    decided: Arc<Semaphore>,
    gate: Arc<Semaphore>,
) -> Runner<u32, u32> {
    Arc::new(move |calls: Vec<u32>, _alone, _callers, mut turn: Turn| {
        batches.lock().unwrap().push(calls.clone());
        let (decided, gate) = (decided.clone(), gate.clone());
        Box::pin(async move {
            decided.acquire().await.unwrap().forget();
            turn.committing();
            gate.acquire().await.unwrap().forget();
            calls
        })
    })
}

fn submit_all(
    batcher: &Arc<GroupCommit<u32, u32>>,
    calls: std::ops::Range<u32>,
) -> Vec<tokio::task::JoinHandle<u32>> {
    calls
        .map(|i| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.submit(i).await.unwrap() })
        })
        .collect()
}

type Gates = (
    Arc<GroupCommit<u32, u32>>,
    Arc<Mutex<Vec<Vec<u32>>>>,
    Arc<Semaphore>,
    Arc<Semaphore>,
);

/// A batcher whose batches hold their turn until `decided` (the third) lets them pass it,
/// then finish when `gate` (the fourth) lets them; the second records the batches.
fn holding_turns(limits: WriteBatches) -> Gates {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let (decided, gate) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
    let batcher = Arc::new(GroupCommit::start(
        "test",
        limits,
        turn_gated(batches.clone(), decided.clone(), gate.clone()),
    ));
    (batcher, batches, decided, gate)
}

/// Opens both gates and checks that each call got itself back.
async fn finish(decided: &Semaphore, gate: &Semaphore, calls: Vec<tokio::task::JoinHandle<u32>>) {
    decided.add_permits(1_000);
    gate.add_permits(1_000);
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap(), i as u32);
    }
}

/// Submits call 0, then calls 1 to 5 while batch [0] runs and has not said it is committing:
/// slots are free, but the batcher holds call 1 for the turn and the others queue behind it.
async fn five_behind_one(
    batcher: &Arc<GroupCommit<u32, u32>>,
    batches: &Mutex<Vec<Vec<u32>>>,
) -> Vec<tokio::task::JoinHandle<u32>> {
    let mut calls = submit_all(batcher, 0..1);
    batches_started(batches, 1).await;
    calls.extend(submit_all(batcher, 1..6));
    queued(batcher, 4).await;
    settle().await;
    assert_eq!(batches.lock().unwrap().len(), 1);
    calls
}

async fn settle() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn with_overlap_the_next_batch_starts_when_the_previous_one_commits() {
    let (batcher, batches, decided, gate) = holding_turns(limits(8));
    let calls = five_behind_one(&batcher, &batches).await;
    // Batch [0] is committing: everything queued is the next batch.
    decided.add_permits(1);
    batches_started(&batches, 2).await;
    assert_eq!(*batches.lock().unwrap(), vec![vec![0], vec![1, 2, 3, 4, 5]]);
    finish(&decided, &gate, calls).await;
}

#[tokio::test]
async fn without_overlap_the_next_batch_starts_when_the_previous_one_ends() {
    let (batcher, batches, decided, gate) = holding_turns(WriteBatches {
        overlap_commit: false,
        ..limits(8)
    });
    let calls = five_behind_one(&batcher, &batches).await;
    decided.add_permits(1);
    settle().await;
    assert_eq!(batches.lock().unwrap().len(), 1, "batch [0] still commits");
    gate.add_permits(1);
    batches_started(&batches, 2).await;
    assert_eq!(*batches.lock().unwrap(), vec![vec![0], vec![1, 2, 3, 4, 5]]);
    finish(&decided, &gate, calls).await;
}

#[tokio::test]
async fn a_batch_holding_the_turn_past_the_stall_lets_the_next_start_beside_it() {
    let (batcher, batches, decided, gate) = holding_turns(WriteBatches {
        stall: Duration::from_millis(20),
        ..limits(8)
    });
    let mut calls = submit_all(&batcher, 0..1);
    batches_started(&batches, 1).await;
    // Batch [0] never reaches its commit (stuck on a row lock): call 1 still runs.
    calls.extend(submit_all(&batcher, 1..2));
    tokio::time::timeout(Duration::from_secs(10), batches_started(&batches, 2))
        .await
        .expect("the next batch started after the stall");
    assert_eq!(*batches.lock().unwrap(), vec![vec![0], vec![1]]);
    finish(&decided, &gate, calls).await;
}

/// Yields until `n` calls wait in the batcher's queue.
async fn queued(batcher: &GroupCommit<u32, u32>, n: usize) {
    let queue = batcher.queue.as_ref().unwrap();
    while queue.max_capacity() - queue.capacity() != n {
        tokio::task::yield_now().await;
    }
}

async fn batches_started(batches: &Mutex<Vec<Vec<u32>>>, n: usize) {
    while batches.lock().unwrap().len() != n {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn calls_that_queue_together_share_a_batch_and_get_their_own_answers() {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(Semaphore::new(0));
    let batcher = Arc::new(GroupCommit::start(
        "test",
        limits(8),
        gated(batches.clone(), gate.clone()),
    ));
    let calls: Vec<_> = (0..40u32)
        .map(|i| {
            let batcher = batcher.clone();
            tokio::spawn(async move { (i, batcher.submit(i).await.unwrap()) })
        })
        .collect();
    // Every slot holds a batch; the batcher holds the next call while it waits for a slot,
    // and the other calls wait in the queue.
    batches_started(&batches, IN_FLIGHT).await;
    let in_flight: usize = batches.lock().unwrap().iter().map(Vec::len).sum();
    queued(&batcher, 40 - in_flight - 1).await;
    gate.add_permits(1_000);
    for call in calls {
        let (sent, answer) = call.await.unwrap();
        assert_eq!(sent, answer);
    }
    let batches = batches.lock().unwrap();
    let mut all: Vec<u32> = batches.iter().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..40).collect::<Vec<_>>());
    assert!(batches.iter().all(|b| b.len() <= 8), "{batches:?}");
    assert!(
        batches.len() <= IN_FLIGHT + 40_usize.div_ceil(8),
        "{batches:?}"
    );
}

#[tokio::test]
async fn with_a_maximum_of_one_every_call_runs_alone() {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(Semaphore::new(1_000));
    let batcher = Arc::new(GroupCommit::start(
        "test",
        limits(1),
        gated(batches.clone(), gate),
    ));
    let calls: Vec<_> = (0..10u32)
        .map(|i| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.submit(i).await.unwrap() })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
    assert!(batches.lock().unwrap().iter().all(|b| b.len() == 1));
}

#[tokio::test]
async fn a_caller_gone_before_its_batch_starts_is_left_out() {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(Semaphore::new(0));
    let batcher = Arc::new(GroupCommit::start(
        "test",
        limits(64),
        gated(batches.clone(), gate.clone()),
    ));
    // One call per slot, each its own batch, held by the gate.
    let mut busy = Vec::new();
    for i in 0..IN_FLIGHT as u32 {
        let batcher = batcher.clone();
        busy.push(tokio::spawn(async move { batcher.submit(i).await }));
        batches_started(&batches, i as usize + 1).await;
    }
    let abandoned = {
        let batcher = batcher.clone();
        tokio::spawn(async move { batcher.submit(99).await })
    };
    // The batcher holds call 99 while it waits for a slot: the caller goes now.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    abandoned.abort();
    gate.add_permits(1_000);
    for call in busy {
        call.await.unwrap().unwrap();
    }
    assert_eq!(batcher.submit(100).await.unwrap(), 100);
    let seen: Vec<u32> = batches.lock().unwrap().iter().flatten().copied().collect();
    assert_eq!(seen, vec![0, 1, 2, 3, 100]);
}

#[tokio::test]
async fn a_runner_sees_which_callers_left_while_it_waited() {
    let gate = Arc::new(Semaphore::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let runner: Runner<u32, u32> = {
        let (gate, seen) = (gate.clone(), seen.clone());
        Arc::new(move |calls: Vec<u32>, _alone, callers: Callers, _turn| {
            let (gate, seen) = (gate.clone(), seen.clone());
            Box::pin(async move {
                // The batch has started: it waits here as it would for a row lock.
                gate.acquire().await.unwrap().forget();
                let mut steps: Vec<Step> = calls.iter().map(|_| Step::Open).collect();
                let open: Vec<usize> = (0..calls.len()).collect();
                let kept = left_in(&open, &callers, &mut steps);
                let kept: Vec<u32> = kept.iter().map(|&i| calls[i]).collect();
                seen.lock().unwrap().push(kept);
                calls
            })
        })
    };
    let batcher = Arc::new(GroupCommit::start("test", limits(1), runner));
    let stays = {
        let batcher = batcher.clone();
        tokio::spawn(async move { batcher.submit(1).await })
    };
    let leaves = {
        let batcher = batcher.clone();
        tokio::spawn(async move { batcher.submit(2).await })
    };
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    leaves.abort();
    let _ = leaves.await;
    gate.add_permits(2);
    assert_eq!(stays.await.unwrap().unwrap(), 1);
    // The abandoned call's task still runs to its end, where it finds its caller gone.
    while seen.lock().unwrap().len() < 2 {
        tokio::task::yield_now().await;
    }
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(seen, vec![vec![], vec![1]]);
}
