//! Which partitions or chunks a page of the global feed reads: the day index of migration 0005
//! (`events_v2_feed_days`) turned into windows of transaction ids, each read with one query that
//! the planner prunes to a few days.
//!
//! An index row says that events of some transaction ids were written into a UTC day: a
//! *bucket* row `(bucket, day)` covers every transaction of a bucket of 2^16 ids (live writes,
//! near today), a *transaction* row `(bucket, day, txid)` one transaction (backfills, backdated
//! writes). A stretch of transaction ids can hold events only on the days its rows name, so the
//! windows cut the ids after a checkpoint into stretches whose days cover at most
//! [`MAX_WINDOW_DAYS`] in at most [`MAX_RUNS`] runs.

use chrono::NaiveDate;

/// The feed's day index groups transaction ids in buckets of 2^16.
pub(crate) const BUCKET_SHIFT: u32 = 16;

/// A window whose runs of days cover more days than this is split, so that a page plans and
/// opens few partitions or chunks.
pub(crate) const MAX_WINDOW_DAYS: i64 = 7;

/// A window reads at most this many runs of consecutive days (one query branch each).
pub(crate) const MAX_RUNS: usize = 3;

/// The days a stretch of transaction ids wrote into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DaySet {
    /// These UTC days (sorted, distinct; empty when it has no events).
    Days(Vec<NaiveDate>),
    /// Unknown: any day.
    Any,
}

impl DaySet {
    fn of(day: NaiveDate) -> DaySet {
        DaySet::Days(vec![day])
    }

    pub(crate) fn is_empty(&self) -> bool {
        matches!(self, DaySet::Days(days) if days.is_empty())
    }

    fn union(&self, other: &DaySet) -> DaySet {
        match (self, other) {
            (DaySet::Days(a), DaySet::Days(b)) => {
                let mut days: Vec<NaiveDate> = a.iter().chain(b).copied().collect();
                days.sort_unstable();
                days.dedup();
                DaySet::Days(days)
            }
            _ => DaySet::Any,
        }
    }

    /// The days as at most [`MAX_RUNS`] runs `(first, last)`: runs of consecutive days, the
    /// closest ones joined (with the days between) until few enough remain. `None` for any day.
    pub(crate) fn runs(&self) -> Option<Vec<(NaiveDate, NaiveDate)>> {
        let DaySet::Days(days) = self else { return None };
        let mut runs: Vec<(NaiveDate, NaiveDate)> = Vec::new();
        for &d in days {
            match runs.last_mut() {
                Some((_, last)) if (d - *last).num_days() <= 1 => *last = d,
                _ => runs.push((d, d)),
            }
        }
        while runs.len() > MAX_RUNS {
            let i = (0..runs.len() - 1)
                .min_by_key(|&i| (runs[i + 1].0 - runs[i].1).num_days())
                .expect("two or more runs");
            runs[i].1 = runs[i + 1].1;
            runs.remove(i + 1);
        }
        Some(runs)
    }

    /// How many days its runs cover (`i64::MAX` for any day).
    fn cost(&self) -> i64 {
        self.runs().map_or(i64::MAX, |runs| {
            runs.iter().map(|(lo, hi)| (*hi - *lo).num_days() + 1).sum()
        })
    }
}

/// A stretch of the global order read with one query: transaction ids below `end` (and after the
/// reader's position), on `days`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Window {
    /// The first transaction id after the window.
    pub end: u64,
    /// The days its events were written into.
    pub days: DaySet,
}

/// One row of the day index: its bucket, its transaction (`None` for a bucket row) and its day.
/// Rows come ordered by bucket, then transaction with bucket rows first.
pub(crate) type IndexRow = (i64, Option<u64>, NaiveDate);

fn bucket_start(bucket: i64) -> u64 {
    (bucket.max(0) as u64) << BUCKET_SHIFT
}

