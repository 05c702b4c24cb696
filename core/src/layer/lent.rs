//! Read data a layer lends to the reply instead of copying it (zero-copy READ replies).
//!
//! A layer that keeps its bytes in memory (the `memory` backend's pages) can answer a read with
//! shared references to that memory. The connection queues those pieces as they are and the
//! socket write takes them straight from the layer's pages, in one vectored write with the
//! reply header. The layer promises that lent bytes never change while a reference is out: a
//! writer that finds a page shared copies it first (copy on write), so a reply always carries
//! the data as it was when the read completed.

use std::sync::Arc;

/// One piece of lent read data. A read's pieces are in order and add up to its length.
#[derive(Clone, Debug)]
pub enum Lent {
    /// `page[start..end]`, shared with the layer's storage.
    Bytes { page: Arc<[u8]>, start: usize, end: usize },
    /// `len` zero bytes in a range the layer knows is unallocated: a hole.
    Zero(usize),
}

impl Lent {
    pub fn len(&self) -> usize {
        match self {
            Lent::Bytes { start, end, .. } => end - start,
            Lent::Zero(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a lending read returns: a buffer the layer filled, or lent pieces.
#[derive(Debug)]
pub enum ReadData {
    Buf(Vec<u8>),
    Lent(Vec<Lent>),
}

impl ReadData {
    pub fn len(&self) -> usize {
        match self {
            ReadData::Buf(v) => v.len(),
            ReadData::Lent(p) => p.iter().map(Lent::len).sum(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The data as one contiguous buffer (copying lent pieces into a pooled buffer).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            ReadData::Buf(v) => v,
            ReadData::Lent(pieces) => {
                let mut v = crate::bufpool::take(pieces.iter().map(Lent::len).sum());
                let mut at = 0;
                for p in &pieces {
                    let n = p.len();
                    match p {
                        Lent::Bytes { page, start, end } => {
                            v[at..at + n].copy_from_slice(&page[*start..*end])
                        }
                        Lent::Zero(_) => v[at..at + n].fill(0),
                    }
                    at += n;
                }
                v
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lent_pieces_flatten_in_order() {
        let page: Arc<[u8]> = Arc::from(&b"abcdefgh"[..]);
        let d = ReadData::Lent(vec![
            Lent::Bytes { page: page.clone(), start: 6, end: 8 },
            Lent::Zero(3),
            Lent::Bytes { page, start: 0, end: 2 },
        ]);
        assert_eq!(d.len(), 7);
        assert_eq!(d.into_vec(), b"gh\0\0\0ab");
    }
}
