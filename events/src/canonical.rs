//! Canonical JSON written straight from `Serialize`: the bytes
//! `write_canonical(&serde_json::to_value(x))` makes (object keys in byte order, no
//! whitespace), without building the `Value` tree first. The log's hash chain covers these
//! bytes, so this must never differ from `write_canonical`; a property test holds the two
//! equal over arbitrary JSON values and every catalog event.
//!
//! Objects are written as they come; only an object whose keys did not arrive in order (or
//! repeat) is rewritten, sorted, in place. Anything this does not write itself (`f32`,
//! 128-bit integers, an unusual map key) goes through `Value` for that part, and an error
//! anywhere sends the whole value the `Value` way: the result is the same either way.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::Serialize;
use serde::ser;

use crate::event::write_canonical;

/// Appends the canonical JSON of `value` to `out`; `null` if it cannot be serialized.
pub fn to_canonical<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    let start = out.len();
    if value.serialize(Writer { out }).is_err() {
        out.truncate(start);
        write_canonical(&serde_json::to_value(value).unwrap_or_default(), out);
    }
}

/// Serialization that this writer leaves to the `Value` path.
#[derive(Debug)]
struct Unsupported;

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not written directly")
    }
}

impl std::error::Error for Unsupported {}

impl ser::Error for Unsupported {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Unsupported
    }
}

struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl Writer<'_> {
    /// Numbers, strings and booleans exactly as serde_json writes them.
    fn scalar<T: Serialize + ?Sized>(self, v: &T) -> Result<(), Unsupported> {
        serde_json::to_writer(&mut *self.out, v).map_err(|_| Unsupported)
    }

    /// The part as `Value` would hold it (e.g. an `f32` widened to `f64`).
    fn via_value<T: Serialize + ?Sized>(self, v: &T) -> Result<(), Unsupported> {
        write_canonical(&serde_json::to_value(v).map_err(|_| Unsupported)?, self.out);
        Ok(())
    }

    /// `{"variant":` … the caller writes the value and the closing brace.
    fn open_variant(&mut self, variant: &str) -> Result<(), Unsupported> {
        self.out.push(b'{');
        serde_json::to_writer(&mut *self.out, variant).map_err(|_| Unsupported)?;
        self.out.push(b':');
        Ok(())
    }
}

impl<'a> ser::Serializer for Writer<'a> {
    type Ok = ();
    type Error = Unsupported;
    type SerializeSeq = Array<'a>;
    type SerializeTuple = Array<'a>;
    type SerializeTupleStruct = Array<'a>;
    type SerializeTupleVariant = Array<'a>;
    type SerializeMap = Object<'a>;
    type SerializeStruct = Object<'a>;
    type SerializeStructVariant = Object<'a>;

    fn serialize_bool(self, v: bool) -> Result<(), Unsupported> {
        self.scalar(&v)
    }
    fn serialize_i8(self, v: i8) -> Result<(), Unsupported> {
        self.scalar(&v)
    }
    fn serialize_i16(self, v: i16) -> Result<(), Unsupported> {
        self.scalar(&v)
    }
    fn serialize_i32(self, v: i32) -> Result<(), Unsupported> {
        self.scalar(&v)
    }
    fn serialize_i64(self, v: i64) -> Result<(), Unsupported> {
        self.scalar(&v)
    }
    fn serialize_i128(self, v: i128) -> Result<(), Unsupported> {
        self.via_value(&v)
    }
    fn serialize_u8(self, v: u8) -> Result<(), Unsupported> {
        self.scalar(&v)
    }
    fn serialize_u16(self, v: u16) -> Result<(), Unsupported> {
        self.scalar(&v)
    }
    fn serialize_u32(self, v: u32) -> Result<(), Unsupported> {
        self.scalar(&v)
    }
    fn serialize_u64(self, v: u64) -> Result<(), Unsupported> {
        self.scalar(&v)
    }
    fn serialize_u128(self, v: u128) -> Result<(), Unsupported> {
        self.via_value(&v)
    }
    fn serialize_f32(self, v: f32) -> Result<(), Unsupported> {
        self.via_value(&v)
    }
    fn serialize_f64(self, v: f64) -> Result<(), Unsupported> {
        // Non-finite: `Value` holds null, and serde_json writes null.
        self.scalar(&v)
    }
    fn serialize_char(self, v: char) -> Result<(), Unsupported> {
        self.scalar(&v)
    }
    fn serialize_str(self, v: &str) -> Result<(), Unsupported> {
        self.scalar(v)
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), Unsupported> {
        self.via_value(v)
    }
    fn serialize_none(self) -> Result<(), Unsupported> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Unsupported> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Unsupported> {
        self.serialize_none()
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), Unsupported> {
        self.serialize_none()
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, variant: &'static str) -> Result<(), Unsupported> {
        self.scalar(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, value: &T) -> Result<(), Unsupported> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        mut self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Unsupported> {
        self.open_variant(variant)?;
        value.serialize(Writer { out: &mut *self.out })?;
        self.out.push(b'}');
        Ok(())
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Array<'a>, Unsupported> {
        Ok(Array::open(self.out, false))
    }
    fn serialize_tuple(self, len: usize) -> Result<Array<'a>, Unsupported> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _: &'static str, len: usize) -> Result<Array<'a>, Unsupported> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        mut self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Array<'a>, Unsupported> {
        self.open_variant(variant)?;
        Ok(Array::open(self.out, true))
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Object<'a>, Unsupported> {
        Ok(Object::open(self.out, len.unwrap_or(0), false))
    }
    fn serialize_struct(self, _: &'static str, len: usize) -> Result<Object<'a>, Unsupported> {
        Ok(Object::open(self.out, len, false))
    }
    fn serialize_struct_variant(
        mut self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Object<'a>, Unsupported> {
        self.open_variant(variant)?;
        Ok(Object::open(self.out, len, true))
    }
}

/// A JSON array being written; `variant` closes the `{"variant":` around it too.
struct Array<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
    variant: bool,
}

