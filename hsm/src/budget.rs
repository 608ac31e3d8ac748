//! Counting wraps per KEK version (NIST SP 800-38D: with random 96-bit IVs
//! one key must not seal more than 2^32 messages).
//!
//! Persisting a counter on every wrap would cost a device write each time, so
//! wraps are counted in reserved blocks: the persisted counter is a
//! high-water mark, advanced by a whole block before the first wrap of the
//! block. A restart, or another process sharing the device, continues from
//! the mark; the unused rest of a block is forfeited, never reused, so the
//! real count never exceeds the limit.

use crate::error::Result;

/// Default number of wraps one KEK version accepts: 2^30, a quarter of the
/// SP 800-38D bound, leaving a wide margin.
pub const DEFAULT_WRAP_LIMIT: u64 = 1 << 30;

/// Wraps reserved per persisted high-water mark.
pub(crate) const BLOCK: u64 = 4096;

/// The in-memory wrap budget of one KEK version.
#[derive(Debug, Default)]
pub(crate) struct WrapBudget {
    next: u64,
    end: u64,
}

/// Returned when the version has no wraps left.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Exhausted;

impl WrapBudget {
    /// Takes one wrap. When the current block is used up, `reserve` is called
    /// with the wanted block size: it must read the persisted mark `m`, store
    /// `min(m + block, limit)` and return `m..new_mark`. If it fails, nothing
    /// is taken.
    pub(crate) fn take(
        &mut self,
        limit: u64,
        reserve: impl FnOnce(u64) -> Result<std::ops::Range<u64>>,
    ) -> Result<Result<(), Exhausted>> {
        if self.next >= self.end {
            let block = reserve(BLOCK)?;
            self.next = block.start;
            self.end = block.end.min(limit);
        }
        if self.next >= self.end || self.next >= limit {
            return Ok(Err(Exhausted));
        }
        self.next += 1;
        Ok(Ok(()))
    }
}

/// The block `reserve` should hand out for a persisted mark.
pub(crate) fn next_block(mark: u64, block: u64, limit: u64) -> std::ops::Range<u64> {
    mark..mark.saturating_add(block).min(limit).max(mark)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A persisted mark in memory, as a device counter would hold it.
    fn reserve_from(
        mark: &mut u64,
        limit: u64,
    ) -> impl FnMut(u64) -> Result<std::ops::Range<u64>> + '_ {
        move |block| {
            let range = next_block(*mark, block, limit);
            *mark = range.end;
            Ok(range)
        }
    }

    #[test]
    fn refuses_past_the_limit_and_persists_once_per_block() {
        let mut mark = 0;
        let mut budget = WrapBudget::default();
        let mut calls = 0;
        for _ in 0..5 {
            budget
                .take(5, |b| {
                    calls += 1;
                    reserve_from(&mut mark, 5)(b)
                })
                .unwrap()
                .unwrap();
        }
        assert_eq!(
            budget.take(5, reserve_from(&mut mark, 5)).unwrap(),
            Err(Exhausted)
        );
        assert_eq!(calls, 1);
        assert_eq!(mark, 5);
    }

    #[test]
    fn two_budgets_sharing_a_mark_never_overlap() {
        let mut mark = 0;
        let (mut a, mut b) = (WrapBudget::default(), WrapBudget::default());
        a.take(u64::MAX, reserve_from(&mut mark, u64::MAX))
            .unwrap()
            .unwrap();
        b.take(u64::MAX, reserve_from(&mut mark, u64::MAX))
            .unwrap()
            .unwrap();
        assert_eq!((a.next, b.next), (1, BLOCK + 1));
        assert_eq!(mark, 2 * BLOCK);
    }

    #[test]
    fn a_restart_resumes_from_the_mark() {
        let mut mark = 3;
        let mut budget = WrapBudget::default();
        assert_eq!(budget.take(4, reserve_from(&mut mark, 4)).unwrap(), Ok(()));
        let mut again = WrapBudget::default();
        assert_eq!(
            again.take(4, reserve_from(&mut mark, 4)).unwrap(),
            Err(Exhausted)
        );
    }

    #[test]
    fn a_failed_reserve_takes_nothing() {
        let mut budget = WrapBudget::default();
        let failed = budget.take(10, |_| Err(crate::Error::State("disk full".into())));
        assert!(failed.is_err());
        assert_eq!((budget.next, budget.end), (0, 0));
    }
}
