//! The payload of `Hello`, `Welcome` and `Announce` frames.
//!
//! ```text
//! Hello / Welcome payload:  max_message_size: u64 LE, names, [token]
//! Announce payload:         names
//! Joined payload:           count: u32 LE, then per peer: len: u16 LE, UTF-8 name,
//!                           max_message_size: u64 LE, names (its functions)
//! token (optional):         len: u16 LE, bytes — a client's shared secret
//! names:                    count: u32 LE, then per name: len: u16 LE, UTF-8 bytes
//! ```

use bytes::{BufMut, Bytes, BytesMut};

use crate::connection::Peer;
use crate::reader::DecodeError;

/// What each side tells the other when a connection opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The largest call payload (meta not counted) the sender accepts.
    pub max_message_size: u64,
    /// The functions the sender exports.
    pub functions: Vec<String>,
    /// A client's shared secret (empty: none). Servers never send one.
    pub token: Vec<u8>,
}

impl Hello {
    pub fn encode(&self) -> Bytes {
        let mut out =
            BytesMut::with_capacity(12 + self.functions.iter().map(|f| 2 + f.len()).sum::<usize>());
        out.put_u64_le(self.max_message_size);
        put_names(&mut out, &self.functions);
        if !self.token.is_empty() {
            let token = &self.token[..self.token.len().min(u16::MAX as usize)];
            out.put_u16_le(token.len() as u16);
            out.put_slice(token);
        }
        out.freeze()
    }

    pub fn decode(b: &[u8]) -> Result<Hello, DecodeError> {
        if b.len() < 8 {
            return Err(DecodeError::Handshake("hello shorter than 8 bytes"));
        }
        let max_message_size = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        let (functions, rest) = names_prefix(&b[8..])?;
        let token = match rest {
            [] => Vec::new(),
            [lo, hi, token @ ..] if token.len() == u16::from_le_bytes([*lo, *hi]) as usize => {
                token.to_vec()
            }
            _ => return Err(DecodeError::Handshake("bad token after the name list")),
        };
        Ok(Hello {
            max_message_size,
            functions,
            token,
        })
    }
}

/// Encodes a list of names.
pub fn encode_names(names: &[String]) -> Bytes {
    let mut out = BytesMut::new();
    put_names(&mut out, names);
    out.freeze()
}

fn put_names(out: &mut BytesMut, names: &[String]) {
    out.put_u32_le(names.len() as u32);
    for n in names {
        // Names are validated to fit in u16 where they are registered; clip defensively.
        put_name(out, n);
    }
}

/// Decodes a list of names; every length is checked against what is actually there.
pub fn decode_names(b: &[u8]) -> Result<Vec<String>, DecodeError> {
    let (names, rest) = names_prefix(b)?;
    if !rest.is_empty() {
        return Err(DecodeError::Handshake("trailing bytes after name list"));
    }
    Ok(names)
}

/// Appends to `list` those of `names` it does not hold yet, in their order, once each, and
/// returns them. In time linear in both: a peer may announce millions of names (as many as a
/// control frame holds), which a check of each against the list would take hours over.
pub fn add_names(list: &mut Vec<String>, names: &[String]) -> Vec<String> {
    // The usual case, a function or two registered late, needs no set of the whole list.
    if names.len() <= 8 {
        let mut new: Vec<String> = Vec::new();
        for n in names {
            if !list.contains(n) && !new.contains(n) {
                new.push(n.clone());
            }
        }
        list.extend(new.iter().cloned());
        return new;
    }
    let mut seen: std::collections::HashSet<&str> = list.iter().map(String::as_str).collect();
    let new: Vec<String> = names
        .iter()
        .filter(|n| seen.insert(n.as_str()))
        .cloned()
        .collect();
    list.extend(new.iter().cloned());
    new
}

/// Encodes the peer list of a `Joined` frame.
pub fn encode_peers(peers: &[Peer]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u32_le(peers.len() as u32);
    for p in peers {
        put_name(&mut out, &p.name);
        out.put_u64_le(p.max_message_size);
        put_names(&mut out, &p.functions);
    }
    out.freeze()
}

/// Decodes the peer list of a `Joined` frame, as strictly as a name list.
pub fn decode_peers(b: &[u8]) -> Result<Vec<Peer>, DecodeError> {
    if b.len() < 4 {
        return Err(DecodeError::Handshake("peer list shorter than its count"));
    }
    let count = u32::from_le_bytes(b[..4].try_into().expect("4 bytes")) as usize;
    let mut b = &b[4..];
    // Each peer needs at least 14 bytes (name length, limit, name count).
    if count > b.len() / 14 {
        return Err(DecodeError::Handshake("peer count exceeds payload"));
    }
    let mut peers = Vec::with_capacity(count);
    for _ in 0..count {
        let (name, rest) = name_prefix(b)?;
        if rest.len() < 8 {
            return Err(DecodeError::Handshake("truncated peer"));
        }
        let max_message_size = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        let (functions, rest) = names_prefix(&rest[8..])?;
        peers.push(Peer {
            name,
            functions,
            max_message_size,
            router: false,
        });
        b = rest;
    }
    if !b.is_empty() {
        return Err(DecodeError::Handshake("trailing bytes after peer list"));
    }
    Ok(peers)
}

