//! Time on the control plane's side of telemetry: the slots reports are merged into,
//! the windows operators ask for, and which slots answer a window.
//!
//! Every series keeps three rings of slots, aligned on the wall clock (so replicas
//! agree on slot boundaries and their answers merge): 10-second slots for the last
//! minute, 1-minute slots for the last ten, 10-minute slots for the last hour. A report
//! is merged into the current slot of all three. A window of length W is answered by one
//! ring: the slot in progress plus the W/slot complete slots before it, so it covers
//! between W and W plus one slot, and rates are divided by the time it actually covers
//! (from its first slot's start to now), never by W. Why not one fine ring: an hour of
//! 10-second slots is 360 slots per series; three rings are 25.

use std::{collections::VecDeque, str::FromStr};

/// One ring: slots of `slot_seconds`, at most `slots` of them (the current one
/// included).
#[derive(Clone, Copy, Debug)]
pub struct Tier {
    pub slot_seconds: u64,
    pub slots: usize,
}

/// The rings, finest first. Each keeps one slot more than its longest window needs: the
/// slot in progress.
pub const TIERS: [Tier; 3] =
    [Tier { slot_seconds: 10, slots: 7 }, Tier { slot_seconds: 60, slots: 11 }, Tier { slot_seconds: 600, slots: 7 }];

/// How far back anything is kept: the coarsest ring's reach.
pub const RETENTION_SECONDS: u64 = 600 * 7;

/// A window an operator asks for (`-w`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowLength {
    TenSeconds,
    OneMinute,
    TenMinutes,
    OneHour,
}

impl FromStr for WindowLength {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "10s" => Ok(WindowLength::TenSeconds),
            "1m" | "60s" => Ok(WindowLength::OneMinute),
            "10m" => Ok(WindowLength::TenMinutes),
            "1h" | "60m" => Ok(WindowLength::OneHour),
            _ => Err(format!("unknown window {text:?}: use 10s, 1m, 10m or 1h")),
        }
    }
}

impl WindowLength {
    /// Its length in seconds.
    pub fn seconds(self) -> u64 {
        match self {
            WindowLength::TenSeconds => 10,
            WindowLength::OneMinute => 60,
            WindowLength::TenMinutes => 600,
            WindowLength::OneHour => 3600,
        }
    }

    /// How the CLI writes it.
    pub fn label(self) -> &'static str {
        match self {
            WindowLength::TenSeconds => "10s",
            WindowLength::OneMinute => "1m",
            WindowLength::TenMinutes => "10m",
            WindowLength::OneHour => "1h",
        }
    }

    /// The ring that answers it: the finest whose reach covers it.
    fn tier(self) -> usize {
        match self {
            WindowLength::TenSeconds | WindowLength::OneMinute => 0,
            WindowLength::TenMinutes => 1,
            WindowLength::OneHour => 2,
        }
    }
}

/// The slots of one ring whose start is in `[from, to)` (Unix seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotRange {
    pub tier: usize,
    pub from: u64,
    pub to: u64,
}

impl SlotRange {
    /// The last `length` up to `now` (Unix seconds): the slot in progress and the
    /// complete ones before it.
    pub fn recent(length: WindowLength, now: u64) -> SlotRange {
        let tier = length.tier();
        let slot = TIERS[tier].slot_seconds;
        let current = now / slot * slot;
        SlotRange { tier, from: current.saturating_sub(length.seconds()), to: current + slot }
    }

    /// The `length` before the instant `at`, and the `length` after it (up to `now`),
    /// from the finest ring that still holds the slots before it. The slot `at` falls in
    /// belongs to neither: it mixes both. An error says `at` is beyond what is kept.
    pub fn around(length: WindowLength, at: u64, now: u64) -> Result<(SlotRange, SlotRange), String> {
        for (tier, ring) in TIERS.iter().enumerate() {
            let slot = ring.slot_seconds;
            if slot > length.seconds() {
                continue;
            }
            let oldest_kept = (now / slot * slot).saturating_sub((ring.slots as u64 - 1) * slot);
            let at_slot = at / slot * slot;
            let before = SlotRange { tier, from: at_slot.saturating_sub(length.seconds()), to: at_slot };
            if before.from >= oldest_kept {
                let after_from = at_slot + slot;
                let after = SlotRange { tier, from: after_from, to: after_from + length.seconds() };
                return Ok((before, after));
            }
        }
        Err(format!(
            "that change is too old: the control plane keeps telemetry for {} minutes, and a {} window before \
             it is no longer all there",
            RETENTION_SECONDS / 60,
            length.label()
        ))
    }

    /// The time it covers up to `now_millis` (Unix milliseconds), in seconds: what rates
    /// are divided by. Time before `known_since` (when telemetry began) does not count:
    /// nothing is known of it. Zero when it starts in the future.
    pub fn covered_seconds(&self, now_millis: u64, known_since: Option<u64>) -> f64 {
        let end = (self.to * 1000).min(now_millis);
        let start = (self.from * 1000).max(known_since.unwrap_or(0));
        end.saturating_sub(start) as f64 / 1000.0
    }
}

/// A value merged into slots: counts add up; whatever is a gauge takes the later value.
pub trait SlotValue: Clone {
    /// Adds `later`, which happened after `self`.
    fn absorb(&mut self, later: &Self);
    /// `values` (oldest first) added up; `None` when there are none. One at a time
    /// unless a value knows a cheaper way.
    fn sum_of<'a>(values: impl Iterator<Item = &'a Self>) -> Option<Self>
    where
        Self: 'a,
    {
        let mut total: Option<Self> = None;
        for value in values {
            match &mut total {
                Some(total) => total.absorb(value),
                None => total = Some(value.clone()),
            }
        }
        total
    }
    /// Heap bytes it holds, for the memory the control plane reports.
    fn heap_bytes(&self) -> usize {
        0
    }
}

