//! The latency sketch proxies report and the control plane merges: a log-linear histogram
//! whose every bucket is at most 1/64 wider than its lower bound, so a quantile read from
//! it is within [`RELATIVE_ERROR`] (0.78%) of the true one, at any latency, and merging two
//! sketches loses nothing.
//!
//! Why not Prometheus-style buckets: a quantile interpolated between fixed bounds can be
//! off by most of a bucket (Linkerd users see p95 = 9.75 s for 5 s requests,
//! linkerd2#9588). Why not DDSketch's logarithm: finding the bucket here is a leading-zero
//! count and a shift, no floating point, which matters on the request path. The layout is
//! HdrHistogram's: values below 64 ns are exact; above, each power of two is split into 64
//! equal sub-buckets. Buckets live in chunks of 64 (one per power of two), allocated on
//! first use, so a sketch of latencies spanning a few octaves holds a few chunks.

/// Sub-buckets per power of two, as a power of two.
const PRECISION_BITS: u32 = 6;
const SUB_BUCKETS: usize = 1 << PRECISION_BITS;
/// Chunks: one of exact values below 2^PRECISION_BITS, then one per power of two above.
const CHUNKS: usize = 64 - PRECISION_BITS as usize + 1;
/// One past the highest bucket index.
pub const BUCKETS: u32 = (CHUNKS * SUB_BUCKETS) as u32;

/// The largest relative error of a quantile (to the nearest-rank sample it stands for):
/// half a bucket's width over its bounds' mean, at most 2^-7.
pub const RELATIVE_ERROR: f64 = 1.0 / 128.0;

/// The bucket a latency of `nanos` falls in.
fn bucket_of(nanos: u64) -> u32 {
    if nanos < SUB_BUCKETS as u64 {
        return nanos as u32;
    }
    let exponent = 63 - nanos.leading_zeros();
    let sub = (nanos >> (exponent - PRECISION_BITS)) as u32 & (SUB_BUCKETS as u32 - 1);
    (exponent - PRECISION_BITS + 1) * SUB_BUCKETS as u32 + sub
}

/// The values bucket `index` holds: `[low, high)`.
fn bounds_of(index: u32) -> (u64, u64) {
    let chunk = index / SUB_BUCKETS as u32;
    let sub = (index % SUB_BUCKETS as u32) as u64;
    if chunk == 0 {
        return (sub, sub + 1);
    }
    let exponent = chunk + PRECISION_BITS - 1;
    let width = 1u64 << (exponent - PRECISION_BITS);
    let low = (1u64 << exponent) + sub * width;
    (low, low.saturating_add(width))
}

/// The value standing for bucket `index`: the one with the least relative error to any
/// value the bucket holds (the harmonic mean of its bounds).
fn representative(index: u32) -> f64 {
    let (low, high) = bounds_of(index);
    if high - low == 1 {
        return low as f64;
    }
    let (low, high) = (low as f64, (high - 1) as f64);
    2.0 * low * high / (low + high)
}

/// Checks a sketch's wire parts (ascending indexes in range, as many counts, no
/// overflow) and calls `add` for every non-empty bucket; returns the total count and the
/// first and last occupied buckets.
fn check_parts(
    indexes: &[u32],
    counts: &[u64],
    mut add: impl FnMut(u32, u64),
) -> Result<(u64, Option<(u32, u32)>), SketchError> {
    if indexes.len() != counts.len() {
        return Err(SketchError::Mismatched { indexes: indexes.len(), counts: counts.len() });
    }
    let mut previous = None;
    let mut total = 0u64;
    let mut occupied: Option<(u32, u32)> = None;
    for (&index, &count) in indexes.iter().zip(counts) {
        if index >= BUCKETS {
            return Err(SketchError::IndexOutOfRange(index));
        }
        if previous.is_some_and(|p| p >= index) {
            return Err(SketchError::Unordered);
        }
        previous = Some(index);
        total = total.checked_add(count).ok_or(SketchError::Overflow)?;
        if count > 0 {
            add(index, count);
            occupied = Some((occupied.map_or(index, |(first, _)| first), index));
        }
    }
    Ok((total, occupied))
}

