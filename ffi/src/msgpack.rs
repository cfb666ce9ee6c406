//! The MSGPACK serde format: Python values ↔ MessagePack, with rmp.
//!
//! JSON types plus `bytes`; map keys may be any supported scalar. Decoding never trusts a length
//! it has not seen bytes for, and nesting is limited, so a hostile payload is an error.

use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple,
};
use rmp::Marker;

const MAX_DEPTH: usize = 512;

fn encode(obj: &Bound<'_, PyAny>, out: &mut Vec<u8>, depth: usize) -> PyResult<()> {
    if depth > MAX_DEPTH {
        return Err(PyValueError::new_err("MSGPACK: value nested too deeply"));
    }
    // Writing into a Vec cannot fail.
    let w = |r: Result<(), rmp::encode::ValueWriteError>| {
        r.map_err(|e| PyValueError::new_err(e.to_string()))
    };
    if obj.is_none() {
        rmp::encode::write_nil(out).expect("vec write");
    } else if let Ok(b) = obj.cast::<PyBool>() {
        rmp::encode::write_bool(out, b.is_true()).expect("vec write");
    } else if obj.is_instance_of::<PyInt>() {
        if let Ok(v) = obj.extract::<i64>() {
            rmp::encode::write_sint(out, v).map_err(|e| PyValueError::new_err(e.to_string()))?;
        } else if let Ok(v) = obj.extract::<u64>() {
            rmp::encode::write_uint(out, v).map_err(|e| PyValueError::new_err(e.to_string()))?;
        } else {
            return Err(PyOverflowError::new_err(
                "MSGPACK integers must fit in 64 bits",
            ));
        }
    } else if let Ok(f) = obj.cast::<PyFloat>() {
        rmp::encode::write_f64(out, f.value()).map_err(|e| PyValueError::new_err(e.to_string()))?;
    } else if let Ok(s) = obj.cast::<PyString>() {
        w(rmp::encode::write_str(out, s.to_str()?))?;
    } else if let Ok(b) = obj.cast::<PyBytes>() {
        w(rmp::encode::write_bin(out, b.as_bytes()))?;
    } else if let Ok(b) = obj.cast::<PyByteArray>() {
        w(rmp::encode::write_bin(out, &b.to_vec()))?;
    } else if let Ok(l) = obj.cast::<PyList>() {
        w(rmp::encode::write_array_len(out, l.len() as u32).map(|_| ()))?;
        for item in l.iter() {
            encode(&item, out, depth + 1)?;
        }
    } else if let Ok(t) = obj.cast::<PyTuple>() {
        w(rmp::encode::write_array_len(out, t.len() as u32).map(|_| ()))?;
        for item in t.iter() {
            encode(&item, out, depth + 1)?;
        }
    } else if let Ok(d) = obj.cast::<PyDict>() {
        w(rmp::encode::write_map_len(out, d.len() as u32).map(|_| ()))?;
        for (k, v) in d.iter() {
            encode(&k, out, depth + 1)?;
            encode(&v, out, depth + 1)?;
        }
    } else {
        let t = obj.get_type().name()?;
        return Err(PyTypeError::new_err(format!(
            "MSGPACK cannot encode a value of type {t}"
        )));
    }
    Ok(())
}

/// Encodes a Python value as MessagePack.
#[pyfunction]
pub fn msgpack_dumps<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut out = Vec::with_capacity(64);
    encode(obj, &mut out, 0)?;
    Ok(PyBytes::new(py, &out))
}

struct Reader<'a> {
    b: &'a [u8],
}