/// One series' values in every ring.
#[derive(Clone, Debug)]
pub struct Rings<V> {
    rings: [VecDeque<(u64, V)>; 3],
}

impl<V> Default for Rings<V> {
    fn default() -> Self {
        Rings { rings: [VecDeque::new(), VecDeque::new(), VecDeque::new()] }
    }
}

impl<V: SlotValue> Rings<V> {
    /// Merges `value`, reported at `now` (Unix seconds), into the current slot of
    /// every ring.
    pub fn add(&mut self, now: u64, value: &V) {
        for (ring, tier) in self.rings.iter_mut().zip(TIERS) {
            let start = now / tier.slot_seconds * tier.slot_seconds;
            match ring.back_mut() {
                // A clock that stepped back merges into the newest slot.
                Some((newest, slot)) if *newest >= start => slot.absorb(value),
                _ => {
                    if ring.capacity() == 0 {
                        ring.reserve_exact(tier.slots);
                    }
                    ring.push_back((start, value.clone()));
                    while ring.len() > tier.slots {
                        ring.pop_front();
                    }
                }
            }
        }
    }

    /// Everything in `range`, merged oldest first; `None` when nothing is.
    pub fn sum(&self, range: &SlotRange) -> Option<V> {
        V::sum_of(self.slots(range))
    }

    /// The slots in `range`, oldest first, as they are held.
    pub fn slots<'a>(&'a self, range: &SlotRange) -> impl Iterator<Item = &'a V> + Clone + 'a {
        let SlotRange { from, to, .. } = *range;
        self.rings[range.tier].iter().filter(move |(start, _)| (from..to).contains(start)).map(|(_, value)| value)
    }

    /// Whether anything is still within the retention at `now`.
    pub fn is_live(&self, now: u64) -> bool {
        self.rings[2].back().is_some_and(|(start, _)| start + RETENTION_SECONDS > now)
    }

    /// Bytes it holds on the heap: slots and what they hold.
    pub fn heap_bytes(&self) -> usize {
        self.rings
            .iter()
            .map(|ring| {
                ring.capacity() * std::mem::size_of::<(u64, V)>()
                    + ring.iter().map(|(_, value)| value.heap_bytes()).sum::<usize>()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl SlotValue for u64 {
        fn absorb(&mut self, later: &Self) {
            *self += later;
        }
    }

    #[test]
    fn a_window_is_the_slot_in_progress_and_the_complete_ones_before_it() {
        let mut rings = Rings::<u64>::default();
        // One report every 5 s for 2 hours, each counting 1.
        let start = 1_000_000_000 / 3600 * 3600;
        for t in (start..start + 7200).step_by(5) {
            rings.add(t, &1);
        }
        let now = start + 7200 - 1;
        let answer = |length| {
            let range = SlotRange::recent(length, now);
            (rings.sum(&range).unwrap_or(0), range.covered_seconds(now * 1000, None))
        };
        // Slots at 10 s: the one in progress (2 reports, 10 s in) and one before it.
        assert_eq!(answer(WindowLength::TenSeconds), (4, 19.0));
        assert_eq!(answer(WindowLength::OneMinute), (14, 69.0));
        assert_eq!(answer(WindowLength::TenMinutes), (132, 659.0));
        assert_eq!(answer(WindowLength::OneHour), (840, 4199.0));
        // Every answer is one report per 5 s of what it covers, give or take the slot
        // in progress.
        for length in [WindowLength::TenSeconds, WindowLength::OneMinute, WindowLength::OneHour] {
            let (count, seconds) = answer(length);
            assert!((count as f64 - seconds / 5.0).abs() <= 1.0, "{length:?}: {count} in {seconds}s");
        }
        assert_eq!(rings.rings.iter().map(VecDeque::len).collect::<Vec<_>>(), [7, 11, 7], "bounded");
        assert!(rings.is_live(now));
        assert!(!rings.is_live(now + RETENTION_SECONDS + 600));
        // Telemetry that began 30 s ago: a minute's window covers those 30 s only.
        let range = SlotRange::recent(WindowLength::OneMinute, now);
        assert_eq!(range.covered_seconds(now * 1000, Some((now - 30) * 1000)), 30.0);
    }

    #[test]
    fn around_an_instant_uses_the_finest_ring_that_still_holds_it() {
        let now = 1_000_000_000;
        // A minute before and after a change 2 minutes ago: the 10 s ring holds only 70 s,
        // so 1-minute slots answer, the change's own minute left out.
        let at = now - 120;
        let (before, after) = SlotRange::around(WindowLength::OneMinute, at, now).unwrap();
        assert_eq!(before.tier, 1);
        assert_eq!((before.to - before.from, after.to - after.from), (60, 60));
        assert!(before.to <= at && after.from > at);
        // 10 s before and after a change 5 s ago: the 10 s ring.
        let (before, after) = SlotRange::around(WindowLength::TenSeconds, now - 5, now).unwrap();
        assert_eq!((before.tier, after.tier), (0, 0));
        // Two hours ago is gone.
        assert!(SlotRange::around(WindowLength::OneMinute, now - 7200, now).unwrap_err().contains("too old"));
        assert_eq!("1m".parse(), Ok(WindowLength::OneMinute));
        assert!("5m".parse::<WindowLength>().unwrap_err().contains("10s, 1m, 10m or 1h"));
    }
}
