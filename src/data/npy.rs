//! NumPy `.npy` files (format versions 1-3), read with a bound: the header
//! is read as numpy reads it (a Python literal dict of exactly `descr`,
//! `fortran_order` and `shape`) and the array's size checked against the
//! file's length (neither short nor with trailing bytes) and the memory
//! budget before anything is allocated. Only C-order arrays of
//! little-endian `float32` (inputs) and `int64` / `int32` / `uint8` (labels)
//! are read; anything else is a clear error naming the file.

use std::fmt;
use std::path::Path;

use super::dataset::{invalid, strip_path};
use crate::error::DataError;
use crate::fs::file_cap;

/// Largest `.npy` file read (1 GiB; `PRELU_MAX_FILE_BYTES` overrides).
pub const MAX_NPY_BYTES: u64 = 1 << 30;

/// A decoded array.
#[derive(Clone, Debug, PartialEq)]
pub struct Npy {
    pub shape: Vec<usize>,
    pub data: NpyData,
}

/// The values of an array: floats as read, integers widened.
#[derive(Clone, Debug, PartialEq)]
pub enum NpyData {
    F32(Vec<f32>),
    Int(Vec<i64>),
}

/// A Python literal of a `.npy` header: the kinds numpy writes there
/// (strings, booleans, whole numbers, tuples, and lists for structured
/// dtypes).
#[derive(Clone, Debug, PartialEq)]
enum Lit {
    Str(String),
    Bool(bool),
    Int(i128),
    Tuple(Vec<Lit>),
    List(Vec<Lit>),
}

impl fmt::Display for Lit {
    /// As Python's `repr` writes it (strings in single quotes, unescaped).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items = |v: &[Lit]| v.iter().map(Lit::to_string).collect::<Vec<_>>().join(", ");
        match self {
            Lit::Str(s) => write!(f, "'{s}'"),
            Lit::Bool(b) => f.write_str(if *b { "True" } else { "False" }),
            Lit::Int(i) => write!(f, "{i}"),
            Lit::Tuple(v) if v.len() == 1 => write!(f, "({},)", v[0]),
            Lit::Tuple(v) => write!(f, "({})", items(v)),
            Lit::List(v) => write!(f, "[{}]", items(v)),
        }
    }
}

/// Why a header does not read: the key in whose value (if any), and what.
type HeaderError = (Option<Lit>, String);

/// Deepest nesting of tuples and lists read (a bound for hostile headers).
const MAX_NESTING: usize = 16;

