//! Traffic control: every frame that arrives on one device leaves by the
//! other (an ingress qdisc and a u32 filter matching everything, with a
//! mirred egress redirect, on each side), the way Kata joins a CNI veth and
//! a VM's tap. (u32 rather than matchall: some host kernels lack
//! cls_matchall.)

use std::io;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute, TcFilterU32Option, TcHandle, TcMessage,
    TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::RouteNetlinkMessage;

use super::netlink::Netlink;

/// `ffff:`, the handle `tc` gives an ingress qdisc.
const INGRESS_HANDLE: TcHandle = TcHandle { major: 0xffff, minor: 0 };
/// Every protocol (ETH_P_ALL), in the network byte order tc wants.
#[allow(clippy::cast_possible_truncation)] // ETH_P_ALL is 0x0003
const ALL_PROTOCOLS: u16 = (libc::ETH_P_ALL as u16).to_be();
const FILTER_PRIORITY: u32 = 1;

fn ingress_qdisc(ifindex: u32) -> TcMessage {
    let mut msg = TcMessage::default();
    msg.header.index = i32::try_from(ifindex).unwrap_or(i32::MAX);
    msg.header.parent = TcHandle::INGRESS;
    msg.header.handle = INGRESS_HANDLE;
    msg.attributes.push(TcAttribute::Kind("ingress".into()));
    msg
}

/// Adds an ingress qdisc to `from` and a filter on it that redirects every
/// frame to the egress of `to`.
pub(super) fn redirect(nl: &mut Netlink, from: u32, to: u32) -> io::Result<()> {
    nl.call(RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(from)), NLM_F_CREATE | NLM_F_EXCL)?;

    let mut mirred = TcMirror::default();
    mirred.generic.action = TcActionType::Stolen;
    mirred.eaction = TcMirrorActionType::EgressRedir;
    mirred.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind("mirred".into()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(mirred))]),
    ];

    let mut filter = TcMessage::default();
    filter.header.index = i32::try_from(from).unwrap_or(i32::MAX);
    filter.header.parent = INGRESS_HANDLE;
    filter.header.info = (FILTER_PRIORITY << 16) | u32::from(ALL_PROTOCOLS);
    // One key with a zero mask: every frame matches.
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 1;
    selector.keys = vec![TcU32Key::default()];
    filter.attributes = vec![
        TcAttribute::Kind("u32".into()),
        TcAttribute::Options(vec![
            TcOption::U32(TcFilterU32Option::Selector(selector)),
            TcOption::U32(TcFilterU32Option::Action(vec![action])),
        ]),
    ];
    nl.call(RouteNetlinkMessage::NewTrafficFilter(filter), NLM_F_CREATE | NLM_F_EXCL)
}

/// Removes the ingress qdisc of `ifindex` and with it the redirect filter.
/// A device without one is fine.
pub(super) fn remove_redirect(nl: &mut Netlink, ifindex: u32) -> io::Result<()> {
    match nl.call(RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(ifindex)), 0) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)) => Ok(()),
        other => other,
    }
}
