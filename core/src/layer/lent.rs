//! Read data a layer lends to the reply instead of copying it (zero-copy READ replies).
//!
//! A layer that keeps its bytes in memory (the `memory` backend's pages) can answer a read with
//! shared references to that memory. The connection queues those pieces as they are and the
//! socket write takes them straight from the layer's pages, in one vectored write with the
//! reply header. The layer promises that lent bytes never change while a reference is out: a
//! writer that finds a page shared copies it first (copy on write), so a reply always carries
//! the data as it was when the read completed.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use smallvec::SmallVec;

/// A block of memory shared between a layer's storage and the replies lending it.
///
/// An `Arc<Vec<u8>>` rather than an `Arc<[u8]>`: the reference counts then live in a small
/// header allocation of their own instead of in front of the data. Lending a page touches its
/// counts; with them in front of a 32 KiB page, every 4K random read paid a cache and TLB miss
/// on a line it did not otherwise need (two thirds of the `memory` backend's read CPU), where
/// the headers of all pages now sit close together. A `Vec` also becomes shared without a copy.
pub type SharedBytes = Arc<Vec<u8>>;

/// One piece of lent read data. A read's pieces are in order and add up to its length.
#[derive(Clone, Debug)]
pub enum Lent {
    /// `page[start..end]`, shared with the layer's storage.
    Bytes { page: SharedBytes, start: usize, end: usize },
    /// `len` zero bytes in a range the layer knows is unallocated: a hole.
    Zero(usize),
    /// `len` bytes of `file` from `offset`, which the layer found in the page cache: sent with
    /// `sendfile`, so they never pass through user space. (Over TLS they are read into a buffer
    /// instead, quickly, being cached.) Lent only for plaintext connections' benefit and only
    /// when cached, since sending them must not wait for a disk.
    File { file: Arc<File>, offset: u64, len: usize },
}

impl Lent {
    pub fn len(&self) -> usize {
        match self {
            Lent::Bytes { start, end, .. } => end - start,
            Lent::Zero(n) => *n,
            Lent::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A file range, which only a plaintext socket can take as it is.
    pub fn is_file(&self) -> bool {
        matches!(self, Lent::File { .. })
    }
}

/// A read's lent pieces. Two fit inline, which covers every read within one page or across
/// one page boundary (a 4 KiB read from the `memory` backend's 32 KiB pages, say): lending
/// them costs no allocation. Longer lists (large reads) spill to the heap.
pub type LentPieces = SmallVec<[Lent; 2]>;

/// What a lending read returns: a buffer the layer filled, or lent pieces.
#[derive(Debug)]
pub enum ReadData {
    Buf(Vec<u8>),
    Lent(LentPieces),
}

impl ReadData {
    /// Data lent as a single piece.
    pub fn one(piece: Lent) -> ReadData {
        let mut pieces = LentPieces::new();
        pieces.push(piece);
        ReadData::Lent(pieces)
    }

    pub fn len(&self) -> usize {
        match self {
            ReadData::Buf(v) => v.len(),
            ReadData::Lent(p) => p.iter().map(Lent::len).sum(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The data as one contiguous buffer (copying lent pieces into a pooled buffer). A file
    /// piece that cannot be read whole (the file shrank) is an error.
    pub fn into_vec(self) -> std::io::Result<Vec<u8>> {
        match self {
            ReadData::Buf(v) => Ok(v),
            ReadData::Lent(pieces) => {
                let mut v = crate::bufpool::take(pieces.iter().map(Lent::len).sum());
                let mut at = 0;
                for p in &pieces {
                    let n = p.len();
                    let dst = &mut v[at..at + n];
                    match p {
                        Lent::Bytes { page, start, end } => dst.copy_from_slice(&page[*start..*end]),
                        Lent::Zero(_) => dst.fill(0),
                        Lent::File { file, offset, .. } => file.read_exact_at(dst, *offset)?,
                    }
                    at += n;
                }
                Ok(v)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lent_pieces_flatten_in_order() {
        let page: SharedBytes = Arc::new(b"abcdefgh".to_vec());
        let d = ReadData::Lent(LentPieces::from_vec(vec![
            Lent::Bytes { page: page.clone(), start: 6, end: 8 },
            Lent::Zero(3),
            Lent::Bytes { page, start: 0, end: 2 },
        ]));
        assert_eq!(d.len(), 7);
        assert_eq!(d.into_vec().unwrap(), b"gh\0\0\0ab");
    }
}
