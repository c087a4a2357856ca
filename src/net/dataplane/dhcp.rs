//! A DHCPv4 server for exactly one guest, holding one static lease.
//!
//! The pure core, [`handle`] (and its shorthand [`reply`]), turns one request
//! from the guest into the reply to send, if any; [`serve`] runs it on a
//! socket made by [`crate::net::setup::dhcp_socket`] inside the VM's network namespace.
//!
//! Everything received is untrusted guest input. Before the packet reaches
//! the `dhcproto` decoder, its options area is reduced to the few options the
//! server reads (some of the library's decoders for other options assert on
//! guest-controlled lengths), and packets from any other MAC address, relayed
//! packets, replies and plain BOOTP requests are ignored.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{
    self, DhcpOption, DhcpOptions, Flags, HType, Message, MessageType, Opcode, OptionCode,
};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

/// The UDP port the server listens on.
pub const SERVER_PORT: u16 = v4::SERVER_PORT;
/// The UDP port replies are sent to.
pub const CLIENT_PORT: u16 = v4::CLIENT_PORT;

/// Offset of the options area (after the fixed header and magic cookie).
const OPTIONS_OFFSET: usize = 240;
/// Offset of the magic cookie.
const MAGIC_OFFSET: usize = 236;
/// Replies are padded to the BOOTP minimum that old clients expect.
const MIN_REPLY_LEN: usize = v4::MIN_PACKET_SIZE;
/// Option codes that are kept when sanitizing a request; everything else is
/// dropped before decoding.
const KEPT_OPTIONS: [u8; 6] = [
    53, // message type
    50, // requested IP address
    54, // server identifier
    55, // parameter request list
    57, // maximum message size
    61, // client identifier
];

/// The one lease this server hands out, and the network parameters that go
/// with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The guest NIC's MAC address; requests from other addresses are ignored.
    pub mac: [u8; 6],
    /// The address given to the guest.
    pub ip: Ipv4Addr,
    /// The server's own address on the guest link (the gateway side), sent
    /// as the server identifier.
    pub server: Ipv4Addr,
    /// The subnet mask of the guest link.
    pub netmask: Ipv4Addr,
    /// The default router for the guest.
    pub router: Ipv4Addr,
    /// DNS servers for the guest (option omitted when empty).
    pub dns: Vec<Ipv4Addr>,
    /// Lease time in seconds; T1 and T2 are derived (1/2 and 7/8 of it).
    pub lease_secs: u32,
    /// Host name for the guest, if any.
    pub hostname: Option<String>,
    /// DNS domain name for the guest, if any.
    pub domain: Option<String>,
    /// Interface MTU for the guest, if it should differ from the default.
    pub mtu: Option<u16>,
}

/// What kind of reply was produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// DHCPOFFER, answering a DISCOVER.
    Offer,
    /// DHCPACK, answering a REQUEST for the lease's address or an INFORM.
    Ack,
    /// DHCPNAK, answering a REQUEST for another address.
    Nak,
}

/// An encoded reply and where to send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// What was answered.
    pub kind: ReplyKind,
    /// The encoded DHCP message.
    pub bytes: Vec<u8>,
    /// Destination address (port [`CLIENT_PORT`]): the limited broadcast
    /// address, or the client's own address when it already has one
    /// (renewing, rebinding, INFORM), as RFC 2131 section 4.1 asks.
    pub to: Ipv4Addr,
}

/// Something the guest did that the supervisor may want to know.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DhcpEvent {
    /// The guest asked for an address and was offered the lease's.
    Offered {
        /// The offered address.
        ip: Ipv4Addr,
    },
    /// The guest took (or renewed) the lease.
    Acked {
        /// The leased address.
        ip: Ipv4Addr,
    },
    /// The guest asked for an address that is not its lease and was refused.
    Nacked {
        /// The address it asked for, if it named one.
        requested: Option<Ipv4Addr>,
    },
    /// The guest gave the lease back.
    Released,
    /// The guest declined the address (it saw it in use on the link).
    Declined {
        /// The declined address, if the guest named it.
        ip: Option<Ipv4Addr>,
    },
}

/// The result of handling one request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    /// The reply to send, if any.
    pub reply: Option<Reply>,
    /// What to report, if anything.
    pub event: Option<DhcpEvent>,
}

