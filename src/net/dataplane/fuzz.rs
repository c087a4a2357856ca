//! Fuzz targets for every parser a guest feeds: the DHCP handler (and the
//! option sanitizer inside it), the gateway's DNS (the stub, the forwarding
//! rule, the rebuilt answer) and `allow_domains`' inspection (ClientHello
//! reassembly, HTTP request heads, chunked bodies).
//!
//! They run on the stable toolchain with bolero: under `cargo test` each
//! target gets random inputs for one second (so `scripts/test` runs them
//! briefly); `scripts/fuzz` runs them for as long as asked
//! (`BOLERO_RANDOM_TEST_TIME_MS`). Random bytes rarely make a parsable
//! message, so each input is also read as edits (set, insert, delete,
//! truncate) to a valid message of the kind the parser expects: the
//! parser is driven deep past its first checks. Besides "never panics",
//! each target asserts what must hold whatever the guest sends.

use std::net::Ipv4Addr;

use bolero::check;

/// `seed` edited by `ops`, read three bytes at a time: an operation, a
/// position and a value.
fn mutate(seed: &[u8], ops: &[u8]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for op in ops.chunks_exact(3) {
        let pos = usize::from(op[1]) * 7 % (out.len() + 1);
        match op[0] % 5 {
            0 | 1 => {
                if let Some(b) = out.get_mut(pos) {
                    *b = op[2];
                }
            }
            2 => out.insert(pos, op[2]),
            3 => {
                if pos < out.len() {
                    out.remove(pos);
                }
            }
            _ => out.truncate(pos.max(usize::from(op[2]))),
        }
    }
    out
}

/// The input as raw bytes, or as edits of one of `seeds` (chosen by its
/// first byte).
fn input(seeds: &[Vec<u8>], data: &[u8]) -> Vec<u8> {
    match data.split_first() {
        Some((&k, rest)) if k % 4 != 0 && !seeds.is_empty() => {
            mutate(&seeds[usize::from(k) % seeds.len()], rest)
        }
        _ => data.to_vec(),
    }
}

fn dhcp_seeds() -> Vec<Vec<u8>> {
    use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode};
    use dhcproto::{Encodable, Encoder};
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let mut seeds = Vec::new();
    for (kind, extra) in [
        (MessageType::Discover, None),
        (
            MessageType::Request,
            Some(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 2, 15))),
        ),
        (MessageType::Inform, None),
        (MessageType::Release, None),
    ] {
        let mut msg = Message::default();
        msg.set_opcode(Opcode::BootRequest)
            .set_chaddr(&mac)
            .set_xid(0x1234_5678);
        msg.opts_mut().insert(DhcpOption::MessageType(kind));
        msg.opts_mut().insert(DhcpOption::ParameterRequestList(vec![
            dhcproto::v4::OptionCode::SubnetMask,
            dhcproto::v4::OptionCode::Router,
            dhcproto::v4::OptionCode::DomainNameServer,
        ]));
        if let Some(o) = extra {
            msg.opts_mut().insert(o);
        }
        let mut buf = Vec::new();
        if msg.encode(&mut Encoder::new(&mut buf)).is_ok() {
            seeds.push(buf);
        }
    }
    seeds
}

#[test]
fn fuzz_dhcp_handler() {
    let lease = super::dhcp::Lease {
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        ip: Ipv4Addr::new(10, 0, 2, 15),
        server: Ipv4Addr::new(10, 0, 2, 2),
        netmask: Ipv4Addr::new(255, 255, 255, 0),
        router: Ipv4Addr::new(10, 0, 2, 2),
        dns: vec![Ipv4Addr::new(10, 0, 2, 2)],
        lease_secs: 86400,
        hostname: Some("box".into()),
        domain: Some("migrant.internal".into()),
        mtu: None,
    };
    let seeds = dhcp_seeds();
    assert_eq!(seeds.len(), 4);
    check!().for_each(|data: &[u8]| {
        let req = input(&seeds, data);
        if let Some(reply) = super::dhcp::handle(&lease, &req).reply {
            // Whatever was asked, the only address ever given is the lease.
            use dhcproto::{Decodable, Decoder};
            let msg = dhcproto::v4::Message::decode(&mut Decoder::new(&reply.bytes))
                .unwrap_or_else(|e| panic!("the reply does not decode: {e}"));
            let y = msg.yiaddr();
            assert!(y == lease.ip || y.is_unspecified(), "offered {y}");
            assert!(
                reply.bytes.len() <= 1500,
                "reply of {} bytes",
                reply.bytes.len()
            );
        }
    });
}

