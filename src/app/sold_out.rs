//! Knowing, without Postgres (and mostly without Redis), that a product or a coupon is sold out.
//!
//! Two levels: a marker in Redis shared by every replica (`store::redis::sold_out`), and a
//! short-lived copy in this process, so that the flood of orders for a sold-out product during
//! a flash sale is refused without even a Redis round trip. Both are shortcuts, never the
//! record: they expire by themselves (the local copy after a fifth of the marker's TTL), and
//! releasing or restocking clears both here and the Redis marker for every replica. Postgres
//! decides whenever neither says "sold out".

use std::{
    collections::HashMap,
    hash::Hash,
    sync::RwLock,
    time::{Duration, Instant},
};

use super::App;
use crate::{domain::ProductId, store::redis::sold_out};

/// Keys known sold out until an instant. Reads take a shared lock for a moment; an empty set
/// (the usual case outside a sale) costs one atomic load.
pub(super) struct SoldOutCache<K> {
    until: RwLock<HashMap<K, Instant>>,
}

impl<K> Default for SoldOutCache<K> {
    fn default() -> Self {
        Self {
            until: RwLock::new(HashMap::new()),
        }
    }
}

impl<K: Copy + Eq + Hash> SoldOutCache<K> {
    pub(super) fn first(&self, products: &[K], now: Instant) -> Option<K> {
        let until = self.until.read().unwrap_or_else(|e| e.into_inner());
        if until.is_empty() {
            return None;
        }
        products
            .iter()
            .copied()
            .find(|p| until.get(p).is_some_and(|t| *t > now))
    }

    pub(super) fn remember(&self, product: K, for_: Duration) {
        let now = Instant::now();
        let mut until = self.until.write().unwrap_or_else(|e| e.into_inner());
        until.retain(|_, t| *t > now);
        until.insert(product, now + for_);
    }

    pub(super) fn forget(&self, products: &[K]) {
        let mut until = self.until.write().unwrap_or_else(|e| e.into_inner());
        for product in products {
            until.remove(product);
        }
    }
}

impl App {
    fn local_sold_out_ttl(&self) -> Duration {
        self.settings().sold_out_marker_ttl / 5
    }

    /// The first of `products` known to be sold out, if any. A Redis failure means "unknown".
    pub(super) async fn first_sold_out(&self, products: &[ProductId]) -> Option<ProductId> {
        if let Some(product) = self.sold_out_cache().first(products, Instant::now()) {
            return Some(product);
        }
        match sold_out::first_marked(self.redis(), products).await {
            Ok(Some(product)) => {
                self.sold_out_cache()
                    .remember(product, self.local_sold_out_ttl());
                Some(product)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(error = %e, "sold-out check skipped");
                None
            }
        }
    }

    pub(super) async fn mark_sold_out(&self, product: ProductId) {
        self.sold_out_cache()
            .remember(product, self.local_sold_out_ttl());
        let ttl = self.settings().sold_out_marker_ttl;
        if let Err(e) = sold_out::mark(self.redis(), product, ttl).await {
            tracing::debug!(error = %e, "could not mark a product sold out");
        }
    }

    /// Stock came back (released or restocked): the products are no longer sold out.
    pub(super) async fn clear_sold_out(&self, products: &[ProductId]) {
        self.sold_out_cache().forget(products);
        if let Err(e) = sold_out::clear(self.redis(), products).await {
            tracing::warn!(error = %e, "could not clear sold-out markers; they expire by themselves");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(raw: i64) -> ProductId {
        ProductId::parse(raw, "product_id").unwrap()
    }

    #[test]
    fn entries_expire_and_can_be_forgotten() {
        let cache = SoldOutCache::<ProductId>::default();
        let now = Instant::now();
        assert_eq!(cache.first(&[id(1), id(2)], now), None);
        cache.remember(id(2), Duration::from_secs(60));
        assert_eq!(cache.first(&[id(1), id(2)], now), Some(id(2)));
        assert_eq!(cache.first(&[id(2)], now + Duration::from_secs(61)), None);
        cache.forget(&[id(2)]);
        assert_eq!(cache.first(&[id(2)], now), None);
    }
}
