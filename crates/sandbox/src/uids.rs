//! The user ids sessions run as: one per live sandbox, from a reserved range.
//!
//! Distinct uids are what keep sessions from signalling, tracing or reading each other
//! (together with `hidepid` on `/proc`). A uid returns to the pool only after every process
//! of its sandbox is gone, and it goes to the back of the queue, so reuse is as late as the
//! range allows.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Mutex;

/// First uid handed to sessions. High enough to stay clear of real accounts and of the
/// usual subordinate-id ranges of rootless containers (100000 + 65536 per user).
pub const FIRST_UID: u32 = 1_000_000_000;
/// Uids per server instance.
pub const UIDS_PER_RANGE: u32 = 1_000_000;
/// How many servers can run side by side on one host.
const RANGES: u32 = 1_000;

/// A block of uids reserved for this server process. Two servers on one host (tests run
/// many) must never hand out the same uid, or their sessions could signal each other; the
/// reservation is an exclusive `flock` on a per-block file, released when the process ends.
pub struct UidRange {
    pub first: u32,
    pub count: u32,
    _lock: nix::fcntl::Flock<File>,
}

impl UidRange {
    /// Reserves the first free block, using lock files in `lock_dir` (host-wide, such as
    /// `/run/sandpool`).
    pub fn claim(lock_dir: &Path) -> io::Result<UidRange> {
        std::fs::create_dir_all(lock_dir)?;
        for block in 0..RANGES {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(lock_dir.join(format!("uid-block-{block}.lock")))?;
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(UidRange { first: FIRST_UID + block * UIDS_PER_RANGE, count: UIDS_PER_RANGE, _lock: lock }),
                Err((_, nix::Error::EWOULDBLOCK)) => continue,
                Err((_, err)) => return Err(err.into()),
            }
        }
        Err(io::Error::other(format!("all {RANGES} session uid blocks are taken by other sandpool servers")))
    }

    /// Takes the top `count` ids of the block for another use (the user namespace of
    /// container sessions) and returns the first of them; the rest stays for Python sessions.
    pub fn split_off_top(&mut self, count: u32) -> u32 {
        assert!(count < self.count, "the uid block is too small to split");
        self.count -= count;
        self.first + self.count
    }
}

pub struct UidAllocator {
    first: u32,
    count: u32,
    state: Mutex<UidState>,
    /// Held for the allocator's life so no other server takes the same block.
    _reservation: Option<UidRange>,
}

#[derive(Default)]
struct UidState {
    /// Uids below `first + next_fresh` have been handed out at least once.
    next_fresh: u32,
    released: VecDeque<u32>,
}

impl UidAllocator {
    /// Allocates from a reserved block.
    pub fn new(range: UidRange) -> UidAllocator {
        UidAllocator { first: range.first, count: range.count, state: Mutex::new(UidState::default()), _reservation: Some(range) }
    }

    /// Allocates from `first..first + count` without a reservation (tests).
    pub fn unreserved(first: u32, count: u32) -> UidAllocator {
        UidAllocator { first, count, state: Mutex::new(UidState::default()), _reservation: None }
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

    /// Marks `uid` as taken by a session that survived a server restart. False when it is not
    /// in this allocator's block (the session cannot be adopted).
    pub fn adopt(&self, uid: u32) -> bool {
        if !(self.first..self.first + self.count).contains(&uid) {
            return false;
        }
        let mut state = self.state.lock().expect("uid lock");
        let offset = uid - self.first;
        if offset >= state.next_fresh {
            // The ids skipped on the way are free.
            for skipped in state.next_fresh..offset {
                let free = self.first + skipped;
                state.released.push_back(free);
            }
            state.next_fresh = offset + 1;
        } else {
            state.released.retain(|released| *released != uid);
        }
        true
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
    fn two_servers_get_disjoint_blocks_and_a_released_block_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = UidRange::claim(dir.path()).unwrap();
        let b = UidRange::claim(dir.path()).unwrap();
        assert_eq!((a.first, b.first), (FIRST_UID, FIRST_UID + UIDS_PER_RANGE));
        drop(a);
        assert_eq!(UidRange::claim(dir.path()).unwrap().first, FIRST_UID);
    }

    #[test]
    fn adopted_uids_are_never_handed_out_again() {
        let uids = UidAllocator::unreserved(100, 4);
        assert!(uids.adopt(102));
        assert!(!uids.adopt(99) && !uids.adopt(104), "outside the block");
        let handed: Vec<u32> = std::iter::from_fn(|| uids.allocate()).collect();
        assert_eq!(handed, vec![103, 100, 101]);
    }

    #[test]
    fn hands_out_distinct_uids_and_reuses_the_oldest_released_last() {
        let uids = UidAllocator::unreserved(100, 3);
        assert_eq!((uids.allocate(), uids.allocate(), uids.allocate()), (Some(100), Some(101), Some(102)));
        assert_eq!(uids.allocate(), None);
        uids.release(101);
        uids.release(100);
        assert_eq!(uids.allocate(), Some(101));
        assert_eq!(uids.allocate(), Some(100));
        assert_eq!(uids.allocate(), None);
    }
}