fn dns_query(name: &str, qtype: u16) -> Vec<u8> {
    let mut q = vec![0x4d, 0x47, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for part in name.split('.') {
        q.push(part.len() as u8);
        q.extend_from_slice(part.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

#[test]
fn fuzz_dns_queries() {
    use hickory_proto::op::Message;
    let stub = super::dns::Stub {
        names: vec![("box".into(), Ipv4Addr::new(10, 0, 2, 15))],
    };
    let seeds = vec![
        dns_query("box", 1),
        dns_query("example.com", 1),
        dns_query("50.77.168.192.in-addr.arpa", 12),
        dns_query("example.com", 255),
    ];
    check!().for_each(|data: &[u8]| {
        let q = input(&seeds, data);
        match super::dns::resolve(&stub, &q) {
            super::dns::Outcome::Answer(r) | super::dns::Outcome::NotLocal { refused: r, .. } => {
                // An answer is a response to exactly this query.
                let resp = Message::from_vec(&r).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(Some(&r[..2]), q.get(..2));
                assert_eq!(
                    resp.metadata.message_type,
                    hickory_proto::op::MessageType::Response
                );
            }
            super::dns::Outcome::Drop => {}
        }
        // What the resolver forwards is rebuilt from a parsed question.
        if let Ok(msg) = Message::from_vec(&q)
            && let Some(question) = msg.queries.first()
            && super::dns::forwardable(question).is_ok()
        {
            let up = super::dns::upstream_query(7, question, false)
                .unwrap_or_else(|| panic!("no upstream query"));
            let up = Message::from_vec(&up).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(up.queries.len(), 1);
            assert!(up.additionals.is_empty() && up.authorities.is_empty());
        }
    });
}

#[test]
fn fuzz_dns_answers() {
    use hickory_proto::op::Message;
    use hickory_proto::rr::RData;
    let guest = Message::from_vec(&dns_query("split.example", 1)).unwrap_or_else(|e| panic!("{e}"));
    let mut answer = dns_query("split.example", 1);
    answer[2] |= 0x80; // a response
    answer[7] = 2; // two answers
    for ip in [[93, 184, 216, 34], [192, 168, 1, 5]] {
        answer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        answer.extend_from_slice(&ip);
    }
    let seeds = vec![answer];
    let public = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(v4) => super::policy::classify(v4).is_none(),
        std::net::IpAddr::V6(v6) => super::policy::classify6(v6) == super::policy::Class6::Public,
    };
    check!().for_each(|data: &[u8]| {
        let up = input(&seeds, data);
        if let Some(resp) = super::dns::guest_response(&guest, &up, public) {
            assert_eq!(resp.metadata.id, guest.metadata.id);
            for rec in &resp.answers {
                match &rec.data {
                    RData::A(a) => assert!(public(a.0.into()), "{} passed", a.0),
                    RData::AAAA(a) => assert!(public(a.0.into()), "{} passed", a.0),
                    RData::HTTPS(_) | RData::SVCB(_) => {
                        panic!("{rec:?} passed")
                    }
                    _ => {}
                }
            }
            assert!(resp.additionals.is_empty());
            let _ = super::dns::encode_for(resp, true);
        }
    });
}

fn tls_seed(name: &str, split: usize) -> Vec<u8> {
    let name = name.as_bytes();
    let mut ext = vec![0, 0];
    ext.extend_from_slice(&((name.len() + 5) as u16).to_be_bytes());
    ext.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
    ext.extend_from_slice(name);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 1, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut out = Vec::new();
    for part in hs.chunks(split.max(1)) {
        out.extend_from_slice(&[0x16, 3, 1]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

#[test]
fn fuzz_first_flight() {
    use super::domains::{Chunked, FirstFlight, first_flight};
    let seeds = vec![
        tls_seed("api.example.com", 1000),
        tls_seed("api.example.com", 7),
        b"GET / HTTP/1.1\r\nHost: ok.test\r\nAccept: */*\r\n\r\n".to_vec(),
        b"POST /u HTTP/1.1\r\nHost: ok.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            .to_vec(),
        b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(),
    ];
    check!().for_each(|data: &[u8]| {
        let bytes = input(&seeds, data);
        match first_flight(&bytes) {
            FirstFlight::Http(head) => {
                assert!(head.len <= bytes.len());
                assert!(!head.host.is_empty() && !head.host.contains(['/', ' ', ':']));
                let mut c = Chunked::default();
                if let Ok((used, _)) = c.feed(&bytes[head.len..]) {
                    assert!(used <= bytes.len() - head.len);
                }
            }
            FirstFlight::Tls { sni: Some(n), .. } => {
                assert!(!n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic()));
            }
            _ => {}
        }
        // Any prefix is either undecided or the same kind of verdict
        // never "more permissive" than refusing: no panics on prefixes.
        let _ = first_flight(&bytes[..bytes.len() / 2]);
    });
}