/// Reads a header's text as Python's `ast.literal_eval` (which numpy uses)
/// reads a dict of [`Lit`]s; what it refuses is refused. Not read (refused
/// too): escapes other than `\\ \' \" \n \r \t \xHH`, string prefixes,
/// adjacent strings, numbers other than decimal integers.
struct LitReader<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> LitReader<'a> {
    fn peek(&self) -> Option<char> {
        self.text[self.at..].chars().next()
    }

    fn skip_space(&mut self) {
        while let Some(c) = self.peek().filter(|c| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0c')) {
            self.at += c.len_utf8();
        }
    }

    /// Skips spaces, then `c` if it comes next.
    fn eat(&mut self, c: char) -> bool {
        self.skip_space();
        let yes = self.peek() == Some(c);
        if yes {
            self.at += c.len_utf8();
        }
        yes
    }

    /// What stands at the current place, for errors.
    fn here(&self) -> String {
        match self.peek() {
            None => "the end of the header".into(),
            Some(_) => format!(
                "`{}` at byte {}",
                self.text[self.at..].chars().take(12).collect::<String>(),
                self.at
            ),
        }
    }

    /// The whole header: one dict, then only spaces. A failure names the
    /// key whose value it is in, if any.
    fn header(&mut self) -> Result<Vec<(Lit, Lit)>, HeaderError> {
        if !self.eat('{') {
            return Err((None, format!("it starts with {}, not `{{`", self.here())));
        }
        let mut entries = Vec::new();
        loop {
            if self.eat('}') {
                break;
            }
            if !entries.is_empty() {
                if !self.eat(',') {
                    return Err((None, format!("expected `,` or `}}`, found {}", self.here())));
                }
                if self.eat('}') {
                    break;
                }
            }
            let key = self.value(0).map_err(|e| (None, e))?;
            if !self.eat(':') {
                return Err((Some(key), format!("expected `:`, found {}", self.here())));
            }
            match self.value(0) {
                Ok(v) => entries.push((key, v)),
                Err(e) => return Err((Some(key), e)),
            }
        }
        self.skip_space();
        if self.at < self.text.len() {
            return Err((None, format!("{} follows the dict", self.here())));
        }
        Ok(entries)
    }

    /// One literal at nesting `depth`.
    fn value(&mut self, depth: usize) -> Result<Lit, String> {
        self.skip_space();
        match self.peek() {
            Some(q @ ('\'' | '"')) => self.string(q),
            Some(open @ ('(' | '[')) => {
                if depth >= MAX_NESTING {
                    return Err(format!("tuples and lists nested deeper than {MAX_NESTING}"));
                }
                self.at += 1;
                self.sequence(open, depth + 1)
            }
            Some(c) if c.is_ascii_alphanumeric() || c == '-' || c == '+' => self.word(),
            _ => Err(format!("{} is not a Python literal", self.here())),
        }
    }

    /// The items of a tuple or list after its opening bracket. `(x)` is `x`
    /// itself, as in Python; `(x,)` and `()` are tuples.
    fn sequence(&mut self, open: char, depth: usize) -> Result<Lit, String> {
        let close = if open == '(' { ')' } else { ']' };
        let (mut items, mut comma) = (Vec::new(), false);
        loop {
            if self.eat(close) {
                break;
            }
            if !items.is_empty() {
                if !self.eat(',') {
                    return Err(format!("expected `,` or `{close}`, found {}", self.here()));
                }
                comma = true;
                if self.eat(close) {
                    break;
                }
            }
            items.push(self.value(depth)?);
        }
        Ok(match (open, items.len(), comma) {
            ('[', ..) => Lit::List(items),
            (_, 1, false) => items.remove(0),
            _ => Lit::Tuple(items),
        })
    }

    /// A quoted string (no prefix, no line break).
    fn string(&mut self, quote: char) -> Result<Lit, String> {
        let start = self.at;
        self.at += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(format!("the string at byte {start} does not end"));
            };
            self.at += c.len_utf8();
            match c {
                '\n' => return Err(format!("the string at byte {start} does not end on its line")),
                '\\' => out.push(self.escape()?),
                c if c == quote => return Ok(Lit::Str(out)),
                c => out.push(c),
            }
        }
    }

    /// The character of a backslash escape, after the backslash.
    fn escape(&mut self) -> Result<char, String> {
        let at = self.at;
        let c = self.peek().ok_or("a backslash ends the header")?;
        self.at += c.len_utf8();
        Ok(match c {
            '\\' | '\'' | '"' => c,
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'x' => {
                let hex = self.text.get(self.at..self.at + 2).unwrap_or("");
                let v = u8::from_str_radix(hex, 16).map_err(|_| format!("a bad `\\x` escape at byte {at}"))?;
                self.at += 2;
                char::from(v)
            }
            _ => return Err(format!("the escape `\\{c}` at byte {at} is not read")),
        })
    }

    /// `True`, `False` or a decimal integer (a sign allowed, no leading zeros).
    fn word(&mut self) -> Result<Lit, String> {
        let start = self.at;
        let rest = &self.text[start..];
        let len = rest
            .char_indices()
            .find(|&(i, c)| !(c.is_ascii_alphanumeric() || c == '_' || (i == 0 && (c == '-' || c == '+'))))
            .map_or(rest.len(), |(i, _)| i);
        let word = &rest[..len];
        self.at += len;
        let digits = word.trim_start_matches(['-', '+']);
        let plain = !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (digits.len() == 1 || !digits.starts_with('0'));
        match word {
            "True" => Ok(Lit::Bool(true)),
            "False" => Ok(Lit::Bool(false)),
            _ if plain => word
                .parse::<i128>()
                .map(Lit::Int)
                .map_err(|_| format!("the number `{word}` is too large")),
            _ => Err(format!("`{word}` at byte {start} is not a Python literal")),
        }
    }
}

/// The keys of a `.npy` header, each there exactly once, and what each holds.
const HEADER_KEYS: [(&str, &str); 3] = [
    ("descr", "a dtype"),
    ("fortran_order", "True or False"),
    ("shape", "a tuple of sizes"),
];

