//! Port ranges as masked port prefixes (what an LPM key can express). The length of the
//! prefix containing a given port, which ranks matching rules, is computed directly by
//! [`PortRange::prefix_bits_containing`] (`wirefence_proto::policy`); the property test
//! below holds it equal to [`expand`]'s.

use super::model::PortRange;

/// A port prefix: the ports whose top `bits` bits equal those of `port` (the low
/// `16 - bits` bits of `port` are zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortPrefix {
    pub port: u16,
    pub bits: u8,
}

impl PortPrefix {
    pub fn first(&self) -> u16 {
        self.port
    }

    pub fn last(&self) -> u16 {
        self.port | (u16::MAX.checked_shr(u32::from(self.bits)).unwrap_or(0))
    }
}

/// The minimal set of port prefixes covering exactly `range`, in ascending order: from
/// the low end, each step takes the largest aligned block that starts there and fits.
pub fn expand(range: PortRange) -> impl Iterator<Item = PortPrefix> {
    let (mut lo, hi) = (u32::from(range.first), u32::from(range.last));
    std::iter::from_fn(move || {
        if lo > hi {
            return None;
        }
        // The largest block aligned at `lo`: its lowest set bit (0 is aligned to 2^16).
        let mut size = if lo == 0 { 1u32 << 16 } else { 1 << lo.trailing_zeros() };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        let p = PortPrefix { port: lo as u16, bits: 16 - size.trailing_zeros() as u8 };
        lo += size;
        Some(p)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    fn covered(prefixes: &[PortPrefix]) -> Vec<u16> {
        prefixes.iter().flat_map(|p| p.first()..=p.last()).collect()
    }

    #[test]
    fn known_minimal_counts() {
        for (range, count) in
            [(r(8000, 8080), 3), (r(0, 65535), 1), (r(1, 1), 1), (r(1024, 65535), 6), (r(1, 65535), 16), (r(80, 80), 1)]
        {
            let p: Vec<_> = expand(range).collect();
            assert_eq!(p.len(), count, "{range}: {p:?}");
            assert_eq!(covered(&p), (range.first..=range.last).collect::<Vec<_>>(), "{range}");
        }
        assert_eq!(expand(r(0, 65535)).collect::<Vec<_>>(), [PortPrefix { port: 0, bits: 0 }]);
        assert_eq!(
            expand(r(8000, 8080)).collect::<Vec<_>>(),
            [
                PortPrefix { port: 8000, bits: 10 },
                PortPrefix { port: 8064, bits: 12 },
                PortPrefix { port: 8080, bits: 16 }
            ]
        );
        assert_eq!(expand(r(65535, 65535)).collect::<Vec<_>>(), [PortPrefix { port: 65535, bits: 16 }]);
        // The worst case for 16 bits: 2 * 16 - 2 prefixes.
        assert_eq!(expand(r(1, 65534)).count(), 30);
    }

    proptest! {
        #[test]
        fn expansion_is_exact_minimal_and_agrees_with_the_direct_length(a: u16, b: u16, probe: u16) {
            let range = r(a.min(b), a.max(b));
            let p: Vec<_> = expand(range).collect();
            // Exact, in order, disjoint.
            prop_assert_eq!(p[0].first(), range.first);
            prop_assert_eq!(p.last().unwrap().last(), range.last);
            for w in p.windows(2) {
                prop_assert_eq!(u32::from(w[0].last()) + 1, u32::from(w[1].first()));
            }
            for x in &p {
                // Aligned: the block's first port has its low bits clear.
                prop_assert_eq!(x.first() & (x.last() - x.first()), 0);
            }
            // Minimal: no two neighbours merge into one aligned block.
            for w in p.windows(2) {
                let merged = w[0].bits == w[1].bits && w[0].bits > 0 && (w[0].port >> (16 - w[0].bits)) & 1 == 0;
                prop_assert!(!merged, "{:?} could merge", w);
            }
            let port = range.first + (u32::from(probe) % (u32::from(range.last - range.first) + 1)) as u16;
            let containing = p.iter().find(|x| x.first() <= port && port <= x.last()).unwrap();
            prop_assert_eq!(containing.bits, range.prefix_bits_containing(port));
        }
    }
}
