//! Internet checksums (RFC 1071), updated incrementally (RFC 1624, eqn. 3) or computed whole.
//!
//! All values are the words as they sit in the packet, read in host order: the one's
//! complement sum is byte-order independent, so no swapping is needed anywhere.

#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// `check` after a 16-bit word covered by it changed from `from` to `to`.
#[inline(always)]
pub fn replace2(check: u16, from: u16, to: u16) -> u16 {
    let sum = (!check) as u64 + (!from) as u64 + to as u64;
    !fold(sum)
}

/// `check` after a 32-bit value covered by it changed from `from` to `to`.
#[inline(always)]
pub fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let nf = !from;
    let sum = (!check) as u64
        + (nf >> 16) as u64
        + (nf & 0xffff) as u64
        + (to >> 16) as u64
        + (to & 0xffff) as u64;
    !fold(sum)
}

/// The one's complement sum of `N` 16-bit words (not yet folded or inverted).
#[inline(always)]
pub fn sum_words<const N: usize>(words: &[u16; N]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < N {
        sum += words[i] as u64;
        i += 1;
    }
    sum
}

/// Finishes a sum into a checksum field value.
#[inline(always)]
pub fn finish(sum: u64) -> u16 {
    !fold(sum)
}

/// Whether an option-less IPv4 header's checksum is right: its words, the checksum included,
/// sum to all ones (RFC 1071 4.1).
#[inline(always)]
pub fn ipv4_header_ok(words: &[u16; 10]) -> bool {
    fold(sum_words(words)) == 0xffff
}
