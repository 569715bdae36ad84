//! One cell of a dataset row, typed as Arrow / JSON typed it: nested lists and structs stay
//! nested (an HF `Image` column is `List([Struct{bytes: Bytes, path: Str|Null}])`), never
//! stringified, so consumers can walk them without re-parsing.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{bail, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float16Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type,
    UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{downcast_dictionary_array, Array};
use arrow_schema::DataType;

/// A dynamically typed value of a dataset row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Struct(BTreeMap<String, Value>),
}

impl Value {
    /// The field `key` of a struct (`None` for a missing field or a non-struct).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Struct(fields) => fields.get(key),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(items) => Some(items),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_struct(&self) -> Option<&BTreeMap<String, Value>> {
        match self {
            Value::Struct(fields) => Some(fields),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// Integers widen to f64 (JSON does not distinguish `1` from `1.0`).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The variant's name, for error messages (`expected a list, got str`).
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Struct(_) => "struct",
        }
    }

    /// Converts parsed JSON. Integers that fit i64 stay integers; others become floats.
    pub fn from_json(json: serde_json::Value) -> Value {
        match json {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::Str(s),
            serde_json::Value::Array(items) => {
                Value::List(items.into_iter().map(Value::from_json).collect())
            }
            serde_json::Value::Object(fields) => Value::Struct(
                fields
                    .into_iter()
                    .map(|(k, v)| (k, Value::from_json(v)))
                    .collect(),
            ),
        }
    }

    /// JSON form for messages and debugging; bytes become `{"$bytes": <length>}` since they
    /// are usually encoded images that nobody wants printed.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => (*b).into(),
            Value::Int(i) => (*i).into(),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Str(s) => s.clone().into(),
            Value::Bytes(b) => serde_json::json!({ "$bytes": b.len() }),
            Value::List(items) => items.iter().map(Value::to_json).collect(),
            Value::Struct(fields) => serde_json::Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// Element `row` of an Arrow array, recursively through lists, structs, maps and
    /// dictionaries. Types with no faithful `Value` (decimals, temporal types, unions) are
    /// errors rather than lossy guesses.
    pub fn from_arrow(array: &dyn Array, row: usize) -> Result<Value> {
        if array.is_null(row) {
            return Ok(Value::Null);
        }
        Ok(match array.data_type() {
            DataType::Null => Value::Null,
            DataType::Boolean => Value::Bool(array.as_boolean().value(row)),
            DataType::Int8 => Value::Int(array.as_primitive::<Int8Type>().value(row).into()),
            DataType::Int16 => Value::Int(array.as_primitive::<Int16Type>().value(row).into()),
            DataType::Int32 => Value::Int(array.as_primitive::<Int32Type>().value(row).into()),
            DataType::Int64 => Value::Int(array.as_primitive::<Int64Type>().value(row)),
            DataType::UInt8 => Value::Int(array.as_primitive::<UInt8Type>().value(row).into()),
            DataType::UInt16 => Value::Int(array.as_primitive::<UInt16Type>().value(row).into()),
            DataType::UInt32 => Value::Int(array.as_primitive::<UInt32Type>().value(row).into()),
            DataType::UInt64 => {
                let v = array.as_primitive::<UInt64Type>().value(row);
                match i64::try_from(v) {
                    Ok(i) => Value::Int(i),
                    Err(_) => bail!("uint64 value {v} does not fit a signed 64-bit integer"),
                }
            }
            DataType::Float16 => {
                Value::Float(array.as_primitive::<Float16Type>().value(row).to_f64())
            }
            DataType::Float32 => {
                Value::Float(array.as_primitive::<Float32Type>().value(row).into())
            }
            DataType::Float64 => Value::Float(array.as_primitive::<Float64Type>().value(row)),
            DataType::Utf8 => Value::Str(array.as_string::<i32>().value(row).to_owned()),
            DataType::LargeUtf8 => Value::Str(array.as_string::<i64>().value(row).to_owned()),
            DataType::Utf8View => Value::Str(array.as_string_view().value(row).to_owned()),
            DataType::Binary => Value::Bytes(array.as_binary::<i32>().value(row).to_vec()),
            DataType::LargeBinary => Value::Bytes(array.as_binary::<i64>().value(row).to_vec()),
            DataType::BinaryView => Value::Bytes(array.as_binary_view().value(row).to_vec()),
            DataType::FixedSizeBinary(_) => {
                Value::Bytes(array.as_fixed_size_binary().value(row).to_vec())
            }
            DataType::List(_) => list_values(array.as_list::<i32>().value(row).as_ref())?,
            DataType::LargeList(_) => list_values(array.as_list::<i64>().value(row).as_ref())?,
            DataType::FixedSizeList(_, _) => {
                list_values(array.as_fixed_size_list().value(row).as_ref())?
            }
            DataType::Struct(fields) => {
                let strukt = array.as_struct();
                let mut out = BTreeMap::new();
                for (field, column) in fields.iter().zip(strukt.columns()) {
                    let value = Value::from_arrow(column.as_ref(), row)
                        .map_err(|e| e.context(format!("field `{}`", field.name())))?;
                    out.insert(field.name().clone(), value);
                }
                Value::Struct(out)
            }
            // A map is a list of {key, value} entries; keeping it a list preserves the order
            // and duplicate keys that Arrow allows.
            DataType::Map(_, _) => list_values(&array.as_map().value(row))?,
            DataType::Dictionary(_, _) => downcast_dictionary_array!(
                array => match array.key(row) {
                    Some(key) => Value::from_arrow(array.values().as_ref(), key)?,
                    None => Value::Null,
                },
                other => bail!("unsupported dictionary type {other}")
            ),
            other => bail!(
                "unsupported column type {other} (supported: null, bool, integers, floats, \
                 strings, binary, lists, structs, maps, dictionaries)"
            ),
        })
    }
}

