//! The user ids sessions run as: one per live sandbox, from a reserved range.
//!
//! Distinct uids are what keep sessions from signalling, tracing or reading each other
//! (together with `hidepid` on `/proc`). A uid returns to the pool only after every process
//! of its sandbox is gone, and it goes to the back of the queue, so reuse is as late as the
//! range allows.

use std::collections::VecDeque;
use std::sync::Mutex;

/// First uid handed to sessions. High enough to stay clear of real accounts and of the
/// usual subordinate-id ranges of rootless containers (100000 + 65536 per user).
pub const DEFAULT_FIRST_UID: u32 = 1_000_000_000;
pub const DEFAULT_UID_COUNT: u32 = 1_000_000;

pub struct UidAllocator {
    first: u32,
    count: u32,
    state: Mutex<UidState>,
}

struct UidState {
    /// Uids below `first + next_fresh` have been handed out at least once.
    next_fresh: u32,
    released: VecDeque<u32>,
}

impl UidAllocator {
    pub fn new(first: u32, count: u32) -> UidAllocator {
        UidAllocator { first, count, state: Mutex::new(UidState { next_fresh: 0, released: VecDeque::new() }) }
    }

    /// A uid no live sandbox uses, or `None` when all are taken.
    pub fn allocate(&self) -> Option<u32> {
        let mut state = self.state.lock().expect("uid lock");
        if state.next_fresh < self.count {
            state.next_fresh += 1;
            return Some(self.first + state.next_fresh - 1);
        }
        state.released.pop_front()
    }

    /// Returns a uid once nothing runs under it any more.
    pub fn release(&self, uid: u32) {
        debug_assert!((self.first..self.first + self.count).contains(&uid));
        self.state.lock().expect("uid lock").released.push_back(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_distinct_uids_and_reuses_the_oldest_released_last() {
        let uids = UidAllocator::new(100, 3);
        assert_eq!((uids.allocate(), uids.allocate(), uids.allocate()), (Some(100), Some(101), Some(102)));
        assert_eq!(uids.allocate(), None);
        uids.release(101);
        uids.release(100);
        assert_eq!(uids.allocate(), Some(101));
        assert_eq!(uids.allocate(), Some(100));
        assert_eq!(uids.allocate(), None);
    }
}
