//! Task events to containerd (`/tasks/create`, `/tasks/exit`, ...), sent in
//! order from one thread so that a slow or restarting containerd never
//! holds a Task call.

use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;
use std::time::Duration;

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::shim::event::Envelope;
use containerd_shim::protos::shim::events::ForwardRequest;
use containerd_shim::protos::shim_sync::{Client, EventsClient};

pub use containerd_shim::protos::topics;

/// Where the Task service sends its events.
pub trait EventSink: Send + Sync {
    fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>);
}

/// An event ready to go: containerd's envelope minus the namespace.
#[derive(Debug, Clone)]
pub struct Event {
    pub topic: &'static str,
    pub timestamp: Timestamp,
    pub event: Any,
}

fn pack(topic: &'static str, event: &dyn MessageDyn) -> Option<Event> {
    let mut value = Vec::new();
    if let Err(e) = event.write_to_vec_dyn(&mut value) {
        tracing::warn!(topic, error = %e, "cannot encode an event");
        return None;
    }
    // The bare message name is the type URL containerd's typeurl expects
    // ("containerd.events.TaskExit").
    let event = Any { type_url: event.descriptor_dyn().full_name().to_string(), value, ..Default::default() };
    Some(Event { topic, timestamp: now(), event })
}

/// Now as a protobuf timestamp.
pub fn now() -> Timestamp {
    timestamp(std::time::SystemTime::now())
}

/// A time as a protobuf timestamp.
pub fn timestamp(t: std::time::SystemTime) -> Timestamp {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

/// Publishes to containerd's ttrpc socket (`TTRPC_ADDRESS`), reconnecting
/// when the connection breaks (containerd restarted).
#[derive(Debug)]
pub struct RemoteEvents {
    tx: Mutex<Sender<Event>>,
}

/// How often a failed forward is retried (containerd restarting) before
/// the event is dropped.
const FORWARD_ATTEMPTS: u32 = 10;

impl RemoteEvents {
    pub fn new(address: String, namespace: String) -> Self {
        let (tx, rx) = channel::<Event>();
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                let mut client: Option<EventsClient> = None;
                for ev in rx {
                    let mut req = ForwardRequest::new();
                    req.envelope = Some(Envelope {
                        timestamp: Some(ev.timestamp.clone()).into(),
                        namespace: namespace.clone(),
                        topic: ev.topic.to_string(),
                        event: Some(ev.event.clone()).into(),
                        ..Default::default()
                    })
                    .into();
                    let mut attempt = 0;
                    loop {
                        attempt += 1;
                        if client.is_none() {
                            client = connect(&address).ok();
                        }
                        let result = match client.as_ref() {
                            Some(c) => c.forward(ttrpc::context::with_timeout(10_000_000_000), &req).map(|_| ()),
                            None => Err(ttrpc::Error::Others(format!("cannot connect to {address}"))),
                        };
                        match result {
                            Ok(()) => break,
                            Err(e) if attempt >= FORWARD_ATTEMPTS => {
                                tracing::warn!(topic = ev.topic, error = %e, "event dropped");
                                break;
                            }
                            Err(e) => {
                                tracing::debug!(topic = ev.topic, error = %e, "forwarding an event; reconnecting");
                                client = None;
                                std::thread::sleep(Duration::from_millis(500));
                            }
                        }
                    }
                }
            })
            .ok();
        Self { tx: Mutex::new(tx) }
    }
}

fn connect(address: &str) -> ttrpc::Result<EventsClient> {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    let stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| ttrpc::Error::Others(format!("{path}: {e}")))?;
    let client = Client::new(std::os::fd::IntoRawFd::into_raw_fd(stream))?;
    Ok(EventsClient::new(client))
}

impl EventSink for RemoteEvents {
    fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        tracing::debug!(topic, event = %event, "publish");
        if let Some(ev) = pack(topic, event.as_ref()) {
            if let Ok(tx) = self.tx.lock() {
                let _ = tx.send(ev);
            }
        }
    }
}

/// Keeps events in memory (tests, and a shim without containerd).
#[derive(Debug, Default)]
pub struct EventLog {
    events: Mutex<Vec<Event>>,
}

impl EventLog {
    /// The topics published so far, in order.
    pub fn topics(&self) -> Vec<&'static str> {
        self.events.lock().map(|e| e.iter().map(|e| e.topic).collect()).unwrap_or_default()
    }

    /// The events published so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl EventSink for EventLog {
    fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        if let (Some(ev), Ok(mut events)) = (pack(topic, event.as_ref()), self.events.lock()) {
            events.push(ev);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::events::task::TaskExit;
    use containerd_shim::protos::protobuf::Message;

    #[test]
    fn events_carry_the_bare_type_name() {
        let log = EventLog::default();
        let exit = TaskExit { container_id: "c1".into(), exit_status: 3, ..Default::default() };
        log.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(exit.clone()));
        let ev = &log.events()[0];
        assert_eq!(ev.topic, "/tasks/exit");
        assert_eq!(ev.event.type_url, "containerd.events.TaskExit");
        assert_eq!(TaskExit::parse_from_bytes(&ev.event.value).expect("decode"), exit);
    }
}