fn put_name(out: &mut BytesMut, n: &str) {
    let n = &n.as_bytes()[..n.len().min(u16::MAX as usize)];
    out.put_u16_le(n.len() as u16);
    out.put_slice(n);
}

/// Decodes one length-prefixed name at the start of `b`.
fn name_prefix(b: &[u8]) -> Result<(String, &[u8]), DecodeError> {
    if b.len() < 2 {
        return Err(DecodeError::Handshake("truncated name list"));
    }
    let len = u16::from_le_bytes([b[0], b[1]]) as usize;
    let b = &b[2..];
    if b.len() < len {
        return Err(DecodeError::Handshake("truncated name"));
    }
    let name = std::str::from_utf8(&b[..len]).map_err(|_| DecodeError::Utf8("name"))?;
    Ok((name.to_owned(), &b[len..]))
}

/// Decodes a list of names at the start of `b`; returns them and the bytes after them.
fn names_prefix(mut b: &[u8]) -> Result<(Vec<String>, &[u8]), DecodeError> {
    if b.len() < 4 {
        return Err(DecodeError::Handshake("name list shorter than its count"));
    }
    let count = u32::from_le_bytes(b[..4].try_into().expect("4 bytes")) as usize;
    b = &b[4..];
    // Each name needs at least two bytes, so a count larger than that is a lie.
    if count > b.len() / 2 {
        return Err(DecodeError::Handshake("name count exceeds payload"));
    }
    let mut names = Vec::with_capacity(count);
    for _ in 0..count {
        let (name, rest) = name_prefix(b)?;
        names.push(name);
        b = rest;
    }
    Ok((names, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_names_are_the_new_ones_once_each_in_order() {
        // A few names (scanned) and many (through a set) give the same.
        for extra in [0, 20] {
            let mut list = vec!["a".to_owned(), "b".to_owned()];
            let mut names: Vec<String> = ["c", "a", "d", "c", "b", "e"].map(String::from).to_vec();
            names.extend((0..extra).map(|i| format!("x{}", i % 10)));
            let mut want: Vec<String> = ["c", "d", "e"].map(String::from).to_vec();
            want.extend((0..extra.min(10)).map(|i| format!("x{i}")));
            assert_eq!(add_names(&mut list, &names), want);
            assert_eq!(list.len(), 2 + want.len());
            assert_eq!(&list[2..], want.as_slice());
            assert!(add_names(&mut list, &names).is_empty());
        }
    }

    #[test]
    fn hello_round_trip() {
        let h = Hello {
            max_message_size: 1 << 40,
            functions: vec!["add".into(), "grüß".into(), String::new()],
            token: Vec::new(),
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn token_round_trip() {
        let h = Hello {
            max_message_size: 5,
            functions: vec!["f".into()],
            token: b"s3cret".to_vec(),
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h.clone()));
        let mut bad = h.encode().to_vec();
        bad.push(0);
        assert!(Hello::decode(&bad).is_err());
    }

    #[test]
    fn hello_rejects_lies() {
        assert!(Hello::decode(&[0; 7]).is_err());
        let mut b = vec![0u8; 8];
        b.extend_from_slice(&1000u32.to_le_bytes());
        b.extend_from_slice(&[1, 0, b'a']);
        assert!(Hello::decode(&b).is_err());
        let mut b = vec![0u8; 8];
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&[5, 0, b'a']);
        assert!(Hello::decode(&b).is_err());
        let mut b = vec![0u8; 8];
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&[1, 0, 0xff]);
        assert_eq!(Hello::decode(&b), Err(DecodeError::Utf8("name")));
    }

    #[test]
    fn peer_list_round_trip_and_lies() {
        let peers = vec![
            Peer {
                name: "worker-1".into(),
                functions: vec!["process".into(), "échö".into()],
                max_message_size: 1 << 30,
                router: false,
            },
            Peer {
                name: "caller".into(),
                functions: vec![],
                max_message_size: 7,
                router: false,
            },
        ];
        let b = encode_peers(&peers);
        assert_eq!(decode_peers(&b), Ok(peers));
        assert_eq!(decode_peers(&encode_peers(&[])), Ok(vec![]));
        for cut in 0..b.len() {
            assert!(decode_peers(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = b.to_vec();
        long.push(0);
        assert!(decode_peers(&long).is_err());
        let mut lie = b.to_vec();
        lie[0] = 200;
        assert!(decode_peers(&lie).is_err());
    }
}
