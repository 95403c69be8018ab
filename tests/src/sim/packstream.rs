//! PackStream v1, the value encoding of Bolt: null, booleans, integers of every width, floats,
//! strings, bytes, lists, maps and structures (a tag byte plus fields).

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};

/// A PackStream value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`.
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed 64-bit integer (encoded in the smallest width that holds it).
    Int(i64),
    /// A 64-bit float.
    Float(f64),
    /// A UTF-8 string.
    String(String),
    /// A byte array.
    Bytes(Vec<u8>),
    /// A list.
    List(Vec<Value>),
    /// A map with string keys (ordered here for stable encoding).
    Map(BTreeMap<String, Value>),
    /// A structure: tag byte and fields (Bolt messages are structures).
    Struct(u8, Vec<Value>),
}

impl Value {
    /// The string inside, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The integer inside, if this is an integer.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The map inside, if this is a map.
    pub fn as_map(&self) -> Option<&BTreeMap<String, Value>> {
        match self {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}

impl From<u64> for Value {
    fn from(i: u64) -> Self {
        Value::Int(i64::try_from(i).unwrap_or(i64::MAX))
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

/// Builds a `Value::Map` from `(key, value)` pairs.
pub fn map<K: Into<String>, V: Into<Value>>(pairs: impl IntoIterator<Item = (K, V)>) -> Value {
    Value::Map(
        pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect(),
    )
}

/// Appends the encoding of `v` to `out`.
pub fn encode(v: &Value, out: &mut Vec<u8>) -> Result<()> {
    match v {
        Value::Null => out.push(0xC0),
        Value::Bool(false) => out.push(0xC2),
        Value::Bool(true) => out.push(0xC3),
        Value::Int(i) => encode_int(*i, out),
        Value::Float(f) => {
            out.push(0xC1);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::String(s) => {
            size_header(s.len(), 0x80, [0xD0, 0xD1, 0xD2], out)?;
            out.extend_from_slice(s.as_bytes());
        }
        Value::Bytes(b) => {
            // Bytes have no tiny form.
            match b.len() {
                n if n <= 0xFF => out.extend_from_slice(&[0xCC, n as u8]),
                n if n <= 0xFFFF => {
                    out.push(0xCD);
                    out.extend_from_slice(&(n as u16).to_be_bytes());
                }
                n => {
                    out.push(0xCE);
                    out.extend_from_slice(
                        &u32::try_from(n).context("bytes too long")?.to_be_bytes(),
                    );
                }
            }
            out.extend_from_slice(b);
        }
        Value::List(items) => {
            size_header(items.len(), 0x90, [0xD4, 0xD5, 0xD6], out)?;
            for item in items {
                encode(item, out)?;
            }
        }
        Value::Map(entries) => {
            size_header(entries.len(), 0xA0, [0xD8, 0xD9, 0xDA], out)?;
            for (k, v) in entries {
                encode(&Value::String(k.clone()), out)?;
                encode(v, out)?;
            }
        }
        Value::Struct(tag, fields) => {
            ensure!(fields.len() < 16, "structure with {} fields", fields.len());
            out.push(0xB0 | fields.len() as u8);
            out.push(*tag);
            for f in fields {
                encode(f, out)?;
            }
        }
    }
    Ok(())
}

fn encode_int(i: i64, out: &mut Vec<u8>) {
    if (-16..=127).contains(&i) {
        out.push(i as i8 as u8);
    } else if (i8::MIN as i64..=i8::MAX as i64).contains(&i) {
        out.push(0xC8);
        out.push(i as i8 as u8);
    } else if (i16::MIN as i64..=i16::MAX as i64).contains(&i) {
        out.push(0xC9);
        out.extend_from_slice(&(i as i16).to_be_bytes());
    } else if (i32::MIN as i64..=i32::MAX as i64).contains(&i) {
        out.push(0xCA);
        out.extend_from_slice(&(i as i32).to_be_bytes());
    } else {
        out.push(0xCB);
        out.extend_from_slice(&i.to_be_bytes());
    }
}

fn size_header(len: usize, tiny: u8, wide: [u8; 3], out: &mut Vec<u8>) -> Result<()> {
    if len < 16 {
        out.push(tiny | len as u8);
    } else if len <= 0xFF {
        out.extend_from_slice(&[wide[0], len as u8]);
    } else if len <= 0xFFFF {
        out.push(wide[1]);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(wide[2]);
        out.extend_from_slice(&u32::try_from(len).context("value too long")?.to_be_bytes());
    }
    Ok(())
}

/// Decodes exactly one value from `buf` (trailing bytes are an error).
pub fn decode_all(buf: &[u8]) -> Result<Value> {
    let mut dec = Decoder { buf, pos: 0 };
    let v = dec.value(0)?;
    ensure!(
        dec.pos == buf.len(),
        "{} trailing bytes after PackStream value",
        buf.len() - dec.pos
    );
    Ok(v)
}

/// Nesting depth beyond which input is rejected (guards the recursion).
const MAX_DEPTH: usize = 64;

struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Decoder<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).context("length overflow")?;
        ensure!(end <= self.buf.len(), "truncated PackStream value");
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn len(&mut self, marker: u8, base8: u8) -> Result<usize> {
        Ok(match marker - base8 {
            0 => self.u8()? as usize,
            1 => u16::from_be_bytes(self.be()?) as usize,
            _ => u32::from_be_bytes(self.be()?) as usize,
        })
    }

    fn string(&mut self, n: usize) -> Result<String> {
        let bytes = self.take(n)?.to_vec();
        String::from_utf8(bytes).context("string is not UTF-8")
    }

    fn value(&mut self, depth: usize) -> Result<Value> {
        ensure!(depth <= MAX_DEPTH, "PackStream nesting too deep");
        let m = self.u8()?;
        Ok(match m {
            0x00..=0x7F => Value::Int(m as i64),
            0xF0..=0xFF => Value::Int(m as i8 as i64),
            0x80..=0x8F => Value::String(self.string((m & 0x0F) as usize)?),
            0x90..=0x9F => self.list((m & 0x0F) as usize, depth)?,
            0xA0..=0xAF => self.map((m & 0x0F) as usize, depth)?,
            0xB0..=0xBF => {
                let tag = self.u8()?;
                let mut fields = Vec::new();
                for _ in 0..(m & 0x0F) {
                    fields.push(self.value(depth + 1)?);
                }
                Value::Struct(tag, fields)
            }
            0xC0 => Value::Null,
            0xC1 => Value::Float(f64::from_be_bytes(self.be()?)),
            0xC2 => Value::Bool(false),
            0xC3 => Value::Bool(true),
            0xC8 => Value::Int(i8::from_be_bytes(self.be()?) as i64),
            0xC9 => Value::Int(i16::from_be_bytes(self.be()?) as i64),
            0xCA => Value::Int(i32::from_be_bytes(self.be()?) as i64),
            0xCB => Value::Int(i64::from_be_bytes(self.be()?)),
            0xCC..=0xCE => {
                let n = self.len(m, 0xCC)?;
                Value::Bytes(self.take(n)?.to_vec())
            }
            0xD0..=0xD2 => {
                let n = self.len(m, 0xD0)?;
                Value::String(self.string(n)?)
            }
            0xD4..=0xD6 => {
                let n = self.len(m, 0xD4)?;
                self.list(n, depth)?
            }
            0xD8..=0xDA => {
                let n = self.len(m, 0xD8)?;
                self.map(n, depth)?
            }
            other => bail!("unsupported PackStream marker 0x{other:02X}"),
        })
    }

    fn list(&mut self, n: usize, depth: usize) -> Result<Value> {
        // Each item takes at least one byte: cap the pre-allocation by what is left.
        let mut items = Vec::with_capacity(n.min(self.buf.len() - self.pos));
        for _ in 0..n {
            items.push(self.value(depth + 1)?);
        }
        Ok(Value::List(items))
    }

    fn map(&mut self, n: usize, depth: usize) -> Result<Value> {
        let mut entries = BTreeMap::new();
        for _ in 0..n {
            let key = match self.value(depth + 1)? {
                Value::String(s) => s,
                other => bail!("map key is not a string: {other:?}"),
            };
            let v = self.value(depth + 1)?;
            entries.insert(key, v);
        }
        Ok(Value::Map(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(v: Value) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&v, &mut out).unwrap();
        assert_eq!(decode_all(&out).unwrap(), v, "bytes {out:02X?}");
        out
    }

    #[test]
    fn ints_use_smallest_width() {
        assert_eq!(round_trip(Value::Int(1)), [0x01]);
        assert_eq!(round_trip(Value::Int(-16)), [0xF0]);
        assert_eq!(round_trip(Value::Int(-17)), [0xC8, 0xEF]);
        assert_eq!(round_trip(Value::Int(128)), [0xC9, 0x00, 0x80]);
        assert_eq!(round_trip(Value::Int(40000)).len(), 5);
        assert_eq!(round_trip(Value::Int(i64::MIN)).len(), 9);
    }

    #[test]
    fn containers_and_scalars() {
        round_trip(Value::Null);
        round_trip(Value::Bool(true));
        round_trip(Value::Float(1.5));
        round_trip(Value::String("x".repeat(300)));
        round_trip(Value::Bytes(vec![1, 2, 3]));
        round_trip(Value::List((0..20).map(Value::Int).collect()));
        round_trip(map([("a", Value::Int(1)), ("b", Value::from("c"))]));
        assert_eq!(
            round_trip(Value::Struct(0x70, vec![map::<&str, Value>([])])),
            [0xB1, 0x70, 0xA0]
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert!(decode_all(&[0xD0]).is_err());
        assert!(decode_all(&[0x01, 0x02]).is_err());
        assert!(decode_all(&[0xA1, 0x01, 0x01]).is_err());
    }
}
