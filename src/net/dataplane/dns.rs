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
        /// The query as parsed here (one question), so a forwarder need
        /// not parse the guest's bytes again.
        query: Box<Message>,
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
        Outcome::Answer(bytes) | Outcome::NotLocal { refused: bytes, .. } => Some(bytes),
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
        return encode(resp, has_edns).map_or(Outcome::Drop, |refused| Outcome::NotLocal {
            refused,
            query: Box::new(msg),
        });
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

/// Why a query is not sent upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotForwarded {
    /// Zone transfers and ANY: enumeration, and amplification.
    QueryType,
    /// Not class IN (CHAOS `version.bind` and friends).
    Class,
    /// A single-label name or a local-use suffix (`.local`, `.internal`,
    /// `.lan`, …): only the host's own network could answer it.
    LocalName,
    /// A reverse name of a private, reserved or partial address range:
    /// the names of LAN hosts.
    PrivateReverse,
}

/// Suffixes reserved or commonly used for names that only a local
/// network resolves (RFC 6761, RFC 6762, RFC 8375, ICANN's `.internal`,
/// and the habits of home and office routers).
const LOCAL_SUFFIXES: [&str; 11] = [
    "local",
    "localhost",
    "localdomain",
    "internal",
    "intranet",
    "lan",
    "home",
    "home.arpa",
    "corp",
    "private",
    "invalid",
];

/// Whether a question may go to the upstream resolvers: pure, so the
/// same rule holds for UDP and TCP, and it can be fuzzed.
pub fn forwardable(question: &hickory_proto::op::Query) -> Result<(), NotForwarded> {
    if question.query_class() != DNSClass::IN {
        return Err(NotForwarded::Class);
    }
    if matches!(
        question.query_type(),
        RecordType::AXFR | RecordType::IXFR | RecordType::ANY
    ) || u16::from(question.query_type()) == 253
    // MAILB
    {
        return Err(NotForwarded::QueryType);
    }
    let name = question.name().to_ascii().to_ascii_lowercase();
    let name = name.trim_end_matches('.');
    let labels: Vec<&str> = name.split('.').filter(|l| !l.is_empty()).collect();
    if labels.len() < 2 {
        return Err(NotForwarded::LocalName);
    }
    if LOCAL_SUFFIXES
        .iter()
        .any(|s| name == *s || name.ends_with(&format!(".{s}")))
    {
        return Err(NotForwarded::LocalName);
    }
    if let Some(rest) = name.strip_suffix(".in-addr.arpa") {
        // Only the full reverse name of a public address.
        let octets: Vec<u8> = rest
            .split('.')
            .rev()
            .filter_map(|o| o.parse::<u8>().ok())
            .collect();
        let public = <[u8; 4]>::try_from(octets)
            .ok()
            .map(Ipv4Addr::from)
            .is_some_and(|ip| {
                rest.split('.').count() == 4
                    && super::policy::classify(ip).is_none()
                    && !super::policy::CLOUD_HOSTS.contains(&ip)
            });
        if !public {
            return Err(NotForwarded::PrivateReverse);
        }
    } else if name == "in-addr.arpa" || name.ends_with("ip6.arpa") {
        // IPv6 egress is off: no reverse names of any IPv6 network.
        return Err(NotForwarded::PrivateReverse);
    }
    Ok(())
}

/// The query sent upstream for a guest's `question`: built anew (never
/// the guest's bytes: no smuggled sections, options or flags), with a
/// fresh random id, recursion desired, and EDNS.
pub fn upstream_query(
    id: u16,
    question: &hickory_proto::op::Query,
    checking_disabled: bool,
) -> Option<Vec<u8>> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.metadata.checking_disabled = checking_disabled;
    msg.add_query(question.clone());
    msg.set_edns(response_edns());
    msg.to_vec().ok()
}

