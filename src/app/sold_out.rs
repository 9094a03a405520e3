//! Knowing, without Postgres (and mostly without Redis), that a product or a coupon is sold out.
//!
//! Two levels: a marker in Redis shared by every replica (`store::redis::sold_out`), and a
//! 50 ms copy in this process, so that the flood of orders for a sold-out product during a
//! flash sale is refused without even a Redis round trip. Both are shortcuts, never the record.
//! The local copy lasts so briefly that a unit given back on any replica can be bought through
//! every replica within 100 ms without any message between replicas; releasing or restocking
//! clears the Redis marker for every replica, and a marker from an order that looked before
//! the release is refused by its stock generation. Postgres decides whenever neither says
//! "sold out".

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use crate::{
    domain::{ProductId, Restock},
    store::redis::sold_out::SoldOutMarkers,
};

/// How long this process remembers "sold out" without asking Redis again.
pub(super) const LOCAL_SOLD_OUT: Duration = Duration::from_millis(50);

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

/// Sold-out products: the Redis markers every replica shares, and this replica's brief copy.
pub struct SoldOut {
    local: SoldOutCache<ProductId>,
    markers: SoldOutMarkers,
    /// How long a marker refuses orders without Postgres being asked.
    marker_ttl: Duration,
}

impl SoldOut {
    pub fn new(markers: SoldOutMarkers, marker_ttl: Duration) -> Self {
        Self {
            local: SoldOutCache::default(),
            markers,
            marker_ttl,
        }
    }

    /// The first of `products` known to be sold out, if any. A Redis failure means "unknown".
    pub(super) async fn first(&self, products: &[ProductId]) -> Option<ProductId> {
        if let Some(product) = self.local.first(products, Instant::now()) {
            return Some(product);
        }
        match self.markers.first_marked(products).await {
            Ok(Some(product)) => {
                self.local.remember(product, LOCAL_SOLD_OUT);
                Some(product)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(error = %e, "sold-out check skipped");
                None
            }
        }
    }

    /// `product` had no stock left at `stock_gen`.
    pub(super) async fn mark(&self, product: ProductId, stock_gen: i64) {
        self.local.remember(product, LOCAL_SOLD_OUT);
        if let Err(e) = self.markers.mark(product, stock_gen, self.marker_ttl).await {
            tracing::debug!(error = %e, "could not mark a product sold out");
        }
    }

    /// Stock came back (released or restocked): the products are no longer sold out. The
    /// markers are cleared in a task of their own, so a caller that goes away cannot leave
    /// one behind to refuse orders on every replica until it expires.
    pub(super) async fn clear(self: &Arc<Self>, restocks: Vec<Restock>) {
        if restocks.is_empty() {
            return;
        }
        let products: Vec<ProductId> = restocks.iter().map(|r| r.product).collect();
        self.local.forget(&products);
        let this = self.clone();
        let cleared = tokio::spawn(async move {
            if let Err(e) = this.markers.clear(&restocks).await {
                tracing::warn!(error = %e, "could not clear sold-out markers; they expire by themselves");
            }
        });
        let _ = cleared.await;
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
