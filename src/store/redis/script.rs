//! Lua scripts, loaded once and called by SHA. A Redis that restarted (or a cluster node that
//! never saw the script) answers NOSCRIPT: the script is then loaded on every primary and the
//! call is made again, once.

use fred::{
    interfaces::LuaInterface,
    prelude::{Client, FromValue},
    types::{Key, MultipleKeys, Value, scripts::Script},
};

use tracing::Instrument as _;

use super::Redis;
use crate::{store::StoreError, telemetry};

pub struct LuaScript {
    script: Script,
    /// What the script does, as its trace span is named (`coupon_gate.decide`).
    name: &'static str,
}

impl LuaScript {
    pub fn new(name: &'static str, source: &'static str) -> Self {
        Self {
            script: Script::from_lua(source),
            name,
        }
    }

    /// Runs the script with these keys and arguments.
    pub async fn call<R: FromValue>(
        &self,
        redis: &Redis,
        keys: &[&str],
        args: &[&str],
    ) -> Result<R, StoreError> {
        self.call_encoded(redis, || {
            (
                keys.iter().map(|k| Key::from(*k)).collect(),
                Value::Array(args.iter().map(|a| Value::from(*a)).collect()),
            )
        })
        .await
    }

    /// Runs the script with the keys and arguments `encode` builds (called again only for the
    /// retry after NOSCRIPT), for callers that keep their arguments as values.
    pub async fn call_encoded<R: FromValue>(
        &self,
        redis: &Redis,
        encode: impl Fn() -> (MultipleKeys, Value),
    ) -> Result<R, StoreError> {
        self.call_once_loaded(redis, encode)
            .instrument(telemetry::redis_script(self.name))
            .await
    }

    async fn call_once_loaded<R: FromValue>(
        &self,
        redis: &Redis,
        encode: impl Fn() -> (MultipleKeys, Value),
    ) -> Result<R, StoreError> {
        let client = redis.client();
        let (k, a) = encode();
        match client
            .evalsha::<R, _, _, _>(self.script.sha1().clone(), k, a)
            .await
        {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                self.load(client).await?;
                let (k, a) = encode();
                Ok(client.evalsha(self.script.sha1().clone(), k, a).await?)
            }
            other => Ok(other?),
        }
    }

    pub async fn load(&self, client: &Client) -> Result<(), StoreError> {
        self.script.load(client).await?;
        Ok(())
    }
}