/// A peer's min and max, pulled into the occupied buckets they must fall in, so that
/// quantiles stay sane whatever it claimed.
fn clamp_extremes(occupied: (u32, u32), min_nanos: u64, max_nanos: u64) -> (u64, u64) {
    let (first, last) = occupied;
    let (low, first_high) = bounds_of(first);
    let (last_low, high) = bounds_of(last);
    (min_nanos.clamp(low, first_high - 1), max_nanos.clamp(last_low, high - 1))
}

/// Why a sketch received from a peer was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SketchError {
    #[error("bucket index {0} is out of range (at most {max})", max = BUCKETS - 1)]
    IndexOutOfRange(u32),
    #[error("bucket indexes must ascend")]
    Unordered,
    #[error("{indexes} bucket indexes but {counts} counts")]
    Mismatched { indexes: usize, counts: usize },
    #[error("the counts overflow")]
    Overflow,
}

/// A mergeable latency distribution in nanoseconds; see the module documentation.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct LatencySketch {
    chunks: Vec<Option<Box<[u64; SUB_BUCKETS]>>>,
    count: u64,
    sum_nanos: u64,
    min_nanos: u64,
    max_nanos: u64,
}

impl std::fmt::Debug for LatencySketch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencySketch")
            .field("count", &self.count)
            .field("min_nanos", &self.min_nanos)
            .field("max_nanos", &self.max_nanos)
            .field("buckets", &self.buckets().count())
            .finish()
    }
}