/// The reply to `request` (raw UDP payload from the guest), if one is due.
///
/// DISCOVER gets an OFFER, REQUEST for the lease's address (selecting this
/// server, init-reboot, renewing or rebinding) an ACK, REQUEST for another
/// address a NAK, INFORM an ACK without an address. RELEASE, DECLINE,
/// requests that selected another server, packets from other MAC addresses
/// and anything malformed get nothing. Never panics.
pub fn reply(lease: &Lease, request: &[u8]) -> Option<Reply> {
    handle(lease, request).reply
}

/// Like [`reply`], and also says what happened (see [`DhcpEvent`]).
pub fn handle(lease: &Lease, request: &[u8]) -> Outcome {
    let Some(msg) = decode_request(lease, request) else {
        return Outcome::default();
    };
    let Some(msg_type) = msg.opts().msg_type() else {
        // Plain BOOTP: not served.
        return Outcome::default();
    };
    let requested = match msg.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    };
    let server_id = match msg.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    };
    let ciaddr = msg.ciaddr();
    let client_addr = (!ciaddr.is_unspecified()).then_some(ciaddr);

    match msg_type {
        MessageType::Discover => Outcome {
            reply: encode_reply(lease, &msg, ReplyKind::Offer, true, Ipv4Addr::BROADCAST),
            event: Some(DhcpEvent::Offered { ip: lease.ip }),
        },
        MessageType::Request => {
            if server_id.is_some_and(|id| id != lease.server) {
                // The client chose another server's offer.
                return Outcome::default();
            }
            // Selecting and init-reboot name the address in option 50;
            // renewing and rebinding put it in ciaddr.
            let wanted = requested.or(client_addr);
            if wanted == Some(lease.ip) {
                let to = client_addr.unwrap_or(Ipv4Addr::BROADCAST);
                Outcome {
                    reply: encode_reply(lease, &msg, ReplyKind::Ack, true, to),
                    event: Some(DhcpEvent::Acked { ip: lease.ip }),
                }
            } else {
                Outcome {
                    reply: encode_reply(lease, &msg, ReplyKind::Nak, false, Ipv4Addr::BROADCAST),
                    event: Some(DhcpEvent::Nacked { requested: wanted }),
                }
            }
        }
        MessageType::Inform => Outcome {
            reply: encode_reply(
                lease,
                &msg,
                ReplyKind::Ack,
                false,
                client_addr.unwrap_or(Ipv4Addr::BROADCAST),
            ),
            event: None,
        },
        MessageType::Release => Outcome {
            reply: None,
            event: server_id
                .is_none_or(|id| id == lease.server)
                .then_some(DhcpEvent::Released),
        },
        MessageType::Decline => Outcome {
            reply: None,
            event: server_id
                .is_none_or(|id| id == lease.server)
                .then_some(DhcpEvent::Declined { ip: requested }),
        },
        _ => Outcome::default(),
    }
}

/// Checks the fixed header and decodes `request` with only the options in
/// [`KEPT_OPTIONS`]; None unless it is a well-formed BOOTREQUEST from the
/// lease's MAC address on this link.
fn decode_request(lease: &Lease, request: &[u8]) -> Option<Message> {
    let header = request.get(..OPTIONS_OFFSET)?;
    if header.get(MAGIC_OFFSET..OPTIONS_OFFSET)? != v4::MAGIC {
        return None;
    }
    let options = sanitize_options(request.get(OPTIONS_OFFSET..)?)?;
    let mut clean = Vec::with_capacity(OPTIONS_OFFSET + options.len());
    clean.extend_from_slice(header);
    clean.extend_from_slice(&options);
    let msg = Message::decode(&mut Decoder::new(&clean)).ok()?;

    // hlen is checked before chaddr() is called: the latter slices by it.
    let from_our_guest = msg.opcode() == Opcode::BootRequest
        && msg.htype() == HType::Eth
        && usize::from(msg.hlen()) == lease.mac.len()
        && msg.chaddr() == lease.mac;
    // A relayed request did not come from the guest's own link.
    let direct = msg.giaddr().is_unspecified();
    (from_our_guest && direct).then_some(msg)
}

