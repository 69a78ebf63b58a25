//! Best-fit-decreasing packing of samples into rows of at most `capacity` tokens.
//!
//! Items (a sample, or a preference pair that must share a row) are placed longest
//! first, each into the open row with the least room that still fits it (ties: the row
//! that reached that room last), else into a new row. Finding that row is a
//! "next set bit at or after" query on a bitset of room values, so packing is
//! O(n log n) for the sort and near O(1) per item.

/// Rows as offsets into a flat list of item indices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packing {
    /// Row r holds `items[offsets[r]..offsets[r + 1]]`.
    pub offsets: Vec<usize>,
    /// Item indices, row after row, in placement order.
    pub items: Vec<usize>,
}

impl Packing {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }
}

/// Packs items of `lengths` (each at most `capacity`) best-fit-decreasing.
pub fn pack_bfd(lengths: &[usize], capacity: usize) -> Packing {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]));
    let mut room_set = RoomSet::new(capacity + 1);
    let mut by_room: Vec<Vec<usize>> = vec![Vec::new(); capacity + 1];
    let mut room: Vec<usize> = Vec::new();
    let mut row_items: Vec<Vec<usize>> = Vec::new();
    for item in order {
        let len = lengths[item];
        assert!(
            len <= capacity,
            "item {item} ({len} tokens) is longer than a row ({capacity})"
        );
        let row = match room_set.first_at_or_after(len) {
            Some(r) => {
                let row = by_room[r].pop().expect("room set and buckets agree");
                if by_room[r].is_empty() {
                    room_set.clear(r);
                }
                row
            }
            None => {
                room.push(capacity);
                row_items.push(Vec::new());
                room.len() - 1
            }
        };
        room[row] -= len;
        row_items[row].push(item);
        let left = room[row];
        by_room[left].push(row);
        room_set.set(left);
    }
    let mut packing = Packing {
        offsets: vec![0],
        items: Vec::with_capacity(lengths.len()),
    };
    for items in row_items {
        packing.items.extend(items);
        packing.offsets.push(packing.items.len());
    }
    packing
}

/// One item per row, in dataset order (the unpacked, padded mode).
pub fn one_per_row(n: usize) -> Packing {
    Packing {
        offsets: (0..=n).collect(),
        items: (0..n).collect(),
    }
}

/// A set of integers in 0..n with "first member >= x" in O(log64 n).
struct RoomSet {
    levels: Vec<Vec<u64>>,
}

impl RoomSet {
    fn new(n: usize) -> Self {
        let mut levels = Vec::new();
        let mut size = n.max(1);
        loop {
            let words = size.div_ceil(64);
            levels.push(vec![0u64; words]);
            if words == 1 {
                break;
            }
            size = words;
        }
        RoomSet { levels }
    }

    fn set(&mut self, mut i: usize) {
        for level in &mut self.levels {
            level[i / 64] |= 1 << (i % 64);
            i /= 64;
        }
    }

    fn clear(&mut self, mut i: usize) {
        for level in &mut self.levels {
            level[i / 64] &= !(1 << (i % 64));
            if level[i / 64] != 0 {
                break;
            }
            i /= 64;
        }
    }

    fn first_at_or_after(&self, x: usize) -> Option<usize> {
        self.search(0, x)
    }

    /// First member >= x at `level` (positions of that level), descending to level 0.
    fn search(&self, level: usize, x: usize) -> Option<usize> {
        let words = &self.levels[level];
        let (w, b) = (x / 64, x % 64);
        if w >= words.len() {
            return None;
        }
        let masked = words[w] & (!0u64 << b);
        if masked != 0 {
            return Some(w * 64 + masked.trailing_zeros() as usize);
        }
        if level + 1 == self.levels.len() {
            return None;
        }
        // Next non-empty word after w, found one level up, then its first bit.
        let next = self.search(level + 1, w + 1)?;
        Some(next * 64 + words[next].trailing_zeros() as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_fit_decreasing_fills_rows() {
        let p = pack_bfd(&[6, 5, 4, 3, 2], 10);
        let rows: Vec<Vec<usize>> = (0..p.rows())
            .map(|r| p.items[p.offsets[r]..p.offsets[r + 1]].to_vec())
            .collect();
        // 6 opens row 0, 5 opens row 1, 4 fits row 0 exactly, 3 -> row 1 (room 5), 2 -> row 1 (room 2).
        assert_eq!(rows, vec![vec![0, 2], vec![1, 3, 4]]);
    }

    #[test]
    fn room_set_finds_next_member_across_levels() {
        let mut s = RoomSet::new(10_000);
        for x in [3, 64, 4095, 9999] {
            s.set(x);
        }
        assert_eq!(s.first_at_or_after(0), Some(3));
        assert_eq!(s.first_at_or_after(4), Some(64));
        assert_eq!(s.first_at_or_after(65), Some(4095));
        assert_eq!(s.first_at_or_after(4096), Some(9999));
        s.clear(9999);
        assert_eq!(s.first_at_or_after(4096), None);
    }

    #[test]
    fn every_item_placed_once_and_rows_fit() {
        let lengths: Vec<usize> = (0..500).map(|i| (i * 7919) % 97 + 1).collect();
        let p = pack_bfd(&lengths, 128);
        let mut seen = p.items.clone();
        seen.sort();
        assert_eq!(seen, (0..500).collect::<Vec<_>>());
        for r in 0..p.rows() {
            let total: usize = p.items[p.offsets[r]..p.offsets[r + 1]]
                .iter()
                .map(|&i| lengths[i])
                .sum();
            assert!(total <= 128);
        }
    }
}