impl LatencySketch {
    /// An empty sketch; it allocates on the first value.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one latency.
    pub fn record(&mut self, latency: std::time::Duration) {
        self.record_nanos(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Counts one latency of `nanos` nanoseconds.
    pub fn record_nanos(&mut self, nanos: u64) {
        self.add(bucket_of(nanos), 1);
        self.min_nanos = if self.count == 1 { nanos } else { self.min_nanos.min(nanos) };
        self.max_nanos = self.max_nanos.max(nanos);
        self.sum_nanos = self.sum_nanos.saturating_add(nanos);
    }

    fn add(&mut self, index: u32, count: u64) {
        if self.chunks.is_empty() {
            self.chunks.resize_with(CHUNKS, || None);
        }
        let chunk = self.chunks[index as usize / SUB_BUCKETS].get_or_insert_with(|| Box::new([0; SUB_BUCKETS]));
        chunk[index as usize % SUB_BUCKETS] = chunk[index as usize % SUB_BUCKETS].saturating_add(count);
        self.count = self.count.saturating_add(count);
    }

    /// How many latencies it holds.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The sum of every latency, in nanoseconds (exact; saturates after 584 years).
    pub fn sum_nanos(&self) -> u64 {
        self.sum_nanos
    }

    /// The smallest and largest latency, exactly; `None` when empty.
    pub fn min_max_nanos(&self) -> Option<(u64, u64)> {
        (self.count > 0).then_some((self.min_nanos, self.max_nanos))
    }

    /// Adds every latency of `other`, as if each had been recorded here.
    pub fn merge(&mut self, other: &LatencySketch) {
        if other.count == 0 {
            return;
        }
        let (min, max) = (other.min_nanos, other.max_nanos);
        self.min_nanos = if self.count == 0 { min } else { self.min_nanos.min(min) };
        self.max_nanos = self.max_nanos.max(max);
        self.sum_nanos = self.sum_nanos.saturating_add(other.sum_nanos);
        for (index, count) in other.buckets() {
            self.add(index, count);
        }
    }

    /// The `q` quantile (0 ≤ q ≤ 1) in nanoseconds, within [`RELATIVE_ERROR`] of the
    /// nearest-rank sample (the ⌈q·n⌉-th smallest); `None` when empty.
    pub fn quantile_nanos(&self, q: f64) -> Option<f64> {
        quantile_from_top(self.buckets_descending(), self.count, self.min_nanos, self.max_nanos, q)
    }

    /// The non-empty buckets, highest first.
    fn buckets_descending(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.chunks.iter().enumerate().rev().flat_map(|(chunk_index, chunk)| {
            chunk.iter().flat_map(move |chunk| {
                chunk
                    .iter()
                    .enumerate()
                    .rev()
                    .filter(|(_, count)| **count > 0)
                    .map(move |(sub, count)| ((chunk_index * SUB_BUCKETS + sub) as u32, *count))
            })
        })
    }

    /// The non-empty buckets, ascending: (index, count). The wire form.
    pub fn buckets(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.chunks.iter().enumerate().flat_map(|(chunk_index, chunk)| {
            chunk.iter().flat_map(move |chunk| {
                chunk
                    .iter()
                    .enumerate()
                    .filter(|(_, count)| **count > 0)
                    .map(move |(sub, count)| ((chunk_index * SUB_BUCKETS + sub) as u32, *count))
            })
        })
    }

    /// A sketch from its wire form, checked: a peer's report is not trusted to be well
    /// formed. Min and max are clamped to the buckets they must fall in.
    pub fn from_parts(
        indexes: &[u32],
        counts: &[u64],
        sum_nanos: u64,
        min_nanos: u64,
        max_nanos: u64,
    ) -> Result<Self, SketchError> {
        let mut sketch = LatencySketch::new();
        let (_, occupied) = check_parts(indexes, counts, |index, count| sketch.add(index, count))?;
        if let Some(occupied) = occupied {
            (sketch.min_nanos, sketch.max_nanos) = clamp_extremes(occupied, min_nanos, max_nanos);
            sketch.sum_nanos = sum_nanos;
        }
        Ok(sketch)
    }
}

/// The same distribution as a [`LatencySketch`], stored compactly: the occupied buckets
/// only, highest first, each as two LEB128 varints (its index's distance below the
/// previous one, and its count), in one allocation: about 3 bytes a bucket, where the
/// dense form spends 512 bytes per power of two touched and a pair of arrays 10 a
/// bucket. This is the form the control plane keeps in its windows, where thousands of
/// series times dozens of slots make sketches the bulk of its memory; merging decodes
/// both and encodes the sum in one pass. Highest first because the quantiles operators
/// read most are the high ones: p99 of a sketch, or of several read together
/// ([`CompactSketch::quantile_of_all`]), is a few buckets from the start. Recording one
/// value at a time, the proxy's job, is what the dense form is for.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CompactSketch {
    encoded: Vec<u8>,
    count: u64,
    sum_nanos: u64,
    min_nanos: u64,
    max_nanos: u64,
}

impl std::fmt::Debug for CompactSketch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompactSketch")
            .field("count", &self.count)
            .field("min_nanos", &self.min_nanos)
            .field("max_nanos", &self.max_nanos)
            .field("buckets", &self.buckets().count())
            .finish()
    }
}

/// Appends `value` as an unsigned LEB128 varint.
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads an unsigned LEB128 varint at `*at`, moving past it. Only the encoder here
/// writes these bytes, so they are well formed.
#[inline(always)]
fn take_varint(bytes: &[u8], at: &mut usize) -> u64 {
    // Most bucket distances and many counts fit one byte.
    if let Some(&byte) = bytes.get(*at) {
        if byte < 0x80 {
            *at += 1;
            return u64::from(byte);
        }
    }
    let mut value = 0u64;
    let mut shift = 0;
    while let Some(&byte) = bytes.get(*at) {
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    value
}

/// Encodes descending (index, count) buckets: the first one's distance is from
/// [`BUCKETS`], each next one's from the one before it.
fn encode_descending(buckets: impl Iterator<Item = (u32, u64)>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut previous = BUCKETS;
    for (index, count) in buckets {
        put_varint(&mut out, u64::from(previous - index));
        put_varint(&mut out, count);
        previous = index;
    }
    out.shrink_to_fit();
    out
}

/// Decodes what [`encode_descending`] wrote: the buckets, highest first.
fn decode_descending(encoded: &[u8]) -> impl Iterator<Item = (u32, u64)> + '_ {
    let mut at = 0;
    let mut index = BUCKETS;
    std::iter::from_fn(move || {
        if at >= encoded.len() {
            return None;
        }
        index -= take_varint(encoded, &mut at) as u32;
        Some((index, take_varint(encoded, &mut at)))
    })
}