impl<'a> Array<'a> {
    fn open(out: &'a mut Vec<u8>, variant: bool) -> Array<'a> {
        out.push(b'[');
        Array { out, first: true, variant }
    }

    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unsupported> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        value.serialize(Writer { out: &mut *self.out })
    }

    fn close(self) -> Result<(), Unsupported> {
        self.out.push(b']');
        if self.variant {
            self.out.push(b'}');
        }
        Ok(())
    }
}

/// serde has one trait per kind of sequence; all of them are an array here.
macro_rules! array_kinds {
    ($($kind:ident::$method:ident),+) => {$(
        impl ser::$kind for Array<'_> {
            type Ok = ();
            type Error = Unsupported;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unsupported> {
                self.element(value)
            }
            fn end(self) -> Result<(), Unsupported> {
                self.close()
            }
        }
    )+};
}

array_kinds!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

/// One member written so far: its key (unescaped, what the order is by) and where
/// `"key":value` sits in the output.
struct Member {
    key: Cow<'static, str>,
    bytes: Range<usize>,
}

/// A JSON object being written in arrival order, sorted on close if it has to be.
struct Object<'a> {
    out: &'a mut Vec<u8>,
    /// Just after the `{`.
    start: usize,
    members: Vec<Member>,
    /// A map's key, between `serialize_key` and `serialize_value`.
    pending: Option<Cow<'static, str>>,
    variant: bool,
}

impl<'a> Object<'a> {
    fn open(out: &'a mut Vec<u8>, len: usize, variant: bool) -> Object<'a> {
        out.push(b'{');
        let start = out.len();
        Object { out, start, members: Vec::with_capacity(len), pending: None, variant }
    }

    fn member<T: Serialize + ?Sized>(&mut self, key: Cow<'static, str>, value: &T) -> Result<(), Unsupported> {
        if !self.members.is_empty() {
            self.out.push(b',');
        }
        let from = self.out.len();
        serde_json::to_writer(&mut *self.out, key.as_ref()).map_err(|_| Unsupported)?;
        self.out.push(b':');
        value.serialize(Writer { out: &mut *self.out })?;
        self.members.push(Member { key, bytes: from..self.out.len() });
        Ok(())
    }

    fn close(self) -> Result<(), Unsupported> {
        let Object { out, start, mut members, variant, .. } = self;
        let ordered = members.windows(2).all(|w| w[0].key < w[1].key);
        if !ordered {
            // Stable, so of repeated keys the last one written stays last and is kept, as a
            // map keeps the last insert.
            members.sort_by(|a, b| a.key.cmp(&b.key));
            members.dedup_by(|later, earlier| {
                if later.key == earlier.key {
                    std::mem::swap(later, earlier);
                    true
                } else {
                    false
                }
            });
            let written = out.split_off(start);
            for (i, m) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let from = m.bytes.start - start;
                out.extend_from_slice(&written[from..from + m.bytes.len()]);
            }
        }
        out.push(b'}');
        if variant {
            out.push(b'}');
        }
        Ok(())
    }
}

/// A struct and a struct variant are both an object of named fields.
macro_rules! struct_kinds {
    ($($kind:ident),+) => {$(
        impl ser::$kind for Object<'_> {
            type Ok = ();
            type Error = Unsupported;
            fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), Unsupported> {
                self.member(Cow::Borrowed(key), value)
            }
            fn end(self) -> Result<(), Unsupported> {
                self.close()
            }
        }
    )+};
}