/// What a `.npy` header says.
struct Header {
    /// The dtype: a string such as `<f4`, or a structured dtype as Python writes it.
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// Reads a `.npy` header as numpy does: a Python literal dict of exactly the
/// keys `descr`, `fortran_order` and `shape`, each once, with a string (or
/// list) dtype, a boolean order and a tuple of whole numbers.
fn read_header(text: &str) -> Result<Header, String> {
    let entries = LitReader { text, at: 0 }.header().map_err(|(key, e)| match key {
        Some(Lit::Str(k)) if HEADER_KEYS.iter().any(|(n, _)| *n == k) => {
            let what = HEADER_KEYS.iter().find(|(n, _)| *n == k).map_or("", |(_, w)| *w);
            format!("the .npy header's `{k}` is not {what}: {e}")
        }
        _ => format!("the .npy header is not a Python dict literal: {e}"),
    })?;
    let mut values: [Option<Lit>; 3] = [None, None, None];
    for (k, v) in entries {
        let i = match &k {
            Lit::Str(name) => HEADER_KEYS.iter().position(|(n, _)| n == name),
            _ => None,
        };
        let Some(i) = i else {
            return Err(format!(
                "the .npy header has the key {k}; numpy's headers have exactly 'descr', 'fortran_order' and 'shape'"
            ));
        };
        if values[i].replace(v).is_some() {
            return Err(format!("the .npy header gives {k} twice"));
        }
    }
    let [descr, order, shape] = values;
    let descr = match descr.ok_or("the .npy header has no `descr`")? {
        Lit::Str(s) => s,
        other => other.to_string(),
    };
    let fortran_order = match order {
        Some(Lit::Bool(b)) => b,
        _ => return Err("the .npy header has no valid `fortran_order` (True or False)".into()),
    };
    let shape = match shape.ok_or("the .npy header has no `shape`")? {
        Lit::Tuple(dims) => dims
            .iter()
            .map(|d| match d {
                Lit::Int(v) => usize::try_from(*v).ok(),
                _ => None,
            })
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| format!("the .npy shape {} is not a tuple of sizes", Lit::Tuple(dims.clone()))),
        other => Err(format!("the .npy shape {other} is not a tuple of sizes")),
    }?;
    Ok(Header {
        descr,
        fortran_order,
        shape,
    })
}

/// The bytes of one element of a dtype this reader reads.
fn item_size(descr: &str) -> Result<usize, String> {
    match descr {
        "<f4" | "<i4" => Ok(4),
        "<i8" => Ok(8),
        "|u1" | "<u1" => Ok(1),
        d if d.starts_with('>') => Err(format!(
            "dtype `{d}` is big-endian; save it little-endian (arr.astype('<f4'))"
        )),
        d => Err(format!(
            "dtype `{d}` is not supported: inputs must be float32 (`<f4`), labels int64, int32 or uint8"
        )),
    }
}

/// Parses a `.npy` file's bytes; `path` names it in errors.
pub fn parse_npy(bytes: &[u8], path: &str) -> Result<Npy, DataError> {
    let bad = |what: String| invalid(path, what);
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a NumPy .npy file (no \\x93NUMPY magic)".into()));
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => {
            return Err(bad(format!(
                ".npy format version {v} is not supported (1, 2 and 3 are)"
            )))
        }
    };
    if len > 1 << 16 || start + len > bytes.len() {
        return Err(DataError::Truncated {
            path: path.into(),
            what: format!("header of {len} bytes in a file of {}", bytes.len()),
        });
    }
    let header =
        std::str::from_utf8(&bytes[start..start + len]).map_err(|_| bad("the .npy header is not text".into()))?;
    let Header {
        descr,
        fortran_order,
        shape,
    } = read_header(header).map_err(bad)?;
    if fortran_order {
        return Err(bad(
            "the array is in Fortran order; save it in C order (np.ascontiguousarray)".into(),
        ));
    }
    if shape.len() > 8 {
        return Err(bad(format!("an array of {} dimensions", shape.len())));
    }
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= 1 << 32)
        .ok_or_else(|| bad(format!("the array's shape {shape:?} is implausibly large")))?;
    let descr = descr.as_str();
    let item = item_size(descr).map_err(bad)?;
    let body = &bytes[start + len..];
    let need = count.saturating_mul(item);
    if body.len() > need {
        return Err(bad(format!(
            "{} trailing bytes: shape {shape:?} of `{descr}` needs {need} bytes of data, the file has {}",
            body.len() - need,
            body.len()
        )));
    }
    if body.len() < need {
        return Err(DataError::Truncated {
            path: path.into(),
            what: format!(
                "shape {shape:?} of `{descr}` needs {need} bytes of data, the file has {}",
                body.len()
            ),
        });
    }
    // The decoded copy is checked against the memory budget first.
    crate::memory::check_bytes(&format!("{path}: {count} values"), (count as u64).saturating_mul(8))
        .map_err(|e| bad(e.to_string()))?;
    let data = match descr {
        "<f4" => NpyData::F32(
            body.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        "<i8" => NpyData::Int(
            body.chunks_exact(8)
                .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect(),
        ),
        "<i4" => NpyData::Int(
            body.chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                .collect(),
        ),
        _ => NpyData::Int(body.iter().map(|&b| b as i64).collect()),
    };
    Ok(Npy { shape, data })
}

/// Reads a `.npy` file (regular files only, at most [`MAX_NPY_BYTES`]).
pub fn read_npy(path: &Path) -> Result<Npy, DataError> {
    let p = path.display().to_string();
    let bytes = crate::fs::read_capped(path, file_cap(MAX_NPY_BYTES)).map_err(|e| DataError::Invalid {
        path: p.clone(),
        what: strip_path(&e.to_string(), &p),
    })?;
    parse_npy(&bytes, &p)
}

/// Writes a C-order little-endian `float32` array as `.npy` (version 1).
pub fn npy_f32_bytes(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    out
}