/// The `q` quantile of a distribution given as its descending non-empty buckets, its
/// count and its exact extremes: the representative of the bucket holding the
/// nearest-rank sample (the ⌈q·n⌉-th smallest), clamped to the extremes. Found walking
/// down, where the samples at or above a bucket first outnumber those past that rank:
/// a high quantile, the one operators read most, stops after a few buckets. One walk
/// for both sketch forms.
fn quantile_from_top(
    descending: impl Iterator<Item = (u32, u64)>,
    count: u64,
    min: u64,
    max: u64,
    q: f64,
) -> Option<f64> {
    if count == 0 {
        return None;
    }
    let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
    let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
    let beyond = count - rank;
    let mut above = 0u64;
    for (index, bucket_count) in descending {
        above = above.saturating_add(bucket_count);
        if above > beyond {
            return Some(representative(index).clamp(min as f64, max as f64));
        }
    }
    Some(min as f64)
}

impl CompactSketch {
    /// How many latencies it holds.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The sum of every latency, in nanoseconds.
    pub fn sum_nanos(&self) -> u64 {
        self.sum_nanos
    }

    /// The smallest and largest latency, exactly; `None` when empty.
    pub fn min_max_nanos(&self) -> Option<(u64, u64)> {
        (self.count > 0).then_some((self.min_nanos, self.max_nanos))
    }

    /// The occupied buckets, ascending: (index, count). The wire form's order; it
    /// gathers them first (they are stored highest first).
    pub fn buckets(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        let mut buckets: Vec<(u32, u64)> = self.buckets_descending().collect();
        buckets.reverse();
        buckets.into_iter()
    }

    /// The occupied buckets, highest first, as stored.
    pub fn buckets_descending(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        decode_descending(&self.encoded)
    }

    /// Bytes it holds on the heap, for the control plane's memory accounting.
    pub fn heap_bytes(&self) -> usize {
        self.encoded.capacity()
    }

    /// The `q` quantile in nanoseconds, as [`LatencySketch::quantile_nanos`].
    pub fn quantile_nanos(&self, q: f64) -> Option<f64> {
        quantile_from_top(self.buckets_descending(), self.count, self.min_nanos, self.max_nanos, q)
    }

    /// The `q` quantile of `sketches` taken together, as if merged, without merging
    /// them: their buckets are walked down together from the top. For a high quantile
    /// of a few sketches (p99 of an edge's slots) that reads a few buckets of each; it
    /// costs the number of sketches per step, so many sketches are better summed
    /// ([`SketchSum`]).
    pub fn quantile_of_all(sketches: &[&CompactSketch], q: f64) -> Option<f64> {
        let mut cursors: Vec<_> = sketches
            .iter()
            .filter(|sketch| sketch.count > 0)
            .map(|sketch| {
                let mut buckets = sketch.buckets_descending();
                (buckets.next(), buckets)
            })
            .collect();
        let count = sketches.iter().fold(0u64, |total, sketch| total.saturating_add(sketch.count));
        let min = sketches.iter().filter(|s| s.count > 0).map(|sketch| sketch.min_nanos).min().unwrap_or_default();
        let max = sketches.iter().map(|sketch| sketch.max_nanos).max().unwrap_or_default();
        let merged = std::iter::from_fn(|| {
            let top = cursors.iter().filter_map(|(current, _)| current.map(|(index, _)| index)).max()?;
            let mut total = 0u64;
            for (current, rest) in &mut cursors {
                if let Some((index, count)) = *current {
                    if index == top {
                        total = total.saturating_add(count);
                        *current = rest.next();
                    }
                }
            }
            Some((top, total))
        });
        quantile_from_top(merged, count, min, max, q)
    }

