//! [`Value`] as a serde data format, both ways: any `Deserialize` type decoded from an
//! argument, and any `Serialize` type encoded as a result or a message argument. A hub
//! method then takes and returns its own types, whatever protocol the client speaks:
//! arguments are decoded into a [`Value`] by the JSON or MessagePack reader first.
//!
//! Mapping: null is `()`/`None`, integers and floats convert as serde's primitives
//! allow (an integer into a float field, not a float into an integer field), binary is
//! bytes, arrays are sequences and tuples, maps are maps and structs, a string or a
//! one-entry map is an enum (serde's external tagging). MessagePack extensions other
//! than binary have no serde counterpart and are refused.

use std::fmt;

use serde::de::value::{MapAccessDeserializer, MapDeserializer, SeqDeserializer};
use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use serde::forward_to_deserialize_any;
use serde::ser::{self, Serialize};

use crate::value::Value;

/// Why a value is not of the type asked for (or a type could not become a value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueError(String);

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ValueError {}

impl ser::Error for ValueError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        ValueError(message.to_string())
    }
}

impl de::Error for ValueError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        ValueError(message.to_string())
    }
}

impl Value {
    /// Decodes the value as a `T`.
    pub fn decode<T: DeserializeOwned>(self) -> Result<T, ValueError> {
        T::deserialize(self)
    }

    /// Encodes any serializable value: fields in their declared order, bytes as binary
    /// (base64 for JSON clients, bin for MessagePack ones).
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Value, ValueError> {
        value.serialize(ValueSerializer)
    }
}

impl<'de> IntoDeserializer<'de, ValueError> for Value {
    type Deserializer = Value;

    fn into_deserializer(self) -> Value {
        self
    }
}

impl<'de> de::Deserializer<'de> for Value {
    type Error = ValueError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Int(n) => visitor.visit_i64(n),
            Value::UInt(n) => visitor.visit_u64(n),
            Value::Float(f) => visitor.visit_f64(f),
            Value::Str(s) => visitor.visit_string(s),
            Value::Binary(bytes) => visitor.visit_byte_buf(bytes),
            Value::Array(items) => {
                let mut seq = SeqDeserializer::new(items.into_iter());
                let value = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(value)
            }
            Value::Map(entries) => {
                let mut map = MapDeserializer::new(entries.into_iter());
                let value = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(value)
            }
            Value::Ext(tag, _) => Err(de::Error::custom(format!(
                "a MessagePack extension (type {tag}) has no serde counterpart"
            ))),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self {
            Value::Null => visitor.visit_none(),
            other => visitor.visit_some(other),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        match self {
            Value::Str(variant) => visitor.visit_enum(variant.into_deserializer()),
            Value::Map(entries) if entries.len() == 1 => {
                MapAccessDeserializer::new(MapDeserializer::new(entries.into_iter()))
                    .deserialize_enum(name, variants, visitor)
            }
            other => Err(de::Error::invalid_type(other.unexpected(), &"an enum")),
        }
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf unit unit_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

impl Value {
    /// How serde names what this value is, in type errors.
    fn unexpected(&self) -> de::Unexpected<'_> {
        match self {
            Value::Null => de::Unexpected::Unit,
            Value::Bool(b) => de::Unexpected::Bool(*b),
            Value::Int(n) => de::Unexpected::Signed(*n),
            Value::UInt(n) => de::Unexpected::Unsigned(*n),
            Value::Float(f) => de::Unexpected::Float(*f),
            Value::Str(s) => de::Unexpected::Str(s),
            Value::Binary(b) => de::Unexpected::Bytes(b),
            Value::Array(_) => de::Unexpected::Seq,
            Value::Map(_) => de::Unexpected::Map,
            Value::Ext(..) => de::Unexpected::Other("a MessagePack extension"),
        }
    }
}

/// Serializes into a [`Value`].
struct ValueSerializer;

/// A sequence, tuple or map being serialized; a variant's carries its name.
struct Collecting {
    items: Vec<Value>,
    entries: Vec<(Value, Value)>,
    pending_key: Option<Value>,
    variant: Option<&'static str>,
}

impl Collecting {
    fn new(len: Option<usize>, variant: Option<&'static str>) -> Collecting {
        let capacity = len.unwrap_or(0).min(1024);
        Collecting {
            items: Vec::with_capacity(capacity),
            entries: Vec::new(),
            pending_key: None,
            variant,
        }
    }