/// Re-encodes the options area keeping only [`KEPT_OPTIONS`], up to the End
/// option; None if an option runs past the end of the packet.
fn sanitize_options(area: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = area;
    while let Some((&code, tail)) = rest.split_first() {
        match code {
            0 => rest = tail,
            255 => break,
            _ => {
                let (&len, tail) = tail.split_first()?;
                let value = tail.get(..usize::from(len))?;
                if KEPT_OPTIONS.contains(&code) {
                    out.push(code);
                    out.push(len);
                    out.extend_from_slice(value);
                }
                rest = tail.get(usize::from(len)..)?;
            }
        }
    }
    // A missing End is tolerated, as most servers do.
    out.push(255);
    Some(out)
}

/// Builds and encodes a reply of `kind` to `req`. `assign` puts the lease's
/// address in yiaddr (OFFER, ACK to REQUEST) and adds the lease times.
fn encode_reply(
    lease: &Lease,
    req: &Message,
    kind: ReplyKind,
    assign: bool,
    to: Ipv4Addr,
) -> Option<Reply> {
    let yiaddr = if assign {
        lease.ip
    } else {
        Ipv4Addr::UNSPECIFIED
    };
    // ciaddr is echoed in an ACK (renewing, INFORM), zero otherwise.
    let ciaddr = if kind == ReplyKind::Ack {
        req.ciaddr()
    } else {
        Ipv4Addr::UNSPECIFIED
    };
    let mut msg = Message::new_with_id(
        req.xid(),
        ciaddr,
        yiaddr,
        Ipv4Addr::UNSPECIFIED,
        req.giaddr(),
        &lease.mac,
    );
    msg.set_opcode(Opcode::BootReply)
        .set_htype(HType::Eth)
        .set_flags(Flags::new(u16::from(req.flags())));

    let mut opts = DhcpOptions::new();
    let msg_type = match kind {
        ReplyKind::Offer => MessageType::Offer,
        ReplyKind::Ack => MessageType::Ack,
        ReplyKind::Nak => MessageType::Nak,
    };
    opts.insert(DhcpOption::MessageType(msg_type));
    opts.insert(DhcpOption::ServerIdentifier(lease.server));
    // RFC 6842: echo the client identifier.
    if let Some(id @ DhcpOption::ClientIdentifier(_)) = req.opts().get(OptionCode::ClientIdentifier)
    {
        opts.insert(id.clone());
    }
    if kind == ReplyKind::Nak {
        opts.insert(DhcpOption::Message(
            "requested address is not this client's lease".to_owned(),
        ));
    } else {
        if assign {
            let secs = lease.lease_secs;
            opts.insert(DhcpOption::AddressLeaseTime(secs));
            if secs != u32::MAX {
                opts.insert(DhcpOption::Renewal(secs / 2));
                opts.insert(DhcpOption::Rebinding(fraction(secs, 7, 8)));
            }
        }
        network_options(lease, &mut opts);
    }
    msg.set_opts(opts);

    let mut bytes = Vec::with_capacity(MIN_REPLY_LEN);
    msg.encode(&mut Encoder::new(&mut bytes)).ok()?;
    if bytes.len() < MIN_REPLY_LEN {
        bytes.resize(MIN_REPLY_LEN, 0);
    }
    Some(Reply { kind, bytes, to })
}

/// The configuration options sent with every OFFER and ACK. The parameter
/// request list is not consulted: this standard set is small and always fits.
fn network_options(lease: &Lease, opts: &mut DhcpOptions) {
    opts.insert(DhcpOption::SubnetMask(lease.netmask));
    opts.insert(DhcpOption::BroadcastAddr(Ipv4Addr::from(
        u32::from(lease.ip) | !u32::from(lease.netmask),
    )));
    opts.insert(DhcpOption::Router(vec![lease.router]));
    if !lease.dns.is_empty() {
        opts.insert(DhcpOption::DomainNameServer(lease.dns.clone()));
    }
    if let Some(name) = lease.hostname.as_deref().filter(|n| !n.is_empty()) {
        opts.insert(DhcpOption::Hostname(name.to_owned()));
    }
    if let Some(domain) = lease.domain.as_deref().filter(|d| !d.is_empty()) {
        opts.insert(DhcpOption::DomainName(domain.to_owned()));
    }
    if let Some(mtu) = lease.mtu {
        opts.insert(DhcpOption::InterfaceMtu(mtu));
    }
}

