// Scratch program behind tests/bench/results/saved-index.md: bytes per entry of the index
// structures, measured with a counting global allocator. `cargo add indexset` to build it.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
struct Count;
static NOW: AtomicUsize = AtomicUsize::new(0);
unsafe impl GlobalAlloc for Count {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 { NOW.fetch_add(l.size(), Relaxed); unsafe { System.alloc(l) } }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) { NOW.fetch_sub(l.size(), Relaxed); unsafe { System.dealloc(p, l) } }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 { NOW.fetch_add(n, Relaxed); NOW.fetch_sub(l.size(), Relaxed); unsafe { System.realloc(p, l, n) } }
}
#[global_allocator] static A: Count = Count;
const N: u64 = 1_000_000;
fn key(i: u64) -> (u64, [u8; 16]) { let mut id = [0u8;16]; id[..8].copy_from_slice(&(1_700_000_000_000u64 + i/10).to_be_bytes()); id[8..].copy_from_slice(&(i.wrapping_mul(0x9e3779b97f4a7c15)).to_be_bytes()); (1_700_000_000_000 + i/10, id) }
fn main() {
    let b = NOW.load(Relaxed);
    let mut m = std::collections::BTreeMap::new(); let mut s = std::collections::BTreeSet::new();
    for i in 0..N { let (d,id)=key(i); m.insert((d,id), false); s.insert(id); }
    let a = NOW.load(Relaxed) - b; println!("std map+set: {:.1} B/entry (map {})", a as f64 / N as f64, 0);
    drop(s); println!("std map only: {:.1} B/entry", (NOW.load(Relaxed)-b) as f64 / N as f64);
    for i in 0..N/2 { let (d,id)=key(i); m.remove(&(d,id)); }
    println!("std map after removing half: {:.1} B/remaining", (NOW.load(Relaxed)-b) as f64 / (N/2) as f64);
    drop(m);
    let b = NOW.load(Relaxed);
    let mut m = indexset::BTreeMap::new(); let mut s = indexset::BTreeSet::new();
    let t = std::time::Instant::now();
    for i in 0..N { let (d,id)=key(i); m.insert((d,id), false); s.insert(id); }
    println!("indexset map+set: {:.1} B/entry ({:?})", (NOW.load(Relaxed)-b) as f64 / N as f64, t.elapsed());
    drop(s); println!("indexset map only: {:.1} B/entry", (NOW.load(Relaxed)-b) as f64 / N as f64);
    for i in 0..N/2 { let (d,id)=key(i); m.remove(&(d,id)); }
    println!("indexset map after removing half: {:.1} B/remaining", (NOW.load(Relaxed)-b) as f64 / (N/2) as f64);
    println!("first {:?}", m.iter().next().map(|(k,_)| k.0));
}
