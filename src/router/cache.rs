//! A bounded map of state that the store can rebuild: the sequencers' conversation states and
//! the commit thread's log heads. Without a bound they grow with every conversation and user a
//! server has ever seen.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

/// Two generations: entries used since the last rotation (`hot`) and before it (`cold`). A
/// lookup that finds an entry in `cold` moves it to `hot`; a rotation, once `hot` holds half
/// the capacity, drops `cold` and makes `hot` the new `cold`. So an entry survives as long as
/// it is used at least once per half-capacity of other entries, every operation is O(1)
/// (amortised), and at most `capacity` entries are held, plus whatever the owner asked to keep
/// (state the store does not have yet).
#[derive(Debug)]
pub(super) struct Generations<K, V> {
    hot: HashMap<K, V>,
    cold: HashMap<K, V>,
    half: usize,
}

impl<K: Hash + Eq, V> Generations<K, V> {
    /// A map of at most about `capacity` entries (at least 2).
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            hot: HashMap::new(),
            cold: HashMap::new(),
            half: (capacity / 2).max(1),
        }
    }

    /// The entry for `key`, now counted as recently used.
    pub(super) fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if !self.hot.contains_key(key) {
            let (k, v) = self.cold.remove_entry(key)?;
            self.hot.insert(k, v);
        }
        self.hot.get_mut(key)
    }

    /// Whether `key` is held (without counting it as used).
    pub(super) fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.hot.contains_key(key) || self.cold.contains_key(key)
    }

    /// Inserts or replaces the entry for `key` and returns it. Never drops anything: call
    /// [`Generations::make_room`] where dropping is safe.
    pub(super) fn insert(&mut self, key: K, value: V) -> &mut V {
        self.cold.remove(&key);
        match self.hot.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                e.insert(value);
                e.into_mut()
            }
            std::collections::hash_map::Entry::Vacant(e) => e.insert(value),
        }
    }

    /// Rotates once the recent generation is full: drops the entries unused for a whole
    /// generation, except those `keep` says the store cannot rebuild yet. Returns how many
    /// were dropped.
    pub(super) fn make_room(&mut self, mut keep: impl FnMut(&V) -> bool) -> usize {
        if self.hot.len() < self.half {
            return 0;
        }
        let old = std::mem::replace(&mut self.cold, std::mem::take(&mut self.hot));
        let mut dropped = 0;
        for (k, v) in old {
            if keep(&v) {
                self.hot.insert(k, v);
            } else {
                dropped += 1;
            }
        }
        dropped
    }

    /// Drops everything.
    pub(super) fn clear(&mut self) {
        self.hot.clear();
        self.cold.clear();
    }

    /// How many entries are held.
    pub(super) fn len(&self) -> usize {
        self.hot.len() + self.cold.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_at_most_its_capacity_and_keeps_what_is_used() {
        let mut cache = Generations::new(100);
        cache.insert(0u32, 0u32);
        for i in 1..10_000 {
            // Entry 0 is used as often as any half-capacity of others goes by.
            if i % 40 == 0 {
                assert_eq!(cache.get_mut(&0), Some(&mut 0), "entry 0 dropped at {i}");
            }
            cache.make_room(|_| false);
            cache.insert(i, i);
            assert!(cache.len() <= 100, "{} entries at {i}", cache.len());
        }
        // An entry not used for two generations is gone; a recent one is there.
        assert_eq!(cache.get_mut(&5), None);
        assert_eq!(cache.get_mut(&9_999), Some(&mut 9_999));
    }

    #[test]
    fn what_the_owner_keeps_survives_rotation() {
        let mut cache = Generations::new(4);
        // Odd values stand for state the store does not have yet.
        for i in 0..100u32 {
            cache.make_room(|v| v % 2 == 1 && *v < 10);
            cache.insert(i, i);
        }
        for pinned in [1, 3, 5, 7, 9] {
            assert_eq!(cache.get_mut(&pinned), Some(&mut { pinned }));
        }
        assert_eq!(cache.get_mut(&2), None);
        assert!(cache.contains_key(&99));
        cache.clear();
        assert_eq!(cache.len(), 0);
    }
}
