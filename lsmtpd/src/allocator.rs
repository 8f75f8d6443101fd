//! The daemon's global allocator: glibc's, plus a few of sled's log buffers kept for reuse.
//!
//! sled 0.34 writes its log through buffers of one segment each (512 KiB, aligned to 8 KiB) and
//! allocates a fresh one for every segment it fills. lsmtpd sets glibc's mmap threshold to
//! 128 KiB (`main.rs`), so each of them was a new mapping: 128 page faults and zeroed pages per
//! segment, and an `munmap` when sled freed it — about 6 page faults and 15 µs of CPU per
//! accepted 4 KiB message (BENCHMARKS.md). Raising the threshold instead put every allocation
//! up to that size on the heap and cost 15–30 MiB of peak RSS.
//!
//! [`Recycler`] keeps up to [`SLOTS`] freed blocks of exactly that layout and hands them out
//! again; everything else goes to the system allocator unchanged. So at most `SLOTS` × 512 KiB
//! stay mapped while unused. The slots are atomics: no lock, and nothing allocated inside the
//! allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

/// The size of a sled 0.34 log buffer: its default `segment_size`, which the spool keeps.
pub const SEGMENT_BYTES: usize = 512 * 1024;
/// The alignment sled asks for its log buffers.
pub const SEGMENT_ALIGN: usize = 8192;
/// How many freed log buffers are kept for reuse (2 MiB).
pub const SLOTS: usize = 4;

/// glibc's allocator with a small cache of sled's log buffers ([module docs](self)).
pub struct Recycler {
    slots: [AtomicPtr<u8>; SLOTS],
    reused: AtomicU64,
}

impl Recycler {
    pub const fn new() -> Recycler {
        Recycler {
            slots: [const { AtomicPtr::new(ptr::null_mut()) }; SLOTS],
            reused: AtomicU64::new(0),
        }
    }

    /// How many allocations were served from the cache so far.
    pub fn reused(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }

    fn recycles(layout: Layout) -> bool {
        layout.size() == SEGMENT_BYTES && layout.align() == SEGMENT_ALIGN
    }
}

impl Default for Recycler {
    fn default() -> Recycler {
        Recycler::new()
    }
}

// SAFETY: every block handed out is either the system allocator's for this very layout, or a
// block of the same layout that the system allocator gave out earlier and that was deallocated
// into a slot (a slot holds each pointer once: it is taken with `swap`, so two callers never get
// the same block). Blocks of other layouts go to and from `System` untouched.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Recycler {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if Recycler::recycles(layout) {
            for slot in &self.slots {
                let p = slot.swap(ptr::null_mut(), Ordering::Acquire);
                if !p.is_null() {
                    self.reused.fetch_add(1, Ordering::Relaxed);
                    return p;
                }
            }
        }
        // SAFETY: the caller's contract for `alloc` is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        if Recycler::recycles(layout) {
            for slot in &self.slots {
                if slot
                    .compare_exchange(ptr::null_mut(), p, Ordering::Release, Ordering::Relaxed)
                    .is_ok()
                {
                    return;
                }
            }
        }
        // SAFETY: `p` was allocated with `layout` by `System` (directly or through a slot).
        unsafe { System.dealloc(p, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on; a zeroed block is never taken from a slot.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `p` is `System`'s for `layout` (see `dealloc`); the result is `System`'s too,
        // which a later `dealloc` of the recycled layout may keep in a slot.
        unsafe { System.realloc(p, layout, new_size) }
    }
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::*;

    fn segment() -> Layout {
        Layout::from_size_align(SEGMENT_BYTES, SEGMENT_ALIGN).expect("valid layout")
    }

    #[test]
    fn a_freed_log_buffer_is_handed_out_again() {
        let r = Recycler::new();
        // SAFETY: allocations and deallocations pair up with their layouts.
        unsafe {
            let a = r.alloc(segment());
            assert!(!a.is_null());
            a.write_bytes(7, SEGMENT_BYTES);
            r.dealloc(a, segment());
            let b = r.alloc(segment());
            assert_eq!(a, b);
            assert_eq!(r.reused(), 1);
            r.dealloc(b, segment());
        }
    }

    #[test]
    fn at_most_slots_blocks_are_kept_and_none_is_handed_out_twice() {
        let r = Recycler::new();
        // SAFETY: as above.
        unsafe {
            let blocks: Vec<*mut u8> = (0..SLOTS + 2).map(|_| r.alloc(segment())).collect();
            for &b in &blocks {
                r.dealloc(b, segment());
            }
            let again: Vec<*mut u8> = (0..SLOTS + 2).map(|_| r.alloc(segment())).collect();
            assert_eq!(r.reused(), SLOTS as u64);
            let mut sorted = again.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), again.len(), "a block was handed out twice");
            for &b in &again {
                r.dealloc(b, segment());
            }
        }
    }

    #[test]
    fn other_layouts_are_not_kept() {
        let r = Recycler::new();
        let other = Layout::from_size_align(SEGMENT_BYTES, 8).expect("valid layout");
        // SAFETY: as above.
        unsafe {
            let a = r.alloc(other);
            r.dealloc(a, other);
            let b = r.alloc(segment());
            r.dealloc(b, segment());
            assert_eq!(r.reused(), 0);
        }
    }
}
