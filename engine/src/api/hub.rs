//! What an embedder writes: a [`Hub`] with typed method dispatch over [`Call`]s, the
//! streams it sends ([`ItemStream`]) and the streams it is sent ([`ClientStream`]).

use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt};
use ringhub_protocol::Value;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::context::HubContext;
use crate::api::types::{Caller, HubError, LocalBoxFuture};
use crate::session::calls::{Upload, UploadReceiver};

/// One invocation of a hub method.
pub struct Call<'a> {
    /// The connection that invoked the method, with its hub, user and claims.
    pub caller: &'a Caller,
    /// The method name as the client sent it.
    pub method: &'a str,
    /// The arguments in the client's order, undecoded: read them with [`Call::arg`],
    /// [`Call::decode_arg`] or [`Call::take_arg`], which name the argument on error.
    pub arguments: Vec<Value>,
    /// The node, to send, change groups and ask clients for results; its sends are
    /// charged to the caller's connection (see [`HubContext`]).
    pub context: &'a HubContext,
    /// The streams the client uploads with this invocation (its `streamIds`), in order;
    /// taken with [`Call::take_stream`].
    pub(crate) uploads: Vec<Option<UploadReceiver>>,
    /// The invocation's id (`None`: a `send`) and the client's protocol, for what goes
    /// upstream as the client sent it.
    pub(crate) invocation_id: Option<&'a str>,
    pub(crate) protocol: ringhub_protocol::HubProtocol,
}

/// The items of a server-to-client stream, encoded (see [`items`]): each becomes a
/// StreamItem message, and an error ends the stream with it.
pub type ItemStream<'a> = Pin<Box<dyn Stream<Item = Result<Value, HubError>> + 'a>>;

/// A stream of any serde items, as a hub method's [`ItemStream`].
pub fn items<'a, T: Serialize + 'a>(stream: impl Stream<Item = T> + 'a) -> ItemStream<'a> {
    Box::pin(stream.map(|item| Call::encode_result(&item)))
}

/// A stream of results of serde items, as a hub method's [`ItemStream`]: the first error
/// ends the stream, and the client's `stream()` fails with it.
pub fn fallible_items<'a, T: Serialize + 'a, E: Into<HubError> + 'a>(
    stream: impl Stream<Item = Result<T, E>> + 'a,
) -> ItemStream<'a> {
    Box::pin(stream.map(|item| Call::encode_result(&item.map_err(Into::into)?)))
}

/// A stream the client uploads (a `Subject` passed to `send`/`invoke` in the JS
/// client): its items decoded as `T`. The client sends at most 10 items ahead of what
/// the method took (ASP.NET Core's `StreamBufferCapacity`): past that its connection is
/// not read until the method takes more. The stream ends when the client completes it;
/// a client that completes it with an error, or whose connection ends first, yields
/// that as its last item, an `Err`.
pub struct ClientStream<T> {
    receiver: UploadReceiver,
    method: String,
    ended: bool,
    item: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> ClientStream<T> {
    /// The next item (`None` once the client completed the stream).
    pub async fn next(&mut self) -> Option<Result<T, HubError>> {
        StreamExt::next(self).await
    }
}

impl<T: DeserializeOwned> Stream for ClientStream<T> {
    type Item = Result<T, HubError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let upload = match self.receiver.poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(upload) => upload,
        };
        let item = match upload {
            Some(Upload::Item(value)) => value.decode().map_err(|e| HubError::InvalidArguments {
                method: self.method.clone(),
                detail: format!("stream item: {e}"),
            }),
            Some(Upload::Completed) => {
                self.ended = true;
                return Poll::Ready(None);
            }
            Some(Upload::Failed(error)) => {
                self.ended = true;
                Err(HubError::Exception(error))
            }
            None => {
                self.ended = true;
                Err(HubError::exception(
                    "The connection ended before the client completed its stream.",
                ))
            }
        };
        Poll::Ready(Some(item))
    }
}

impl Call<'_> {
    /// Fails unless the client uploads exactly `count` streams with this invocation.
    pub fn expect_streams(&self, count: usize) -> Result<(), HubError> {
        if self.uploads.len() == count {
            Ok(())
        } else {
            Err(self.invalid_arguments(format!(
                "the client sent {} stream{}, the method takes {count}",
                self.uploads.len(),
                if self.uploads.len() == 1 { "" } else { "s" },
            )))
        }
    }

    /// Upload stream `index` (0-based, in the order of the invocation's `streamIds`),
    /// its items decoded as `T`.
    pub fn take_stream<T: DeserializeOwned>(
        &mut self,
        index: usize,
    ) -> Result<ClientStream<T>, HubError> {
        match self.uploads.get_mut(index).and_then(Option::take) {
            Some(receiver) => Ok(ClientStream {
                receiver,
                method: self.method.to_owned(),
                ended: false,
                item: PhantomData,
            }),
            None => Err(self.invalid_arguments(format!("stream {} is missing", index + 1))),
        }
    }

    /// Fails unless exactly `count` arguments were given.
    pub fn expect_arguments(&self, count: usize) -> Result<(), HubError> {
        if self.arguments.len() == count {
            Ok(())
        } else {
            Err(self.invalid_arguments(format!(
                "expected {count} argument{}, got {}",
                if count == 1 { "" } else { "s" },
                self.arguments.len()
            )))
        }
    }

    /// Argument `index` (0-based) converted to `T`, or an error naming it.
    pub fn arg<T: FromValue>(&self, index: usize) -> Result<T, HubError> {
        let value = self
            .arguments
            .get(index)
            .ok_or_else(|| self.invalid_arguments(format!("argument {} is missing", index + 1)))?;
        T::from_value(value).ok_or_else(|| {
            self.invalid_arguments(format!(
                "argument {} must be {}, got {}",
                index + 1,
                T::EXPECTED,
                value.kind()
            ))
        })
    }

    /// Decodes argument `index` as any serde type (a struct, an enum, a vector...), from
    /// JSON and MessagePack clients alike; a missing or mistyped argument is the
    /// method's Completion error, naming the argument and what was wrong.
    pub fn decode_arg<T: serde::de::DeserializeOwned>(
        &mut self,
        index: usize,
    ) -> Result<T, HubError> {
        let value = self.take_arg(index)?;
        value
            .decode()
            .map_err(|e| self.invalid_arguments(format!("argument {}: {e}", index + 1)))
    }

    /// Encodes a method's result (or any argument to send) from any serde type.
    pub fn encode_result<T: serde::Serialize + ?Sized>(result: &T) -> Result<Value, HubError> {
        Value::encode(result)
            .map_err(|e| HubError::exception(format!("the result could not be encoded: {e}")))
    }

    /// Takes argument `index` as it is (no copy), leaving null in its place.
    pub fn take_arg(&mut self, index: usize) -> Result<Value, HubError> {
        match self.arguments.get_mut(index) {
            Some(v) => Ok(std::mem::replace(v, Value::Null)),
            None => Err(self.invalid_arguments(format!("argument {} is missing", index + 1))),
        }
    }

    /// The error for arguments this method cannot take; `detail` says what was wrong.
    pub fn invalid_arguments(&self, detail: String) -> HubError {
        HubError::InvalidArguments {
            method: self.method.to_owned(),
            detail,
        }
    }
}

