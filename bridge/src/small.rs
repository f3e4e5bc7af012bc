//! Short lists kept inline: a batch's descriptors, a transfer's per-descriptor lists and the
//! registrations it holds, so that a small batch allocates nothing (docs/decisions.md, "Small
//! batches allocate nothing").
//!
//! Both types are covariant in their lifetimes and have no `Drop` of their own, as `Vec` is
//! and does: a `Batch<'long>` still passes where a `Batch<'short>` is wanted, and a batch may
//! be declared before the registrations it borrows. (`smallvec` 1.x is invariant in its item
//! type and its `Drop` is not `#[may_dangle]` on stable Rust: it broke both.)

use std::ops::{Deref, DerefMut, Index};

use crate::transfer::Held;

/// A list of `Copy` items: up to `N` inline, more on the heap.
#[derive(Clone, Default)]
pub(crate) enum Small<T: Copy, const N: usize> {
    /// No items (and nothing to copy into the inline slots yet).
    #[default]
    Empty,
    /// `items[..len]` are the items (`1 <= len <= N`); the slots after them hold copies.
    Inline { len: usize, items: [T; N] },
    /// More than fit inline.
    Heap(Vec<T>),
}

impl<T: Copy, const N: usize> Small<T, N> {
    /// An empty list.
    pub(crate) const fn new() -> Self {
        Small::Empty
    }

    /// `n` copies of `x`.
    pub(crate) fn from_elem(x: T, n: usize) -> Self {
        match n {
            0 => Small::Empty,
            n if n <= N => Small::Inline { len: n, items: [x; N] },
            n => Small::Heap(vec![x; n]),
        }
    }

    /// Appends `x`; the first push past `N` moves the items to the heap.
    pub(crate) fn push(&mut self, x: T) {
        match self {
            Small::Empty if N > 0 => *self = Small::Inline { len: 1, items: [x; N] },
            Small::Empty => *self = Small::Heap(vec![x]),
            Small::Inline { len, items } if *len < N => {
                items[*len] = x;
                *len += 1;
            }
            Small::Inline { len, items } => {
                let mut v = Vec::with_capacity(2 * N);
                v.extend_from_slice(&items[..*len]);
                v.push(x);
                *self = Small::Heap(v);
            }
            Small::Heap(v) => v.push(x),
        }
    }
}

impl<T: Copy, const N: usize> Deref for Small<T, N> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Small::Empty => &[],
            Small::Inline { len, items } => &items[..*len],
            Small::Heap(v) => v,
        }
    }
}

impl<T: Copy, const N: usize> DerefMut for Small<T, N> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            Small::Empty => &mut [],
            Small::Inline { len, items } => &mut items[..*len],
            Small::Heap(v) => v,
        }
    }
}

impl<T: Copy, const N: usize> FromIterator<T> for Small<T, N> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut s = Small::new();
        for x in iter {
            s.push(x);
        }
        s
    }
}

impl<T: Copy + std::fmt::Debug, const N: usize> std::fmt::Debug for Small<T, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// The registrations a transfer or receives hold live: the first inline (most batches use
/// one), the others on the heap. Indexed in the order they were pushed.
#[derive(Default)]
pub(crate) struct HeldList<'a> {
    first: Option<Held<'a>>,
    more: Vec<Held<'a>>,
}

impl<'a> HeldList<'a> {
    /// An empty list.
    pub(crate) const fn new() -> Self {
        HeldList { first: None, more: Vec::new() }
    }

    /// Appends `h`, and returns its index.
    pub(crate) fn push(&mut self, h: Held<'a>) -> usize {
        if self.first.is_none() {
            self.first = Some(h);
            return 0;
        }
        self.more.push(h);
        self.more.len()
    }

    /// The held registrations, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Held<'a>> {
        self.first.iter().chain(&self.more)
    }

    /// The first one pushed.
    pub(crate) fn first(&self) -> Option<&Held<'a>> {
        self.first.as_ref()
    }

    /// Releases them all.
    pub(crate) fn clear(&mut self) {
        self.first = None;
        self.more.clear();
    }
}

impl<'a> Index<usize> for HeldList<'a> {
    type Output = Held<'a>;
    /// The `i`th pushed; panics if there is none (as a slice does).
    fn index(&self, i: usize) -> &Held<'a> {
        match (i, &self.first) {
            (0, Some(h)) => h,
            _ => &self.more[i.wrapping_sub(1)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Small;

    #[test]
    fn pushes_stay_inline_up_to_n_then_move_to_the_heap_in_order() {
        let mut s: Small<u32, 3> = Small::new();
        assert!(s.is_empty());
        for i in 0..3 {
            s.push(i);
            assert!(matches!(s, Small::Inline { .. }));
        }
        assert_eq!(&*s, &[0, 1, 2]);
        s.push(3);
        assert!(matches!(s, Small::Heap(_)));
        assert_eq!(&*s, &[0, 1, 2, 3]);
        s[1] = 9;
        assert_eq!(&*s, &[0, 9, 2, 3]);
    }

    #[test]
    fn from_elem_and_collect_give_the_same_items() {
        for n in 0..6 {
            let a: Small<u8, 4> = Small::from_elem(7, n);
            let b: Small<u8, 4> = std::iter::repeat_n(7, n).collect();
            assert_eq!(&*a, &vec![7; n][..]);
            assert_eq!(&*a, &*b);
        }
        let z: Small<u8, 0> = (0..3).collect();
        assert_eq!(&*z, &[0, 1, 2]);
    }

    /// Covariance, checked by the compiler: a list of longer-lived references is one of
    /// shorter-lived ones.
    #[test]
    fn a_list_of_long_references_passes_as_a_list_of_short_ones() {
        fn shorten<'s>(l: Small<&'static str, 2>) -> Small<&'s str, 2> {
            l
        }
        let s = shorten(["a", "b", "c"].into_iter().collect());
        assert_eq!(&*s, &["a", "b", "c"]);
    }
}