struct_kinds!(SerializeStruct, SerializeStructVariant);

impl ser::SerializeMap for Object<'_> {
    type Ok = ();
    type Error = Unsupported;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Unsupported> {
        // A map key as `Value` makes one: a string (or char, or unit variant) as it is, an
        // integer as its text. Anything else sends the whole value the `Value` way.
        self.pending = Some(match serde_json::to_value(key).map_err(|_| Unsupported)? {
            serde_json::Value::String(s) => Cow::Owned(s),
            serde_json::Value::Number(n) if !n.is_f64() => Cow::Owned(n.to_string()),
            _ => return Err(Unsupported),
        });
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unsupported> {
        let key = self.pending.take().ok_or(Unsupported)?;
        self.member(key, value)
    }
    fn end(self) -> Result<(), Unsupported> {
        self.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};
    use std::collections::BTreeMap;

    fn both<T: Serialize>(v: &T) -> (String, String) {
        let mut direct = Vec::new();
        to_canonical(v, &mut direct);
        let mut via = Vec::new();
        write_canonical(&serde_json::to_value(v).unwrap_or_default(), &mut via);
        (String::from_utf8(direct).unwrap(), String::from_utf8(via).unwrap())
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec(("[a-z\"\\\\é\u{1}]{0,6}", inner), 0..8)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_json_value_is_written_as_write_canonical_writes_it(v in json_value()) {
            let (direct, via) = both(&v);
            prop_assert_eq!(direct, via);
        }
    }

    #[derive(Serialize)]
    enum Shape {
        Unit,
        Newtype(u8),
        Tuple(i32, String),
        Struct { z: bool, a: Option<u8> },
    }

    #[derive(Serialize)]
    struct Unordered {
        zeta: u8,
        alpha: Vec<Shape>,
        #[serde(skip_serializing_if = "Option::is_none")]
        skipped: Option<u8>,
        narrow: f32,
        wide: u128,
        bytes: serde_bytes_like::Bytes,
        by_number: BTreeMap<u16, &'static str>,
        by_unit: BTreeMap<Key, u8>,
        #[serde(flatten)]
        extra: BTreeMap<String, Value>,
    }

    #[derive(Serialize, PartialEq, Eq, PartialOrd, Ord)]
    enum Key {
        B,
        A,
    }

    mod serde_bytes_like {
        /// Serialized with `serialize_bytes`.
        pub struct Bytes(pub Vec<u8>);
        impl serde::Serialize for Bytes {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&self.0)
            }
        }
    }

    #[test]
    fn structs_enums_and_odd_scalars_match_the_value_path() {
        let v = Unordered {
            zeta: 1,
            alpha: vec![
                Shape::Unit,
                Shape::Newtype(7),
                Shape::Tuple(-3, "x\"y".into()),
                Shape::Struct { z: true, a: None },
            ],
            skipped: None,
            narrow: 1.1,
            wide: u128::from(u64::MAX),
            bytes: serde_bytes_like::Bytes(vec![0, 255]),
            by_number: [(10, "ten"), (9, "nine")].into_iter().collect(),
            by_unit: [(Key::B, 2), (Key::A, 1)].into_iter().collect(),
            extra: [("middle".to_owned(), json!({"b": 1, "a": [2.5, null]}))].into_iter().collect(),
        };
        let (direct, via) = both(&v);
        assert_eq!(direct, via);
        // The object really was reordered, and f32 widened as `Value` widens it.
        assert!(
            direct
                .starts_with(r#"{"alpha":["Unit",{"Newtype":7},{"Tuple":[-3,"x\"y"]},{"Struct":{"a":null,"z":true}}]"#)
        );
        assert!(direct.contains(r#""narrow":1.100000023841858"#), "{direct}");
        assert!(direct.contains(r#""by_number":{"10":"ten","9":"nine"}"#), "{direct}");
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value_as_a_map_would() {
        struct Twice;
        impl Serialize for Twice {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeMap;
                let mut m = s.serialize_map(None)?;
                m.serialize_entry("b", &1)?;
                m.serialize_entry("a", &2)?;
                m.serialize_entry("b", &3)?;
                m.end()
            }
        }
        let (direct, via) = both(&Twice);
        assert_eq!(direct, r#"{"a":2,"b":3}"#);
        assert_eq!(direct, via);
    }

    #[test]
    fn what_it_cannot_write_falls_back_whole() {
        // A sequence as a map key: `Value` rejects it too, so both give null.
        let v: BTreeMap<String, BTreeMap<Vec<u8>, u8>> =
            [("k".to_owned(), [(vec![1u8], 1u8)].into_iter().collect())].into_iter().collect();
        let (direct, via) = both(&v);
        assert_eq!(direct, via);
        assert_eq!(direct, "null");
    }
}
