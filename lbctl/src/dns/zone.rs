//! The zone `l4lb.thisdcos.directory` as the agent serves it: each named VIP's address, and what
//! a query for any name gets from it (answer, NXDOMAIN, NODATA, REFUSED, or "forward"). Pure: the
//! server (`server`) and `lbctl resolve` both answer through [`answer`], so the status socket
//! says exactly what the DNS server would.
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        DNSClass, LowerName, Name, RData, Record, RecordType,
        rdata::{A, AAAA, NS, SOA},
    },
};
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

/// The zone the agent is authoritative for.
pub const ZONE: &str = "l4lb.thisdcos.directory";

/// The largest UDP payload the server offers to EDNS clients (RFC 9715's safe size).
pub const EDNS_PAYLOAD: u16 = 1232;

/// A snapshot of the zone: replaced whole after each apply (see `super::ZoneHandle`).
#[derive(Clone, Debug)]
pub struct Zone {
    apex: Name,
    ns: Name,
    ttl: u32,
    serial: u32,
    names: HashMap<LowerName, Vec<IpAddr>>,
    /// Names that exist only because names below them do (`marathon.l4lb.thisdcos.directory`):
    /// NODATA, not NXDOMAIN (RFC 8020).
    parents: HashSet<LowerName>,
    ns_addrs: Vec<IpAddr>,
}

/// What a query gets.
#[derive(Debug)]
pub enum Reply {
    /// This response.
    Answer(Message),
    /// A name outside the zone, to be sent to the upstream servers.
    Forward,
    /// Nothing (a response sent to us: answering it could loop or reflect).
    Drop,
}

impl Zone {
    /// An empty zone whose records live `ttl` seconds; `ns_addrs` are the server's own
    /// addresses, given for `ns.l4lb.thisdcos.directory`.
    pub fn new(ttl: u32, ns_addrs: Vec<IpAddr>) -> Zone {
        let apex = fqdn(ZONE).unwrap_or_else(|_| Name::root());
        let ns = Name::from_labels(["ns"])
            .and_then(|n| n.append_domain(&apex))
            .unwrap_or_else(|_| apex.clone());
        Zone {
            apex,
            ns,
            ttl,
            serial: 1,
            names: HashMap::new(),
            parents: HashSet::new(),
            ns_addrs,
        }
    }

    /// The same zone holding exactly `names` (DNS name, address), with serial `serial`. Names
    /// outside the zone or not valid DNS names are left out and returned.
    pub fn with_names<'a>(
        &self,
        names: impl IntoIterator<Item = (&'a str, IpAddr)>,
        serial: u32,
    ) -> (Zone, Vec<String>) {
        let mut zone = Zone {
            serial,
            names: HashMap::new(),
            parents: HashSet::new(),
            ..self.clone()
        };
        let mut bad = Vec::new();
        for (text, ip) in names {
            let name = match fqdn(text) {
                Ok(n) if self.apex.zone_of(&n) && n.num_labels() > self.apex.num_labels() => n,
                _ => {
                    bad.push(text.to_string());
                    continue;
                }
            };
            let mut up = name.base_name();
            while up.num_labels() > zone.apex.num_labels() {
                zone.parents.insert(LowerName::new(&up));
                up = up.base_name();
            }
            let addrs = zone.names.entry(LowerName::new(&name)).or_default();
            if !addrs.contains(&ip) {
                addrs.push(ip);
            }
        }
        (zone, bad)
    }

