//! Redis: fast gates, rankings and caches. Nothing here is the record: every key can be rebuilt
//! from Postgres, and the service keeps its invariants if Redis loses everything.
//!
//! Every key starts with the configured prefix (so tests and tenants share a server safely) and
//! every multi-key operation uses keys of one hash tag (so it runs unchanged on Redis Cluster).

pub mod coupon_gate;
pub mod ranking;
mod script;
pub mod sold_out;
pub mod user_rate;

use std::{sync::Arc, time::Duration};

use fred::{
    clients::Pool,
    interfaces::ClientLike,
    prelude::{Builder, Client, ReconnectPolicy},
    types::config::Config as RedisConfig,
};

pub use script::LuaScript;

use super::StoreError;

#[derive(Clone)]
pub struct Redis {
    pool: Pool,
    prefix: Arc<str>,
}

impl Redis {
    /// Starts connecting in the background and returns at once: the service comes up (NOT_SERVING)
    /// while Redis is down and reconnects by itself, with backoff, whenever it returns.
    pub fn connect(
        url: &str,
        pool_size: usize,
        command_timeout: Duration,
        prefix: &str,
    ) -> Result<Self, StoreError> {
        let mut config = RedisConfig::from_url(url).map_err(StoreError::Redis)?;
        config.fail_fast = false;
        let pool = Builder::from_config(config)
            .with_performance_config(|perf| {
                // Commands sent while disconnected fail after this instead of waiting forever.
                perf.default_command_timeout = command_timeout;
            })
            .with_connection_config(|conn| {
                conn.connection_timeout = command_timeout.max(Duration::from_millis(500));
                conn.internal_command_timeout = command_timeout.max(Duration::from_millis(500));
                // A command is tried once more after a reconnect, never replayed indefinitely:
                // scripts that decide issuance must not run twice behind the caller's back.
                conn.max_command_attempts = 1;
                conn.tcp.nodelay = Some(true);
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2))
            .build_pool(pool_size)
            .map_err(StoreError::Redis)?;
        pool.connect_pool();
        Ok(Self {
            pool,
            prefix: prefix.into(),
        })
    }

    /// Waits up to `timeout` for the first connection (and, on a cluster, its routing table), so
    /// the first requests do not fail. A Redis that is down does not block start-up: the pool
    /// keeps reconnecting in the background and health reports NOT_SERVING meanwhile.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(timeout, self.pool.wait_for_connect()).await,
            Ok(Ok(()))
        )
    }

    /// A connected client of the pool (round-robin), for one command.
    pub fn client(&self) -> &Client {
        self.pool.next()
    }

    /// `prefix + suffix`.
    pub fn key(&self, suffix: std::fmt::Arguments<'_>) -> String {
        let mut key = String::with_capacity(self.prefix.len() + 32);
        key.push_str(&self.prefix);
        std::fmt::Write::write_fmt(&mut key, suffix).expect("writing to a String cannot fail");
        key
    }

    /// PING on one connection, for health checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let _: String = self.client().ping(None).await?;
        Ok(())
    }

    pub async fn quit(&self) {
        let _ = self.pool.quit().await;
    }
}
