//! Counting wraps per KEK version (NIST SP 800-38D: with random 96-bit IVs
//! one key must not seal more than 2^32 messages).
//!
//! Persisting a counter on every wrap would cost a device write each time, so
//! the budget reserves blocks: before the first wrap of a block the new
//! high-water mark is persisted, and after a restart counting resumes from
//! that mark (the unused rest of a block is forfeited, never reused).

use crate::error::Result;

/// Default number of wraps one KEK version accepts: 2^30, a quarter of the
/// SP 800-38D bound, leaving room for keys wrapped by a rewrap.
pub const DEFAULT_WRAP_LIMIT: u64 = 1 << 30;

/// Wraps reserved per persisted high-water mark.
const BLOCK: u64 = 4096;

/// The wrap budget of one KEK version.
#[derive(Debug)]
pub(crate) struct WrapBudget {
    used: u64,
    reserved: u64,
}

/// Returned when the version has no wraps left.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Exhausted;

impl WrapBudget {
    /// Resumes from a persisted high-water mark: everything up to it counts as used.
    pub(crate) fn resume(high_water: u64) -> Self {
        Self {
            used: high_water,
            reserved: high_water,
        }
    }

    /// Takes one wrap. When a new block must be reserved, `persist` is called
    /// with the new high-water mark first; if it fails, nothing is taken.
    pub(crate) fn take(
        &mut self,
        limit: u64,
        persist: impl FnOnce(u64) -> Result<()>,
    ) -> Result<Result<(), Exhausted>> {
        if self.used >= limit {
            return Ok(Err(Exhausted));
        }
        if self.used >= self.reserved {
            let mark = self.used.saturating_add(BLOCK).min(limit);
            persist(mark)?;
            self.reserved = mark;
        }
        self.used += 1;
        Ok(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_limit_and_persists_once_per_block() {
        let mut budget = WrapBudget::resume(0);
        let mut marks = Vec::new();
        for _ in 0..5 {
            budget
                .take(5, |m| {
                    marks.push(m);
                    Ok(())
                })
                .unwrap()
                .unwrap();
        }
        assert_eq!(budget.take(5, |_| Ok(())).unwrap(), Err(Exhausted));
        assert_eq!(marks, vec![5]);
    }

    #[test]
    fn resumes_from_the_high_water_mark() {
        let mut budget = WrapBudget::resume(BLOCK);
        let mut marks = Vec::new();
        budget
            .take(u64::MAX, |m| {
                marks.push(m);
                Ok(())
            })
            .unwrap()
            .unwrap();
        assert_eq!(marks, vec![2 * BLOCK]);
    }

    #[test]
    fn a_failed_persist_takes_nothing() {
        let mut budget = WrapBudget::resume(0);
        let failed = budget.take(10, |_| Err(crate::Error::State("disk full".into())));
        assert!(failed.is_err());
        assert_eq!(budget.used, 0);
    }
}