/// The guest's response, built from the upstream's: the guest's id and
/// question, the upstream's code, answers whose addresses `allowed`
/// admits (A and AAAA records; HTTPS/SVCB dropped, as their address
/// hints bypass this check), the authority
/// section's SOA for negative caching, nothing additional. `None` when the
/// upstream's answer does not match the question (then SERVFAIL).
pub fn guest_response(
    guest: &Message,
    upstream: &[u8],
    allowed: impl Fn(std::net::IpAddr) -> bool,
) -> Option<Message> {
    let up = Message::from_vec(upstream).ok()?;
    let question = guest.queries.first()?;
    let asked = up.queries.first()?;
    if up.metadata.message_type != MessageType::Response
        || !asked.name().eq_ignore_root(question.name())
        || asked.query_type() != question.query_type()
    {
        return None;
    }
    let mut resp = Message::response(guest.metadata.id, OpCode::Query);
    resp.metadata.recursion_desired = guest.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.checking_disabled = guest.metadata.checking_disabled;
    resp.metadata.response_code = up.metadata.response_code;
    resp.add_query(question.clone());
    for rec in up.answers {
        let keep = match &rec.data {
            RData::HTTPS(_) | RData::SVCB(_) => false,
            data => address_of(data).is_none_or(&allowed),
        };
        if keep {
            resp.add_answer(rec);
        }
    }
    for rec in up.authorities {
        if rec.record_type() == RecordType::SOA {
            resp.add_authority(rec);
        }
    }
    if guest.edns.is_some() {
        resp.set_edns(response_edns());
    }
    Some(resp)
}

/// The address an A or AAAA record carries.
pub fn address_of(data: &RData) -> Option<std::net::IpAddr> {
    match data {
        RData::A(a) => Some(a.0.into()),
        RData::AAAA(a) => Some(a.0.into()),
        _ => None,
    }
}

/// SERVFAIL for `guest`'s question.
pub fn servfail(guest: &Message) -> Message {
    reply(guest, ResponseCode::ServFail)
}

/// A response to `guest`'s question with `code` and no records: SERVFAIL
/// when the upstreams fail, NOERROR for AAAA while IPv6 egress is off (so
/// clients do not wait on IPv6 first).
pub fn reply(guest: &Message, code: ResponseCode) -> Message {
    let mut resp = Message::response(guest.metadata.id, OpCode::Query);
    resp.metadata.recursion_desired = guest.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.response_code = code;
    if let Some(q) = guest.queries.first() {
        resp.add_query(q.clone());
    }
    if guest.edns.is_some() {
        resp.set_edns(response_edns());
    }
    resp
}

/// Encode a response for the guest: over UDP without EDNS at most 512
/// bytes (else truncated, so it retries over TCP).
pub fn encode_for(resp: Message, udp: bool) -> Option<Vec<u8>> {
    let has_edns = resp.edns.is_some();
    encode(resp, has_edns || !udp)
}