    fn push<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.items.push(value.serialize(ValueSerializer)?);
        Ok(())
    }

    fn field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), ValueError> {
        self.entries.push((
            Value::Str(key.to_owned()),
            value.serialize(ValueSerializer)?,
        ));
        Ok(())
    }

    fn array(self) -> Value {
        tagged(self.variant, Value::Array(self.items))
    }

    fn map(self) -> Value {
        tagged(self.variant, Value::Map(self.entries))
    }
}

/// `inner`, wrapped as `{variant: inner}` for an enum variant (serde's external tagging).
fn tagged(variant: Option<&'static str>, inner: Value) -> Value {
    match variant {
        Some(name) => Value::Map(vec![(Value::Str(name.to_owned()), inner)]),
        None => inner,
    }
}

impl ser::Serializer for ValueSerializer {
    type Ok = Value;
    type Error = ValueError;
    type SerializeSeq = Collecting;
    type SerializeTuple = Collecting;
    type SerializeTupleStruct = Collecting;
    type SerializeTupleVariant = Collecting;
    type SerializeMap = Collecting;
    type SerializeStruct = Collecting;
    type SerializeStructVariant = Collecting;

    fn serialize_bool(self, v: bool) -> Result<Value, ValueError> {
        Ok(Value::Bool(v))
    }
    fn serialize_i8(self, v: i8) -> Result<Value, ValueError> {
        Ok(Value::Int(v.into()))
    }
    fn serialize_i16(self, v: i16) -> Result<Value, ValueError> {
        Ok(Value::Int(v.into()))
    }
    fn serialize_i32(self, v: i32) -> Result<Value, ValueError> {
        Ok(Value::Int(v.into()))
    }
    fn serialize_i64(self, v: i64) -> Result<Value, ValueError> {
        Ok(Value::Int(v))
    }
    fn serialize_u8(self, v: u8) -> Result<Value, ValueError> {
        Ok(Value::Int(v.into()))
    }
    fn serialize_u16(self, v: u16) -> Result<Value, ValueError> {
        Ok(Value::Int(v.into()))
    }
    fn serialize_u32(self, v: u32) -> Result<Value, ValueError> {
        Ok(Value::Int(v.into()))
    }
    fn serialize_u64(self, v: u64) -> Result<Value, ValueError> {
        Ok(Value::from_u64(v))
    }
    fn serialize_f32(self, v: f32) -> Result<Value, ValueError> {
        Ok(Value::Float(v.into()))
    }
    fn serialize_f64(self, v: f64) -> Result<Value, ValueError> {
        Ok(Value::Float(v))
    }
    fn serialize_char(self, v: char) -> Result<Value, ValueError> {
        Ok(Value::Str(v.to_string()))
    }
    fn serialize_str(self, v: &str) -> Result<Value, ValueError> {
        Ok(Value::Str(v.to_owned()))
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Value, ValueError> {
        Ok(Value::Binary(v.to_vec()))
    }
    fn serialize_none(self) -> Result<Value, ValueError> {
        Ok(Value::Null)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Value, ValueError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<Value, ValueError> {
        Ok(Value::Null)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<Value, ValueError> {
        Ok(Value::Null)
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Value, ValueError> {
        Ok(Value::Str(variant.to_owned()))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<Value, ValueError> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Value, ValueError> {
        Ok(tagged(Some(variant), value.serialize(self)?))
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Collecting, ValueError> {
        Ok(Collecting::new(len, None))
    }
    fn serialize_tuple(self, len: usize) -> Result<Collecting, ValueError> {
        Ok(Collecting::new(Some(len), None))
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<Collecting, ValueError> {
        Ok(Collecting::new(Some(len), None))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Collecting, ValueError> {
        Ok(Collecting::new(Some(len), Some(variant)))
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Collecting, ValueError> {
        Ok(Collecting::new(None, None))
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Collecting, ValueError> {
        Ok(Collecting::new(None, None))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Collecting, ValueError> {
        Ok(Collecting::new(None, Some(variant)))
    }
}

/// The four sequence-like serde traits: each element pushed, an array at the end.
macro_rules! collect_elements {
    ($($trait:ident :: $method:ident),*) => {$(
        impl ser::$trait for Collecting {
            type Ok = Value;
            type Error = ValueError;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
                self.push(value)
            }
            fn end(self) -> Result<Value, ValueError> {
                Ok(self.array())
            }
        }
    )*};
}

collect_elements!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl ser::SerializeMap for Collecting {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), ValueError> {
        self.pending_key = Some(key.serialize(ValueSerializer)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        let key = self
            .pending_key
            .take()
            .ok_or_else(|| <ValueError as ser::Error>::custom("a map value without its key"))?;
        self.entries.push((key, value.serialize(ValueSerializer)?));
        Ok(())
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(self.map())
    }
}

/// The two struct-like serde traits: each field kept by name, a map at the end.
macro_rules! collect_fields {
    ($($trait:ident),*) => {$(
        impl ser::$trait for Collecting {
            type Ok = Value;
            type Error = ValueError;
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), ValueError> {
                self.field(key, value)
            }
            fn end(self) -> Result<Value, ValueError> {
                Ok(self.map())
            }
        }
    )*};
}

collect_fields!(SerializeStruct, SerializeStructVariant);

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, PartialEq, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Reading {
        ward: String,
        bed_count: u32,
        score: f64,
        note: Option<String>,
        tags: Vec<String>,
        level: Level,
    }

    #[derive(Debug, PartialEq, Deserialize, Serialize)]
    enum Level {
        Low,
        High { since: i64 },
    }

    fn text(s: &str) -> Value {
        Value::Str(s.to_owned())
    }

    #[test]
    fn a_struct_decodes_from_a_map_whatever_protocol_made_it() {
        let value = Value::Map(vec![
            (text("ward"), text("7b")),
            (text("bedCount"), Value::Int(12)),
            (text("score"), Value::Int(3)), // an integer where a float is asked: fine
            (text("note"), Value::Null),
            (text("tags"), Value::Array(vec![text("icu")])),
            (
                text("level"),
                Value::Map(vec![(
                    text("High"),
                    Value::Map(vec![(text("since"), Value::Int(5))]),
                )]),
            ),
        ]);
        let reading: Reading = value.clone().decode().unwrap();
        assert_eq!(
            reading,
            Reading {
                ward: "7b".into(),
                bed_count: 12,
                score: 3.0,
                note: None,
                tags: vec!["icu".into()],
                level: Level::High { since: 5 },
            }
        );
        assert_eq!(text("Low").decode::<Level>().unwrap(), Level::Low);
        // And back: the same map, fields in their declared order (the float is a float
        // now).
        let encoded = Value::encode(&reading).unwrap();
        let Value::Map(entries) = &encoded else {
            panic!("{encoded:?}")
        };
        let keys: Vec<_> = entries.iter().map(|(k, _)| k.as_str().unwrap()).collect();
        assert_eq!(keys, ["ward", "bedCount", "score", "note", "tags", "level"]);
        let again: Reading = encoded.decode().unwrap();
        assert_eq!(again, reading);
    }

    #[test]
    fn wrong_types_and_ranges_are_errors_that_say_what_was_expected() {
        let error = text("x").decode::<i64>().unwrap_err();
        assert!(error.to_string().contains("expected i64"), "{error}");
        assert!(Value::Int(300).decode::<u8>().is_err());
        assert!(Value::Float(1.5).decode::<i64>().is_err());
        assert!(Value::Ext(-1, vec![0; 4]).decode::<String>().is_err());
        let missing = Value::Map(vec![(text("ward"), text("7b"))]).decode::<Reading>();
        assert!(missing.unwrap_err().to_string().contains("missing field"));
    }

    #[test]
    fn binary_tuples_and_maps_with_other_keys() {
        assert_eq!(
            Value::Binary(vec![1, 2])
                .decode::<serde_bytes_like::Bytes>()
                .unwrap()
                .0,
            vec![1, 2]
        );
        let pair: (i64, String) = Value::Array(vec![Value::Int(1), text("a")])
            .decode()
            .unwrap();
        assert_eq!(pair, (1, "a".to_owned()));
        let by_number: HashMap<i64, bool> = Value::Map(vec![(Value::Int(4), Value::Bool(true))])
            .decode()
            .unwrap();
        assert!(by_number[&4]);
    }

    /// `Vec<u8>` through `deserialize_byte_buf`, without a dependency for it.
    mod serde_bytes_like {
        pub struct Bytes(pub Vec<u8>);

        impl<'de> serde::Deserialize<'de> for Bytes {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Visit;
                impl serde::de::Visitor<'_> for Visit {
                    type Value = Bytes;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("bytes")
                    }
                    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
                        Ok(Bytes(v))
                    }
                }
                d.deserialize_byte_buf(Visit)
            }
        }
    }
}
