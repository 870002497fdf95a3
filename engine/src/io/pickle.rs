//! A small pickle virtual machine: enough of protocols 0-5 to read what `torch.save` writes
//! (state dicts of tensors, nested dicts, plain numbers and strings). It builds a tree of values
//! and never imports or calls anything: a GLOBAL is just a (module, name) pair and REDUCE/NEWOBJ
//! record the call, which the torch reader then interprets for the few functions it knows.
//!
//! Compound objects live in an arena and values refer to them by index. That gives pickle's
//! reference semantics (a memoized dict filled in later is the same dict everywhere) at the cost of
//! a copy of an index, so hostile input cannot blow up memory by fetching a large object from the
//! memo many times, and dropping the tree is never recursive. Every read is bounds-checked: bad
//! input is an error naming the byte offset, never a panic.

use std::collections::HashMap;
use std::rc::Rc;

/// A pickle value. Compound objects are indices into `Pickle::objs`.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit an i64 (kept only so that such a leaf can be skipped).
    BigInt,
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Obj(usize),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Obj {
    Tuple(Vec<Value>),
    /// Lists, and sets (which torch checkpoints rarely hold; order does not matter to us).
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global { module: Rc<str>, name: Rc<str> },
    /// `func(*args)` from REDUCE, or `cls.__new__(cls, *args)` from NEWOBJ.
    Call { func: Value, args: Value },
    /// A persistent id (BINPERSID): torch's reference to a storage.
    PersId(Value),
}

/// A parsed pickle: the arena of compound objects and the value STOP returned.
#[derive(Debug)]
pub struct Pickle {
    pub objs: Vec<Obj>,
    pub root: Value,
}

impl Pickle {
    /// The compound object a value refers to, if it is one.
    pub fn obj(&self, v: &Value) -> Option<&Obj> {
        match v {
            Value::Obj(i) => self.objs.get(*i),
            _ => None,
        }
    }

    /// (module, name) when `v` is a GLOBAL.
    pub fn global(&self, v: &Value) -> Option<(&str, &str)> {
        match self.obj(v) {
            Some(Obj::Global { module, name }) => Some((module, name)),
            _ => None,
        }
    }

    /// The elements when `v` is a tuple or list.
    pub fn seq(&self, v: &Value) -> Option<&[Value]> {
        match self.obj(v) {
            Some(Obj::Tuple(x)) | Some(Obj::List(x)) => Some(x),
            _ => None,
        }
    }
}

/// Entries on the VM stack: values, and the MARK that opcodes taking a variable number of items
/// pop back to.
#[derive(Clone)]
enum Slot {
    Mark,
    V(Value),
}

/// Parses a pickle. Errors say what went wrong and at which byte.
pub fn parse(data: &[u8]) -> std::result::Result<Pickle, String> {
    parse_prefix(data).map(|(p, _)| p)
}

/// Parses the pickle at the start of `data` and says how many bytes it took (up to and including
/// its STOP), for streams of pickles such as torch's legacy format.
pub fn parse_prefix(data: &[u8]) -> std::result::Result<(Pickle, usize), String> {
    Vm { data, pos: 0, stack: Vec::new(), memo: HashMap::new(), objs: Vec::new() }.run()
}

/// Upper bound on arena objects: far above any real checkpoint (a few objects per tensor), far
/// below what would exhaust memory.
const MAX_OBJS: usize = 50_000_000;

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    memo: HashMap<u64, Value>,
    objs: Vec<Obj>,
}

impl<'a> Vm<'a> {
    fn err<T>(&self, msg: impl std::fmt::Display) -> std::result::Result<T, String> {
        Err(format!("pickle: {msg} (at byte {})", self.pos))
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if n > self.data.len() - self.pos {
            return self.err(format!("truncated: needs {n} more bytes, {} left", self.data.len() - self.pos));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn le<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn len_u32(&mut self) -> std::result::Result<usize, String> {
        Ok(u32::from_le_bytes(self.le()?) as usize)
    }
    fn len_u64(&mut self) -> std::result::Result<usize, String> {
        let n = u64::from_le_bytes(self.le()?);
        usize::try_from(n).or_else(|_| self.err(format!("length {n} too large")))
    }
    /// A text line (protocol 0 arguments), without its newline.
    fn line(&mut self) -> std::result::Result<&'a str, String> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else { return self.err("truncated: missing newline") };
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).or_else(|_| self.err("text argument is not UTF-8"))
    }

