//! An in-memory [`Publisher`] for tests: a scripted broker that acks, nacks, returns, closes the
//! channel, drops the connection or refuses to connect, as the test says.
//!
//! No I/O. The test keeps a [`MemoryBroker`] handle (cheap clone) to script it and to read what
//! was delivered; the forwarder owns the [`MemoryPublisher`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::publisher::{
    BrokerEvent, Confirm, CopyId, Failure, Phase, Publisher, Returned, Settled, Unpublishable,
};
use super::route::Target;
use crate::spool::Record;

/// What the scripted broker does with one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    Ack,
    Nack,
    /// Unroutable: acked, and returned. The return rides on the confirm settled just before
    /// (if any is still queued), as lapin may hand it to any confirm.
    Return,
    /// The broker closes the channel with `code`/`text` (e.g. 406 for a body too large, 404
    /// for an exchange deleted): this publish and every unsettled one fail.
    CloseChannel(u16, String),
    /// The connection drops: every unsettled publish is forgotten.
    Drop,
}

/// One publish as the broker saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub copy: CopyId,
    pub exchange: String,
    pub routing_key: String,
    pub body: Bytes,
    /// Which successful connect (1, 2, ...) it was published on.
    pub connection: usize,
}

type Rule = Box<dyn FnMut(&Published) -> Script + Send>;

struct State {
    rule: Rule,
    /// Settle each publish at once (else only on [`MemoryBroker::settle_all`]).
    auto_settle: bool,
    /// Every connect fails with this while it is set.
    refuse_connect: Option<Failure>,
    /// Connects to these nodes fail with the failure given.
    refuse_node: Vec<(String, Failure)>,
    /// The node of each successful connect, in order.
    connected_to: Vec<String>,
    /// The largest "content header" (sum of the target's recipient lengths) that fits.
    max_header: Option<usize>,
    connected: bool,
    channel_open: bool,
    blocked: bool,
    unsettled: Vec<(Published, Script)>,
    events: VecDeque<BrokerEvent>,
    /// Acked and not returned, in order.
    delivered: Vec<Published>,
    /// Every publish, in order.
    published: Vec<Published>,
    connects: usize,
    connect_attempts: usize,
    reopened_channels: usize,
    barriers: usize,
}

/// The test's handle on the scripted broker.
#[derive(Clone)]
pub struct MemoryBroker {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

/// The forwarder's side of the scripted broker.
pub struct MemoryPublisher {
    broker: MemoryBroker,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        MemoryBroker::new()
    }
}

impl MemoryBroker {
    /// A broker that accepts connections and acks every publish.
    pub fn new() -> MemoryBroker {
        MemoryBroker {
            state: Arc::new(Mutex::new(State {
                rule: Box::new(|_| Script::Ack),
                auto_settle: true,
                refuse_connect: None,
                refuse_node: Vec::new(),
                connected_to: Vec::new(),
                max_header: None,
                connected: false,
                channel_open: false,
                blocked: false,
                unsettled: Vec::new(),
                events: VecDeque::new(),
                delivered: Vec::new(),
                published: Vec::new(),
                connects: 0,
                connect_attempts: 0,
                reopened_channels: 0,
                barriers: 0,
            })),
            changed: Arc::new(Notify::new()),
        }
    }