    /// Adds every latency of `other`: both bucket lists merged in one pass.
    pub fn merge(&mut self, other: &CompactSketch) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other.clone();
            return;
        }
        let merged = {
            let (mut mine, mut theirs) = (self.buckets_descending().peekable(), other.buckets_descending().peekable());
            encode_descending(std::iter::from_fn(|| match (mine.peek().copied(), theirs.peek().copied()) {
                (Some(a), Some(b)) if a.0 == b.0 => {
                    mine.next();
                    theirs.next();
                    Some((a.0, a.1.saturating_add(b.1)))
                }
                (Some(a), Some(b)) if a.0 > b.0 => mine.next(),
                (Some(_), Some(_)) | (None, Some(_)) => theirs.next(),
                (Some(_), None) => mine.next(),
                (None, None) => None,
            }))
        };
        self.encoded = merged;
        self.count = self.count.saturating_add(other.count);
        self.sum_nanos = self.sum_nanos.saturating_add(other.sum_nanos);
        self.min_nanos = self.min_nanos.min(other.min_nanos);
        self.max_nanos = self.max_nanos.max(other.max_nanos);
    }

    /// A sketch from its wire form, checked as [`LatencySketch::from_parts`] checks.
    pub fn from_parts(
        indexes: &[u32],
        counts: &[u64],
        sum_nanos: u64,
        min_nanos: u64,
        max_nanos: u64,
    ) -> Result<Self, SketchError> {
        let mut buckets = Vec::with_capacity(indexes.len());
        let (total, occupied) = check_parts(indexes, counts, |index, count| buckets.push((index, count)))?;
        let mut sketch =
            CompactSketch { encoded: encode_descending(buckets.into_iter().rev()), ..CompactSketch::default() };
        if let Some(occupied) = occupied {
            (sketch.min_nanos, sketch.max_nanos) = clamp_extremes(occupied, min_nanos, max_nanos);
            sketch.sum_nanos = sum_nanos;
            sketch.count = total;
        }
        Ok(sketch)
    }
}

impl CompactSketch {
    /// All of `sketches` merged in one pass: their buckets are added up in one dense run
    /// ([`SketchSum`]) and encoded once, where merging them pairwise would decode and
    /// re-encode the growing total for each (what a window over many slots, or a Service
    /// with many callers, would cost).
    pub fn merge_all<'a>(sketches: impl IntoIterator<Item = &'a CompactSketch>) -> CompactSketch {
        let sketches: Vec<&CompactSketch> = sketches.into_iter().filter(|sketch| sketch.count > 0).collect();
        match sketches.as_slice() {
            [] => CompactSketch::default(),
            [only] => (*only).clone(),
            _ => {
                let mut sum = SketchSum::default();
                sketches.iter().for_each(|sketch| sum.add(sketch));
                sum.to_compact()
            }
        }
    }
}

/// Sketches added up into one dense run of bucket counts, from the lowest bucket any of
/// them holds to the highest: latencies span a few octaves, so the run is a few hundred
/// counts. Each sketch added is decoded once and nothing is encoded until asked
/// ([`SketchSum::to_compact`]): a question that groups thousands of series only to read
/// a quantile of each group (the dashboard's topology) never encodes at all.
#[derive(Clone, Debug, Default)]
pub struct SketchSum {
    /// The bucket index of `counts[0]`.
    low: u32,
    counts: Vec<u64>,
    count: u64,
    sum_nanos: u64,
    min_nanos: u64,
    max_nanos: u64,
}