fn fraction(secs: u32, num: u64, den: u64) -> u32 {
    u32::try_from(u64::from(secs) * num / den).unwrap_or(u32::MAX)
}

/// Serves `lease` on `socket` until a receive error that is not transient.
///
/// `socket` is the one [`crate::net::setup::dhcp_socket`] made (bound to 0.0.0.0:67 on the
/// guest-facing interface inside the VM's network namespace, SO_BROADCAST
/// set), converted with `tokio::net::UdpSocket::from_std`. Replies go to
/// 255.255.255.255:68, or to the client's address when it already has one.
/// `on_event` is called after the reply (if any) is sent; it must not block.
pub async fn serve(
    socket: tokio::net::UdpSocket,
    lease: Lease,
    on_event: impl Fn(DhcpEvent) + Send + 'static,
) -> io::Result<()> {
    serve_to_port(socket, lease, on_event, CLIENT_PORT).await
}

/// [`serve`] with the client port as a parameter (tests use an unprivileged
/// port).
async fn serve_to_port(
    socket: tokio::net::UdpSocket,
    lease: Lease,
    on_event: impl Fn(DhcpEvent) + Send + 'static,
    client_port: u16,
) -> io::Result<()> {
    // Client messages fit an Ethernet frame; anything longer is truncated
    // and then most likely ignored.
    let mut buf = vec![0u8; 2048];
    loop {
        let (len, peer) = super::recv_datagram(&socket, &mut buf, "dhcp").await?;
        let Some(request) = buf.get(..len) else {
            continue;
        };
        let outcome = handle(&lease, request);
        if let Some(reply) = &outcome.reply {
            tracing::debug!(kind = ?reply.kind, to = %reply.to, from = %peer, "dhcp: reply");
            send_reply(&socket, reply, client_port).await;
        } else {
            tracing::trace!(from = %peer, len, "dhcp: request ignored");
        }
        if let Some(event) = outcome.event {
            tracing::debug!(?event, "dhcp: event");
            on_event(event);
        }
    }
}

