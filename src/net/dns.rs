//! A DNS stub on the gateway: answers for a few local names, refuses the
//! rest.
//!
//! In the foundation stage the guest has no internet, so the stub only knows
//! the names it is given (the VM's own hostname, the gateway). The decision
//! is made by [`resolve`], which tells a local answer apart from a query for
//! a name the stub does not know ([`Outcome::NotLocal`]); the stub answers
//! the latter with REFUSED, and a forwarder added later sends it upstream
//! instead, keeping the local names authoritative.
//!
//! Queries are untrusted guest input: nothing here panics on them, responses
//! are never answered (no loops), and only the header of a malformed query is
//! trusted enough to send FORMERR back.

use std::io;
use std::net::Ipv4Addr;
use std::sync::Arc;

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

/// TTL of the stub's answers, in seconds.
pub const TTL: u32 = 60;

/// Largest UDP response without EDNS (RFC 1035).
const PLAIN_UDP_LIMIT: usize = 512;

/// The EDNS payload size the stub advertises.
const EDNS_PAYLOAD: u16 = 1232;

/// The names the stub answers for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stub {
    /// (name, address) pairs. Names match case-insensitively and with or
    /// without the trailing dot, but otherwise exactly: list every form the
    /// guest will ask for (for example both `gateway` and
    /// `gateway.<domain>` if the guest has a search domain). A name listed
    /// several times gets one A record per address. Names that are not
    /// valid DNS names are ignored.
    pub names: Vec<(String, Ipv4Addr)>,
}

impl Stub {
    /// The addresses listed for `name`; None if the stub does not know it.
    fn lookup(&self, name: &Name) -> Option<Vec<Ipv4Addr>> {
        let found: Vec<Ipv4Addr> = self
            .names
            .iter()
            .filter(|(known, _)| {
                Name::from_utf8(known).is_ok_and(|known| known.eq_ignore_root(name))
            })
            .map(|(_, ip)| *ip)
            .collect();
        (!found.is_empty()).then_some(found)
    }
}

/// What to do with one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Send this response: an answer for a known name (A records, or NOERROR
    /// with no records for other types), or an error the stub is sure of
    /// (FORMERR, NOTIMP, BADVERS).
    Answer(Vec<u8>),
    /// A well-formed query for a name the stub does not know. Without an
    /// upstream, `refused` is the response to send; a forwarder would send
    /// the original query upstream instead.
    NotLocal {
        /// The REFUSED response for this query.
        refused: Vec<u8>,
    },
    /// Send nothing: the packet is a response, or too short for a header.
    Drop,
}

/// The response to `query` (a DNS message as received over UDP), if any.
///
/// A queries for known names get their addresses (TTL [`TTL`]), other types
/// for known names NOERROR with no records, unknown names REFUSED, malformed
/// queries FORMERR when their header is readable, nothing otherwise. The id
/// and question are copied; QR and RA are set.
pub fn answer(stub: &Stub, query: &[u8]) -> Option<Vec<u8>> {
    match resolve(stub, query) {
        Outcome::Answer(bytes) | Outcome::NotLocal { refused: bytes } => Some(bytes),
        Outcome::Drop => None,
    }
}

/// Decides what to do with `query`; see [`Outcome`] and [`answer`].
pub fn resolve(stub: &Stub, query: &[u8]) -> Outcome {
    let Ok(header) = Header::read(&mut BinDecoder::new(query)) else {
        return Outcome::Drop;
    };
    let meta = header.metadata;
    if meta.message_type != MessageType::Query {
        return Outcome::Drop;
    }
    let error = |code| Outcome::Answer(error_response(&header, code));
    if meta.op_code != OpCode::Query {
        return error(ResponseCode::NotImp);
    }
    // Checked before parsing, which would reserve room for that many.
    if header.counts.queries != 1 {
        return error(ResponseCode::FormErr);
    }
    let Ok(msg) = Message::from_vec(query) else {
        return error(ResponseCode::FormErr);
    };
    let Some(question) = msg.queries.first() else {
        return error(ResponseCode::FormErr);
    };

    let mut resp = Message::response(meta.id, OpCode::Query);
    resp.metadata.recursion_desired = meta.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.checking_disabled = meta.checking_disabled;
    resp.add_query(question.clone());
    if let Some(edns) = &msg.edns {
        resp.set_edns(response_edns());
        if edns.version() > 0 {
            resp.metadata.response_code = ResponseCode::BADVERS;
            return encode(resp, true).map_or(Outcome::Drop, Outcome::Answer);
        }
    }
    let has_edns = msg.edns.is_some();

    let known = matches!(question.query_class(), DNSClass::IN | DNSClass::ANY)
        .then(|| stub.lookup(question.name()))
        .flatten();
    let Some(addrs) = known else {
        resp.metadata.response_code = ResponseCode::Refused;
        return encode(resp, has_edns)
            .map_or(Outcome::Drop, |refused| Outcome::NotLocal { refused });
    };
    resp.metadata.authoritative = true;
    if matches!(question.query_type(), RecordType::A | RecordType::ANY) {
        for ip in addrs {
            resp.add_answer(Record::from_rdata(
                question.name().clone(),
                TTL,
                RData::A(A(ip)),
            ));
        }
    }
    encode(resp, has_edns).map_or(Outcome::Drop, Outcome::Answer)
}