impl SketchSum {
    /// Adds every latency of `sketch`. The hot loop of a topology over ten thousand
    /// edges: the run is sized once per sketch and each bucket is one varint pair.
    pub fn add(&mut self, sketch: &CompactSketch) {
        let bytes = sketch.encoded.as_slice();
        if sketch.count == 0 || bytes.is_empty() {
            return;
        }
        let mut at = 0;
        // Buckets come highest first, and the minimum lies in the last one (min and max
        // are clamped into their buckets on the way in).
        let mut index = BUCKETS - take_varint(bytes, &mut at) as u32;
        self.cover(bucket_of(sketch.min_nanos).min(index), index);
        loop {
            let count = take_varint(bytes, &mut at);
            if index < self.low {
                self.cover(index, index);
            }
            let offset = (index - self.low) as usize;
            self.counts[offset] = self.counts[offset].saturating_add(count);
            if at >= bytes.len() {
                break;
            }
            index -= take_varint(bytes, &mut at) as u32;
        }
        self.min_nanos = if self.count == 0 { sketch.min_nanos } else { self.min_nanos.min(sketch.min_nanos) };
        self.max_nanos = self.max_nanos.max(sketch.max_nanos);
        self.count = self.count.saturating_add(sketch.count);
        self.sum_nanos = self.sum_nanos.saturating_add(sketch.sum_nanos);
    }

    /// Grows the run to hold buckets `first..=last`.
    fn cover(&mut self, first: u32, last: u32) {
        if self.counts.is_empty() {
            self.low = first;
        } else if first < self.low {
            self.counts.splice(0..0, std::iter::repeat_n(0, (self.low - first) as usize));
            self.low = first;
        }
        let length = (last - self.low) as usize + 1;
        if length > self.counts.len() {
            self.counts.resize(length, 0);
        }
    }

    /// How many latencies it holds.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The occupied buckets, highest first.
    fn buckets_descending(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        let low = self.low;
        self.counts
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, count)| **count > 0)
            .map(move |(at, count)| (low + at as u32, *count))
    }

    /// The `q` quantile in nanoseconds, as [`LatencySketch::quantile_nanos`].
    pub fn quantile_nanos(&self, q: f64) -> Option<f64> {
        quantile_from_top(self.buckets_descending(), self.count, self.min_nanos, self.max_nanos, q)
    }

    /// The sum in compact form.
    pub fn to_compact(&self) -> CompactSketch {
        CompactSketch {
            encoded: encode_descending(self.buckets_descending()),
            count: self.count,
            sum_nanos: self.sum_nanos,
            min_nanos: self.min_nanos,
            max_nanos: self.max_nanos,
        }
    }
}