fn truncated() -> PyErr {
    PyValueError::new_err("MSGPACK: truncated data")
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> PyResult<&'a [u8]> {
        if self.b.len() < n {
            return Err(truncated());
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn be<const N: usize>(&mut self) -> PyResult<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("exact length"))
    }
    fn len(&mut self, m: Marker) -> PyResult<usize> {
        Ok(match m {
            Marker::Str8 | Marker::Bin8 => self.be::<1>()?[0] as usize,
            Marker::Str16 | Marker::Bin16 | Marker::Array16 | Marker::Map16 => {
                u16::from_be_bytes(self.be()?) as usize
            }
            _ => u32::from_be_bytes(self.be()?) as usize,
        })
    }

    fn value<'py>(&mut self, py: Python<'py>, depth: usize) -> PyResult<Bound<'py, PyAny>> {
        if depth > MAX_DEPTH {
            return Err(PyValueError::new_err("MSGPACK: data nested too deeply"));
        }
        let m = Marker::from_u8(self.be::<1>()?[0]);
        Ok(match m {
            Marker::Null => py.None().into_bound(py),
            Marker::True => PyBool::new(py, true).to_owned().into_any(),
            Marker::False => PyBool::new(py, false).to_owned().into_any(),
            Marker::FixPos(n) => n.into_pyobject(py)?.into_any(),
            Marker::FixNeg(n) => n.into_pyobject(py)?.into_any(),
            Marker::U8 => self.be::<1>()?[0].into_pyobject(py)?.into_any(),
            Marker::U16 => u16::from_be_bytes(self.be()?).into_pyobject(py)?.into_any(),
            Marker::U32 => u32::from_be_bytes(self.be()?).into_pyobject(py)?.into_any(),
            Marker::U64 => u64::from_be_bytes(self.be()?).into_pyobject(py)?.into_any(),
            Marker::I8 => i8::from_be_bytes(self.be()?).into_pyobject(py)?.into_any(),
            Marker::I16 => i16::from_be_bytes(self.be()?).into_pyobject(py)?.into_any(),
            Marker::I32 => i32::from_be_bytes(self.be()?).into_pyobject(py)?.into_any(),
            Marker::I64 => i64::from_be_bytes(self.be()?).into_pyobject(py)?.into_any(),
            Marker::F32 => (f32::from_be_bytes(self.be()?) as f64)
                .into_pyobject(py)?
                .into_any(),
            Marker::F64 => f64::from_be_bytes(self.be()?).into_pyobject(py)?.into_any(),
            Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => {
                let n = if let Marker::FixStr(n) = m {
                    n as usize
                } else {
                    self.len(m)?
                };
                let s = std::str::from_utf8(self.take(n)?)
                    .map_err(|_| PyValueError::new_err("MSGPACK: string is not UTF-8"))?;
                PyString::new(py, s).into_any()
            }
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => {
                let n = self.len(m)?;
                PyBytes::new(py, self.take(n)?).into_any()
            }
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                let n = if let Marker::FixArray(n) = m {
                    n as usize
                } else {
                    self.len(m)?
                };
                if n > self.b.len() {
                    return Err(truncated());
                }
                let list = PyList::empty(py);
                for _ in 0..n {
                    list.append(self.value(py, depth + 1)?)?;
                }
                list.into_any()
            }
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                let n = if let Marker::FixMap(n) = m {
                    n as usize
                } else {
                    self.len(m)?
                };
                if n > self.b.len() / 2 {
                    return Err(truncated());
                }
                let dict = PyDict::new(py);
                for _ in 0..n {
                    let k = self.value(py, depth + 1)?;
                    let v = self.value(py, depth + 1)?;
                    dict.set_item(k, v)?;
                }
                dict.into_any()
            }
            other => {
                return Err(PyValueError::new_err(format!(
                    "MSGPACK: unsupported type marker {other:?}"
                )));
            }
        })
    }
}

/// Decodes one MessagePack value (bytes stay bytes, arrays become lists).
#[pyfunction]
pub fn msgpack_loads<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let owned;
    let bytes: &[u8] = if let Ok(b) = data.cast::<PyBytes>() {
        b.as_bytes()
    } else {
        owned = pyo3::buffer::PyBuffer::<u8>::get(data)?.to_vec(py)?;
        &owned
    };
    let mut r = Reader { b: bytes };
    let v = r.value(py, 0)?;
    if !r.b.is_empty() {
        return Err(PyValueError::new_err(
            "MSGPACK: trailing bytes after the value",
        ));
    }
    Ok(v)
}