    /// The publisher to give to the forwarder.
    pub fn publisher(&self) -> MemoryPublisher {
        MemoryPublisher {
            broker: self.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn changed(&self) {
        self.changed.notify_waiters();
    }

    /// Decides what happens to each publish from now on.
    pub fn set_rule(&self, rule: impl FnMut(&Published) -> Script + Send + 'static) {
        self.lock().rule = Box::new(rule);
    }

    /// `false`: publishes stay unsettled until [`MemoryBroker::settle_all`].
    pub fn set_auto_settle(&self, on: bool) {
        self.lock().auto_settle = on;
    }

    /// Every connect fails with `failure` until this is called with `None`.
    pub fn refuse_connect(&self, failure: Option<Failure>) {
        self.lock().refuse_connect = failure;
        self.changed();
    }

    /// Connects to `node` fail with `failure` (`None`: accepted again).
    pub fn refuse_node(&self, node: &str, failure: Option<Failure>) {
        let mut s = self.lock();
        s.refuse_node.retain(|(n, _)| n != node);
        if let Some(f) = failure {
            s.refuse_node.push((node.to_owned(), f));
        }
        drop(s);
        self.changed();
    }

    /// The node of each successful connect so far, in order.
    pub fn connected_to(&self) -> Vec<String> {
        self.lock().connected_to.clone()
    }

    /// A target whose recipients add up to more bytes than this cannot be published.
    pub fn set_max_header(&self, bytes: Option<usize>) {
        self.lock().max_header = bytes;
    }

    /// Sends `connection.blocked` / `connection.unblocked`.
    pub fn set_blocked(&self, blocked: bool) {
        let mut s = self.lock();
        s.blocked = blocked;
        s.events.push_back(if blocked {
            BrokerEvent::Blocked("low on disk".to_owned())
        } else {
            BrokerEvent::Unblocked
        });
        drop(s);
        self.changed();
    }

    /// Drops the connection now.
    pub fn drop_connection(&self) {
        let mut s = self.lock();
        if s.connected {
            drop_connection(&mut s);
        }
        drop(s);
        self.changed();
    }

    /// Applies the rule to every unsettled publish, in order.
    pub fn settle_all(&self) {
        self.settle_first(usize::MAX);
    }

    /// Applies the rule to the first `n` unsettled publishes, in order.
    pub fn settle_first(&self, n: usize) {
        let mut s = self.lock();
        let n = n.min(s.unsettled.len());
        let unsettled: Vec<_> = s.unsettled.drain(..n).collect();
        for (p, script) in unsettled {
            if !s.channel_open {
                break;
            }
            settle_one(&mut s, p, script);
        }
        drop(s);
        self.changed();
    }

    pub fn delivered(&self) -> Vec<Published> {
        self.lock().delivered.clone()
    }

    pub fn published(&self) -> Vec<Published> {
        self.lock().published.clone()
    }

    pub fn unsettled(&self) -> usize {
        self.lock().unsettled.len()
    }

    /// Successful connects so far.
    pub fn connects(&self) -> usize {
        self.lock().connects
    }

    /// Connects tried so far (refused ones included).
    pub fn connect_attempts(&self) -> usize {
        self.lock().connect_attempts
    }

    pub fn reopened_channels(&self) -> usize {
        self.lock().reopened_channels
    }

    pub fn barriers(&self) -> usize {
        self.lock().barriers
    }

    /// Waits until `check` holds (re-checked on every change of the broker), at most `limit`.
    pub async fn wait_until(
        &self,
        limit: Duration,
        mut check: impl FnMut(&MemoryBroker) -> bool,
    ) -> bool {
        let until = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if check(self) {
                return true;
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                return check(self);
            }
        }
    }
}

fn drop_connection(s: &mut State) {
    s.connected = false;
    s.channel_open = false;
    s.unsettled.clear();
    s.events.retain(|e| !matches!(e, BrokerEvent::Settled(_)));
    s.events.push_back(BrokerEvent::Lost(Failure::Connection(
        "connection dropped by the test".to_owned(),
    )));
}

fn settle_one(s: &mut State, p: Published, script: Script) {
    let copy = p.copy;
    match script {
        Script::Ack => {
            s.delivered.push(p);
            s.events.push_back(BrokerEvent::Settled(Settled {
                copy,
                confirm: Confirm::Ack,
                returned: None,
            }));
        }
        Script::Nack => s.events.push_back(BrokerEvent::Settled(Settled {
            copy,
            confirm: Confirm::Nack,
            returned: None,
        })),
        Script::Return => {
            let ret = Returned {
                copy: Some(copy),
                text: format!(
                    "returned by broker: 312 NO_ROUTE (exchange {:?}, routing key {:?})",
                    p.exchange, p.routing_key
                ),
            };
            let carrier = s.events.iter_mut().rev().find_map(|e| match e {
                BrokerEvent::Settled(prev) if prev.returned.is_none() => Some(prev),
                _ => None,
            });
            let own = match carrier {
                Some(prev) => {
                    prev.returned = Some(ret);
                    None
                }
                None => Some(ret),
            };
            s.events.push_back(BrokerEvent::Settled(Settled {
                copy,
                confirm: Confirm::Ack,
                returned: own,
            }));
        }
        Script::CloseChannel(code, text) => {
            let failure = Failure::from_broker(code, &text, false, Phase::Publish);
            s.channel_open = false;
            let rest = std::mem::take(&mut s.unsettled);
            for c in std::iter::once(copy).chain(rest.into_iter().map(|(p, _)| p.copy)) {
                s.events.push_back(BrokerEvent::Settled(Settled {
                    copy: c,
                    confirm: Confirm::Failed(failure.clone()),
                    returned: None,
                }));
            }
        }
        Script::Drop => drop_connection(s),
    }
}

impl Publisher for MemoryPublisher {
    type Prepared = ();