impl From<&LatencySketch> for CompactSketch {
    fn from(dense: &LatencySketch) -> Self {
        let (min_nanos, max_nanos) = dense.min_max_nanos().unwrap_or_default();
        CompactSketch {
            encoded: encode_descending(dense.buckets_descending()),
            count: dense.count(),
            sum_nanos: dense.sum_nanos(),
            min_nanos,
            max_nanos,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_all_at_once_equals_merging_in_turn() {
        let sketches: Vec<CompactSketch> = (1..=5u64)
            .map(|k| {
                let mut dense = LatencySketch::new();
                for i in 0..200 * k {
                    dense.record_nanos(1_000 * k * k + i * i * k);
                }
                CompactSketch::from(&dense)
            })
            .collect();
        let mut in_turn = CompactSketch::default();
        for sketch in &sketches {
            in_turn.merge(sketch);
        }
        let at_once = CompactSketch::merge_all(&sketches);
        assert_eq!(at_once.buckets().collect::<Vec<_>>(), in_turn.buckets().collect::<Vec<_>>());
        assert_eq!(
            (at_once.count(), at_once.sum_nanos(), at_once.min_max_nanos()),
            (in_turn.count(), in_turn.sum_nanos(), in_turn.min_max_nanos())
        );
        // Added in any order (the run grows at both ends), the sum reads the same
        // quantiles.
        let mut sum = SketchSum::default();
        for sketch in sketches.iter().rev() {
            sum.add(sketch);
        }
        for q in [0.0, 0.25, 0.5, 0.51, 0.9, 0.95, 0.99, 0.999, 1.0] {
            assert_eq!(sum.quantile_nanos(q), in_turn.quantile_nanos(q), "q {q}");
        }
        assert_eq!(sum.count(), in_turn.count());
        assert_eq!(sum.to_compact().buckets().collect::<Vec<_>>(), in_turn.buckets().collect::<Vec<_>>());
        assert_eq!(SketchSum::default().quantile_nanos(0.5), None);
        // Read together without merging: the same quantiles.
        let all: Vec<&CompactSketch> = sketches.iter().collect();
        for q in [0.0, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(CompactSketch::quantile_of_all(&all, q), in_turn.quantile_nanos(q), "q {q}");
        }
        assert_eq!(CompactSketch::quantile_of_all(&[], 0.99), None);
        assert_eq!(
            CompactSketch::quantile_of_all(&[&CompactSketch::default(), &sketches[0]], 0.99),
            sketches[0].quantile_nanos(0.99)
        );
    }

    /// The nearest-rank sample: the ⌈q·n⌉-th smallest.
    fn exact(sorted: &[u64], q: f64) -> f64 {
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1] as f64
    }

    /// A deterministic generator, so a failure is reproducible.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 >> 11
        }
        fn unit(&mut self) -> f64 {
            self.next() as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn every_value_falls_in_its_bucket_and_buckets_are_narrow() {
        let mut values: Vec<u64> = (0..5000).collect();
        values.extend((0..63).flat_map(|shift| [1u64 << shift, (1u64 << shift) - 1, (1u64 << shift) + 1]));
        values.extend([u64::MAX, u64::MAX - 1, 3_600_000_000_000]);
        for value in values {
            let index = bucket_of(value);
            assert!(index < BUCKETS, "{value}");
            let (low, high) = bounds_of(index);
            assert!(low <= value && (value < high || high == u64::MAX), "{value} in [{low}, {high})");
            let error = (representative(index) - value as f64).abs() / (value as f64).max(1.0);
            assert!(error <= RELATIVE_ERROR, "{value}: error {error}");
        }
        // Buckets tile the line: each starts where the previous ends.
        for index in 1..BUCKETS {
            assert_eq!(bounds_of(index - 1).1, bounds_of(index).0, "bucket {index}");
        }
    }

    /// Draws one latency, in nanoseconds.
    type Shape = Box<dyn Fn(&mut Lcg) -> u64>;

    #[test]
    fn quantiles_are_within_the_stated_error_of_the_true_ones() {
        let mut random = Lcg(7);
        // Latency-like shapes: uniform, log-normal-ish (a long tail), bimodal (cache
        // hits and misses), and a constant 5 s (the case bucket interpolation gets wrong).
        let shapes: Vec<(&str, Shape)> =
            vec![
                ("uniform 1-100 ms", Box::new(|r: &mut Lcg| 1_000_000 + (r.unit() * 99_000_000.0) as u64)),
                ("long tail", Box::new(|r: &mut Lcg| (200_000.0 * (8.0 * r.unit()).exp()) as u64)),
                (
                    "bimodal",
                    Box::new(|r: &mut Lcg| {
                        if r.unit() < 0.9 {
                            300_000 + r.next() % 50_000
                        } else {
                            40_000_000 + r.next() % 9_000_000
                        }
                    }),
                ),
                ("constant 5 s", Box::new(|_: &mut Lcg| 5_000_000_000)),
            ];
        for (name, shape) in shapes {
            let mut sketch = LatencySketch::new();
            let mut values: Vec<u64> = (0..20_000).map(|_| shape(&mut random)).collect();
            for &value in &values {
                sketch.record_nanos(value);
            }
            values.sort_unstable();
            for q in [0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0] {
                let truth = exact(&values, q);
                let estimate = sketch.quantile_nanos(q).unwrap();
                let error = (estimate - truth).abs() / truth;
                assert!(error <= RELATIVE_ERROR, "{name} q={q}: {estimate} for {truth} ({error})");
            }
            assert_eq!(sketch.count(), 20_000);
            assert_eq!(sketch.sum_nanos(), values.iter().sum::<u64>());
            assert_eq!(sketch.min_max_nanos(), Some((values[0], values[values.len() - 1])));
        }
    }

    #[test]
    fn merging_is_the_same_as_recording_everything_in_one() {
        let mut random = Lcg(11);
        let (mut a, mut b, mut all) = (LatencySketch::new(), LatencySketch::new(), LatencySketch::new());
        for i in 0..10_000 {
            let value = (1_000.0 * (12.0 * random.unit()).exp()) as u64;
            (if i % 3 == 0 { &mut a } else { &mut b }).record_nanos(value);
            all.record_nanos(value);
        }
        let mut merged = a.clone();
        merged.merge(&b);
        assert_eq!(merged, all);
        let mut empty = LatencySketch::new();
        empty.merge(&all);
        assert_eq!(empty, all);
        all.merge(&LatencySketch::new());
        assert_eq!(empty, all);
    }

    #[test]
    fn the_compact_form_merges_and_answers_as_the_dense_one() {
        let mut random = Lcg(13);
        let (mut a, mut b, mut all) = (LatencySketch::new(), LatencySketch::new(), LatencySketch::new());
        for i in 0..10_000 {
            let value = (5_000.0 * (10.0 * random.unit()).exp()) as u64;
            (if i % 4 == 0 { &mut a } else { &mut b }).record_nanos(value);
            all.record_nanos(value);
        }
        let mut merged = CompactSketch::from(&a);
        merged.merge(&CompactSketch::from(&b));
        assert_eq!(merged, CompactSketch::from(&all));
        for q in [0.0, 0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(merged.quantile_nanos(q), all.quantile_nanos(q), "q={q}");
        }
        let mut empty = CompactSketch::default();
        empty.merge(&merged);
        assert_eq!(empty, merged);
        merged.merge(&CompactSketch::default());
        assert_eq!(empty, merged);
        let (indexes, counts): (Vec<u32>, Vec<u64>) = all.buckets().unzip();
        let (min, max) = all.min_max_nanos().unwrap();
        assert_eq!(CompactSketch::from_parts(&indexes, &counts, all.sum_nanos(), min, max).unwrap(), merged);
        assert_eq!(CompactSketch::from_parts(&[3, 2], &[1, 1], 0, 0, 0), Err(SketchError::Unordered));
        assert_eq!(CompactSketch::default().quantile_nanos(0.5), None);
        // Compact indeed: neighbouring buckets with small counts take two bytes each.
        let buckets = merged.buckets().count();
        assert!(merged.heap_bytes() <= buckets * 4, "{} bytes for {buckets} buckets", merged.heap_bytes());
        assert_eq!(merged.buckets().collect::<Vec<_>>(), all.buckets().collect::<Vec<_>>());
    }

    #[test]
    fn the_wire_form_round_trips_and_bad_input_is_refused() {
        let mut sketch = LatencySketch::new();
        for nanos in [5, 900, 1_000_000, 1_000_001, 77_000_000_000] {
            sketch.record_nanos(nanos);
        }
        let (indexes, counts): (Vec<u32>, Vec<u64>) = sketch.buckets().unzip();
        let (min, max) = sketch.min_max_nanos().unwrap();
        let back = LatencySketch::from_parts(&indexes, &counts, sketch.sum_nanos(), min, max).unwrap();
        assert_eq!(back, sketch);
        assert_eq!(LatencySketch::from_parts(&[BUCKETS], &[1], 0, 0, 0), Err(SketchError::IndexOutOfRange(BUCKETS)));
        assert_eq!(LatencySketch::from_parts(&[9, 9], &[1, 1], 0, 0, 0), Err(SketchError::Unordered));
        assert_eq!(
            LatencySketch::from_parts(&[1], &[1, 2], 0, 0, 0),
            Err(SketchError::Mismatched { indexes: 1, counts: 2 })
        );
        assert_eq!(LatencySketch::from_parts(&[1, 2], &[u64::MAX, 1], 0, 0, 0), Err(SketchError::Overflow));
        // A min or max outside the buckets is pulled into them, so quantiles stay sane.
        let lying = LatencySketch::from_parts(&[bucket_of(1_000_000)], &[3], 0, 0, u64::MAX).unwrap();
        let p50 = lying.quantile_nanos(0.5).unwrap();
        assert!((p50 - 1_000_000.0).abs() / 1_000_000.0 <= RELATIVE_ERROR, "{p50}");
        assert_eq!(LatencySketch::new().quantile_nanos(0.5), None);
    }
}