/// The stretches of one bucket and their days: its bucket rows' days hold for every transaction
/// of the bucket, a transaction row's day for that transaction.
fn bucket_units(bucket: i64, rows: &[IndexRow], out: &mut Vec<(u64, u64, DaySet)>) {
    let mut shared = DaySet::Days(Vec::new());
    let mut by_txid: Vec<(u64, DaySet)> = Vec::new();
    for &(_, txid, day) in rows {
        match txid {
            None => shared = shared.union(&DaySet::of(day)),
            Some(t) => match by_txid.last_mut() {
                Some((last, days)) if *last == t => *days = days.union(&DaySet::of(day)),
                _ => by_txid.push((t, DaySet::of(day))),
            },
        }
    }
    let end = bucket_start(bucket + 1);
    let mut start = bucket_start(bucket);
    for (i, (t, days)) in by_txid.iter().enumerate() {
        if *t > start {
            out.push((start, *t, shared.clone()));
        }
        let next = by_txid.get(i + 1).map_or(end, |(n, _)| *n);
        out.push((*t, next, shared.union(days)));
        start = next;
    }
    if start < end {
        out.push((start, end, shared));
    }
}

/// Splits the day index rows (see [`IndexRow`]) read from `from_txid` on into windows of at most
/// [`MAX_WINDOW_DAYS`] days each, none past `horizon`. `truncated`: the rows stopped at the read
/// limit, so the last group (a transaction's rows, or a bucket's rows when the cut falls among
/// them) may be incomplete: the windows stop before it and the caller plans again from there. If
/// no window would get past `from_txid` that way, the group becomes one any-day window, so a
/// reader always moves on.
pub(crate) fn plan_windows(rows: &[IndexRow], from_txid: u64, horizon: u64, truncated: bool) -> Vec<Window> {
    let mut rows = rows;
    let mut last_end = horizon;
    let mut cut_group = None;
    if truncated {
        if let Some(&(bucket, txid, _)) = rows.last() {
            let (cut, group_end) = match txid {
                Some(t) => (t, t + 1),
                None => (bucket_start(bucket), bucket_start(bucket + 1)),
            };
            let keep = rows
                .iter()
                .position(|&(b, t, _)| b == bucket && (txid.is_none() || t == txid))
                .unwrap_or(rows.len());
            rows = &rows[..keep];
            last_end = cut.min(horizon);
            cut_group = Some((cut, group_end.min(horizon)));
        }
    }

    let mut units = Vec::new();
    let mut i = 0;
    while i < rows.len() {
        let bucket = rows[i].0;
        let n = rows[i..].iter().take_while(|r| r.0 == bucket).count();
        bucket_units(bucket, &rows[i..i + n], &mut units);
        i += n;
    }

    let mut windows: Vec<Window> = Vec::new();
    let mut open: Option<DaySet> = None;
    for (start, end, days) in units {
        let (start, end) = (start.max(from_txid), end.min(last_end));
        if start >= end {
            continue;
        }
        open = Some(match open {
            None => days,
            Some(current) => {
                let merged = current.union(&days);
                // An any-day window takes in only stretches without events: a stretch with
                // known days after it gets a cheaper window of its own.
                if days.is_empty() || (current != DaySet::Any && merged.cost() <= MAX_WINDOW_DAYS) {
                    merged
                } else {
                    windows.push(Window {
                        end: start,
                        days: current,
                    });
                    days
                }
            }
        });
    }
    if let Some(days) = open {
        windows.push(Window { end: last_end, days });
    }
    match cut_group {
        Some((cut, group_end)) if cut <= from_txid || windows.is_empty() => vec![Window {
            end: group_end.max(from_txid + 1),
            days: DaySet::Any,
        }],
        _ => windows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Days;

    fn day(n: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 1, 1).unwrap() + Days::new(n.into())
    }

    fn days(list: &[u32]) -> DaySet {
        DaySet::Days(list.iter().map(|&n| day(n)).collect())
    }

    const H: u64 = 100 << BUCKET_SHIFT;

    fn b(n: i64) -> u64 {
        bucket_start(n)
    }

    #[test]
    fn no_index_rows_no_windows() {
        assert_eq!(plan_windows(&[], 0, H, false), vec![]);
    }

    #[test]
    fn near_days_share_a_window_and_far_days_do_not() {
        // Days 0, 1, 6 and 90 are three runs covering four days; day 200 makes a fourth run, and
        // joining the closest two (1 and 6) would cover nine.
        let rows = [
            (1, None, day(0)),
            (2, None, day(1)),
            (2, None, day(6)),
            (3, None, day(90)),
            (4, None, day(200)),
        ];
        assert_eq!(
            plan_windows(&rows, 0, H, false),
            vec![
                Window {
                    end: b(4),
                    days: days(&[0, 1, 6, 90])
                },
                Window {
                    end: H,
                    days: days(&[200])
                },
            ]
        );
    }

    #[test]
    fn a_window_spans_at_most_max_window_days() {
        let rows: Vec<_> = (0..20).map(|i| (i as i64, None, day(i))).collect();
        let windows = plan_windows(&rows, 0, H, false);
        assert!(windows.iter().all(|w| w.days.cost() <= MAX_WINDOW_DAYS), "{windows:?}");
        assert_eq!(windows.len(), 3);
        assert_eq!(windows.last().unwrap().end, H);
    }

    #[test]
    fn a_backfill_bucket_is_cut_by_transaction() {
        // One bucket: three transactions of a backfill, 300 days apart in all, plus live writes
        // on today (day 300) from every transaction of the bucket.
        let t = b(5);
        let rows = [
            (5, None, day(300)),
            (5, Some(t + 10), day(0)),
            (5, Some(t + 10), day(1)),
            (5, Some(t + 11), day(100)),
            (5, Some(t + 12), day(200)),
        ];
        let windows = plan_windows(&rows, 0, H, false);
        assert!(windows.iter().all(|w| w.days.cost() <= MAX_WINDOW_DAYS), "{windows:?}");
        // Each transaction's window holds its days and today's.
        let holding = |txid: u64| windows.iter().find(|w| w.end > txid).unwrap().days.clone();
        for (txid, own) in [
            (t, vec![300]),
            (t + 10, vec![0, 1, 300]),
            (t + 11, vec![100, 300]),
            (t + 12, vec![200, 300]),
        ] {
            let window = holding(txid);
            assert_eq!(window.union(&days(&own)), window, "{txid}: {window:?}");
        }
        assert!(windows.len() >= 2, "{windows:?}");
        assert_eq!(
            days(&[0, 1, 300]).runs().unwrap(),
            vec![(day(0), day(1)), (day(300), day(300))]
        );
    }

    #[test]
    fn runs_join_the_closest_days_until_three_remain() {
        let set = days(&[0, 2, 10, 11, 30, 31, 32, 90]);
        assert_eq!(
            set.runs().unwrap(),
            vec![(day(0), day(11)), (day(30), day(32)), (day(90), day(90))]
        );
        assert_eq!(DaySet::Any.runs(), None);
    }

    #[test]
    fn an_any_day_window_takes_in_no_stretch_with_events() {
        // A truncated plan's last group read on any day is followed by cheaper windows when the
        // reader plans again; within one plan, an any-day set never absorbs days.
        let any = DaySet::Any;
        assert_eq!(any.union(&days(&[3])), DaySet::Any);
        assert!(days(&[]).is_empty() && !any.is_empty());
    }

    #[test]
    fn a_truncated_plan_stops_before_its_last_group() {
        let rows = [(1, None, day(0)), (5, None, day(1)), (5, Some(b(5) + 3), day(40))];
        assert_eq!(
            plan_windows(&rows, 0, H, true),
            vec![Window {
                end: b(5) + 3,
                days: days(&[0, 1])
            }]
        );
        // A cut among a bucket's own rows drops the bucket.
        assert_eq!(
            plan_windows(&[(1, None, day(0)), (5, None, day(1))], 0, H, true),
            vec![Window {
                end: b(5),
                days: days(&[0])
            }]
        );
    }

    #[test]
    fn a_truncated_plan_that_cannot_move_on_reads_the_group_on_any_day() {
        // One transaction with more days than a plan reads, right at the reader's position.
        let t = b(7) + 9;
        let rows = [(7, Some(t), day(0)), (7, Some(t), day(400))];
        assert_eq!(
            plan_windows(&rows, t, H, true),
            vec![Window {
                end: t + 1,
                days: DaySet::Any
            }]
        );
        // A bucket's rows alone.
        assert_eq!(
            plan_windows(&[(7, None, day(0)), (7, None, day(400))], b(7), H, true),
            vec![Window {
                end: b(8),
                days: DaySet::Any
            }]
        );
    }

    #[test]
    fn windows_start_at_the_reader_and_never_pass_the_horizon() {
        let horizon = b(4) + 10;
        let rows = [(3, None, day(0)), (4, None, day(0))];
        let windows = plan_windows(&rows, b(4) + 2, horizon, false);
        assert_eq!(
            windows,
            vec![Window {
                end: horizon,
                days: days(&[0])
            }]
        );
        assert_eq!(plan_windows(&rows, 0, horizon, true)[0].end, b(4));
    }
}
