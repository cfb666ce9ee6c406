//! A Router's table: who is connected, what each peer exports, and which forwarded calls are
//! still waiting for an answer.
//!
//! The table is fed what the Router's connections report ([`RoutingTable::join`],
//! [`RoutingTable::request`], [`RoutingTable::answer`], [`RoutingTable::leave`], ...) and answers
//! with [`Action`]s for the runtime: frames to queue on a connection, a connection to evict, a
//! membership change to report. It never looks inside a payload.
//!
//! Call ids are scoped to one connection, so a forwarded call gets a new id on the callee's
//! connection; the table maps it back to the caller's connection and id when the answer comes.
//! An answer for a caller that left in the meantime is dropped; the calls a callee had not
//! answered when it left are failed at once with a `disconnected` error.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::hash::Hash;

use bytes::Bytes;

use crate::connection::Peer;
use crate::frame::{Flags, Kind, error_code};
use crate::handshake::{add_names, encode_names, encode_peers};

/// Something the runtime must do for the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<K> {
    /// Queue a frame on connection `to`.
    Send {
        to: K,
        kind: Kind,
        call_id: u64,
        serde: u8,
        flags: u8,
        meta: String,
        payload: Bytes,
    },
    /// A newer connection took this connection's name: say goodbye with `reason`, and close it.
    Evict { conn: K, reason: String },
    /// A peer joined (`connected`) or left; for the Router's own membership handlers.
    Member { connected: bool, name: String },
}

/// Where a routed frame goes: the connection, the call id there, and (for a request) the meta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward<K> {
    pub to: K,
    pub call_id: u64,
    pub meta: String,
}

#[derive(Debug)]
struct Member<K> {
    peer: Peer,
    /// The id of the next call forwarded to this member.
    next_id: u64,
    /// Calls forwarded to this member and not answered yet: our id → (caller, caller's id).
    pending: HashMap<u64, (K, u64)>,
}

/// See the module documentation. `K` identifies a connection.
#[derive(Debug)]
pub struct RoutingTable<K> {
    name: String,
    by_name: BTreeMap<String, K>,
    members: HashMap<K, Member<K>>,
}

impl<K: Copy + Eq + Hash + Debug> RoutingTable<K> {
    /// An empty table for the Router named `name` (used in error messages).
    pub fn new(name: impl Into<String>) -> RoutingTable<K> {
        RoutingTable {
            name: name.into(),
            by_name: BTreeMap::new(),
            members: HashMap::new(),
        }
    }

    /// Names of the connected peers, sorted.
    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    /// The connection of the peer named `name`.
    pub fn conn_of(&self, name: &str) -> Option<K> {
        self.by_name.get(name).copied()
    }

    /// Calls forwarded to `conn` that it has not answered yet.
    pub fn pending(&self, conn: K) -> usize {
        self.members.get(&conn).map_or(0, |m| m.pending.len())
    }

    fn send(to: K, kind: Kind, call_id: u64, meta: String, payload: Bytes) -> Action<K> {
        Action::Send {
            to,
            kind,
            call_id,
            serde: 0,
            flags: 0,
            meta,
            payload,
        }
    }

    /// Connection `conn` completed its handshake as `peer`. An older connection with the same
    /// name is evicted first (the newest wins); then the newcomer learns who is there, and
    /// everyone else learns about the newcomer.
    pub fn join(&mut self, conn: K, peer: Peer, out: &mut Vec<Action<K>>) {
        if let Some(old) = self.by_name.get(&peer.name).copied() {
            if old != conn {
                self.remove(old, out);
                out.push(Action::Evict {
                    conn: old,
                    reason: format!(
                        "evicted: a newer connection named {:?} joined router {:?}",
                        peer.name, self.name
                    ),
                });
            }
        }
        self.remove(conn, out);
        let present: Vec<Peer> = self
            .by_name
            .values()
            .map(|k| self.members[k].peer.clone())
            .collect();
        out.push(Self::send(
            conn,
            Kind::Joined,
            0,
            String::new(),
            encode_peers(&present),
        ));
        let news = encode_peers(std::slice::from_ref(&peer));
        for k in self.by_name.values() {
            out.push(Self::send(*k, Kind::Joined, 0, String::new(), news.clone()));
        }
        out.push(Action::Member {
            connected: true,
            name: peer.name.clone(),
        });
        self.by_name.insert(peer.name.clone(), conn);
        self.members.insert(
            conn,
            Member {
                peer,
                next_id: 1,
                pending: HashMap::new(),
            },
        );
    }

    /// Connection `conn` closed. A member's unanswered calls fail at once, and the others are
    /// told it left. Unknown connections (never joined, or already evicted) are ignored.
    pub fn leave(&mut self, conn: K, out: &mut Vec<Action<K>>) {
        self.remove(conn, out);
    }