/// Typed argument conversion.
pub trait FromValue: Sized {
    /// What the argument must be, for error messages ("a string").
    const EXPECTED: &'static str;
    /// The value as `Self`; `None` when it is of another kind, and [`Call::arg`] then
    /// answers an error naming the argument and [`FromValue::EXPECTED`].
    fn from_value(value: &Value) -> Option<Self>;
}

impl FromValue for String {
    const EXPECTED: &'static str = "a string";
    fn from_value(value: &Value) -> Option<Self> {
        value.as_str().map(str::to_owned)
    }
}

impl FromValue for i64 {
    const EXPECTED: &'static str = "an integer";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Int(n) => Some(*n),
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(*f as i64),
            _ => None,
        }
    }
}

impl FromValue for f64 {
    const EXPECTED: &'static str = "a number";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Int(n) => Some(*n as f64),
            Value::UInt(n) => Some(*n as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }
}

impl FromValue for bool {
    const EXPECTED: &'static str = "a boolean";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

impl FromValue for Value {
    const EXPECTED: &'static str = "any value";
    fn from_value(value: &Value) -> Option<Self> {
        Some(value.clone())
    }
}

impl<T: FromValue> FromValue for Vec<T> {
    const EXPECTED: &'static str = "an array";
    fn from_value(value: &Value) -> Option<Self> {
        value.as_array()?.iter().map(T::from_value).collect()
    }
}

/// A hub: the methods clients invoke. One instance runs on each shard (it need not be
/// `Send`); the server makes them with the factory given to the builder.
pub trait Hub: 'static {
    /// Dispatches one invocation; `Ok(value)` becomes the Completion result (`null`
    /// for methods without a result).
    fn invoke<'a>(&'a self, call: Call<'a>) -> LocalBoxFuture<'a, Result<Value, HubError>>;

    /// Dispatches one streaming invocation (the client's `stream()`): the stream's items
    /// are sent as StreamItem messages, then a Completion; the client's cancel drops the
    /// stream, and a slow receiver slows it (it is polled only while the caller's queue
    /// has room). The default has no streaming methods.
    fn stream<'a>(
        &'a self,
        call: Call<'a>,
    ) -> LocalBoxFuture<'a, Result<ItemStream<'a>, HubError>> {
        let method = call.method.to_owned();
        Box::pin(async move { Err(HubError::NotStreamingMethod(method)) })
    }

    /// After the handshake, before the connection's first message is read.
    fn on_connected<'a>(
        &'a self,
        caller: &'a Caller,
        context: &'a HubContext,
    ) -> LocalBoxFuture<'a, ()> {
        let _ = (caller, context);
        Box::pin(async {})
    }

    /// After the connection left all its groups.
    fn on_disconnected<'a>(
        &'a self,
        caller: &'a Caller,
        context: &'a HubContext,
    ) -> LocalBoxFuture<'a, ()> {
        let _ = (caller, context);
        Box::pin(async {})
    }
}

/// Makes one hub instance per shard.
pub type HubFactory = Arc<dyn Fn() -> Box<dyn Hub> + Send + Sync>;

/// The hubs a server serves, as its builder was told: some by name, and any name at all
/// unless names were mapped (`ringhub serve`: the built-in hub under every name).
#[derive(Clone)]
pub(crate) struct HubFactories {
    pub named: Vec<(String, HubFactory)>,
    pub any: Option<HubFactory>,
}

impl HubFactories {
    /// One shard's instances.
    pub fn make(&self) -> ShardHubs {
        ShardHubs {
            named: self.named.iter().map(|(n, f)| (n.clone(), f())).collect(),
            any: self.any.as_ref().map(|f| f()),
        }
    }
}

/// One shard's hubs.
pub(crate) struct ShardHubs {
    named: Vec<(String, Box<dyn Hub>)>,
    any: Option<Box<dyn Hub>>,
}

impl ShardHubs {
    /// The hub serving `name` (a name mapped to one, else the hub of any name).
    pub fn get(&self, name: &str) -> Option<&dyn Hub> {
        self.named
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, hub)| &**hub)
            .or(self.any.as_deref())
    }
}
