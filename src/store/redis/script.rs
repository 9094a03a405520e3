//! Lua scripts, loaded once and called by SHA. A Redis that restarted (or a cluster node that
//! never saw the script) answers NOSCRIPT: the script is then loaded on every primary and the
//! call is made again, once.

use fred::{
    interfaces::LuaInterface,
    prelude::{Client, FromValue},
    types::{MultipleKeys, MultipleValues, scripts::Script},
};

use super::Redis;
use crate::store::StoreError;

pub struct LuaScript {
    script: Script,
}

impl LuaScript {
    pub fn new(source: &'static str) -> Self {
        Self {
            script: Script::from_lua(source),
        }
    }

    /// Runs the script. `args` builds the keys and arguments; it is called a second time only
    /// after a NOSCRIPT reload, so the common path builds them once.
    pub async fn call<R, F>(&self, redis: &Redis, args: F) -> Result<R, StoreError>
    where
        R: FromValue,
        F: Fn() -> (MultipleKeys, MultipleValues),
    {
        let client = redis.client();
        let (keys, values) = args();
        match client
            .evalsha::<R, _, _, _>(self.script.sha1().clone(), keys, values)
            .await
        {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                self.load(client).await?;
                let (keys, values) = args();
                Ok(client
                    .evalsha(self.script.sha1().clone(), keys, values)
                    .await?)
            }
            other => Ok(other?),
        }
    }

    pub async fn load(&self, client: &Client) -> Result<(), StoreError> {
        self.script.load(client).await?;
        Ok(())
    }
}