    fn remove(&mut self, conn: K, out: &mut Vec<Action<K>>) {
        let Some(m) = self.members.remove(&conn) else {
            return;
        };
        let name = m.peer.name;
        if self.by_name.get(&name) == Some(&conn) {
            self.by_name.remove(&name);
        }
        let mut pending: Vec<(K, u64)> = m.pending.into_values().collect();
        pending.sort_by_key(|(_, id)| *id);
        for (caller, id) in pending {
            if self.members.contains_key(&caller) {
                let msg = format!("{name:?} left before answering");
                out.push(Self::send(
                    caller,
                    Kind::Error,
                    id,
                    error_code::DISCONNECTED.into(),
                    Bytes::from(msg),
                ));
            }
        }
        for k in self.by_name.values() {
            out.push(Self::send(*k, Kind::Left, 0, name.clone(), Bytes::new()));
        }
        out.push(Action::Member {
            connected: false,
            name,
        });
    }

    /// Forgets the forwarded call `call_id` of member `to`: it will never be answered (its
    /// request was lost on the way).
    pub fn cancel(&mut self, to: K, call_id: u64) {
        if let Some(m) = self.members.get_mut(&to) {
            m.pending.remove(&call_id);
        }
    }

    /// Member `conn` exports more functions: record them and tell the others.
    pub fn announce(&mut self, conn: K, names: &[String], out: &mut Vec<Action<K>>) {
        let Some(m) = self.members.get_mut(&conn) else {
            return;
        };
        let new = add_names(&mut m.peer.functions, names);
        if new.is_empty() {
            return;
        }
        let name = m.peer.name.clone();
        let payload = encode_names(&new);
        for (other, k) in &self.by_name {
            if *other != name {
                out.push(Self::send(
                    *k,
                    Kind::Announce,
                    0,
                    name.clone(),
                    payload.clone(),
                ));
            }
        }
    }

    /// Member `from` calls `function` of the peer named `target`: forward the request, or answer
    /// it at once with an error when it cannot be delivered (nothing is answered for a request
    /// that wants no answer).
    #[allow(clippy::too_many_arguments)]
    pub fn request(
        &mut self,
        from: K,
        call_id: u64,
        target: &str,
        function: &str,
        serde: u8,
        flags: Flags,
        payload: Bytes,
        out: &mut Vec<Action<K>>,
    ) {
        let size = payload.len() as u64;
        if let Some(f) = self.route_request(from, call_id, target, function, flags, size, out) {
            out.push(Action::Send {
                to: f.to,
                kind: Kind::Request,
                call_id: f.call_id,
                serde,
                flags: flags.0,
                meta: f.meta,
                payload,
            });
        }
    }

    /// Where a request of `size` payload bytes goes (see [`RoutingTable::request`]), for a
    /// Router that forwards the payload while it still arrives. `None`: it goes nowhere, and
    /// `out` holds the error answer if one is due; the payload is to be discarded.
    #[allow(clippy::too_many_arguments)]
    pub fn route_request(
        &mut self,
        from: K,
        call_id: u64,
        target: &str,
        function: &str,
        flags: Flags,
        size: u64,
        out: &mut Vec<Action<K>>,
    ) -> Option<Forward<K>> {
        // None for an evicted connection's last frames: it is being closed.
        let caller = self.members.get(&from)?.peer.name.clone();
        let reply = !flags.no_reply();
        let refuse = |code: &str, msg: String, out: &mut Vec<Action<K>>| {
            if reply {
                out.push(Self::send(
                    from,
                    Kind::Error,
                    call_id,
                    code.into(),
                    Bytes::from(msg),
                ));
            }
            None
        };
        let to = match self.by_name.get(target) {
            Some(k) if *k != from => *k,
            Some(_) => {
                let msg = format!("{caller:?} cannot call itself ({function:?})");
                return refuse(error_code::UNDELIVERABLE, msg, out);
            }
            None => {
                let msg = format!(
                    "no peer named {target:?} is connected to router {:?} (connected: {:?})",
                    self.name,
                    self.names()
                );
                return refuse(error_code::UNDELIVERABLE, msg, out);
            }
        };
        let m = self
            .members
            .get_mut(&to)
            .expect("by_name and members agree");
        if !m.peer.functions.iter().any(|f| f == function) {
            let msg = format!("{target:?} exposes no function {function:?}");
            return refuse(error_code::NO_FUNCTION, msg, out);
        }
        if size > m.peer.max_message_size {
            let msg = format!(
                "message of {size} bytes exceeds the limit of {} bytes of {target:?}",
                m.peer.max_message_size
            );
            return refuse(error_code::TOO_LARGE, msg, out);
        }
        let id = if reply {
            let id = m.next_id;
            m.next_id += 1;
            m.pending.insert(id, (from, call_id));
            id
        } else {
            0
        };
        Some(Forward {
            to,
            call_id: id,
            meta: format!("{caller}\0{function}"),
        })
    }

