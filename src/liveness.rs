//! Liveness: whether the process can still serve, judged from outside the runtime.
//!
//! A heartbeat task on the tokio runtime stamps the time every fifth of the stall threshold; a
//! watchdog on its own OS thread reads the stamp. A runtime that has not run the heartbeat for
//! longer than the threshold (workers blocked in synchronous code, a deadlock, a task that never
//! yields) cannot judge itself, but the watchdog can: it sets [`LIVENESS`] NOT_SERVING, logs,
//! and counts the stall.
//!
//! Invariant: liveness depends on nothing but the runtime running its tasks on time: not
//! Postgres, not Redis, not shutdown (it stays SERVING while the server drains).
//!
//! What a probe sees: while every worker is wedged, no call is answered at all, so the probe
//! times out (a failure for Kubernetes). The verdict is read by the probes answered once a worker
//! is free again: NOT_SERVING is kept for one more threshold after the heartbeat resumes, so a
//! probe answered just after a stall, including one that waited through it, reports it. A
//! process that stalls again and again keeps failing its probes and is restarted; one that
//! stalled once recovers by itself.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use tokio::task::JoinHandle;

use crate::{
    health::{Health, LIVENESS, ServingStatus},
    metrics,
};

/// Runs the heartbeat and the watchdog until dropped.
pub struct Watchdog {
    heartbeat: JoinHandle<()>,
    /// Dropping it disconnects the channel, which is the watchdog thread's signal to end.
    _stop: mpsc::Sender<()>,
}

impl Watchdog {
    /// Starts the heartbeat on the current tokio runtime and the watchdog thread.
    pub fn start(health: Health, stall: Duration) -> std::io::Result<Self> {
        let clock = Instant::now();
        let last_beat = Arc::new(AtomicU64::new(0));
        let period = stall / 5;
        let heartbeat = tokio::spawn({
            let last_beat = last_beat.clone();
            async move {
                let mut ticks = tokio::time::interval(period);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    last_beat.store(millis(clock.elapsed()), Ordering::Relaxed);
                }
            }
        });
        let (stop, stopped) = mpsc::channel::<()>();
        let watch = move || {
            let mut verdict = Verdict::new(stall);
            // Ends when the Watchdog is dropped (the sender disconnects).
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(period) {
                let now = clock.elapsed();
                let beat = Duration::from_millis(last_beat.load(Ordering::Relaxed));
                match verdict.observe(now, beat) {
                    Some(Change::Stalled) => {
                        metrics::runtime_stall();
                        tracing::error!(
                            stalled_ms = millis(now.saturating_sub(beat)),
                            "the runtime has not run its heartbeat: liveness NOT_SERVING"
                        );
                        health.set(LIVENESS, ServingStatus::NotServing);
                    }
                    Some(Change::Recovered) => {
                        tracing::warn!("the runtime runs its heartbeat again: liveness SERVING");
                        health.set(LIVENESS, ServingStatus::Serving);
                    }
                    None => {}
                }
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("liveness-watchdog".into())
            .spawn(watch)
        {
            heartbeat.abort();
            return Err(e);
        }
        Ok(Self {
            heartbeat,
            _stop: stop,
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Debug, PartialEq, Eq)]
enum Change {
    Stalled,
    Recovered,
}

/// The watchdog's judgement, from the times it reads (both since the same start).
struct Verdict {
    stall: Duration,
    stalled: bool,
    /// When a stalled runtime was first seen beating again.
    beating_since: Option<Duration>,
}

impl Verdict {
    fn new(stall: Duration) -> Self {
        Self {
            stall,
            stalled: false,
            beating_since: None,
        }
    }

    fn observe(&mut self, now: Duration, last_beat: Duration) -> Option<Change> {
        if now.saturating_sub(last_beat) > self.stall {
            self.beating_since = None;
            return (!std::mem::replace(&mut self.stalled, true)).then_some(Change::Stalled);
        }
        if !self.stalled {
            return None;
        }
        let since = *self.beating_since.get_or_insert(now);
        if now - since >= self.stall {
            self.stalled = false;
            self.beating_since = None;
            return Some(Change::Recovered);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_millis(1000);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_regular_heartbeat_is_alive() {
        let mut verdict = Verdict::new(STALL);
        for t in (0..10_000).step_by(200) {
            assert_eq!(verdict.observe(ms(t + 150), ms(t)), None);
        }
    }

    #[test]
    fn a_stall_is_reported_once_and_outlives_the_stall_by_one_threshold() {
        let mut verdict = Verdict::new(STALL);
        assert_eq!(verdict.observe(ms(1000), ms(900)), None);
        assert_eq!(
            verdict.observe(ms(1000), ms(0)),
            None,
            "exactly the threshold"
        );
        assert_eq!(verdict.observe(ms(2001), ms(900)), Some(Change::Stalled));
        assert_eq!(verdict.observe(ms(5000), ms(900)), None, "reported once");
        // Beating again at 5100, but still NOT_SERVING for one threshold.
        assert_eq!(verdict.observe(ms(5200), ms(5100)), None);
        assert_eq!(verdict.observe(ms(6000), ms(5900)), None);
        assert_eq!(verdict.observe(ms(6200), ms(6100)), Some(Change::Recovered));
        assert_eq!(verdict.observe(ms(6400), ms(6300)), None);
    }

    #[test]
    fn a_new_stall_during_recovery_starts_the_wait_again() {
        let mut verdict = Verdict::new(STALL);
        assert_eq!(verdict.observe(ms(2000), ms(0)), Some(Change::Stalled));
        assert_eq!(verdict.observe(ms(2100), ms(2050)), None);
        assert_eq!(
            verdict.observe(ms(3500), ms(2400)),
            None,
            "stalled again, no news"
        );
        assert_eq!(verdict.observe(ms(3600), ms(3550)), None);
        assert_eq!(verdict.observe(ms(4400), ms(4350)), None);
        assert_eq!(verdict.observe(ms(4600), ms(4550)), Some(Change::Recovered));
    }
}