fn response_edns() -> Edns {
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    edns
}

/// A response with `code`, no question, and the query's id, opcode and RD.
fn error_response(query: &Header, code: ResponseCode) -> Vec<u8> {
    let mut resp = Message::error_msg(query.metadata.id, query.metadata.op_code, code);
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    // A bare header cannot fail to encode; fall back to nothing if it did.
    resp.to_vec().unwrap_or_default()
}

/// Encodes `resp`; without EDNS, a response over 512 bytes is cut down to
/// its question with TC set, so the client retries over TCP.
fn encode(mut resp: Message, has_edns: bool) -> Option<Vec<u8>> {
    let bytes = resp.to_vec().ok()?;
    if has_edns || bytes.len() <= PLAIN_UDP_LIMIT {
        return Some(bytes);
    }
    resp.answers.clear();
    resp.metadata.truncation = true;
    resp.to_vec().ok()
}

/// Answers queries on `socket` (UDP, bound by the caller to port 53 on the
/// gateway address inside the VM's network namespace) until a receive error
/// that is not transient.
pub async fn serve_udp(socket: tokio::net::UdpSocket, stub: Arc<Stub>) -> io::Result<()> {
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) if is_transient(&e) => {
                tracing::debug!(error = %e, "dns: transient receive error");
                continue;
            }
            Err(e) => return Err(e),
        };
        let Some(query) = buf.get(..len) else {
            continue;
        };
        let Some(response) = answer(&stub, query) else {
            tracing::trace!(from = %peer, len, "dns: packet dropped");
            continue;
        };
        if let Err(e) = socket.send_to(&response, peer).await {
            tracing::debug!(error = %e, to = %peer, "dns: cannot send response");
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use std::str::FromStr;

    const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
    const VM: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

    fn stub() -> Stub {
        Stub {
            names: vec![
                ("gateway".to_owned(), GW),
                ("gateway.migrant.internal.".to_owned(), GW),
                ("box".to_owned(), VM),
                ("not a valid name..".to_owned(), VM),
            ],
        }
    }

    fn query(name: &str, rtype: RecordType, edns: bool) -> Vec<u8> {
        let mut msg = Message::new(0x1234, MessageType::Query, OpCode::Query);
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(Name::from_str(name).unwrap(), rtype));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(1232);
            msg.set_edns(e);
        }
        msg.to_vec().unwrap()
    }

    fn ask(name: &str, rtype: RecordType) -> Message {
        Message::from_vec(&answer(&stub(), &query(name, rtype, false)).unwrap()).unwrap()
    }

    fn assert_response_header(resp: &Message) {
        assert_eq!(resp.metadata.id, 0x1234);
        assert_eq!(resp.metadata.message_type, MessageType::Response);
        assert!(resp.metadata.recursion_available);
        assert!(resp.metadata.recursion_desired);
    }

    #[test]
    fn a_for_known_names() {
        for name in [
            "gateway.",
            "GateWay.",
            "gateway.migrant.internal.",
            "gateway",
        ] {
            let resp = ask(name, RecordType::A);
            assert_response_header(&resp);
            assert_eq!(resp.metadata.response_code, ResponseCode::NoError, "{name}");
            assert!(resp.metadata.authoritative);
            assert_eq!(resp.queries.len(), 1);
            assert_eq!(resp.queries[0].query_type(), RecordType::A);
            assert_eq!(resp.answers.len(), 1, "{name}");
            let rec = &resp.answers[0];
            assert_eq!(rec.ttl, TTL);
            assert_eq!(rec.data, RData::A(A(GW)));
            assert!(rec.name.eq_ignore_root(&Name::from_str(name).unwrap()));
        }
        let resp = ask("box.", RecordType::A);
        assert_eq!(resp.answers[0].data, RData::A(A(VM)));
    }

    #[test]
    fn aaaa_and_other_types_for_known_names_are_empty() {
        for rtype in [RecordType::AAAA, RecordType::MX, RecordType::TXT] {
            let resp = ask("box.", rtype);
            assert_response_header(&resp);
            assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
            assert!(resp.answers.is_empty());
            assert_eq!(resp.queries[0].query_type(), rtype);
        }
    }

    #[test]
    fn unknown_names_are_refused() {
        for name in ["example.com.", "box.example.com.", "gateway.other.", "."] {
            let q = query(name, RecordType::A, false);
            let Outcome::NotLocal { refused } = resolve(&stub(), &q) else {
                panic!("{name} should not be local");
            };
            let resp = Message::from_vec(&refused).unwrap();
            assert_response_header(&resp);
            assert_eq!(resp.metadata.response_code, ResponseCode::Refused);
            assert!(resp.answers.is_empty());
            assert_eq!(resp.queries[0].name(), &Name::from_str(name).unwrap());
            assert_eq!(answer(&stub(), &q), Some(refused));
        }
    }

    #[test]
    fn edns_is_answered_with_edns() {
        let bytes = answer(&stub(), &query("gateway.", RecordType::A, true)).unwrap();
        let resp = Message::from_vec(&bytes).unwrap();
        assert_eq!(resp.answers.len(), 1);
        let edns = resp.edns.expect("OPT record");
        assert_eq!(edns.max_payload(), EDNS_PAYLOAD);
        assert!(ask("gateway.", RecordType::A).edns.is_none());

        let mut msg = Message::from_vec(&query("gateway.", RecordType::A, true)).unwrap();
        if let Some(e) = msg.edns.as_mut() {
            e.set_version(1);
        }
        let bytes = answer(&stub(), &msg.to_vec().unwrap()).unwrap();
        let resp = Message::from_vec(&bytes).unwrap();
        // Extended code 16 (BADVERS; the library decodes 16 as BADSIG).
        assert_eq!(u16::from(resp.metadata.response_code), 16);
        assert!(resp.answers.is_empty());
        assert!(resp.edns.is_some());
    }

    #[test]
    fn malformed_queries_get_formerr_or_nothing() {
        let good = query("gateway.", RecordType::A, false);
        // Header readable, question cut short: FORMERR with the id.
        for len in 12..good.len() {
            let bytes = answer(&stub(), &good[..len]).unwrap();
            let resp = Message::from_vec(&bytes).unwrap();
            assert_eq!(resp.metadata.response_code, ResponseCode::FormErr, "{len}");
            assert_eq!(resp.metadata.id, 0x1234);
            assert_eq!(resp.metadata.message_type, MessageType::Response);
        }
        // Too short for a header: nothing.
        for len in 0..12 {
            assert_eq!(answer(&stub(), &good[..len]), None);
        }
        // Two questions: FORMERR.
        let mut msg = Message::from_vec(&good).unwrap();
        msg.add_query(Query::query(Name::from_str("box.").unwrap(), RecordType::A));
        let resp = Message::from_vec(&answer(&stub(), &msg.to_vec().unwrap()).unwrap()).unwrap();
        assert_eq!(resp.metadata.response_code, ResponseCode::FormErr);
        // No question: FORMERR.
        let mut empty = good.clone();
        empty[4] = 0;
        empty[5] = 0;
        let resp = Message::from_vec(&answer(&stub(), &empty[..12]).unwrap()).unwrap();
        assert_eq!(resp.metadata.response_code, ResponseCode::FormErr);
    }

    #[test]
    fn responses_are_not_answered_and_other_opcodes_not_implemented() {
        let mut resp = query("gateway.", RecordType::A, false);
        resp[2] |= 0x80; // QR
        assert_eq!(resolve(&stub(), &resp), Outcome::Drop);

        let mut msg = Message::from_vec(&query("gateway.", RecordType::A, false)).unwrap();
        msg.metadata.op_code = OpCode::Update;
        let bytes = answer(&stub(), &msg.to_vec().unwrap()).unwrap();
        let resp = Message::from_vec(&bytes).unwrap();
        assert_eq!(resp.metadata.response_code, ResponseCode::NotImp);
        assert_eq!(resp.metadata.op_code, OpCode::Update);
    }

    #[test]
    fn other_classes_are_not_local() {
        let mut msg = Message::from_vec(&query("gateway.", RecordType::A, false)).unwrap();
        msg.queries[0].set_query_class(DNSClass::CH);
        let out = resolve(&stub(), &msg.to_vec().unwrap());
        assert!(matches!(out, Outcome::NotLocal { .. }));
    }

    #[test]
    fn garbage_never_panics() {
        let good = query("gateway.migrant.internal.", RecordType::A, true);
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            let mut bytes: Vec<u8> = if round % 2 == 0 {
                // Flip a few bytes of a valid query.
                let mut b = good.clone();
                for _ in 0..1 + next() % 4 {
                    let i = (next() as usize) % b.len();
                    b[i] = next() as u8;
                }
                b
            } else {
                let len = (next() % 300) as usize;
                (0..len).map(|_| next() as u8).collect()
            };
            if round % 3 == 0 && bytes.len() > 2 {
                bytes[2] &= 0x7f; // make it a query so it gets parsed
            }
            let _ = resolve(&stub(), &bytes);
        }
    }

    #[tokio::test]
    async fn serve_udp_over_loopback() {
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let task = tokio::spawn(serve_udp(server, Arc::new(stub())));
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(b"\x00", addr).await.unwrap();
        client
            .send_to(&query("box.", RecordType::A, false), addr)
            .await
            .unwrap();
        let mut buf = [0u8; 1500];
        let (n, _) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.recv_from(&mut buf),
        )
        .await
        .expect("response in time")
        .unwrap();
        let resp = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(resp.answers[0].data, RData::A(A(VM)));
        task.abort();
    }
}