    async fn connect(&mut self, node: &str) -> Result<(), Failure> {
        let b = &self.broker;
        let mut s = b.lock();
        s.connect_attempts += 1;
        s.connected = false;
        s.channel_open = false;
        s.unsettled.clear();
        s.events.clear();
        let refused = s.refuse_connect.clone().or_else(|| {
            s.refuse_node
                .iter()
                .find(|(n, _)| n == node)
                .map(|(_, f)| f.clone())
        });
        let result = match refused {
            Some(f) => Err(f),
            None => {
                s.connected = true;
                s.channel_open = true;
                s.connects += 1;
                s.connected_to.push(node.to_owned());
                Ok(())
            }
        };
        drop(s);
        b.changed();
        result
    }

    async fn disconnect(&mut self) {
        let mut s = self.broker.lock();
        s.connected = false;
        s.channel_open = false;
        s.unsettled.clear();
        s.events.clear();
    }

    async fn reopen_channel(&mut self) -> Result<(), Failure> {
        let mut s = self.broker.lock();
        if !s.connected {
            return Err(Failure::Connection("not connected".to_owned()));
        }
        s.unsettled.clear();
        s.events.retain(|e| !matches!(e, BrokerEvent::Settled(_)));
        s.channel_open = true;
        s.reopened_channels += 1;
        Ok(())
    }

    fn connected(&self) -> bool {
        self.broker.lock().connected
    }

    fn blocked(&self) -> bool {
        self.broker.lock().blocked
    }

    fn prepare(
        &self,
        _record: &Record,
        _index: usize,
        target: &Target,
    ) -> Result<(), Unpublishable> {
        let header: usize = target.recipients.iter().map(String::len).sum();
        match self.broker.lock().max_header {
            Some(max) if header > max => Err(Unpublishable::HeaderTooLarge(format!(
                "{header} bytes, more than {max}"
            ))),
            _ => Ok(()),
        }
    }

    async fn publish(
        &mut self,
        copy: CopyId,
        target: &Target,
        _prepared: (),
        body: Bytes,
    ) -> Result<(), Failure> {
        let b = &self.broker;
        let mut s = b.lock();
        if !s.connected {
            return Err(Failure::Connection("not connected".to_owned()));
        }
        if !s.channel_open {
            return Err(Failure::Connection("invalid channel state".to_owned()));
        }
        let p = Published {
            copy,
            exchange: target.exchange.clone(),
            routing_key: target.routing_key.clone(),
            body,
            connection: s.connects,
        };
        s.published.push(p.clone());
        let script = (s.rule)(&p);
        if s.auto_settle {
            settle_one(&mut s, p, script);
        } else {
            s.unsettled.push((p, script));
        }
        drop(s);
        b.changed();
        Ok(())
    }

    fn unsettled(&self) -> usize {
        let s = self.broker.lock();
        s.unsettled.len()
            + s.events
                .iter()
                .filter(|e| matches!(e, BrokerEvent::Settled(_)))
                .count()
    }

    async fn next_event(&mut self) -> BrokerEvent {
        loop {
            let changed = self.broker.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(e) = self.broker.lock().events.pop_front() {
                return e;
            }
            changed.await;
        }
    }

    fn ready_settled(&mut self) -> Option<Settled> {
        let mut s = self.broker.lock();
        match s.events.front() {
            Some(BrokerEvent::Settled(_)) => match s.events.pop_front() {
                Some(BrokerEvent::Settled(x)) => Some(x),
                _ => None,
            },
            _ => None,
        }
    }

    async fn barrier(&mut self) -> Result<(), Failure> {
        let mut s = self.broker.lock();
        s.barriers += 1;
        if s.connected && s.channel_open {
            Ok(())
        } else {
            Err(Failure::Connection("not connected".to_owned()))
        }
    }
}
