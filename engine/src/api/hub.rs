//! What an embedder writes: a [`Hub`] with typed method dispatch over [`Call`]s.

use std::sync::Arc;

use ringhub_protocol::Value;

use crate::api::context::HubContext;
use crate::api::types::{Caller, HubError, LocalBoxFuture};

/// One invocation of a hub method.
pub struct Call<'a> {
    pub caller: &'a Caller,
    /// The method name as the client sent it.
    pub method: &'a str,
    pub arguments: Vec<Value>,
    pub context: &'a HubContext,
}

impl Call<'_> {
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