fn list_values(items: &dyn Array) -> Result<Value> {
    (0..items.len())
        .map(|i| Value::from_arrow(items, i).map_err(|e| e.context(format!("list item {i}"))))
        .collect::<Result<Vec<_>>>()
        .map(Value::List)
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow_array::builder::{BinaryBuilder, ListBuilder, StringBuilder, StructBuilder};
    use arrow_array::{DictionaryArray, Int64Array, StringArray};
    use arrow_schema::{Field, Fields};

    #[test]
    fn json_numbers_keep_integerness() {
        let v = Value::from_json(serde_json::json!({"a": 1, "b": 1.5, "c": [null, "x"]}));
        assert_eq!(v.get("a"), Some(&Value::Int(1)));
        assert_eq!(v.get("b"), Some(&Value::Float(1.5)));
        assert_eq!(
            v.get("c").and_then(Value::as_list),
            Some(&[Value::Null, Value::Str("x".into())][..])
        );
        assert_eq!(v.get("missing"), None);
        assert_eq!(v.get("a").and_then(Value::as_f64), Some(1.0));
    }

    #[test]
    fn arrow_list_of_image_structs_stays_typed() {
        let fields = Fields::from(vec![
            Field::new("bytes", DataType::Binary, true),
            Field::new("path", DataType::Utf8, true),
        ]);
        let mut images = ListBuilder::new(StructBuilder::new(
            fields.clone(),
            vec![
                Box::new(BinaryBuilder::new()),
                Box::new(StringBuilder::new()),
            ],
        ));
        // Row 0: two images (one with a path); row 1: null list.
        for (bytes, path) in [(b"\xff\xd8a".as_slice(), None), (b"\x89PNG", Some("p.png"))] {
            let s = images.values();
            s.field_builder::<BinaryBuilder>(0)
                .unwrap()
                .append_value(bytes);
            s.field_builder::<StringBuilder>(1)
                .unwrap()
                .append_option(path);
            s.append(true);
        }
        images.append(true);
        images.append(false);
        let array = images.finish();

        let row0 = Value::from_arrow(&array, 0).unwrap();
        let items = row0.as_list().unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(
            items[0].get("bytes").unwrap().as_bytes(),
            Some(&b"\xff\xd8a"[..])
        );
        assert_eq!(items[0].get("path"), Some(&Value::Null));
        assert_eq!(items[1].get("path").unwrap().as_str(), Some("p.png"));
        assert_eq!(Value::from_arrow(&array, 1).unwrap(), Value::Null);
    }

    #[test]
    fn arrow_dictionary_resolves_to_values() {
        let dict = DictionaryArray::new(
            arrow_array::Int32Array::from(vec![Some(1), None, Some(0)]),
            Arc::new(StringArray::from(vec!["user", "assistant"])),
        );
        assert_eq!(
            Value::from_arrow(&dict, 0).unwrap(),
            Value::Str("assistant".into())
        );
        assert_eq!(Value::from_arrow(&dict, 1).unwrap(), Value::Null);
        assert_eq!(
            Value::from_arrow(&dict, 2).unwrap(),
            Value::Str("user".into())
        );
        assert_eq!(
            Value::from_arrow(&Int64Array::from(vec![-7]), 0).unwrap(),
            Value::Int(-7)
        );
    }
}