    /// The zone's serial.
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// How many names the zone holds.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when the zone holds no name.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    fn soa(&self) -> Record {
        let rname = Name::from_labels(["hostmaster"])
            .and_then(|n| n.append_domain(&self.apex))
            .unwrap_or_else(|_| self.apex.clone());
        let soa = SOA::new(
            self.ns.clone(),
            rname,
            self.serial,
            60,
            30,
            86_400,
            self.ttl,
        );
        Record::from_rdata(self.apex.clone(), self.ttl, RData::SOA(soa))
    }

    fn addr_records(&self, name: &Name, addrs: &[IpAddr], qtype: RecordType) -> Vec<Record> {
        addrs
            .iter()
            .filter_map(|ip| match (ip, qtype) {
                (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => Some(RData::A(A(*v4))),
                (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => {
                    Some(RData::AAAA(AAAA(*v6)))
                }
                _ => None,
            })
            .map(|rd| Record::from_rdata(name.clone(), self.ttl, rd))
            .collect()
    }
}

/// What `zone` answers to `request`; `forwarding` says whether names outside the zone go to an
/// upstream server (else they are REFUSED).
pub fn answer(zone: &Zone, request: &Message, forwarding: bool) -> Reply {
    let meta = &request.metadata;
    if meta.message_type == MessageType::Response {
        return Reply::Drop;
    }
    let mut resp = Message::response(meta.id, meta.op_code);
    resp.metadata.recursion_desired = meta.recursion_desired;
    resp.metadata.recursion_available = forwarding;
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        resp.set_edns(edns);
    }
    let fail = |mut resp: Message, code| {
        resp.metadata.response_code = code;
        Reply::Answer(resp)
    };
    if meta.op_code != OpCode::Query {
        return fail(resp, ResponseCode::NotImp);
    }
    let [query] = request.queries.as_slice() else {
        return fail(resp, ResponseCode::FormErr);
    };
    resp.add_query(query.clone());
    let qname = query.name();
    if !zone.apex.zone_of(qname) {
        return if forwarding {
            Reply::Forward
        } else {
            fail(resp, ResponseCode::Refused)
        };
    }
    if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
        return fail(resp, ResponseCode::Refused);
    }
    resp.metadata.authoritative = true;
    let qtype = query.query_type();
    let lower = LowerName::new(qname);
    let answers: Vec<Record> = if lower == LowerName::new(&zone.apex) {
        let mut out = Vec::new();
        if matches!(qtype, RecordType::SOA | RecordType::ANY) {
            out.push(zone.soa());
        }
        if matches!(qtype, RecordType::NS | RecordType::ANY) {
            let ns = RData::NS(NS(zone.ns.clone()));
            out.push(Record::from_rdata(zone.apex.clone(), zone.ttl, ns));
        }
        out
    } else if lower == LowerName::new(&zone.ns) && !zone.ns_addrs.is_empty() {
        zone.addr_records(qname, &zone.ns_addrs, qtype)
    } else if let Some(addrs) = zone.names.get(&lower) {
        zone.addr_records(qname, addrs, qtype)
    } else if zone.parents.contains(&lower) {
        Vec::new()
    } else {
        resp.add_authority(zone.soa());
        return fail(resp, ResponseCode::NXDomain);
    };
    if answers.is_empty() {
        // NODATA: the name exists, without a record of this type.
        resp.add_authority(zone.soa());
    }
    resp.add_answers(answers);
    Reply::Answer(resp)
}

/// `message` encoded to at most `limit` bytes: when the whole answer does not fit, the
/// question alone with the truncation bit set (the client retries over TCP). `None` when even
/// that cannot be encoded.
pub fn encode(message: &Message, limit: usize) -> Option<Vec<u8>> {
    match message.to_vec() {
        Ok(bytes) if bytes.len() <= limit => return Some(bytes),
        _ => {}
    }
    let mut cut = message.truncate();
    cut.metadata.truncation = true;
    cut.to_vec().ok().filter(|b| b.len() <= limit)
}

/// The most a UDP answer to `request` may take: 512 bytes, or what its EDNS record offers (up
/// to [`EDNS_PAYLOAD`]).
pub fn udp_limit(request: &Message) -> usize {
    match &request.edns {
        Some(e) => e.max_payload().clamp(512, EDNS_PAYLOAD) as usize,
        None => 512,
    }
}

/// A FORMERR for a message whose header could be read but not the rest: `None` when not even
/// the header could (fewer than 12 bytes), or when it is a response.
pub fn formerr(raw: &[u8]) -> Option<Vec<u8>> {
    use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
    let header = hickory_proto::op::Header::read(&mut BinDecoder::new(raw)).ok()?;
    if header.metadata.message_type == MessageType::Response {
        return None;
    }
    Message::error_msg(
        header.metadata.id,
        header.metadata.op_code,
        ResponseCode::FormErr,
    )
    .to_vec()
    .ok()
}

/// `text` as a fully qualified name.
pub fn fqdn(text: &str) -> Result<Name, hickory_proto::ProtoError> {
    let mut name = Name::from_ascii(text)?;
    name.set_fqdn(true);
    Ok(name)
}

/// A query for `name` of `qtype` (`lbctl resolve`, tests).
pub fn query(name: Name, qtype: RecordType) -> Message {
    let mut m = Message::new(0, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name, qtype));
    m
}

#[cfg(test)]
#[path = "zone_tests.rs"]
mod tests;