/// Sends `reply`; a unicast that fails is retried as a broadcast. Failures
/// are logged, not returned: the client retransmits.
async fn send_reply(socket: &tokio::net::UdpSocket, reply: &Reply, client_port: u16) {
    let dest = SocketAddrV4::new(reply.to, client_port);
    let Err(e) = socket.send_to(&reply.bytes, dest).await else {
        return;
    };
    if reply.to == Ipv4Addr::BROADCAST {
        tracing::warn!(error = %e, %dest, "dhcp: cannot send reply");
        return;
    }
    tracing::debug!(error = %e, %dest, "dhcp: unicast reply failed; broadcasting");
    let broadcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, client_port);
    if let Err(e) = socket.send_to(&reply.bytes, broadcast).await {
        tracing::warn!(error = %e, dest = %broadcast, "dhcp: cannot send reply");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

    fn lease() -> Lease {
        Lease {
            mac: MAC,
            ip: IP,
            server: SERVER,
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            router: SERVER,
            dns: vec![SERVER, Ipv4Addr::new(10, 0, 2, 3)],
            lease_secs: 86400,
            hostname: Some("box".to_owned()),
            domain: Some("migrant.internal".to_owned()),
            mtu: Some(1400),
        }
    }

    /// The parameter request list Debian 12's dhclient sends.
    fn dhclient_prl() -> DhcpOption {
        DhcpOption::ParameterRequestList(
            [1u8, 28, 2, 3, 15, 6, 119, 12, 44, 47, 26, 121, 42]
                .into_iter()
                .map(OptionCode::from)
                .collect(),
        )
    }

    /// A client message as dhclient builds it (no broadcast flag).
    fn client_msg(kind: MessageType, mac: &[u8], ciaddr: Ipv4Addr) -> Message {
        let mut msg = Message::new_with_id(
            0xdead_beef,
            ciaddr,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            mac,
        );
        msg.opts_mut().insert(DhcpOption::MessageType(kind));
        msg.opts_mut()
            .insert(DhcpOption::Hostname("debian".to_owned()));
        msg.opts_mut().insert(dhclient_prl());
        msg
    }

    fn encode(msg: &Message) -> Vec<u8> {
        let mut buf = Vec::new();
        msg.encode(&mut Encoder::new(&mut buf)).unwrap();
        buf
    }

    fn decode(bytes: &[u8]) -> Message {
        Message::decode(&mut Decoder::new(bytes)).unwrap()
    }

    fn discover() -> Vec<u8> {
        encode(&client_msg(
            MessageType::Discover,
            &MAC,
            Ipv4Addr::UNSPECIFIED,
        ))
    }

    fn request_selecting(ip: Ipv4Addr, server: Ipv4Addr) -> Vec<u8> {
        let mut msg = client_msg(MessageType::Request, &MAC, Ipv4Addr::UNSPECIFIED);
        msg.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        msg.opts_mut().insert(DhcpOption::ServerIdentifier(server));
        encode(&msg)
    }

    fn opt(msg: &Message, code: OptionCode) -> Option<&DhcpOption> {
        msg.opts().get(code)
    }

    fn assert_network_options(msg: &Message) {
        assert_eq!(
            opt(msg, OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
        );
        assert_eq!(
            opt(msg, OptionCode::Router),
            Some(&DhcpOption::Router(vec![SERVER]))
        );
        assert_eq!(
            opt(msg, OptionCode::DomainNameServer),
            Some(&DhcpOption::DomainNameServer(vec![
                SERVER,
                Ipv4Addr::new(10, 0, 2, 3)
            ]))
        );
        assert_eq!(
            opt(msg, OptionCode::Hostname),
            Some(&DhcpOption::Hostname("box".to_owned()))
        );
        assert_eq!(
            opt(msg, OptionCode::DomainName),
            Some(&DhcpOption::DomainName("migrant.internal".to_owned()))
        );
        assert_eq!(
            opt(msg, OptionCode::InterfaceMtu),
            Some(&DhcpOption::InterfaceMtu(1400))
        );
        assert_eq!(
            opt(msg, OptionCode::BroadcastAddr),
            Some(&DhcpOption::BroadcastAddr(Ipv4Addr::new(10, 0, 2, 255)))
        );
        assert_eq!(
            opt(msg, OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(SERVER))
        );
    }

    fn assert_lease_times(msg: &Message) {
        assert_eq!(
            opt(msg, OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(86400))
        );
        assert_eq!(
            opt(msg, OptionCode::Renewal),
            Some(&DhcpOption::Renewal(43200))
        );
        assert_eq!(
            opt(msg, OptionCode::Rebinding),
            Some(&DhcpOption::Rebinding(75600))
        );
    }

    #[test]
    fn discover_gets_offer() {
        let out = handle(&lease(), &discover());
        assert_eq!(out.event, Some(DhcpEvent::Offered { ip: IP }));
        let reply = out.reply.unwrap();
        assert_eq!(reply.kind, ReplyKind::Offer);
        assert_eq!(reply.to, Ipv4Addr::BROADCAST);
        assert!(reply.bytes.len() >= 300);
        let msg = decode(&reply.bytes);
        assert_eq!(msg.opcode(), Opcode::BootReply);
        assert_eq!(msg.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(msg.xid(), 0xdead_beef);
        assert_eq!(msg.chaddr(), MAC);
        assert_eq!(msg.yiaddr(), IP);
        assert_eq!(msg.ciaddr(), Ipv4Addr::UNSPECIFIED);
        assert!(!msg.flags().broadcast());
        assert_network_options(&msg);
        assert_lease_times(&msg);
    }

    #[test]
    fn broadcast_flag_and_client_id_are_echoed() {
        let mut msg = client_msg(MessageType::Discover, &MAC, Ipv4Addr::UNSPECIFIED);
        msg.set_flags(Flags::default().set_broadcast());
        let mut id = vec![1];
        id.extend_from_slice(&MAC);
        msg.opts_mut()
            .insert(DhcpOption::ClientIdentifier(id.clone()));
        let reply = decode(&reply(&lease(), &encode(&msg)).unwrap().bytes);
        assert!(reply.flags().broadcast());
        assert_eq!(
            opt(&reply, OptionCode::ClientIdentifier),
            Some(&DhcpOption::ClientIdentifier(id))
        );
    }

    #[test]
    fn request_selecting_gets_ack() {
        let out = handle(&lease(), &request_selecting(IP, SERVER));
        assert_eq!(out.event, Some(DhcpEvent::Acked { ip: IP }));
        let reply = out.reply.unwrap();
        assert_eq!(reply.kind, ReplyKind::Ack);
        assert_eq!(reply.to, Ipv4Addr::BROADCAST);
        let msg = decode(&reply.bytes);
        assert_eq!(msg.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(msg.yiaddr(), IP);
        assert_eq!(msg.xid(), 0xdead_beef);
        assert_eq!(msg.chaddr(), MAC);
        assert_network_options(&msg);
        assert_lease_times(&msg);
    }

    #[test]
    fn request_init_reboot_gets_ack_or_nak() {
        let mut msg = client_msg(MessageType::Request, &MAC, Ipv4Addr::UNSPECIFIED);
        msg.opts_mut().insert(DhcpOption::RequestedIpAddress(IP));
        let r = reply(&lease(), &encode(&msg)).unwrap();
        assert_eq!(r.kind, ReplyKind::Ack);

        let other = Ipv4Addr::new(192, 168, 1, 50);
        msg.opts_mut().insert(DhcpOption::RequestedIpAddress(other));
        let out = handle(&lease(), &encode(&msg));
        assert_eq!(
            out.event,
            Some(DhcpEvent::Nacked {
                requested: Some(other)
            })
        );
        assert_eq!(out.reply.unwrap().kind, ReplyKind::Nak);
    }

    #[test]
    fn request_renewing_gets_unicast_ack() {
        let msg = client_msg(MessageType::Request, &MAC, IP);
        let r = reply(&lease(), &encode(&msg)).unwrap();
        assert_eq!(r.kind, ReplyKind::Ack);
        assert_eq!(r.to, IP);
        let ack = decode(&r.bytes);
        assert_eq!(ack.ciaddr(), IP);
        assert_eq!(ack.yiaddr(), IP);
        assert_lease_times(&ack);

        let msg = client_msg(MessageType::Request, &MAC, Ipv4Addr::new(10, 0, 2, 99));
        let r = reply(&lease(), &encode(&msg)).unwrap();
        assert_eq!(r.kind, ReplyKind::Nak);
        assert_eq!(r.to, Ipv4Addr::BROADCAST);
    }

    #[test]
    fn request_for_other_ip_gets_nak() {
        let r = reply(
            &lease(),
            &request_selecting(Ipv4Addr::new(10, 0, 2, 16), SERVER),
        )
        .unwrap();
        assert_eq!(r.kind, ReplyKind::Nak);
        assert_eq!(r.to, Ipv4Addr::BROADCAST);
        let nak = decode(&r.bytes);
        assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
        assert_eq!(nak.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(nak.xid(), 0xdead_beef);
        assert_eq!(
            opt(&nak, OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(SERVER))
        );
        assert!(opt(&nak, OptionCode::AddressLeaseTime).is_none());
        assert!(opt(&nak, OptionCode::Router).is_none());
    }

    #[test]
    fn request_for_other_server_is_ignored() {
        let out = handle(&lease(), &request_selecting(IP, Ipv4Addr::new(10, 0, 2, 3)));
        assert_eq!(out, Outcome::default());
    }

    #[test]
    fn inform_gets_ack_without_address() {
        let msg = client_msg(MessageType::Inform, &MAC, IP);
        let out = handle(&lease(), &encode(&msg));
        assert_eq!(out.event, None);
        let r = out.reply.unwrap();
        assert_eq!(r.kind, ReplyKind::Ack);
        assert_eq!(r.to, IP);
        let ack = decode(&r.bytes);
        assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(ack.ciaddr(), IP);
        assert_network_options(&ack);
        assert!(opt(&ack, OptionCode::AddressLeaseTime).is_none());
        assert!(opt(&ack, OptionCode::Renewal).is_none());
    }

    #[test]
    fn release_and_decline_get_no_reply() {
        let mut msg = client_msg(MessageType::Release, &MAC, IP);
        msg.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
        let out = handle(&lease(), &encode(&msg));
        assert_eq!(out.reply, None);
        assert_eq!(out.event, Some(DhcpEvent::Released));

        let mut msg = client_msg(MessageType::Decline, &MAC, Ipv4Addr::UNSPECIFIED);
        msg.opts_mut().insert(DhcpOption::RequestedIpAddress(IP));
        msg.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
        let out = handle(&lease(), &encode(&msg));
        assert_eq!(out.reply, None);
        assert_eq!(out.event, Some(DhcpEvent::Declined { ip: Some(IP) }));
    }

    #[test]
    fn minimal_lease_omits_optional_options() {
        let l = Lease {
            dns: vec![],
            hostname: None,
            domain: None,
            mtu: None,
            lease_secs: u32::MAX,
            ..lease()
        };
        let msg = decode(&reply(&l, &discover()).unwrap().bytes);
        for code in [
            OptionCode::DomainNameServer,
            OptionCode::Hostname,
            OptionCode::DomainName,
            OptionCode::InterfaceMtu,
            OptionCode::Renewal,
            OptionCode::Rebinding,
        ] {
            assert!(opt(&msg, code).is_none(), "{code:?}");
        }
        assert_eq!(
            opt(&msg, OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(u32::MAX))
        );
    }

    #[test]
    fn other_mac_is_ignored() {
        let other = [0x52, 0x54, 0x00, 0x12, 0x34, 0x57];
        let msg = client_msg(MessageType::Discover, &other, Ipv4Addr::UNSPECIFIED);
        assert_eq!(handle(&lease(), &encode(&msg)), Outcome::default());
        // Same first six bytes but a longer hardware address.
        let mut long = MAC.to_vec();
        long.extend([0, 0]);
        let msg = client_msg(MessageType::Discover, &long, Ipv4Addr::UNSPECIFIED);
        assert_eq!(reply(&lease(), &encode(&msg)), None);
    }

    #[test]
    fn non_requests_bootp_and_relayed_are_ignored() {
        let mut msg = client_msg(MessageType::Discover, &MAC, Ipv4Addr::UNSPECIFIED);
        msg.set_opcode(Opcode::BootReply);
        assert_eq!(reply(&lease(), &encode(&msg)), None);

        let mut msg = client_msg(MessageType::Discover, &MAC, Ipv4Addr::UNSPECIFIED);
        msg.set_giaddr(Ipv4Addr::new(10, 9, 9, 9));
        assert_eq!(reply(&lease(), &encode(&msg)), None);

        let mut msg = client_msg(MessageType::Offer, &MAC, Ipv4Addr::UNSPECIFIED);
        assert_eq!(reply(&lease(), &encode(&msg)), None);
        msg.opts_mut().clear();
        assert_eq!(reply(&lease(), &encode(&msg)), None);

        let mut bad_magic = discover();
        bad_magic[MAGIC_OFFSET] ^= 1;
        assert_eq!(reply(&lease(), &bad_magic), None);
    }

    #[test]
    fn options_that_upset_the_decoder_are_dropped() {
        // Options whose dhcproto decoders assert on their length (rapid
        // commit with data, an empty client FQDN or BLQ status) must not
        // reach it; the message type after them still counts.
        let mut bytes = discover();
        bytes.truncate(OPTIONS_OFFSET);
        bytes.extend([80, 1, 0, 81, 0, 151, 0, 94, 1, 0, 53, 1, 1, 255]);
        assert_eq!(reply(&lease(), &bytes).unwrap().kind, ReplyKind::Offer);
        // Option running past the end of the packet.
        let mut bytes = discover();
        bytes.truncate(OPTIONS_OFFSET);
        bytes.extend([53, 1, 1, 12, 200, b'x']);
        assert_eq!(reply(&lease(), &bytes), None);
        // No End option: tolerated.
        let mut bytes = discover();
        bytes.truncate(OPTIONS_OFFSET);
        bytes.extend([0, 0, 53, 1, 1]);
        assert_eq!(reply(&lease(), &bytes).unwrap().kind, ReplyKind::Offer);
    }

    #[test]
    fn garbage_is_ignored_without_panic() {
        let l = lease();
        let good = request_selecting(IP, SERVER);
        for len in 0..good.len() {
            let r = reply(&l, &good[..len]);
            // Cutting inside the options can still leave a valid message.
            if len < OPTIONS_OFFSET {
                assert_eq!(r, None, "truncated to {len}");
            }
        }
        // Deterministic pseudo-random bytes (xorshift), whole packets and
        // valid headers followed by random options.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            let len = (next() % 600) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 && bytes.len() > OPTIONS_OFFSET {
                bytes[..OPTIONS_OFFSET].copy_from_slice(&good[..OPTIONS_OFFSET]);
                if round % 4 == 0 {
                    // Mostly-kept option codes, random lengths and values.
                    for i in (OPTIONS_OFFSET..bytes.len()).step_by(3) {
                        bytes[i] = KEPT_OPTIONS[(next() % 6) as usize];
                    }
                }
            }
            let _ = handle(&l, &bytes);
        }
    }

    #[tokio::test]
    async fn serve_answers_over_loopback() {
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let client_port = client.local_addr().unwrap().port();
        let l = Lease {
            ip: Ipv4Addr::LOCALHOST,
            ..lease()
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(serve_to_port(
            server,
            l,
            move |ev| {
                let _ = tx.send(ev);
            },
            client_port,
        ));

        // Garbage first: ignored, the server keeps going.
        client.send_to(b"garbage", server_addr).await.unwrap();
        // A renewing REQUEST: the ACK is unicast to ciaddr.
        let msg = client_msg(MessageType::Request, &MAC, Ipv4Addr::LOCALHOST);
        client.send_to(&encode(&msg), server_addr).await.unwrap();

        let mut buf = [0u8; 1500];
        let (n, _) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.recv_from(&mut buf),
        )
        .await
        .expect("reply in time")
        .unwrap();
        let ack = decode(&buf[..n]);
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr(), Ipv4Addr::LOCALHOST);
        let ev = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert_eq!(
            ev,
            Some(DhcpEvent::Acked {
                ip: Ipv4Addr::LOCALHOST
            })
        );
        task.abort();
    }

    #[test]
    fn dhcp_socket_rejects_bad_names() {
        for bad in ["", "a/b", "0123456789abcdef"] {
            let err = crate::net::setup::dhcp_socket(bad).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    /// In a fresh network namespace (skipped without the privilege to make
    /// one): dhcp_socket on lo, then serve() answers a DISCOVER with a
    /// broadcast OFFER to port 68.
    #[test]
    fn dhcp_socket_and_serve_in_private_netns() {
        let outcome = std::thread::spawn(|| {
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                return Err(format!("cannot unshare the network namespace: {e}"));
            }
            // Nothing else is in this namespace: any port is ours.
            assert!(crate::net::setup::dhcp_socket("nosuchif0").is_err());
            let std_sock = crate::net::setup::dhcp_socket("lo").unwrap();
            assert_eq!(
                std_sock.local_addr().unwrap(),
                "0.0.0.0:67".parse().unwrap()
            );
            assert!(std_sock.broadcast().unwrap());
            let dev =
                nix::sys::socket::getsockopt(&std_sock, nix::sys::socket::sockopt::BindToDevice)
                    .unwrap();
            assert_eq!(dev, "lo");

            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status();
            if !matches!(up, Ok(s) if s.success()) {
                return Err("cannot bring lo up (no `ip`?)".to_owned());
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let server = tokio::net::UdpSocket::from_std(std_sock).unwrap();
                let client = tokio::net::UdpSocket::bind("0.0.0.0:68").await.unwrap();
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let l = Lease {
                    ip: Ipv4Addr::new(127, 0, 0, 15),
                    server: Ipv4Addr::LOCALHOST,
                    ..lease()
                };
                let task = tokio::spawn(serve(server, l, move |ev| {
                    let _ = tx.send(ev);
                }));
                client.send_to(&discover(), "127.0.0.1:67").await.unwrap();
                let mut buf = [0u8; 1500];
                let got = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    client.recv_from(&mut buf),
                )
                .await;
                task.abort();
                let (n, _) = match got {
                    Ok(r) => r.unwrap(),
                    Err(_) => return Err("no broadcast reply over lo".to_owned()),
                };
                let offer = decode(&buf[..n]);
                assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
                assert_eq!(offer.yiaddr(), Ipv4Addr::new(127, 0, 0, 15));
                assert_eq!(
                    rx.recv().await,
                    Some(DhcpEvent::Offered {
                        ip: Ipv4Addr::new(127, 0, 0, 15)
                    })
                );
                Ok(())
            })
        })
        .join()
        .unwrap();
        if let Err(why) = outcome {
            eprintln!("skipping: {why}");
        }
    }
}
