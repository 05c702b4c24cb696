//! The pure helpers: block sizes, hole splitting, block-status descriptors.

use crate::conn::options::block_sizes;
use crate::conn::transmission::{descriptors, split_holes, Piece};
use crate::layer::{BlockSize, Extent, Extents};

fn valid(min: u32, pref: u32, max: u32) -> bool {
    min.is_power_of_two()
        && min <= 65536
        && pref.is_power_of_two()
        && pref >= min.max(512)
        && max >= pref
        && (max == u32::MAX || max & (min - 1) == 0) // min is a power of two here
}

#[test]
fn block_sizes_always_satisfy_the_spec() {
    assert_eq!(block_sizes(64 << 20, 1 << 30, None), (1, 4096, 64 << 20));
    assert_eq!(block_sizes(64 << 20, 1 << 20, None), (1, 4096, 1 << 20), "bounded by the budget");
    let bs = |minimum, preferred, maximum| Some(BlockSize { minimum, preferred, maximum });
    assert_eq!(block_sizes(64 << 20, 1 << 30, bs(512, 4096, 1 << 20).as_ref()), (512, 4096, 1 << 20));
    for b in [
        bs(0, 0, 0),
        bs(3, 1000, 5000),
        bs(1 << 20, 1 << 20, 1 << 20),
        bs(4096, 512, 100),
        bs(512, u32::MAX, u32::MAX),
        bs(1, 1 << 31, 1 << 31),
        bs(65536, 65536, 70000),
        None,
    ] {
        for max_request in [1, 511, 4096, 1 << 25, u32::MAX] {
            for budget in [1usize, 100_000, 1 << 40] {
                let (min, pref, max) = block_sizes(max_request, budget, b.as_ref());
                assert!(valid(min, pref, max), "{b:?} {max_request} {budget} → {min} {pref} {max}");
                assert!(max <= 1 << 31);
            }
        }
    }
}

#[test]
fn holes_are_whole_aligned_blocks() {
    let mut d = vec![1u8; 5 * 4096];
    d[4096..3 * 4096].fill(0);
    assert_eq!(
        split_holes(&d, 0).into_vec(),
        vec![Piece::Data(0..4096), Piece::Hole(4096..12288), Piece::Data(12288..20480)]
    );
    // Shifted by 100 bytes in the export: the zero run is no longer block-aligned except one.
    assert_eq!(
        split_holes(&d, 4096 - 100).into_vec(),
        vec![Piece::Data(0..4196), Piece::Hole(4196..8292), Piece::Data(8292..20480)]
    );
    assert_eq!(split_holes(&[0; 4095], 0).into_vec(), vec![Piece::Data(0..4095)]);
    assert_eq!(split_holes(&[0; 8192], 0).into_vec(), vec![Piece::Hole(0..8192)]);
    assert_eq!(split_holes(&[], 0).into_vec(), vec![]);
    assert_eq!(
        split_holes(&[0; 8192], u64::MAX - 10).into_vec(),
        vec![Piece::Data(0..11), Piece::Hole(11..4107), Piece::Data(4107..8192)]
    );
}

#[test]
fn descriptors_stop_at_the_request_end() {
    let e = Extents(vec![
        Extent { length: 0, flags: 9 },
        Extent { length: 100, flags: 1 },
        Extent { length: 100, flags: 2 },
        Extent { length: 100, flags: 3 },
    ]);
    assert_eq!(descriptors(&e, 150, false, u64::MAX, 100), vec![(100, 1), (100, 2)]);
    assert_eq!(descriptors(&e, 100, false, u64::MAX, 100), vec![(100, 1)]);
    assert_eq!(descriptors(&e, 1000, false, u64::MAX, 2), vec![(100, 1), (100, 2)]);
    assert_eq!(descriptors(&e, 50, true, u64::MAX, 100), vec![(50, 1)]);
    assert_eq!(descriptors(&e, 1000, false, 64, 100).len(), 6);
}

#[test]
fn conn_can_move_between_threads() {
    fn is_send<T: Send>() {}
    is_send::<crate::conn::Conn>();
    is_send::<crate::conn::Event>();
}
