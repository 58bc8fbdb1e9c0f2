//! Base36 (0-9a-z) of big-endian byte strings, zero-padded: the alphabet of Swarm's IDs and
//! join tokens.

const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// Encodes `bytes` as a base36 number, left-padded with `0` to at least `width` characters.
pub fn encode(bytes: &[u8], width: usize) -> String {
    let mut number: Vec<u8> = bytes.to_vec();
    let mut digits = Vec::new();
    while number.iter().any(|&b| b != 0) {
        // Long division of the big-endian number by 36.
        let mut remainder = 0u32;
        for byte in number.iter_mut() {
            let value = (remainder << 8) | u32::from(*byte);
            *byte = (value / 36) as u8;
            remainder = value % 36;
        }
        digits.push(ALPHABET[remainder as usize]);
    }
    while digits.len() < width {
        digits.push(b'0');
    }
    digits.reverse();
    String::from_utf8(digits).expect("alphabet is ASCII")
}

#[cfg(test)]
mod tests {
    use super::encode;

    #[test]
    fn encodes_known_values() {
        assert_eq!(encode(&[0], 3), "000");
        assert_eq!(encode(&[35], 1), "z");
        assert_eq!(encode(&[36], 1), "10");
        assert_eq!(encode(&[1, 0], 0), "74"); // 256 = 7*36 + 4
        assert_eq!(encode(&[0xff; 32], 50).len(), 50, "a SHA-256 fits in 50 digits");
        assert_eq!(encode(&[0xff; 16], 25).len(), 25, "128 bits fit in 25 digits");
    }
}
