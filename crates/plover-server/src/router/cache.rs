//! A bounded map of state that the store can rebuild: the sequencers' conversation states and
//! the commit thread's log heads. Without a bound they grow with every conversation and user a
//! server has ever seen.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

/// Two generations: entries used since the last rotation (`hot`) and before it (`cold`). A
/// lookup that finds an entry in `cold` moves it to `hot`; a rotation, once `hot` has taken in
/// half the capacity, drops `cold` and makes `hot` the new `cold`. So an entry survives as
/// long as it is used at least once per half-capacity of other use, every operation is O(1)
/// (amortised), and the entries held weigh at most about `capacity`, plus whatever the owner
/// asked to keep (state the store does not have yet) and the wait that follows keeping it
/// (see [`Generations::make_room`]).
///
/// An entry's weight (`weigh`, at least 1) is what it costs in memory: a conversation's
/// members, say. It is taken whenever the entry enters `hot` (inserted, found in `cold`, or
/// kept by a rotation), so an entry that grows in place is counted late until then.
#[derive(Debug)]
pub(super) struct Generations<K, V> {
    hot: HashMap<K, V>,
    cold: HashMap<K, V>,
    /// The weight of `hot`.
    hot_weight: usize,
    /// The weight of `cold` (as taken when its entries entered `hot`).
    cold_weight: usize,
    /// The weight `keep` carried into `hot` at the last rotation.
    carried: usize,
    half: usize,
    weigh: fn(&V) -> usize,
}

impl<K: Hash + Eq, V> Generations<K, V> {
    /// A map whose entries weigh at most about `capacity` in all.
    pub(super) fn new(capacity: usize, weigh: fn(&V) -> usize) -> Self {
        Self {
            hot: HashMap::new(),
            cold: HashMap::new(),
            hot_weight: 0,
            cold_weight: 0,
            carried: 0,
            half: (capacity / 2).max(1),
            weigh,
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
            let weight = (self.weigh)(&v).max(1);
            self.cold_weight = self.cold_weight.saturating_sub(weight);
            self.hot_weight += weight;
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
        if let Some(old) = self.cold.remove(&key) {
            self.cold_weight = self.cold_weight.saturating_sub((self.weigh)(&old).max(1));
        }
        let weight = (self.weigh)(&value).max(1);
        match self.hot.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let old = e.insert(value);
                self.hot_weight = self.hot_weight - (self.weigh)(&old).max(1) + weight;
                e.into_mut()
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                self.hot_weight += weight;
                e.insert(value)
            }
        }
    }

    /// Rotates once the recent generation has taken in half the capacity: drops the entries
    /// unused for a whole generation, except those `keep` says the store cannot rebuild yet.
    /// Returns how many were dropped. What `keep` carries over counts as already taken in,
    /// and the next rotation waits for at least as much again, so that a rotation's cost
    /// (one pass over the dropped generation) stays amortised over the insertions between.
    pub(super) fn make_room(&mut self, mut keep: impl FnMut(&V) -> bool) -> usize {
        if self.hot_weight < self.carried + self.half.max(self.carried) {
            return 0;
        }
        let old = std::mem::replace(&mut self.cold, std::mem::take(&mut self.hot));
        self.cold_weight = self.hot_weight;
        self.hot_weight = 0;
        let mut dropped = 0;
        for (k, v) in old {
            if keep(&v) {
                self.hot_weight += (self.weigh)(&v).max(1);
                self.hot.insert(k, v);
            } else {
                dropped += 1;
            }
        }
        self.carried = self.hot_weight;
        dropped
    }

    /// Drops everything.
    pub(super) fn clear(&mut self) {
        self.hot.clear();
        self.cold.clear();
        self.hot_weight = 0;
        self.cold_weight = 0;
        self.carried = 0;
    }

    /// How many entries are held.
    pub(super) fn len(&self) -> usize {
        self.hot.len() + self.cold.len()
    }

    /// What the entries held weigh, as taken when each last entered the recent generation.
    pub(super) fn weight(&self) -> usize {
        self.hot_weight + self.cold_weight
    }

    /// What the entries held weigh now.
    #[cfg(test)]
    fn weight_now(&self) -> usize {
        self.hot
            .values()
            .chain(self.cold.values())
            .map(|v| (self.weigh)(v).max(1))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_at_most_its_capacity_and_keeps_what_is_used() {
        let mut cache = Generations::new(100, |_: &u32| 1);
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
    fn heavy_entries_take_the_room_of_many_light_ones() {
        // Weights 1 to 100 (a conversation's members, say) against a capacity of 1000.
        let mut cache = Generations::new(1000, |v: &usize| *v);
        for i in 0..10_000usize {
            cache.make_room(|_| false);
            cache.insert(i, 1 + i % 100);
            // Half the capacity in each generation, plus the entry that tipped it over.
            assert!(cache.weight() < 1000 + 2 * 100, "{} at {i}", cache.weight());
            assert_eq!(cache.weight(), cache.weight_now());
        }
        assert!(cache.len() < 100, "{} entries", cache.len());
    }

    #[test]
    fn entries_kept_over_do_not_make_every_insertion_rotate() {
        let mut cache = Generations::new(4, |_: &u32| 1);
        let mut passes = 0;
        for i in 0..10_000u32 {
            // The last 1000 entries are pinned (writes still queued, say).
            let floor = i.saturating_sub(1000);
            let before = cache.len();
            let dropped = cache.make_room(|v| *v >= floor);
            if dropped > 0 || cache.len() != before {
                passes += 1;
            }
            cache.insert(i, i);
        }
        // A rotation passes over hundreds of entries: it comes once per hundreds of
        // insertions (about 24 times here), not at each of them (8,997 times without the wait).
        assert!(passes <= 40, "{passes} rotations");
        assert!(cache.len() <= 2 * 1000 + 4, "{}", cache.len());
    }

    #[test]
    fn what_the_owner_keeps_survives_rotation() {
        let mut cache = Generations::new(4, |_: &u32| 1);
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