    /// Member `from` answers (`kind` is `Response` or `Error`) the forwarded call `call_id`:
    /// pass the answer to its caller, under the caller's own id. Answers nobody waits for are
    /// dropped.
    #[allow(clippy::too_many_arguments)]
    pub fn answer(
        &mut self,
        from: K,
        kind: Kind,
        call_id: u64,
        serde: u8,
        flags: Flags,
        meta: String,
        payload: Bytes,
        out: &mut Vec<Action<K>>,
    ) {
        let size = payload.len() as u64;
        if let Some(f) = self.route_answer(from, kind, call_id, size, out) {
            out.push(Action::Send {
                to: f.to,
                kind,
                call_id: f.call_id,
                serde,
                flags: flags.0,
                meta,
                payload,
            });
        }
    }

    /// Where an answer of `size` payload bytes goes (see [`RoutingTable::answer`]); the
    /// returned `meta` is empty (an answer keeps its own). `None`: nobody waits for it, or it
    /// is too large for its caller (then `out` holds the error the caller gets instead).
    pub fn route_answer(
        &mut self,
        from: K,
        kind: Kind,
        call_id: u64,
        size: u64,
        out: &mut Vec<Action<K>>,
    ) -> Option<Forward<K>> {
        let (caller, id) = self.members.get_mut(&from)?.pending.remove(&call_id)?;
        let limit = self.members.get(&caller)?.peer.max_message_size;
        if kind == Kind::Response && size > limit {
            let msg = format!("result of {size} bytes exceeds the caller's limit of {limit} bytes");
            out.push(Self::send(
                caller,
                Kind::Error,
                id,
                error_code::TOO_LARGE.into(),
                Bytes::from(msg),
            ));
            return None;
        }
        Some(Forward {
            to: caller,
            call_id: id,
            meta: String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::decode_peers;

    fn peer(name: &str, functions: &[&str]) -> Peer {
        Peer {
            name: name.into(),
            functions: functions.iter().map(|s| s.to_string()).collect(),
            max_message_size: 1000,
            router: false,
        }
    }

    fn sends(out: &[Action<u32>]) -> Vec<(u32, Kind, u64, String)> {
        out.iter()
            .filter_map(|a| match a {
                Action::Send {
                    to,
                    kind,
                    call_id,
                    meta,
                    ..
                } => Some((*to, *kind, *call_id, meta.clone())),
                _ => None,
            })
            .collect()
    }

    fn joined(out: &[Action<u32>], to: u32) -> Vec<String> {
        out.iter()
            .filter_map(|a| match a {
                Action::Send {
                    to: t,
                    kind: Kind::Joined,
                    payload,
                    ..
                } if *t == to => Some(decode_peers(payload).unwrap()),
                _ => None,
            })
            .flatten()
            .map(|p| p.name)
            .collect()
    }

    #[test]
    fn joins_tell_everyone_about_everyone() {
        let mut t = RoutingTable::new("r");
        let mut out = Vec::new();
        t.join(1, peer("w1", &["f"]), &mut out);
        assert!(joined(&out, 1).is_empty());
        assert!(out.contains(&Action::Member {
            connected: true,
            name: "w1".into()
        }));
        out.clear();
        t.join(2, peer("caller", &[]), &mut out);
        assert_eq!(joined(&out, 2), ["w1"]);
        assert_eq!(joined(&out, 1), ["caller"]);
        out.clear();
        t.leave(1, &mut out);
        assert_eq!(sends(&out), [(2, Kind::Left, 0, "w1".to_string())]);
        assert_eq!(t.names(), ["caller"]);
    }

    #[test]
    fn calls_are_forwarded_and_answers_find_their_caller() {
        let mut t = RoutingTable::new("r");
        let mut out = Vec::new();
        t.join(1, peer("w1", &["f"]), &mut out);
        t.join(2, peer("a", &[]), &mut out);
        t.join(3, peer("b", &[]), &mut out);
        out.clear();
        // Two callers use the same call id: the worker sees two different ones.
        t.request(
            2,
            7,
            "w1",
            "f",
            2,
            Flags(0),
            Bytes::from_static(b"x"),
            &mut out,
        );
        t.request(
            3,
            7,
            "w1",
            "f",
            2,
            Flags(0),
            Bytes::from_static(b"y"),
            &mut out,
        );
        assert_eq!(
            sends(&out),
            [
                (1, Kind::Request, 1, "a\0f".to_string()),
                (1, Kind::Request, 2, "b\0f".to_string())
            ]
        );
        out.clear();
        t.answer(
            1,
            Kind::Response,
            2,
            2,
            Flags(0),
            String::new(),
            Bytes::new(),
            &mut out,
        );
        t.answer(
            1,
            Kind::Error,
            1,
            0,
            Flags(0),
            "remote".into(),
            Bytes::new(),
            &mut out,
        );
        assert_eq!(
            sends(&out),
            [
                (3, Kind::Response, 7, String::new()),
                (2, Kind::Error, 7, "remote".to_string())
            ]
        );
        // A repeated or unknown answer goes nowhere.
        out.clear();
        t.answer(
            1,
            Kind::Response,
            2,
            2,
            Flags(0),
            String::new(),
            Bytes::new(),
            &mut out,
        );
        assert!(out.is_empty());
    }

    #[test]
    fn undeliverable_requests_are_answered_at_once() {
        let mut t = RoutingTable::new("r");
        let mut out = Vec::new();
        t.join(1, peer("w1", &["f"]), &mut out);
        t.join(2, peer("a", &[]), &mut out);
        out.clear();
        t.request(2, 1, "nobody", "f", 2, Flags(0), Bytes::new(), &mut out);
        t.request(2, 2, "w1", "g", 2, Flags(0), Bytes::new(), &mut out);
        t.request(2, 3, "a", "f", 2, Flags(0), Bytes::new(), &mut out);
        t.request(
            2,
            4,
            "w1",
            "f",
            2,
            Flags(0),
            Bytes::from(vec![0; 1001]),
            &mut out,
        );
        t.request(
            2,
            0,
            "nobody",
            "f",
            2,
            Flags(Flags::NO_REPLY),
            Bytes::new(),
            &mut out,
        );
        assert_eq!(
            sends(&out),
            [
                (2, Kind::Error, 1, "undeliverable".to_string()),
                (2, Kind::Error, 2, "no-function".to_string()),
                (2, Kind::Error, 3, "undeliverable".to_string()),
                (2, Kind::Error, 4, "too-large".to_string()),
            ]
        );
    }

    #[test]
    fn a_callee_that_leaves_fails_its_calls_and_a_caller_that_leaves_loses_its_answers() {
        let mut t = RoutingTable::new("r");
        let mut out = Vec::new();
        t.join(1, peer("w1", &["f"]), &mut out);
        t.join(2, peer("a", &[]), &mut out);
        t.join(3, peer("b", &[]), &mut out);
        t.request(2, 5, "w1", "f", 2, Flags(0), Bytes::new(), &mut out);
        t.request(3, 6, "w1", "f", 2, Flags(0), Bytes::new(), &mut out);
        out.clear();
        t.leave(3, &mut out);
        out.clear();
        // b's answer has nobody to go to.
        t.answer(
            1,
            Kind::Response,
            2,
            2,
            Flags(0),
            String::new(),
            Bytes::new(),
            &mut out,
        );
        assert!(out.is_empty());
        t.leave(1, &mut out);
        let s = sends(&out);
        assert!(s.contains(&(2, Kind::Error, 5, "disconnected".to_string())));
        assert!(s.contains(&(2, Kind::Left, 0, "w1".to_string())));
    }

    #[test]
    fn the_newest_connection_with_a_name_wins() {
        let mut t = RoutingTable::new("r");
        let mut out = Vec::new();
        t.join(1, peer("w", &["f"]), &mut out);
        t.join(2, peer("a", &[]), &mut out);
        t.request(2, 9, "w", "f", 2, Flags(0), Bytes::new(), &mut out);
        out.clear();
        t.join(3, peer("w", &["f"]), &mut out);
        assert!(matches!(
            &out[..],
            [
                Action::Send {
                    to: 2,
                    kind: Kind::Error,
                    call_id: 9,
                    ..
                },
                ..
            ]
        ));
        assert!(out.iter().any(
            |a| matches!(a, Action::Evict { conn: 1, reason } if reason.starts_with("evicted"))
        ));
        let s = sends(&out);
        let left = s
            .iter()
            .position(|x| *x == (2, Kind::Left, 0, "w".to_string()));
        let join = s.iter().position(|x| x.0 == 2 && x.1 == Kind::Joined);
        assert!(left.unwrap() < join.unwrap(), "{s:?}");
        assert_eq!(t.conn_of("w"), Some(3));
        // The evicted connection closing later changes nothing.
        out.clear();
        t.leave(1, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn announcements_reach_the_others() {
        let mut t = RoutingTable::new("r");
        let mut out = Vec::new();
        t.join(1, peer("w", &["f"]), &mut out);
        t.join(2, peer("a", &[]), &mut out);
        out.clear();
        t.announce(1, &["g".into(), "f".into()], &mut out);
        assert_eq!(sends(&out), [(2, Kind::Announce, 0, "w".to_string())]);
        out.clear();
        t.request(2, 1, "w", "g", 2, Flags(0), Bytes::new(), &mut out);
        assert_eq!(sends(&out), [(1, Kind::Request, 1, "a\0g".to_string())]);
    }
}
