//! Page-aligned buffers for O_DIRECT file IO, recycled per thread.
//!
//! O_DIRECT transfers go straight between the device and user memory, so the kernel wants the
//! memory aligned (to the device's logical block size, at most a page in practice). Request
//! buffers are ordinary `Vec<u8>`s with the allocator's 16-byte alignment, so a direct transfer
//! goes through an [`AlignedBuf`]: a bounce buffer allocated with [`ALIGN`]-byte alignment.
//!
//! Allocating a fresh buffer per request would cost a page fault per page (as for request
//! buffers, see `bufpool`), so a dropped `AlignedBuf` goes back to a small pool owned by the
//! thread that drops it (an event loop, or a blocking-pool thread), and [`AlignedBuf::new`]
//! takes from the calling thread's pool first. The pool keeps buffers by power-of-two size
//! class and holds at most [`MAX_POOLED_BYTES`] (16 MiB) per thread; buffers beyond that, and
//! buffers larger than that, are freed when dropped. This is a fixed overhead per thread that
//! does O_DIRECT IO, beside the memory budget (which the file backend charges for the bounce
//! buffers of requests in flight).

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`]: a page, which covers every logical block size Linux
/// devices use (512 to 4096).
pub const ALIGN: usize = 4096;

/// Bytes the recycled pool keeps per thread.
pub const MAX_POOLED_BYTES: usize = 16 * 1024 * 1024;

/// One allocation of `cap` bytes aligned to [`ALIGN`]; freed with the same layout on drop.
struct Block {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: a `Block` owns its allocation exclusively (nothing else holds the pointer), like a
// `Box<[u8]>`, so moving it to another thread and freeing it there is sound.
unsafe impl Send for Block {}

impl Block {
    fn layout(cap: usize) -> Layout {
        match Layout::from_size_align(cap, ALIGN) {
            Ok(l) => l,
            // `cap` is a power of two no larger than the largest request (64 MiB): a valid size.
            Err(e) => panic!("aligned buffer of {cap} bytes: {e}"),
        }
    }

    /// A new zero-filled block of `cap` bytes (`cap` > 0).
    fn alloc(cap: usize) -> Block {
        let layout = Block::layout(cap);
        // SAFETY: `layout` has a non-zero size (`cap` > 0, asserted by the callers' rounding
        // up to at least ALIGN).
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        // SAFETY: `ptr` points at `cap` writable bytes just allocated. Zeroing them once makes
        // every byte initialised, so the block may be handed out as `&[u8]` from then on.
        unsafe { ptr.as_ptr().write_bytes(0, cap) };
        Block { ptr, cap }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated by `alloc::alloc` with exactly this layout (same `cap`,
        // same ALIGN) and is freed only here, once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Block::layout(self.cap)) };
    }
}

#[derive(Default)]
struct Pool {
    /// `classes[k]` holds blocks of `ALIGN << k` bytes.
    classes: Vec<Vec<Block>>,
    bytes: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// The capacity a buffer of `len` bytes gets: a power of two, at least [`ALIGN`].
fn class_cap(len: usize) -> usize {
    len.max(ALIGN).next_power_of_two()
}

fn class_index(cap: usize) -> usize {
    (cap / ALIGN).trailing_zeros() as usize
}

fn take_block(cap: usize) -> Block {
    let k = class_index(cap);
    let recycled = POOL
        .try_with(|p| {
            let mut p = p.borrow_mut();
            let b = p.classes.get_mut(k)?.pop()?;
            p.bytes -= b.cap;
            Some(b)
        })
        .ok()
        .flatten();
    recycled.unwrap_or_else(|| Block::alloc(cap))
}

fn give_block(b: Block) {
    // During thread exit the pool may be gone already: then the block is simply freed.
    let _ = POOL.try_with(move |p| {
        let mut p = p.borrow_mut();
        if p.bytes + b.cap > MAX_POOLED_BYTES {
            return; // `b` is freed here
        }
        let k = class_index(b.cap);
        if p.classes.len() <= k {
            p.classes.resize_with(k + 1, Vec::new);
        }
        p.bytes += b.cap;
        p.classes[k].push(b);
    });
}

/// Bytes held by this thread's pool (for tests and reports).
pub fn pooled_bytes() -> usize {
    POOL.try_with(|p| p.borrow().bytes).unwrap_or(0)
}

/// A buffer of `len` bytes whose first byte is aligned to [`ALIGN`]. Its contents are
/// unspecified (zeroes, or bytes of an earlier use) until written. Dropping it recycles its
/// memory into the dropping thread's pool.
pub struct AlignedBuf {
    block: ManuallyDrop<Block>,
    len: usize,
}

impl AlignedBuf {
    /// A buffer of `len` bytes, from this thread's pool when it has one of the right class.
    pub fn new(len: usize) -> AlignedBuf {
        AlignedBuf { block: ManuallyDrop::new(take_block(class_cap(len))), len }
    }

    /// The length in bytes (without touching the contents, which the kernel may be writing).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes allocated (a power of two, at least [`ALIGN`]).
    pub fn capacity(&self) -> usize {
        self.block.cap
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.block.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.block.ptr.as_ptr()
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the block holds `cap` >= `len` initialised bytes (zeroed at allocation, and
        // only ever overwritten since), owned by `self` and borrowed immutably for the slice's
        // lifetime.
        unsafe { std::slice::from_raw_parts(self.block.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees the slice is the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.block.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `block` is taken exactly once, here, and `self` is not used afterwards.
        let b = unsafe { ManuallyDrop::take(&mut self.block) };
        give_block(b);
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).field("capacity", &self.capacity()).finish()
    }
}

/// What `statx(STATX_DIOALIGN)` says about O_DIRECT on a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DioAlign {
    /// Required alignment of user memory, in bytes (0: O_DIRECT is not supported).
    pub mem: u32,
    /// Required alignment of file offsets and lengths, in bytes (0: not supported).
    pub offset: u32,
}

/// The O_DIRECT alignment the kernel reports for `file` (Linux ≥ 6.1, on file systems that
/// fill it in; block devices since 6.11). `Ok(None)`: the kernel or file system does not say.
pub fn dio_alignment(file: &File) -> io::Result<Option<DioAlign>> {
    // SAFETY: `statx` is plain data (integers and padding), for which all-zero bytes are a
    // valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: `empty` is a valid NUL-terminated string, `stx` a writable statx buffer alive for
    // the call, and the descriptor belongs to `file`, borrowed (so open) for the call. With
    // AT_EMPTY_PATH the call describes that descriptor.
    let r = unsafe {
        libc::statx(file.as_raw_fd(), empty.as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx)
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Ok(None);
    }
    Ok(Some(DioAlign { mem: stx.stx_dio_mem_align, offset: stx.stx_dio_offset_align }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_sized_and_writable() {
        for len in [0, 1, 511, 4096, 4097, 65536, 1 << 20] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0, "{len}");
            assert!(b.capacity() >= len.max(ALIGN) && b.capacity().is_power_of_two());
            b.fill(0x5a);
            assert!(b.iter().all(|&x| x == 0x5a));
        }
    }

    #[test]
    fn dropped_buffers_are_reused_by_the_same_thread() {
        // A fresh thread, so other tests' buffers do not share the pool.
        std::thread::spawn(|| {
            let a = AlignedBuf::new(8192);
            let p = a.as_ptr();
            drop(a);
            assert_eq!(pooled_bytes(), 8192);
            let b = AlignedBuf::new(5000); // same class
            assert_eq!(b.as_ptr(), p);
            assert_eq!(pooled_bytes(), 0);
            // A buffer moved to another thread and dropped there lands in that thread's pool.
            std::thread::spawn(move || {
                drop(b);
                assert_eq!(pooled_bytes(), 8192);
            })
            .join()
            .unwrap();
            assert_eq!(pooled_bytes(), 0);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_pool_is_bounded() {
        std::thread::spawn(|| {
            let bufs: Vec<AlignedBuf> = (0..40).map(|_| AlignedBuf::new(1 << 20)).collect();
            drop(bufs);
            assert_eq!(pooled_bytes(), MAX_POOLED_BYTES);
            // Larger than the whole pool: never kept.
            drop(AlignedBuf::new(MAX_POOLED_BYTES * 2));
            assert_eq!(pooled_bytes(), MAX_POOLED_BYTES);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn statx_dioalign_answers_or_says_it_cannot() {
        let path = std::env::temp_dir().join(format!("blocksmith-dioalign-{}", std::process::id()));
        let f = File::create(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        if let Some(a) = dio_alignment(&f).unwrap() {
            // Either unsupported (both zero) or powers of two.
            assert!(a.offset == 0 || a.offset.is_power_of_two(), "{a:?}");
            assert!(a.mem == 0 || a.mem.is_power_of_two(), "{a:?}");
        }
    }
}
