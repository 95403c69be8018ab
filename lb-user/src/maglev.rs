//! Maglev lookup tables (Eisenbud et al., NSDI 2016): each backend's preference order over
//! the table slots is derived from its name, so a set change moves few slots.
use lb_common::MAGLEV_SIZE;

fn fnv1a(data: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Fills a table of `MAGLEV_SIZE` slots with indexes into `names` (at most 256 names).
/// An empty `names` gives an all-zero table.
pub fn table(names: &[&str]) -> [u8; MAGLEV_SIZE] {
    let mut out = [0u8; MAGLEV_SIZE];
    let n = names.len().min(256);
    if n == 0 {
        return out;
    }
    let m = MAGLEV_SIZE as u64;
    let perm: Vec<(u64, u64)> = names[..n]
        .iter()
        .map(|name| {
            let offset = fnv1a(name.as_bytes(), 0x5bd1_e995) % m;
            let skip = fnv1a(name.as_bytes(), 0x1b87_3593) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut filled = vec![false; MAGLEV_SIZE];
    let mut count = 0;
    'fill: loop {
        for i in 0..n {
            let (offset, skip) = perm[i];
            let mut c = (offset + next[i] * skip) % m;
            while filled[c as usize] {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            filled[c as usize] = true;
            out[c as usize] = i as u8;
            next[i] += 1;
            count += 1;
            if count == MAGLEV_SIZE {
                break 'fill;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(t: &[u8; MAGLEV_SIZE], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &i in t.iter() {
            c[i as usize] += 1;
        }
        c
    }

    #[test]
    fn slots_are_spread_evenly_over_the_backends() {
        let t = table(&["db01", "db02", "db03"]);
        for s in shares(&t, 3) {
            assert!((s as f64 - MAGLEV_SIZE as f64 / 3.0).abs() <= 2.0, "{s}");
        }
    }

    #[test]
    fn removing_a_backend_moves_only_its_slots_and_few_others() {
        let before = table(&["db01", "db02", "db03"]);
        let after = table(&["db01", "db03"]);
        let names_before = ["db01", "db02", "db03"];
        let names_after = ["db01", "db03"];
        let mut moved = 0;
        for (b, a) in before.iter().zip(after.iter()) {
            let (nb, na) = (names_before[*b as usize], names_after[*a as usize]);
            if nb != "db02" && nb != na {
                moved += 1;
            }
        }
        // Slots of surviving backends mostly stay put (Maglev gives near-minimal disruption).
        assert!(
            moved < MAGLEV_SIZE / 20,
            "{moved} slots of surviving backends moved"
        );
    }

    #[test]
    fn an_empty_set_gives_a_zero_table() {
        assert!(table(&[]).iter().all(|&i| i == 0));
    }
}