/// Answers queries on `socket` (UDP, bound by the caller to port 53 on the
/// gateway address inside the VM's network namespace) until a receive error
/// that is not transient.
pub async fn serve_udp(socket: tokio::net::UdpSocket, stub: Arc<Stub>) -> io::Result<()> {
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, peer) = super::recv_datagram(&socket, &mut buf, "dns").await?;
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
            let Outcome::NotLocal { refused, .. } = resolve(&stub(), &q) else {
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

    #[test]
    fn only_public_questions_are_forwarded() {
        let q = |name: &str, t: RecordType| Query::query(Name::from_str(name).unwrap(), t);
        for (name, t, want) in [
            ("example.com.", RecordType::A, Ok(())),
            ("example.com.", RecordType::MX, Ok(())),
            ("34.216.184.93.in-addr.arpa.", RecordType::PTR, Ok(())),
            (
                "example.com.",
                RecordType::ANY,
                Err(NotForwarded::QueryType),
            ),
            (
                "example.com.",
                RecordType::AXFR,
                Err(NotForwarded::QueryType),
            ),
            (
                "example.com.",
                RecordType::IXFR,
                Err(NotForwarded::QueryType),
            ),
            ("intranet.", RecordType::A, Err(NotForwarded::LocalName)),
            (
                "printer.local.",
                RecordType::A,
                Err(NotForwarded::LocalName),
            ),
            (
                "db.corp.internal.",
                RecordType::A,
                Err(NotForwarded::LocalName),
            ),
            ("nas.lan.", RecordType::A, Err(NotForwarded::LocalName)),
            (
                "router.home.arpa.",
                RecordType::A,
                Err(NotForwarded::LocalName),
            ),
            (
                "50.77.168.192.in-addr.arpa.",
                RecordType::PTR,
                Err(NotForwarded::PrivateReverse),
            ),
            (
                "1.0.0.10.in-addr.arpa.",
                RecordType::PTR,
                Err(NotForwarded::PrivateReverse),
            ),
            (
                "254.169.254.169.in-addr.arpa.",
                RecordType::PTR,
                Err(NotForwarded::PrivateReverse),
            ),
            (
                "16.129.63.168.in-addr.arpa.",
                RecordType::PTR,
                Err(NotForwarded::PrivateReverse),
            ),
            // Partial reverse names enumerate whole ranges.
            (
                "168.192.in-addr.arpa.",
                RecordType::SOA,
                Err(NotForwarded::PrivateReverse),
            ),
            (
                "in-addr.arpa.",
                RecordType::NS,
                Err(NotForwarded::PrivateReverse),
            ),
            (
                "1.0.0.0.d.f.ip6.arpa.",
                RecordType::PTR,
                Err(NotForwarded::PrivateReverse),
            ),
        ] {
            assert_eq!(forwardable(&q(name, t)), want, "{name} {t}");
        }
        let mut chaos = q("version.bind.", RecordType::TXT);
        chaos.set_query_class(DNSClass::CH);
        assert_eq!(forwardable(&chaos), Err(NotForwarded::Class));
    }

    #[test]
    fn upstream_queries_are_rebuilt() {
        let mut guest = Message::from_vec(&query("example.com.", RecordType::A, false)).unwrap();
        // Smuggled records and flags stay with the guest.
        guest.add_additional(Record::from_rdata(
            Name::from_str("x.example.").unwrap(),
            1,
            RData::A(A(VM)),
        ));
        guest.metadata.authoritative = true;
        let up = upstream_query(0xbeef, &guest.queries[0], false).unwrap();
        let up = Message::from_vec(&up).unwrap();
        assert_eq!(up.metadata.id, 0xbeef);
        assert_eq!(up.queries, guest.queries);
        assert!(up.additionals.is_empty());
        assert!(!up.metadata.authoritative);
        assert!(up.metadata.recursion_desired);
    }

    #[test]
    fn answers_lose_refused_addresses() {
        let guest = Message::from_vec(&query("split.example.", RecordType::A, false)).unwrap();
        let mut up = Message::response(0x4242, OpCode::Query);
        up.add_query(guest.queries[0].clone());
        let name = Name::from_str("split.example.").unwrap();
        for ip in [[93, 184, 216, 34], [192, 168, 1, 5], [10, 0, 0, 1]] {
            up.add_answer(Record::from_rdata(
                name.clone(),
                60,
                RData::A(A(Ipv4Addr::from(ip))),
            ));
        }
        for ip in ["fd00::1", "2a0a:2000::10"] {
            up.add_answer(Record::from_rdata(
                name.clone(),
                60,
                RData::AAAA(hickory_proto::rr::rdata::AAAA(ip.parse().unwrap())),
            ));
        }
        up.add_additional(Record::from_rdata(
            name.clone(),
            60,
            RData::A(A(Ipv4Addr::new(10, 9, 9, 9))),
        ));
        let public = |ip: std::net::IpAddr| match ip {
            std::net::IpAddr::V4(v4) => super::super::policy::classify(v4).is_none(),
            std::net::IpAddr::V6(v6) => {
                super::super::policy::classify6(v6) == super::super::policy::Class6::Public
            }
        };
        let resp = guest_response(&guest, &up.to_vec().unwrap(), public).unwrap();
        assert_eq!(resp.metadata.id, 0x1234, "the guest's id");
        let addrs: Vec<_> = resp.answers.iter().map(|r| r.data.clone()).collect();
        assert_eq!(
            addrs,
            vec![
                RData::A(A(Ipv4Addr::new(93, 184, 216, 34))),
                RData::AAAA(hickory_proto::rr::rdata::AAAA(
                    "2a0a:2000::10".parse().unwrap()
                ))
            ]
        );
        assert!(resp.additionals.is_empty());
        // An answer to another question is not passed on.
        let other = Message::from_vec(&query("other.example.", RecordType::A, false)).unwrap();
        assert!(guest_response(&other, &up.to_vec().unwrap(), public).is_none());
        assert!(guest_response(&guest, b"\x42\x42", public).is_none());
        let fail = servfail(&guest);
        assert_eq!(fail.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(fail.metadata.id, 0x1234);
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