    fn push(&mut self, v: Value) {
        self.stack.push(Slot::V(v));
    }
    fn new_obj(&mut self, o: Obj) -> std::result::Result<Value, String> {
        if self.objs.len() >= MAX_OBJS {
            return self.err("too many objects");
        }
        self.objs.push(o);
        Ok(Value::Obj(self.objs.len() - 1))
    }
    fn pop(&mut self) -> std::result::Result<Value, String> {
        match self.stack.pop() {
            Some(Slot::V(v)) => Ok(v),
            Some(Slot::Mark) => self.err("unexpected MARK on the stack"),
            None => self.err("stack underflow"),
        }
    }
    fn top(&self) -> std::result::Result<Value, String> {
        match self.stack.last() {
            Some(Slot::V(v)) => Ok(v.clone()),
            Some(Slot::Mark) => self.err("unexpected MARK on the stack"),
            None => self.err("stack underflow"),
        }
    }
    /// Pops everything above the topmost MARK, and the MARK.
    fn pop_mark(&mut self) -> std::result::Result<Vec<Value>, String> {
        let Some(m) = self.stack.iter().rposition(|s| matches!(s, Slot::Mark)) else { return self.err("no MARK on the stack") };
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items.into_iter().map(|s| if let Slot::V(v) = s { v } else { unreachable!("marks are above m only if rposition missed one") }).collect())
    }
    fn tuple(&mut self, items: Vec<Value>) -> std::result::Result<(), String> {
        let v = self.new_obj(Obj::Tuple(items))?;
        self.push(v);
        Ok(())
    }
    fn memo_put(&mut self, key: u64) -> std::result::Result<(), String> {
        let v = self.top()?;
        self.memo.insert(key, v);
        Ok(())
    }
    fn memo_get(&mut self, key: u64) -> std::result::Result<(), String> {
        match self.memo.get(&key) {
            Some(v) => {
                let v = v.clone();
                self.push(v);
                Ok(())
            }
            None => self.err(format!("memo key {key} was never stored")),
        }
    }
    /// Appends `items` to the list (or set) `target` refers to.
    fn extend_list(&mut self, target: &Value, items: Vec<Value>) -> std::result::Result<(), String> {
        match target {
            Value::Obj(i) => match self.objs.get_mut(*i) {
                Some(Obj::List(l)) => {
                    l.extend(items);
                    Ok(())
                }
                _ => self.err("APPEND(S)/ADDITEMS target is not a list"),
            },
            _ => self.err("APPEND(S)/ADDITEMS target is not a list"),
        }
    }
    /// Sets `items` (key, value, key, value, ...) in the dict `target` refers to.
    fn extend_dict(&mut self, target: &Value, items: Vec<Value>) -> std::result::Result<(), String> {
        if !items.len().is_multiple_of(2) {
            return self.err("SETITEMS with an odd number of items");
        }
        let is_dict = matches!(target, Value::Obj(i) if matches!(self.objs.get(*i), Some(Obj::Dict(_))));
        if !is_dict {
            return self.err("SETITEM(S) target is not a dict");
        }
        let Value::Obj(i) = target else { unreachable!("checked above") };
        let Some(Obj::Dict(d)) = self.objs.get_mut(*i) else { unreachable!("checked above") };
        // Repeated keys cannot come from a Python dict; the torch reader rejects them when it
        // flattens the keys, so they are kept here rather than searched for on every insert.
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }
    fn text_int(&mut self) -> std::result::Result<Value, String> {
        let l = self.line()?;
        let l = l.trim_end_matches('L');
        match l {
            "00" => Ok(Value::Bool(false)),
            "01" => Ok(Value::Bool(true)),
            _ => match l.parse::<i64>() {
                Ok(i) => Ok(Value::Int(i)),
                Err(_) if !l.is_empty() && l.trim_start_matches('-').bytes().all(|b| b.is_ascii_digit()) => Ok(Value::BigInt),
                Err(_) => self.err(format!("bad integer literal {l:?}")),
            },
        }
    }
    fn long(&mut self, n: usize) -> std::result::Result<Value, String> {
        let b = self.take(n)?;
        if n == 0 {
            return Ok(Value::Int(0));
        }
        let negative = b[n - 1] & 0x80 != 0;
        if n > 8 {
            // Fits only if the extra high bytes are pure sign extension.
            let fill = if negative { 0xff } else { 0 };
            if b[8..].iter().any(|&x| x != fill) || (b[7] & 0x80 != 0) != negative {
                return Ok(Value::BigInt);
            }
        }
        let mut a = [if negative { 0xff } else { 0 }; 8];
        a[..n.min(8)].copy_from_slice(&b[..n.min(8)]);
        Ok(Value::Int(i64::from_le_bytes(a)))
    }
    fn global(&mut self, module: &str, name: &str) -> std::result::Result<Value, String> {
        self.new_obj(Obj::Global { module: module.into(), name: name.into() })
    }
    /// REDUCE/NEWOBJ: a dict constructor with no arguments is a plain dict (OrderedDict is how
    /// every state dict comes); everything else is recorded as a call.
    fn call(&mut self, func: Value, args: Value) -> std::result::Result<Value, String> {
        let no_args = matches!(self.objs.get(match args { Value::Obj(i) => i, _ => usize::MAX }), Some(Obj::Tuple(a)) if a.is_empty());
        let is_dict = matches!(&func, Value::Obj(i) if matches!(self.objs.get(*i), Some(Obj::Global { module, name })
            if matches!((&**module, &**name), ("collections", "OrderedDict") | ("builtins", "dict") | ("__builtin__", "dict"))));
        if is_dict && no_args {
            return self.new_obj(Obj::Dict(Vec::new()));
        }
        self.new_obj(Obj::Call { func, args })
    }

    fn run(mut self) -> std::result::Result<(Pickle, usize), String> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return self.err(format!("unsupported pickle protocol {p}"));
                    }
                }
                0x95 => {
                    self.take(8)?; // FRAME: a length hint only
                }
                b'.' => {
                    let root = self.pop()?;
                    return Ok((Pickle { objs: self.objs, root }, self.pos));
                }
                b'(' => self.stack.push(Slot::Mark),
                b'0' => {
                    self.stack.pop().map_or_else(|| self.err("POP on an empty stack"), |_| Ok(()))?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?;
                    self.push(v);
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.push(Value::Int(v as i64));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let v = self.long(n)?;
                    self.push(v);
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.le()?);
                    if n < 0 {
                        return self.err("LONG4 with a negative length");
                    }
                    let v = self.long(n as usize)?;
                    self.push(v);
                }
                b'I' | b'L' => {
                    let v = self.text_int()?;
                    self.push(v);
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.push(Value::Float(v));
                }
                b'F' => {
                    let l = self.line()?;
                    let v = l.trim().parse::<f64>().or_else(|_| self.err(format!("bad float literal {l:?}")))?;
                    self.push(Value::Float(v));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.len_u32()?,
                        0x8c => self.u8()? as usize,
                        _ => self.len_u64()?,
                    };
                    let b = self.take(n)?;
                    let s = std::str::from_utf8(b).or_else(|_| self.err("string is not valid UTF-8"))?;
                    self.push(Value::Str(s.into()));
                }
                b'T' | b'U' => {
                    // Python 2 str: bytes, read as Latin-1 text like Python 3's default.
                    let n = if op == b'T' {
                        let n = i32::from_le_bytes(self.le()?);
                        if n < 0 {
                            return self.err("BINSTRING with a negative length");
                        }
                        n as usize
                    } else {
                        self.u8()? as usize
                    };
                    let s: String = self.take(n)?.iter().map(|&b| b as char).collect();
                    self.push(Value::Str(s.into()));
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.len_u32()?,
                        b'C' => self.u8()? as usize,
                        _ => self.len_u64()?,
                    };
                    let b = self.take(n)?;
                    self.push(Value::Bytes(b.into()));
                }
                b'}' => {
                    let v = self.new_obj(Obj::Dict(Vec::new()))?;
                    self.push(v);
                }
                b']' | 0x8f => {
                    let v = self.new_obj(Obj::List(Vec::new()))?;
                    self.push(v);
                }
                b')' => self.tuple(Vec::new())?,
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n || self.stack[self.stack.len() - n..].iter().any(|s| matches!(s, Slot::Mark)) {
                        return self.err(format!("TUPLE{n} needs {n} values on the stack"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let items = items.into_iter().map(|s| if let Slot::V(v) = s { v } else { unreachable!("checked above") }).collect();
                    self.tuple(items)?;
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.tuple(items)?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.new_obj(Obj::List(items))?;
                    self.push(v);
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    let v = self.new_obj(Obj::List(items))?;
                    self.push(v);
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let v = self.new_obj(Obj::Dict(Vec::new()))?;
                    self.extend_dict(&v, items)?;
                    self.push(v);
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    self.extend_dict(&d, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let d = self.top()?;
                    self.extend_dict(&d, items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    let l = self.top()?;
                    self.extend_list(&l, vec![v])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    let l = self.top()?;
                    self.extend_list(&l, items)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let v = self.global(module, name)?;
                    self.push(v);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(m), Value::Str(n)) = (module, name) else { return self.err("STACK_GLOBAL needs two strings") };
                    let v = self.global(&m, &n)?;
                    self.push(v);
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.call(func, args)?;
                    self.push(v);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.call(cls, args)?;
                    self.push(v);
                }
                b'b' => {
                    // BUILD sets an object's state (e.g. a state dict's `_metadata` attribute);
                    // nothing we read depends on it.
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.new_obj(Obj::PersId(pid))?;
                    self.push(v);
                }
                b'P' => {
                    let l = self.line()?;
                    let v = self.new_obj(Obj::PersId(Value::Str(l.into())))?;
                    self.push(v);
                }
                b'q' => {
                    let k = self.u8()? as u64;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.le()?) as u64;
                    self.memo_put(k)?;
                }
                b'p' => {
                    let l = self.line()?;
                    let k = l.parse::<u64>().or_else(|_| self.err(format!("bad memo key {l:?}")))?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.u8()? as u64;
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.le()?) as u64;
                    self.memo_get(k)?;
                }
                b'g' => {
                    let l = self.line()?;
                    let k = l.parse::<u64>().or_else(|_| self.err(format!("bad memo key {l:?}")))?;
                    self.memo_get(k)?;
                }
                _ => {
                    self.pos = at;
                    return self.err(format!("unsupported pickle opcode 0x{op:02x}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_pickle_reads_nested_containers() {
        // pickle.dumps({'a': [1, -2, (3.5, 'x')], 'b': True}, protocol=2)
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00X\x01\x00\x00\x00xq\x03\x86q\x04eX\x01\x00\x00\x00bq\x05\x88u.";
        let pk = parse(p).unwrap();
        let Some(Obj::Dict(d)) = pk.obj(&pk.root) else { panic!("root is not a dict") };
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].0, Value::Str("a".into()));
        let l = pk.seq(&d[0].1).unwrap();
        assert_eq!(&l[..2], &[Value::Int(1), Value::Int(-2)]);
        assert_eq!(pk.seq(&l[2]).unwrap(), &[Value::Float(3.5), Value::Str("x".into())]);
        assert_eq!(d[1].1, Value::Bool(true));
    }

    #[test]
    fn io_pickle_memo_shares_objects() {
        // d = {}; pickle.dumps([d, d], protocol=2) after d['k'] = 1 is set through the memo
        let p = b"\x80\x02]q\x00(}q\x01X\x01\x00\x00\x00kK\x01sh\x01e.";
        let pk = parse(p).unwrap();
        let l = pk.seq(&pk.root).unwrap();
        assert_eq!(l[0], l[1]);
    }

    #[test]
    fn io_pickle_prefix_stops_at_stop() {
        // Two pickles back to back: 7 then [].
        let (p, n) = parse_prefix(b"\x80\x02K\x07.\x80\x02].").unwrap();
        assert_eq!((p.root, n), (Value::Int(7), 5));
        assert!(parse_prefix(b"\x80\x02K\x07").is_err());
    }

    #[test]
    fn io_pickle_long1_and_errors() {
        assert_eq!(parse(b"\x8a\x02\x00\x80.").unwrap().root, Value::Int(-32768));
        assert_eq!(parse(b"\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01.").unwrap().root, Value::BigInt);
        for bad in [&b""[..], b"\x80", b"X\xff\xff\xff\xff", b"h\x05.", b"s.", b"\xff", b"(\x85.", b"K\x01(\x86."] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
